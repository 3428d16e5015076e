"""Motion-alignment pretext tasks (SAMA stage 0): pure functions on THWC uint8 clips.

Each task perturbs the *source* only; the target is always the original clip. The task is named to
the model by a prefix on the caption. Every function returns the perturbed clip and the parameters
that produced it (recorded in the sample metadata), and is deterministic given its generator.

| task           | perturbation                                               | prefix |
|----------------|------------------------------------------------------------|--------|
| ``t2v``        | none: a plain text-to-video sample without source          | -      |
| ``cube_inpaint`` | one contiguous temporal block of 30% of the frames masked, never frame 0 | complete |
| ``speed``      | every 2nd frame, trimmed to 4k+1 frames (2x playback speed) | restore speed |
| ``tube_shuffle`` | 2x2x2 spatio-temporal tubes permuted (never the identity) | restore order |

Drawing and applying are separate: a task draws its parameters from the generator, then one
perturbation function per task builds the source from the target and those parameters. The same
function rebuilds the source wherever a sample is read (:func:`derive_source`), so shards may store
the target and the parameters only, and the rebuilt source is bit-exactly the one
:func:`apply_task` returns for the same target frames.
"""

from __future__ import annotations

import itertools
import uuid
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from sama.buckets import floor_4k_plus_1

TASK_NONE = "t2v"
TASK_CUBE = "cube_inpaint"
TASK_SPEED = "speed"
TASK_TUBE = "tube_shuffle"
PRETEXT_TASKS = (TASK_NONE, TASK_CUBE, TASK_SPEED, TASK_TUBE)

PREFIXES = {
    TASK_NONE: "",
    TASK_CUBE: "[Complete the missing regions in the video.]",
    TASK_SPEED: "[Restore the video to normal playback speed.]",
    TASK_TUBE: "[Restore the correct spatio-temporal order of the video segments.]",
}

_SEED_NAMESPACE = uuid.UUID("0b9a4f0e-8a39-5d63-9f3e-7c2f3b1de5a4")


@dataclass
class PretextConfig:
    """Task mix and parameters (SAMA.md defaults; the spatial extent and tube layout are our choices)."""

    # Mix none : cube : speed : tube = 1 : 2 : 3 : 4 on raw video data.
    weights: dict[str, float] = field(
        default_factory=lambda: {TASK_NONE: 1.0, TASK_CUBE: 2.0, TASK_SPEED: 3.0, TASK_TUBE: 4.0}
    )
    # Fraction of frames in the masked temporal block.
    mask_ratio: float = 0.3
    # Fraction of height and width the mask covers (1.0 = whole frames, as the authors' code).
    mask_spatial_extent: float = 1.0
    # Value written into masked pixels.
    mask_value: int = 0
    speed_factor: int = 2
    # Tubes are cut from frames 1.. when true: the Wan VAE encodes frame 0 on its own, so a clip of
    # 4k+1 frames has 4k frames that split into two equal halves aligned with latent frames.
    tube_keep_first_frame: bool = True
    # Store the perturbed source in the shards too (two H.264 encodes per sample). Off: only the
    # target and the parameters are stored and readers rebuild the source (``derive_source``),
    # which halves the encoding work and bytes and keeps the perturbation's seams sharp.
    materialize_source: bool = False

    def validate(self) -> None:
        unknown = set(self.weights) - set(PRETEXT_TASKS)
        if unknown:
            raise ValueError(
                f"pretext.weights: unknown task(s) {sorted(unknown)}; known: {list(PRETEXT_TASKS)}"
            )
        if any(w < 0 for w in self.weights.values()) or sum(self.weights.values()) <= 0:
            raise ValueError("pretext.weights must be non-negative with a positive sum")
        if not 0 < self.mask_ratio < 1:
            raise ValueError("pretext.mask_ratio must be in (0, 1)")
        if not 0 < self.mask_spatial_extent <= 1:
            raise ValueError("pretext.mask_spatial_extent must be in (0, 1]")
        if not 0 <= self.mask_value <= 255:
            raise ValueError(f"pretext.mask_value must be in 0..255 (a uint8 pixel), got {self.mask_value}")
        if self.speed_factor < 2:
            raise ValueError("pretext.speed_factor must be >= 2")


