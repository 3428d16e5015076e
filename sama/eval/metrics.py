"""Evaluation metrics of an edited video: against its reference, its source, its instruction.

Videos are ``(T, H, W, 3)`` uint8 arrays (an image is ``T = 1``), compared on the 0-255 scale.

Weight-free metrics (numpy, scikit-image, OpenCV):

* :func:`mse`, :func:`psnr`, :func:`ssim`: PSNR is ``10 * log10(255**2 / MSE)`` over every pixel of
  every frame (infinite for identical videos); SSIM is scikit-image's ``structural_similarity`` per
  frame (7x7 uniform window, colour channels averaged), averaged over frames.
* The copy baseline of an edit is the same metrics between its *source* and its target: an edit
  that changes nothing scores exactly that, so an edit is only better than doing nothing when it
  beats it (:func:`compare_to_copy`).
* :func:`flow_metrics`: how closely the edit's motion follows the source's, from dense optical flow
  (:func:`optical_flow`, OpenCV Farneback).
* :func:`preservation`: the edit against the source on the pixels the reference leaves unchanged.

Model-based metrics (CLIP score, CLIP/DINOv2 temporal consistency, LPIPS) live in
:mod:`sama.eval.embeddings` and :mod:`sama.eval.lpips`; :class:`MetricSuite` loads the configured
models once and computes every metric a sample allows, under the names of :data:`METRIC_NAMES`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

__all__ = [
    "FARNEBACK_PARAMS",
    "LOWER_IS_BETTER",
    "METRIC_NAMES",
    "MetricSuite",
    "MetricsConfig",
    "compare",
    "compare_to_copy",
    "end_point_error",
    "flow_metrics",
    "mse",
    "optical_flow",
    "preservation",
    "psnr",
    "sample_frames",
    "ssim",
    "warp_error",
]

DATA_RANGE = 255.0
# The PSNR recorded for identical videos (whose PSNR is infinite), as common practice caps it.
PSNR_CAP_DB = 100.0
SSIM_MIN_SIDE = 7

# Every name MetricSuite.compute can produce, in report order.
METRIC_NAMES = (
    "mse",
    "psnr",
    "ssim",
    "lpips",
    "copy_mse",
    "copy_psnr",
    "copy_ssim",
    "clip_score",
    "clip_temporal",
    "dino_temporal",
    "flow_epe",
    "flow_warp_error",
    "preserve_psnr",
    "preserve_ssim",
)
# The metrics where a smaller value is better; every other name in METRIC_NAMES is higher-is-better.
LOWER_IS_BETTER: frozenset[str] = frozenset({"mse", "copy_mse", "lpips", "flow_epe", "flow_warp_error"})

# cv2.calcOpticalFlowFarneback parameters: OpenCV's documented example values (3-level pyramid
# halving each level, 15x15 averaging window, 3 iterations per level, polynomial expansion over
# 5x5 neighbourhoods with a 1.2 Gaussian sigma, no initial flow).
FARNEBACK_PARAMS = {
    "pyr_scale": 0.5,
    "levels": 3,
    "winsize": 15,
    "iterations": 3,
    "poly_n": 5,
    "poly_sigma": 1.2,
    "flags": 0,
}


def _check_pair(a: np.ndarray, b: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    a, b = np.asarray(a), np.asarray(b)
    if a.shape != b.shape:
        raise ValueError(f"videos differ in shape: {a.shape} vs {b.shape}")
    if a.ndim != 4 or a.shape[-1] != 3:
        raise ValueError(f"videos must be (T, H, W, 3), got {a.shape}")
    return a, b


def _check_video(video: np.ndarray, name: str = "video") -> np.ndarray:
    video = np.asarray(video)
    if video.ndim != 4 or video.shape[-1] != 3 or video.shape[0] < 1:
        raise ValueError(f"{name} must be (T >= 1, H, W, 3), got {video.shape}")
    if video.dtype != np.uint8:
        raise ValueError(f"{name} must be uint8, got {video.dtype}")
    return video


def _ssim_fits(video: np.ndarray) -> bool:
    return min(video.shape[1:3]) >= SSIM_MIN_SIDE


def mse(a: np.ndarray, b: np.ndarray) -> float:
    """Mean squared error over every value, on the 0-255 scale."""
    a, b = _check_pair(a, b)
    # Frame by frame: a float64 copy of a whole 81-frame video would take most of a gigabyte.
    total = 0.0
    for fa, fb in zip(a, b, strict=True):
        total += float(np.sum((fa.astype(np.float64) - fb.astype(np.float64)) ** 2))
    return total / a.size if a.size else math.nan


def psnr_of(error: float) -> float:
    """PSNR in dB of a mean squared error on the 0-255 scale (``inf`` for 0)."""
    return math.inf if error == 0 else 10.0 * math.log10(DATA_RANGE**2 / error)


def psnr(a: np.ndarray, b: np.ndarray) -> float:
    """Peak signal-to-noise ratio in dB (``inf`` when the videos are identical)."""
    return psnr_of(mse(a, b))


def ssim(a: np.ndarray, b: np.ndarray) -> float:
    """Mean structural similarity over frames (1 for identical videos)."""
    from skimage.metrics import structural_similarity

    a, b = _check_pair(a, b)
    if not _ssim_fits(a):
        raise ValueError(f"SSIM needs frames of at least 7x7 pixels, got {a.shape[2]}x{a.shape[1]}")
    scores = [
        structural_similarity(fa, fb, channel_axis=-1, data_range=DATA_RANGE)
        for fa, fb in zip(a, b, strict=True)
    ]
    return float(np.mean(scores))


def compare(a: np.ndarray, b: np.ndarray) -> dict[str, float]:
    """``{"mse", "psnr", "ssim"}`` of ``a`` against ``b``."""
    return {"mse": mse(a, b), "psnr": psnr(a, b), "ssim": ssim(a, b)}


def compare_to_copy(edited: np.ndarray, source: np.ndarray, target: np.ndarray) -> dict[str, float]:
    """An edit's metrics against its target beside those of its unchanged source (the copy baseline).

    Keys: ``mse``, ``psnr``, ``ssim`` (the edit) and ``copy_mse``, ``copy_psnr``, ``copy_ssim``.
    """
    edit = compare(edited, target)
    copy = compare(source, target)
    return {**edit, **{f"copy_{k}": v for k, v in copy.items()}}


def _grayscale(video: np.ndarray) -> list[np.ndarray]:
    import cv2

    return [cv2.cvtColor(frame, cv2.COLOR_RGB2GRAY) for frame in video]


def _farneback(first: np.ndarray, second: np.ndarray) -> np.ndarray:
    """Flow on ``first``'s grid pointing into ``second`` (grayscale uint8 frames)."""
    import cv2

    return cv2.calcOpticalFlowFarneback(first, second, None, **FARNEBACK_PARAMS)


