"""The pretext data-prep job's stages: raw video -> clips -> pretext samples -> shards.

Pure functions over one video or one work unit; the Ray Data pipeline
(``pipelines/prep_pretext.py``) only schedules them. Per video: probe, reject what cannot give a
clip, plan clips of 4k+1 frames at the target fps, decode each (seeking, resized and cropped to
the nearest aspect-ratio bucket), draw its pretext task from the 1:2:3:4 mix deterministically
from the seed and clip id, perturb the source and build the schema sample. By default only the
target is encoded: the source is a deterministic function of the target and the task parameters
recorded in the metadata, rebuilt by readers (``Sample.decode_source``); with
``pretext.materialize_source`` the source is encoded and stored too.
"""

from __future__ import annotations

import logging
import math
import tarfile
from collections.abc import Iterator
from dataclasses import dataclass, field

from sama import schema, storage, video
from sama.buckets import Bucket, BucketConfig, is_4k_plus_1
from sama.prep import ledger
from sama.prep.common import DecodeConfig, EncodeConfig, OutputConfig, RayConfig, RejectInput
from sama.prep.inputs import BadMember, InputConfig, VideoInput, WorkUnit, iter_tar_videos
from sama.prep.unit import RejectSource, run_unit
from sama.pretext import TASK_NONE, PretextConfig, apply_task, choose_task, instruction_for, task_rng
from sama.schema import ShardConfig

log = logging.getLogger(__name__)


@dataclass
class ClipConfig:
    """How clips are cut from a video."""

    # Frames per clip: 4k+1 (49 or 81 in SAMA).
    num_frames: int = 49
    # Clips are resampled to this rate (Wan2.1 generates 16 fps).
    fps: float = 16.0
    # At most this many clips per video, starting at ``start_offset_s`` and every ``stride_s``.
    max_clips_per_video: int = 1
    # Seconds between clip starts; None = the clip duration (back-to-back, no overlap).
    stride_s: float | None = None
    start_offset_s: float = 0.0
    # Videos whose shorter side is below this are rejected as too small.
    min_side: int = 128

    def validate(self) -> None:
        if not is_4k_plus_1(self.num_frames):
            raise ValueError(f"clips.num_frames must be 4k+1 (e.g. 49, 81), got {self.num_frames}")
        if self.fps <= 0:
            raise ValueError("clips.fps must be positive")
        if self.max_clips_per_video < 1:
            raise ValueError("clips.max_clips_per_video must be >= 1")
        if self.stride_s is not None and self.stride_s <= 0:
            raise ValueError("clips.stride_s must be positive")
        if self.start_offset_s < 0:
            raise ValueError("clips.start_offset_s must be >= 0")

    @property
    def duration_s(self) -> float:
        return self.num_frames / self.fps


@dataclass
class PrepPretextConfig:
    """``sama prep-pretext``: raw videos -> motion-alignment pretext shards."""

    input: InputConfig = field(default_factory=InputConfig)
    output: OutputConfig = field(default_factory=OutputConfig)
    clips: ClipConfig = field(default_factory=ClipConfig)
    buckets: BucketConfig = field(default_factory=BucketConfig)
    pretext: PretextConfig = field(default_factory=PretextConfig)
    encode: EncodeConfig = field(default_factory=EncodeConfig)
    decode: DecodeConfig = field(default_factory=DecodeConfig)
    shards: ShardConfig = field(default_factory=ShardConfig)
    ray: RayConfig = field(default_factory=RayConfig)
    # Seeds the per-clip task draw (with the clip id), so reruns assign the same tasks.
    seed: int = 0
    # Recorded in every sample's metadata (``dataset``) and used by `sama inspect`.
    dataset: str = "raw-video"

    def validate(self) -> None:
        for part in (self.input, self.clips, self.buckets, self.pretext, self.shards, self.decode):
            part.validate()


def plan_clips(duration_s: float, cfg: ClipConfig) -> list[float]:
    """Start times of the clips a video of ``duration_s`` seconds gives (empty if too short).

    A small margin (half a frame at the target rate) absorbs rounding of container durations.
    """
    margin = 0.5 / cfg.fps
    usable = duration_s - cfg.start_offset_s - cfg.duration_s + margin
    if usable < 0:
        return []
    stride = cfg.stride_s or cfg.duration_s
    count = min(cfg.max_clips_per_video, int(math.floor(usable / stride)) + 1)
    return [round(cfg.start_offset_s + i * stride, 6) for i in range(count)]


def check_video(info: video.VideoInfo, cfg: PrepPretextConfig) -> list[float]:
    """Reject videos that cannot give one clip; returns the planned clip starts."""
    if not info.has_video:
        raise RejectInput("no_video_stream", f"{info.uri}: no video stream")
    if min(info.width, info.height) < cfg.clips.min_side:
        raise RejectInput(
            "too_small",
            f"{info.uri}: {info.width}x{info.height} is below clips.min_side={cfg.clips.min_side}",
        )
    starts = plan_clips(info.duration_s, cfg.clips)
    if not starts:
        raise RejectInput(
            "too_short",
            f"{info.uri}: {info.duration_s:.2f}s ({info.num_frames} frames) is shorter than one clip of "
            f"{cfg.clips.num_frames} frames at {cfg.clips.fps:g} fps ({cfg.clips.duration_s:.2f}s)",
        )
    return starts


