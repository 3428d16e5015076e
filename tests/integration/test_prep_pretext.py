"""End-to-end tests of `sama prep-pretext` on the shared local Ray cluster, local and loopback S3."""

from __future__ import annotations

import dataclasses
import json
import os
import time

import pytest

from pipelines import prep_pretext
from sama import schema, storage, synthetic
from sama.buckets import Bucket
from sama.config import apply_override
from sama.prep import ledger
from sama.prep.pretext_job import PrepPretextConfig
from tests.integration.killing import kill_after_markers
from tests.integration.ledger_invariants import assert_ledger_invariants

pytestmark = pytest.mark.integration

SMALL = [
    "clips.num_frames=17",
    "clips.fps=8",
    "clips.max_clips_per_video=2",
    "clips.min_side=32",
    "buckets.base_height=64",
    "buckets.base_width=112",
    "input.videos_per_unit=3",
    "shards.max_samples=4",
    "encode.preset=ultrafast",
]


def small_config(input_uri: str, output_uri: str, *extra: str) -> PrepPretextConfig:
    cfg = PrepPretextConfig()
    for assignment in [*SMALL, f"input.uri={input_uri}", f"output.uri={output_uri}", *extra]:
        cfg = apply_override(cfg, assignment)
    return cfg


def make_inputs(root: str, count: int = 6) -> tuple[list[str], dict[str, str]]:
    videos = synthetic.write_raw_videos(storage.join(root, "videos"), count, seed=3, fps=12.0, seconds=5.0)
    bad = synthetic.write_bad_inputs(storage.join(root, "bad"))
    return videos, bad


def read_all(output_uri: str) -> list[schema.Sample]:
    return list(schema.webdataset_samples(ledger.shards_uri(output_uri)))


def check_output(output_uri: str, videos: list[str], bad: dict[str, str]) -> list[schema.Sample]:
    summary = json.loads(storage.read_text(storage.join(output_uri, ledger.SUMMARY_FILE)))
    assert summary["inputs_seen"] == len(videos) + len(bad)
    assert summary["accepted"] + summary["rejected"] == summary["inputs_seen"]
    assert summary["accepted"] == len(videos)
    rejects = [
        json.loads(line) for line in storage.read_text(storage.join(output_uri, "rejects.jsonl")).splitlines()
    ]
    assert {r["input"]: r["reason"] for r in rejects} == bad
    assert all(r["input"] in r["detail"] for r in rejects)

    samples = read_all(output_uri)
    assert len(samples) == summary["samples"] == 2 * len(videos)  # 5 s videos give two 2.125 s clips each
    assert len({s.key for s in samples}) == len(samples)
    assert sum(summary["samples_per_task"].values()) == len(samples)
    for s in samples:
        bucket = Bucket.parse(s.meta.bucket)
        target = s.decode_target()
        assert target.shape == (17, bucket.height, bucket.width, 3)
        # Store-once (the default): no sample holds a source member; a pretext sample's source is
        # rebuilt from the target and its recorded parameters.
        assert s.source is None
        source = s.decode_source()
        if s.meta.task == "t2v":
            assert source is None and s.meta.instruction == s.meta.caption
        else:
            expected = 9 if s.meta.task == "speed" else 17
            assert source.shape == (expected, bucket.height, bucket.width, 3)
            assert s.meta.source_num_frames == expected
            assert (source != target[: len(source)]).any()
        assert s.meta.source_uri in videos
    return samples


def test_prep_pretext_local_end_to_end(ray_cluster, tmp_path):
    videos, bad = make_inputs(str(tmp_path / "raw"))
    out = str(tmp_path / "out")
    summary = prep_pretext.run(small_config(str(tmp_path / "raw"), out))
    samples = check_output(out, videos, bad)
    assert summary.run_units == 4  # 6 good + 5 bad files in units of 3
    # Captions from sidecars reach the instruction (the synthetic writer leaves every 5th without one).
    with_caption = [s for s in samples if s.meta.caption]
    assert with_caption and all(s.meta.instruction.endswith(s.meta.caption) for s in with_caption)
    assert storage.exists(storage.join(out, "config.yaml"))

    # A rerun with the same inputs skips everything and changes nothing.
    shards_before = schema.list_shards(ledger.shards_uri(out))
    again = prep_pretext.run(small_config(str(tmp_path / "raw"), out))
    assert again.run_units == 0 and again.run_units_skipped == 4
    assert schema.list_shards(ledger.shards_uri(out)) == shards_before
    assert sorted(s.key for s in read_all(out)) == sorted(s.key for s in samples)

    # New inputs added later are processed once, alongside the old ones.
    extra = synthetic.write_raw_videos(str(tmp_path / "raw" / "more"), 1, seed=99, fps=12.0, seconds=5.0)
    third = prep_pretext.run(small_config(str(tmp_path / "raw"), out))
    assert third.run_units == 1 and third.samples == len(samples) + 2
    assert {s.meta.source_uri for s in read_all(out)} == set(videos) | set(extra)

    # --overwrite starts over.
    fresh = prep_pretext.run(small_config(str(tmp_path / "raw"), out), overwrite=True)
    assert fresh.run_units == fresh.units == 4  # 12 inputs in units of 3


