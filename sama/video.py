"""Video and image I/O on PyAV: probe, clip decoding with keyframe seeking, resampling, encoding.

Sources are URIs (local paths, ``file://``, ``s3://``; opened through :func:`sama.storage.open_read`
and streamed, so memory is bounded by the clip rather than the file) or raw bytes.

Every bad input surfaces as one typed error, :class:`VideoDecodeError`, whose ``kind`` says what
is wrong; raw ``av.error.*`` and ``OSError`` never escape :func:`probe`, :func:`decode_clip`,
:func:`iter_frames` or :func:`read_image`. Programming errors (a negative ``start_s``, a float array
handed to an encoder) are plain ``ValueError``.

Time convention: clip times are seconds from the first frame of the video stream (the stream's
``start_time`` is subtracted), and the frame shown at time ``t`` is the latest frame whose
timestamp is ``<= t``. Decoded frames honour the display rotation stored in the container (as
phones write it), so they come out the way a player shows them.
"""

from __future__ import annotations

import contextlib
import io
import math
import numbers
import os
import posixpath
import struct
from collections.abc import Iterator
from dataclasses import dataclass
from fractions import Fraction
from typing import IO

import av
import numpy as np
from PIL import Image, ImageOps

from sama import storage

__all__ = [
    "IMAGE_SUFFIXES",
    "VIDEO_SUFFIXES",
    "DecodeStats",
    "VideoDecodeError",
    "VideoInfo",
    "decode_clip",
    "decode_video_bytes",
    "encode_image",
    "encode_mp4",
    "is_image_uri",
    "is_video_uri",
    "iter_frames",
    "probe",
    "read_image",
    "resize_center_crop",
]

IMAGE_SUFFIXES: tuple[str, ...] = (".png", ".jpg", ".jpeg", ".webp")
VIDEO_SUFFIXES: tuple[str, ...] = (".mp4", ".mov", ".mkv", ".webm", ".avi")

ERROR_KINDS: tuple[str, ...] = (
    "missing",
    "empty",
    "truncated",
    "not_video",
    "no_video_stream",
    "unsupported_codec",
    "too_short",
    "bad_image",
    "decode_failed",
    "too_large",
    "corrupt_stream",
)

# The largest frame a video may declare (8K UHD is 33.2 MP): decoding is refused above it.
MAX_PIXELS = 8192 * 8192

# av's own errors, plus what a Python file object (local or s3fs) raises mid-read.
_IO_ERRORS = (av.FFmpegError, OSError, EOFError)

# Demuxers that happily "open" things that are not videos: single images (png_pipe, ...)
# and text rendered as ANSI art. A still image is served by read_image, not as a 1-frame video.
_NOT_VIDEO_FORMATS = frozenset({"image2", "tty", "ansi"})

_BYTES_NAME = "<bytes>"
_SEEK_BACKOFF_S = (1.0, 4.0)


class VideoDecodeError(ValueError):
    """One typed error for every bad video or image input.

    Attributes:
        uri: the source's name (its URI, ``"<bytes>"`` or the caller's ``uri`` override).
        kind: one of :data:`ERROR_KINDS` (``"missing"``, ``"empty"``, ``"truncated"``,
            ``"not_video"``, ``"no_video_stream"``, ``"unsupported_codec"``, ``"too_short"``,
            ``"bad_image"``, ``"decode_failed"``).
        reason: a human-readable explanation; ``str(e)`` contains both the URI and the reason.
    """

    def __init__(self, uri: str, kind: str, reason: str):
        if kind not in ERROR_KINDS:
            raise ValueError(f"unknown VideoDecodeError kind {kind!r}")
        super().__init__(f"{uri}: {kind}: {reason}")
        self.uri = uri
        self.kind = kind
        self.reason = reason

    def __reduce__(self):
        # Ray ships exceptions between processes by pickling; the default reduce would call
        # __init__ with the formatted message only and fail.
        return (type(self), (self.uri, self.kind, self.reason))


@dataclass(frozen=True)
class VideoInfo:
    """What :func:`probe` learns about a video.

    ``width``/``height`` are the displayed size (after the container's rotation), i.e. the shape
    :func:`decode_clip` returns with ``size=None``. ``num_frames`` is exact when the container
    stores a frame count (mp4/mov) and ``round(duration_s * fps)`` otherwise (mkv/webm).
    A file without a video stream probes with ``has_video=False`` and zeros for the video fields.
    """

    uri: str
    duration_s: float
    fps: float
    num_frames: int
    width: int
    height: int
    codec: str
    has_video: bool
    has_audio: bool


@dataclass
class DecodeStats:
    """Work counters filled in by :func:`decode_clip`/:func:`iter_frames` (accumulated, not reset).

    ``packets`` counts demuxed video packets, ``frames_decoded`` counts frames the decoder
    produced (including frames decoded only to reach the start after a keyframe seek), ``seeks``
    counts container seeks, ``corrupt_frames`` the decoded frames the decoder flagged corrupt.
    """

    packets: int = 0
    frames_decoded: int = 0
    seeks: int = 0
    # Frames the decoder flagged corrupt: it met damaged data and concealed it (smeared
    # macroblocks, streaks) instead of failing.
    corrupt_frames: int = 0


# --------------------------------------------------------------------------------------------
# URIs


def stretch_frames(frames: np.ndarray, length: int) -> np.ndarray:
    """``frames`` resampled to ``length`` frames over the same span (nearest frame; a shorter clip
    repeats frames, a longer one skips them)."""
    index = np.round(np.linspace(0, len(frames) - 1, length)).astype(int)
    return frames[index]


