"""Aspect-ratio buckets and frame-count rules shared by the data-prep jobs and the trainer.

SAMA trains at 480p with the aspect-ratio buckets 1:2, 2:3, 3:4, 1:1, 4:3, 3:2, 2:1 (width:height),
sides multiples of 32, and clips of 4k+1 frames (the Wan VAE compresses time 4x after the first
frame). A bucket keeps the pixel area of the base resolution (480x832, Wan's 480p) at its own aspect
ratio, so every bucket costs about the same number of tokens.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field


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


@dataclass
class BucketConfig:
    """How clips are sized: the base resolution whose area every bucket keeps, and the ratios."""

    base_height: int = 480
    base_width: int = 832
    # Width:height ratios of SAMA.md's 480p buckets.
    aspect_ratios: list[str] = field(
        default_factory=lambda: ["1:2", "2:3", "3:4", "1:1", "4:3", "3:2", "2:1"]
    )
    # Sides are multiples of this (the VAE's 8x spatial compression times the 2x2 patch, with margin).
    multiple: int = 32

    def validate(self) -> None:
        if self.base_height <= 0 or self.base_width <= 0:
            raise ValueError("buckets.base_height and buckets.base_width must be positive")
        if self.multiple <= 0 or self.multiple % 2:
            raise ValueError("buckets.multiple must be a positive even number")
        if not self.aspect_ratios:
            raise ValueError("buckets.aspect_ratios must name at least one ratio")
        for ratio in self.aspect_ratios:
            parse_ratio(ratio)

    def buckets(self) -> list[Bucket]:
        """The buckets, one per aspect ratio, ordered from tallest to widest."""
        self.validate()
        area = self.base_height * self.base_width
        found = []
        for ratio in sorted(self.aspect_ratios, key=parse_ratio):
            aspect = parse_ratio(ratio)
            height = _round_to(math.sqrt(area / aspect), self.multiple)
            width = _round_to(math.sqrt(area * aspect), self.multiple)
            found.append(Bucket(height, width))
        return found

    def nearest(self, height: int, width: int) -> Bucket:
        """The bucket whose aspect ratio is closest (in log space) to ``width / height``."""
        if height <= 0 or width <= 0:
            raise ValueError(f"cannot bucket a frame of size {height}x{width}")
        aspect = math.log(width / height)
        return min(self.buckets(), key=lambda b: abs(math.log(b.aspect) - aspect))


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