def task_rng(seed: int, clip_id: str) -> np.random.Generator:
    """The generator for one clip: a function of the job seed and the clip id only."""
    digest = uuid.uuid5(_SEED_NAMESPACE, f"{seed}|{clip_id}").int
    return np.random.default_rng(digest & ((1 << 128) - 1))


def choose_task(rng: np.random.Generator, weights: dict[str, float]) -> str:
    """Draw a task by the mix weights (tasks in the fixed order of PRETEXT_TASKS)."""
    tasks = [t for t in PRETEXT_TASKS if weights.get(t, 0) > 0]
    probs = np.array([weights[t] for t in tasks], dtype=np.float64)
    return tasks[int(rng.choice(len(tasks), p=probs / probs.sum()))]


def instruction_for(task: str, caption: str) -> str:
    """The task prefix followed by the caption (the caption alone for t2v)."""
    prefix = PREFIXES[task]
    caption = caption.strip()
    if not prefix:
        return caption
    return f"{prefix} {caption}" if caption else prefix


def _check_clip(frames: np.ndarray) -> None:
    if frames.ndim != 4 or frames.shape[-1] != 3 or frames.dtype != np.uint8:
        raise ValueError(f"expected a THWC uint8 RGB clip, got shape {frames.shape} dtype {frames.dtype}")


def cube_inpaint(frames: np.ndarray, rng: np.random.Generator, cfg: PretextConfig) -> tuple[np.ndarray, dict]:
    """Mask one contiguous block of ``round(mask_ratio * T)`` frames, never frame 0.

    Draws the block and the box (:func:`mask_cube` applies them); returns the masked clip and
    ``{"mask_start", "mask_length", "mask_box": [top, left, height, width], "mask_value"}``.
    """
    _check_clip(frames)
    params = _cube_params(frames.shape, rng, cfg)
    return derive_source(TASK_CUBE, frames, params), params


def _cube_params(shape: tuple[int, ...], rng: np.random.Generator, cfg: PretextConfig) -> dict:
    t, h, w = shape[:3]
    length = max(1, int(round(cfg.mask_ratio * t)))
    if t < 2 or length > t - 1:
        raise ValueError(f"cube inpainting needs a clip of at least 2 frames, got {t}")
    start = int(rng.integers(1, t - length + 1))  # frame 0 always stays visible
    mh = max(1, int(round(cfg.mask_spatial_extent * h)))
    mw = max(1, int(round(cfg.mask_spatial_extent * w)))
    top = int(rng.integers(0, h - mh + 1))
    left = int(rng.integers(0, w - mw + 1))
    return {
        "mask_start": start,
        "mask_length": length,
        "mask_box": [top, left, mh, mw],
        "mask_value": int(cfg.mask_value),
    }


def mask_cube(
    frames: np.ndarray, mask_start: int, mask_length: int, mask_box: list[int], mask_value: int = 0
) -> np.ndarray:
    """A copy of ``frames`` with ``mask_value`` written into frames ``mask_start`` to
    ``mask_start + mask_length - 1`` inside ``mask_box`` = ``[top, left, height, width]``."""
    _check_clip(frames)
    t, h, w, _ = frames.shape
    if len(mask_box) != 4:
        raise ValueError(f"cube_inpaint: mask_box must be [top, left, height, width], got {list(mask_box)}")
    top, left, mh, mw = (int(v) for v in mask_box)
    if mask_start < 0 or mask_length < 1 or mask_start + mask_length > t:
        raise ValueError(
            f"cube_inpaint: mask frames {mask_start}..{mask_start + mask_length - 1} "
            f"do not fit a clip of {t} frames"
        )
    if min(top, left) < 0 or min(mh, mw) < 1 or top + mh > h or left + mw > w:
        raise ValueError(f"cube_inpaint: mask_box {list(mask_box)} does not fit frames of {h}x{w}")
    if not 0 <= mask_value <= 255:
        raise ValueError(f"cube_inpaint: mask_value must be in 0..255, got {mask_value}")
    out = frames.copy()
    out[mask_start : mask_start + mask_length, top : top + mh, left : left + mw] = mask_value
    return out