def resample_indices(num_frames: int, fps: float, to_fps: float, length: int | None = None) -> np.ndarray:
    """Which of ``num_frames`` frames at ``fps`` to show at ``to_fps``, by timestamp.

    Output frame ``j`` (at ``j / to_fps`` seconds) takes the input frame nearest in time,
    ``round(j * fps / to_fps)`` with halves rounded up, clamped to the last frame; a lower rate
    skips frames, a higher one repeats them. ``length`` output frames; by default as many as span
    the same duration, ``round(num_frames * to_fps / fps)`` (at least one).
    """
    if num_frames < 1:
        raise ValueError(f"cannot resample {num_frames} frames")
    if not (fps > 0 and to_fps > 0):
        raise ValueError(f"frame rates must be positive, got {fps} -> {to_fps}")
    if length is None:
        length = max(1, math.floor(num_frames * to_fps / fps + 0.5))
    # The epsilon keeps exact halves (e.g. 2.5 computed as 2.4999999) rounding up.
    index = np.floor(np.arange(length) * (fps / to_fps) + 0.5 + 1e-9).astype(np.int64)
    return np.minimum(index, num_frames - 1)


def _suffix(uri: str) -> str:
    return posixpath.splitext(uri.split("?", 1)[0].rstrip("/"))[1].lower()


def is_image_uri(uri: str) -> bool:
    """True when ``uri`` names an image by its suffix (one of :data:`IMAGE_SUFFIXES`)."""
    return _suffix(uri) in IMAGE_SUFFIXES


def is_video_uri(uri: str) -> bool:
    """True when ``uri`` names a video by its suffix (one of :data:`VIDEO_SUFFIXES`)."""
    return _suffix(uri) in VIDEO_SUFFIXES


# --------------------------------------------------------------------------------------------
# Opening sources


def _source_name(source: object, uri: str | None) -> str:
    if uri is not None:
        return uri
    if isinstance(source, str | os.PathLike):
        return os.fspath(source)
    return _BYTES_NAME


def _open_handle(source: str | bytes, name: str) -> IO[bytes]:
    """A seekable binary handle on ``source``; raises "missing" / "empty" kinds."""
    if isinstance(source, bytes | bytearray | memoryview):
        if len(source) == 0:
            raise VideoDecodeError(name, "empty", "zero bytes of data")
        return io.BytesIO(source)
    if not isinstance(source, str | os.PathLike):
        raise TypeError(f"source must be a URI string or bytes, not {type(source).__name__}")
    try:
        handle = storage.open_read(source)
    except storage.StorageError as exc:
        # "missing" covers every reason the object cannot be opened (absent, a directory,
        # no permission): the caller cannot read it either way, and the reason says which.
        raise VideoDecodeError(name, "missing", exc.reason) from exc
    try:
        size = handle.seek(0, io.SEEK_END)
        handle.seek(0)
    except storage.StorageUnavailable:
        handle.close()
        raise
    except _IO_ERRORS as exc:
        handle.close()
        raise VideoDecodeError(name, "missing", f"cannot read: {exc}") from exc
    if size == 0:
        handle.close()
        raise VideoDecodeError(name, "empty", "the file is zero bytes")
    return handle


def _handle_size(handle: IO[bytes]) -> int:
    pos = handle.tell()
    size = handle.seek(0, io.SEEK_END)
    handle.seek(pos)
    return size


def _mp4_truncation(handle: IO[bytes], size: int) -> str | None:
    """Why an ISO-BMFF file (mp4/mov) looks cut off, or None when its top-level boxes are whole.

    Walks only the box headers (a few bytes each), so it is cheap even on S3.
    """
    offset, seen_moov = 0, False
    for _ in range(100_000):
        if offset >= size:
            break
        handle.seek(offset)
        header = handle.read(16)
        if len(header) < 8:
            return f"box header at byte {offset} is cut off"
        box_size, box_type = struct.unpack(">I4s", header[:8])
        if box_size == 1:
            if len(header) < 16:
                return f"box header at byte {offset} is cut off"
            box_size = struct.unpack(">Q", header[8:16])[0]
        elif box_size == 0:
            box_size = size - offset
        if box_size < 8 or not all(0x20 <= c < 0x7F for c in box_type):
            return None  # garbage rather than truncation
        if box_type == b"moov":
            seen_moov = True
        if offset + box_size > size:
            kind = box_type.decode("latin-1")
            return (
                f"'{kind}' box at byte {offset} needs {box_size} bytes but only {size - offset} remain "
                f"(file is {size} bytes)"
            )
        offset += box_size
    if not seen_moov:
        return "no 'moov' box: the index was never written (the file was cut off or never finalized)"
    return None


def _container_magic(head: bytes) -> str | None:
    """The container family a file header announces, or None for unknown bytes."""
    if len(head) >= 8 and head[4:8] in (b"ftyp", b"moov", b"mdat", b"free", b"wide", b"skip", b"pnot"):
        return "mp4"
    if head.startswith(b"\x1a\x45\xdf\xa3"):
        return "matroska"
    if head.startswith(b"RIFF") and head[8:12] == b"AVI ":
        return "avi"
    if head.startswith((b"OggS", b"FLV", b"\x00\x00\x01\xba")):
        return "other"
    if head[:1] == b"\x47" and len(head) > 188 and head[188:189] == b"\x47":
        return "mpegts"
    return None


def _classify_open_failure(handle: IO[bytes], name: str, exc: BaseException) -> VideoDecodeError:
    """Turn an av.open failure into the right kind by looking at the bytes ourselves."""
    try:
        handle.seek(0)
        head = handle.read(256)
        size = _handle_size(handle)
        family = _container_magic(head)
        why = _mp4_truncation(handle, size) if family == "mp4" else None
    except storage.StorageUnavailable:
        raise
    except _IO_ERRORS as read_exc:
        return VideoDecodeError(name, "decode_failed", f"cannot read the file back: {read_exc}")
    detail = _av_message(exc)
    if family is None:
        return VideoDecodeError(name, "not_video", f"not a recognised video container ({detail})")
    if why is not None:
        return VideoDecodeError(name, "truncated", f"{why} ({detail})")
    if family != "mp4" and isinstance(exc, EOFError | OSError):
        # Header-first containers (mkv, avi) fail to open only when cut inside the header.
        return VideoDecodeError(name, "truncated", f"the {family} header is cut off ({detail})")
    return VideoDecodeError(name, "decode_failed", f"the {family} container cannot be opened ({detail})")


def _av_message(exc: BaseException) -> str:
    strerror = getattr(exc, "strerror", None)
    return f"{type(exc).__name__}: {strerror}" if strerror else f"{type(exc).__name__}: {exc}"


