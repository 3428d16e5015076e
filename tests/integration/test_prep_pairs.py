"""End-to-end tests of `sama prep-pairs` on the shared local Ray cluster, local and loopback S3."""

from __future__ import annotations

import json

import numpy as np
import pytest

from pipelines import prep_pairs
from sama import schema, storage, synthetic, video
from sama.buckets import Bucket
from sama.config import apply_override
from sama.prep import ledger
from sama.prep.inputs import read_table
from sama.prep.pairs_job import PrepPairsConfig
from tests.integration.killing import kill_after_markers
from tests.integration.ledger_invariants import assert_ledger_invariants

pytestmark = pytest.mark.integration

SMALL = [
    "align.min_side=32",
    "align.max_frames=17",
    "buckets.base_height=64",
    "buckets.base_width=112",
    "input.rows_per_unit=4",
    "shards.max_samples=3",
    "encode.preset=ultrafast",
]


def small_config(manifests: list[str], output_uri: str, *extra: str) -> PrepPairsConfig:
    cfg = PrepPairsConfig()
    for assignment in [
        *SMALL,
        f"input.manifests={json.dumps(manifests)}",
        f"output.uri={output_uri}",
        *extra,
    ]:
        cfg = apply_override(cfg, assignment)
    return cfg


def build_manifest(root: str, fmt: str, count: int = 8) -> tuple[str, dict[int, str]]:
    """Synthetic pairs plus one bad row of each kind; returns the manifest URI and {row: reason}."""
    base = synthetic.write_edit_pairs(storage.join(root, "data"), count, seed=4, media="mixed", fps=12.0)
    rows = read_table(base)
    expected = {i: "low_score" for i in range(count) if i % 4 == 3}
    pairs = storage.join(root, "data", "pairs")
    # A target half as long as its source: not the same clip.
    frames = synthetic.render(synthetic.random_scene(77), 24, 12.0, 64, 96)
    storage.write_bytes(storage.join(pairs, "long.mp4"), video.encode_mp4(frames, 12.0))
    storage.write_bytes(storage.join(pairs, "short.mp4"), video.encode_mp4(frames[:12], 12.0))
    storage.write_bytes(storage.join(pairs, "corrupt.mp4"), b"\x00\x01garbage" * 300)
    good = {k: v for k, v in rows[0].items() if k in ("source", "target")}
    bad_rows = [
        ({"source": "pairs/does_not_exist.mp4", "target": good["target"], "instruction": "x"}, "missing"),
        ({"source": "pairs/corrupt.mp4", "target": good["target"], "instruction": "x"}, "decode_failed"),
        ({**good, "instruction": "   "}, "empty_instruction"),
        ({"source": "pairs/long.mp4", "target": "pairs/short.mp4", "instruction": "cut it"}, "unalignable"),
        (dict(rows[0]), "duplicate"),
    ]
    for row, reason in bad_rows:
        expected[len(rows)] = reason
        rows.append(row)
    uri = storage.join(root, "data", f"edits.{fmt}")
    synthetic.write_manifest(rows, uri, columns=synthetic.MANIFEST_COLUMNS)
    return uri, expected


def check_output(output_uri: str, manifest: str, expected_rejects: dict[int, str], rows: int) -> None:
    summary = json.loads(storage.read_text(storage.join(output_uri, ledger.SUMMARY_FILE)))
    assert summary["inputs_seen"] == rows
    assert summary["accepted"] + summary["rejected"] == rows
    rejects = {
        json.loads(line)["input"]: json.loads(line)["reason"]
        for line in storage.read_text(storage.join(output_uri, ledger.REJECTS_FILE)).splitlines()
    }
    got = {int(k.rsplit("#", 1)[1]): v for k, v in rejects.items()}
    # A corrupt file is reported as decode_failed or not_video depending on what its bytes look like.
    assert {k: ("decode_failed" if v == "not_video" else v) for k, v in got.items()} == expected_rejects
    assert summary["duplicates"] == 1

    samples = list(schema.webdataset_samples(ledger.shards_uri(output_uri)))
    assert len(samples) == summary["samples"] == summary["accepted"]
    assert len({s.key for s in samples}) == len(samples)
    media = {s.meta.media for s in samples}
    assert media == {"video", "image"}
    for s in samples:
        bucket = Bucket.parse(s.meta.bucket)
        src, tgt = s.decode_source(), s.decode_target()
        assert src.shape == tgt.shape
        assert src.shape[1:] == (bucket.height, bucket.width, 3)
        assert s.meta.instruction.startswith("[Video edit] ")
        assert s.meta.category and s.meta.scores
        if s.meta.media == "video":
            assert src.shape[0] == s.meta.num_frames and (s.meta.num_frames - 1) % 4 == 0
        # The shards of a media type hold only that media.
    for uri in schema.list_shards(ledger.shards_uri(output_uri)):
        kind = "image" if "/image/" in uri else "video"
        assert {s.meta.media for s in schema.iter_samples(uri)} == {kind}


@pytest.mark.parametrize("fmt", ["csv", "jsonl", "parquet"])
def test_prep_pairs_local_each_format(ray_cluster, tmp_path, fmt):
    manifest, expected = build_manifest(str(tmp_path / "in"), fmt)
    out = str(tmp_path / "out")
    summary = prep_pairs.run(small_config([manifest], out))
    check_output(out, manifest, expected, rows=13)
    again = prep_pairs.run(small_config([manifest], out))
    assert again.run_units == 0 and again.samples == summary.samples


