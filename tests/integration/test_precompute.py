"""End-to-end tests of `sama precompute` on the shared local Ray cluster: prep-pretext's pixel
shards -> latent shards, on local paths and loopback S3, and a killed run's rerun."""

from __future__ import annotations

import json

import pytest

from pipelines import precompute, prep_pretext
from sama import config, schema, storage, synthetic
from sama.prep import ledger
from sama.prep.precompute_job import PrecomputeConfig
from sama.prep.pretext_job import PrepPretextConfig
from sama.quickstart import PREP_SETTINGS
from tests.integration.killing import kill_after_markers
from tests.integration.ledger_invariants import assert_ledger_invariants

pytestmark = pytest.mark.integration

SETTINGS = ["batch_size=2", "shards.max_samples=3", "ray.progress_interval_s=1000"]


def prep(raw: str, out: str, *extra: str) -> list[schema.Sample]:
    cfg = config.load(
        PrepPretextConfig, None, [*PREP_SETTINGS, f"input.uri={raw}", f"output.uri={out}", *extra]
    )
    prep_pretext.run(cfg)
    return list(schema.iter_samples(ledger.shards_uri(out)))


def precompute_cfg(inputs: list[str], out: str, *extra: str) -> PrecomputeConfig:
    overrides = [f"inputs={json.dumps(inputs)}", f"output.uri={out}", "model.preset=tiny", *SETTINGS, *extra]
    return config.load(PrecomputeConfig, None, overrides)


def check_latents(out: str, pixels: list[schema.Sample]) -> list[schema.LatentSample]:
    latents = assert_ledger_invariants(out)
    assert all(isinstance(s, schema.LatentSample) for s in latents)
    assert sorted(s.key for s in latents) == sorted(s.key for s in pixels)
    by_key = {s.key: s.meta for s in pixels}
    assert all(s.meta == by_key[s.key] for s in latents)
    info = schema.read_latent_info(out)
    assert info is not None and info.model == "tiny" and info.dtype == "float32"
    assert list(schema.read_null_embeddings(out)) == info.null_prompts
    return latents


def shard_bytes(out: str) -> dict[str, bytes]:
    return {ledger.shard_path(u): storage.read_bytes(u) for u in schema.list_shards(ledger.shards_uri(out))}


def test_precompute_local_and_s3(ray_cluster, tmp_path, s3_bucket):
    raw = str(tmp_path / "raw")
    synthetic.write_raw_videos(raw, 4, seed=7, fps=8.0, seconds=2.5)
    pixel_root = str(tmp_path / "pixels")
    pixels = prep(raw, pixel_root)
    assert len(pixels) == 8

    out = str(tmp_path / "latents")
    summary = precompute.run(precompute_cfg([pixel_root], out))
    assert summary.samples == summary.accepted == 8 and summary.rejected == 0 and summary.failed_units == 0
    check_latents(out, pixels)
    assert storage.exists(storage.join(out, "config.yaml"))

    # A rerun skips every unit and changes nothing.
    before = shard_bytes(out)
    again = precompute.run(precompute_cfg([pixel_root], out))
    assert again.run_units == 0 and again.run_units_skipped == summary.units
    assert shard_bytes(out) == before

    # Other encoders into the same output: refused before anything is written.
    with pytest.raises(config.ConfigError, match="other encoders"):
        precompute.run(precompute_cfg([pixel_root], out, "dtype=bfloat16"))
    assert shard_bytes(out) == before

    # The same pixels on object storage, given as their shards/video folder.
    remote = f"{s3_bucket}/pixels"
    storage.upload_dir(pixel_root, remote)
    remote_out = f"{s3_bucket}/latents"
    remote_summary = precompute.run(precompute_cfg([storage.join(remote, "shards", "video")], remote_out))
    assert remote_summary.samples == 8
    remote_latents = check_latents(remote_out, pixels)
    local = {s.key: s.latents for s in schema.iter_samples(ledger.shards_uri(out))}
    for sample in remote_latents:
        assert schema.SampleLatents.to_bytes(sample.latents) == local[sample.key].to_bytes()


def test_kill_and_rerun_gives_exactly_the_uninterrupted_output(ray_cluster, tmp_path):
    raw = str(tmp_path / "raw")
    synthetic.write_raw_videos(raw, 6, seed=13, fps=8.0, seconds=2.5)
    pixel_root = str(tmp_path / "pixels")
    pixels = prep(raw, pixel_root, "shards.max_samples=1")  # one pixel shard, one unit, per clip
    assert len(pixels) == 12

    reference = str(tmp_path / "reference")
    precompute.run(precompute_cfg([pixel_root], reference))
    expected = shard_bytes(reference)

    out = str(tmp_path / "killed")
    args = ["jobs.precompute", "--input", pixel_root, "--output", out, "--model", "tiny"]
    args += [f"--set={a}" for a in SETTINGS]
    killed_at = kill_after_markers(args, out, timeout_s=150)
    assert 1 <= killed_at < 12, f"the job was not killed mid-run (markers at kill: {killed_at})"

    summary = precompute.run(precompute_cfg([pixel_root], out))
    assert summary.run_units_skipped >= killed_at and summary.units == 12
    check_latents(out, pixels)
    got = shard_bytes(out)
    # Unit ids come from the input shards, so the shard names match; and the bytes.
    assert sorted(got) == sorted(expected)
    assert all(got[name] == expected[name] for name in expected)
