"""Unit tests for sama.prep.ledger: completion markers, orphan shards, summary and rejects."""

from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys
import time

import pytest

from sama import schema, storage
from sama.prep import ledger
from sama.prep.ledger import Reject, Summary, UnitResult

UID_A = "a" * 32
UID_B = "b" * 32
UID_C = "c" * 32


def result_a(out: str = "/out") -> UnitResult:
    return UnitResult(
        unit_id=UID_A,
        sources=["/in/v0.mp4", "/in/v1.mp4", "/in/v2.mp4"],
        inputs=["/in/v0.mp4", "/in/v1.mp4", "/in/v2.mp4"],
        accepted=["/in/v0.mp4", "/in/v1.mp4"],
        rejects=[Reject("/in/v2.mp4", "truncated", "/in/v2.mp4: truncated: cut short")],
        samples=3,
        per_task={"speed": 2, "t2v": 1},
        per_bucket={"64x96": 2, "96x96": 1},
        shards=[
            {"path": f"shards/64x96/{UID_A}-000000.tar", "samples": 2, "bytes": 300},
            {"path": f"shards/96x96/{UID_A}-000000.tar", "samples": 1, "bytes": 200},
        ],
        bytes=500,
        seconds=1.5,
    )


def result_b() -> UnitResult:
    return UnitResult(
        unit_id=UID_B,
        sources=["/in/x.tar"],
        inputs=["/in/x.tar#k1.mp4", "/in/x.tar#k2.mp4", "/in/x.tar"],
        accepted=["/in/x.tar#k1.mp4"],
        rejects=[
            Reject("/in/x.tar#k2.mp4", "too_short", "0.04s"),
            Reject("/in/x.tar", "bad_tar", "/in/x.tar: unexpected end of data"),
        ],
        samples=4,
        per_task={"speed": 1, "tube_shuffle": 3},
        per_bucket={"64x96": 4},
        shards=[{"path": f"shards/64x96/{UID_B}-000000.tar", "samples": 4, "bytes": 1000}],
        bytes=1000,
        seconds=2.0,
        duplicates=2,
    )


def result_c() -> UnitResult:
    return UnitResult(
        unit_id=UID_C,
        sources=["/in/v3.mp4"],
        inputs=["/in/v3.mp4"],
        rejects=[Reject("/in/v3.mp4", "truncated", "again")],
    )


def make_shard(root, bucket: str, unit_id: str, index: int) -> str:
    path = os.path.join(str(root), "shards", bucket, f"{unit_id}-{index:06d}.tar")
    storage.write_bytes(path, b"\0" * 1024)
    return path


# --------------------------------------------------------------------------------------------
# UnitResult and markers


def test_unit_result_json_round_trip_with_rejects():
    original = result_b()
    text = original.to_json()
    raw = json.loads(text)
    assert list(raw) == sorted(raw)  # stable, sorted keys
    assert raw["rejects"][1] == {
        "input": "/in/x.tar",
        "reason": "bad_tar",
        "detail": raw["rejects"][1]["detail"],
    }
    back = UnitResult.from_json(text)
    assert back == original
    assert all(isinstance(r, Reject) for r in back.rejects)
    assert back.rejects[0].reason == "too_short" and back.duplicates == 2
    # An empty result (defaults) survives too.
    assert UnitResult.from_json(UnitResult(unit_id=UID_C).to_json()) == UnitResult(unit_id=UID_C)


def test_add_sample_counts_per_task_and_bucket():
    result = UnitResult(unit_id=UID_A)
    for task, bucket in [("speed", "64x96"), ("speed", "96x96"), ("t2v", "64x96")]:
        meta = schema.SampleMeta(
            key=schema.sample_key(task, bucket),
            task=task,
            media="video",
            instruction="x",
            fps=8.0,
            num_frames=9,
            height=64,
            width=96,
            bucket=bucket,
            source_uri="/in/v.mp4",
        )
        result.add_sample(schema.Sample(meta=meta, target=b"t"))
    assert result.samples == 3
    assert result.per_task == {"speed": 2, "t2v": 1}
    assert result.per_bucket == {"64x96": 2, "96x96": 1}


