"""Deterministic procedural data: scenes, renders, edits and the files built from them.

Tests, benchmarks and the quickstart need videos, captions and edit pairs that exist without any
download, are identical on every machine, and have known content. This module draws them with
numpy: coloured, textured shapes moving over a panning background.

Layout is resolution independent. Positions and velocities are fractions of the frame's width and
height (per second), shape sizes and background patterns are fractions of the frame's shorter side,
and motion is a function of time, not of the frame index. Rendering one scene at another fps, or at
another size with the same aspect ratio, therefore shows the same content at the same instant.

An edit (:func:`make_edit`) returns a new :class:`Scene` and an instruction. Everything the edit
does not mention is kept field for field, so source and target renders are motion aligned: the
untouched pixels of the two are identical.

The writers (:func:`write_raw_videos`, :func:`write_edit_pairs`, :func:`write_bad_inputs`) go
through :mod:`sama.storage`, so they work on local paths and ``s3://`` URIs alike. They encode with
:mod:`sama.video`, which is imported only when a file is written.
"""

from __future__ import annotations

import csv
import dataclasses
import io
import json
import math
import random
import zlib
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass

import numpy as np

from sama import storage

__all__ = [
    "BACKGROUND_KINDS",
    "BAD_INPUT_KINDS",
    "CAPTION_POLICIES",
    "COLORS",
    "DEFAULT_SIZES",
    "EDIT_KINDS",
    "MANIFEST_COLUMNS",
    "MANIFEST_FORMATS",
    "MEDIA_KINDS",
    "SCORE_COLUMNS",
    "SHAPE_KINDS",
    "SHAPE_SIZES",
    "STYLES",
    "TEXTURES",
    "Background",
    "Scene",
    "Shape",
    "caption",
    "check_shape_sizes",
    "derive_seed",
    "make_edit",
    "random_scene",
    "recolor_twin",
    "render",
    "render_masks",
    "shape_center",
    "write_bad_inputs",
    "write_edit_pairs",
    "write_manifest",
    "write_raw_videos",
]

RGB = tuple[int, int, int]

SHAPE_KINDS = ("circle", "square", "triangle", "star", "diamond")
TEXTURES = ("solid", "stripes", "checker", "dots")
BACKGROUND_KINDS = ("gradient", "stripes", "checker", "noise")
# Shape diameters, as fractions of the frame's shorter side: random_scene's default range.
SHAPE_SIZES = (0.18, 0.36)
STYLES = ("natural", "posterize", "invert", "sketch", "warm", "cool", "grayscale")
EDIT_KINDS = ("recolor", "remove", "add", "background", "style")
CAPTION_POLICIES = ("mixed", "txt", "json", "none")
MEDIA_KINDS = ("video", "image", "mixed")
MANIFEST_FORMATS = ("csv", "jsonl", "parquet")
SCORE_COLUMNS = ("score_if", "score_vq", "score_cp", "score_mc")
MANIFEST_COLUMNS = ("source", "target", "instruction", "category", *SCORE_COLUMNS)

# Saturated colours for objects. Names are what captions and instructions say, so every name must
# be a plain colour word a text encoder knows.
COLORS: dict[str, RGB] = {
    "red": (220, 40, 40),
    "orange": (245, 140, 25),
    "yellow": (240, 215, 30),
    "green": (45, 170, 70),
    "blue": (40, 90, 225),
    "purple": (140, 65, 200),
    "pink": (240, 115, 185),
    "cyan": (35, 200, 215),
    "white": (242, 242, 242),
    "brown": (140, 85, 40),
}
# White muted towards grey is a dull grey, which a caption calling it "white" would misdescribe.
_BACKGROUND_COLORS = tuple(name for name in COLORS if name != "white")

# (height, width), all even (H.264 yuv420p needs it): 4:3, 7:4, 3:4, 2:1 and 1:1.
DEFAULT_SIZES: tuple[tuple[int, int], ...] = ((240, 320), (256, 448), (320, 240), (192, 384), (288, 288))

BAD_INPUT_KINDS = {
    "zero_byte.mp4": "empty",
    "truncated.mp4": "truncated",
    "not_a_video.mp4": "not_video",
    "audio_only.mp4": "no_video_stream",
    "one_frame.mp4": "too_short",
}

# How far each kind reaches from its centre, in units of the shape's radius (half its size). The
# bounce margins use it so that a shape, rotated or not, never leaves the frame.
_REACH = {"circle": 1.0, "square": 0.8 * math.sqrt(2.0), "diamond": 1.1, "triangle": 1.25, "star": 1.25}

_TEXTURE_WORDS = {"solid": "", "stripes": "striped", "checker": "checkered", "dots": "polka-dot"}
_STYLE_PHRASES = {
    "posterize": "in a flat, posterized style",
    "invert": "with inverted colors",
    "sketch": "as a pencil sketch",
    "warm": "with a warm, golden color grade",
    "cool": "with a cool, bluish tint",
    "grayscale": "in black and white",
}
_STYLE_INSTRUCTIONS = {
    "posterize": ("Give it a flat poster-art look with only a few colors.", "Posterize the colors."),
    "invert": ("Invert the colors.", "Make it look like a photographic negative."),
    "sketch": ("Make it look like a pencil sketch.", "Turn it into a black-and-white pencil drawing."),
    "warm": ("Apply a warm sunset color grade.", "Give it a warm, golden look."),
    "cool": ("Give it a cold, bluish tint.", "Apply a cool blue color grade."),
    "grayscale": ("Convert it to black and white.", "Remove all color and make it grayscale."),
}
_REMOVE_TEMPLATES = ("Remove the {obj}.", "Delete the {obj}.", "Take out the {obj}.", "Erase the {obj}.")
_DIRECTIONS = (
    "right",
    "down and to the right",
    "down",
    "down and to the left",
    "left",
    "up and to the left",
    "up",
    "up and to the right",
)


def _as_rgb(value: Iterable[int], what: str) -> RGB:
    rgb = tuple(int(c) for c in value)
    if len(rgb) != 3 or not all(0 <= c <= 255 for c in rgb):
        raise ValueError(f"{what} must be three integers in 0..255, got {value!r}")
    return rgb  # type: ignore[return-value]


