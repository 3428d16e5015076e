"""Training data: shards -> Ray Data (decode on CPU tasks) -> per-worker bucketed, mixed batches.

Each data source is a shard prefix written by ``sama prep-pretext`` or ``sama prep-pairs`` (e.g.
``.../shards/video`` or ``.../shards/image``). Every training worker streams its own part of every
source through Ray Data: the raw tar members are read with ``read_webdataset`` (nothing is
unpickled), block order is shuffled, and members are decoded in Ray Data CPU tasks, so decoding
runs on the cluster's CPUs (CPU nodes included) next to, not inside, the GPU workers.

Why per-worker datasets rather than ``get_dataset_shard``: Ray Train splits a dataset with
``streaming_split``, whose iterators meet at a barrier before every epoch. Batches are grouped by
shape (bucket, frame counts), so ranks finish an epoch after different numbers of steps; a rank
waiting at the epoch barrier while the others wait for it in a gradient all-reduce would deadlock.
Here each worker owns whole shards (``shards[rank::world]``; with fewer shards than workers, every
worker reads all shards and keeps the samples whose key hashes to its rank), and runs its epochs
independently, so no rank ever waits for another's data and every rank gets data.

Inside a worker, :class:`MixedBatchIterator` interleaves the sources by their weights and groups
rows into batches of one shape with the media's batch size (images and videos batch separately).
The source is drawn once per optimizer step, from (seed, step) alone: every micro-batch of a step
(gradient accumulation) comes from that source, and every rank draws the same one, so a global
step is all images or all videos, as the recipes' per-step batch sizes assume.

Logical data-parallel ranks. The data partition (``shards[rank::world]``), the data positions
and the noise keys are defined over ``L`` logical data-parallel ranks, fixed for the life of a
run: ``L`` is the number of data-parallel ranks the run started on, and a resume reads it from
the checkpoint. Each of the ``dp_size`` data-parallel ranks (workers / context-parallel size)
plays ``L / dp_size`` consecutive logical ranks per optimizer step: for each, its micro-batches
from that logical rank's own :class:`MixedBatchIterator`, with the noise keyed by the logical
rank, each loss scaled by ``1 / (grad_accum * L / dp_size)``, so the gradient averaged over the
data-parallel ranks is the mean over every logical rank's micro-batches, on any number of
workers that divides ``L`` (on others the trainer warns and starts fresh salted passes, below).

Resume semantics: exact replay. Every checkpoint saves each logical rank's data position: the
optimizer step and, per source, the pass it is reading (``passes``: passes started, the current one
being ``passes - 1``), the batches already drawn from that pass (``pass_batches``) and how many
times that pass lists the worker's shards (``repeats``, learned from the first pass: restored with
the pass, so the replay lists them as often as the interrupted pass did). On resume each source
restarts its interrupted pass with that pass's own seeds (block order and shuffle buffer), draws the
batches already drawn through the same code path (shape grouping included) and discards them, then
continues exactly as the uninterrupted run would: with the step's source draw, the noise and the
restored model, a resumed run reports the uninterrupted run's per-step losses, whether it resumes
on as many workers or on fewer (up to the order of the sums). The price is paid once per resume:
the skipped rows of the interrupted pass are read and decoded again (Ray Data decodes them ahead
as usual; at most one pass of each source). A pass leaves nothing behind for the next: at its end
every partial batch (rows of shapes too rare to fill one) is emitted, fullest first, so a pass
replayed from its start rebuilds the grouping state exactly.

A checkpoint written before exact replay (positions without ``pass_batches``: their ``passes``
counted passes a background thread had started, ahead of training; or rank 0's position alone)
resumes as those did: every source starts a new pass whose shuffle seeds are salted by the resume
step (``salt``), so the stream continues in a fresh order; samples of the interrupted pass may be
seen again, in another order.
"""

from __future__ import annotations

import functools
import json
import logging
import os
import queue
import threading
import time
import zlib
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any, Literal

import numpy as np

from sama import schema, storage

log = logging.getLogger(__name__)


@dataclass
class SourceConfig:
    """One stream of shards and its share of the training steps."""

    name: str = ""
    uri: str = ""
    media: Literal["video", "image"] = "video"
    weight: float = 1.0


