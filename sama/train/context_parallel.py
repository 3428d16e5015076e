"""Ulysses context (sequence) parallelism for the SAMA transformer, applied from outside the model.

A 480p sample is long (about 41k tokens at 49 frames, 66k at 81), and self-attention's activations
grow with it. With ``parallel.context_parallel_size = cp`` the ranks of one context-parallel group
share one micro-batch and each holds ``1/cp`` of its token sequence through the transformer blocks:

* :meth:`SequenceParallel.shard` (called by ``SamaTransformer3DModel.forward`` once the full
  ``[source | semantic | target]`` sequence and its rotary tables are built) pads the sequence to a
  multiple of ``cp`` and keeps this rank's contiguous chunk of the tokens and of the rotary tables.
* Every block runs on the chunk. Everything but self-attention is per token; cross-attention reads
  the (replicated) text and needs no communication. Self-attention (``attn1``) runs
  :class:`UlyssesAttnProcessor`: projections, qk-norm and RoPE on the local tokens, one all-to-all
  turning ``(seq/cp, all heads)`` into ``(full seq, heads/cp)``, attention over the whole sequence
  for this rank's heads with the padded keys dropped, and a second all-to-all back.
* :meth:`SequenceParallel.gather` all-gathers the blocks' output and drops the padding, so the output
  head, the semantic head and the loss run on the full sequence, identically on every rank of the
  group; padded tokens never reach the loss.

Gradients. Each rank of a group computes the same full loss. The gather's backward sums the
(identical) upstream gradients of the group, a reduce-scatter, so on every rank the gradient of each
parameter is ``cp`` times this rank's share of the true gradient (the replicated output heads get
the full gradient on each rank, i.e. ``cp`` times ``1/cp``); summed over the group it is exactly
``cp`` times the gradient of the loss. Averaging gradients over all ``dp x cp`` ranks (FSDP2's
reduce-scatter over the flattened mesh, or DDP over the world) therefore gives the mean over the
data-parallel ranks of their batch gradients: the gradient of a run without context parallelism.
"""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.distributed as dist
import torch.nn.functional as F

__all__ = [
    "SequenceParallel",
    "ShardedRotary",
    "UlyssesAttnProcessor",
    "apply_context_parallel",
    "build_device_mesh",
    "check_heads",
]


def _group_of(mesh_or_group: Any) -> dist.ProcessGroup:
    from torch.distributed.device_mesh import DeviceMesh

    if isinstance(mesh_or_group, DeviceMesh):
        if mesh_or_group.ndim != 1:
            raise ValueError("context parallelism needs the 1-D context-parallel mesh (mesh['cp'])")
        return mesh_or_group.get_group()
    return mesh_or_group


class _AllToAll(torch.autograd.Function):
    """Equal-split all-to-all along dim 0; its adjoint is the same all-to-all."""

    @staticmethod
    def forward(ctx, tensor: torch.Tensor, group: dist.ProcessGroup) -> torch.Tensor:
        ctx.group = group
        tensor = tensor.contiguous()
        out = torch.empty_like(tensor)
        dist.all_to_all_single(out, tensor, group=group)
        return out

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        grad = grad.contiguous()
        out = torch.empty_like(grad)
        dist.all_to_all_single(out, grad, group=ctx.group)
        return out, None