def _as_pair(value: Iterable[float], what: str) -> tuple[float, float]:
    pair = tuple(float(v) for v in value)
    if len(pair) != 2 or not all(math.isfinite(v) for v in pair):
        raise ValueError(f"{what} must be two finite numbers, got {value!r}")
    return pair  # type: ignore[return-value]


def _palette_rgb(name: str, what: str) -> RGB:
    try:
        return COLORS[name]
    except KeyError:
        raise ValueError(f"{what} {name!r} is not in COLORS; pass an explicit rgb") from None


def _muted(rgb: RGB) -> RGB:
    # Backgrounds are the palette colour pulled towards mid grey, so saturated objects stand out.
    return tuple(int(round(0.5 * c + 0.5 * 110)) for c in rgb)  # type: ignore[return-value]


def _shade(rgb: RGB, factor: float = 0.62) -> RGB:
    return tuple(int(round(c * factor)) for c in rgb)  # type: ignore[return-value]


def _texture_tone(rgb: RGB) -> RGB:
    # The second tone of a textured object: darker for light colours, lighter for dark ones, so the
    # pattern is visible on every palette colour.
    luma = 0.299 * rgb[0] + 0.587 * rgb[1] + 0.114 * rgb[2]
    if luma >= 110:
        return _shade(rgb, 0.55)
    return tuple(int(round(0.5 * c + 0.5 * 255)) for c in rgb)  # type: ignore[return-value]


@dataclass(frozen=True)
class Shape:
    """One moving object.

    ``size`` is the diameter as a fraction of the frame's shorter side. ``position`` is the centre
    ``(x, y)`` at time 0 and ``velocity`` is in fractions of the frame's width and height per second
    (``y`` grows downwards). The centre bounces off the frame edges, keeping the whole shape inside.
    ``rotation`` is the angle at time 0 and ``spin`` the angular velocity, in degrees (per second).
    ``rgb`` defaults to ``COLORS[color]``; the texture's second tone is derived from it.
    """

    kind: str
    color: str
    size: float
    position: tuple[float, float]
    velocity: tuple[float, float]
    texture: str = "solid"
    rotation: float = 0.0
    spin: float = 0.0
    rgb: RGB | None = None

    def __post_init__(self) -> None:
        if self.kind not in SHAPE_KINDS:
            raise ValueError(f"unknown shape kind {self.kind!r}; expected one of {SHAPE_KINDS}")
        if self.texture not in TEXTURES:
            raise ValueError(f"unknown texture {self.texture!r}; expected one of {TEXTURES}")
        if not 0.0 < float(self.size) <= 1.0:
            raise ValueError(f"shape size must be in (0, 1], got {self.size!r}")
        rgb = _palette_rgb(self.color, "shape color") if self.rgb is None else self.rgb
        # Frozen: normalise through object.__setattr__ so equal shapes compare and hash equal.
        object.__setattr__(self, "size", float(self.size))
        object.__setattr__(self, "position", _as_pair(self.position, "position"))
        object.__setattr__(self, "velocity", _as_pair(self.velocity, "velocity"))
        object.__setattr__(self, "rotation", float(self.rotation))
        object.__setattr__(self, "spin", float(self.spin))
        object.__setattr__(self, "rgb", _as_rgb(rgb, "shape rgb"))


@dataclass(frozen=True)
class Background:
    """The backdrop: a periodic pattern that translates at ``drift``, so the camera appears to pan.

    ``color``/``color2`` are the two tones of the pattern (``color2`` defaults to a darker shade of
    ``color``); their ``rgb`` values default to muted palette colours. ``drift`` is the pattern's
    velocity in shorter-side lengths per second. ``angle`` (degrees) orients gradients and stripes,
    ``scale`` is the pattern period (the cell size for ``noise``) in shorter-side lengths, and
    ``seed`` fixes the ``noise`` pattern.
    """

    kind: str
    color: str
    color2: str | None = None
    drift: tuple[float, float] = (0.0, 0.0)
    angle: float = 0.0
    scale: float = 0.25
    seed: int = 0
    rgb: RGB | None = None
    rgb2: RGB | None = None

    def __post_init__(self) -> None:
        if self.kind not in BACKGROUND_KINDS:
            raise ValueError(f"unknown background kind {self.kind!r}; expected one of {BACKGROUND_KINDS}")
        if not float(self.scale) > 0.0:
            raise ValueError(f"background scale must be positive, got {self.scale!r}")
        rgb = _muted(_palette_rgb(self.color, "background color")) if self.rgb is None else self.rgb
        color2 = self.color if self.color2 is None else self.color2
        if self.rgb2 is not None:
            rgb2 = self.rgb2
        elif color2 == self.color:
            rgb2 = _shade(_as_rgb(rgb, "background rgb"))
        else:
            rgb2 = _muted(_palette_rgb(color2, "background color2"))
        object.__setattr__(self, "color2", color2)
        object.__setattr__(self, "drift", _as_pair(self.drift, "drift"))
        object.__setattr__(self, "angle", float(self.angle))
        object.__setattr__(self, "scale", float(self.scale))
        object.__setattr__(self, "seed", int(self.seed))
        object.__setattr__(self, "rgb", _as_rgb(rgb, "background rgb"))
        object.__setattr__(self, "rgb2", _as_rgb(rgb2, "background rgb2"))


@dataclass(frozen=True)
class Scene:
    """A background, shapes drawn in order (later ones on top) and a global ``style`` (see STYLES)."""

    background: Background
    shapes: tuple[Shape, ...] = ()
    style: str = "natural"

    def __post_init__(self) -> None:
        if self.style not in STYLES:
            raise ValueError(f"unknown style {self.style!r}; expected one of {STYLES}")
        object.__setattr__(self, "shapes", tuple(self.shapes))


# --------------------------------------------------------------------------------------------------
# Scene generation and captions


def derive_seed(seed: int, *keys: int | str) -> int:
    """A well-mixed, non-negative 63-bit seed for item ``keys`` of the run seeded by ``seed``."""
    if seed < 0:
        raise ValueError(f"seed must be non-negative, got {seed}")
    # crc32, not hash(): str hashing is salted per process, and seeds must match across workers.
    entropy = [int(seed)] + [k if isinstance(k, int) else zlib.crc32(k.encode()) for k in keys]
    return int(np.random.SeedSequence(entropy).generate_state(1, dtype=np.uint64)[0] >> np.uint64(1))