@dataclass
class DataConfig:
    """Where training data comes from and how it is batched (per worker)."""

    sources: list[SourceConfig] = field(default_factory=list)
    # Held-out shards for the validation loss (read on rank 0).
    val_uri: str | None = None
    val_samples: int = 8
    # Per-worker batch sizes (SAMA code: 4 videos or 16 images per GPU).
    video_batch_size: int = 4
    image_batch_size: int = 16
    # Rows shuffled in each worker's local buffer.
    shuffle_buffer: int = 64
    seed: int = 0
    # CPUs per Ray Data decode task.
    decode_num_cpus: float = 1.0
    # Added to the niceness of the processes that decode (0: leave it). Decoding may run ahead of
    # training; on a node it shares with a training worker, it must take only the CPU time the
    # worker does not need, never slow its steps.
    decode_niceness: int = 10
    # A pass over a small source repeats its shards until it holds this many rows, so it does not
    # restart its pipeline every few steps. Ray Data decodes a pass ahead of training as far as its
    # object store budget allows, so rows a run never reaches are decoded all the same: keep it
    # near the rows a run reads from the source (a large source is unaffected).
    min_rows_per_pass: int = 256
    # Decoded rows queued ahead of training, per source (each holds whole clips: keep it small).
    prefetch_rows: int = 8

    def validate(self) -> None:
        if not self.sources:
            raise ValueError("data.sources: at least one source is needed")
        names = [s.name for s in self.sources]
        if len(set(names)) != len(names) or not all(names):
            raise ValueError(f"data.sources: names must be unique and non-empty, got {names}")
        for s in self.sources:
            if not s.uri:
                raise ValueError(f"data.sources.{s.name}: uri is empty")
            if s.weight <= 0:
                raise ValueError(f"data.sources.{s.name}: weight must be positive")
        if self.video_batch_size < 1 or self.image_batch_size < 1:
            raise ValueError("data.video_batch_size and data.image_batch_size must be >= 1")
        if self.min_rows_per_pass < 1 or self.prefetch_rows < 1:
            raise ValueError("data.min_rows_per_pass and data.prefetch_rows must be >= 1")
        if not 0 <= self.decode_niceness <= 19:
            raise ValueError(f"data.decode_niceness must be in 0..19, got {self.decode_niceness}")

    def batch_size(self, media: str) -> int:
        return self.image_batch_size if media == "image" else self.video_batch_size


_EMPTY = np.zeros((0, 0, 0, 3), dtype=np.uint8)


def decode_row(row: dict[str, Any]) -> dict[str, Any]:
    """A raw shard row (``json``, ``tgt.mp4``...) -> decoded frames and the fields training needs.

    Runs in Ray Data CPU tasks. A sample that fails to decode is kept as an ``error`` row rather
    than raised: an exception would drop the whole block, losing good samples with it.
    """
    try:
        sample = schema.Sample.from_members(row)
        target = sample.decode_target()
        source = sample.decode_source()
        meta = sample.meta
        return {
            "key": meta.key,
            "task": meta.task,
            "media": meta.media,
            "instruction": meta.instruction,
            "bucket": meta.bucket,
            "target": target,
            "source": _EMPTY if source is None else source,
            "error": "",
        }
    except Exception as exc:  # recorded and skipped by the batcher, with the reason in the log
        key = str(row.get("__key__", "?"))
        return {
            "key": key,
            "task": "",
            "media": "",
            "instruction": "",
            "bucket": "",
            "target": _EMPTY,
            "source": _EMPTY,
            "error": f"{row.get('__url__', '?')}:{key}: {type(exc).__name__}: {exc}",
        }


_niceness_raised = False


def lower_priority(increment: int) -> None:
    """Raise this process's niceness by ``increment``, once per process (a Ray worker process runs
    many decode tasks). Lowering one's own priority needs no privilege."""
    global _niceness_raised
    if increment and not _niceness_raised and hasattr(os, "nice"):
        os.nice(increment)
        _niceness_raised = True


def _decode_at_niceness(row: dict[str, Any], niceness: int) -> dict[str, Any]:
    """``decode_row`` at a lowered priority (see ``DataConfig.decode_niceness``)."""
    lower_priority(niceness)
    return decode_row(row)