def optical_flow(video: np.ndarray, backward: bool = False) -> np.ndarray:
    """Dense optical flow between consecutive frames: ``(T - 1, H, W, 2)`` float32, in pixels.

    Frames are converted to grayscale and passed to ``cv2.calcOpticalFlowFarneback`` with
    :data:`FARNEBACK_PARAMS`. Channel 0 is the horizontal displacement ``dx`` (positive to the
    right), channel 1 the vertical ``dy`` (positive downwards).

    * Forward (default): ``flow[t]`` lives on frame ``t``'s pixel grid and says where its content
      goes in frame ``t + 1``: ``frame[t][y, x] ~ frame[t + 1][y + dy, x + dx]``. Content moving
      right by one pixel per frame gives ``dx = +1``.
    * ``backward=True``: ``flow[t]`` lives on frame ``t + 1``'s grid and points back into frame
      ``t``: ``frame[t + 1][y, x] ~ frame[t][y + dy, x + dx]`` (``dx = -1`` for the same motion).
      This is the field ``cv2.remap`` needs to carry frame ``t`` forward onto frame ``t + 1``.
    """
    video = _check_video(video)
    gray = _grayscale(video)
    flows = np.zeros((len(video) - 1, *video.shape[1:3], 2), dtype=np.float32)
    for t in range(len(video) - 1):
        flows[t] = _farneback(gray[t + 1], gray[t]) if backward else _farneback(gray[t], gray[t + 1])
    return flows


def end_point_error(flow_a: np.ndarray, flow_b: np.ndarray) -> float:
    """Mean Euclidean distance between the vectors of two flow fields of one shape (``(..., 2)``)."""
    if flow_a.shape != flow_b.shape:
        raise ValueError(f"flow fields differ in shape: {flow_a.shape} vs {flow_b.shape}")
    difference = flow_a.astype(np.float64) - flow_b.astype(np.float64)
    return float(np.mean(np.sqrt(np.sum(difference**2, axis=-1))))


