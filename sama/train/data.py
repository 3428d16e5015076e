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

Latent shards (``sama precompute``) have nothing to decode: a worker reads its part of a latent
source itself, in its stream's background thread (same partition, a seeded shard order, the same
shuffle buffer), instead of moving megabyte rows through Ray Data's object store.

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
from collections.abc import Iterator, Mapping
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


# "No source" and "no frames" inside a Ray row (Ray Data cannot carry None columns well). Ray rows
# exist only between decode_row and the stream: from TrainingRow.from_ray on, "no source" is None.
_EMPTY = np.zeros((0, 0, 0, 3), dtype=np.uint8)


@dataclass
class TrainingRow:
    """One decoded sample as training consumes it.

    A *pixel* row holds frames: ``target`` ``(T, H, W, 3)`` uint8 and ``source`` (None: no source,
    a text-to-video sample). A *latent* row (from ``sama precompute`` shards) holds ``latents``
    (:class:`sama.schema.SampleLatents`) instead, and ``target``/``source`` are None.
    ``num_frames`` is the target's frame count (the frames anchors are drawn from). A sample that
    could not be decoded has ``error`` set and no tensors.
    """

    key: str
    task: str = ""
    media: str = ""
    instruction: str = ""
    bucket: str = ""
    target: np.ndarray | None = None
    source: np.ndarray | None = None
    latents: schema.SampleLatents | None = None
    num_frames: int = 0
    error: str = ""

    def __post_init__(self) -> None:
        if not self.num_frames and self.target is not None:
            self.num_frames = int(self.target.shape[0])

    @classmethod
    def of(cls, meta: schema.SampleMeta, **tensors: Any) -> TrainingRow:
        """The record of the sample ``meta`` describes, holding ``tensors`` (frames or latents)."""
        return cls(
            key=meta.key,
            task=meta.task,
            media=meta.media,
            instruction=meta.instruction,
            bucket=meta.bucket,
            num_frames=int(meta.num_frames),
            **tensors,
        )

    @property
    def is_latent(self) -> bool:
        return self.latents is not None

    @property
    def has_source(self) -> bool:
        """Whether the sample has a source (frames or latents)."""
        if self.latents is not None:
            return self.latents.source is not None
        return self.source is not None

    def to_ray(self) -> dict[str, Any]:
        """The plain dict Ray Data carries: numpy arrays, strings and bytes only (the latents as
        their safetensors bytes; ``_EMPTY`` for absent frames)."""
        return {
            "key": self.key,
            "task": self.task,
            "media": self.media,
            "instruction": self.instruction,
            "bucket": self.bucket,
            "num_frames": int(self.num_frames),
            "target": _EMPTY if self.target is None else self.target,
            "source": _EMPTY if self.source is None else self.source,
            "latents": b"" if self.latents is None else self.latents.to_bytes(),
            "error": self.error,
        }

    @classmethod
    def from_ray(cls, row: Mapping[str, Any]) -> TrainingRow:
        """The record of a Ray row made by :func:`decode_row` (or :meth:`to_ray`)."""
        error = str(row.get("error") or "")
        key = str(row["key"])
        packed = row.get("latents")
        latents = None
        if not error and packed is not None and len(packed):
            latents = schema.SampleLatents.from_bytes(bytes(packed), where=key)
        target = source = None
        if not error and latents is None:
            target = np.asarray(row["target"])
            source_frames = np.asarray(row["source"])
            source = source_frames if source_frames.size else None
        return cls(
            key=key,
            task=str(row.get("task") or ""),
            media=str(row.get("media") or ""),
            instruction=str(row.get("instruction") or ""),
            bucket=str(row.get("bucket") or ""),
            target=target,
            source=source,
            latents=latents,
            num_frames=int(row.get("num_frames") or 0),
            error=error,
        )


def _as_record(row: TrainingRow | Mapping[str, Any]) -> TrainingRow:
    return row if isinstance(row, TrainingRow) else TrainingRow.from_ray(row)


