"""LPIPS v0.1 (AlexNet backbone) in plain torch: a learned perceptual distance between images.

This is the metric of Zhang et al. 2018 as the ``lpips`` package computes it with
``lpips.LPIPS(net="alex", version="0.1")``, without its torchvision dependency:

1. inputs in ``[-1, 1]`` are scaled channel-wise, ``(x - shift) / scale`` with the package's
   ``ScalingLayer`` constants;
2. torchvision's AlexNet ``features`` stack gives the activations after each of its five ReLUs
   (64, 192, 384, 256 and 256 channels);
3. each activation is unit-normalised along channels (``x / (||x|| + 1e-10)``), the two images'
   activations are subtracted and squared;
4. a 1x1 convolution per layer without bias (the learned "lin" heads) maps the squared difference
   to one channel, which is averaged over space; the five layers' averages are summed.

Weights. :meth:`LPIPS.from_file` reads one ``torch.save``'d state dict holding both parts under
this module's own keys (what :meth:`LPIPS.save` writes, see :data:`BACKBONE_KEYS` and
:data:`HEAD_KEYS`)::

    features.{0,3,6,8,10}.weight / .bias   torchvision alexnet() keys (ImageNet weights)
    lin{0..4}.model.1.weight               lpips package heads, (1, C, 1, 1) each

It also accepts the ``lpips`` package's own ``LPIPS(net="alex").state_dict()`` layout
(``net.sliceK.N.*`` backbone keys, ``scaling_layer.*`` buffers). :meth:`LPIPS.from_parts` builds
the model from the two published files instead: torchvision's ``alexnet-owt-7be5be79.pth`` (its
classifier weights are ignored) and the lpips release's ``weights/v0.1/alex.pth``. Files are read
with ``torch.load(weights_only=True)``. :func:`load_lpips` resolves a configured reference (a
file, a directory or an ``s3://`` prefix, or a Hugging Face hub repo id) to a model.
"""

from __future__ import annotations

import os
import re

import numpy as np
import torch
from torch import nn

__all__ = [
    "ALEXNET_FILE",
    "BACKBONE_KEYS",
    "HEADS_FILE",
    "HEAD_KEYS",
    "LPIPS",
    "LPIPS_FILE",
    "MIN_SIDE",
    "WeightsError",
    "load_lpips",
]

# The lpips package's ScalingLayer constants (ImageNet mean/std re-expressed for [-1, 1] inputs).
SHIFT = (-0.030, -0.088, -0.188)
SCALE = (0.458, 0.448, 0.450)
LAYER_CHANNELS = (64, 192, 384, 256, 256)
# Indices in torchvision's alexnet().features of the ReLUs whose outputs LPIPS compares.
FEATURE_TAPS = (1, 4, 7, 9, 11)
CONV_INDICES = (0, 3, 6, 8, 10)
BACKBONE_KEYS = tuple(f"features.{i}.{p}" for i in CONV_INDICES for p in ("weight", "bias"))
HEAD_KEYS = tuple(f"lin{k}.model.1.weight" for k in range(len(LAYER_CHANNELS)))
# Smallest frame side AlexNet's strides and pools leave at least one activation for.
MIN_SIDE = 31
NORM_EPS = 1e-10

# File names :func:`load_lpips` looks for in a directory.
LPIPS_FILE = "lpips_alex.pth"
ALEXNET_FILE = "alexnet-owt-7be5be79.pth"
HEADS_FILE = "alex.pth"

_LPIPS_PACKAGE_BACKBONE = re.compile(r"^net\.slice\d\.(\d+)\.(weight|bias)$")


class WeightsError(OSError):
    """Configured metric weights could not be loaded; the message names the file or reference."""


class _Head(nn.Module):
    """One lpips "lin" head: a bias-free 1x1 convolution to one channel.

    It sits at index 1 of ``model`` so the keys match the lpips package (``lin0.model.1.weight``),
    where index 0 is a Dropout; an Identity here keeps that index without ever dropping anything.
    """

    def __init__(self, channels: int):
        super().__init__()
        self.model = nn.Sequential(nn.Identity(), nn.Conv2d(channels, 1, kernel_size=1, bias=False))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(x)