def _rng(seed: int) -> np.random.Generator:
    if seed < 0:
        raise ValueError(f"seed must be non-negative, got {seed}")
    return np.random.default_rng(seed)


def _pick(rng: np.random.Generator, options: Sequence):
    return options[int(rng.integers(len(options)))]


def _random_motion(rng: np.random.Generator) -> tuple[tuple[float, float], tuple[float, float]]:
    position = (float(rng.uniform(0.25, 0.75)), float(rng.uniform(0.25, 0.75)))
    speed = float(rng.uniform(0.08, 0.45))
    heading = float(rng.uniform(0.0, 2.0 * math.pi))
    return position, (speed * math.cos(heading), speed * math.sin(heading))


def check_shape_sizes(shape_sizes: tuple[float, float]) -> tuple[float, float]:
    """``(low, high)`` as floats; ``ValueError`` unless ``0 < low <= high <= 1``."""
    low, high = (float(v) for v in shape_sizes)
    if not 0.0 < low <= high <= 1.0:
        raise ValueError(f"shape_sizes must be (low, high) with 0 < low <= high <= 1, got {shape_sizes!r}")
    return low, high


def _random_shape(
    rng: np.random.Generator, color: str, kind: str | None = None, sizes: tuple[float, float] = SHAPE_SIZES
) -> Shape:
    kind = kind or _pick(rng, SHAPE_KINDS)
    position, velocity = _random_motion(rng)
    texture = _pick(rng, ("solid", "solid", "stripes", "checker", "dots"))
    spins = rng.random() < 0.4 and (kind != "circle" or texture != "solid")
    spin = float(rng.uniform(30.0, 120.0) * _pick(rng, (-1.0, 1.0))) if spins else 0.0
    return Shape(
        kind=kind,
        color=color,
        size=float(rng.uniform(*sizes)),
        position=position,
        velocity=velocity,
        texture=texture,
        rotation=float(rng.uniform(0.0, 360.0)) if kind != "circle" else 0.0,
        spin=spin,
    )


def _random_background(
    rng: np.random.Generator, exclude: Iterable[str] = (), drift: tuple[float, float] | None = None
) -> Background:
    excluded = set(exclude)
    kind = _pick(rng, BACKGROUND_KINDS)
    color = _pick(rng, [c for c in _BACKGROUND_COLORS if c not in excluded])
    if kind == "gradient" or rng.random() < 0.3:
        color2 = _pick(rng, [c for c in _BACKGROUND_COLORS if c not in excluded and c != color])
    else:
        color2 = color
    if drift is None:
        # A quarter of the clips are shot from a still camera.
        if rng.random() < 0.25:
            drift = (0.0, 0.0)
        else:
            speed, heading = float(rng.uniform(0.03, 0.12)), float(rng.uniform(0.0, 2.0 * math.pi))
            drift = (speed * math.cos(heading), speed * math.sin(heading))
    scale = {
        "gradient": rng.uniform(1.2, 2.2),
        "stripes": rng.uniform(0.12, 0.3),
        "checker": rng.uniform(0.15, 0.35),
        "noise": rng.uniform(0.2, 0.4),
    }[kind]
    return Background(
        kind=kind,
        color=color,
        color2=color2,
        drift=drift,
        angle=float(rng.uniform(0.0, 180.0)),
        scale=float(scale),
        seed=int(rng.integers(2**31)),
    )


def random_scene(seed: int, shape_sizes: tuple[float, float] = SHAPE_SIZES) -> Scene:
    """A scene drawn deterministically from ``seed``: 1-3 moving shapes over a background.

    Shapes have distinct colours, none shared with the background, so every object can be named
    unambiguously by its colour and kind. Their diameters are drawn uniformly from ``shape_sizes``
    (fractions of the frame's shorter side).
    """
    sizes = check_shape_sizes(shape_sizes)
    rng = _rng(seed)
    background = _random_background(rng)
    used = {background.color, background.color2}
    shapes = []
    for _ in range(int(rng.integers(1, 4))):
        color = _pick(rng, [c for c in COLORS if c not in used])
        used.add(color)
        shapes.append(_random_shape(rng, color, sizes=sizes))
    return Scene(background=background, shapes=tuple(shapes))


def _article(word: str) -> str:
    return "an" if word[:1] in "aeiou" else "a"


def _size_word(shape: Shape) -> str:
    if shape.size < 0.22:
        return "small"
    if shape.size > 0.31:
        return "large"
    return ""


def _noun_phrase(shape: Shape, *, size: bool = True, texture: bool = True) -> str:
    words = [_size_word(shape) if size else "", shape.color, _TEXTURE_WORDS[shape.texture] if texture else ""]
    return " ".join([w for w in words if w] + [shape.kind])


def _direction(vx: float, vy: float) -> str:
    octant = int(round(math.atan2(vy, vx) / (math.pi / 4))) % 8
    return _DIRECTIONS[octant]


def _motion_clause(shape: Shape) -> str:
    vx, vy = shape.velocity
    speed = math.hypot(vx, vy)
    if speed < 1e-6:
        verb, where = "sits", "still"
    else:
        verb = "drifts" if speed < 0.15 else "moves" if speed < 0.3 else "races"
        where = _direction(vx, vy)
    spin = " while spinning" if shape.spin and (shape.kind != "circle" or shape.texture != "solid") else ""
    return f"{verb} {where}{spin}"


def _background_phrase(background: Background) -> str:
    c1, c2 = background.color, background.color2
    pair = c1 if c2 == c1 else f"{c1} and {c2}"
    if background.kind == "gradient":
        return f"a {c1}-to-{c2} gradient background" if c2 != c1 else f"a {c1} gradient background"
    if background.kind == "stripes":
        return f"{_article(pair)} {pair} striped background"
    if background.kind == "checker":
        return f"{_article(pair)} {pair} checkered background"
    return f"a mottled {pair} background"