def speed_up(frames: np.ndarray, cfg: PretextConfig) -> tuple[np.ndarray, dict]:
    """Every ``speed_factor``-th frame, trimmed to 4k+1 frames (:func:`subsample_frames`)."""
    _check_clip(frames)
    params = _speed_params(frames.shape, cfg)
    return derive_source(TASK_SPEED, frames, params), params


def _speed_params(shape: tuple[int, ...], cfg: PretextConfig) -> dict:
    keep = floor_4k_plus_1(len(range(0, shape[0], cfg.speed_factor)))
    if keep < 1:
        raise ValueError("speed perturbation produced no frames")
    return {"speed_factor": cfg.speed_factor, "source_frames": keep}


def subsample_frames(frames: np.ndarray, speed_factor: int, source_frames: int) -> np.ndarray:
    """The first ``source_frames`` of every ``speed_factor``-th frame, as a contiguous array."""
    _check_clip(frames)
    if speed_factor < 1:
        raise ValueError(f"speed: speed_factor must be >= 1, got {speed_factor}")
    fast = frames[::speed_factor]
    if not 1 <= source_frames <= len(fast):
        raise ValueError(
            f"speed: {source_frames} source frames at speed_factor {speed_factor} need a clip of at "
            f"least {(source_frames - 1) * speed_factor + 1} frames, got {len(frames)}"
        )
    return np.ascontiguousarray(fast[:source_frames])


def _tube_slices(t0: int, t: int, h: int, w: int) -> list[tuple[slice, slice, slice]]:
    """The 8 tubes in (time, row, column) order: index = 4*ti + 2*yi + xi."""
    ht, hh, hw = (t - t0) // 2, h // 2, w // 2
    return [
        (
            slice(t0 + ti * ht, t0 + (ti + 1) * ht),
            slice(yi * hh, (yi + 1) * hh),
            slice(xi * hw, (xi + 1) * hw),
        )
        for ti, yi, xi in itertools.product(range(2), range(2), range(2))
    ]


def _check_tube_clip(t: int, h: int, w: int, t0: int) -> None:
    if (t - t0) < 2 or (t - t0) % 2 or h % 2 or w % 2:
        raise ValueError(
            "tube shuffle needs an even number of shuffled frames and even sides, "
            f"got {t - t0} frames of {h}x{w}"
        )


def tube_shuffle(frames: np.ndarray, rng: np.random.Generator, cfg: PretextConfig) -> tuple[np.ndarray, dict]:
    """Cut the clip into 2x2x2 equal tubes and move them by a random non-identity permutation.

    ``permutation[i] = j`` means the tube at position ``i`` of the output came from position ``j``
    of the original (:func:`shuffle_tubes`), so ``unshuffle_tubes`` restores the clip exactly.
    """
    _check_clip(frames)
    params = _tube_params(frames.shape, rng, cfg)
    return derive_source(TASK_TUBE, frames, params), params


def _tube_params(shape: tuple[int, ...], rng: np.random.Generator, cfg: PretextConfig) -> dict:
    t, h, w = shape[:3]
    t0 = 1 if cfg.tube_keep_first_frame else 0
    _check_tube_clip(t, h, w, t0)
    perm = np.arange(8)
    while np.array_equal(perm, np.arange(8)):
        perm = rng.permutation(8)
    return {"permutation": [int(p) for p in perm], "tube_first_frame": t0, "grid": [2, 2, 2]}


def _check_permutation(permutation: list[int]) -> None:
    if sorted(int(p) for p in permutation) != list(range(8)):
        raise ValueError(f"tube_shuffle: permutation must order the 8 tubes 0..7, got {list(permutation)}")


def shuffle_tubes(frames: np.ndarray, permutation: list[int], tube_first_frame: int = 1) -> np.ndarray:
    """Move the 2x2x2 tubes of frames ``tube_first_frame..`` by ``permutation`` (output tube ``i``
    is input tube ``permutation[i]``); the frames before ``tube_first_frame`` are kept."""
    _check_clip(frames)
    t, h, w, _ = frames.shape
    _check_tube_clip(t, h, w, tube_first_frame)
    _check_permutation(permutation)
    slices = _tube_slices(tube_first_frame, t, h, w)
    out = frames.copy()
    for dst, src in enumerate(permutation):
        out[slices[dst]] = frames[slices[int(src)]]
    return out


