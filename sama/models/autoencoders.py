"""Video autoencoders with one interface: frames in ``[-1, 1]`` <-> normalised latents.

* :class:`WanAutoencoder` wraps diffusers' ``AutoencoderKLWan`` (Wan2.1: 16 channels, 4x temporal /
  8x spatial; Wan2.2: 48 channels, 4x / 16x) and normalises latents per channel with the VAE's
  ``latents_mean``/``latents_std`` exactly as Wan's pipelines do, so the DiT sees what it was
  trained on.
* :class:`SpaceToDepthAutoencoder` is parameter-free and exactly invertible: pixel blocks become
  channels and the first frame stands alone before groups of ``temporal_factor`` frames, the same
  4k+1 frame rule as Wan's causal VAE. It lets a CPU-sized model learn real content in tests.

Shapes: ``encode`` takes ``(B, 3, T, H, W)`` floats in ``[-1, 1]`` with ``T = k * temporal + 1`` and
``H, W`` multiples of the spatial factor, and returns ``(B, C, k + 1, H / s, W / s)`` float32;
``decode`` inverts it (values clamped to ``[-1, 1]``). Both autoencoders are frozen.
"""

from __future__ import annotations

import abc
import json
import os
from typing import Any, ClassVar

import torch
from torch import nn

from sama.models.config import AutoencoderConfig

__all__ = [
    "LatentAutoencoder",
    "SpaceToDepthAutoencoder",
    "WanAutoencoder",
    "build_autoencoder",
    "load_autoencoder",
]

_S2D_CONFIG = "space_to_depth.json"