def test_prep_pairs_s3(ray_cluster, s3_bucket):
    manifest, expected = build_manifest(f"{s3_bucket}/in", "csv")
    out = f"{s3_bucket}/out"
    prep_pairs.run(small_config([manifest], out))
    check_output(out, manifest, expected, rows=13)


def test_hostile_manifest_rows_are_rejected_and_the_job_goes_on(ray_cluster, tmp_path, caplog):
    base = synthetic.write_edit_pairs(str(tmp_path / "in" / "data"), 4, seed=4, media="image", fps=12.0)
    rows = read_table(base)
    good = {k: v for k, v in rows[0].items() if k in ("source", "target")}
    outside = tmp_path / "outside.png"
    outside.write_bytes(b"not yours")
    signature = "X-Amz-Signature=0123456789abcdef"
    hostile = {
        "/etc/passwd": "bad_location",
        f"file://{tmp_path}/in/data/{good['target']}": "bad_location",
        "../../outside.png": "bad_location",
        f"https://bucket.s3.amazonaws.com/v.mp4?X-Amz-Credential=AKIAEXAMPLE&{signature}": "bad_location",
        "http://user:hunter2@example.com/v.mp4": "bad_location",
    }
    for target in hostile:
        rows.append({"source": good["source"], "target": target, "instruction": "Add a cat.", "score_if": 9})
    manifest = synthetic.write_manifest(rows, str(tmp_path / "in" / "data" / "m.jsonl"))
    out = str(tmp_path / "out")
    summary = prep_pairs.run(small_config([manifest], out, "filter.enabled=false"))
    assert summary.failed_units == 0 and summary.inputs_seen == len(rows)
    lines = storage.read_text(storage.join(out, ledger.REJECTS_FILE)).splitlines()
    rejects = [json.loads(line) for line in lines]
    by_row = {int(r["input"].rsplit("#", 1)[1]): r for r in rejects}
    for offset, reason in enumerate(hostile.values()):
        assert by_row[4 + offset]["reason"] == reason
    assert_ledger_invariants(out)
    # No credential or signature anywhere: rejects, summary, saved config, logs.
    records = storage.list_files(out, suffixes=(".json", ".jsonl", ".yaml"))
    written = "".join(storage.read_text(uri) for uri in records)
    for secret in (signature, "AKIAEXAMPLE", "hunter2"):
        assert secret not in written and secret not in caplog.text


def test_aligned_pair_content(ray_cluster, tmp_path):
    """Different fps, length and size: the target is brought onto the source's frames and framing."""
    scene = synthetic.random_scene(8)
    edited, instruction = synthetic.make_edit(scene, "recolor", 1)
    src = synthetic.render(scene, 36, 12.0, 96, 160)  # 3 s at 12 fps
    tgt = synthetic.render(edited, 26, 8.0, 192, 320)  # 3.25 s at 8 fps, twice the size
    root = tmp_path / "pair"
    storage.write_bytes(str(root / "src.mp4"), video.encode_mp4(src, 12.0))
    storage.write_bytes(str(root / "tgt.mp4"), video.encode_mp4(tgt, 8.0))
    manifest = synthetic.write_manifest(
        [{"source": "src.mp4", "target": "tgt.mp4", "instruction": instruction}], str(root / "m.jsonl")
    )
    out = str(tmp_path / "out")
    prep_pairs.run(small_config([manifest], out, "align.max_frames=81"))
    (sample,) = list(schema.webdataset_samples(ledger.shards_uri(out)))
    assert sample.meta.fps == 8.0 and sample.meta.num_frames == 21  # 3 s at 8 fps -> 24 -> 4k+1 = 21
    bucket = Bucket.parse(sample.meta.bucket)
    # The target's own first 21 frames, framed like the source's bucket.
    expected = video.resize_center_crop(tgt[:21], bucket.height, bucket.width)
    got = sample.decode_target()
    assert got.shape == expected.shape
    assert np.abs(got.astype(float) - expected.astype(float)).mean() < 12


def test_kill_and_rerun_loses_and_duplicates_nothing(ray_cluster, tmp_path):
    manifest = synthetic.write_edit_pairs(str(tmp_path / "in"), 12, seed=9, media="mixed", fps=12.0)
    reference = str(tmp_path / "reference")
    prep_pairs.run(small_config([manifest], reference, "input.rows_per_unit=1"))
    expected = {s.key: s.meta for s in schema.webdataset_samples(ledger.shards_uri(reference))}
    assert len(expected) == 9  # 3 of 12 fail the score filter

    out = str(tmp_path / "killed")
    args = [f"--set={a}" for a in [*SMALL, "input.rows_per_unit=1", "shards.max_samples=1"]]
    killed_at = kill_after_markers(["jobs.prep_pairs", "--manifest", manifest, "--output", out, *args], out)
    assert 2 <= killed_at < 12, f"the job was not killed mid-run (markers at kill: {killed_at})"

    summary = prep_pairs.run(small_config([manifest], out, "input.rows_per_unit=1", "shards.max_samples=1"))
    got = list(schema.webdataset_samples(ledger.shards_uri(out)))
    assert {s.key: s.meta for s in got} == expected
    assert len(got) == 9 and summary.inputs_seen == 12 and summary.rejected == 3
