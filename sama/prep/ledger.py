"""The output ledger of a data-prep job: completion markers, the summary and the rejects file.

A job splits its inputs into *units* (a batch of files, or one input tar). A unit writes its
shards under ``shards/<media>/<bucket>/<unit_id>-NNNNNN.tar`` and, last of all, its completion marker
``_markers/<unit_id>.json`` listing what it accepted, rejected and wrote. The marker is the commit
point: a rerun skips inputs covered by markers and deletes shards whose unit has no marker (left
by a killed run), so a killed-then-rerun job ends with exactly the samples of an uninterrupted run.

Markers name their shards by path relative to the output root (``shards/video/...``), so an output
copied, renamed or migrated (local -> S3, bucket -> bucket) reruns as a no-op with every shard kept.
Markers written before that held absolute URIs; they are read by their ``shards/...`` tail.

One run writes an output at a time: it holds ``_lease.json`` (:class:`OutputLease`) while it
deletes orphans, overwrites or commits, so a second run cannot delete shards a live run has not
yet covered with its marker. ``--overwrite`` removes markers before shards, so an interrupted
overwrite leaves orphans (removed and redone by the next run), never markers without shards.
"""

from __future__ import annotations

import json
import logging
import os
import socket
import threading
import time
import uuid
from collections import Counter
from collections.abc import Iterable
from dataclasses import asdict, dataclass, field
from typing import Any

from sama import schema, storage
from sama.redaction import redact_config, redact_text
from sama.schema import ShardConfig

log = logging.getLogger(__name__)

LEASE_FILE = "_lease.json"
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

    def __post_init__(self) -> None:
        # Rejects are written to markers and rejects.jsonl, read by whoever reads the output: the
        # input (a manifest row's URI) and the detail (an error message) never carry credentials.
        self.input = redact_text(self.input)
        self.detail = redact_text(self.detail)