def unshuffle_tubes(frames: np.ndarray, permutation: list[int], tube_first_frame: int = 1) -> np.ndarray:
    """Invert :func:`tube_shuffle` given its recorded permutation."""
    t, h, w, _ = frames.shape
    _check_permutation(permutation)
    slices = _tube_slices(tube_first_frame, t, h, w)
    out = frames.copy()
    for dst, src in enumerate(permutation):
        out[slices[int(src)]] = frames[slices[dst]]
    return out


@dataclass
class PretextResult:
    task: str
    source: np.ndarray | None
    params: dict[str, Any]
    source_frames: int | None = None


# The tasks whose source is rebuilt from the target and the recorded parameters.
DERIVED_SOURCE_TASKS = (TASK_CUBE, TASK_SPEED, TASK_TUBE)

# Parameters each task's source needs (others, such as the tube grid, are informative).
_REQUIRED_PARAMS = {
    TASK_CUBE: ("mask_start", "mask_length", "mask_box"),
    TASK_SPEED: ("speed_factor", "source_frames"),
    TASK_TUBE: ("permutation", "tube_first_frame"),
}


def apply_task(
    task: str, frames: np.ndarray, rng: np.random.Generator, cfg: PretextConfig, with_source: bool = True
) -> PretextResult:
    """Draw a ``task`` sample's parameters for the target clip ``frames`` and build its source
    (:func:`derive_source`); ``with_source=False`` draws the same parameters and builds nothing
    (store-once shards keep the parameters, not the source). ``source_frames`` is the source's
    frame count either way (None: no source)."""
    if task == TASK_NONE:
        return PretextResult(task, None, {}, None)
    _check_clip(frames)
    if task == TASK_CUBE:
        params = _cube_params(frames.shape, rng, cfg)
    elif task == TASK_SPEED:
        params = _speed_params(frames.shape, cfg)
    elif task == TASK_TUBE:
        params = _tube_params(frames.shape, rng, cfg)
    else:
        raise ValueError(f"unknown pretext task {task!r}; known: {list(PRETEXT_TASKS)}")
    source = derive_source(task, frames, params) if with_source else None
    return PretextResult(task, source, params, int(params.get("source_frames", len(frames))))


def derive_source(task: str, target: np.ndarray, params: dict[str, Any]) -> np.ndarray | None:
    """Rebuild the source of a ``task`` sample from its target clip (THWC uint8) and the
    parameters :func:`apply_task` recorded (``SampleMeta.pretext``); None for ``t2v``.

    Bit-exactly the ``source`` :func:`apply_task` returned for the same target frames. Metadata
    without ``mask_value`` (written before it was recorded) means 0, the only value then used.
    Raises ValueError naming the task for an unknown task, missing parameters, or parameters that
    do not fit the target (a different frame count or size than the one they were drawn for).
    """
    if task == TASK_NONE:
        return None
    if task not in _REQUIRED_PARAMS:
        raise ValueError(
            f"cannot derive a source for task {task!r}: not a pretext task with a derived source "
            f"(known: {list(DERIVED_SOURCE_TASKS)})"
        )
    missing = [name for name in _REQUIRED_PARAMS[task] if name not in (params or {})]
    if missing:
        raise ValueError(
            f"cannot derive the {task} source: pretext parameters {missing} are missing "
            f"(got {sorted(params or {})})"
        )
    if task == TASK_CUBE:
        return mask_cube(
            target,
            int(params["mask_start"]),
            int(params["mask_length"]),
            list(params["mask_box"]),
            int(params.get("mask_value", 0)),
        )
    if task == TASK_SPEED:
        return subsample_frames(target, int(params["speed_factor"]), int(params["source_frames"]))
    grid = params.get("grid", [2, 2, 2])
    if list(grid) != [2, 2, 2]:
        raise ValueError(f"cannot derive the {task} source: only a 2x2x2 tube grid exists, got {grid}")
    return shuffle_tubes(target, list(params["permutation"]), int(params["tube_first_frame"]))