@contextlib.contextmanager
def _open_container(source: str | bytes, name: str) -> Iterator[av.container.InputContainer]:
    """Open ``source`` with PyAV; every failure inside the block becomes a VideoDecodeError."""
    handle = _open_handle(source, name)
    try:
        try:
            # metadata_errors="replace": junk tags in the wild must not fail a decode.
            container = av.open(handle, mode="r", metadata_errors="replace")
        except storage.StorageUnavailable:
            raise  # the storage failed, not the file: the caller retries later
        except (*_IO_ERRORS, UnicodeDecodeError) as exc:
            raise _classify_open_failure(handle, name, exc) from exc
        try:
            yield container
        except storage.StorageUnavailable:
            raise
        except _IO_ERRORS as exc:
            raise VideoDecodeError(name, "decode_failed", _av_message(exc)) from exc
        finally:
            container.close()
    finally:
        handle.close()


def _video_stream(container: av.container.InputContainer, name: str):
    """The main video stream, or None when the container has none (cover art does not count)."""
    if container.format.name in _NOT_VIDEO_FORMATS or container.format.name.endswith("_pipe"):
        raise VideoDecodeError(
            name, "not_video", f"a still image or text ({container.format.name}), not a video; use read_image"
        )
    for stream in container.streams.video:
        if not stream.disposition & av.stream.Disposition.attached_pic:
            return stream
    return None


def _require_video_stream(container: av.container.InputContainer, name: str):
    stream = _video_stream(container, name)
    if stream is None:
        found = ", ".join(f"{s.type}" for s in container.streams) or "none"
        raise VideoDecodeError(name, "no_video_stream", f"no video stream (streams: {found})")
    if stream.codec_context is None:
        # PyAV leaves codec_context unset when FFmpeg has no decoder for the stream's codec.
        raise VideoDecodeError(
            name, "unsupported_codec", f"no decoder available for video stream #{stream.index}'s codec"
        )
    width, height = int(stream.codec_context.width or 0), int(stream.codec_context.height or 0)
    if width * height > MAX_PIXELS:
        # Checked before the first frame is decoded: a header claiming 60000x60000 would make the
        # decoder allocate gigabytes per frame.
        raise VideoDecodeError(
            name,
            "too_large",
            f"{width}x{height} frames, more than {MAX_PIXELS} pixels (sama.video.MAX_PIXELS)",
        )
    return stream


# --------------------------------------------------------------------------------------------
# Stream timing


@dataclass
class _Timing:
    origin_pts: int  # stream timestamp of t=0
    time_base: Fraction
    fps: float  # nominal rate; 0 when the container does not say
    duration_s: float | None  # declared length from t=0, None when unknown
    duration_is_exact: bool  # True when declared by the stream itself (not the whole container)


def _parse_hms(text: str) -> float | None:
    """'00:00:02.000000000' (the matroska DURATION tag) to seconds."""
    try:
        hours, minutes, seconds = text.strip().split(":")
        return int(hours) * 3600 + int(minutes) * 60 + float(seconds)
    except ValueError:
        return None


def _timing(container: av.container.InputContainer, stream) -> _Timing:
    time_base = stream.time_base or Fraction(1, 90_000)
    if stream.start_time is not None:
        origin_pts = int(stream.start_time)
    elif container.start_time is not None:
        origin_pts = int(Fraction(container.start_time, av.time_base) / time_base)
    else:
        origin_pts = 0
    rate = stream.average_rate or stream.guessed_rate or stream.base_rate
    fps = float(rate) if rate else 0.0
    if not (math.isfinite(fps) and 0 < fps < 10_000):
        fps = 0.0
    origin_s = float(origin_pts * time_base)
    # Matroska's segment duration and per-track DURATION tag are end times measured from
    # timestamp 0, not lengths: a track starting at 0.5 s with DURATION 2.5 s is 2 s long.
    from_zero = container.format.name.startswith("matroska")
    duration, exact = None, False
    if stream.duration:
        duration, exact = float(stream.duration * time_base), True
    else:
        tag = next((v for k, v in stream.metadata.items() if k.upper() == "DURATION"), None)
        parsed = _parse_hms(tag) if tag else None
        if parsed:
            duration, exact = (parsed - origin_s if from_zero else parsed), True
        elif container.duration:
            if from_zero:
                duration = float(container.duration) / av.time_base - origin_s
            else:
                start = float(container.start_time or 0) / av.time_base
                duration = float(container.duration) / av.time_base - max(0.0, origin_s - start)
    if duration is not None and not (math.isfinite(duration) and duration > 0):
        duration, exact = None, False
    return _Timing(origin_pts, Fraction(time_base), fps, duration, exact)


def _frame_time(frame, timing: _Timing, fallback: float) -> float:
    if frame.pts is None:
        return fallback
    return float((frame.pts - timing.origin_pts) * timing.time_base)


def _frame_duration(frame, timing: _Timing) -> float:
    if frame.duration:
        return float(frame.duration * timing.time_base)
    return 1.0 / timing.fps if timing.fps else 1.0 / 30.0


def _rotation_quarters(frame) -> int:
    """Counter-clockwise quarter turns needed to show ``frame`` upright (display matrix)."""
    try:
        degrees = frame.rotation
    except (AttributeError, ValueError):
        return 0
    return round((degrees or 0) / 90.0) % 4


# --------------------------------------------------------------------------------------------
# Probe