def test_write_and_read_markers(tmp_path):
    out = str(tmp_path / "out")
    assert ledger.read_markers(out) == []  # no markers folder yet
    for result in (result_c(), result_a(), result_b()):
        ledger.write_marker(out, result)
    assert ledger.marker_uri(out, UID_A) == os.path.join(out, "_markers", f"{UID_A}.json")
    assert sorted(os.listdir(os.path.join(out, "_markers"))) == [f"{u}.json" for u in (UID_A, UID_B, UID_C)]
    with open(ledger.marker_uri(out, UID_B)) as handle:
        assert UnitResult.from_json(handle.read()) == result_b()
    # In unit-id order, whatever order they were written in.
    assert ledger.read_markers(out) == [result_a(), result_b(), result_c()]
    # Rewriting a marker replaces it.
    changed = result_c()
    changed.samples = 7
    ledger.write_marker(out, changed)
    assert ledger.read_markers(out)[2].samples == 7


def test_shard_naming_helpers():
    assert ledger.shards_uri("/out") == "/out/shards"
    assert ledger.shards_uri("s3://b/run") == "s3://b/run/shards"


# --------------------------------------------------------------------------------------------
# Orphan shards and prepare_output


def test_remove_orphan_shards_deletes_only_shards_no_marker_lists(tmp_path):
    out = str(tmp_path)
    keep = [
        make_shard(out, "64x96", UID_A, 0),
        make_shard(out, "64x96", UID_A, 1),
        make_shard(out, "96x96", UID_A, 0),
    ]
    orphans = [
        make_shard(out, "64x96", UID_B, 0),  # a unit that never committed
        make_shard(out, "96x96", UID_B, 0),
        make_shard(out, "128x64", UID_C, 3),
        make_shard(out, "96x96", UID_A, 1),  # a committed unit's leftover from a failed attempt
    ]
    committed = UnitResult(
        unit_id=UID_A, shards=[{"path": ledger.shard_path(p), "samples": 1, "bytes": 1024} for p in keep]
    )
    not_a_shard = os.path.join(out, "shards", "64x96", "notes.json")
    storage.write_text(not_a_shard, "{}")
    removed = ledger.remove_orphan_shards(out, [committed])
    assert removed == sorted(orphans)
    assert all(os.path.exists(p) for p in keep)
    assert not any(os.path.exists(p) for p in orphans)
    assert os.path.exists(not_a_shard)
    # Nothing left to remove; a missing shards folder is fine too.
    assert ledger.remove_orphan_shards(out, iter([committed])) == []
    assert ledger.remove_orphan_shards(str(tmp_path / "fresh"), []) == []


def _populate(out: str) -> dict[str, list[str]]:
    ledger.write_marker(out, result_a(out))
    shards_a = [make_shard(out, "64x96", UID_A, 0), make_shard(out, "96x96", UID_A, 0)]
    shards_b = [make_shard(out, "64x96", UID_B, 0), make_shard(out, "64x96", UID_B, 1)]  # no marker
    ledger.write_summary(out, [result_a(out)], ledger.summarize([result_a(out)], [result_a(out)], 1.0))
    storage.write_text(os.path.join(out, ledger.CONFIG_FILE), "seed: 0\n")
    return {"a": shards_a, "b": shards_b}


def test_prepare_output_overwrite_wipes_everything_of_a_previous_run(tmp_path):
    out = str(tmp_path / "out")
    shards = _populate(out)
    assert os.path.exists(os.path.join(out, "summary.json"))
    assert os.path.exists(os.path.join(out, "rejects.jsonl"))
    assert ledger.prepare_output(out, overwrite=True) == []
    assert not os.path.exists(os.path.join(out, "shards"))
    assert not os.path.exists(os.path.join(out, "_markers"))
    assert not os.path.exists(os.path.join(out, "summary.json"))
    assert not os.path.exists(os.path.join(out, "rejects.jsonl"))
    assert not any(os.path.exists(p) for p in shards["a"] + shards["b"])
    assert ledger.read_markers(out) == []


