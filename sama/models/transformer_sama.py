"""The SAMA transformer: Wan's video DiT with in-context source and semantic tokens.

:class:`SamaTransformer3DModel` subclasses diffusers' ``WanTransformer3DModel`` and runs its own
submodules (``rope``, ``patch_embedding``, ``condition_embedder``, ``blocks``, ``norm_out``,
``proj_out``, ``scale_shift_table``) on a longer token sequence (SAMA.md, order from the authors'
code)::

    [ source tokens | semantic tokens | noisy target tokens ]

* **Type embedding.** A learned embedding of 3 types (0 source, 1 semantic, 2 target) is added to
  every token after patchify. It starts at zero, so a fresh model built from Wan weights predicts
  exactly what Wan predicts for a sample without source and without semantic tokens.
* **RoPE.** Target tokens get Wan's 3D RoPE of their (t, h, w) patch grid. Source tokens reuse the
  same positions: RoPE of the *source's own* grid starting at 0, which for an equal-shaped source is
  identical to the target's; a shorter source (speed perturbation) gets the positions of its own
  frames ``0..T_src-1`` with the same frequencies.
* **Semantic tokens** (``semantic_rope``):
    - ``"grid"`` (default): anchor frame ``k`` sits on a virtual frame at temporal position
      ``-(k + 1)``, before the video, so it never shares a position with a video token; its
      local token ``(r, c)`` sits at the centre of pooled cell ``(r, c)`` projected onto the
      target's latent patch grid (fractional positions), and its global token at the grid centre.
      Every semantic token is thus distinct from the others and spatially aligned with the region
      it summarises.
    - ``"zero"``: the identity rotation (position (0, 0, 0)) for every semantic token. The tokens
      then carry no order at all, which makes it impossible to tell the 64 local tokens apart
      while they are still noise; kept as an ablation knob.
    - ``"null"``: cos = sin = 0 for every semantic token, as the authors' release does (its
      ``rope_apply`` multiplies their q and k by a complex zero): diffusers' Wan attention rotates
      as ``x * cos + rotate(x) * sin``, so the semantic tokens' rotated queries and keys are exactly
      zero in every self-attention layer. They then attend uniformly to the whole sequence and
      every token gives them the same score 0; they still read values and are read through the
      values. The ``"authors"`` parity profile (:mod:`sama.models.parity`).
* **Timestep.** One timestep per sample, embedded and applied to every token as Wan does; clean
  source tokens get the same modulation as the noisy ones.

Outputs are in Wan's native convention, kept so the pretrained weights stay meaningful: the video
output is the diffusers flow-matching "velocity" ``dx/dsigma = noise - clean`` for the target
latents, and the semantic head output is the same quantity for the semantic tokens. SAMA.md's
``v = x1 - x0`` is its negative; :mod:`sama.losses` does the conversion.
"""

from __future__ import annotations

import inspect
import math
from dataclasses import dataclass
from typing import Any, Literal

import torch
from diffusers import WanTransformer3DModel
from diffusers.configuration_utils import register_to_config
from diffusers.utils import BaseOutput
from torch import nn

from sama.models.semantic import SemanticHead, SemanticProjector, tokens_per_anchor

__all__ = [
    "NUM_TOKEN_TYPES",
    "SEMANTIC_ROPE_MODES",
    "TOKEN_TYPE_SEMANTIC",
    "TOKEN_TYPE_SOURCE",
    "TOKEN_TYPE_TARGET",
    "SamaTransformer3DModel",
    "SamaTransformerOutput",
    "SequenceLayout",
]

TOKEN_TYPE_SOURCE = 0
TOKEN_TYPE_SEMANTIC = 1
TOKEN_TYPE_TARGET = 2
NUM_TOKEN_TYPES = 3
SEMANTIC_ROPE_MODES = ("grid", "zero", "null")

# Parameters that exist only in SAMA, not in a Wan checkpoint.
_NEW_PARAMETER_PREFIXES = ("type_embedding.", "semantic_projector.", "semantic_head.")


