"""Unit tests for sama.inspection (`sama inspect`): counts, the example sample, and the job's
rejects when the prefix is a data-job output."""

from __future__ import annotations

import json

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