def _camera_phrase(background: Background) -> str:
    dx, dy = background.drift
    if math.hypot(dx, dy) < 0.01:
        return ""
    # The pattern moving one way reads as the camera moving the other.
    if abs(dx) >= abs(dy):
        return ", as the camera pans " + ("left" if dx > 0 else "right")
    return ", as the camera tilts " + ("up" if dy > 0 else "down")


def caption(scene: Scene) -> str:
    """A one- or two-sentence description of ``scene``: objects, their motion, background, style."""
    clauses = []
    for shape in scene.shapes:
        noun = _noun_phrase(shape)
        clauses.append(f"{_article(noun)} {noun} {_motion_clause(shape)}")
    background = _background_phrase(scene.background)
    camera = _camera_phrase(scene.background)
    if not clauses:
        text = f"An empty scene of {background}{camera}."
    else:
        joined = clauses[0] if len(clauses) == 1 else ", ".join(clauses[:-1]) + " and " + clauses[-1]
        text = f"{joined[0].upper()}{joined[1:]} over {background}{camera}."
    if scene.style != "natural":
        text += f" The scene is rendered {_STYLE_PHRASES[scene.style]}."
    return text


# --------------------------------------------------------------------------------------------------
# Rendering


def _bounce(p: float, lo: float, hi: float) -> float:
    span = hi - lo
    if span <= 0.0:
        return 0.5 * (lo + hi)
    u = (p - lo) % (2.0 * span)
    return lo + span - abs(u - span)


def shape_center(shape: Shape, t: float, height: int, width: int) -> tuple[float, float]:
    """The ``(x, y)`` pixel coordinates of ``shape``'s centre at time ``t`` seconds.

    Pixel ``(i, j)`` covers ``[j, j+1) x [i, i+1)``, so the centre of the frame is ``(width/2,
    height/2)``.
    """
    reach = 0.5 * shape.size * min(height, width) * _REACH[shape.kind]
    mx, my = reach / width, reach / height
    fx = _bounce(shape.position[0] + shape.velocity[0] * t, mx, 1.0 - mx)
    fy = _bounce(shape.position[1] + shape.velocity[1] * t, my, 1.0 - my)
    return fx * width, fy * height


def _kind_mask(kind: str, a: np.ndarray, b: np.ndarray) -> np.ndarray:
    # ``a``, ``b``: object-frame coordinates in units of the shape's radius (``b`` grows downwards).
    if kind == "circle":
        return a * a + b * b <= 1.0
    if kind == "square":
        return np.maximum(np.abs(a), np.abs(b)) <= 0.8
    if kind == "diamond":
        return np.abs(a) + np.abs(b) <= 1.1
    if kind == "triangle":
        outer = _REACH["triangle"]
        inside = np.ones(a.shape, dtype=bool)
        for k in range(3):
            # Each edge faces away from the opposite vertex; the apothem is half the circumradius.
            vertex = -0.5 * math.pi + k * 2.0 * math.pi / 3.0
            inside &= -(a * math.cos(vertex) + b * math.sin(vertex)) <= 0.5 * outer
        return inside
    if kind == "star":
        outer, inner = _REACH["star"], 0.5 * _REACH["star"]
        sector = 2.0 * math.pi / 5.0
        # Fold every point into the half sector between an outer tip (angle 0, pointing up) and the
        # neighbouring inner vertex, where the boundary is a single straight edge.
        phi = np.mod(np.arctan2(b, a) + 0.5 * math.pi, sector)
        phi = np.minimum(phi, sector - phi)
        rho = np.hypot(a, b)
        px, py = rho * np.cos(phi), rho * np.sin(phi)
        bx, by = inner * math.cos(0.5 * sector), inner * math.sin(0.5 * sector)
        return (bx - outer) * py - by * (px - outer) >= 0.0
    raise ValueError(f"unknown shape kind {kind!r}")


def _texture_mask(texture: str, a: np.ndarray, b: np.ndarray) -> np.ndarray | None:
    if texture == "stripes":
        return np.floor((a + b) * 1.75).astype(np.int64) % 2 == 1
    if texture == "checker":
        return (np.floor(a * 2.0).astype(np.int64) + np.floor(b * 2.0).astype(np.int64)) % 2 == 1
    if texture == "dots":
        ga, gb = a / 0.55, b / 0.55
        fa, fb = ga - np.floor(ga) - 0.5, gb - np.floor(gb) - 0.5
        return fa * fa + fb * fb <= 0.3**2
    return None


def _shape_patch(shape: Shape, t: float, height: int, width: int):
    """The shape at time ``t`` within its bounding box: ``(y0, x0, mask, texture_mask)`` or None."""
    radius = 0.5 * shape.size * min(height, width)
    cx, cy = shape_center(shape, t, height, width)
    reach = radius * _REACH[shape.kind]
    x0, x1 = max(int(math.floor(cx - reach)), 0), min(int(math.ceil(cx + reach)) + 1, width)
    y0, y1 = max(int(math.floor(cy - reach)), 0), min(int(math.ceil(cy + reach)) + 1, height)
    if x0 >= x1 or y0 >= y1:
        return None
    dx = (np.arange(x0, x1, dtype=np.float32) + 0.5 - cx)[None, :] / radius
    dy = (np.arange(y0, y1, dtype=np.float32) + 0.5 - cy)[:, None] / radius
    theta = math.radians(shape.rotation + shape.spin * t)
    cos, sin = math.cos(theta), math.sin(theta)
    a = cos * dx + sin * dy
    b = cos * dy - sin * dx
    return y0, x0, _kind_mask(shape.kind, a, b), _texture_mask(shape.texture, a, b)