class LatentAutoencoder(nn.Module, abc.ABC):
    """The interface the trainer and the pipeline use; see the module docstring for shapes."""

    kind: ClassVar[str]

    @property
    @abc.abstractmethod
    def latent_channels(self) -> int:
        """Channels of the latent."""

    @property
    @abc.abstractmethod
    def temporal_compression(self) -> int:
        """Frames per latent frame after the first (4 for Wan)."""

    @property
    @abc.abstractmethod
    def spatial_compression(self) -> int:
        """Pixels per latent pixel along each side (8 for Wan2.1)."""

    @abc.abstractmethod
    def encode(self, frames: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        """``(B, 3, T, H, W)`` in ``[-1, 1]`` -> ``(B, C, T', H', W')`` normalised latents."""

    @abc.abstractmethod
    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        """``(B, C, T', H', W')`` -> ``(B, 3, T, H, W)`` in ``[-1, 1]``."""

    @abc.abstractmethod
    def save_pretrained(self, directory: str) -> None:
        """Write weights and config so :func:`load_autoencoder` can rebuild this autoencoder."""

    def train(self, mode: bool = True) -> LatentAutoencoder:
        # Frozen: stays in eval mode whatever the surrounding module does.
        return super().train(False)

    def latent_shape(self, num_frames: int, height: int, width: int) -> tuple[int, int, int, int]:
        """``(C, T', H', W')`` of a clip's latent (the clip must satisfy :meth:`check_frames`)."""
        self._check_size(num_frames, height, width)
        s = self.spatial_compression
        return (
            self.latent_channels,
            (num_frames - 1) // self.temporal_compression + 1,
            height // s,
            width // s,
        )

    def _check_size(self, num_frames: int, height: int, width: int) -> None:
        t, s = self.temporal_compression, self.spatial_compression
        if num_frames < 1 or (num_frames - 1) % t:
            raise ValueError(f"the autoencoder needs {t}k+1 frames, got {num_frames}")
        if height % s or width % s or height < s or width < s:
            raise ValueError(f"the autoencoder needs height and width multiples of {s}, got {height}x{width}")

    def check_frames(self, frames: torch.Tensor) -> None:
        """Raise ``ValueError`` unless ``frames`` is a ``(B, 3, T, H, W)`` clip of an encodable size."""
        if frames.ndim != 5 or frames.shape[1] != 3:
            raise ValueError(f"frames must be (B, 3, T, H, W), got {tuple(frames.shape)}")
        self._check_size(*frames.shape[2:])


def _mean_of_copies(x: torch.Tensor, dim: int) -> torch.Tensor:
    """Mean along ``dim`` (kept), summed as a tree of halves.

    Adding equal values pairwise only doubles them, which is exact, so the mean of identical copies
    comes back bit-exact whenever the count is a power of two; a running sum would round.
    """
    count = x.shape[dim]
    total = x
    while total.shape[dim] > 1 and total.shape[dim] % 2 == 0:
        first, second = total.chunk(2, dim=dim)
        total = first + second
    return total.sum(dim=dim, keepdim=True) / count


class SpaceToDepthAutoencoder(LatentAutoencoder):
    """Lossless space-to-depth "autoencoder" (no parameters).

    The first frame is repeated ``temporal_factor`` times so it fills a group like the others; each
    group of ``temporal_factor`` frames and ``spatial_factor`` x ``spatial_factor`` pixels becomes
    ``3 * temporal_factor * spatial_factor**2`` channels of one latent position. Decoding averages
    the first frame's copies (exact when they are equal, the best estimate when a model predicted
    them slightly differently). Latents are ``(pixel - pixel_mean) / pixel_std``; the defaults
    (0, 1) leave them equal to the pixels, bit for bit.
    """

    kind = "space_to_depth"

    def __init__(
        self,
        spatial_factor: int = 4,
        temporal_factor: int = 4,
        pixel_mean: float = 0.0,
        pixel_std: float = 1.0,
    ):
        super().__init__()
        if spatial_factor < 1 or temporal_factor < 1:
            raise ValueError("spatial_factor and temporal_factor must be positive")
        if not pixel_std > 0:
            raise ValueError(f"pixel_std must be positive, got {pixel_std}")
        self.spatial_factor = int(spatial_factor)
        self.temporal_factor = int(temporal_factor)
        self.pixel_mean = float(pixel_mean)
        self.pixel_std = float(pixel_std)

    @property
    def latent_channels(self) -> int:
        return 3 * self.temporal_factor * self.spatial_factor**2

    @property
    def temporal_compression(self) -> int:
        return self.temporal_factor

    @property
    def spatial_compression(self) -> int:
        return self.spatial_factor

    def encode(self, frames: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        self.check_frames(frames)
        b, c, _, h, w = frames.shape
        tf, s = self.temporal_factor, self.spatial_factor
        frames = frames.float()
        grouped = torch.cat([frames[:, :, :1].expand(b, c, tf, h, w), frames[:, :, 1:]], dim=2)
        groups = grouped.shape[2] // tf
        x = grouped.reshape(b, c, groups, tf, h // s, s, w // s, s)
        # -> (B, C, tf, s, s, groups, H/s, W/s): channel index = ((c * tf + dt) * s + dy) * s + dx.
        x = x.permute(0, 1, 3, 5, 7, 2, 4, 6)
        latents = x.reshape(b, c * tf * s * s, groups, h // s, w // s)
        return ((latents - self.pixel_mean) / self.pixel_std).contiguous()

    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        b, channels, groups, hs, ws = latents.shape
        if channels != self.latent_channels:
            raise ValueError(f"expected {self.latent_channels} latent channels, got {channels}")
        tf, s = self.temporal_factor, self.spatial_factor
        pixels = latents.float() * self.pixel_std + self.pixel_mean
        x = pixels.reshape(b, 3, tf, s, s, groups, hs, ws)
        x = x.permute(0, 1, 5, 2, 6, 3, 7, 4).reshape(b, 3, groups * tf, hs * s, ws * s)
        first = _mean_of_copies(x[:, :, :tf], dim=2)
        return torch.cat([first, x[:, :, tf:]], dim=2).clamp(-1.0, 1.0)

    def save_pretrained(self, directory: str) -> None:
        os.makedirs(directory, exist_ok=True)
        config = {
            "kind": self.kind,
            "spatial_factor": self.spatial_factor,
            "temporal_factor": self.temporal_factor,
            "pixel_mean": self.pixel_mean,
            "pixel_std": self.pixel_std,
        }
        with open(os.path.join(directory, _S2D_CONFIG), "w") as handle:
            json.dump(config, handle, indent=2)

    @classmethod
    def from_pretrained(cls, directory: str) -> SpaceToDepthAutoencoder:
        with open(os.path.join(directory, _S2D_CONFIG)) as handle:
            config = json.load(handle)
        # Exports written before the normalisation existed hold raw pixels.
        return cls(
            int(config["spatial_factor"]),
            int(config["temporal_factor"]),
            float(config.get("pixel_mean", 0.0)),
            float(config.get("pixel_std", 1.0)),
        )


class WanAutoencoder(LatentAutoencoder):
    """Wan's causal video VAE (``AutoencoderKLWan``) with per-channel latent normalisation.

    ``encode`` returns ``(z - latents_mean) / latents_std`` of the posterior's mode (or a sample,
    with ``sample_posterior``); ``decode`` undoes it. Works for the Wan2.1 (16-channel) and Wan2.2
    (48-channel, patchified, 16x) VAEs alike.
    """

    kind = "wan"

    def __init__(self, vae: nn.Module, sample_posterior: bool = False):
        super().__init__()
        self.vae = vae
        self.sample_posterior = bool(sample_posterior)
        self.vae.requires_grad_(False)
        self.vae.eval()
        config = vae.config
        channels = int(config.z_dim)
        mean = torch.tensor(config.latents_mean, dtype=torch.float32).view(1, channels, 1, 1, 1)
        std = torch.tensor(config.latents_std, dtype=torch.float32).view(1, channels, 1, 1, 1)
        self.register_buffer("latents_mean", mean, persistent=False)
        self.register_buffer("latents_std", std, persistent=False)

    @property
    def latent_channels(self) -> int:
        return int(self.vae.config.z_dim)

    @property
    def temporal_compression(self) -> int:
        return int(self.vae.config.scale_factor_temporal)

    @property
    def spatial_compression(self) -> int:
        return int(self.vae.config.scale_factor_spatial)

    def _vae_dtype(self) -> torch.dtype:
        return next(self.vae.parameters()).dtype

    @torch.no_grad()
    def encode(self, frames: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        self.check_frames(frames)
        dist = self.vae.encode(frames.to(self._vae_dtype())).latent_dist
        z = dist.sample(generator) if self.sample_posterior else dist.mode()
        return (z.float() - self.latents_mean) / self.latents_std

    @torch.no_grad()
    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        z = latents.float() * self.latents_std + self.latents_mean
        frames = self.vae.decode(z.to(self._vae_dtype())).sample
        return frames.float().clamp(-1.0, 1.0)

    def save_pretrained(self, directory: str) -> None:
        self.vae.save_pretrained(directory)

    @classmethod
    def from_pretrained(
        cls,
        pretrained: str,
        subfolder: str | None = None,
        torch_dtype: torch.dtype | None = None,
        sample_posterior: bool = False,
    ) -> WanAutoencoder:
        from diffusers import AutoencoderKLWan

        vae = AutoencoderKLWan.from_pretrained(pretrained, subfolder=subfolder, torch_dtype=torch_dtype)
        return cls(vae, sample_posterior=sample_posterior)


def build_autoencoder(
    config: AutoencoderConfig,
    pretrained: str | None = None,
    torch_dtype: torch.dtype = torch.float32,
) -> LatentAutoencoder:
    """Build the autoencoder ``config`` describes; Wan weights come from ``pretrained``/``subfolder``."""
    if config.kind == "space_to_depth":
        return SpaceToDepthAutoencoder(
            config.spatial_factor, config.temporal_factor, config.pixel_mean, config.pixel_std
        )
    if config.kind != "wan":
        raise ValueError(f"unknown autoencoder kind {config.kind!r} (use 'wan' or 'space_to_depth')")
    if pretrained is not None:
        return WanAutoencoder.from_pretrained(
            pretrained,
            subfolder=config.subfolder or None,
            torch_dtype=torch_dtype,
            sample_posterior=config.sample_posterior,
        )
    from diffusers import AutoencoderKLWan

    vae = AutoencoderKLWan(**config.wan_kwargs()).to(torch_dtype)
    return WanAutoencoder(vae, sample_posterior=config.sample_posterior)


def load_autoencoder(
    directory: str, torch_dtype: torch.dtype | None = None, **kwargs: Any
) -> LatentAutoencoder:
    """Rebuild an autoencoder written by ``save_pretrained`` into ``directory``."""
    if os.path.isfile(os.path.join(directory, _S2D_CONFIG)):
        return SpaceToDepthAutoencoder.from_pretrained(directory)
    if os.path.isfile(os.path.join(directory, "config.json")):
        return WanAutoencoder.from_pretrained(directory, torch_dtype=torch_dtype, **kwargs)
    raise FileNotFoundError(f"{directory}: no autoencoder here (neither {_S2D_CONFIG} nor config.json)")