@dataclass(frozen=True)
class SequenceLayout:
    """Where each part of the token sequence lives.

    Grids are post-patchify ``(frames, height, width)`` token grids; slices index the sequence.
    """

    source_grid: tuple[int, int, int] | None
    num_semantic: int
    target_grid: tuple[int, int, int]

    @property
    def num_source(self) -> int:
        return math.prod(self.source_grid) if self.source_grid is not None else 0

    @property
    def num_target(self) -> int:
        return math.prod(self.target_grid)

    @property
    def length(self) -> int:
        return self.num_source + self.num_semantic + self.num_target

    @property
    def source(self) -> slice:
        return slice(0, self.num_source)

    @property
    def semantic(self) -> slice:
        return slice(self.num_source, self.num_source + self.num_semantic)

    @property
    def target(self) -> slice:
        return slice(self.num_source + self.num_semantic, self.length)

    def type_ids(self, device: torch.device | str | None = None) -> torch.Tensor:
        """``(length,)`` long tensor of token types (0 source, 1 semantic, 2 target)."""
        return torch.cat(
            [
                torch.full((self.num_source,), TOKEN_TYPE_SOURCE, dtype=torch.long, device=device),
                torch.full((self.num_semantic,), TOKEN_TYPE_SEMANTIC, dtype=torch.long, device=device),
                torch.full((self.num_target,), TOKEN_TYPE_TARGET, dtype=torch.long, device=device),
            ]
        )


@dataclass
class SamaTransformerOutput(BaseOutput):
    """Transformer output.

    Attributes:
        sample: ``(B, C, T, H, W)`` target prediction in Wan's convention (``noise - clean``).
        semantic: ``(B, S, semantic_dim)`` semantic-head prediction in the same convention, or
            None when no semantic tokens were given.
    """

    sample: torch.Tensor
    semantic: torch.Tensor | None = None


