"""Semantic Anchoring: anchor frames, SigLIP features pooled into semantic tokens, projector and head.

SAMA.md, "Semantic Anchoring": N anchor frames are taken from the target video (the image itself
for an image sample); a SigLIP vision encoder turns each into a grid of patch features, pooled into
``grid_size**2`` local tokens (adaptive average pool of the patch grid) plus one global token (the
mean of all patches): 8x8 + 1 = 65 tokens per anchor frame. A two-layer MLP (the *projector*)
lifts them to the DiT width and a *head* on the last DiT layer maps them back to the SigLIP width.

Token order within an anchor frame is the 64 local tokens in row-major order, then the global
token; anchors follow each other in time order. The transformer relies on this order to place the
tokens in RoPE space (see :mod:`sama.models.transformer_sama`).

Only training needs the encoder: at inference the semantic tokens start from noise and are
discarded, so :class:`SemanticEncoder` is never part of an exported pipeline.
"""

from __future__ import annotations

from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn

__all__ = [
    "ANCHOR_SAMPLING",
    "HEAD_INITS",
    "SemanticEncoder",
    "SemanticHead",
    "SemanticProjector",
    "pool_patch_tokens",
    "sample_anchor_indices",
    "tokens_per_anchor",
]

ANCHOR_SAMPLING = ("random", "evenly_spaced", "first")
HEAD_INITS = ("default", "xavier")


def tokens_per_anchor(grid_size: int) -> int:
    """Semantic tokens per anchor frame: ``grid_size**2`` local tokens plus one global token."""
    return grid_size * grid_size + 1


class SemanticProjector(nn.Module):
    """SigLIP features -> DiT width: LayerNorm(in) -> Linear(in, hidden) -> GELU -> Linear(hidden, dim).

    SAMA.md (code): ``in = 1152`` (SigLIP so400m), ``hidden = 1024``; ``in`` follows the encoder's
    hidden size so tiny test encoders work too. ``eps`` is the LayerNorm's (the authors' 1e-6;
    PyTorch's default 1e-5 in the ``"sama"`` parity profile).
    """

    def __init__(self, semantic_dim: int, hidden_dim: int, dim: int, eps: float = 1e-5):
        super().__init__()
        self.norm = nn.LayerNorm(semantic_dim, eps=eps)
        self.fc1 = nn.Linear(semantic_dim, hidden_dim)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(hidden_dim, dim)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        """``(B, S, semantic_dim)`` -> ``(B, S, dim)``."""
        return self.fc2(self.act(self.fc1(self.norm(tokens))))


class SemanticHead(nn.Module):
    """Last DiT layer -> SigLIP width: LayerNorm(dim) -> Linear(dim, semantic_dim).

    It predicts the semantic tokens' velocity in the same convention as the video output (see
    :mod:`sama.losses`). ``eps`` is the LayerNorm's; ``init`` the Linear's initialisation:
    ``"default"`` (PyTorch's) or ``"xavier"`` (xavier-uniform weight, N(0, 1e-3) bias: the authors').
    """

    def __init__(self, dim: int, semantic_dim: int, eps: float = 1e-5, init: str = "default"):
        super().__init__()
        if init not in HEAD_INITS:
            raise ValueError(f"semantic head init must be one of {HEAD_INITS}, got {init!r}")
        self.init = init
        self.norm = nn.LayerNorm(dim, eps=eps)
        self.proj = nn.Linear(dim, semantic_dim)
        if init != "default":
            # The default is what nn.Linear just drew (no second draw: the RNG stream is unchanged).
            self._init_proj()

    @torch.no_grad()
    def _init_proj(self) -> None:
        if self.init == "xavier":
            nn.init.xavier_uniform_(self.proj.weight)
            nn.init.normal_(self.proj.bias, std=1e-3)
        else:
            self.proj.reset_parameters()

    @torch.no_grad()
    def reset_parameters(self) -> None:
        """(Re)initialise the LayerNorm and the Linear (the latter as ``init`` says)."""
        self.norm.reset_parameters()
        self._init_proj()

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        """``(B, S, dim)`` -> ``(B, S, semantic_dim)``."""
        return self.proj(self.norm(hidden_states))


def sample_anchor_indices(
    num_frames: int,
    num_anchors: int,
    mode: Literal["random", "evenly_spaced", "first"] = "random",
    generator: torch.Generator | None = None,
) -> list[int]:
    """Frame indices of the anchor frames, in increasing order.

    ``"random"`` draws ``num_anchors`` distinct frames uniformly at random (SAMA.md: "sampled
    uniformly from the target video"); ``"evenly_spaced"`` takes the centres of ``num_anchors``
    equal segments (deterministic, for evaluation); ``"first"`` takes the first ``num_anchors``
    frames, i.e. frame 0 for one anchor (the authors' release, ``SigLIPFirstFrameEncoder``). When
    the clip has fewer frames than anchors (an image has one) frames are reused, so every sample
    yields the same number of tokens and a batch stays rectangular.
    """
    if num_frames < 1:
        raise ValueError(f"cannot pick anchor frames from {num_frames} frames")
    if num_anchors < 1:
        raise ValueError(f"num_anchors must be at least 1, got {num_anchors}")
    if mode not in ANCHOR_SAMPLING:
        raise ValueError(f"anchor sampling must be one of {ANCHOR_SAMPLING}, got {mode!r}")
    if mode == "first":
        return [min(i, num_frames - 1) for i in range(num_anchors)]
    if mode == "evenly_spaced" or num_frames < num_anchors:
        return [min(num_frames - 1, int((i + 0.5) * num_frames / num_anchors)) for i in range(num_anchors)]
    device = generator.device if generator is not None else "cpu"
    order = torch.randperm(num_frames, generator=generator, device=device)[:num_anchors]
    return sorted(int(i) for i in order.tolist())