def _alexnet_features() -> nn.Sequential:
    # torchvision's alexnet().features up to its last ReLU, same indices; its final MaxPool
    # (index 12) has no weights and LPIPS never reads past the ReLU before it.
    return nn.Sequential(
        nn.Conv2d(3, 64, kernel_size=11, stride=4, padding=2),
        nn.ReLU(),
        nn.MaxPool2d(kernel_size=3, stride=2),
        nn.Conv2d(64, 192, kernel_size=5, padding=2),
        nn.ReLU(),
        nn.MaxPool2d(kernel_size=3, stride=2),
        nn.Conv2d(192, 384, kernel_size=3, padding=1),
        nn.ReLU(),
        nn.Conv2d(384, 256, kernel_size=3, padding=1),
        nn.ReLU(),
        nn.Conv2d(256, 256, kernel_size=3, padding=1),
        nn.ReLU(),
    )


def _unit_normalize(x: torch.Tensor) -> torch.Tensor:
    return x / (torch.sqrt(torch.sum(x * x, dim=1, keepdim=True)) + NORM_EPS)


def _load_state(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    try:
        state = torch.load(os.fspath(path), map_location="cpu", weights_only=True)
    except (OSError, RuntimeError, EOFError, ValueError) as exc:
        raise WeightsError(f"LPIPS weights {os.fspath(path)!r} cannot be read: {exc}") from exc
    if not isinstance(state, dict):
        kind = type(state).__name__
        raise WeightsError(f"LPIPS weights {os.fspath(path)!r} hold a {kind}, not a state dict")
    return state


def _canonical_keys(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Map the lpips package's own layout onto this module's keys; drop its constant buffers."""
    out = {}
    for key, value in state.items():
        match = _LPIPS_PACKAGE_BACKBONE.match(key)
        if match:
            out[f"features.{match.group(1)}.{match.group(2)}"] = value
        elif not key.startswith("scaling_layer."):
            out[key] = value
    return out


class LPIPS(nn.Module):
    """LPIPS v0.1 with the AlexNet backbone; ``forward(a, b)`` gives one distance per image pair.

    A fresh instance has random weights; load real ones with :meth:`from_file` or
    :meth:`from_parts`. The module is put in eval mode with gradients off: it only measures.
    """

    def __init__(self) -> None:
        super().__init__()
        self.features = _alexnet_features()
        for index, channels in enumerate(LAYER_CHANNELS):
            self.add_module(f"lin{index}", _Head(channels))
        # Constants, not weights: kept out of the state dict so a weights file holds weights only.
        self.register_buffer("shift", torch.tensor(SHIFT).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("scale", torch.tensor(SCALE).view(1, 3, 1, 1), persistent=False)
        self.requires_grad_(False)
        self.eval()

    @property
    def heads(self) -> list[_Head]:
        return [getattr(self, f"lin{index}") for index in range(len(LAYER_CHANNELS))]

    @classmethod
    def from_state_dict(cls, state: dict[str, torch.Tensor], source: str = "state dict") -> LPIPS:
        """A model with ``state`` loaded (this module's keys or the lpips package's layout).

        Raises:
            WeightsError: keys are missing or left over, or a tensor has the wrong shape; the
                message names ``source``.
        """
        model = cls()
        state = _canonical_keys(state)
        missing = sorted(set(model.state_dict()) - set(state))
        unexpected = sorted(set(state) - set(model.state_dict()))
        if missing or unexpected:
            raise WeightsError(
                f"LPIPS weights {source!r} do not fit the AlexNet LPIPS layout: missing {missing}, "
                f"unexpected {unexpected}"
            )
        try:
            model.load_state_dict(state)
        except RuntimeError as exc:  # shape mismatches
            raise WeightsError(f"LPIPS weights {source!r} do not fit: {exc}") from exc
        return model

    @classmethod
    def from_file(cls, path: str | os.PathLike) -> LPIPS:
        """Backbone and heads from one state-dict file (the layout in the module docstring)."""
        return cls.from_state_dict(_load_state(path), os.fspath(path))

    @classmethod
    def from_parts(cls, alexnet_state_path: str | os.PathLike, lin_state_path: str | os.PathLike) -> LPIPS:
        """Backbone from torchvision's AlexNet weights, heads from the lpips release's ``alex.pth``."""
        backbone = {k: v for k, v in _load_state(alexnet_state_path).items() if k.startswith("features.")}
        heads = _load_state(lin_state_path)
        source = f"{os.fspath(alexnet_state_path)} + {os.fspath(lin_state_path)}"
        return cls.from_state_dict({**backbone, **heads}, source)

    def save(self, path: str | os.PathLike) -> None:
        """Write the one-file layout :meth:`from_file` reads."""
        torch.save({k: v.detach().cpu() for k, v in self.state_dict().items()}, os.fspath(path))

    def _activations(self, images: torch.Tensor) -> list[torch.Tensor]:
        x = (images - self.shift) / self.scale
        taps = []
        for index, layer in enumerate(self.features):
            x = layer(x)
            if index in FEATURE_TAPS:
                taps.append(x)
        return taps

    def forward(self, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        """``(N, 3, H, W)`` images in ``[-1, 1]`` (both the same shape) -> ``(N,)`` distances."""
        if a.shape != b.shape:
            raise ValueError(f"LPIPS inputs differ in shape: {tuple(a.shape)} vs {tuple(b.shape)}")
        if min(a.shape[-2:]) < MIN_SIDE:
            size = tuple(a.shape[-2:])
            raise ValueError(f"LPIPS needs images of at least {MIN_SIDE}x{MIN_SIDE}, got {size}")
        # One backbone pass over both images (the network is per-sample, so batching changes nothing).
        both = self._activations(torch.cat([a, b]))
        total = torch.zeros(a.shape[0], device=a.device, dtype=a.dtype)
        for head, features in zip(self.heads, both, strict=True):
            fa, fb = _unit_normalize(features).chunk(2)
            total = total + head((fa - fb) ** 2).mean(dim=(1, 2, 3))
        return total

    @torch.no_grad()
    def video_distance(self, a: np.ndarray, b: np.ndarray, batch_size: int = 8) -> float:
        """Mean LPIPS over frames of two ``(T, H, W, 3)`` uint8 videos of one shape."""
        if a.shape != b.shape:
            raise ValueError(f"videos differ in shape: {a.shape} vs {b.shape}")
        param = next(self.parameters())
        distances = []
        for start in range(0, len(a), batch_size):
            pair = [_to_model_range(v[start : start + batch_size], param) for v in (a, b)]
            distances.append(self(*pair).double().cpu())
        return float(torch.cat(distances).mean())


def _to_model_range(frames: np.ndarray, like: torch.Tensor) -> torch.Tensor:
    """``(N, H, W, 3)`` uint8 -> ``(N, 3, H, W)`` floats in ``[-1, 1]`` on ``like``'s device."""
    pixels = torch.from_numpy(np.ascontiguousarray(frames)).to(like.device)
    return pixels.permute(0, 3, 1, 2).to(like.dtype) / 127.5 - 1.0


def _from_directory(directory: str, reference: str) -> LPIPS:
    combined = os.path.join(directory, LPIPS_FILE)
    if os.path.isfile(combined):
        return LPIPS.from_file(combined)
    alexnet, heads = os.path.join(directory, ALEXNET_FILE), os.path.join(directory, HEADS_FILE)
    if os.path.isfile(alexnet) and os.path.isfile(heads):
        return LPIPS.from_parts(alexnet, heads)
    raise WeightsError(
        f"LPIPS weights {reference!r}: the directory holds neither {LPIPS_FILE} nor both "
        f"{ALEXNET_FILE} and {HEADS_FILE}"
    )


def load_lpips(reference: str, device: str | torch.device = "cpu") -> LPIPS:
    """The LPIPS model a configured reference names, on ``device``.

    ``reference`` is one of: a local weights file (:meth:`LPIPS.from_file`); a local directory, an
    ``s3://`` prefix or a Hugging Face hub repo id (``org/name``) holding either ``lpips_alex.pth``
    (one file) or both ``alexnet-owt-7be5be79.pth`` and ``alex.pth`` (:meth:`LPIPS.from_parts`).
    Remote directories are fetched once through :func:`sama.storage.localize_dir`.

    Raises:
        WeightsError: nothing loadable there; the message names ``reference``.
    """
    from sama import storage

    local = storage.local_path(reference)
    if local is not None and os.path.isfile(local):
        return LPIPS.from_file(local).to(device)
    try:
        directory = storage.localize_dir(reference)
    except OSError as exc:
        raise WeightsError(f"LPIPS weights {reference!r} cannot be fetched: {exc}") from exc
    if not os.path.isdir(directory):
        raise WeightsError(f"LPIPS weights {reference!r}: no such file or directory")
    return _from_directory(directory, reference).to(device)