class _BackgroundPainter:
    """Paints one background at one frame size; pattern state is computed once per render."""

    _NOISE_CELLS = 8

    def __init__(self, background: Background, height: int, width: int):
        self.bg = background
        side = float(min(height, width))
        # Pattern coordinates are in shorter-side lengths, sampled at pixel centres.
        self.u = (np.arange(width, dtype=np.float32) + 0.5) / np.float32(side)
        self.v = (np.arange(height, dtype=np.float32) + 0.5) / np.float32(side)
        self.rgb = np.asarray(background.rgb, dtype=np.float32)
        self.delta = np.asarray(background.rgb2, dtype=np.float32) - self.rgb
        theta = math.radians(background.angle)
        self.direction = (math.cos(theta), math.sin(theta))
        if background.kind in ("gradient", "stripes"):
            self.projection = self.v[:, None] * self.direction[1] + self.u[None, :] * self.direction[0]
        if background.kind == "noise":
            rng = np.random.default_rng(background.seed)
            cells = self._NOISE_CELLS
            self.octaves = [
                (rng.random((cells, cells), dtype=np.float32), background.scale, 0.7),
                (rng.random((2 * cells, 2 * cells), dtype=np.float32), background.scale / 2.0, 0.3),
            ]

    @staticmethod
    def _interpolation(coords: np.ndarray, cell: float, cells: int) -> np.ndarray:
        # Rows of weights that bilinearly (smoothstep-eased) interpolate a periodic grid of
        # ``cells`` values: the noise is then ``Wy @ grid @ Wx.T``, two small matrix products.
        pos = np.mod(coords / cell, cells)
        i0 = np.floor(pos).astype(np.int64) % cells
        f = pos - np.floor(pos)
        f = f * f * (3.0 - 2.0 * f)
        weights = np.zeros((coords.size, cells), dtype=np.float32)
        rows = np.arange(coords.size)
        weights[rows, i0] += 1.0 - f
        weights[rows, (i0 + 1) % cells] += f
        return weights

    def weights(self, t: float) -> np.ndarray:
        """How far each pixel is from ``color`` towards ``color2`` at time ``t``, in [0, 1]."""
        bg = self.bg
        ox, oy = bg.drift[0] * t, bg.drift[1] * t
        if bg.kind in ("gradient", "stripes"):
            proj = self.projection - (ox * self.direction[0] + oy * self.direction[1])
            if bg.kind == "gradient":
                return 0.5 - 0.5 * np.cos(2.0 * math.pi * proj / bg.scale)
            return (np.floor(proj / (0.5 * bg.scale)).astype(np.int64) % 2).astype(np.float32)
        if bg.kind == "checker":
            cell = 0.5 * bg.scale
            cols = np.floor((self.u - ox) / cell).astype(np.int64)
            rows = np.floor((self.v - oy) / cell).astype(np.int64)
            return ((rows[:, None] + cols[None, :]) % 2).astype(np.float32)
        value = 0.0
        for grid, cell, amplitude in self.octaves:
            wy = self._interpolation(self.v - oy, cell, grid.shape[0])
            wx = self._interpolation(self.u - ox, cell, grid.shape[1])
            value = value + amplitude * (wy @ grid @ wx.T)
        # Averaged value noise clusters around 0.5; stretch it so both tones show.
        return np.clip((value - 0.5) * 2.0 + 0.5, 0.0, 1.0)

    def paint(self, t: float) -> np.ndarray:
        w = self.weights(t).astype(np.float32)
        return self.rgb + w[:, :, None] * self.delta


def _luma(frame: np.ndarray) -> np.ndarray:
    return frame[..., 0] * 0.299 + frame[..., 1] * 0.587 + frame[..., 2] * 0.114


def _apply_style(frame: np.ndarray, style: str) -> np.ndarray:
    if style == "natural":
        return frame
    if style == "invert":
        return 255.0 - frame
    if style == "posterize":
        return np.minimum(np.floor(frame / 64.0), 3.0) * 85.0
    if style == "warm":
        return frame * np.array([1.12, 1.0, 0.75], np.float32) + np.array([14.0, 4.0, 0.0], np.float32)
    if style == "cool":
        return frame * np.array([0.78, 0.95, 1.12], np.float32) + np.array([0.0, 4.0, 16.0], np.float32)
    luma = _luma(frame)
    if style == "grayscale":
        return np.repeat(luma[:, :, None], 3, axis=2)
    if style == "sketch":
        # Pencil lines where brightness changes (object outlines, pattern edges), light shading
        # elsewhere, on slightly warm paper. Crisp edges give a one-pixel step, so line darkness
        # does not depend on resolution.
        gx = np.zeros_like(luma)
        gy = np.zeros_like(luma)
        gx[:, 1:] = np.abs(np.diff(luma, axis=1))
        gy[1:, :] = np.abs(np.diff(luma, axis=0))
        tone = 1.0 - np.clip((gx + gy) * (1.6 / 255.0), 0.0, 0.85) - (255.0 - luma) * (0.12 / 255.0)
        return tone[:, :, None] * np.array([250.0, 246.0, 236.0], np.float32)
    raise ValueError(f"unknown style {style!r}; expected one of {STYLES}")


def _check_size(num_frames: int, fps: float, height: int, width: int) -> None:
    if num_frames < 1:
        raise ValueError(f"num_frames must be at least 1, got {num_frames}")
    if not fps > 0:
        raise ValueError(f"fps must be positive, got {fps}")
    if height < 1 or width < 1:
        raise ValueError(f"height and width must be positive, got {height}x{width}")


def render(scene: Scene, num_frames: int, fps: float, height: int, width: int) -> np.ndarray:
    """Render ``scene`` as a ``(num_frames, height, width, 3)`` uint8 RGB array.

    Frame ``i`` shows the scene at ``t = i / fps`` seconds; ``num_frames=1`` gives an image (the
    scene at time 0).
    """
    _check_size(num_frames, fps, height, width)
    painter = _BackgroundPainter(scene.background, height, width)
    out = np.empty((num_frames, height, width, 3), dtype=np.uint8)
    for i in range(num_frames):
        t = i / fps
        frame = painter.paint(t)
        for shape in scene.shapes:
            patch = _shape_patch(shape, t, height, width)
            if patch is None:
                continue
            y0, x0, mask, texture = patch
            region = frame[y0 : y0 + mask.shape[0], x0 : x0 + mask.shape[1]]
            if texture is None:
                region[mask] = shape.rgb
            else:
                region[mask & ~texture] = shape.rgb
                region[mask & texture] = _texture_tone(shape.rgb)
        frame = _apply_style(frame, scene.style)
        np.rint(np.clip(frame, 0.0, 255.0), out=frame)
        out[i] = frame
    return out