def probe(source: str | bytes, uri: str | None = None) -> VideoInfo:
    """Read a video's metadata: duration, frame rate, frame count, display size, codec.

    Duration and rate come from the stream's metadata, falling back to the container's duration
    and, when neither is stored, to counting the packets. The first frame is decoded to learn the
    display rotation (and to prove the stream decodes at all). A file whose mp4 index is complete
    but whose media data is cut off probes fine; :func:`decode_clip` reports it as "truncated".

    Raises:
        VideoDecodeError: kinds "missing", "empty", "not_video", "truncated" (cannot be opened),
            "unsupported_codec", "decode_failed". A file without video is *not* an error here:
            it probes with ``has_video=False``.
    """
    name = _source_name(source, uri)
    with _open_container(source, name) as container:
        stream = _video_stream(container, name)
        has_audio = bool(container.streams.audio)
        if stream is None:
            duration = float(container.duration) / av.time_base if container.duration else 0.0
            return VideoInfo(name, duration, 0.0, 0, 0, 0, "", has_video=False, has_audio=has_audio)
        stream = _require_video_stream(container, name)
        timing = _timing(container, stream)
        count_packets = timing.duration_s is None or not timing.fps
        first = None
        packets, end_s = 0, 0.0
        for packet in container.demux(stream):
            if packet.size:
                packets += 1
                if packet.pts is not None:
                    dur = float((packet.duration or 0) * timing.time_base)
                    end_s = max(end_s, float((packet.pts - timing.origin_pts) * timing.time_base) + dur)
            if first is None:
                frames = packet.decode()
                if frames:
                    first = frames[0]
            if first is not None and not count_packets:
                break
        if first is None:
            raise VideoDecodeError(name, "decode_failed", "the video stream yields no decodable frame")
        duration = timing.duration_s if timing.duration_s is not None else end_s
        fps = timing.fps or (packets / duration if duration > 0 else 0.0)
        if count_packets and end_s == 0.0 and packets:
            # No timestamps at all (a raw elementary stream): trust the decoder's frame duration
            # over the demuxer's guessed rate (FFmpeg assumes 25 fps).
            frame_s = _frame_duration(first, timing)
            duration, fps = packets * frame_s, 1.0 / frame_s
        if stream.frames:
            num_frames = int(stream.frames)
        elif count_packets:
            num_frames = packets
        else:
            num_frames = round(duration * fps)
        width, height = first.width, first.height
        if _rotation_quarters(first) % 2:
            width, height = height, width
        return VideoInfo(
            uri=name,
            duration_s=float(duration),
            fps=float(fps),
            num_frames=int(num_frames),
            width=int(width),
            height=int(height),
            codec=stream.codec_context.name,
            has_video=True,
            has_audio=has_audio,
        )


# --------------------------------------------------------------------------------------------
# Decode


def _cover_size(src_h: float, src_w: float, dst_h: int, dst_w: int) -> tuple[int, int]:
    """The smallest (h, w) with the source's aspect that covers (dst_h, dst_w)."""
    scale = max(dst_h / src_h, dst_w / src_w)
    return max(dst_h, round(src_h * scale)), max(dst_w, round(src_w * scale))


def _center_crop(arr: np.ndarray, height: int, width: int) -> np.ndarray:
    h, w = arr.shape[-3], arr.shape[-2]
    top, left = (h - height) // 2, (w - width) // 2
    return arr[..., top : top + height, left : left + width, :]


class _Converter:
    """Turns decoded frames into upright, resized, cropped HWC RGB arrays.

    The geometry is fixed by the first frame so every output has the same shape, even if the
    stream changes resolution midway.
    """

    def __init__(self, first_frame, size: tuple[int, int] | None, sample_aspect: Fraction | None):
        self.quarters = _rotation_quarters(first_frame)
        coded_h, coded_w = first_frame.height, first_frame.width
        self.interpolation = None
        if size is None:
            self.scale_h, self.scale_w = coded_h, coded_w
            self.crop = None
        else:
            # Anamorphic video (non-square pixels) is shown wider or narrower than it is stored.
            disp_w = coded_w * float(sample_aspect) if sample_aspect else float(coded_w)
            disp_h = float(coded_h)
            if self.quarters % 2:
                disp_h, disp_w = disp_w, disp_h
            cover_h, cover_w = _cover_size(disp_h, disp_w, size[0], size[1])
            # swscale works before rotation, so ask it for the un-rotated cover size.
            self.scale_h, self.scale_w = (cover_w, cover_h) if self.quarters % 2 else (cover_h, cover_w)
            self.crop = size
            downscale = self.scale_h * self.scale_w < coded_h * coded_w
            # AREA averages when shrinking (no aliasing); BICUBIC when enlarging.
            self.interpolation = "AREA" if downscale else "BICUBIC"

    def __call__(self, frame) -> np.ndarray:
        if self.crop is None and (frame.width, frame.height) == (self.scale_w, self.scale_h):
            # Plain colour conversion: exactly what a bare PyAV loop does, at the same speed.
            arr = frame.to_ndarray(format="rgb24")
        else:
            rgb = frame.reformat(
                width=self.scale_w, height=self.scale_h, format="rgb24", interpolation=self.interpolation
            )
            arr = rgb.to_ndarray()
        if self.quarters:
            arr = np.rot90(arr, k=self.quarters)
        if self.crop is not None:
            arr = _center_crop(arr, *self.crop)
        return np.ascontiguousarray(arr)


def _check_clip_args(start_s: float, num_frames: int | None, fps: float | None, size) -> None:
    if not (isinstance(start_s, numbers.Real) and math.isfinite(start_s) and start_s >= 0):
        raise ValueError(f"start_s must be a finite number >= 0, got {start_s!r}")
    if num_frames is not None and (not isinstance(num_frames, int | np.integer) or num_frames < 1):
        raise ValueError(f"num_frames must be a positive int or None, got {num_frames!r}")
    if fps is not None and not (isinstance(fps, numbers.Real) and math.isfinite(fps) and fps > 0):
        raise ValueError(f"fps must be a positive number or None, got {fps!r}")
    _check_size(size)


def _check_size(size) -> None:
    valid = size is None or (
        isinstance(size, tuple | list)
        and len(size) == 2
        and all(isinstance(v, int | np.integer) and v > 0 for v in size)
    )
    if not valid:
        raise ValueError(f"size must be (height, width) positive ints or None, got {size!r}")


