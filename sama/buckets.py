"""Aspect-ratio buckets and frame-count rules shared by the data-prep jobs, the trainer and editing.

SAMA trains at 480p: the paper names the aspect-ratio buckets 1:2, 2:3, 3:4, 1:1, 4:3, 3:2, 2:1
(width:height); the authors' released code enumerates 15 buckets of the same area with sides
multiples of 32 and aspects 0.5 to 2 (:class:`BucketConfig` has both, the release's by default).
Clips have 4k+1 frames (the Wan VAE compresses time 4x after the first frame). A bucket keeps the
pixel area of the base resolution (480x832, Wan's 480p), so every bucket costs about the same number
of tokens.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal


@dataclass(frozen=True)
class Bucket:
    """One training resolution. ``name`` is safe in keys and file names (no dots)."""

    height: int
    width: int

    @property
    def name(self) -> str:
        return f"{self.height}x{self.width}"

    @property
    def aspect(self) -> float:
        return self.width / self.height

    @classmethod
    def parse(cls, name: str) -> Bucket:
        try:
            height, width = (int(part) for part in name.split("x"))
        except ValueError:
            raise ValueError(f"bucket name {name!r} must look like HEIGHTxWIDTH, e.g. 480x832") from None
        return cls(height, width)


BUCKET_PRESETS = ("release", "paper")
# Width:height ratios of SAMA.md's 480p buckets (the paper's list).
PAPER_ASPECT_RATIOS = ("1:2", "2:3", "3:4", "1:1", "4:3", "3:2", "2:1")


@dataclass
class BucketConfig:
    """How clips are sized: the pixel area every bucket keeps, and which shapes exist.

    Two presets:

    * ``"release"`` (default): the authors' released enumeration. Every height that is a multiple
      of ``multiple`` from ``floor(sqrt(area / max_aspect))`` to ``ceil(sqrt(area / min_aspect))``
      (rounded to ``multiple``), its width ``area / height`` rounded to ``multiple``, kept when the
      aspect ``width / height`` lies in ``[min_aspect, max_aspect]``. At 480x832 that is 15 buckets
      from 896x448 to 448x896, 480x832 among them, so a 16:9 source loses only the sliver between
      1.78 and 1.73 instead of being cropped to 2:1. The nearest bucket is the one whose aspect is
      closest in absolute difference, as the release picks it.
    * ``"paper"``: one bucket per ratio of ``aspect_ratios`` (default SAMA.md's seven, 1:2 to 2:1),
      nearest in log-aspect.
    """

    preset: Literal["release", "paper"] = "release"
    base_height: int = 480
    base_width: int = 832
    # "paper" preset only; None means SAMA.md's seven ratios.
    aspect_ratios: list[str] | None = None
    # "release" preset only: the aspect (width / height) range of the enumeration.
    min_aspect: float = 0.5
    max_aspect: float = 2.0
    # Sides are multiples of this (the VAE's 8x spatial compression times the 2x2 patch, with margin).
    multiple: int = 32

    def validate(self) -> None:
        if self.preset not in BUCKET_PRESETS:
            raise ValueError(f"buckets.preset must be one of {BUCKET_PRESETS}, got {self.preset!r}")
        if self.base_height <= 0 or self.base_width <= 0:
            raise ValueError("buckets.base_height and buckets.base_width must be positive")
        if self.multiple <= 0 or self.multiple % 2:
            raise ValueError("buckets.multiple must be a positive even number")
        if self.preset == "release":
            if self.aspect_ratios is not None:
                raise ValueError(
                    "buckets.aspect_ratios lists the 'paper' preset's ratios; set buckets.preset=\"paper\" "
                    "to use them (the 'release' preset enumerates every shape between "
                    "buckets.min_aspect and buckets.max_aspect)"
                )
            if not 0 < self.min_aspect <= self.max_aspect:
                raise ValueError("buckets needs 0 < min_aspect <= max_aspect")
        else:
            if self.aspect_ratios is not None and not self.aspect_ratios:
                raise ValueError("buckets.aspect_ratios must name at least one ratio")
            for ratio in self.ratios():
                parse_ratio(ratio)

    def ratios(self) -> list[str]:
        """The ``"paper"`` preset's width:height ratios."""
        return list(PAPER_ASPECT_RATIOS if self.aspect_ratios is None else self.aspect_ratios)

    def buckets(self) -> list[Bucket]:
        """The buckets, ordered from tallest to widest."""
        self.validate()
        area = self.base_height * self.base_width
        if self.preset == "release":
            return self._release_buckets(area)
        found = []
        for ratio in sorted(self.ratios(), key=parse_ratio):
            aspect = parse_ratio(ratio)
            height = _round_to(math.sqrt(area / aspect), self.multiple)
            width = _round_to(math.sqrt(area * aspect), self.multiple)
            found.append(Bucket(height, width))
        return found

    def _release_buckets(self, area: int) -> list[Bucket]:
        step = self.multiple
        lowest = max(step, math.floor(math.sqrt(area / self.max_aspect) / step) * step)
        highest = math.ceil(math.sqrt(area / self.min_aspect) / step) * step
        found = []
        for height in range(lowest, highest + 1, step):
            width = _round_to(area / height, step)
            if self.min_aspect <= width / height <= self.max_aspect:
                found.append(Bucket(height, width))
        if not found:
            raise ValueError(
                f"no bucket of area {self.base_height}x{self.base_width} with sides multiple of {step} "
                f"lies between aspects {self.min_aspect} and {self.max_aspect}"
            )
        # Tallest (smallest aspect) first, as the paper preset orders them.
        return sorted(found, key=lambda b: b.aspect)

    def nearest(self, height: int, width: int) -> Bucket:
        """The bucket whose aspect ratio is closest to ``width / height`` (see the presets)."""
        if height <= 0 or width <= 0:
            raise ValueError(f"cannot bucket a frame of size {height}x{width}")
        if self.preset == "release":
            aspect = width / height
            return min(self.buckets(), key=lambda b: abs(b.aspect - aspect))
        log_aspect = math.log(width / height)
        return min(self.buckets(), key=lambda b: abs(math.log(b.aspect) - log_aspect))


def parse_ratio(ratio: str) -> float:
    """``"4:3"`` -> 1.333 (width over height)."""
    try:
        w, h = (float(part) for part in ratio.split(":"))
    except ValueError:
        raise ValueError(f"aspect ratio {ratio!r} must look like W:H, e.g. 4:3") from None
    if w <= 0 or h <= 0:
        raise ValueError(f"aspect ratio {ratio!r} must be positive")
    return w / h


def _round_to(value: float, multiple: int) -> int:
    return max(multiple, round(value / multiple) * multiple)


def is_4k_plus_1(num_frames: int) -> bool:
    return num_frames >= 1 and (num_frames - 1) % 4 == 0


def floor_4k_plus_1(num_frames: int) -> int:
    """The largest 4k+1 not above ``num_frames`` (0 when there is not even one frame)."""
    if num_frames < 1:
        return 0
    return ((num_frames - 1) // 4) * 4 + 1


def ceil_4k_plus_1(num_frames: int) -> int:
    """The smallest 4k+1 not below ``num_frames``."""
    if num_frames <= 1:
        return 1
    return ((num_frames - 2) // 4 + 1) * 4 + 1