def test_prep_pretext_s3_end_to_end(ray_cluster, s3_bucket):
    videos, bad = make_inputs(f"{s3_bucket}/raw")
    out = f"{s3_bucket}/out"
    prep_pretext.run(small_config(f"{s3_bucket}/raw", out))
    check_output(out, videos, bad)
    # Credentials never reach the saved configuration.
    saved = storage.read_text(storage.join(out, "config.yaml"))
    assert os.environ["AWS_SECRET_ACCESS_KEY"] not in saved


def test_moved_output_reruns_as_a_noop_keeping_every_shard(ray_cluster, tmp_path, s3_bucket):
    videos, bad = make_inputs(str(tmp_path / "raw"))
    out = str(tmp_path / "out")
    prep_pretext.run(small_config(str(tmp_path / "raw"), out))
    keys = sorted(s.key for s in check_output(out, videos, bad))

    # Renamed on local disk, then migrated to object storage: the markers still match the shards.
    moved = str(tmp_path / "renamed")
    os.rename(out, moved)
    migrated = f"{s3_bucket}/migrated"
    storage.upload_dir(moved, migrated)
    for where in (moved, migrated):
        shards = schema.list_shards(ledger.shards_uri(where))
        rerun = prep_pretext.run(small_config(str(tmp_path / "raw"), where))
        assert rerun.run_units == 0 and rerun.run_units_skipped == 4
        assert schema.list_shards(ledger.shards_uri(where)) == shards
        assert sorted(s.key for s in check_output(where, videos, bad)) == keys
        assert_ledger_invariants(where)


def test_interrupted_overwrite_then_rerun_has_exactly_the_samples_of_one_run(
    ray_cluster, tmp_path, monkeypatch
):
    videos, bad = make_inputs(str(tmp_path / "raw"))
    out = str(tmp_path / "out")
    prep_pretext.run(small_config(str(tmp_path / "raw"), out))
    keys = sorted(s.key for s in check_output(out, videos, bad))

    # The overwrite dies after its first deletion (a killed driver, a storage outage).
    real_delete = storage.delete
    calls = []

    def delete_then_die(uri, recursive=False):
        if "/_preflight-" in uri:  # the preflight's write probe, before the overwrite begins
            return real_delete(uri, recursive=recursive)
        if calls:
            raise KeyboardInterrupt("driver killed during --overwrite")
        calls.append(uri)
        real_delete(uri, recursive=recursive)

    monkeypatch.setattr(storage, "delete", delete_then_die)
    with pytest.raises(KeyboardInterrupt):
        prep_pretext.run(small_config(str(tmp_path / "raw"), out), overwrite=True)
    monkeypatch.setattr(storage, "delete", real_delete)

    rerun = prep_pretext.run(small_config(str(tmp_path / "raw"), out))
    assert rerun.run_units == 4
    assert sorted(s.key for s in check_output(out, videos, bad)) == keys
    assert_ledger_invariants(out)


def test_transient_s3_read_errors_are_retried_and_persistent_ones_fail_the_unit(
    ray_cluster, s3_bucket, s3_faults, capsys
):
    from sama import cli

    videos, bad = make_inputs(f"{s3_bucket}/raw")
    out = f"{s3_bucket}/out"
    # Two 503s on every video read: botocore's retries absorb them.
    transient = s3_faults.fail("GET", r"/raw/videos/video_\d+\.mp4", times=2)
    prep_pretext.run(small_config(f"{s3_bucket}/raw", out))
    assert transient.hits == 2
    keys = sorted(s.key for s in check_output(out, videos, bad))

    # A persistent outage on one video: its unit fails (no marker, nothing rejected), the others
    # complete, and the command exits non-zero saying a rerun retries it.
    s3_faults.clear()
    again = f"{s3_bucket}/again"
    for method in ("GET", "HEAD"):
        s3_faults.fail(method, r"/raw/videos/video_0004\.mp4")
    argv = ["prep-pretext", "--input", f"{s3_bucket}/raw", "--output", again]
    argv += [arg for assignment in SMALL for arg in ("--set", assignment)]
    assert cli.main(argv) == 1
    assert "Run the same command again to retry them" in capsys.readouterr().err
    summary = json.loads(storage.read_text(storage.join(again, ledger.SUMMARY_FILE)))
    assert summary["failed_units"] == 1 and len(summary["failures"]) == 1
    assert "storage unavailable" in summary["failures"][0]["error"]
    rejected = [
        json.loads(line)["input"]
        for line in storage.read_text(storage.join(again, "rejects.jsonl")).splitlines()
    ]
    assert not any("video_0004" in uri for uri in rejected)
    assert summary["units"] == 3 and summary["accepted"] + summary["rejected"] == summary["inputs_seen"]

    s3_faults.clear()  # the outage ends: the rerun does the failed unit only
    assert cli.main(argv) == 0
    assert sorted(s.key for s in check_output(again, videos, bad)) == keys
    assert_ledger_invariants(again)


