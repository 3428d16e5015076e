"""The data jobs' preflight (pipelines.common.run_job): inputs and output are checked before
anything is written or Ray starts; every failure names the input and how to fix it."""

from __future__ import annotations

import os

import pytest

from pipelines import prep_pairs, prep_pretext
from sama.preflight import CheckFailed, CheckWarning, PreflightError
from sama.prep.inputs import check_input_prefix
from sama.prep.pairs_job import PrepPairsConfig
from sama.prep.pretext_job import PrepPretextConfig


def _pretext(input_uri: str, output_uri: str) -> PrepPretextConfig:
    cfg = PrepPretextConfig()
    cfg.input.uri = input_uri
    cfg.output.uri = output_uri
    return cfg


def test_an_empty_input_prefix_fails_before_anything_is_written(tmp_path):
    (tmp_path / "raw").mkdir()
    output = tmp_path / "out"
    with pytest.raises(PreflightError) as caught:
        prep_pretext.run(_pretext(str(tmp_path / "raw"), str(output)))
    message = str(caught.value)
    assert message.startswith("prep-pretext: 1 preflight check(s) failed")
    assert f"input: the input prefix {tmp_path / 'raw'} holds no files" in message
    assert not output.exists()  # no lease, no config, no shards


def test_an_input_prefix_without_videos_is_named_with_its_suffixes(tmp_path):
    raw = tmp_path / "raw"
    raw.mkdir()
    (raw / "notes.txt").write_text("hello")
    cfg = _pretext(str(raw), str(tmp_path / "out"))
    with pytest.raises(CheckFailed, match=r"none of 1 file\(s\) is a video \(.mp4") as caught:
        check_input_prefix(cfg.input)
    assert "input.suffixes" in caught.value.fix
    (raw / "clip.mp4").write_bytes(b"x")
    assert check_input_prefix(cfg.input) == f"{raw}: 1 video or tar input(s) among 2 file(s)"


def test_a_prefix_listed_only_in_part_warns_instead_of_failing(tmp_path, monkeypatch):
    from sama import storage

    raw = tmp_path / "raw"
    raw.mkdir()
    (raw / "a.txt").write_text("x")
    monkeypatch.setattr(storage, "list_files_head", lambda uri, limit=1000: ([str(raw / "a.txt")], False))
    with pytest.raises(CheckWarning, match="the first 1 file"):
        check_input_prefix(_pretext(str(raw), "").input)


def test_an_unwritable_output_fails_before_ray_starts(tmp_path):
    raw = tmp_path / "raw"
    raw.mkdir()
    (raw / "clip.mp4").write_bytes(b"x")
    blocker = tmp_path / "a-file"
    blocker.write_text("x")
    with pytest.raises(PreflightError, match=r"output: cannot write under .*a-file/out"):
        prep_pretext.run(_pretext(str(raw), str(blocker / "out")))


def test_prep_pairs_checks_each_manifest(tmp_path):
    cfg = PrepPairsConfig()
    good = tmp_path / "edits.csv"
    good.write_text("source,target,instruction\n")
    empty = tmp_path / "empty.csv"
    empty.write_text("")
    cfg.input.manifests = [str(good), str(tmp_path / "missing.jsonl"), str(empty)]
    cfg.output.uri = str(tmp_path / "out")
    with pytest.raises(
        PreflightError, match=r"cannot read the manifest .*missing.jsonl: StorageError: .*no such file"
    ):
        prep_pairs.run(cfg)
    cfg.input.manifests = [str(good), str(empty)]
    with pytest.raises(PreflightError, match=r"manifest .*empty.csv is empty"):
        prep_pairs.run(cfg)
    assert not os.path.exists(cfg.output.uri)
