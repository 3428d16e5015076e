"""The output ledger of a data-prep job: completion markers, the summary and the rejects file.

A job splits its inputs into *units* (a batch of files, or one input tar). A unit writes its
shards under ``shards/<media>/<bucket>/<unit_id>-NNNNNN.tar`` and, last of all, its completion marker
``_markers/<unit_id>.json`` listing what it accepted, rejected and wrote. The marker is the commit
point: a rerun skips inputs covered by markers and deletes shards whose unit has no marker (left
by a killed run), so a killed-then-rerun job ends with exactly the samples of an uninterrupted run.
"""

from __future__ import annotations

import json
import logging
import time
from collections import Counter
from collections.abc import Iterable
from dataclasses import asdict, dataclass, field
from typing import Any

from sama import schema, storage
from sama.schema import ShardConfig

log = logging.getLogger(__name__)

MARKERS_DIR = "_markers"
SHARDS_DIR = "shards"
SUMMARY_FILE = "summary.json"
REJECTS_FILE = "rejects.jsonl"
CONFIG_FILE = "config.yaml"


@dataclass
class Reject:
    """An input the job could not use, and why (``reason`` is a short machine-readable kind)."""

    input: str
    reason: str
    detail: str = ""


@dataclass
class UnitResult:
    """What one unit did; serialised as its completion marker."""

    unit_id: str
    # What the unit was given (files, or one tar URI); ``inputs`` lists every video seen in them.
    sources: list[str] = field(default_factory=list)
    inputs: list[str] = field(default_factory=list)
    accepted: list[str] = field(default_factory=list)
    rejects: list[Reject] = field(default_factory=list)
    samples: int = 0
    per_task: dict[str, int] = field(default_factory=dict)
    per_bucket: dict[str, int] = field(default_factory=dict)
    shards: list[dict[str, Any]] = field(default_factory=list)
    bytes: int = 0
    seconds: float = 0.0
    # Inputs that had duplicates elsewhere and were written once (prep-pairs).
    duplicates: int = 0

    def to_json(self) -> str:
        return json.dumps(asdict(self), sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> UnitResult:
        raw = json.loads(text)
        raw["rejects"] = [Reject(**r) for r in raw.get("rejects", [])]
        return cls(**raw)

    def add_sample(self, sample: schema.Sample) -> None:
        self.samples += 1
        self.per_task[sample.meta.task] = self.per_task.get(sample.meta.task, 0) + 1
        self.per_bucket[sample.meta.bucket] = self.per_bucket.get(sample.meta.bucket, 0) + 1


def marker_uri(output_uri: str, unit_id: str) -> str:
    return storage.join(output_uri, MARKERS_DIR, f"{unit_id}.json")


def shards_uri(output_uri: str) -> str:
    return storage.join(output_uri, SHARDS_DIR)


class UnitWriter:
    """Shard writers of one unit, one per media and bucket: ``shards/<media>/<bucket>/<unit_id>-N.tar``.

    Images and videos go to separate shards so a trainer can batch them apart.
    """

    def __init__(self, output_uri: str, unit_id: str, shards: ShardConfig):
        self.root = shards_uri(output_uri)
        self.unit_id = unit_id
        self.shards = shards
        self.writers: dict[str, schema.ShardWriter] = {}

    def write(self, sample: schema.Sample) -> None:
        group = f"{sample.meta.media}/{sample.meta.bucket}"
        if group not in self.writers:
            stem = f"{group}/{self.unit_id}"
            self.writers[group] = schema.ShardWriter(self.root, stem, self.shards)
        self.writers[group].write(sample)

    def close(self, result: UnitResult) -> None:
        for group in sorted(self.writers):
            for info in self.writers[group].close():
                result.shards.append({"uri": info.uri, "samples": info.samples, "bytes": info.bytes})
                result.bytes += info.bytes

    def abort(self) -> None:
        for writer in self.writers.values():
            writer.abort()


def write_marker(output_uri: str, result: UnitResult) -> None:
    storage.write_text(marker_uri(output_uri, result.unit_id), result.to_json())


def read_markers(output_uri: str) -> list[UnitResult]:
    """Every completed unit's result, in unit-id order."""
    uris = storage.list_files(storage.join(output_uri, MARKERS_DIR), suffixes=(".json",))
    return [UnitResult.from_json(storage.read_text(u)) for u in uris]


def remove_orphan_shards(output_uri: str, completed: Iterable[UnitResult]) -> list[str]:
    """Delete every shard no completion marker lists; returns what was deleted.

    That covers shards of units that never committed (a killed run) and leftovers of a failed
    attempt of a unit that a retry then committed with fewer shards.
    """
    listed = {storage.parse(shard["uri"]).path for result in completed for shard in result.shards}
    removed = []
    for uri in schema.list_shards(shards_uri(output_uri)):
        if storage.parse(uri).path not in listed:
            storage.delete(uri)
            removed.append(uri)
    if removed:
        log.info(
            "removed %d shard(s) that no completed unit lists (unfinished or retried work)", len(removed)
        )
    return removed


def prepare_output(output_uri: str, overwrite: bool) -> list[UnitResult]:
    """Start or resume a job's output: wipe it with ``overwrite``, else keep completed units.

    Returns the completed units' results (empty for a fresh start).
    """
    if overwrite:
        for name in (SHARDS_DIR, MARKERS_DIR):
            storage.delete(storage.join(output_uri, name), recursive=True)
        for name in (SUMMARY_FILE, REJECTS_FILE):
            storage.delete(storage.join(output_uri, name))
        return []
    done = read_markers(output_uri)
    remove_orphan_shards(output_uri, done)
    return done


@dataclass
class Summary:
    """The job's account of its whole output (all runs that contributed markers)."""

    inputs_seen: int = 0
    accepted: int = 0
    rejected: int = 0
    rejected_per_reason: dict[str, int] = field(default_factory=dict)
    samples: int = 0
    samples_per_task: dict[str, int] = field(default_factory=dict)
    samples_per_bucket: dict[str, int] = field(default_factory=dict)
    duplicates: int = 0
    units: int = 0
    shards: int = 0
    bytes: int = 0
    # This run only: units processed, samples produced, wall time and throughput.
    run_units: int = 0
    run_units_skipped: int = 0
    run_samples: int = 0
    wall_time_s: float = 0.0
    samples_per_s: float = 0.0
    extra: dict[str, Any] = field(default_factory=dict)


def summarize(results: list[UnitResult], run_results: list[UnitResult], wall_time_s: float) -> Summary:
    reasons: Counter = Counter()
    tasks: Counter = Counter()
    buckets: Counter = Counter()
    summary = Summary()
    for r in results:
        summary.inputs_seen += len(r.inputs)
        summary.accepted += len(r.accepted)
        summary.rejected += len(r.rejects)
        reasons.update(rej.reason for rej in r.rejects)
        tasks.update(r.per_task)
        buckets.update(r.per_bucket)
        summary.samples += r.samples
        summary.shards += len(r.shards)
        summary.bytes += r.bytes
        summary.duplicates += r.duplicates
    summary.units = len(results)
    summary.rejected_per_reason = dict(sorted(reasons.items()))
    summary.samples_per_task = dict(sorted(tasks.items()))
    summary.samples_per_bucket = dict(sorted(buckets.items()))
    summary.run_units = len(run_results)
    summary.run_units_skipped = len(results) - len(run_results)
    summary.run_samples = sum(r.samples for r in run_results)
    summary.wall_time_s = round(wall_time_s, 3)
    summary.samples_per_s = round(summary.run_samples / wall_time_s, 3) if wall_time_s > 0 else 0.0
    return summary


def write_summary(output_uri: str, results: list[UnitResult], summary: Summary) -> None:
    """Write ``rejects.jsonl`` (every rejected input with its reason) and ``summary.json``."""
    lines = [
        json.dumps(asdict(rej), sort_keys=True)
        for r in sorted(results, key=lambda r: r.unit_id)
        for rej in r.rejects
    ]
    storage.write_text(storage.join(output_uri, REJECTS_FILE), "".join(line + "\n" for line in lines))
    storage.write_text(storage.join(output_uri, SUMMARY_FILE), json.dumps(asdict(summary), indent=2) + "\n")


class Progress:
    """A periodic log line with throughput, for long jobs (Ray Data draws its own bars)."""

    def __init__(self, what: str, total_units: int, interval_s: float = 10.0):
        self.what = what
        self.total_units = total_units
        self.interval_s = interval_s
        self.start = self.last = time.monotonic()
        self.units = 0
        self.samples = 0
        self.inputs = 0

    def update(self, result: UnitResult) -> None:
        self.units += 1
        self.samples += result.samples
        self.inputs += len(result.inputs)
        now = time.monotonic()
        if now - self.last >= self.interval_s or self.units == self.total_units:
            self.last = now
            elapsed = max(now - self.start, 1e-9)
            log.info(
                "%d/%d units, %d inputs, %d %s, %.2f %s/s",
                self.units,
                self.total_units,
                self.inputs,
                self.samples,
                self.what,
                self.samples / elapsed,
                self.what,
            )
