"""Unit tests for sama.prep.unit, the per-unit loop every data job runs: rejects vs failures,
poisoned inputs, disk full and storage outages (no Ray)."""

from __future__ import annotations

import errno
import io
import json
import os
import tarfile

import av
import pytest

from sama import schema, storage, synthetic, video
from sama.prep import ledger
from sama.prep.common import RejectInput
from sama.prep.inputs import InputConfig, VideoInput, WorkUnit, list_units, parse_caption, unit_id_for
from sama.prep.pretext_job import process_unit
from sama.prep.unit import RejectSource, UnitFailed, is_environment_failure, run_unit
from tests.unit.test_prep_pretext_job import FPS, SECONDS, SEED, add_member, small_cfg


def _sample(key: str) -> schema.Sample:
    meta = schema.SampleMeta(
        key=key, task="t2v", media="image", instruction="x", caption="x", fps=0.0, num_frames=1,
        height=8, width=8, bucket="8x8", source_uri=key,
    )  # fmt: skip
    return schema.Sample(meta=meta, target=b"\x89PNG fake", source=None)


def _accounted_once(result: ledger.UnitResult) -> bool:
    seen = result.accepted + [r.input for r in result.rejects]
    return sorted(seen) == sorted(result.inputs) and len(set(seen)) == len(seen)


def test_run_unit_rejects_bad_inputs_and_writes_the_rest(tmp_path):
    out = str(tmp_path / "out")

    def make(item, dropped):
        if item == "bad":
            raise RejectInput("too_short", "bad: 0.1 s")
        if item == "dup":
            raise RejectInput("duplicate", "dup: same as good")
        return [_sample(item)]

    inputs = [("good", "good"), ("bad", "bad"), ("dup", "dup"), ("also", "also")]
    result = run_unit("u" * 32, ["src"], out, schema.ShardConfig(), inputs, make)
    assert result.accepted == ["good", "also"] and result.samples == 2 and result.duplicates == 1
    assert [(r.input, r.reason) for r in result.rejects] == [("bad", "too_short"), ("dup", "duplicate")]
    assert _accounted_once(result)
    assert ledger.read_markers(out) == [result]


def test_a_source_unreadable_part_way_keeps_what_was_read_and_rejects_the_source(tmp_path):
    out = str(tmp_path / "out")

    def inputs():
        yield "tar#a", "a"
        raise RejectSource("tar", "bad_tar", "tar: unexpected end of data")

    result = run_unit(
        "u" * 32, ["tar"], out, schema.ShardConfig(), inputs(), lambda k, _dropped: [_sample(k)]
    )
    assert result.accepted == ["tar#a"] and result.inputs == ["tar#a", "tar"]
    assert [(r.input, r.reason) for r in result.rejects] == [("tar", "bad_tar")]


@pytest.mark.parametrize(
    "failure",
    [
        OSError(errno.ENOSPC, "No space left on device"),
        storage.StorageUnavailable("s3://b/v.mp4", "503 Slow Down"),
        MemoryError(),
    ],
    ids=["disk-full", "storage-unavailable", "out-of-memory"],
)
def test_environment_failures_fail_the_unit_instead_of_rejecting_inputs(tmp_path, failure):
    out = str(tmp_path / "out")
    assert is_environment_failure(failure)

    def make(item, dropped):
        if item == "second":
            raise failure
        return [_sample(item)]

    with pytest.raises(UnitFailed, match="u{32}"):
        run_unit("u" * 32, ["s"], out, schema.ShardConfig(), [("first", "first"), ("second", "second")], make)
    assert ledger.read_markers(out) == []  # no marker: the next run retries the whole unit


def test_a_shard_that_cannot_be_written_fails_the_unit(tmp_path, monkeypatch):
    out = str(tmp_path / "out")

    def full_disk(self, sample):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(schema.ShardWriter, "write", full_disk)
    with pytest.raises(UnitFailed, match="No space left"):
        run_unit("u" * 32, ["s"], out, schema.ShardConfig(), [("a", "a")], lambda k, _dropped: [_sample(k)])
    assert ledger.read_markers(out) == []


@pytest.fixture
def video_tar(tmp_path) -> str:
    """A tar of two captioned videos."""
    (src,) = synthetic.write_raw_videos(str(tmp_path / "v"), 1, seed=SEED, fps=FPS, seconds=SECONDS)
    data = open(src, "rb").read()
    path = tmp_path / "in" / "videos.tar"
    path.parent.mkdir()
    with tarfile.open(path, "w") as tar:
        for key in ("a", "b"):
            add_member(tar, f"{key}.mp4", data)
            add_member(tar, f"{key}.txt", f"clip {key}".encode())
    return str(path)


def test_disk_full_on_a_shard_write_of_a_tar_unit_is_a_failure_not_a_bad_tar(
    tmp_path, video_tar, monkeypatch
):
    out = str(tmp_path / "out")
    cfg = small_cfg(out)
    unit = WorkUnit(unit_id=unit_id_for([video_tar]), tar_uri=video_tar)
    real_write = schema.ShardWriter.write
    writes = []

    def write_until_full(self, sample):
        if writes:
            raise OSError(errno.ENOSPC, "No space left on device")
        writes.append(sample.key)
        real_write(self, sample)

    monkeypatch.setattr(schema.ShardWriter, "write", write_until_full)
    with pytest.raises(UnitFailed, match="No space left"):
        process_unit(unit, cfg)
    assert ledger.read_markers(out) == []

    monkeypatch.undo()
    result = process_unit(unit, cfg)  # the retry, once there is space
    assert result.accepted == [f"{video_tar}#a.mp4", f"{video_tar}#b.mp4"] and result.rejects == []