def test_prepare_output_resume_keeps_completed_units_and_removes_orphans(tmp_path):
    out = str(tmp_path / "out")
    shards = _populate(out)
    done = ledger.prepare_output(out, overwrite=False)
    assert done == [result_a(out)]
    assert all(os.path.exists(p) for p in shards["a"])
    assert not any(os.path.exists(p) for p in shards["b"])
    assert schema.list_shards(ledger.shards_uri(out)) == sorted(shards["a"])
    assert os.path.exists(ledger.marker_uri(out, UID_A))


@pytest.mark.parametrize("overwrite", [True, False])
def test_prepare_output_on_a_fresh_output(tmp_path, overwrite):
    assert ledger.prepare_output(str(tmp_path / "new"), overwrite=overwrite) == []


# --------------------------------------------------------------------------------------------
# Summary


def test_summarize_aggregates_all_results_and_run_only_figures():
    results = [result_a(), result_b(), result_c()]
    summary = ledger.summarize(results, [result_b(), result_c()], wall_time_s=3.14159)
    assert summary == Summary(
        inputs_seen=3 + 3 + 1,
        accepted=2 + 1 + 0,
        rejected=1 + 2 + 1,
        rejected_per_reason={"bad_tar": 1, "too_short": 1, "truncated": 2},
        samples=7,
        samples_per_task={"speed": 3, "t2v": 1, "tube_shuffle": 3},
        samples_per_bucket={"64x96": 6, "96x96": 1},
        duplicates=2,
        units=3,
        shards=3,
        bytes=1500,
        run_units=2,
        run_units_skipped=1,
        run_samples=4,
        wall_time_s=3.142,
        samples_per_s=round(4 / 3.14159, 3),
    )
    # Sorted keys, so the summary file is stable.
    assert list(summary.rejected_per_reason) == ["bad_tar", "too_short", "truncated"]
    assert list(summary.samples_per_task) == ["speed", "t2v", "tube_shuffle"]


def test_summarize_edge_cases():
    empty = ledger.summarize([], [], 0.0)
    assert empty == Summary()
    resumed = ledger.summarize([result_a()], [], 0.0)  # everything was done already
    assert (resumed.units, resumed.run_units, resumed.run_units_skipped) == (1, 0, 1)
    assert (resumed.samples, resumed.run_samples, resumed.samples_per_s) == (3, 0, 0.0)


def test_write_summary_writes_rejects_lines_and_summary_json(tmp_path):
    out = str(tmp_path / "out")
    results = [result_c(), result_a(), result_b()]
    summary = ledger.summarize(results, results, 2.0)
    summary.extra = {"note": "x"}
    ledger.write_summary(out, results, summary)
    with open(os.path.join(out, "rejects.jsonl")) as handle:
        text = handle.read()
    assert text.endswith("\n")
    lines = [json.loads(line) for line in text.splitlines()]
    # One line per reject, units in unit-id order, rejects in their unit's order.
    assert lines == [
        dataclasses.asdict(r) for r in result_a().rejects + result_b().rejects + result_c().rejects
    ]
    assert [line["reason"] for line in lines] == ["truncated", "too_short", "bad_tar", "truncated"]
    with open(os.path.join(out, "summary.json")) as handle:
        written = json.load(handle)
    assert written == dataclasses.asdict(summary)
    assert written["rejected_per_reason"] == {"bad_tar": 1, "too_short": 1, "truncated": 2}
    assert written["extra"] == {"note": "x"} and written["samples_per_s"] == 3.5
    # A rerun without rejects leaves an empty rejects file (not the old lines).
    ledger.write_summary(out, [UnitResult(unit_id=UID_A)], Summary())
    with open(os.path.join(out, "rejects.jsonl")) as handle:
        assert handle.read() == ""


