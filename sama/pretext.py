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
    """Mask one contiguous block of ``round(mask_ratio * T)`` frames, never frame 0."""
    _check_clip(frames)
    t, h, w, _ = frames.shape
    length = max(1, int(round(cfg.mask_ratio * t)))
    if t < 2 or length > t - 1:
        raise ValueError(f"cube inpainting needs a clip of at least 2 frames, got {t}")
    start = int(rng.integers(1, t - length + 1))  # frame 0 always stays visible
    mh = max(1, int(round(cfg.mask_spatial_extent * h)))
    mw = max(1, int(round(cfg.mask_spatial_extent * w)))
    top = int(rng.integers(0, h - mh + 1))
    left = int(rng.integers(0, w - mw + 1))
    out = frames.copy()
    out[start : start + length, top : top + mh, left : left + mw] = cfg.mask_value
    params = {"mask_start": start, "mask_length": length, "mask_box": [top, left, mh, mw]}
    return out, params


def speed_up(frames: np.ndarray, cfg: PretextConfig) -> tuple[np.ndarray, dict]:
    """Every ``speed_factor``-th frame, trimmed to 4k+1 frames."""
    _check_clip(frames)
    fast = frames[:: cfg.speed_factor]
    keep = floor_4k_plus_1(len(fast))
    if keep < 1:
        raise ValueError("speed perturbation produced no frames")
    return np.ascontiguousarray(fast[:keep]), {"speed_factor": cfg.speed_factor, "source_frames": keep}


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


def tube_shuffle(frames: np.ndarray, rng: np.random.Generator, cfg: PretextConfig) -> tuple[np.ndarray, dict]:
    """Cut the clip into 2x2x2 equal tubes and move them by a random non-identity permutation.

    ``permutation[i] = j`` means the tube at position ``i`` of the output came from position ``j``
    of the original, so ``unshuffle_tubes`` restores the clip exactly.
    """
    _check_clip(frames)
    t, h, w, _ = frames.shape
    t0 = 1 if cfg.tube_keep_first_frame else 0
    if (t - t0) < 2 or (t - t0) % 2 or h % 2 or w % 2:
        raise ValueError(
            "tube shuffle needs an even number of shuffled frames and even sides, "
            f"got {t - t0} frames of {h}x{w}"
        )
    perm = np.arange(8)
    while np.array_equal(perm, np.arange(8)):
        perm = rng.permutation(8)
    slices = _tube_slices(t0, t, h, w)
    out = frames.copy()
    for dst, src in enumerate(perm):
        out[slices[dst]] = frames[slices[int(src)]]
    return out, {"permutation": [int(p) for p in perm], "tube_first_frame": t0, "grid": [2, 2, 2]}


def unshuffle_tubes(frames: np.ndarray, permutation: list[int], tube_first_frame: int = 1) -> np.ndarray:
    """Invert :func:`tube_shuffle` given its recorded permutation."""
    t, h, w, _ = frames.shape
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


def apply_task(task: str, frames: np.ndarray, rng: np.random.Generator, cfg: PretextConfig) -> PretextResult:
    """Build the source of a ``task`` sample from the target clip ``frames``."""
    if task == TASK_NONE:
        return PretextResult(task, None, {})
    if task == TASK_CUBE:
        source, params = cube_inpaint(frames, rng, cfg)
    elif task == TASK_SPEED:
        source, params = speed_up(frames, cfg)
    elif task == TASK_TUBE:
        source, params = tube_shuffle(frames, rng, cfg)
    else:
        raise ValueError(f"unknown pretext task {task!r}; known: {list(PRETEXT_TASKS)}")
    return PretextResult(task, source, params)