def _warp_residual(previous: np.ndarray, current: np.ndarray, backward_flow: np.ndarray) -> tuple[float, int]:
    """Sum and count of ``|current - warp(previous)|`` over the pixels whose sampling point lies
    inside ``previous`` (every channel counted)."""
    import cv2

    height, width = previous.shape[:2]
    grid_y, grid_x = np.mgrid[0:height, 0:width].astype(np.float32)
    map_x = grid_x + backward_flow[..., 0]
    map_y = grid_y + backward_flow[..., 1]
    warped = cv2.remap(previous.astype(np.float32), map_x, map_y, cv2.INTER_LINEAR)
    inside = (map_x >= 0) & (map_x <= width - 1) & (map_y >= 0) & (map_y <= height - 1)
    errors = np.abs(warped - current.astype(np.float32))[inside]
    return float(errors.sum(dtype=np.float64)), errors.size


def warp_error(video: np.ndarray, backward_flow: np.ndarray) -> float:
    """Mean ``|video[t + 1] - warp(video[t], backward_flow[t])|`` on the 0-255 scale.

    ``backward_flow`` is ``(T - 1, H, W, 2)`` in :func:`optical_flow`'s backward convention:
    ``warp`` samples frame ``t`` (bilinearly, ``cv2.remap``) at ``(x + dx, y + dy)`` for every
    pixel ``(x, y)`` of frame ``t + 1``. Pixels whose sampling point falls outside frame ``t``
    (content that entered the frame) are left out; the mean is over every remaining pixel and
    channel of every frame pair. NaN when no pixel remains.
    """
    video = _check_video(video)
    expected = (len(video) - 1, *video.shape[1:3], 2)
    if backward_flow.shape != expected:
        raise ValueError(
            f"backward flow must be {expected} for a {video.shape} video, got {backward_flow.shape}"
        )
    residuals = [_warp_residual(video[t], video[t + 1], backward_flow[t]) for t in range(len(video) - 1)]
    count = sum(n for _, n in residuals)
    return sum(total for total, _ in residuals) / count if count else math.nan


def flow_metrics(edited: np.ndarray, source: np.ndarray) -> dict[str, float]:
    """How closely the edit's motion follows its source's (``{}`` for videos under 2 frames).

    * ``flow_epe``: :func:`end_point_error` between the forward flows of the source and of the
      edit, over every pixel of every consecutive frame pair.
    * ``flow_warp_error``: :func:`warp_error` of the edit under the source's backward flow: each
      edited frame carried forward along the source's motion, against the next edited frame.

    Frame pairs are processed one at a time, so memory does not grow with the video's length.
    """
    edited, source = _check_pair(_check_video(edited, "edit"), _check_video(source, "source"))
    if len(edited) < 2:
        return {}
    source_gray, edited_gray = _grayscale(source), _grayscale(edited)
    epe_per_pair, warp_total, warp_count = [], 0.0, 0
    for t in range(len(edited) - 1):
        source_forward = _farneback(source_gray[t], source_gray[t + 1])
        edited_forward = _farneback(edited_gray[t], edited_gray[t + 1])
        epe_per_pair.append(end_point_error(source_forward, edited_forward))
        source_backward = _farneback(source_gray[t + 1], source_gray[t])
        total, count = _warp_residual(edited[t], edited[t + 1], source_backward)
        warp_total, warp_count = warp_total + total, warp_count + count
    return {
        # Every pair has H * W vectors, so the mean of per-pair means is the mean over all of them.
        "flow_epe": float(np.mean(epe_per_pair)),
        "flow_warp_error": warp_total / warp_count if warp_count else math.nan,
    }


def changed_pixels(source: np.ndarray, reference: np.ndarray, threshold: float) -> np.ndarray:
    """``(T, H, W)`` bool: where ``max_c |source - reference| > threshold`` (0-255), the pixels an
    edit must change; the rest are those it must keep (:func:`preservation`)."""
    return np.abs(source.astype(np.int16) - reference.astype(np.int16)).max(axis=-1) > threshold


def preservation(
    edited: np.ndarray, source: np.ndarray, reference: np.ndarray, threshold: float
) -> dict[str, float]:
    """The edit against its source on the pixels the reference leaves (nearly) unchanged.

    The mask keeps pixel ``(t, y, x)`` when ``max_c |source - reference| <= threshold`` (0-255).
    ``preserve_psnr`` is the PSNR of the edit against the source over the masked pixels' values
    (every channel); ``preserve_ssim`` is the mean over the masked pixels of scikit-image's full SSIM
    map (7x7 window, channels averaged), computed frame by frame on the whole frames. ``{}`` when
    the mask is empty; no ``preserve_ssim`` for frames under 7x7.
    """
    edited, source = _check_pair(_check_video(edited, "edit"), _check_video(source, "source"))
    reference = _check_pair(source, _check_video(reference, "reference"))[1]
    mask = ~changed_pixels(source, reference, threshold)
    kept = int(mask.sum())
    if not kept:
        return {}
    residual = edited[mask].astype(np.float64) - source[mask].astype(np.float64)
    result = {"preserve_psnr": psnr_of(float(np.mean(residual**2)))}
    if _ssim_fits(edited):
        # Frame by frame, so only one frame's SSIM map is ever held.
        total = sum(float(_ssim_map(e, s)[m].sum()) for e, s, m in zip(edited, source, mask, strict=True))
        result["preserve_ssim"] = total / kept
    return result