class _ClipReader:
    """The decode loop behind :func:`iter_frames` and :func:`decode_clip`.

    It seeks to the keyframe at or before ``start_s``, decodes forward, and emits for each target
    time the latest frame shown at that time. It stops as soon as the consumer stops pulling.
    """

    def __init__(self, source, name, start_s, fps, size, stats, threads=None):
        self.source = source
        self.threads = threads
        self.name = name
        self.start_s = float(start_s)
        self.fps = fps
        self.size = size
        self.stats = stats if stats is not None else DecodeStats()
        self.timing: _Timing | None = None
        self.sample_aspect: Fraction | None = None
        self.end_s: float | None = None
        # Times of the frames decoded for this clip (lead-in from the keyframe included) that the
        # decoder flagged corrupt.
        self.corrupt_times: list[float] = []
        self.decoded = 0  # frames this reader decoded (``stats`` may accumulate over readers)

    def frames(self) -> Iterator[np.ndarray]:
        seek = self.start_s > 0
        while True:
            with _open_container(self.source, self.name) as container:
                stream = _require_video_stream(container, self.name)
                # Frame + slice threading; decoding dominates the cost of a clip.
                stream.thread_type = "AUTO"
                if self.threads:
                    # A worker with a 1-CPU budget must not fan out over every core.
                    stream.codec_context.thread_count = int(self.threads)
                self.timing = _timing(container, stream)
                sar = stream.sample_aspect_ratio or stream.codec_context.sample_aspect_ratio
                self.sample_aspect = Fraction(sar) if sar and sar > 0 else None
                if seek and not self._seek(container, stream, self.start_s):
                    # Unseekable input (a raw elementary stream): a failed seek can leave the
                    # demuxer at EOF, so reopen and decode from the start instead.
                    seek = False
                    continue
                yield from self._emit(self._decoded(container, stream, seeked=seek))
                return

    def _seek(self, container, stream, target_s: float) -> bool:
        timing = self.timing
        offset = timing.origin_pts + math.floor(target_s / timing.time_base)
        try:
            # backward=True lands on the keyframe at or before the offset; PyAV flushes the
            # decoder, so no frame from before the seek leaks through.
            container.seek(offset, stream=stream, backward=True, any_frame=False)
        except av.FFmpegError:
            return False
        self.stats.seeks += 1
        return True

    def _decoded(self, container, stream, seeked: bool) -> Iterator[tuple[float, float, object]]:
        """Decoded frames as (time_s, duration_s, frame), starting at or before ``start_s``.

        ``seeked`` says the container was already seeked to ``start_s``. Some demuxers (mpegts,
        files without an index) land after the start or on a non-keyframe: then back off and
        seek earlier, finally to t=0, which always works.
        """
        timing = self.timing
        eps = self._eps()
        targets = [self.start_s - b for b in (0.0, *_SEEK_BACKOFF_S) if self.start_s - b > 0]
        targets = [*targets, 0.0] if seeked else []
        attempt = 0
        last_t = -math.inf
        while True:
            retry_possible = attempt + 1 < len(targets)
            # Feeding a decoder from a non-keyframe yields nothing (h264) or garbage (mpeg4), so
            # after a seek skip to the first keyframe packet. The last attempt (from t=0) does
            # not gate, so streams that never flag keyframes (intra refresh) still decode.
            gate = retry_possible
            landed_late = False
            got_frame = False
            self.corrupt_times = []  # what an abandoned attempt decoded is not part of the clip
            for packet in container.demux(stream):
                if packet.size:
                    self.stats.packets += 1
                if gate:
                    if not packet.is_keyframe:
                        continue
                    gate = False
                for frame in self._decode_packet(packet):
                    self.decoded += 1
                    self.stats.frames_decoded += 1
                    dur = _frame_duration(frame, timing)
                    t = _frame_time(frame, timing, last_t + dur if math.isfinite(last_t) else 0.0)
                    if frame.is_corrupt:
                        self.stats.corrupt_frames += 1
                        self.corrupt_times.append(t)
                    if not got_frame:
                        got_frame = True
                        landed_late = retry_possible and t > self.start_s + eps
                        if landed_late:
                            break
                    last_t = t
                    yield t, dur, frame
                if landed_late:
                    break
            if not (landed_late or (retry_possible and not got_frame)):
                return
            attempt += 1
            if not self._seek(container, stream, targets[attempt]):
                raise VideoDecodeError(
                    self.name, "decode_failed", "seeking back to an earlier keyframe failed"
                )

    def _decode_packet(self, packet) -> list:
        """``packet.decode()``; once the stream has produced frames, a decoder that rejects a
        packet as invalid data met damage mid-stream: "corrupt_stream", like damage it conceals."""
        try:
            return packet.decode()
        except av.error.InvalidDataError as exc:
            if not self.decoded:
                raise
            raise VideoDecodeError(
                self.name,
                "corrupt_stream",
                f"the decoder rejected damaged data after {self.decoded} frame(s) ({_av_message(exc)})",
            ) from exc

    def _eps(self) -> float:
        timing = self.timing
        eps = max(1e-3, float(timing.time_base))
        if timing.fps:
            eps = min(eps, 0.25 / timing.fps)
        return eps

    def _emit(self, decoded: Iterator[tuple[float, float, object]]) -> Iterator[np.ndarray]:
        eps = self._eps()
        convert: _Converter | None = None
        held = None  # (time, duration, frame): the latest frame shown at the next target
        held_array: np.ndarray | None = None

        def array_of(frame) -> np.ndarray:
            nonlocal convert
            if convert is None:
                convert = _Converter(frame, self.size, self.sample_aspect)
            return convert(frame)

        last_t, last_dur = None, 0.0
        if self.fps is None:
            started = False
            for t, dur, frame in decoded:
                last_t, last_dur = t, dur
                if not started and t <= self.start_s + eps:
                    held = (t, dur, frame)
                    continue
                if not started:
                    started = True
                    if held is not None:
                        yield array_of(held[2])
                        held = None
                yield array_of(frame)
            if not started and held is not None and self.start_s < held[0] + held[1] - eps:
                yield array_of(held[2])
        else:
            step = 1.0 / self.fps
            index = 0
            repeats = 0  # how often the held frame was already handed out
            for t, dur, frame in decoded:
                last_t, last_dur = t, dur
                # Every target before this frame is shown by the held frame (or, before the very
                # first frame, by this one).
                if held is None:
                    held = (t, dur, frame)
                while self.start_s + index * step + eps < t:
                    held_array = array_of(held[2]) if repeats == 0 else held_array
                    # Never hand the same buffer out twice: callers may write into frames.
                    yield held_array if repeats == 0 else held_array.copy()
                    repeats += 1
                    index += 1
                if held[2] is not frame:
                    held, held_array, repeats = (t, dur, frame), None, 0
            if held is not None:
                end = held[0] + held[1]
                while self.start_s + index * step < end - eps:
                    held_array = array_of(held[2]) if repeats == 0 else held_array
                    yield held_array if repeats == 0 else held_array.copy()
                    repeats += 1
                    index += 1
        self.end_s = None if last_t is None else last_t + last_dur
        self._check_complete()

    def _check_complete(self) -> None:
        """At end of stream: raise "truncated" when the data stops well before the declared end."""
        timing = self.timing
        if timing.duration_s is None:
            return
        reached = self.end_s if self.end_s is not None else 0.0
        if timing.duration_is_exact:
            tolerance = max(0.5, 3.0 / timing.fps if timing.fps else 0.1)
        else:
            # The container's duration also covers audio, which may legitimately run longer.
            tolerance = max(1.0, 0.1 * timing.duration_s)
        if timing.duration_s - reached > tolerance:
            raise VideoDecodeError(
                self.name,
                "truncated",
                f"video data ends at {reached:.3f}s but the stream declares {timing.duration_s:.3f}s",
            )


