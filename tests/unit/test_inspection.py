"""Unit tests for sama.inspection (`sama inspect`): counts, the example sample, and the job's
rejects when the prefix is a data-job output."""

from __future__ import annotations

import json
import os

import numpy as np

from sama import cli, inspection, schema, synthetic, video
from sama.prep import inputs, ledger
from sama.prep.inputs import InputConfig
from sama.prep.pretext_job import process_unit
from tests.unit.test_prep_pretext_job import small_cfg


def test_inspect_counts_samples_and_shows_the_jobs_rejects_and_dropped_clips(tmp_path, capsys):
    root = tmp_path / "in"
    root.mkdir()
    clean = video.encode_mp4(synthetic.render(synthetic.random_scene(3), 36, 12.0, 96, 128), 12.0, gop=12)
    (root / "clean.mp4").write_bytes(clean)
    (root / "late.mp4").write_bytes(synthetic.damage_stream(clean, 0, start=0.8, end=0.95, flips=4))
    (root / "empty.mp4").write_bytes(b"")
    out = str(tmp_path / "out")
    cfg = small_cfg(out, max_clips=2)
    cfg.clips.stride_s = 1.875
    (unit,), _ = inputs.list_units(InputConfig(uri=str(root)))
    result = process_unit(unit, cfg)
    ledger.write_summary(out, [result], ledger.summarize([result], [result], 1.0))

    report = inspection.inspect_shards(ledger.shards_uri(out), sample=0)
    assert report.samples == result.samples == 3  # 2 clips of clean.mp4, 1 of late.mp4
    assert report.rejected_per_reason == {"empty": 1}
    assert report.dropped_per_reason == {"corrupt_stream": 1}
    text = report.format()
    assert "dropped clips per reason" in text and "corrupt_stream" in text
    # Pointing at one media folder of the output finds the same summary.
    assert inspection.inspect_shards(f"{ledger.shards_uri(out)}/video", sample=None).dropped_per_reason

    assert cli.main(["inspect", ledger.shards_uri(out), "--json"]) == 0
    printed = json.loads(capsys.readouterr().out)
    assert printed["samples"] == 3 and printed["rejected_per_reason"] == {"empty": 1}
    # Shards outside a job output have no summary: nothing to show, no error.
    loose = tmp_path / "loose"
    loose.mkdir()
    first = schema.list_shards(ledger.shards_uri(out))[0]
    (loose / "one.tar").write_bytes(open(first, "rb").read())
    alone = inspection.inspect_shards(str(loose), sample=None)
    assert alone.samples >= 1 and alone.rejected_per_reason == {} and alone.dropped_per_reason == {}


def test_export_writes_the_derived_source_of_a_store_once_sample(tmp_path):
    root = tmp_path / "in"
    root.mkdir()
    clip = video.encode_mp4(synthetic.render(synthetic.random_scene(5), 24, 8.0, 64, 96), 8.0)
    (root / "clip.mp4").write_bytes(clip)
    (root / "clip.txt").write_text("a ball")  # a text-to-video sample needs a caption
    (unit,), _ = inputs.list_units(InputConfig(uri=str(root)))
    exported = {}
    for task in ("tube_shuffle", "t2v"):
        out = str(tmp_path / task)
        process_unit(unit, small_cfg(out, weights={task: 1.0}))
        (sample,) = schema.iter_samples(ledger.shards_uri(out))
        assert sample.source is None  # store-once: the shard holds the target only
        export = str(tmp_path / f"export-{task}")
        report = inspection.inspect_shards(ledger.shards_uri(out), sample=0, export_dir=export)
        exported[task] = sorted(os.path.basename(p) for p in report.exported)
        if task == "tube_shuffle":
            written = video.decode_video_bytes(open(f"{export}/{sample.key}.source.mp4", "rb").read())
            derived = sample.decode_source()
            assert written.shape == derived.shape == (9, 64, 96, 3)
            assert float(np.abs(written.astype(np.int16) - derived).mean()) < 3.0
            assert open(f"{export}/{sample.key}.target.mp4", "rb").read() == sample.target
        key = sample.key
        assert exported[task] == (
            [f"{key}.source.mp4", f"{key}.target.mp4"] if task != "t2v" else [f"{key}.target.mp4"]
        )


def test_inspect_counts_latent_shards_and_refuses_to_export_media_from_them(tmp_path):
    import pytest
    import torch

    meta = schema.SampleMeta(
        key="k0", task="video_edit", media="video", instruction="[Video edit] make it red", fps=8.0,
        num_frames=9, height=48, width=64, bucket="48x64", source_uri="mem:0",
    )  # fmt: skip
    latents = schema.SampleLatents(
        target=torch.ones(4, 3, 2, 2), text=torch.ones(3, 8), source=torch.zeros(4, 3, 2, 2)
    )
    sample = schema.LatentSample(meta=meta, latents=latents)
    with schema.ShardWriter(str(tmp_path / "shards" / "video"), "u") as writer:
        writer.write(sample)
    report = inspection.inspect_shards(str(tmp_path / "shards"), sample="k0")
    assert (report.samples, report.bytes, report.example.key) == (1, sample.nbytes(), "k0")
    assert report.per_task == {"video_edit": 1}
    with pytest.raises(ValueError, match="latent shards .* not media"):
        inspection.inspect_shards(str(tmp_path / "shards"), sample="k0", export_dir=str(tmp_path / "x"))
