"""The invariants every data-job output must hold, whatever happened to the runs that wrote it."""

from __future__ import annotations

import json

from sama import schema, storage
from sama.prep import ledger


def assert_ledger_invariants(output_uri: str) -> list[schema.Sample]:
    """Every input accounted for exactly once; every marker-listed shard exists and reads back
    with the samples the marker counts; no sample twice; no shard outside the markers; the
    summary's counts equal what the shards hold. Returns the samples."""
    results = ledger.read_markers(output_uri)
    inputs = [i for r in results for i in r.inputs]
    assert len(inputs) == len(set(inputs)), "an input is listed by two units"
    for r in results:
        decided = r.accepted + [rej.input for rej in r.rejects]
        assert sorted(decided) == sorted(r.inputs), f"unit {r.unit_id}: inputs not accounted for once"
    samples, listed = [], set()
    for r in results:
        for shard in r.shards:
            uri = ledger.shard_uri(output_uri, shard)
            got = list(schema.iter_samples([uri]))
            assert len(got) == shard["samples"], f"{uri}: {len(got)} samples, marker says {shard['samples']}"
            samples.extend(got)
            listed.add(shard["path"])
        assert sum(s["samples"] for s in r.shards) == r.samples
    on_storage = {ledger.shard_path(u) for u in schema.list_shards(ledger.shards_uri(output_uri))}
    assert on_storage == listed, f"shards no marker lists: {sorted(on_storage - listed)}"
    keys = [s.key for s in samples]
    assert len(keys) == len(set(keys)), "a sample was written twice"
    summary = json.loads(storage.read_text(storage.join(output_uri, ledger.SUMMARY_FILE)))
    assert summary["samples"] == len(samples) and summary["inputs_seen"] == len(inputs)
    assert summary["accepted"] + summary["rejected"] == summary["inputs_seen"]
    return samples