def iter_frames(
    source: str | bytes,
    start_s: float = 0.0,
    fps: float | None = None,
    size: tuple[int, int] | None = None,
    stats: DecodeStats | None = None,
    uri: str | None = None,
    threads: int | None = None,
) -> Iterator[np.ndarray]:
    """Yield HWC uint8 RGB frames from ``start_s`` to the end of the video, lazily.

    Same arguments and semantics as :func:`decode_clip`; decoding stops when the caller stops
    iterating (close the generator, or let it be collected, to release the file promptly).
    Reaching the end of a file whose data stops well short of its declared duration raises
    ``VideoDecodeError(kind="truncated")`` after the frames that exist were yielded.
    """
    _check_clip_args(start_s, None, fps, size)
    reader = _ClipReader(source, _source_name(source, uri), start_s, fps, size, stats, threads)
    return reader.frames()


def decode_clip(
    source: str | bytes,
    start_s: float = 0.0,
    num_frames: int | None = None,
    fps: float | None = None,
    size: tuple[int, int] | None = None,
    stats: DecodeStats | None = None,
    uri: str | None = None,
    threads: int | None = None,
    max_errors: int | None = None,
) -> np.ndarray:
    """Decode a clip as a THWC uint8 RGB array.

    Args:
        source: a URI (streamed through :mod:`sama.storage`) or the file's bytes.
        start_s: clip start, in seconds from the first frame. The first output frame is the one
            shown at ``start_s``.
        num_frames: frames wanted; None decodes to the end of the video.
        fps: output rate; frame ``i`` is the one shown at ``start_s + i / fps`` (frames are
            dropped or repeated). None keeps the native frames.
        size: ``(height, width)``: scale preserving aspect ratio until the frame covers it, then
            center-crop to exactly that. None keeps the stored size (after rotation).
        stats: if given, work counters are added to it (see :class:`DecodeStats`).
        uri: the name used in errors (defaults to the URI, or ``"<bytes>"``).
        threads: decoder threads (None = FFmpeg's choice, about one per core). Set it to the
            CPUs a worker was given so parallel workers do not oversubscribe the machine.
        max_errors: how many of the frames decoded for the clip (the lead-in from the keyframe
            included, frames after the clip not) the decoder may have flagged corrupt; more
            raises "corrupt_stream". None checks nothing.

    The decoder seeks to the keyframe before ``start_s`` and decodes only as far as the clip
    needs, so a short clip from the middle of a long file costs about one GOP plus the clip.
    With ``num_frames`` given the output is allocated once; with None the frames are collected
    and stacked, so peak memory is about twice the clip.

    Raises:
        VideoDecodeError: "too_short" when fewer than ``num_frames`` frames exist from
            ``start_s`` (or none at all); "truncated" when the file's data ends well before
            its declared duration and so the clip cannot be filled; "decode_failed" when the
            decoder or demuxer fails midway; "corrupt_stream" (see ``max_errors``); and the
            open-time kinds of :func:`probe`, plus "no_video_stream".
        ValueError: for invalid arguments.
    """
    _check_clip_args(start_s, num_frames, fps, size)
    reader = _ClipReader(source, _source_name(source, uri), start_s, fps, size, stats, threads)
    frames = reader.frames()
    out: np.ndarray | None = None
    collected: list[np.ndarray] = []
    count = 0
    try:
        for arr in frames:
            if num_frames is None:
                collected.append(arr)
            else:
                if out is None:
                    # One allocation for the whole clip instead of a list plus np.stack.
                    out = np.empty((num_frames, *arr.shape), dtype=np.uint8)
                out[count] = arr
                # Release the frame before pulling the next, so the allocator can reuse its
                # buffer for the next conversion instead of faulting in fresh pages.
                del arr
            count += 1
            if num_frames is not None and count == num_frames:
                break
    finally:
        frames.close()
    if count == 0 or (num_frames is not None and count < num_frames):
        declared = reader.timing.duration_s if reader.timing else None
        length = f"{declared:.3f}s" if declared is not None else "of unknown length"
        rate = f" at {fps:g} fps" if fps else ""
        wanted = f"wanted {num_frames} frames{rate}" if num_frames is not None else "wanted frames"
        raise VideoDecodeError(
            reader.name,
            "too_short",
            f"{wanted} from {start_s:.3f}s but only {count} exist (video is {length})",
        )
    check_corrupt_frames(reader.name, reader.corrupt_times, max_errors)
    if num_frames is None:
        return np.stack(collected)
    return out