def render_masks(scene: Scene, num_frames: int, fps: float, height: int, width: int) -> np.ndarray:
    """Each shape's full footprint per frame, ignoring occlusion: bool ``(shapes, T, H, W)``.

    Frames are timed as in :func:`render`. Useful to check edits and to build object-aware masks.
    """
    _check_size(num_frames, fps, height, width)
    masks = np.zeros((len(scene.shapes), num_frames, height, width), dtype=bool)
    for s, shape in enumerate(scene.shapes):
        for i in range(num_frames):
            patch = _shape_patch(shape, i / fps, height, width)
            if patch is not None:
                y0, x0, mask, _ = patch
                masks[s, i, y0 : y0 + mask.shape[0], x0 : x0 + mask.shape[1]] = mask
    return masks


# --------------------------------------------------------------------------------------------------
# Edits


def _reference(shape: Shape, scene: Scene) -> str:
    """The shortest phrase ("red circle", "red striped circle", ...) that singles out ``shape``."""
    for size, texture in ((False, False), (False, True), (True, True)):
        phrase = _noun_phrase(shape, size=size, texture=texture)
        matches = [s for s in scene.shapes if _noun_phrase(s, size=size, texture=texture) == phrase]
        if len(matches) == 1:
            return phrase
    return _noun_phrase(shape)


def _free_colors(scene: Scene) -> list[str]:
    used = {s.color for s in scene.shapes} | {scene.background.color, scene.background.color2}
    free = [c for c in COLORS if c not in used]
    if not free:
        raise ValueError("every palette colour is already used in the scene; no edit colour is left")
    return free


def _position_phrase(shape: Shape) -> str:
    x, y = shape.position
    col = "left" if x < 1 / 3 else "right" if x > 2 / 3 else ""
    row = "top" if y < 1 / 3 else "bottom" if y > 2 / 3 else ""
    where = " ".join(w for w in (row, col) if w)
    return f"in the {where}" if where else "in the middle"


def _need_shapes(scene: Scene, kind: str) -> None:
    if not scene.shapes:
        raise ValueError(f"a {kind!r} edit needs a scene with at least one shape")


_RECOLOR_TEMPLATES = (
    "Change the {obj} to {color}.",
    "Make the {obj} {color}.",
    "Turn the {obj} {color}.",
    "Recolor the {obj} {color}.",
)


def _draw_recolor(scene: Scene, seed: int) -> tuple[int, str, str]:
    """The recolor edit ``seed`` draws: which shape, its new colour, the instruction's wording."""
    _need_shapes(scene, "recolor")
    rng = _rng(seed)
    index = int(rng.integers(len(scene.shapes)))
    color = _pick(rng, _free_colors(scene))
    return index, color, _pick(rng, _RECOLOR_TEMPLATES)


def _recolor(scene: Scene, index: int, color: str, template: str) -> tuple[Scene, str]:
    shapes = list(scene.shapes)
    old = shapes[index]
    shapes[index] = dataclasses.replace(old, color=color, rgb=COLORS[color])
    instruction = template.format(obj=_reference(old, scene), color=color)
    return dataclasses.replace(scene, shapes=tuple(shapes)), instruction


def make_edit(
    scene: Scene, kind: str, seed: int, *, video: bool = True, shape_sizes: tuple[float, float] = SHAPE_SIZES
) -> tuple[Scene, str]:
    """Apply an edit of ``kind`` (one of EDIT_KINDS) to ``scene``; return the new scene and instruction.

    The choice of object, colour, shape or style is drawn from ``seed``. Every shape the edit does
    not name keeps its motion, so source and target renders are aligned frame by frame.
    ``video=False`` words the instruction for a still image (no motion in an added object). An
    added shape's diameter is drawn from ``shape_sizes``, as :func:`random_scene`'s.
    """
    if kind not in EDIT_KINDS:
        raise ValueError(f"unknown edit kind {kind!r}; expected one of {EDIT_KINDS}")
    rng = _rng(seed)
    shapes = list(scene.shapes)
    if kind == "recolor":
        return _recolor(scene, *_draw_recolor(scene, seed))
    if kind == "remove":
        _need_shapes(scene, kind)
        index = int(rng.integers(len(shapes)))
        removed = shapes.pop(index)
        template = _pick(rng, _REMOVE_TEMPLATES)
        instruction = template.format(obj=_reference(removed, scene))
        return dataclasses.replace(scene, shapes=tuple(shapes)), instruction
    if kind == "add":
        added = _random_shape(rng, _pick(rng, _free_colors(scene)), sizes=check_shape_sizes(shape_sizes))
        noun = _noun_phrase(added)
        if video:
            vx, vy = added.velocity
            where = f"moving {_direction(vx, vy)}"
        else:
            where = _position_phrase(added)
        verb = _pick(rng, ("Add", "Insert"))
        instruction = f"{verb} {_article(noun)} {noun} {where}."
        return dataclasses.replace(scene, shapes=(*shapes, added)), instruction
    if kind == "background":
        exclude = {s.color for s in scene.shapes} | {scene.background.color}
        # Same drift: the camera motion belongs to the shot, not to the backdrop being replaced.
        background = _random_background(rng, exclude=exclude, drift=scene.background.drift)
        c1, c2 = background.color, background.color2
        phrase = {
            "gradient": f"a smooth {c1}-to-{c2} gradient",
            "stripes": f"{_article(c1)} {c1} striped wall",
            "checker": f"{_article(c1)} {c1} checkerboard pattern",
            "noise": f"a mottled {c1} stone texture",
        }[background.kind]
        template = _pick(
            rng,
            (
                "Replace the background with {bg}.",
                "Change the background to {bg}.",
                "Swap the background for {bg}.",
            ),
        )
        return dataclasses.replace(scene, background=background), template.format(bg=phrase)
    style = _pick(rng, [s for s in STYLES if s not in ("natural", scene.style)])
    return dataclasses.replace(scene, style=style), _pick(rng, _STYLE_INSTRUCTIONS[style])


# --------------------------------------------------------------------------------------------------
# Files


def _video_module():
    # Imported lazily: scenes and renders must work without the codec stack.
    from sama import video

    return video