def worker_shards(uri: str, rank: int, world_size: int) -> tuple[list[str], bool]:
    """The shards worker ``rank`` reads, and whether it must also filter samples by key."""
    shards = schema.list_shards(uri)
    if not shards:
        raise FileNotFoundError(f"no shards (*.tar) under {uri}")
    if len(shards) >= world_size:
        return shards[rank::world_size], False
    return shards, True


def _keep_for_rank(rank: int, world_size: int):
    def keep(row: dict) -> bool:
        # A stable hash of the key (any schema-valid key, not only uuid hex) spreads samples evenly.
        key = str(row["__key__"]).rsplit("/", 1)[-1]
        return zlib.crc32(key.encode()) % world_size == rank

    return keep


def read_shard_rows(shard_uris: list[str]):
    """Shards as a Ray Dataset of raw member rows (``__key__``, ``json``, ``tgt.mp4`` ...).

    Members are not decoded (``decoder=None``), so nothing is unpickled; a row becomes a
    :class:`sama.schema.Sample` with :meth:`~sama.schema.Sample.from_members`.
    """
    import ray.data

    if not shard_uris:
        raise schema.SchemaError("no shards to read")
    fs, _ = storage.pyarrow_filesystem(shard_uris[0])
    paths = [storage.parse(uri).path for uri in shard_uris]
    return ray.data.read_webdataset(paths, filesystem=fs, decoder=None)


def build_pass(
    source: SourceConfig,
    cfg: DataConfig,
    rank: int,
    world_size: int,
    pass_index: int,
    repeats: int,
    salt: int,
):
    """One pass over this worker's part of ``source``: its shards listed ``repeats`` times.

    Block order is shuffled over the whole pass, so the repeats interleave; one read over the
    repeated file list keeps the plan flat however many repeats a small source needs.
    """
    shards, filter_by_key = worker_shards(source.uri, rank, world_size)
    ds = read_shard_rows(shards * repeats)
    if filter_by_key:
        ds = ds.filter(_keep_for_rank(rank, world_size))
    ds = ds.randomize_block_order(seed=_seed(cfg.seed, rank, source.name, pass_index, salt))
    ds = ds.map(
        functools.partial(_decode_at_niceness, niceness=cfg.decode_niceness), num_cpus=cfg.decode_num_cpus
    )
    # Rows in plan order, not in whichever order parallel decode tasks finish: the same seed
    # then gives the same stream, so a run (and a test of what it learns) is reproducible.
    ds.context.execution_options.preserve_order = True
    return ds


def _seed(*parts) -> int:
    words = [
        p if isinstance(p, int) else int.from_bytes(str(p).encode()[:8].ljust(8, b"\0"), "little")
        for p in parts
    ]
    return int(np.random.SeedSequence([w % (2**63) for w in words]).generate_state(1)[0])


def shape_key(row: dict[str, Any]) -> tuple:
    """Rows batch together only when every tensor has the same shape."""
    return (row["media"], tuple(np.shape(row["target"])), tuple(np.shape(row["source"])))