def decode_row(row: dict[str, Any]) -> dict[str, Any]:
    """A raw shard row (``json``, ``tgt.mp4``... or ``json``, ``lat.safetensors``) -> the Ray row
    of its :class:`TrainingRow` (see :meth:`TrainingRow.to_ray`).

    Runs in Ray Data CPU tasks. Media are decoded to frames; a latent sample's safetensors member
    is checked and carried as its bytes (nothing is unpickled; the consumer rebuilds the tensors).
    A sample that fails to decode is kept as an ``error`` row rather than raised: an exception
    would drop the whole block, losing good samples with it.
    """
    try:
        sample = schema.read_sample(row)
        meta = sample.meta
        out = TrainingRow.of(meta).to_ray()
        if isinstance(sample, schema.LatentSample):
            # The member's own bytes, already checked by LatentSample.from_members.
            out["latents"] = bytes(row[schema.LATENTS])
            return out
        decode_pair = getattr(sample, "decode_pair", None)
        if decode_pair is not None:
            target, source = decode_pair()
        else:
            target, source = sample.decode_target(), sample.decode_source()
        out["target"] = target
        out["source"] = _EMPTY if source is None else source
        out["num_frames"] = int(target.shape[0])
        return out
    except Exception as exc:  # recorded and skipped by the batcher, with the reason in the log
        key = str(row.get("__key__", "?"))
        return TrainingRow(
            key=key, error=f"{row.get('__url__', '?')}:{key}: {type(exc).__name__}: {exc}"
        ).to_ray()


def latent_record(row: Mapping[str, Any]) -> TrainingRow:
    """A raw latent-shard row (``json``, ``lat.safetensors``) -> its :class:`TrainingRow`; a sample
    that cannot be read becomes an error row (skipped with its reason), never an exception."""
    try:
        sample = schema.LatentSample.from_members(row)
        return TrainingRow.of(sample.meta, latents=sample.latents)
    except Exception as exc:
        key = str(row.get("__key__", "?"))
        return TrainingRow(key=key, error=f"{row.get('__url__', '?')}:{key}: {type(exc).__name__}: {exc}")


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
    repeated file list keeps the plan flat however many repeats a small source needs. Media are
    decoded in Ray Data tasks (latent shards are read without Ray Data: ``SourceStream``).
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


def _shape(value: Any) -> tuple | None:
    return None if value is None else tuple(value.shape)