def _check_sizes(sizes: Sequence[tuple[int, int]]) -> list[tuple[int, int]]:
    checked = [(int(h), int(w)) for h, w in sizes]
    if not checked:
        raise ValueError("sizes must name at least one (height, width)")
    for h, w in checked:
        if h < 2 or w < 2 or h % 2 or w % 2:
            raise ValueError(f"sizes must be even and at least 2 (H.264 yuv420p), got {h}x{w}")
    return checked


def _frame_count(fps: float, seconds: float) -> int:
    if not fps > 0 or not seconds > 0:
        raise ValueError(f"fps and seconds must be positive, got fps={fps}, seconds={seconds}")
    return max(2, int(round(fps * seconds)))


def write_raw_videos(
    output_uri: str,
    count: int,
    seed: int = 0,
    *,
    fps: float = 24.0,
    seconds: float = 3.0,
    sizes: Sequence[tuple[int, int]] = DEFAULT_SIZES,
    captions: str = "mixed",
) -> list[str]:
    """Write ``count`` captioned clips ``{output_uri}/video_{i:04d}.mp4``; return their URIs in order.

    Clip ``i`` renders ``random_scene(derive_seed(seed, i))`` at ``sizes[i % len(sizes)]`` for
    ``round(fps * seconds)`` frames. ``captions`` picks the sidecar written next to each clip:
    ``"txt"`` (``video_0000.txt``, the caption), ``"json"`` (``video_0000.json``,
    ``{"caption": ...}``), ``"none"``, or ``"mixed"``, which cycles txt, json, txt, json, none so a
    reader meets every case (clips ``i % 5 == 4`` have no caption).
    """
    if captions not in CAPTION_POLICIES:
        raise ValueError(f"unknown captions policy {captions!r}; expected one of {CAPTION_POLICIES}")
    if count < 0:
        raise ValueError(f"count must be non-negative, got {count}")
    sizes = _check_sizes(sizes)
    num_frames = _frame_count(fps, seconds)
    video = _video_module()
    storage.makedirs(output_uri)
    uris = []
    for i in range(count):
        scene = random_scene(derive_seed(seed, i))
        height, width = sizes[i % len(sizes)]
        uri = storage.join(output_uri, f"video_{i:04d}.mp4")
        storage.write_bytes(uri, video.encode_mp4(render(scene, num_frames, fps, height, width), fps))
        sidecar = captions if captions != "mixed" else ("txt", "json", "txt", "json", "none")[i % 5]
        if sidecar == "txt":
            storage.write_text(storage.join(output_uri, f"video_{i:04d}.txt"), caption(scene) + "\n")
        elif sidecar == "json":
            document = json.dumps({"caption": caption(scene)}, ensure_ascii=False)
            storage.write_text(storage.join(output_uri, f"video_{i:04d}.json"), document + "\n")
        uris.append(uri)
    return uris


def _judge_scores(rng: np.random.Generator, is_video: bool, low: bool) -> dict[str, float | None]:
    # Each score is the mean of three judge runs, as in the paper. Kept pairs score 9-10 on every
    # axis (passing both the image and the video thresholds); a low pair fails exactly one axis.
    axes = ["score_if", "score_vq", "score_cp"] + (["score_mc"] if is_video else [])
    failing = _pick(rng, axes) if low else None
    scores: dict[str, float | None] = {"score_mc": None}
    for axis in axes:
        runs = rng.integers(4, 8, size=3) if axis == failing else rng.choice([9, 10], size=3, p=[0.4, 0.6])
        scores[axis] = round(float(np.mean(runs)), 2)
    return scores


def write_edit_pairs(
    output_uri: str,
    count: int,
    seed: int = 0,
    *,
    media: str = "video",
    fps: float = 24.0,
    seconds: float = 2.0,
    sizes: Sequence[tuple[int, int]] = DEFAULT_SIZES,
    low_score_every: int = 4,
    manifest_format: str = "csv",
    kinds: Sequence[str] = EDIT_KINDS,
) -> str:
    """Write ``count`` edit pairs under ``{output_uri}/pairs/`` and a manifest; return its URI.

    Pair ``i`` edits ``random_scene(derive_seed(seed, i))`` with kind ``kinds[i % len(kinds)]``
    (default: every kind of EDIT_KINDS in turn).
    ``media`` is ``"video"`` (mp4 pairs of ``round(fps * seconds)`` frames), ``"image"`` (png pairs)
    or ``"mixed"`` (odd ``i`` are images). The manifest (``manifest.csv``, or ``.jsonl`` /
    ``.parquet`` per ``manifest_format``) has MANIFEST_COLUMNS, paths relative to the manifest's
    directory, ``category`` the edit kind, and judge scores: every pair with
    ``i % low_score_every == low_score_every - 1`` fails one axis (score below 8), all others pass
    the image and video thresholds. ``score_mc`` is empty for image pairs.
    """
    if media not in MEDIA_KINDS:
        raise ValueError(f"unknown media {media!r}; expected one of {MEDIA_KINDS}")
    if manifest_format not in MANIFEST_FORMATS:
        raise ValueError(f"unknown manifest format {manifest_format!r}; expected one of {MANIFEST_FORMATS}")
    if count < 0 or low_score_every < 1:
        raise ValueError(f"count must be >= 0 and low_score_every >= 1, got {count}, {low_score_every}")
    unknown = [k for k in kinds if k not in EDIT_KINDS]
    if unknown or not kinds:
        raise ValueError(f"kinds must be a non-empty subset of {EDIT_KINDS}, got {list(kinds)}")
    sizes = _check_sizes(sizes)
    num_frames = _frame_count(fps, seconds)
    video = _video_module()
    storage.makedirs(storage.join(output_uri, "pairs"))
    rows = []
    for i in range(count):
        is_video = media == "video" or (media == "mixed" and i % 2 == 0)
        kind = kinds[i % len(kinds)]
        source_scene = random_scene(derive_seed(seed, i))
        edit_seed = derive_seed(seed, i, "edit")
        target_scene, instruction = make_edit(source_scene, kind, edit_seed, video=is_video)
        height, width = sizes[i % len(sizes)]
        frames = num_frames if is_video else 1
        names = []
        for role, scene in (("source", source_scene), ("target", target_scene)):
            pixels = render(scene, frames, fps, height, width)
            if is_video:
                name, data = f"pair_{i:04d}_{role}.mp4", video.encode_mp4(pixels, fps)
            else:
                name, data = f"pair_{i:04d}_{role}.png", video.encode_image(pixels[0], "png")
            storage.write_bytes(storage.join(output_uri, "pairs", name), data)
            names.append(f"pairs/{name}")
        low = i % low_score_every == low_score_every - 1
        scores = _judge_scores(np.random.default_rng(derive_seed(seed, i, "scores")), is_video, low)
        rows.append(
            {"source": names[0], "target": names[1], "instruction": instruction, "category": kind, **scores}
        )
    manifest_uri = storage.join(output_uri, f"manifest.{manifest_format}")
    write_manifest(rows, manifest_uri, format=manifest_format, columns=MANIFEST_COLUMNS)
    return manifest_uri