def make_clip_sample(
    frames,
    input_id: str,
    clip_index: int,
    start_s: float,
    caption: str,
    bucket: Bucket,
    cfg: PrepPretextConfig,
) -> schema.Sample:
    """Turn one decoded clip (the target) into a pretext sample.

    The sample holds the encoded target and the task parameters (``meta.pretext``); its encoded
    source only with ``pretext.materialize_source``. ``source_num_frames`` is recorded either way.
    """
    key = schema.sample_key(input_id, clip_index, start_s)
    rng = task_rng(cfg.seed, key)
    task = choose_task(rng, cfg.pretext.weights)
    if task == TASK_NONE and not caption.strip():
        # (choice) A text-to-video sample trains the text path; without a caption it would teach
        # nothing, so an uncaptioned clip draws one of the restoration tasks instead.
        task = choose_task(rng, {k: v for k, v in cfg.pretext.weights.items() if k != TASK_NONE})
    # Store-once (the default) keeps the parameters only: the source is never built here.
    result = apply_task(task, frames, rng, cfg.pretext, with_source=cfg.pretext.materialize_source)
    enc = cfg.encode
    target = enc.encode(frames, cfg.clips.fps)
    source = None
    if result.source is not None:
        source = enc.encode(result.source, cfg.clips.fps)
    meta = schema.SampleMeta(
        key=key,
        task=task,
        media="video",
        instruction=instruction_for(task, caption),
        caption=caption,
        fps=cfg.clips.fps,
        num_frames=len(frames),
        height=bucket.height,
        width=bucket.width,
        bucket=bucket.name,
        source_uri=input_id,
        span=[start_s, round(start_s + cfg.clips.duration_s, 6)],
        source_num_frames=result.source_frames,
        pretext=result.params,
        dataset=cfg.dataset,
    )
    return schema.Sample(meta=meta, target=target, source=source)


def video_samples(
    source: str, item: VideoInput, cfg: PrepPretextConfig, dropped: list[ledger.Reject] | None = None
) -> list[schema.Sample]:
    """All samples of one video (``source`` is where to read it: its URI or a local spool file).

    Raises RejectInput (or VideoDecodeError) when the video is unusable; a video with a clip that
    fails to decode is rejected whole, so a damaged file never contributes partial samples. The
    exception is a clip the decoder had to conceal damage in ("corrupt_stream", see
    ``decode.max_errors``): it is left out and recorded in ``dropped`` while the video's clean clips
    are kept; a video with no clean clip is rejected as "corrupt_stream".
    """
    info = video.probe(source, uri=item.input_id)
    starts = check_video(info, cfg)
    bucket = cfg.buckets.nearest(info.height, info.width)
    caption = item.resolve_caption()
    samples, corrupt = [], []
    for index, start in enumerate(starts):
        try:
            frames = video.decode_clip(
                source,
                start_s=start,
                num_frames=cfg.clips.num_frames,
                fps=cfg.clips.fps,
                size=(bucket.height, bucket.width),
                uri=item.input_id,
                threads=cfg.encode.threads,
                max_errors=cfg.decode.max_errors,
            )
        except video.VideoDecodeError as exc:
            if exc.kind != "corrupt_stream":
                raise
            corrupt.append((f"{item.input_id}@{start:g}s", exc))
            continue
        samples.append(make_clip_sample(frames, item.input_id, index, start, caption, bucket, cfg))
    if corrupt and not samples:
        raise corrupt[0][1]  # no clean clip: the video's reject says it all
    if dropped is not None:
        dropped.extend(ledger.Reject(clip, exc.kind, f"{clip}: {exc.reason}") for clip, exc in corrupt)
    return samples


def process_unit(unit: WorkUnit, cfg: PrepPretextConfig) -> ledger.UnitResult:
    """Process every video of a unit, write its shards, then its completion marker
    (:func:`sama.prep.unit.run_unit`: rejects recorded, environment failures raise UnitFailed)."""

    def make_samples(
        item: tuple[VideoInput, str | BadMember], dropped: list[ledger.Reject]
    ) -> list[schema.Sample]:
        video_input, source = item
        if isinstance(source, BadMember):
            raise RejectInput(source.reason, source.detail)
        return video_samples(source, video_input, cfg, dropped)

    return run_unit(
        unit.unit_id,
        unit.input_ids,
        cfg.output.uri,
        cfg.shards,
        _unit_inputs(unit, cfg),
        make_samples,
    )


def _unit_inputs(unit: WorkUnit, cfg: PrepPretextConfig) -> Iterator[tuple[str, tuple]]:
    """``(input_id, (VideoInput, where to read it))`` for every video of the unit."""
    if not unit.tar_uri:
        for item in unit.videos:
            yield item.input_id, (item, item.input_id)
        return
    members = iter_tar_videos(unit.tar_uri, tuple(cfg.input.suffixes), cfg.input.max_member_bytes)
    try:
        for item, source in members:
            yield item.input_id, (item, source)
    except (EOFError, tarfile.TarError) as exc:  # the tar is unreadable past here
        raise RejectSource(unit.tar_uri, "bad_tar", f"{unit.tar_uri}: {exc}") from exc
    except storage.StorageError as exc:  # gone or unreadable in itself (not a service failure)
        raise RejectSource(unit.tar_uri, "missing", str(exc)) from exc