def _ssim_map(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """``(H, W)`` per-pixel SSIM of two frames, colour channels averaged."""
    from skimage.metrics import structural_similarity

    return structural_similarity(a, b, channel_axis=-1, data_range=DATA_RANGE, full=True)[1].mean(axis=-1)


def sample_frames(video: np.ndarray, max_frames: int | None) -> np.ndarray:
    """At most ``max_frames`` frames, evenly spaced from first to last (all when None or fewer)."""
    if max_frames is None or len(video) <= max_frames:
        return video
    return video[np.linspace(0, len(video) - 1, max_frames).round().astype(int)]


@dataclass
class MetricsConfig:
    """Which metrics an evaluation computes, and the weights of the model-based ones."""

    # A transformers CLIP model (CLIPModel + tokenizer + image processor): local directory, s3://
    # prefix or hub id, e.g. openai/clip-vit-large-patch14. None: no clip_score / clip_temporal.
    clip: str | None = None
    # A transformers Dinov2Model + image processor, e.g. facebook/dinov2-base. None: no dino_temporal.
    dinov2: str | None = None
    # LPIPS (AlexNet) weights: a file, or a directory / s3:// prefix / hub repo id holding them
    # (see sama.eval.lpips.load_lpips). None: no lpips.
    lpips: str | None = None
    # Optical-flow metrics against the source (flow_epe, flow_warp_error): CPU, a few ms per frame.
    flow: bool = True
    # Source and reference pixels differing by at most this much (0-255, max over channels) count
    # as "to be preserved" for preserve_psnr / preserve_ssim.
    preservation_threshold: float = 8.0
    # Device of the model-based metrics; None: CUDA when available, else CPU.
    device: str | None = None
    # At most this many frames per video, evenly spaced, go through the model-based metrics
    # (temporal metrics then compare consecutive *sampled* frames); None: every frame.
    frames: int | None = None

    def validate(self) -> None:
        for key in ("clip", "dinov2", "lpips", "device"):
            value = getattr(self, key)
            if value is not None and (not isinstance(value, str) or not value.strip()):
                raise ValueError(f"metrics.{key} must be a non-empty string or null, got {value!r}")
        if not 0 <= self.preservation_threshold <= DATA_RANGE:
            raise ValueError(
                f"metrics.preservation_threshold must be in [0, 255], got {self.preservation_threshold}"
            )
        if self.frames is not None and self.frames < 2:
            raise ValueError(f"metrics.frames must be >= 2 or null, got {self.frames}")


def _default_device() -> str:
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


class MetricSuite:
    """Loads the configured metric models once; :meth:`compute` scores one sample.

    ``notes`` maps each metric the configuration rules out to the reason (``{"lpips": "no
    metrics.lpips configured", ...}``); ``names`` are the metrics :meth:`compute` produces when a
    sample allows them all. Models run on ``cfg.device``, else ``device``, else CUDA when
    available. Configured weights that cannot be loaded raise
    :class:`sama.eval.lpips.WeightsError` here, naming the reference.
    """

    def __init__(self, cfg: MetricsConfig, device: str | None = None):
        cfg.validate()
        self.cfg = cfg
        models = (cfg.clip, cfg.dinov2, cfg.lpips)
        # An explicit metrics.device wins over the caller's default (e.g. the editing model's device).
        self.device = cfg.device or device or (_default_device() if any(models) else "cpu")
        self.notes: dict[str, str] = {}
        self.clip = self.dino = self.lpips = None
        if cfg.clip:
            from sama.eval.embeddings import ClipEmbedder

            self.clip = ClipEmbedder.load(cfg.clip, self.device)
        else:
            self._skip(("clip_score", "clip_temporal"), "no metrics.clip configured")
        if cfg.dinov2:
            from sama.eval.embeddings import DinoEmbedder

            self.dino = DinoEmbedder.load(cfg.dinov2, self.device)
        else:
            self._skip(("dino_temporal",), "no metrics.dinov2 configured")
        if cfg.lpips:
            from sama.eval.lpips import load_lpips

            self.lpips = load_lpips(cfg.lpips, self.device)
        else:
            self._skip(("lpips",), "no metrics.lpips configured")
        if not cfg.flow:
            self._skip(("flow_epe", "flow_warp_error"), "metrics.flow is off")

    def _skip(self, names: tuple[str, ...], reason: str) -> None:
        self.notes.update(dict.fromkeys(names, reason))

    @property
    def names(self) -> tuple[str, ...]:
        return tuple(name for name in METRIC_NAMES if name not in self.notes)

    def compute(
        self,
        edited: np.ndarray,
        source: np.ndarray | None = None,
        reference: np.ndarray | None = None,
        instruction: str = "",
    ) -> dict[str, float]:
        """Every metric this sample allows, as finite floats (an infinite PSNR is :data:`PSNR_CAP_DB`).

        ``edited``, ``source`` and ``reference`` are ``(T, H, W, 3)`` uint8 (images ``T = 1``).
        Reference metrics (``mse psnr ssim lpips``) need ``reference``; the copy baseline needs a
        source of the reference's shape; flow and preservation metrics need a source of the edit's
        shape (preservation also a reference), and are skipped otherwise (a speed-task source has
        fewer frames than its edit). ``clip_score`` needs a non-blank ``instruction``; temporal
        metrics need two frames. SSIM-based metrics need 7x7 frames, LPIPS 31x31.

        Raises:
            ValueError: a video is not ``(T, H, W, 3)`` uint8, or ``reference`` differs from the
                edit in shape (the message names both shapes).
        """
        edited = _check_video(edited, "edit")
        source = None if source is None else _check_video(source, "source")
        if reference is not None:
            reference = _check_video(reference, "reference")
            if reference.shape != edited.shape:
                raise ValueError(f"reference shape {reference.shape} differs from the edit's {edited.shape}")
        values: dict[str, float] = {}
        if reference is not None:
            values.update(self._reference_metrics(edited, reference))
            if source is not None and source.shape == reference.shape:
                values.update(self._copy_metrics(source, reference))
        if source is not None and source.shape == edited.shape:
            values.update(self._source_metrics(edited, source, reference))
        values.update(self._embedding_metrics(edited, instruction))
        # An identical pair's PSNR is infinite: recorded at the cap, so a perfect edit still counts
        # in the means (and stays valid JSON).
        values = {n: PSNR_CAP_DB if n.endswith("psnr") and v == math.inf else v for n, v in values.items()}
        return {name: float(value) for name, value in values.items() if math.isfinite(value)}

    def _reference_metrics(self, edited: np.ndarray, reference: np.ndarray) -> dict[str, float]:
        values = {"mse": mse(edited, reference), "psnr": psnr(edited, reference)}
        if _ssim_fits(edited):
            values["ssim"] = ssim(edited, reference)
        if self.lpips is not None:
            from sama.eval.lpips import MIN_SIDE

            if min(edited.shape[1:3]) >= MIN_SIDE:
                sampled = [sample_frames(v, self.cfg.frames) for v in (edited, reference)]
                values["lpips"] = self.lpips.video_distance(*sampled)
        return values

    @staticmethod
    def _copy_metrics(source: np.ndarray, reference: np.ndarray) -> dict[str, float]:
        values = {"copy_mse": mse(source, reference), "copy_psnr": psnr(source, reference)}
        if _ssim_fits(source):
            values["copy_ssim"] = ssim(source, reference)
        return values

    def _source_metrics(
        self, edited: np.ndarray, source: np.ndarray, reference: np.ndarray | None
    ) -> dict[str, float]:
        values = flow_metrics(edited, source) if self.cfg.flow else {}
        if reference is not None:
            values.update(preservation(edited, source, reference, self.cfg.preservation_threshold))
        return values

    def _embedding_metrics(self, edited: np.ndarray, instruction: str) -> dict[str, float]:
        if self.clip is None and self.dino is None:
            return {}
        from sama.eval.embeddings import clip_score_from_embeddings, temporal_consistency

        frames = sample_frames(edited, self.cfg.frames)
        values = {}
        if self.clip is not None:
            embeddings = self.clip.image_embeddings(frames)
            if instruction.strip():
                values["clip_score"] = clip_score_from_embeddings(
                    embeddings, self.clip.text_embedding(instruction)
                )
            if len(frames) >= 2:
                values["clip_temporal"] = temporal_consistency(embeddings)
        if self.dino is not None and len(frames) >= 2:
            values["dino_temporal"] = temporal_consistency(self.dino.image_embeddings(frames))
        return values
