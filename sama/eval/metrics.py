"""Reference metrics between two videos of the same shape: MSE, PSNR and SSIM.

Videos are ``(T, H, W, 3)`` uint8 arrays (an image is ``T = 1``), compared on the 0-255 scale.
PSNR is ``10 * log10(255**2 / MSE)`` over every pixel of every frame (infinite for identical
videos); SSIM is scikit-image's ``structural_similarity`` per frame (7x7 uniform window, colour
channels averaged), averaged over frames.

The copy baseline of an edit is the same metrics between its *source* and its target: an edit that
changes nothing scores exactly that, so an edit is only better than doing nothing when it beats
it (:func:`compare_to_copy`).
"""

from __future__ import annotations

import math

import numpy as np

__all__ = ["compare", "compare_to_copy", "mse", "psnr", "ssim"]

DATA_RANGE = 255.0


def _check_pair(a: np.ndarray, b: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    a, b = np.asarray(a), np.asarray(b)
    if a.shape != b.shape:
        raise ValueError(f"videos differ in shape: {a.shape} vs {b.shape}")
    if a.ndim != 4 or a.shape[-1] != 3:
        raise ValueError(f"videos must be (T, H, W, 3), got {a.shape}")
    return a, b


def mse(a: np.ndarray, b: np.ndarray) -> float:
    """Mean squared error over every value, on the 0-255 scale."""
    a, b = _check_pair(a, b)
    return float(np.mean((a.astype(np.float64) - b.astype(np.float64)) ** 2))


def psnr(a: np.ndarray, b: np.ndarray) -> float:
    """Peak signal-to-noise ratio in dB (``inf`` when the videos are identical)."""
    error = mse(a, b)
    return math.inf if error == 0 else 10.0 * math.log10(DATA_RANGE**2 / error)


def ssim(a: np.ndarray, b: np.ndarray) -> float:
    """Mean structural similarity over frames (1 for identical videos)."""
    from skimage.metrics import structural_similarity

    a, b = _check_pair(a, b)
    if min(a.shape[1:3]) < 7:
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