@dataclass
class UnitFailure:
    """A unit that raised instead of completing (no marker: the next run retries it)."""

    unit_id: str
    error: str

    def __post_init__(self) -> None:
        # Written to summary.json: an error message may quote a URI with credentials.
        self.error = redact_text(self.error)


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
    # Parts of accepted inputs left out, with why (a clip of a video whose decode was corrupt,
    # while the video's other clips were clean): ``input`` is ``<video>@<start>s``.
    dropped: list[Reject] = field(default_factory=list)
    # Per-sample results a job reports beside its samples, committed with them (``sama eval``'s
    # metrics of each evaluated sample).
    records: list[dict[str, Any]] = field(default_factory=list)

    def to_json(self) -> str:
        """The completion marker's text; ``inputs`` and ``accepted`` (only counted when read back)
        redacted. ``sources`` stays as given: a rerun matches its units' sources against it."""
        raw = asdict(self)
        raw["inputs"] = [redact_text(v) for v in self.inputs]
        raw["accepted"] = [redact_text(v) for v in self.accepted]
        return json.dumps(raw, sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> UnitResult:
        raw = json.loads(text)
        raw["rejects"] = [Reject(**r) for r in raw.get("rejects", [])]
        raw["dropped"] = [Reject(**r) for r in raw.get("dropped", [])]
        shards = []
        for shard in raw.get("shards", []):
            shard = dict(shard)
            if "path" not in shard:  # a marker from before relative paths: an absolute "uri"
                shard["path"] = shard_path(shard.pop("uri"))
            shards.append(shard)
        raw["shards"] = shards
        return cls(**raw)

    def add_sample(self, sample: schema.Sample) -> None:
        self.samples += 1
        self.per_task[sample.meta.task] = self.per_task.get(sample.meta.task, 0) + 1
        self.per_bucket[sample.meta.bucket] = self.per_bucket.get(sample.meta.bucket, 0) + 1


def shard_path(uri: str) -> str:
    """A shard's path relative to its output root (``shards/<media>/<bucket>/<name>.tar``).

    Takes a shard URI under any output root, or a path already relative.
    """
    path = storage.parse(uri).path if "://" in uri or os.path.isabs(uri) else uri
    parts = path.replace(os.sep, "/").split("/")
    if SHARDS_DIR not in parts:
        raise ValueError(f"{uri}: not a shard of a job output (no {SHARDS_DIR}/ in its path)")
    # The last "shards" segment: an output root may itself sit under a directory of that name.
    start = len(parts) - 1 - parts[::-1].index(SHARDS_DIR)
    return "/".join(parts[start:])


def shard_uri(output_uri: str, shard: dict[str, Any]) -> str:
    """Where a marker's shard entry lives under ``output_uri``."""
    return storage.join(output_uri, shard["path"])


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
                path = shard_path(info.uri)
                result.shards.append({"path": path, "samples": info.samples, "bytes": info.bytes})
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
    listed = {shard["path"] for result in completed for shard in result.shards}
    removed = []
    for uri in schema.list_shards(shards_uri(output_uri)):
        if shard_path(uri) not in listed:
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
        # Markers first: an overwrite interrupted part-way leaves shards without markers, which
        # the next run removes as orphans and redoes, never markers whose shards are gone.
        storage.delete(storage.join(output_uri, MARKERS_DIR), recursive=True)
        for name in (SUMMARY_FILE, REJECTS_FILE):
            storage.delete(storage.join(output_uri, name))
        storage.delete(storage.join(output_uri, SHARDS_DIR), recursive=True)
        return []
    done = read_markers(output_uri)
    remove_orphan_shards(output_uri, done)
    return done


class OutputLeased(RuntimeError):
    """Another live run holds the output's lease."""


@dataclass
class LeaseRecord:
    """The content of ``_lease.json``: who writes this output, and until when (unix seconds)."""

    owner: str
    host: str
    pid: int
    acquired_at: float
    expires_at: float


# Owners of the leases this process holds now.
_LIVE_OWNERS: set[str] = set()


def _holder_is_dead(held: LeaseRecord) -> bool:
    """Whether the run holding an unexpired lease is known dead: it ran on this host and its
    process is gone (a killed driver rerun on the same machine), or it was this process and
    released nothing (interrupted). A holder on another host is alive until its lease expires."""
    if held.host != socket.gethostname():
        return False
    if held.pid == os.getpid():
        return held.owner not in _LIVE_OWNERS
    try:
        os.kill(held.pid, 0)
    except ProcessLookupError:
        return True
    except PermissionError:
        return False  # alive, another user's process
    return False


class OutputLease:
    """One writer per output: a run holds ``_lease.json`` under the output root while it works.

    ``acquire`` creates the lease file atomically (see :func:`sama.storage.create_exclusive`); a
    lease held by another run refuses with :class:`OutputLeased` naming the holder, unless it
    expired or its holder is known dead (same host, process gone), in which case it is taken
    over. A thread renews the lease every ``ttl_s / 3`` seconds; ``release`` stops it and deletes
    the lease if it is still this run's. ``lost`` turns true when a renewal found another owner
    (this run stalled past its expiry and was taken over): the run must then stop without
    committing more.
    """

    def __init__(self, output_uri: str, ttl_s: float = 300.0):
        if ttl_s <= 0:
            raise ValueError(f"lease ttl must be positive, got {ttl_s}")
        self.uri = storage.join(output_uri, LEASE_FILE)
        self.ttl_s = float(ttl_s)
        self.owner = uuid.uuid4().hex
        self.lost = False
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def _record(self) -> LeaseRecord:
        now = time.time()
        return LeaseRecord(self.owner, socket.gethostname(), os.getpid(), now, now + self.ttl_s)

    def read(self) -> LeaseRecord | None:
        """The lease now on storage, or None (also for an unreadable one, which is treated as
        expired: a run that died while writing it holds nothing)."""
        try:
            return LeaseRecord(**json.loads(storage.read_text(self.uri)))
        except storage.StorageError:
            return None
        except (ValueError, TypeError):
            return LeaseRecord("", "", 0, 0.0, 0.0)

    def acquire(self) -> OutputLease:
        data = json.dumps(asdict(self._record())).encode()
        for _ in range(3):
            if storage.create_exclusive(self.uri, data):
                break
            held = self.read()
            if held is not None and held.expires_at > time.time() and not _holder_is_dead(held):
                raise OutputLeased(
                    f"{self.uri}: the output is being written by another run (owner {held.owner} on "
                    f"{held.host}, pid {held.pid}, lease until "
                    f"{time.strftime('%Y-%m-%d %H:%M:%S UTC', time.gmtime(held.expires_at))}). Wait for "
                    f"it to finish, use another output, or, if that run is dead, wait for its lease "
                    f"to expire (or delete {self.uri})."
                )
            if held is not None:
                log.warning(
                    "taking over the lease of owner %s on %s (expired or dead)", held.owner, held.host
                )
            storage.delete(self.uri)
        else:
            raise OutputLeased(f"{self.uri}: could not take the lease (other runs keep taking it)")
        _LIVE_OWNERS.add(self.owner)
        self._thread = threading.Thread(target=self._renew_loop, name="sama-output-lease", daemon=True)
        self._thread.start()
        return self

    def _renew_loop(self) -> None:
        while not self._stop.wait(self.ttl_s / 3):
            try:
                held = self.read()
                if held is None or held.owner != self.owner:
                    self.lost = True
                    holder = held.owner if held else "nobody"
                    log.error("%s: lost the output's lease to %s", self.uri, holder)
                    return
                storage.write_text(self.uri, json.dumps(asdict(self._record())))
            except Exception as exc:  # a renewal that fails is retried at the next tick
                log.warning("%s: renewing the lease failed (%s)", self.uri, exc)

    def check(self) -> None:
        """Raise :class:`OutputLeased` when the lease was lost (see the class docstring)."""
        if self.lost:
            raise OutputLeased(f"{self.uri}: this run lost the output's lease; another run owns it now")

    def release(self) -> None:
        _LIVE_OWNERS.discard(self.owner)
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
            self._thread = None
        held = self.read()
        if held is not None and held.owner == self.owner:
            storage.delete(self.uri)

    def __enter__(self) -> OutputLease:
        return self.acquire()

    def __exit__(self, *exc_info) -> None:
        self.release()


@dataclass
class Summary:
    """The job's account of its whole output (all runs that contributed markers)."""

    inputs_seen: int = 0
    accepted: int = 0
    rejected: int = 0
    rejected_per_reason: dict[str, int] = field(default_factory=dict)
    # Clips of accepted inputs left out (UnitResult.dropped), per reason.
    dropped: int = 0
    dropped_per_reason: dict[str, int] = field(default_factory=dict)
    samples: int = 0
    samples_per_task: dict[str, int] = field(default_factory=dict)
    samples_per_bucket: dict[str, int] = field(default_factory=dict)
    duplicates: int = 0
    units: int = 0
    shards: int = 0
    bytes: int = 0
    # This run only: units that failed for a reason outside their inputs (storage, disk); their
    # inputs are neither accepted nor rejected yet, and the next run retries them.
    failed_units: int = 0
    failures: list[UnitFailure] = field(default_factory=list)
    # This run only: units processed, samples produced, wall time and throughput.
    run_units: int = 0
    run_units_skipped: int = 0
    run_samples: int = 0
    wall_time_s: float = 0.0
    samples_per_s: float = 0.0
    extra: dict[str, Any] = field(default_factory=dict)


def summarize(
    results: list[UnitResult],
    run_results: list[UnitResult],
    wall_time_s: float,
    failures: list[UnitFailure] | None = None,
) -> Summary:
    reasons: Counter = Counter()
    dropped: Counter = Counter()
    tasks: Counter = Counter()
    buckets: Counter = Counter()
    summary = Summary()
    for r in results:
        summary.inputs_seen += len(r.inputs)
        summary.accepted += len(r.accepted)
        summary.rejected += len(r.rejects)
        reasons.update(rej.reason for rej in r.rejects)
        dropped.update(d.reason for d in r.dropped)
        tasks.update(r.per_task)
        buckets.update(r.per_bucket)
        summary.samples += r.samples
        summary.shards += len(r.shards)
        summary.bytes += r.bytes
        summary.duplicates += r.duplicates
    summary.units = len(results)
    summary.rejected_per_reason = dict(sorted(reasons.items()))
    summary.dropped = sum(dropped.values())
    summary.dropped_per_reason = dict(sorted(dropped.items()))
    summary.samples_per_task = dict(sorted(tasks.items()))
    summary.samples_per_bucket = dict(sorted(buckets.items()))
    summary.failures = sorted(failures or [], key=lambda f: f.unit_id)
    summary.failed_units = len(summary.failures)
    summary.run_units = len(run_results)
    summary.run_units_skipped = len(results) - len(run_results)
    summary.run_samples = sum(r.samples for r in run_results)
    summary.wall_time_s = round(wall_time_s, 3)
    summary.samples_per_s = round(summary.run_samples / wall_time_s, 3) if wall_time_s > 0 else 0.0
    return summary


def write_summary(output_uri: str, results: list[UnitResult], summary: Summary) -> None:
    """Write ``rejects.jsonl`` (every rejected input, then every dropped clip, with its reason)
    and ``summary.json``, both through :func:`sama.redaction.redact_config`."""
    ordered = sorted(results, key=lambda r: r.unit_id)
    # Rejects redact themselves (Reject.__post_init__); these redact again for records made by
    # other code (markers of older versions read back) and for the summary's free-form ``extra``.
    lines = [json.dumps(redact_config(asdict(rej)), sort_keys=True) for r in ordered for rej in r.rejects]
    lines += [
        json.dumps(redact_config({**asdict(d), "dropped": True}), sort_keys=True)
        for r in ordered
        for d in r.dropped
    ]
    storage.write_text(storage.join(output_uri, REJECTS_FILE), "".join(line + "\n" for line in lines))
    summary_json = json.dumps(redact_config(asdict(summary)), indent=2)
    storage.write_text(storage.join(output_uri, SUMMARY_FILE), summary_json + "\n")


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