@dataclass
class DataPosition:
    """Where one logical data-parallel rank's stream is; saved with checkpoints (see the module docstring
    for resume semantics). Updated only by the consumer (the training loop), never by the
    background threads that read ahead, so it describes exactly the batches training has drawn.

    ``step`` is the optimizer step the next batches are drawn for (a step's micro-batches all
    share it). Per source: ``passes`` started (the current pass is ``passes - 1``), ``batches``
    drawn over all passes, ``pass_batches`` drawn from the current pass, and the current pass's
    ``repeats``. ``salt`` is mixed into every shuffle seed: 0, or the step at which the stream last
    restarted with fresh passes (:meth:`restart_passes`)."""

    step: int = 0
    passes: dict[str, int] = field(default_factory=dict)
    batches: dict[str, int] = field(default_factory=dict)
    skipped: int = 0
    pass_batches: dict[str, int] = field(default_factory=dict)
    repeats: dict[str, int] = field(default_factory=dict)
    salt: int = 0

    def to_json(self) -> str:
        return json.dumps(self.__dict__, sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> DataPosition:
        data = json.loads(text)
        legacy = "pass_batches" not in data
        position = cls(**data)
        if legacy:
            # Written before exact replay: nothing says how far into its passes the run was.
            position.restart_passes(position.step)
        return position

    def restart_passes(self, step: int) -> None:
        """Abandon the current passes: every source starts a new one (pass ``passes``), with
        seeds salted by ``step`` and its repeats learned again (the semantics of positions from
        before exact replay)."""
        self.pass_batches = {}
        self.repeats = {}
        self.salt = step


class SourceStream:
    """Endless batches of one shape from one source, pass after pass, for one worker.

    A background thread runs the passes back to back into a small bounded queue, so the next pass's
    pipeline starts while the current one is still being trained on. A pass repeats the worker's
    part of the source until it holds at least ``DataConfig.min_rows_per_pass`` rows (learned from
    the first pass), so a small source does not restart its pipeline every few steps.

    Given a position with ``pass_batches`` for this source, the stream restarts that pass with its
    own seeds and repeats and skips the batches already drawn from it (exact replay; see the
    module docstring).
    """

    def __init__(
        self,
        source: SourceConfig,
        cfg: DataConfig,
        position: DataPosition,
        rank: int = 0,
        world_size: int = 1,
    ):
        self.source = source
        self.cfg = cfg
        self.position = position
        self.rank = rank
        self.world_size = world_size
        self.batch_size = cfg.batch_size(source.media)
        name = source.name
        # The producer's own: it learns repeats a pass ahead of what the position records.
        self.repeats = position.repeats.get(name, 1)
        self.salt = position.salt
        if name in position.pass_batches:  # exact replay of the interrupted pass
            self.first_pass = max(0, position.passes.get(name, 1) - 1)
            self.replay = position.pass_batches[name]
        else:  # a new pass (a fresh stream, or passes restarted)
            self.first_pass = position.passes.get(name, 0)
            self.replay = 0
        self._replaying = False
        self.pending: dict[tuple, list[dict]] = {}
        # Partial batches emitted at the end of a pass, fullest first.
        self._ready: list[list[dict]] = []
        self._queue: queue.Queue = queue.Queue(maxsize=max(1, cfg.prefetch_rows))
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    # -- producer (background thread) ---------------------------------------------------------

    def _put(self, item: tuple) -> bool:
        while not self._stop.is_set():
            try:
                self._queue.put(item, timeout=0.5)
                return True
            except queue.Full:
                continue
        return False

    def _pass_rows(self, index: int) -> Iterator[dict]:
        """The decoded rows of pass ``index`` (a Ray Data pipeline over the source's shards)."""
        ds = build_pass(self.source, self.cfg, self.rank, self.world_size, index, self.repeats, self.salt)
        return ds.iter_rows()

    def _produce(self) -> None:
        name = self.source.name
        index = self.first_pass
        try:
            while not self._stop.is_set():
                pass_rows = self._pass_rows(index)
                if not self._put(("start", (index, self.repeats))):
                    return
                seed = _seed(self.cfg.seed, self.rank, name, index, "buffer", self.salt)
                rows = usable = 0
                for row in _shuffled(pass_rows, self.cfg.shuffle_buffer, seed):
                    rows += 1
                    usable += not row["error"]
                    if not self._put(("row", row)):
                        return
                if usable == 0:
                    raise RuntimeError(
                        f"data source {name!r} ({self.source.uri}) gives worker {self.rank} no usable "
                        f"samples ({rows} rows, all undecodable)"
                        if rows
                        else f"data source {name!r} ({self.source.uri}) gives worker {self.rank} no samples"
                    )
                if rows < self.cfg.min_rows_per_pass:
                    per_epoch = max(1, rows // self.repeats)
                    self.repeats = max(1, -(-self.cfg.min_rows_per_pass // per_epoch))
                if not self._put(("end", index)):
                    return
                index += 1
        except BaseException as exc:  # handed to the consumer, which raises it in the training loop
            self._put(("error", exc))

    def _start(self) -> None:
        self._thread = threading.Thread(
            target=self._produce, name=f"sama-data-{self.source.name}", daemon=True
        )
        self._thread.start()

    def close(self) -> None:
        """Stop the background pass (the queue is drained so the producer can exit)."""
        self._stop.set()
        while True:
            try:
                self._queue.get_nowait()
            except queue.Empty:
                break

    # -- consumer -----------------------------------------------------------------------------

    def next_batch(self) -> list[dict]:
        if self._thread is None:
            self._start()
            self._skip_replayed()
        rows = self._next_rows()
        name = self.source.name
        self.position.batches[name] = self.position.batches.get(name, 0) + 1
        self.position.pass_batches[name] = self.position.pass_batches.get(name, 0) + 1
        return rows

    def _skip_replayed(self) -> None:
        """Draw and discard the batches the checkpointed run had drawn from the interrupted pass,
        through the same code path (so the partial batches held per shape are the same), leaving
        the position as it was saved. Costs reading and decoding the skipped rows, once."""
        if not self.replay:
            return
        started = time.perf_counter()
        self._replaying = True
        skipped = 0
        try:
            while skipped < self.replay and self._replaying:
                rows = self._next_rows()
                if not self._replaying:  # from the next pass (see _next_rows): not a skipped one
                    self._ready.insert(0, rows)
                    break
                skipped += 1
        finally:
            self._replaying = False
        log.info(
            "data source %r, worker %d: replayed pass %d up to where the checkpoint was (%d batch(es) "
            "skipped in %.1f s)",
            self.source.name,
            self.rank,
            self.first_pass,
            skipped,
            time.perf_counter() - started,
        )

    def _next_rows(self) -> list[dict]:
        """The rows of the next batch (the position's pass and skipped counts follow, except while
        replaying)."""
        name = self.source.name
        while True:
            if self._ready:
                return self._ready.pop(0)
            kind, item = self._queue.get()
            if kind == "error":
                raise item
            if kind == "start":
                index, repeats = item
                if self._replaying:
                    if index == self.first_pass:
                        continue
                    # The pass gave fewer batches than the checkpointed run drew from it: its data
                    # changed. Go on from here, recording the position anew.
                    log.warning(
                        "data source %r, worker %d: pass %d ended before the %d batch(es) the "
                        "checkpoint drew from it (did its shards change?); the stream goes on from "
                        "pass %d",
                        name,
                        self.rank,
                        self.first_pass,
                        self.replay,
                        index,
                    )
                    self._replaying = False
                self.position.passes[name] = index + 1
                self.position.pass_batches[name] = 0
                self.position.repeats[name] = repeats
                continue
            if kind == "end":
                # A pass leaves nothing behind: every partial batch (rows of rare shapes) is emitted
                # now, fullest first, so the next pass starts from empty groups.
                self._ready = sorted(self.pending.values(), key=len, reverse=True)
                self.pending = {}
                continue
            row = item
            if row["error"]:
                if not self._replaying:
                    self.position.skipped += 1
                    log.warning("skipping an undecodable sample: %s", row["error"])
                continue
            if row["media"] != self.source.media:
                raise ValueError(
                    f"data source {self.source.name!r} is declared {self.source.media} but "
                    f"{row['key']} is {row['media']} (point its uri at shards/{self.source.media})"
                )
            key = shape_key(row)
            group = self.pending.setdefault(key, [])
            group.append(row)
            if len(group) == self.batch_size:
                del self.pending[key]
                return group


class RowStream(SourceStream):
    """:class:`SourceStream` over decoded rows held in memory instead of shards.

    The same passes, shuffle buffer, shape grouping and data position, without Ray Data: for
    benchmarks and tests that train on synthetic samples made in the process. Each pass yields the
    rows in a fresh order (seeded by the pass). Rows are dicts like :func:`decode_row` returns.
    """

    def __init__(
        self,
        source: SourceConfig,
        rows: list[dict[str, Any]],
        cfg: DataConfig,
        position: DataPosition,
        rank: int = 0,
        world_size: int = 1,
    ):
        if not rows:
            raise ValueError(f"data source {source.name!r}: no rows")
        super().__init__(source, cfg, position, rank, world_size)
        self.rows = rows

    def _pass_rows(self, index: int) -> Iterator[dict]:
        order = np.random.default_rng(_seed(self.cfg.seed, self.rank, self.source.name, index)).permutation(
            len(self.rows)
        )
        return (self.rows[i] for i in order)


def _shuffled(rows: Iterator[dict], buffer_size: int, seed: int) -> Iterator[dict]:
    """A local shuffle buffer over rows (Ray's own shuffles batches, which would mix shapes)."""
    rng = np.random.default_rng(seed)
    buffer: list[dict] = []
    for row in rows:
        buffer.append(row)
        if len(buffer) >= max(1, buffer_size):
            yield buffer.pop(int(rng.integers(len(buffer))))
    while buffer:
        yield buffer.pop(int(rng.integers(len(buffer))))


def collate(rows: list[dict]) -> dict[str, Any]:
    """Rows of one shape -> a batch: uint8 tensors (B, T, H, W, 3) and lists of strings."""
    import torch

    source = None
    if rows[0]["source"].size:
        source = torch.from_numpy(np.stack([r["source"] for r in rows]))
    return {
        "target": torch.from_numpy(np.stack([r["target"] for r in rows])),
        "source": source,
        "instructions": [r["instruction"] for r in rows],
        "tasks": [r["task"] for r in rows],
        "keys": [r["key"] for r in rows],
        "media": rows[0]["media"],
    }


class MixedBatchIterator:
    """Batches from several sources, interleaved by weight.

    Each source streams its shards through Ray Data (:class:`SourceStream`), or, when ``rows``
    maps source names to decoded rows held in memory, from those (:class:`RowStream`).
    """

    def __init__(
        self,
        cfg: DataConfig,
        position: DataPosition | None = None,
        rank: int = 0,
        world_size: int = 1,
        rows: dict[str, list[dict[str, Any]]] | None = None,
    ):
        cfg.validate()
        self.cfg = cfg
        self.position = position or DataPosition()
        if rows is None:
            self.streams = [SourceStream(s, cfg, self.position, rank, world_size) for s in cfg.sources]
        else:
            missing = [s.name for s in cfg.sources if s.name not in rows]
            if missing:
                raise ValueError(f"no rows given for data source(s) {missing}")
            self.streams = [
                RowStream(s, rows[s.name], cfg, self.position, rank, world_size) for s in cfg.sources
            ]
        weights = np.array([s.weight for s in cfg.sources], dtype=np.float64)
        self.probs = weights / weights.sum()
        self.wait_s = 0.0

    def choose(self, step: int) -> int:
        """The source of optimizer step ``step``: a function of (seed, step) only, so every
        micro-batch of a step, every rank, and a resumed run draw the same source."""
        rng = np.random.default_rng([self.cfg.seed, step])
        return int(rng.choice(len(self.streams), p=self.probs))

    def close(self) -> None:
        for stream in self.streams:
            stream.close()

    def next(self, step: int | None = None) -> dict[str, Any]:
        """The next batch of optimizer step ``step`` (one call per micro-batch, all from the
        step's source); None: a step of its own, ``position.step``. Time spent waiting for data
        accumulates in ``wait_s``."""
        started = time.perf_counter()
        step = self.position.step if step is None else step
        stream = self.streams[self.choose(step)]
        batch = collate(stream.next_batch())
        batch["source_name"] = stream.source.name
        self.position.step = step + 1
        self.wait_s += time.perf_counter() - started
        return batch


def renderable(row: dict[str, Any]) -> bool:
    """Whether a sample can be shown as [source | edit | target]: it needs a source to edit
    (a text-to-video sample has none)."""
    return bool(row["source"].size)


def load_validation(cfg: DataConfig, render_samples: int = 0) -> tuple[list[dict], list[dict]]:
    """Decoded held-out samples: the first ``val_samples`` for the validation loss, and the first
    ``render_samples`` renderable ones for sample edits, read on past ``val_samples`` if need be
    (a small pretext set may open with only text-to-video clips). Broken samples are
    skipped like in training."""
    if not cfg.val_uri:
        return [], []
    rows: list[dict] = []
    render: list[dict] = []
    for uri in schema.list_shards(cfg.val_uri):
        for members in schema.iter_members(uri):
            if len(rows) >= cfg.val_samples and len(render) >= render_samples:
                return rows, render
            row = decode_row(members)
            if row["error"]:
                log.warning("skipping an undecodable validation sample: %s", row["error"])
                continue
            if len(rows) < cfg.val_samples:
                rows.append(row)
            if len(render) < render_samples and renderable(row):
                render.append(row)
    return rows, render