def pool_patch_tokens(patch_tokens: torch.Tensor, grid_size: int) -> torch.Tensor:
    """Pool a square patch grid into ``grid_size**2`` local tokens plus one global token.

    ``patch_tokens`` is ``(B, P, D)`` with ``P`` a perfect square (SigLIP without a class token);
    the result is ``(B, grid_size**2 + 1, D)``: the adaptive-average-pooled grid in row-major order,
    then the mean over all patches.
    """
    batch, num_patches, dim = patch_tokens.shape
    side = round(num_patches**0.5)
    if side * side != num_patches:
        raise ValueError(f"expected a square patch grid, got {num_patches} patch tokens")
    grid = patch_tokens.transpose(1, 2).reshape(batch, dim, side, side)
    local = F.adaptive_avg_pool2d(grid, grid_size).flatten(2).transpose(1, 2)
    global_token = patch_tokens.mean(dim=1, keepdim=True)
    return torch.cat([local, global_token], dim=1)


class SemanticEncoder(nn.Module):
    """Frozen SigLIP vision tower + pooling: frames in ``[-1, 1]`` -> clean semantic tokens.

    Args:
        vision_model: a ``transformers.SiglipVisionModel`` (real weights or a tiny random config).
        grid_size: side of the pooled local grid (8 -> 64 local tokens).
        num_anchors: anchor frames per sample (SAMA.md: N = 1).
        anchor_sampling: ``"random"`` (training), ``"evenly_spaced"`` or ``"first"`` (frame 0).
        normalize: apply a parameter-free LayerNorm to every token so the targets have the unit
            scale of the Gaussian noise they are mixed with (a project choice; SAMA.md is silent).

    The encoder is put in eval mode with gradients off; it never trains.
    """

    def __init__(
        self,
        vision_model: nn.Module,
        grid_size: int = 8,
        num_anchors: int = 1,
        anchor_sampling: Literal["random", "evenly_spaced", "first"] = "random",
        normalize: bool = True,
    ):
        super().__init__()
        if anchor_sampling not in ANCHOR_SAMPLING:
            raise ValueError(f"anchor_sampling must be one of {ANCHOR_SAMPLING}, got {anchor_sampling!r}")
        self.vision_model = vision_model
        self.grid_size = int(grid_size)
        self.num_anchors = int(num_anchors)
        self.anchor_sampling = anchor_sampling
        self.normalize = bool(normalize)
        self.vision_model.requires_grad_(False)
        self.vision_model.eval()

    def train(self, mode: bool = True) -> SemanticEncoder:
        # Frozen: stays in eval mode whatever the surrounding module does.
        super().train(False)
        return self

    @property
    def hidden_size(self) -> int:
        """Width of the semantic tokens (1152 for SigLIP so400m)."""
        return int(self.vision_model.config.hidden_size)

    @property
    def image_size(self) -> int:
        size = self.vision_model.config.image_size
        return int(size[0] if isinstance(size, list | tuple) else size)

    @property
    def tokens_per_sample(self) -> int:
        """Semantic tokens per sample: ``num_anchors * (grid_size**2 + 1)``."""
        return self.num_anchors * tokens_per_anchor(self.grid_size)

    @torch.no_grad()
    def encode_images(self, images: torch.Tensor) -> torch.Tensor:
        """``(B, 3, H, W)`` floats in ``[-1, 1]`` -> ``(B, grid_size**2 + 1, hidden_size)`` tokens.

        Frames are resized (bicubic, antialiased, aspect not kept) to the encoder's square input as
        SigLIP's own image processor does; SigLIP's mean/std of 0.5 make ``[-1, 1]`` its input range.
        """
        param = next(self.vision_model.parameters())
        size = self.image_size
        pixels = images.to(device=param.device, dtype=torch.float32)
        if pixels.shape[-2:] != (size, size):
            pixels = F.interpolate(
                pixels, size=(size, size), mode="bicubic", antialias=True, align_corners=False
            )
        pixels = pixels.clamp(-1.0, 1.0).to(param.dtype)
        patches = self.vision_model(pixel_values=pixels).last_hidden_state
        tokens = pool_patch_tokens(patches.float(), self.grid_size)
        if self.normalize:
            tokens = F.layer_norm(tokens, tokens.shape[-1:])
        return tokens

    @torch.no_grad()
    def forward(self, frames: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        """Anchor tokens of a batch of clips.

        Args:
            frames: ``(B, 3, T, H, W)`` floats in ``[-1, 1]`` (the *target* clip; ``T = 1`` for images).
            generator: drives the random anchor choice.

        Returns:
            ``(B, num_anchors * (grid_size**2 + 1), hidden_size)`` float32 tokens, anchors in time order.
        """
        if frames.ndim != 5:
            raise ValueError(f"frames must be (B, 3, T, H, W), got {tuple(frames.shape)}")
        batch, _, num_frames = frames.shape[:3]
        picked = []
        for b in range(batch):
            idx = sample_anchor_indices(num_frames, self.num_anchors, self.anchor_sampling, generator)
            picked.append(frames[b, :, idx].transpose(0, 1))
        images = torch.cat(picked, dim=0)
        tokens = self.encode_images(images)
        return tokens.reshape(batch, self.num_anchors * tokens.shape[1], tokens.shape[2])