def test_a_truncated_tar_keeps_its_whole_members_and_is_rejected_as_bad_tar(tmp_path, video_tar):
    cut = str(tmp_path / "in" / "cut.tar")
    data = open(video_tar, "rb").read()
    # Cut inside the second video's data: the first member (and its caption) is whole.
    second = data.index(b"b.mp4")
    with open(cut, "wb") as handle:
        handle.write(data[: second + 4096])
    out = str(tmp_path / "out")
    result = process_unit(WorkUnit(unit_id=unit_id_for([cut]), tar_uri=cut), small_cfg(out))
    assert result.accepted == [f"{cut}#a.mp4"]
    assert [r.reason for r in result.rejects] == ["bad_tar"] and _accounted_once(result)


# ------------------------------------------------------------------------------------------
# Poisoned inputs: each is a reject with a reason; the unit and the job go on


@pytest.mark.parametrize(
    ("data", "suffix", "match"),
    [
        (b"[" * 100_000, ".json", "nested too deeply"),
        (b'{"caption": ' + b"9" * 5000 + b"}", ".json", "digits"),
        (b"caf\xe9 \xff\xfe", ".txt", "not UTF-8"),
        (b"x" * (1024 * 1024 + 1), ".txt", "more than a caption"),
    ],
    ids=["recursion", "huge-number", "invalid-utf8", "oversized"],
)
def test_poisoned_captions_are_caption_errors(data, suffix, match):
    with pytest.raises(RejectInput, match=match) as info:
        parse_caption(data, suffix, "clip.json")
    assert info.value.reason == "bad_caption" and "clip.json" in info.value.detail


def test_poisoned_inputs_are_rejected_and_the_unit_completes(tmp_path):
    root = tmp_path / "in"
    good = synthetic.write_raw_videos(str(root), 3, seed=SEED, fps=FPS, seconds=SECONDS)
    # Sidecars that would crash the parser (replacing the writer's), and a FIFO named like a video.
    for name in ("video_0001.json", "video_0002.txt"):
        (root / name).unlink()
    (root / "video_0001.json").write_bytes(b"[" * 100_000)
    (root / "video_0002.txt").write_bytes(b"\xff\xfe\xfa not text")
    os.mkfifo(root / "pipe.mp4")
    (unit,), _ = list_units(InputConfig(uri=str(root)))
    out = str(tmp_path / "out")
    result = process_unit(unit, small_cfg(out))
    reasons = {os.path.basename(r.input): r.reason for r in result.rejects}
    assert reasons == {
        "video_0001.mp4": "bad_caption",
        "video_0002.mp4": "bad_caption",
        "pipe.mp4": "missing",
    }
    assert result.accepted == [good[0]] and _accounted_once(result)
    assert "not a regular file" in next(r.detail for r in result.rejects if r.input.endswith("pipe.mp4"))


def test_huge_sparse_and_badly_captioned_tar_members_are_rejected_unread(tmp_path, video_tar):
    data = open(video_tar, "rb").read()
    path = str(tmp_path / "in" / "poison.tar")
    with tarfile.open(video_tar) as src, tarfile.open(path, "w") as tar:
        good = src.extractfile("a.mp4").read()
        add_member(tar, "ok.mp4", good)
        add_member(tar, "big.mp4", good + b"\0" * 4096)  # over the cap set below
        add_member(tar, "cap.mp4", good)
        add_member(tar, "cap.json", b'{"caption": ' + b"[" * 50_000 + b"}")
        sparse = tarfile.TarInfo("sparse.mp4")
        sparse.size = len(good)
        sparse.type = tarfile.GNUTYPE_SPARSE
        sparse.sparse = [(0, len(good))]
        tar.addfile(sparse, io.BytesIO(good))
    assert len(data) > 0
    cfg = small_cfg(str(tmp_path / "out"))
    cfg.input.max_member_bytes = len(good) + 1024
    result = process_unit(WorkUnit(unit_id=unit_id_for([path]), tar_uri=path), cfg)
    reasons = {r.input.split("#")[1]: r.reason for r in result.rejects}
    assert result.accepted == [f"{path}#ok.mp4"]
    assert reasons["big.mp4"] == "member_too_large" and reasons["cap.mp4"] == "bad_caption"
    assert reasons.get("sparse.mp4") in ("member_too_large", "bad_tar")
    assert _accounted_once(result)
    assert json.loads(result.to_json())["unit_id"] == result.unit_id


def test_a_video_declaring_too_many_pixels_is_rejected_before_decoding(tmp_path, monkeypatch):
    (src,) = synthetic.write_raw_videos(
        str(tmp_path / "v"), 1, seed=SEED, fps=FPS, seconds=SECONDS, sizes=[(128, 160)]
    )
    decoded = []
    real_decode = av.video.stream.VideoStream.decode

    def counting_decode(self, *args, **kwargs):
        decoded.append(1)
        return real_decode(self, *args, **kwargs)

    monkeypatch.setattr(video, "MAX_PIXELS", 128 * 160 - 1)
    monkeypatch.setattr(av.video.stream.VideoStream, "decode", counting_decode)
    out = str(tmp_path / "out")
    unit = WorkUnit(unit_id=unit_id_for([src]), videos=[VideoInput(src)])
    result = process_unit(unit, small_cfg(out))
    assert [(r.reason, "160x128" in r.detail) for r in result.rejects] == [("too_large", True)]
    assert result.accepted == [] and decoded == [] and _accounted_once(result)