def shape_key(row: TrainingRow) -> tuple:
    """Rows batch together only when every tensor has the same shape (frames and latents apart;
    latent text embeddings are padded to one length by :func:`collate`, so theirs does not count)."""
    if row.latents is not None:
        latents = row.latents
        return (
            "latents",
            row.media,
            row.num_frames,
            _shape(latents.target),
            _shape(latents.source),
            _shape(latents.semantic),
        )
    return ("frames", row.media, _shape(row.target), _shape(row.source))


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
        self.pending: dict[tuple, list[TrainingRow]] = {}
        # Partial batches emitted at the end of a pass, fullest first.
        self._ready: list[list[TrainingRow]] = []
        # Whether the source holds latent shards (read from its latents.json on the first pass).
        self._latent: bool | None = None
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

    def _pass_rows(self, index: int) -> Iterator[TrainingRow]:
        """The decoded rows of pass ``index`` (a Ray Data pipeline over the source's shards), each
        turned into its :class:`TrainingRow` as it leaves Ray. Latent shards have nothing to
        decode: their raw rows leave Ray as read and are parsed here (:func:`latent_record`)."""
        if self._latent is None:
            self._latent = schema.read_latent_info(self.source.uri) is not None
        if self._latent:
            return self._latent_pass_rows(index)
        ds = build_pass(self.source, self.cfg, self.rank, self.world_size, index, self.repeats, self.salt)
        return (TrainingRow.from_ray(row) for row in ds.iter_rows())

    def _latent_pass_rows(self, index: int) -> Iterator[TrainingRow]:
        """Pass ``index`` over latent shards, read here, in the producer thread: the worker's shards
        (listed ``repeats`` times) in an order seeded like Ray Data's block order, each sample
        parsed by :func:`latent_record`. Latent rows need no decoding, and moving megabyte rows
        through Ray Data's object store cost more than the reading (the quickstart's stages ran
        20% slower that way)."""
        shards, filter_by_key = worker_shards(self.source.uri, self.rank, self.world_size)
        listed = shards * self.repeats
        rng = np.random.default_rng(
            _seed(self.cfg.seed, self.rank, self.source.name, index, self.salt, "latent")
        )
        keep = _keep_for_rank(self.rank, self.world_size) if filter_by_key else None
        for position in rng.permutation(len(listed)):
            for members in schema.iter_members(listed[int(position)]):
                if keep is None or keep(members):
                    yield latent_record(members)

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
                    usable += not row.error
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

    def next_batch(self) -> list[TrainingRow]:
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

    def _next_rows(self) -> list[TrainingRow]:
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
            if row.error:
                if not self._replaying:
                    self.position.skipped += 1
                    log.warning("skipping an undecodable sample: %s", row.error)
                continue
            if row.media != self.source.media:
                raise ValueError(
                    f"data source {self.source.name!r} is declared {self.source.media} but "
                    f"{row.key} is {row.media} (point its uri at shards/{self.source.media})"
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
    rows in a fresh order (seeded by the pass). Rows are :class:`TrainingRow` records (Ray rows as
    :func:`decode_row` returns them are converted once, here).
    """

    def __init__(
        self,
        source: SourceConfig,
        rows: list[TrainingRow] | list[dict[str, Any]],
        cfg: DataConfig,
        position: DataPosition,
        rank: int = 0,
        world_size: int = 1,
    ):
        if not rows:
            raise ValueError(f"data source {source.name!r}: no rows")
        super().__init__(source, cfg, position, rank, world_size)
        self.rows = [_as_record(row) for row in rows]

    def _pass_rows(self, index: int) -> Iterator[TrainingRow]:
        order = np.random.default_rng(_seed(self.cfg.seed, self.rank, self.source.name, index)).permutation(
            len(self.rows)
        )
        return (self.rows[i] for i in order)


def _shuffled(rows: Iterator[TrainingRow], buffer_size: int, seed: int) -> Iterator[TrainingRow]:
    """A local shuffle buffer over rows (Ray's own shuffles batches, which would mix shapes)."""
    rng = np.random.default_rng(seed)
    buffer: list[TrainingRow] = []
    for row in rows:
        buffer.append(row)
        if len(buffer) >= max(1, buffer_size):
            yield buffer.pop(int(rng.integers(len(buffer))))
    while buffer:
        yield buffer.pop(int(rng.integers(len(buffer))))


def collate(rows: list[TrainingRow], text_length: int | None = None):
    """Rows of one shape -> the :class:`sama.models.training.SamaBatch` the training module takes.

    Pixel rows give uint8 frames ``(B, T, H, W, 3)`` (``source`` None when the rows have none).
    Latent rows give ``target_latents``/``source_latents`` ``(B, C, T', H', W')``, the text
    embeddings zero-padded back to ``text_length`` (the text encoder's ``max_length``: the encoder's
    output is zero past the last token, so this restores it exactly) and the semantic candidates
    with their frame indices, from which the module draws the anchors.
    """
    import torch

    from sama.models.training import SamaBatch

    if not rows:
        raise ValueError("collate needs at least one row")
    latent = rows[0].is_latent
    if any(row.is_latent != latent for row in rows):
        raise ValueError("collate: a batch mixes latent and pixel rows")
    common = {
        "prompts": [row.instruction for row in rows],
        "keys": [row.key for row in rows],
        "tasks": [row.task for row in rows],
        "media": rows[0].media,
    }
    has_source = rows[0].has_source
    if any(row.has_source != has_source for row in rows):
        raise ValueError("collate: a batch mixes rows with and without a source")
    if not latent:
        return SamaBatch(
            target=torch.from_numpy(np.stack([row.target for row in rows])),
            source=torch.from_numpy(np.stack([row.source for row in rows])) if has_source else None,
            **common,
        )
    stored = [row.latents for row in rows]
    if text_length is None:
        raise ValueError(
            "collate: latent rows need text_length (the text encoder's max_length) to pad their text "
            "embeddings to"
        )
    width = stored[0].text.shape[-1]
    text = torch.zeros((len(rows), text_length, width), dtype=stored[0].text.dtype)
    for index, (row, latents) in enumerate(zip(rows, stored, strict=True)):
        length = latents.text.shape[0]
        if length > text_length or latents.text.shape[-1] != width:
            raise ValueError(
                f"{row.key}: stored text embedding {tuple(latents.text.shape)} does not fit "
                f"({text_length}, {width}) (the text encoder's max_length and width)"
            )
        text[index, :length] = latents.text
    semantic = anchors = None
    if stored[0].semantic is not None:
        if any(latents.semantic is None for latents in stored):
            raise ValueError("collate: a batch mixes rows with and without semantic tokens")
        semantic = torch.stack([latents.semantic for latents in stored])
        anchors = [list(latents.anchor_frames) for latents in stored]
    return SamaBatch(
        target_latents=torch.stack([latents.target for latents in stored]),
        source_latents=torch.stack([latents.source for latents in stored]) if has_source else None,
        text_embeds=text,
        semantic_candidates=semantic,
        anchor_frames=anchors,
        num_frames=[row.num_frames for row in rows],
        **common,
    )


class MixedBatchIterator:
    """Batches from several sources, interleaved by weight.

    Each source streams its shards through Ray Data (:class:`SourceStream`), or, when ``rows``
    maps source names to decoded rows held in memory, from those (:class:`RowStream`).
    ``text_length`` is the text encoder's ``max_length``, which latent rows' text embeddings are
    padded to (see :func:`collate`).
    """

    def __init__(
        self,
        cfg: DataConfig,
        position: DataPosition | None = None,
        rank: int = 0,
        world_size: int = 1,
        rows: dict[str, list[TrainingRow]] | dict[str, list[dict[str, Any]]] | None = None,
        text_length: int | None = None,
    ):
        cfg.validate()
        self.cfg = cfg
        self.text_length = text_length
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

    def next(self, step: int | None = None):
        """The next batch of optimizer step ``step`` (one call per micro-batch, all from the
        step's source); None: a step of its own, ``position.step``. Time spent waiting for data
        accumulates in ``wait_s``."""
        started = time.perf_counter()
        step = self.position.step if step is None else step
        stream = self.streams[self.choose(step)]
        batch = collate(stream.next_batch(), self.text_length)
        batch.source_name = stream.source.name
        self.position.step = step + 1
        self.wait_s += time.perf_counter() - started
        return batch


def renderable(row: TrainingRow) -> bool:
    """Whether a sample can be shown as [source | edit | target]: it needs a source to edit
    (a text-to-video sample has none)."""
    return row.has_source


def load_validation(cfg: DataConfig, render_samples: int = 0) -> tuple[list[TrainingRow], list[TrainingRow]]:
    """Decoded held-out samples (pixel or latent shards): the first ``val_samples`` for the
    validation loss, and the first ``render_samples`` renderable ones for sample edits, read on
    past ``val_samples`` if need be (a small pretext set may open with only text-to-video clips).
    Broken samples are skipped like in training."""
    if not cfg.val_uri:
        return [], []
    rows: list[TrainingRow] = []
    render: list[TrainingRow] = []
    for uri in schema.list_shards(cfg.val_uri):
        for members in schema.iter_members(uri):
            if len(rows) >= cfg.val_samples and len(render) >= render_samples:
                return rows, render
            row = TrainingRow.from_ray(decode_row(members))
            if row.error:
                log.warning("skipping an undecodable validation sample: %s", row.error)
                continue
            if len(rows) < cfg.val_samples:
                rows.append(row)
            if len(render) < render_samples and renderable(row):
                render.append(row)
    return rows, render