# --------------------------------------------------------------------------------------------
# One writer per output: the lease


def test_lease_refuses_a_second_run_naming_the_holder_and_releases(tmp_path):
    out = str(tmp_path / "out")
    first = ledger.OutputLease(out, ttl_s=60).acquire()
    try:
        held = first.read()
        assert held is not None and held.owner == first.owner and held.pid == os.getpid()
        with pytest.raises(ledger.OutputLeased, match=rf"owner {first.owner} on .*pid {os.getpid()}"):
            ledger.OutputLease(out, ttl_s=60).acquire()
    finally:
        first.release()
    assert first.read() is None
    with ledger.OutputLease(out, ttl_s=60) as second:
        assert second.read().owner == second.owner
    assert not os.path.exists(os.path.join(out, ledger.LEASE_FILE))


def test_an_expired_or_unreadable_lease_is_taken_over(tmp_path):
    out = str(tmp_path / "out")
    dead = ledger.OutputLease(out, ttl_s=60)
    # Never renewed: it expired a second ago.
    expired = dataclasses.replace(dead._record(), expires_at=time.time() - 1)
    storage.write_text(dead.uri, json.dumps(dataclasses.asdict(expired)))
    with ledger.OutputLease(out, ttl_s=60) as taker:
        assert taker.read().owner == taker.owner
    storage.write_text(dead.uri, "{half a lease")  # a run killed while writing it
    with ledger.OutputLease(out, ttl_s=60) as taker:
        assert taker.read().owner == taker.owner


def _wait_for(condition, timeout_s: float = 10.0) -> bool:
    """Poll ``condition`` until it holds or ``timeout_s`` passes; whether it held."""
    deadline = time.monotonic() + timeout_s
    while not condition():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.02)  # between polls only
    return True


def test_lease_is_renewed_while_held_and_loss_is_detected(tmp_path):
    out = str(tmp_path / "out")
    lease = ledger.OutputLease(out, ttl_s=0.6).acquire()
    try:
        first_expiry = lease.read().expires_at
        assert _wait_for(lambda: lease.read().expires_at > first_expiry)  # renewed every ttl/3
        lease.check()
        # Another run took the output over (this one stalled past its expiry).
        thief = ledger.LeaseRecord("thief", "elsewhere", 1, time.time(), time.time() + 60)
        storage.write_text(lease.uri, json.dumps(dataclasses.asdict(thief)))
        assert _wait_for(lambda: lease.lost)  # the next renewal sees the thief
        with pytest.raises(ledger.OutputLeased, match="lost"):
            lease.check()
    finally:
        lease.release()
    assert lease.read().owner == "thief"  # release never deletes another run's lease


def test_create_exclusive_creates_once(tmp_path):
    target = str(tmp_path / "d" / "x.json")
    assert storage.create_exclusive(target, b"first")
    assert not storage.create_exclusive(target, b"second")
    assert storage.read_bytes(target) == b"first"
    assert os.listdir(tmp_path / "d") == ["x.json"]  # no temporary file left behind


def test_the_lease_of_a_dead_process_on_this_host_is_taken_over_at_once(tmp_path):
    out = str(tmp_path / "out")
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    child.wait()  # a driver that was killed: its pid is gone
    lease = ledger.OutputLease(out, ttl_s=600)
    record = dataclasses.replace(lease._record(), owner="killed-driver", pid=child.pid)
    storage.write_text(lease.uri, json.dumps(dataclasses.asdict(record)))
    with lease:
        assert lease.read().owner == lease.owner
    # This process's own lease left behind by an interrupted run is stale too; a live one is not.
    stale = dataclasses.replace(lease._record(), owner="interrupted-run-of-this-process")
    storage.write_text(lease.uri, json.dumps(dataclasses.asdict(stale)))
    with ledger.OutputLease(out, ttl_s=600) as live:
        with pytest.raises(ledger.OutputLeased):
            ledger.OutputLease(out, ttl_s=600).acquire()
        assert live.read().owner == live.owner