class SamaTransformer3DModel(WanTransformer3DModel):
    """Wan's DiT with SAMA's in-context conditioning (see the module docstring).

    The first block of arguments is ``WanTransformer3DModel``'s, unchanged. SAMA adds:

    Args:
        semantic_dim: width of the semantic tokens (the SigLIP hidden size, 1152 for so400m);
            None builds a model without a semantic branch (no projector or head).
        semantic_hidden_dim: hidden width of the projector MLP (1024 in the authors' code).
        semantic_grid_size: side of the pooled local grid; one anchor frame has
            ``semantic_grid_size**2 + 1`` tokens.
        semantic_rope: ``"grid"``, ``"zero"`` or ``"null"`` (see the module docstring).
        semantic_layernorm_eps: eps of the projector's and the head's LayerNorm (1e-5, PyTorch's
            default; the authors' release uses 1e-6).
        semantic_head_init: ``"default"`` (PyTorch's Linear init) or ``"xavier"`` (xavier-uniform
            weight, N(0, 1e-3) bias: the authors') for the head's Linear.

    ``save_pretrained``/``from_pretrained`` are diffusers' and round-trip the SAMA config too.

    ``sequence_parallel`` (default None) is the context-parallelism hook: an object with
    ``shard(sequence, rotary) -> (local sequence, local rotary)``, called on the full sequence and
    rotary tables before the blocks, and ``gather(local sequence, length) -> sequence`` after them
    (:func:`sama.train.context_parallel.apply_context_parallel` sets it). Not part of the config.
    """

    # Context parallelism plans are written for Wan's own forward; this one builds its sequence
    # differently, so the inherited plan must not be applied.
    _cp_plan = None

    @register_to_config
    def __init__(
        self,
        patch_size: tuple[int, ...] = (1, 2, 2),
        num_attention_heads: int = 40,
        attention_head_dim: int = 128,
        in_channels: int = 16,
        out_channels: int = 16,
        text_dim: int = 4096,
        freq_dim: int = 256,
        ffn_dim: int = 13824,
        num_layers: int = 40,
        cross_attn_norm: bool = True,
        qk_norm: str | None = "rms_norm_across_heads",
        eps: float = 1e-6,
        image_dim: int | None = None,
        added_kv_proj_dim: int | None = None,
        rope_max_seq_len: int = 1024,
        pos_embed_seq_len: int | None = None,
        semantic_dim: int | None = 1152,
        semantic_hidden_dim: int = 1024,
        semantic_grid_size: int = 8,
        semantic_rope: Literal["grid", "zero", "null"] = "grid",
        semantic_layernorm_eps: float = 1e-5,
        semantic_head_init: Literal["default", "xavier"] = "default",
    ) -> None:
        super().__init__(
            patch_size=patch_size,
            num_attention_heads=num_attention_heads,
            attention_head_dim=attention_head_dim,
            in_channels=in_channels,
            out_channels=out_channels,
            text_dim=text_dim,
            freq_dim=freq_dim,
            ffn_dim=ffn_dim,
            num_layers=num_layers,
            cross_attn_norm=cross_attn_norm,
            qk_norm=qk_norm,
            eps=eps,
            image_dim=image_dim,
            added_kv_proj_dim=added_kv_proj_dim,
            rope_max_seq_len=rope_max_seq_len,
            pos_embed_seq_len=pos_embed_seq_len,
        )
        if image_dim is not None or added_kv_proj_dim is not None:
            raise ValueError(
                "SAMA builds on the text-to-video Wan models; image cross-attention is not supported"
            )
        if semantic_rope not in SEMANTIC_ROPE_MODES:
            raise ValueError(f"semantic_rope must be one of {SEMANTIC_ROPE_MODES}, got {semantic_rope!r}")
        if semantic_grid_size < 1:
            raise ValueError(f"semantic_grid_size must be positive, got {semantic_grid_size}")
        inner_dim = num_attention_heads * attention_head_dim
        self.type_embedding = nn.Embedding(NUM_TOKEN_TYPES, inner_dim)
        self.semantic_projector: SemanticProjector | None = None
        self.semantic_head: SemanticHead | None = None
        if semantic_dim is not None:
            self.semantic_projector = SemanticProjector(
                semantic_dim, semantic_hidden_dim, inner_dim, eps=semantic_layernorm_eps
            )
            self.semantic_head = SemanticHead(
                inner_dim, semantic_dim, eps=semantic_layernorm_eps, init=semantic_head_init
            )
        self.init_sama_parameters()
        # Context parallelism hook (see forward); set by sama.train.context_parallel.
        self.sequence_parallel: Any = None

    # ----------------------------------------------------------------------------------------
    # Construction from Wan

    def init_sama_parameters(self) -> None:
        """(Re)initialise the SAMA-only parameters: zero type embedding, default-initialised MLPs
        (the head's Linear as ``semantic_head_init`` says).

        A zero type embedding makes the model start as the base Wan model on target-only input.
        """
        with torch.no_grad():
            self.type_embedding.weight.zero_()
        for module in (self.semantic_projector, self.semantic_head):
            if module is None:
                continue
            for layer in module.modules():
                if isinstance(layer, nn.Linear | nn.LayerNorm):
                    layer.reset_parameters()
        if self.semantic_head is not None and self.semantic_head.init != "default":
            self.semantic_head.reset_parameters()

    @torch.no_grad()
    def init_attention_locality(self, strength: float) -> None:
        """Start every self-attention head with a preference for its own position.

        A randomly initialised DiT attends almost uniformly, so a target token first has to learn
        *where* its source token is before it can learn to copy it; a pretrained Wan has local
        attention heads from the start, and source tokens share the target's RoPE positions, so it
        finds them at once. This gives a random model the same start: the query and key biases of
        every head get a constant component on the three fastest rotary pairs of each axis (t, h,
        w), with the qk-norm gain ``strength`` on those elements and a bias of ``1.5 * strength``.
        RoPE turns the product of two such constants into a sum of cosines of the positions'
        offset, largest at offset zero, so each head's score peaks at its own position, and at the
        source token that shares it. Content terms start as diffusers initialised them; training
        reshapes everything. ``strength <= 0`` does nothing.
        """
        if strength <= 0:
            return
        rope = self.rope
        head_dim = int(self.config.attention_head_dim)
        axis_starts = (0, rope.t_dim, rope.t_dim + rope.h_dim)
        axis_sizes = (rope.t_dim, rope.h_dim, rope.w_dim)
        # The first element of each rotary pair (pairs are adjacent elements, fastest first).
        elements = [
            start + 2 * k
            for start, size in zip(axis_starts, axis_sizes, strict=True)
            for k in range(min(3, size // 2))
        ]
        index = torch.tensor(
            [head * head_dim + e for head in range(int(self.config.num_attention_heads)) for e in elements]
        )
        for block in self.blocks:
            attention = block.attn1
            for projection, norm in ((attention.to_q, attention.norm_q), (attention.to_k, attention.norm_k)):
                projection.bias[index] = 1.5 * strength
                if getattr(norm, "weight", None) is not None:
                    norm.weight[index] = strength

    @classmethod
    def wan_config_keys(cls) -> tuple[str, ...]:
        """The constructor arguments shared with ``WanTransformer3DModel``."""
        return tuple(p for p in inspect.signature(WanTransformer3DModel.__init__).parameters if p != "self")

    @classmethod
    def from_wan(
        cls,
        base: WanTransformer3DModel,
        *,
        semantic_dim: int | None = 1152,
        semantic_hidden_dim: int = 1024,
        semantic_grid_size: int = 8,
        semantic_rope: Literal["grid", "zero", "null"] = "grid",
        semantic_layernorm_eps: float = 1e-5,
        semantic_head_init: Literal["default", "xavier"] = "default",
    ) -> SamaTransformer3DModel:
        """A SAMA model holding ``base``'s weights, with freshly initialised SAMA parameters.

        The base model's tensors are *reused* (not copied), so building from a 14B model does not
        double its memory; do not use ``base`` afterwards. The new parameters are created on the
        base model's device and dtype.
        """
        from accelerate import init_empty_weights

        wan_keys = set(cls.wan_config_keys())
        config = {k: v for k, v in base.config.items() if k in wan_keys}
        with init_empty_weights():
            model = cls(
                **config,
                semantic_dim=semantic_dim,
                semantic_hidden_dim=semantic_hidden_dim,
                semantic_grid_size=semantic_grid_size,
                semantic_rope=semantic_rope,
                semantic_layernorm_eps=semantic_layernorm_eps,
                semantic_head_init=semantic_head_init,
            )
        result = model.load_state_dict(base.state_dict(), strict=False, assign=True)
        if result.unexpected_keys:
            raise ValueError(f"Wan weights have keys the SAMA model lacks: {result.unexpected_keys[:5]}")
        foreign = [k for k in result.missing_keys if not k.startswith(_NEW_PARAMETER_PREFIXES)]
        if foreign:
            raise ValueError(f"Wan weights are missing keys the SAMA model needs: {foreign[:5]}")
        reference = next(base.parameters())
        new_modules = [model.type_embedding, model.semantic_projector, model.semantic_head]
        for module in new_modules:
            if module is not None:
                module.to_empty(device=reference.device)
        model.init_sama_parameters()
        for module in new_modules:
            if module is not None:
                module.to(dtype=reference.dtype)
        model.train(base.training)
        return model

    # ----------------------------------------------------------------------------------------
    # Sequence assembly

    @property
    def inner_dim(self) -> int:
        return int(self.config.num_attention_heads * self.config.attention_head_dim)

    @property
    def semantic_tokens_per_anchor(self) -> int:
        return tokens_per_anchor(int(self.config.semantic_grid_size))

    def token_grid(self, latent_shape: tuple[int, ...] | torch.Size) -> tuple[int, int, int]:
        """Post-patchify ``(frames, height, width)`` of a ``(B, C, T, H, W)`` latent."""
        _, _, frames, height, width = latent_shape
        p_t, p_h, p_w = self.config.patch_size
        if frames % p_t or height % p_h or width % p_w:
            raise ValueError(
                f"latent of shape {tuple(latent_shape)} is not divisible by the patch size "
                f"{tuple(self.config.patch_size)}"
            )
        return frames // p_t, height // p_h, width // p_w

    def sequence_layout(
        self,
        target_shape: tuple[int, ...] | torch.Size,
        source_shape: tuple[int, ...] | torch.Size | None = None,
        num_semantic: int = 0,
    ) -> SequenceLayout:
        """The layout of ``[source | semantic | target]`` for these input shapes."""
        source_grid = self.token_grid(source_shape) if source_shape is not None else None
        return SequenceLayout(source_grid, int(num_semantic), self.token_grid(target_shape))

    def _patchify(self, latents: torch.Tensor) -> torch.Tensor:
        tokens = self.patch_embedding(latents)
        return tokens.flatten(2).transpose(1, 2)

    def embed_tokens(
        self,
        hidden_states: torch.Tensor,
        source_latents: torch.Tensor | None = None,
        semantic_tokens: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, SequenceLayout]:
        """Patchify / project every part, concatenate and add the type embedding.

        Returns the ``(B, L, dim)`` sequence and its layout.
        """
        batch = hidden_states.shape[0]
        parts = []
        if source_latents is not None:
            if source_latents.shape[0] != batch or source_latents.shape[1] != hidden_states.shape[1]:
                raise ValueError(
                    f"source latents {tuple(source_latents.shape)} do not match target latents "
                    f"{tuple(hidden_states.shape)} in batch size and channels"
                )
            parts.append(self._patchify(source_latents))
        num_semantic = 0
        if semantic_tokens is not None:
            if self.semantic_projector is None:
                raise ValueError("semantic tokens were given but this model has no semantic branch")
            if semantic_tokens.ndim != 3 or semantic_tokens.shape[0] != batch:
                raise ValueError(
                    f"semantic tokens must be (B={batch}, S, D), got {tuple(semantic_tokens.shape)}"
                )
            num_semantic = semantic_tokens.shape[1]
            if num_semantic % self.semantic_tokens_per_anchor:
                raise ValueError(
                    f"{num_semantic} semantic tokens is not a whole number of anchor frames of "
                    f"{self.semantic_tokens_per_anchor} tokens"
                )
            parts.append(self.semantic_projector(semantic_tokens))
        target = self._patchify(hidden_states)
        parts.append(target)
        layout = self.sequence_layout(
            hidden_states.shape, source_latents.shape if source_latents is not None else None, num_semantic
        )
        dtype = target.dtype
        sequence = torch.cat([p.to(dtype) for p in parts], dim=1)
        types = self.type_embedding(layout.type_ids(sequence.device)).to(dtype)
        # flatten+transpose leaves a non-contiguous tensor; the blocks want a contiguous one.
        return (sequence + types.unsqueeze(0)).contiguous(), layout

    # ----------------------------------------------------------------------------------------
    # Rotary embeddings

    def _semantic_positions(self, layout: SequenceLayout, device: torch.device) -> torch.Tensor:
        """``(S, 3)`` float64 (t, h, w) positions of the semantic tokens in ``"grid"`` mode."""
        grid = int(self.config.semantic_grid_size)
        per_anchor = self.semantic_tokens_per_anchor
        num_anchors = layout.num_semantic // per_anchor
        _, height, width = layout.target_grid
        cells = torch.arange(grid, dtype=torch.float64, device=device)
        rows = (cells + 0.5) * height / grid - 0.5
        cols = (cells + 0.5) * width / grid - 0.5
        local_h = rows.repeat_interleave(grid)
        local_w = cols.repeat(grid)
        centre_h = torch.tensor([(height - 1) / 2.0], dtype=torch.float64, device=device)
        centre_w = torch.tensor([(width - 1) / 2.0], dtype=torch.float64, device=device)
        h = torch.cat([local_h, centre_h])
        w = torch.cat([local_w, centre_w])
        positions = []
        for k in range(num_anchors):
            t = torch.full((per_anchor,), -(k + 1.0), dtype=torch.float64, device=device)
            positions.append(torch.stack([t, h, w], dim=1))
        return torch.cat(positions)

    def _rope_at(self, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Wan's RoPE evaluated at arbitrary (fractional) ``(S, 3)`` positions."""
        rope = self.rope
        cos_table, sin_table = rope.freqs_cos, rope.freqs_sin
        # The per-channel base angles, read back from the table at position 1, so the frequencies
        # are exactly the ones the module was built with (whatever its theta).
        base = torch.atan2(sin_table[1].double(), cos_table[1].double()).to(positions.device)
        axis = torch.cat(
            [
                torch.zeros(rope.t_dim, dtype=torch.long),
                torch.ones(rope.h_dim, dtype=torch.long),
                torch.full((rope.w_dim,), 2, dtype=torch.long),
            ]
        ).to(positions.device)
        angles = positions.double()[:, axis] * base
        dtype = cos_table.dtype
        return angles.cos().to(dtype)[None, :, None, :], angles.sin().to(dtype)[None, :, None, :]

    def rotary_embedding(
        self,
        layout: SequenceLayout,
        hidden_states: torch.Tensor,
        source_latents: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """``(cos, sin)``, each ``(1, L, 1, head_dim)``, for the ``[source | semantic | target]`` sequence."""
        target_cos, target_sin = self.rope(hidden_states)
        cos_parts, sin_parts = [], []
        if source_latents is not None:
            source_cos, source_sin = self.rope(source_latents)
            cos_parts.append(source_cos)
            sin_parts.append(source_sin)
        if layout.num_semantic:
            mode = self.config.semantic_rope
            if mode in ("zero", "null"):
                shape = (1, layout.num_semantic, 1, target_cos.shape[-1])
                fill = torch.ones if mode == "zero" else torch.zeros
                cos_parts.append(fill(shape, dtype=target_cos.dtype, device=target_cos.device))
                sin_parts.append(torch.zeros(shape, dtype=target_sin.dtype, device=target_sin.device))
            else:
                positions = self._semantic_positions(layout, target_cos.device)
                semantic_cos, semantic_sin = self._rope_at(positions)
                cos_parts.append(semantic_cos)
                sin_parts.append(semantic_sin)
        if not cos_parts:
            return target_cos, target_sin
        return torch.cat([*cos_parts, target_cos], dim=1), torch.cat([*sin_parts, target_sin], dim=1)

    # ----------------------------------------------------------------------------------------
    # Forward

    def forward(
        self,
        hidden_states: torch.Tensor,
        timestep: torch.Tensor,
        encoder_hidden_states: torch.Tensor,
        source_latents: torch.Tensor | None = None,
        semantic_tokens: torch.Tensor | None = None,
        return_dict: bool = True,
        attention_kwargs: dict[str, Any] | None = None,
    ) -> SamaTransformerOutput | tuple[torch.Tensor, torch.Tensor | None]:
        """Predict the target and semantic velocities.

        Args:
            hidden_states: ``(B, C, T, H, W)`` noisy target latents.
            timestep: ``(B,)`` Wan timesteps, ``sigma * 1000`` (sigma = 1 is pure noise).
            encoder_hidden_states: ``(B, L, text_dim)`` text embeddings (zero-padded, as Wan).
            source_latents: ``(B, C, T_src, H_src, W_src)`` clean source latents, or None for a
                text-to-video sample. ``T_src`` may differ from ``T`` (speed perturbation).
            semantic_tokens: ``(B, S, semantic_dim)`` noisy semantic tokens
                (``S = anchors * (grid**2 + 1)``), or None to run without the semantic branch.
            return_dict: return a :class:`SamaTransformerOutput` rather than a tuple.
            attention_kwargs: accepted for API compatibility with diffusers; LoRA scaling
                through it is not supported.

        Returns:
            :class:`SamaTransformerOutput` (``sample``, ``semantic``), in Wan's ``noise - clean``
            convention.
        """
        if attention_kwargs and attention_kwargs.get("scale", 1.0) != 1.0:
            raise ValueError(
                "attention_kwargs['scale'] (LoRA scaling) is not supported by the SAMA transformer"
            )
        if timestep.ndim != 1:
            raise ValueError(
                f"timestep must be one value per sample, shape (B,), got {tuple(timestep.shape)}"
            )
        batch_size = hidden_states.shape[0]
        p_t, p_h, p_w = self.config.patch_size

        sequence, layout = self.embed_tokens(hidden_states, source_latents, semantic_tokens)
        rotary_emb = self.rotary_embedding(layout, hidden_states, source_latents)

        temb, timestep_proj, encoder_hidden_states, _ = self.condition_embedder(
            timestep, encoder_hidden_states, None, timestep_seq_len=None
        )
        timestep_proj = timestep_proj.unflatten(1, (6, -1))

        # Context parallelism (sama.train.context_parallel): the blocks run on this rank's chunk of
        # the sequence with the matching rotary chunk, and the full sequence is gathered after them.
        # None (the default) is the plain single-device path.
        sequence_parallel = getattr(self, "sequence_parallel", None)
        if sequence_parallel is not None:
            sequence, rotary_emb = sequence_parallel.shard(sequence, rotary_emb)

        if torch.is_grad_enabled() and self.gradient_checkpointing:
            for block in self.blocks:
                sequence = self._gradient_checkpointing_func(
                    block, sequence, encoder_hidden_states, timestep_proj, rotary_emb
                )
        else:
            for block in self.blocks:
                sequence = block(sequence, encoder_hidden_states, timestep_proj, rotary_emb)
        if sequence_parallel is not None:
            sequence = sequence_parallel.gather(sequence, layout.length)

        semantic_out = None
        if layout.num_semantic:
            semantic_out = self.semantic_head(sequence[:, layout.semantic])

        hidden = sequence[:, layout.target] if layout.length != layout.num_target else sequence
        shift, scale = (self.scale_shift_table.to(temb.device) + temb.unsqueeze(1)).chunk(2, dim=1)
        shift = shift.to(hidden.device)
        scale = scale.to(hidden.device)
        hidden = (self.norm_out(hidden.float()) * (1 + scale) + shift).type_as(hidden)
        hidden = self.proj_out(hidden)

        frames, height, width = layout.target_grid
        hidden = hidden.reshape(batch_size, frames, height, width, p_t, p_h, p_w, -1)
        hidden = hidden.permute(0, 7, 1, 4, 2, 5, 3, 6)
        output = hidden.flatten(6, 7).flatten(4, 5).flatten(2, 3)

        if not return_dict:
            return output, semantic_out
        return SamaTransformerOutput(sample=output, semantic=semantic_out)
