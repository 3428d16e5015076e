"""Shared pieces of the data-prep benchmarks: timing a job on a fresh local Ray, and the floor.

The floor of a data-prep job is the decode and encode work it cannot avoid, done with bare PyAV
and nothing around it (no probing, no pretext/alignment logic, no shard writing, no Ray), one
process per core.

Both the job and the floor run confined to as many cores as they are given (CPU affinity,
inherited by every process they start): "1 Ray CPU" on a bigger machine would otherwise run Ray's
own processes (driver, raylet, GCS, Ray Data's actors, worker start-up) on the idle cores for free,
and its per-core figures and the 1 -> N speed-up would not describe N cores.
"""

from __future__ import annotations

import contextlib
import io
import multiprocessing as mp
import os
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from fractions import Fraction

import av
import numpy as np


@contextlib.contextmanager
def on_cores(count: int) -> Iterator[None]:
    """Confine this process, and every process it starts meanwhile, to its first ``count`` cores."""
    if not hasattr(os, "sched_setaffinity"):  # not Linux: measure unconfined
        yield
        return
    allowed = sorted(os.sched_getaffinity(0))
    if count > len(allowed):
        raise ValueError(f"asked for {count} cores, this process may use {len(allowed)}")
    os.sched_setaffinity(0, allowed[:count])
    try:
        yield
    finally:
        os.sched_setaffinity(0, allowed)


def _import_modules(row: dict, modules: tuple[str, ...]) -> dict:
    import importlib

    for name in modules:
        importlib.import_module(name)
    return row


def warm_up(cpus: int, modules: tuple[str, ...]) -> float:
    """Seconds to start Ray Data on a fresh local Ray: its actors, and one worker per CPU with Ray
    Data and ``modules`` imported. The floor's worker pool is likewise warmed before its timing;
    a long job pays this once, a benchmark-sized one would mostly measure it."""
    import functools

    import ray.data

    started = time.perf_counter()
    dataset = ray.data.range(cpus, override_num_blocks=cpus)
    dataset.map(functools.partial(_import_modules, modules=modules), num_cpus=1).materialize()
    return time.perf_counter() - started


@dataclass
class TimedRun:
    seconds: float
    warm_up_seconds: float
    result: object


def timed_run(run: Callable, cfg, cpus: int) -> TimedRun:
    """``run(cfg, overwrite=True)`` on a fresh local Ray with ``cpus`` CPUs, confined to ``cpus``
    cores, its workers warmed first (see ``warm_up``; timed apart)."""
    import ray

    with on_cores(cpus):
        ray.init(num_cpus=cpus, include_dashboard=False, log_to_driver=False, configure_logging=False)
        try:
            import ray.data

            ray.data.DataContext.get_current().enable_progress_bars = False
            warm = warm_up(cpus, (run.__module__,))
            started = time.perf_counter()
            result = run(cfg, overwrite=True)
            return TimedRun(time.perf_counter() - started, warm, result)
        finally:
            ray.shutdown()


def bare_decode(path: str, start_s: float, num_frames: int, fps: float, height: int, width: int) -> int:
    """Decode the frames a clip needs with PyAV; convert to RGB, scaled to cover (height, width)
    and cropped, only those shown at the clip's ``num_frames`` times (``fps`` apart from
    ``start_s``), each once, as any resampling decoder must."""
    with av.open(path) as container:
        stream = container.streams.video[0]
        stream.thread_type = "AUTO"
        stream.codec_context.thread_count = 1
        coded_h, coded_w = stream.codec_context.height, stream.codec_context.width
        scale = max(height / coded_h, width / coded_w)
        cover_w = max(width, round(coded_w * scale))
        cover_h = max(height, round(coded_h * scale))
        interpolation = "AREA" if cover_w * cover_h < coded_w * coded_h else "BICUBIC"
        top, left = (cover_h - height) // 2, (cover_w - width) // 2
        times = [start_s + i / fps for i in range(num_frames)]
        container.seek(int(start_s / stream.time_base), stream=stream, backward=True)
        converted, shown, served = 0, None, 0

        def convert(frame) -> None:
            rgb = frame.reformat(cover_w, cover_h, "rgb24", interpolation=interpolation).to_ndarray()
            np.ascontiguousarray(rgb[top : top + height, left : left + width])

        for frame in container.decode(stream):
            t = float(frame.pts * stream.time_base)
            # ``shown`` is on screen until ``t``: it serves every clip time before that.
            due = served
            while due < num_frames and times[due] + 1e-6 < t:
                due += 1
            if due > served and shown is not None:
                convert(shown)
                converted += 1
            served, shown = due, frame
            if served >= num_frames:
                break
        if served < num_frames and shown is not None:
            convert(shown)
            converted += 1
        return converted


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
    # THWC uint8 arrays; ``floor_time`` hands them to its workers as paths of .npy files.
    outputs: list = field(default_factory=list)
    fps: float = 16.0


def floor_item(item: FloorItem) -> int:
    for decode in item.decodes:
        bare_decode(*decode)
    for frames in item.outputs:
        bare_encode(np.load(frames), item.fps)
    return len(item.outputs)


def floor_time(items: list[FloorItem], processes: int) -> float:
    """Seconds for ``processes`` worker processes on as many cores to do every item's work (workers
    warmed first). The arrays to encode reach the workers as files (read from the page cache), not
    pickled through a pipe, which would add work the job does not do."""
    with tempfile.TemporaryDirectory(prefix="sama-floor-") as spill:
        light = []
        for n, item in enumerate(items):
            paths = []
            for m, frames in enumerate(item.outputs):
                paths.append(os.path.join(spill, f"{n}-{m}.npy"))
                np.save(paths[-1], frames)
            light.append(FloorItem(item.decodes, paths, item.fps))
        with on_cores(processes), mp.get_context("spawn").Pool(processes) as pool:
            pool.map(floor_item, light[:processes])
            started = time.perf_counter()
            pool.map(floor_item, light, chunksize=1)
            return time.perf_counter() - started