class _GatherSequence(torch.autograd.Function):
    """All-gather ``(B, S_local, D)`` chunks into ``(B, cp * S_local, D)``; backward: reduce-scatter
    (sum) of the group's gradients (see the module docstring for why a sum)."""

    @staticmethod
    def forward(ctx, tensor: torch.Tensor, group: dist.ProcessGroup) -> torch.Tensor:
        ctx.group = group
        size = dist.get_world_size(group)
        tensor = tensor.contiguous()
        parts = [torch.empty_like(tensor) for _ in range(size)]
        dist.all_gather(parts, tensor, group=group)
        return torch.cat(parts, dim=1)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        group = ctx.group
        size = dist.get_world_size(group)
        batch, length = grad.shape[:2]
        # (B, cp * S_local, D) -> (cp * B, S_local, D): rows [r*B, (r+1)*B) are rank r's chunk.
        chunks = grad.unflatten(1, (size, length // size)).movedim(1, 0).flatten(0, 1).contiguous()
        out = grad.new_empty((batch, length // size, *grad.shape[2:]))
        dist.reduce_scatter_tensor(out, chunks, group=group)
        return out, None


class ShardedRotary(tuple):
    """This rank's ``(cos, sin)`` rotary chunk, carrying the unpadded full sequence length so the
    attention processor can drop the padded keys (a tuple, so the blocks pass it on unchanged)."""

    valid_length: int

    def __new__(cls, cos: torch.Tensor, sin: torch.Tensor, valid_length: int) -> ShardedRotary:
        self = super().__new__(cls, (cos, sin))
        self.valid_length = valid_length
        return self

    def __reduce__(self):
        return (ShardedRotary, (self[0], self[1], self.valid_length))


class SequenceParallel:
    """The hook ``SamaTransformer3DModel.forward`` calls around its blocks (``sequence_parallel``).

    Args:
        group: the context-parallel process group (or 1-D device mesh); its ranks share a batch.
    """

    def __init__(self, group: Any):
        self.group = _group_of(group)
        self.size = dist.get_world_size(self.group)
        self.rank = dist.get_rank(self.group)

    def padded_length(self, length: int) -> int:
        return math.ceil(length / self.size) * self.size

    def shard(
        self, sequence: torch.Tensor, rotary: tuple[torch.Tensor, torch.Tensor]
    ) -> tuple[torch.Tensor, ShardedRotary]:
        """``(B, L, D)`` sequence and ``(1, L, 1, d)`` rotary tables -> this rank's chunk of each.

        The sequence is zero-padded at the end to a multiple of the group size (the padding's
        rotary is the identity); the padded tokens are masked out as keys and dropped by
        :meth:`gather`.
        """
        length = sequence.shape[1]
        padded = self.padded_length(length)
        cos, sin = rotary
        if padded != length:
            extra = padded - length
            sequence = F.pad(sequence, (0, 0, 0, extra))
            cos = torch.cat([cos, cos.new_ones((*cos.shape[:1], extra, *cos.shape[2:]))], dim=1)
            sin = torch.cat([sin, sin.new_zeros((*sin.shape[:1], extra, *sin.shape[2:]))], dim=1)
        local = padded // self.size
        chunk = slice(self.rank * local, (self.rank + 1) * local)
        return sequence[:, chunk].contiguous(), ShardedRotary(cos[:, chunk], sin[:, chunk], length)

    def gather(self, sequence: torch.Tensor, length: int) -> torch.Tensor:
        """All-gather the ``(B, L_local, D)`` chunks and drop the padding: ``(B, length, D)``."""
        return _GatherSequence.apply(sequence, self.group)[:, :length]


def _apply_rotary(hidden: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    # diffusers' WanAttnProcessor rotation, unchanged.
    x1, x2 = hidden.unflatten(-1, (-1, 2)).unbind(-1)
    cos = cos[..., 0::2]
    sin = sin[..., 1::2]
    out = torch.empty_like(hidden)
    out[..., 0::2] = x1 * cos - x2 * sin
    out[..., 1::2] = x1 * sin + x2 * cos
    return out.type_as(hidden)


class UlyssesAttnProcessor:
    """Self-attention over a sequence sharded across a context-parallel group (Ulysses).

    Same math as diffusers' ``WanAttnProcessor`` for self-attention (no image context): q/k/v
    projections, qk-norm across all heads and RoPE run on the local tokens; one all-to-all sends
    each rank the full sequence for ``heads / cp`` heads; attention runs there (padded keys
    excluded); a second all-to-all returns this rank's tokens with every head for ``to_out``.
    """

    def __init__(self, group: Any):
        self.group = _group_of(group)
        self.size = dist.get_world_size(self.group)

    def __call__(
        self,
        attn,
        hidden_states: torch.Tensor,
        encoder_hidden_states: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        rotary_emb: tuple[torch.Tensor, torch.Tensor] | None = None,
    ) -> torch.Tensor:
        from diffusers.models.attention_dispatch import dispatch_attention_fn

        if encoder_hidden_states is not None or attention_mask is not None:
            raise ValueError("the Ulysses processor is for unmasked self-attention only")
        size = self.size
        heads = attn.heads
        if heads % size:
            raise ValueError(f"{heads} attention heads cannot be split over {size} context-parallel ranks")
        query = attn.norm_q(attn.to_q(hidden_states)).unflatten(2, (heads, -1))
        key = attn.norm_k(attn.to_k(hidden_states)).unflatten(2, (heads, -1))
        value = attn.to_v(hidden_states).unflatten(2, (heads, -1))
        if rotary_emb is not None:
            query = _apply_rotary(query, *rotary_emb)
            key = _apply_rotary(key, *rotary_emb)
        batch, local, _, head_dim = query.shape
        # (3, B, S_local, cp, H/cp, d) -> (cp, 3, B, S_local, H/cp, d): chunk j goes to rank j.
        qkv = torch.stack([query, key, value]).unflatten(3, (size, heads // size))
        qkv = _AllToAll.apply(qkv.permute(3, 0, 1, 2, 4, 5), self.group)
        # Received chunk j holds rank j's tokens: (3, B, cp * S_local, H/cp, d) in sequence order.
        qkv = qkv.permute(1, 2, 0, 3, 4, 5).flatten(2, 3)
        query, key, value = qkv.unbind(0)
        valid = getattr(rotary_emb, "valid_length", None)
        if valid is not None and valid < key.shape[1]:
            key = key[:, :valid]
            value = value[:, :valid]
        out = dispatch_attention_fn(query, key, value, attn_mask=None, dropout_p=0.0, is_causal=False)
        out = out.type_as(query)
        # (B, cp * S_local, H/cp, d) -> (cp, B, S_local, H/cp, d): sequence chunk j back to rank j.
        out = _AllToAll.apply(out.unflatten(1, (size, local)).movedim(1, 0), self.group)
        # Received chunk j holds head group j for this rank's tokens.
        out = out.permute(1, 2, 0, 3, 4).reshape(batch, local, heads * head_dim)
        out = attn.to_out[0](out)
        return attn.to_out[1](out)


def check_heads(num_heads: int, cp: int) -> None:
    if cp > 1 and num_heads % cp:
        raise ValueError(
            f"parallel.context_parallel_size={cp} must divide the transformer's {num_heads} attention "
            "heads (Ulysses splits the heads over the context-parallel ranks)"
        )


def apply_context_parallel(transformer, mesh: Any) -> None:
    """Shard ``transformer``'s sequence over ``mesh`` (the 1-D context-parallel mesh or group):
    install :class:`UlyssesAttnProcessor` on every block's self-attention and the
    :class:`SequenceParallel` hook on the model. Call on every rank of the group."""
    group = _group_of(mesh)
    size = dist.get_world_size(group)
    check_heads(int(transformer.config.num_attention_heads), size)
    processor = UlyssesAttnProcessor(group)
    for block in transformer.blocks:
        block.attn1.set_processor(processor)
    transformer.sequence_parallel = SequenceParallel(group)


def build_device_mesh(device_type: str, world_size: int, cp: int):
    """The 2-D ``("dp", "cp")`` device mesh: rank ``r`` is data-parallel rank ``r // cp`` and
    context-parallel rank ``r % cp`` (a context-parallel group is ``cp`` consecutive ranks, on one
    node when ``cp`` divides the GPUs per node)."""
    from torch.distributed.device_mesh import init_device_mesh

    if world_size % cp:
        raise ValueError(f"{world_size} workers cannot be split into context-parallel groups of {cp}")
    return init_device_mesh(device_type, (world_size // cp, cp), mesh_dim_names=("dp", "cp"))