def test_a_failed_shard_upload_fails_its_unit_and_a_rerun_completes(ray_cluster, s3_bucket, s3_faults):
    videos, bad = make_inputs(f"{s3_bucket}/raw")
    reference = f"{s3_bucket}/reference"
    prep_pretext.run(small_config(f"{s3_bucket}/raw", reference))
    keys = sorted(s.key for s in read_all(reference))
    out = f"{s3_bucket}/out"
    s3_faults.fail("PUT", r"/out/shards/")  # every shard upload of this output fails
    summary = prep_pretext.run(small_config(f"{s3_bucket}/raw", out))
    assert summary.failed_units == 3  # the units with good videos; the all-bad unit has no shard
    assert schema.list_shards(ledger.shards_uri(out)) == []
    assert all(not storage.exists(ledger.marker_uri(out, f.unit_id)) for f in summary.failures)
    s3_faults.clear()
    rerun = prep_pretext.run(small_config(f"{s3_bucket}/raw", out))
    assert rerun.failed_units == 0 and rerun.run_units == 3
    assert sorted(s.key for s in check_output(out, videos, bad)) == keys
    assert_ledger_invariants(out)


def test_a_second_run_on_a_leased_output_refuses_and_deletes_nothing(ray_cluster, tmp_path):
    videos, bad = make_inputs(str(tmp_path / "raw"))
    out = str(tmp_path / "out")
    prep_pretext.run(small_config(str(tmp_path / "raw"), out))
    shards = schema.list_shards(ledger.shards_uri(out))
    live = ledger.OutputLease(out, ttl_s=60).acquire()  # a run still writing this output
    try:
        for overwrite in (False, True):
            with pytest.raises(ledger.OutputLeased, match=f"owner {live.owner}"):
                prep_pretext.run(small_config(str(tmp_path / "raw"), out), overwrite=overwrite)
            assert schema.list_shards(ledger.shards_uri(out)) == shards
            assert len(ledger.read_markers(out)) == 4
    finally:
        live.release()
    # A run that died leaves a lease that expires; the next run then takes the output over.
    dead = ledger.OutputLease(out, ttl_s=60)
    expired = dataclasses.replace(dead._record(), expires_at=time.time() - 1)  # a second ago
    storage.write_text(dead.uri, json.dumps(dataclasses.asdict(expired)))
    again = prep_pretext.run(small_config(str(tmp_path / "raw"), out))
    assert again.run_units == 0 and again.run_units_skipped == 4
    check_output(out, videos, bad)
    assert_ledger_invariants(out)
    assert not storage.exists(dead.uri)


def test_tar_inputs_with_member_captions(ray_cluster, tmp_path):
    import io
    import tarfile

    raw = tmp_path / "tars"
    raw.mkdir()
    clips = synthetic.write_raw_videos(
        str(tmp_path / "loose"), 2, seed=5, fps=12.0, seconds=5.0, captions="none"
    )
    with tarfile.open(raw / "shard-0000.tar", "w") as tar:
        for i, uri in enumerate(clips):
            for name, data in (
                (f"clip{i}.mp4", storage.read_bytes(uri)),
                (f"clip{i}.txt", f"caption {i}".encode()),
            ):
                info = tarfile.TarInfo(name)
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
    out = str(tmp_path / "out")
    summary = prep_pretext.run(small_config(str(raw), out))
    assert summary.inputs_seen == 2 and summary.accepted == 2
    samples = read_all(out)
    assert len(samples) == 4
    assert {s.meta.caption for s in samples} == {"caption 0", "caption 1"}
    assert all(s.meta.source_uri.startswith(str(raw / "shard-0000.tar") + "#clip") for s in samples)


def test_kill_and_rerun_loses_and_duplicates_nothing(ray_cluster, tmp_path):
    raw = str(tmp_path / "raw")
    synthetic.write_raw_videos(raw, 10, seed=11, fps=12.0, seconds=5.0)
    reference = str(tmp_path / "reference")
    prep_pretext.run(small_config(raw, reference, "input.videos_per_unit=1"))
    expected = {s.key: s.meta for s in read_all(reference)}
    assert len(expected) == 20

    out = str(tmp_path / "killed")
    args = [f"--set={a}" for a in [*SMALL, "input.videos_per_unit=1", "shards.max_samples=1"]]
    killed_at = kill_after_markers(["jobs.prep_pretext", "--input", raw, "--output", out, *args], out)
    assert 2 <= killed_at < 10, f"the job was not killed mid-run (markers at kill: {killed_at})"

    summary = prep_pretext.run(small_config(raw, out, "input.videos_per_unit=1", "shards.max_samples=1"))
    assert summary.run_units_skipped >= killed_at
    got = read_all(out)
    assert len(got) == len(expected) == 20
    assert {s.key: s.meta for s in got} == expected
    assert summary.samples == 20 and summary.accepted == 10