def check_corrupt_frames(name: str, corrupt_times: list[float], max_errors: int | None) -> None:
    """Raise "corrupt_stream" when more than ``max_errors`` decoded frames were flagged corrupt.

    FFmpeg's decoders conceal damaged data (flipped bits, a zeroed block) and keep returning
    frames, smeared macroblocks and all; they flag such frames corrupt. ``None`` checks nothing.
    """
    if max_errors is None or len(corrupt_times) <= max_errors:
        return
    shown = ", ".join(f"{t:.2f}s" for t in corrupt_times[:5]) + (" ..." if len(corrupt_times) > 5 else "")
    raise VideoDecodeError(
        name,
        "corrupt_stream",
        f"the decoder concealed damaged data in {len(corrupt_times)} frame(s) decoded for this clip "
        f"(at {shown}); {max_errors} allowed (decode.max_errors)",
    )


def decode_video_bytes(data: bytes, uri: str = _BYTES_NAME, max_errors: int | None = 0) -> np.ndarray:
    """Decode every frame of an in-memory video (THWC uint8 RGB); a stream with more than
    ``max_errors`` frames the decoder flagged corrupt raises "corrupt_stream"."""
    return decode_clip(data, uri=uri, max_errors=max_errors)


# --------------------------------------------------------------------------------------------
# Resize


def resize_center_crop(frames: np.ndarray, height: int, width: int) -> np.ndarray:
    """Scale (aspect preserving) until the frames cover ``height`` x ``width``, then center-crop.

    Accepts THWC or HWC uint8 arrays with 1, 3 or 4 channels and returns the same layout.
    The crop is folded into the resample (PIL's ``box``), so nothing outside it is computed and
    sub-pixel centering is exact; shrinking is antialiased.
    """
    if not isinstance(frames, np.ndarray) or frames.dtype != np.uint8 or frames.ndim not in (3, 4):
        raise ValueError("frames must be a uint8 array shaped (T, H, W, C) or (H, W, C)")
    if frames.shape[-1] not in (1, 3, 4):
        raise ValueError(f"frames must have 1, 3 or 4 channels, got shape {frames.shape}")
    if not (int(height) > 0 and int(width) > 0):
        raise ValueError(f"height and width must be positive, got {height}x{width}")
    if frames.ndim == 3:
        return resize_center_crop(frames[None], height, width)[0]
    t, h, w, c = frames.shape
    if (h, w) == (height, width):
        return frames.copy()
    if h == 0 or w == 0:
        raise ValueError(f"cannot resize empty frames of shape {frames.shape}")
    scale = max(height / h, width / w)
    crop_h, crop_w = height / scale, width / scale
    left, top = (w - crop_w) / 2.0, (h - crop_h) / 2.0
    box = (left, top, left + crop_w, top + crop_h)
    out = np.empty((t, height, width, c), dtype=np.uint8)
    for i in range(t):
        plane = frames[i, :, :, 0] if c == 1 else frames[i]
        image = Image.fromarray(np.ascontiguousarray(plane))
        resized = np.asarray(image.resize((width, height), Image.Resampling.BICUBIC, box=box))
        out[i] = resized[..., None] if c == 1 else resized
    return out


def paste_center_crop(frames: np.ndarray, background: np.ndarray) -> np.ndarray:
    """Undo :func:`resize_center_crop`: scale ``frames`` back onto ``background``'s geometry.

    ``frames`` ``(T, h, w, 3)`` stand for ``resize_center_crop(background, h, w)`` (edited, say);
    they are scaled back to the region of ``background`` ``(T, H, W, 3)`` that crop covered and
    pasted there, so every pixel lands where it came from. The margins the crop dropped (none when
    the aspect ratios match) keep ``background``'s pixels. Returns a new ``(T, H, W, 3)`` array.
    """
    if frames.ndim != 4 or background.ndim != 4 or len(frames) != len(background):
        raise ValueError(
            f"frames {frames.shape} and background {background.shape} must be (T, H, W, C) of one length"
        )
    _, height, width, _ = frames.shape
    _, big_h, big_w, _ = background.shape
    scale = max(height / big_h, width / big_w)
    region_h, region_w = min(big_h, round(height / scale)), min(big_w, round(width / scale))
    top, left = (big_h - region_h) // 2, (big_w - region_w) // 2
    out = background.copy()
    # The region has the frames' aspect to within a pixel, so this is a plain resize.
    out[:, top : top + region_h, left : left + region_w] = resize_center_crop(frames, region_h, region_w)
    return out


# --------------------------------------------------------------------------------------------
# Encode


def _check_video_frames(frames: np.ndarray) -> None:
    if not isinstance(frames, np.ndarray):
        raise ValueError(f"frames must be a numpy array, got {type(frames).__name__}")
    if frames.dtype != np.uint8:
        raise ValueError(f"frames must be uint8, got {frames.dtype}")
    if frames.ndim != 4 or frames.shape[-1] != 3:
        raise ValueError(f"frames must be shaped (T, H, W, 3) RGB, got {frames.shape}")
    t, h, w, _ = frames.shape
    if t < 1 or h < 2 or w < 2:
        raise ValueError(f"frames must hold at least one frame of at least 2x2 pixels, got {frames.shape}")
    if h % 2 or w % 2:
        raise ValueError(
            f"H.264 yuv420p needs an even height and width, got {h}x{w}: crop or pad the frames first "
            "(padding is not done here because the decoded video would then differ in size)"
        )


