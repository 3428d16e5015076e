"""The one FLOP model and the one peak table: what ``perf/mfu`` (training) and
``bench/model_step.py`` both divide by.

FLOPs per sample and step (model FLOPs, forward + backward = 3 x forward; the recomputation done by
activation checkpointing is not counted, so MFU is "model FLOPs utilisation")::

    F = 6 * (N_tok * S + N_txt * S_txt) + 12 * L * d * S**2 + 12 * L * d * S * S_txt

with ``S`` the sequence length (source + semantic + target tokens), ``S_txt`` the text length, ``L``
layers, ``d`` width, ``N_tok`` the parameters applied to every sequence token (the blocks' linear
layers except cross-attention keys/values, plus the patch embedding, output projection, semantic
projector and head, each counted for the tokens it sees) and ``N_txt`` those applied to text tokens
(text embedder, cross-attention keys/values). ``12 L d S^2`` is self-attention (QK^T and AV, 2 FLOPs
per multiply-add, x3 for the backward), ``12 L d S S_txt`` cross-attention.

Peak: the dense bf16 FLOP/s of the GPU, chosen by device name (H100, H200 and GH200 SXM: 989
TFLOP/s; A100: 312); None on a CPU or an unknown GPU (then no MFU is reported).
"""

from __future__ import annotations

import torch
from torch import nn

__all__ = ["PEAK_BF16_FLOPS", "batch_flops", "get_peak_flops", "step_flops"]

# Dense bf16 peak FLOP/s by a substring of the device name.
PEAK_BF16_FLOPS = {"GH200": 989e12, "H200": 989e12, "H100": 989e12, "A100": 312e12}


def get_peak_flops(device: torch.device, override: float | None = None) -> float | None:
    """The device's dense bf16 peak FLOP/s (``override`` when given); None when unknown."""
    if override is not None:
        return override
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    return next((value for key, value in PEAK_BF16_FLOPS.items() if key in name), None)


def _linear_params(module: nn.Module | None) -> int:
    if module is None:
        return 0
    return sum(m.weight.numel() for m in module.modules() if isinstance(m, nn.Linear | nn.Conv3d))


def step_flops(
    transformer, num_source: int, num_semantic: int, num_target: int, text_len: int
) -> dict[str, float]:
    """Model FLOPs of one training step for one sample (the module docstring's ``F``), split into
    ``dense`` and ``attention``, with ``total``, ``params_per_token`` and ``seq``."""
    config = transformer.config
    layers, width = int(config.num_layers), int(config.num_attention_heads * config.attention_head_dim)
    seq = num_source + num_semantic + num_target
    per_token_block = 0
    per_text = _linear_params(transformer.condition_embedder.text_embedder)
    for block in transformer.blocks:
        per_token_block += _linear_params(block.attn1) + _linear_params(block.ffn)
        per_token_block += block.attn2.to_q.weight.numel() + block.attn2.to_out[0].weight.numel()
        per_text += block.attn2.to_k.weight.numel() + block.attn2.to_v.weight.numel()
    dense_fwd = 2 * (
        per_token_block * seq
        + _linear_params(transformer.patch_embedding) * (num_source + num_target)
        + _linear_params(transformer.proj_out) * num_target
        + (_linear_params(transformer.semantic_projector) + _linear_params(transformer.semantic_head))
        * num_semantic
        + per_text * text_len
    )
    attention_fwd = 4 * layers * width * seq * seq + 4 * layers * width * seq * text_len
    return {
        "dense": 3.0 * dense_fwd,
        "attention": 3.0 * attention_fwd,
        "total": 3.0 * (dense_fwd + attention_fwd),
        "params_per_token": float(per_token_block),
        "seq": float(seq),
    }


def batch_flops(transformer, encoded) -> float:
    """Model FLOPs of one training step over an encoded batch (``SamaModule.encode_batch``'s
    output): :func:`step_flops` of its sequence layout, times its samples."""
    source = encoded.source_latents
    semantic = encoded.semantic_tokens
    layout = transformer.sequence_layout(
        encoded.target_latents.shape,
        source.shape if source is not None else None,
        semantic.shape[1] if semantic is not None else 0,
    )
    per_sample = step_flops(
        transformer, layout.num_source, layout.num_semantic, layout.num_target, encoded.text_embeds.shape[1]
    )
    return per_sample["total"] * encoded.target_latents.shape[0]
