"""Pieces shared by the data-prep jobs: output, encoding and Ray settings, and reject handling."""

from __future__ import annotations

from dataclasses import dataclass

from sama import video
from sama.prep import ledger


@dataclass
class EncodeConfig:
    """H.264 settings for the encoded source and target clips."""

    crf: int = 18
    preset: str = "fast"
    # Keyframe interval in frames; None = libx264's default.
    gop: int | None = None
    # Decoder and encoder threads per task. 1 matches a 1-CPU task budget and keeps the encoded
    # bytes reproducible, so a rerun rewrites identical shards.
    threads: int = 1

    def encode(self, frames, fps: float) -> bytes:
        """THWC uint8 frames -> H.264 mp4 bytes with these settings."""
        return video.encode_mp4(
            frames, fps, crf=self.crf, preset=self.preset, gop=self.gop, threads=self.threads
        )


@dataclass
class DecodeConfig:
    """How strictly decoded media is checked."""

    # Frames of a clip (its keyframe lead-in included) the decoder may flag corrupt, i.e. decoded
    # by concealing damaged data; more rejects the clip as "corrupt_stream". None: no check.
    max_errors: int | None = 0

    def validate(self) -> None:
        if self.max_errors is not None and self.max_errors < 0:
            raise ValueError("decode.max_errors must be >= 0 (or null for no check)")


@dataclass
class RayConfig:
    """How the job runs on Ray (the cluster comes from RAY_ADDRESS when address is unset)."""

    address: str | None = None
    # CPUs reserved per unit task; decode and encode run single-threaded inside it.
    num_cpus_per_task: float = 1.0
    # Upper bound on concurrent unit tasks (None = as many as the cluster's CPUs allow).
    concurrency: int | None = None
    # Seconds between progress log lines.
    progress_interval_s: float = 10.0


@dataclass
class ActorRayConfig:
    """How a job whose units run on a pool of actors (``sama precompute``, ``sama eval``: each
    actor loads its models once) runs on Ray (the cluster comes from RAY_ADDRESS when address is
    unset)."""

    address: str | None = None
    # Actors in the pool; None = one per GPU when the cluster has GPUs, else one per
    # ``num_cpus_per_actor`` CPUs.
    actors: int | None = None
    # CPUs reserved per actor (its decode and, on a CPU cluster, its models run in them).
    num_cpus_per_actor: float = 1.0
    # GPUs per actor; None = 1 when the cluster has GPUs, else 0 (the models run on CPU).
    num_gpus_per_actor: float | None = None
    # Seconds between progress log lines.
    progress_interval_s: float = 10.0

    def validate(self) -> None:
        if self.actors is not None and self.actors < 1:
            raise ValueError("ray.actors must be >= 1 (or null: sized from the cluster)")
        if self.num_cpus_per_actor <= 0:
            raise ValueError("ray.num_cpus_per_actor must be positive")
        if self.num_gpus_per_actor is not None and self.num_gpus_per_actor < 0:
            raise ValueError("ray.num_gpus_per_actor must be >= 0")


@dataclass
class OutputConfig:
    uri: str = ""
    # One run writes an output at a time: it holds a lease under the output root, renewed every
    # third of this; a run that dies leaves a lease that expires after this many seconds.
    lease_ttl_s: float = 300.0


class RejectInput(Exception):
    """An input the job cannot use; ``reason`` is the kind recorded in the rejects file."""

    def __init__(self, reason: str, detail: str):
        super().__init__(detail)
        self.reason = reason
        self.detail = detail


def reject_from(exc: Exception, input_id: str) -> ledger.Reject:
    """The rejects-file entry for an input that raised ``exc``."""
    if isinstance(exc, RejectInput):
        return ledger.Reject(input_id, exc.reason, exc.detail)
    if isinstance(exc, video.VideoDecodeError):
        # The error names the media file; a manifest row id (`manifest#i`) is added when different.
        detail = str(exc) if str(exc).startswith(input_id) else f"{input_id}: {exc}"
        return ledger.Reject(input_id, exc.kind, detail)
    if isinstance(exc, OSError):
        return ledger.Reject(input_id, "unreadable", f"{input_id}: {exc}")
    # A bug or an unexpected library failure: recorded, never silently dropped.
    return ledger.Reject(input_id, "error", f"{input_id}: {type(exc).__name__}: {exc}")