def encode_mp4(
    frames: np.ndarray,
    fps: float,
    crf: int = 18,
    preset: str = "fast",
    *,
    gop: int | None = None,
    threads: int | None = 1,
) -> bytes:
    """Encode THWC uint8 RGB frames as an H.264 (libx264, yuv420p) mp4, in memory.

    Height and width must be even (yuv420p halves the chroma planes); odd sizes raise
    ``ValueError`` rather than being padded, so decoding the result returns exactly the input's
    size. ``gop`` sets the maximum keyframe interval in frames (libx264's default is 250); a
    shorter one makes seeking cheaper. ``threads`` is libx264's thread count: the default 1 makes
    the output bytes reproducible (frame threads do not); None lets libx264 use every core.
    The index (moov) is written at the end: ``+faststart``
    needs a second pass over a real file and fails on an in-memory buffer.

    Raises:
        ValueError: for a non-uint8 / wrongly shaped / odd-sized array, or a bad fps/crf/gop.
    """
    _check_video_frames(frames)
    if not (isinstance(fps, numbers.Real) and math.isfinite(fps) and fps > 0):
        raise ValueError(f"fps must be a positive number, got {fps!r}")
    if not (isinstance(crf, int | np.integer) and 0 <= crf <= 51):
        raise ValueError(f"crf must be an int in [0, 51], got {crf!r}")
    if gop is not None and not (isinstance(gop, int | np.integer) and gop >= 1):
        raise ValueError(f"gop must be a positive int or None, got {gop!r}")
    # NTSC rates (30000/1001) survive as exact fractions; anything else to within 1/1001.
    rate = Fraction(fps).limit_denominator(1001)
    if rate <= 0:
        raise ValueError(f"fps {fps!r} is too small to encode")
    _, height, width, _ = frames.shape
    buffer = io.BytesIO()
    with av.open(buffer, mode="w", format="mp4") as container:
        stream = container.add_stream("libx264", rate=rate)
        stream.width, stream.height = width, height
        stream.pix_fmt = "yuv420p"
        stream.options = {"crf": str(int(crf)), "preset": preset}
        if gop is not None:
            stream.codec_context.gop_size = int(gop)
        if threads:
            # libx264's frame threads make output bytes vary run to run; one thread is
            # reproducible (same frames -> same mp4) and fits a 1-CPU worker budget.
            stream.codec_context.thread_count = int(threads)
        time_base = 1 / rate
        for index, rgb in enumerate(frames):
            frame = av.VideoFrame.from_ndarray(np.ascontiguousarray(rgb), format="rgb24")
            frame.pts = index
            frame.time_base = time_base
            container.mux(stream.encode(frame))
        container.mux(stream.encode(None))
    return buffer.getvalue()


# --------------------------------------------------------------------------------------------
# Images

_IMAGE_FORMATS = {"png": "PNG", "jpg": "JPEG", "jpeg": "JPEG", "webp": "WEBP"}


def _image_to_rgb(image: Image.Image) -> np.ndarray:
    """Any PIL mode to HWC uint8 RGB; transparency is composited over white."""
    if image.mode in ("I", "I;16", "I;16B", "I;16L", "I;16N"):
        # 16-bit grayscale (PNG): keep the high byte instead of letting PIL clip to 255.
        gray = (np.asarray(image).astype(np.uint32) >> 8).clip(0, 255).astype(np.uint8)
        return np.repeat(gray[..., None], 3, axis=2)
    if image.mode == "F":
        gray = np.asarray(image).clip(0, 255).astype(np.uint8)
        return np.repeat(gray[..., None], 3, axis=2)
    if image.mode == "P" and "transparency" in image.info:
        image = image.convert("RGBA")
    if image.mode in ("RGBA", "LA", "PA", "RGBa", "La"):
        rgba = image.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        image = Image.alpha_composite(background, rgba)
    return np.asarray(image.convert("RGB"))


def read_image(
    source: str | bytes, uri: str | None = None, size: tuple[int, int] | None = None
) -> np.ndarray:
    """Read an image (png / jpg / webp, or any still format PIL knows) as HWC uint8 RGB.

    EXIF orientation is applied, transparency is composited over white and, for animated
    images, the first frame is used. ``size=(height, width)`` resizes with
    :func:`resize_center_crop`.

    Raises:
        VideoDecodeError: "missing", "empty", or "bad_image" (not an image, truncated,
            corrupt, or a decompression bomb).
    """
    _check_size(size)
    name = _source_name(source, uri)
    handle = _open_handle(source, name)
    try:
        with Image.open(handle) as image:
            image.load()
            upright = ImageOps.exif_transpose(image)
            rgb = _image_to_rgb(upright)
    except (Image.UnidentifiedImageError, Image.DecompressionBombError) as exc:
        raise VideoDecodeError(name, "bad_image", f"{type(exc).__name__}: {exc}") from exc
    except storage.StorageUnavailable:
        raise
    except (*_IO_ERRORS, SyntaxError, ValueError, struct.error) as exc:
        # PIL reports truncated or corrupt data with OSError, SyntaxError or ValueError.
        raise VideoDecodeError(
            name, "bad_image", f"cannot decode image ({type(exc).__name__}: {exc})"
        ) from exc
    finally:
        handle.close()
    if size is not None:
        rgb = resize_center_crop(rgb, int(size[0]), int(size[1]))
    return np.ascontiguousarray(rgb)


def encode_image(frame: np.ndarray, format: str = "png", *, quality: int = 95) -> bytes:
    """Encode an HWC uint8 RGB (or HW gray, or RGBA for png/webp) frame as png, jpg or webp.

    ``quality`` applies to jpg and webp (lossy); png is lossless.
    """
    pil_format = _IMAGE_FORMATS.get(str(format).lower().lstrip("."))
    if pil_format is None:
        raise ValueError(f"unsupported image format {format!r}; use one of {sorted(_IMAGE_FORMATS)}")
    if not isinstance(frame, np.ndarray) or frame.dtype != np.uint8:
        raise ValueError("frame must be a uint8 numpy array")
    if frame.ndim == 3 and frame.shape[-1] == 1:
        frame = frame[..., 0]
    channels = 1 if frame.ndim == 2 else (frame.shape[-1] if frame.ndim == 3 else 0)
    if channels not in (1, 3, 4) or frame.shape[0] == 0 or frame.shape[1] == 0:
        raise ValueError(f"frame must be shaped (H, W), (H, W, 3) or (H, W, 4), got {frame.shape}")
    if channels == 4 and pil_format == "JPEG":
        raise ValueError("jpg has no alpha channel; pass an (H, W, 3) frame")
    image = Image.fromarray(np.ascontiguousarray(frame))
    buffer = io.BytesIO()
    options: dict = {}
    if pil_format in ("JPEG", "WEBP"):
        options["quality"] = int(quality)
    image.save(buffer, format=pil_format, **options)
    return buffer.getvalue()
