"""Shared pieces of the data-prep benchmarks: timing a job on a fresh local Ray, and the floor.

The floor of a data-prep job is the decode and encode work it cannot avoid, done with bare PyAV
and nothing around it (no probing, no pretext/alignment logic, no shard writing, no Ray), one
process per core.
"""

from __future__ import annotations

import io
import multiprocessing as mp
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from fractions import Fraction

import av
import numpy as np


def timed_run(run: Callable, cfg, cpus: int):
    """``run(cfg, overwrite=True)`` on a fresh local Ray with ``cpus`` CPUs: (seconds, its result)."""
    import ray

    ray.init(num_cpus=cpus, include_dashboard=False, log_to_driver=False, configure_logging=False)
    try:
        import ray.data

        ray.data.DataContext.get_current().enable_progress_bars = False
        started = time.perf_counter()
        result = run(cfg, overwrite=True)
        return time.perf_counter() - started, result
    finally:
        ray.shutdown()


def bare_decode(path: str, start_s: float, num_frames: int, fps: float, height: int, width: int) -> int:
    """Decode the frames a clip needs with PyAV, scaled to cover (height, width) and cropped."""
    with av.open(path) as container:
        stream = container.streams.video[0]
        stream.thread_type = "AUTO"
        stream.codec_context.thread_count = 1
        scale = max(height / stream.codec_context.height, width / stream.codec_context.width)
        cover_w = max(width, round(stream.codec_context.width * scale))
        cover_h = max(height, round(stream.codec_context.height * scale))
        top, left = (cover_h - height) // 2, (cover_w - width) // 2
        end_s = start_s + num_frames / fps
        container.seek(int(start_s / stream.time_base), stream=stream, backward=True)
        kept = 0
        for frame in container.decode(stream):
            t = float(frame.pts * stream.time_base)
            if t >= end_s:
                break
            if t + 1e-6 < start_s:
                continue
            rgb = frame.reformat(width=cover_w, height=cover_h, format="rgb24").to_ndarray()
            np.ascontiguousarray(rgb[top : top + height, left : left + width])
            kept += 1
        return kept


def bare_encode(frames: np.ndarray, fps: float) -> int:
    """libx264 (crf 18, preset fast, 1 thread, yuv420p) into memory, as the job encodes."""
    buffer = io.BytesIO()
    with av.open(buffer, "w", format="mp4") as container:
        stream = container.add_stream("libx264", rate=Fraction(fps).limit_denominator(1001))
        stream.width, stream.height, stream.pix_fmt = frames.shape[2], frames.shape[1], "yuv420p"
        stream.options = {"crf": "18", "preset": "fast"}
        stream.codec_context.thread_count = 1
        for i, rgb in enumerate(frames):
            frame = av.VideoFrame.from_ndarray(rgb, format="rgb24")
            frame.pts = i
            container.mux(stream.encode(frame))
        container.mux(stream.encode(None))
    return len(buffer.getvalue())


@dataclass
class FloorItem:
    """One sample's unavoidable work: the clips it decodes and the arrays it encodes."""

    # (path, start_s, num_frames, fps, height, width) per decoded clip.
    decodes: list[tuple] = field(default_factory=list)
    outputs: list[np.ndarray] = field(default_factory=list)
    fps: float = 16.0


def floor_item(item: FloorItem) -> int:
    for decode in item.decodes:
        bare_decode(*decode)
    for frames in item.outputs:
        bare_encode(frames, item.fps)
    return len(item.outputs)


def floor_time(items: list[FloorItem], processes: int) -> float:
    """Seconds for ``processes`` worker processes to do every item's work (workers warmed first)."""
    with mp.get_context("spawn").Pool(processes) as pool:
        pool.map(floor_item, items[:processes])
        started = time.perf_counter()
        pool.map(floor_item, items, chunksize=1)
        return time.perf_counter() - started