def write_manifest(
    rows: Sequence[Mapping[str, object]],
    uri: str,
    format: str | None = None,
    *,
    columns: Sequence[str] | None = None,
) -> str:
    """Write ``rows`` (dicts) to ``uri`` as csv, jsonl or parquet; return ``uri``.

    ``format`` defaults to the file extension. ``columns`` defaults to every key, in first-seen
    order; a row lacking one has it empty (``""`` in csv, null otherwise).
    """
    if format is None:
        suffix = uri.rsplit(".", 1)[-1].lower() if "." in storage.basename(uri) else ""
        format = suffix if suffix in MANIFEST_FORMATS else "csv"
    if format not in MANIFEST_FORMATS:
        raise ValueError(f"unknown manifest format {format!r}; expected one of {MANIFEST_FORMATS}")
    if columns is None:
        columns = list(dict.fromkeys(key for row in rows for key in row))
    table = [{c: row.get(c) for c in columns} for row in rows]
    if format == "csv":
        text = io.StringIO()
        writer = csv.DictWriter(text, fieldnames=list(columns), lineterminator="\n")
        writer.writeheader()
        writer.writerows({k: "" if v is None else v for k, v in row.items()} for row in table)
        storage.write_text(uri, text.getvalue())
    elif format == "jsonl":
        storage.write_text(uri, "".join(json.dumps(row, ensure_ascii=False) + "\n" for row in table))
    else:
        import pyarrow as pa
        import pyarrow.parquet as pq

        buffer = pa.BufferOutputStream()
        arrays = {c: [row[c] for row in table] for c in columns}
        pq.write_table(pa.table(arrays) if columns else pa.table({}), buffer)
        storage.write_bytes(uri, buffer.getvalue().to_pybytes())
    return uri


def _audio_only_mp4(seconds: float = 1.0, rate: int = 16000) -> bytes:
    import av

    buffer = io.BytesIO()
    with av.open(buffer, "w", format="mp4") as container:
        stream = container.add_stream("aac", rate=rate, layout="mono")
        chunk = 1024  # AAC's frame size; every frame but the flush must be exactly this long
        total = max(chunk, int(seconds * rate) // chunk * chunk)
        tone = (0.3 * np.sin(2.0 * math.pi * 440.0 * np.arange(total) / rate)).astype(np.float32)
        for start in range(0, total, chunk):
            samples = tone[None, start : start + chunk]
            frame = av.AudioFrame.from_ndarray(samples, format="fltp", layout="mono")
            frame.sample_rate = rate
            frame.pts = start
            container.mux(stream.encode(frame))
        container.mux(stream.encode(None))
    return buffer.getvalue()


def damage_stream(data: bytes, seed: int, start: float = 0.35, end: float = 0.65, flips: int = 20) -> bytes:
    """``data`` (an mp4) with ``flips`` bytes inverted at random offsets between the fractions
    ``start`` and ``end`` of the file: bit rot that leaves the container readable and that the
    decoder conceals (smeared macroblocks) instead of failing on."""
    damaged = bytearray(data)
    media = damaged.index(b"mdat") + 8
    rng = random.Random(seed)
    low, high = max(media, int(len(data) * start)), int(len(data) * end)
    for _ in range(flips):
        damaged[rng.randrange(low, high)] ^= 0xFF
    return bytes(damaged)


def write_bad_inputs(output_uri: str) -> dict[str, str]:
    """Write the classic broken inputs; return ``{uri: expected reject kind}`` (BAD_INPUT_KINDS).

    The kinds are those of ``sama.video.VideoDecodeError``: an empty file, an mp4 cut to 40% of its
    bytes, text named ``.mp4``, an audio-only mp4 and a one-frame video.
    """
    video = _video_module()
    storage.makedirs(output_uri)
    scene = random_scene(0)
    clip = video.encode_mp4(render(scene, 24, 24.0, 96, 128), 24.0)
    contents = {
        "zero_byte.mp4": b"",
        "truncated.mp4": clip[: int(len(clip) * 0.4)],
        "not_a_video.mp4": b"This is a plain text file, not a video.\n" * 8,
        "audio_only.mp4": _audio_only_mp4(),
        "one_frame.mp4": video.encode_mp4(render(scene, 1, 24.0, 96, 128), 24.0),
    }
    expected = {}
    for name, data in contents.items():
        uri = storage.join(output_uri, name)
        storage.write_bytes(uri, data)
        expected[uri] = BAD_INPUT_KINDS[name]
    return expected


def recolor_twin(scene: Scene, seed: int) -> tuple[Scene, str]:
    """The recolor edit ``make_edit(scene, "recolor", seed)`` with another colour named: the same
    object and wording, the next free colour after the one that edit names (in ``COLORS`` order).

    Editing a source with both instructions tells whether a model reads the colour it is asked
    for or only where to change: one that ignores the colour word gives the same edit to both.

    Raises:
        ValueError: the scene has no shapes, or only one free colour is left (no twin).
    """
    index, named, template = _draw_recolor(scene, seed)
    free = _free_colors(scene)
    if len(free) < 2:
        raise ValueError("only one free colour is left in the scene; a recolor edit has no twin")
    return _recolor(scene, index, free[(free.index(named) + 1) % len(free)], template)
