"""Frozen-encoder outputs of decoded samples: what ``sama precompute`` stores and training reads.

:func:`encode_samples` runs the autoencoder, the text encoder and SigLIP of a model exactly as
:meth:`sama.models.training.SamaTrainingModule.encode_batch` does for training (same functions,
same inputs), so a loss computed from the stored tensors equals the loss from the media:

* ``target`` / ``source``: the VAE's normalised latents (the posterior's mode: a model that
  samples its posterior, ``vae.sample_posterior``, cannot be precomputed);
* ``text``: the prompt's embedding, cut after its last token (the encoder's output is zero past it);
* ``semantic``: the SigLIP tokens of every target frame an anchor can be drawn from (all frames
  when anchors are drawn at random, so training draws them per step as it would from the media;
  the anchors themselves when they are fixed), with ``anchor_frames``, their indices.

:func:`null_prompt_embeddings` gives the embeddings of the prompts caption dropout substitutes.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch

from sama.models.semantic import sample_anchor_indices
from sama.models.training import EDIT_NEGATIVE_PROMPT, frames_to_tensor
from sama.schema import SampleLatents

# The prompts training's caption dropout replaces a prompt with (sama.models.training.null_prompt).
NULL_PROMPTS = ("", EDIT_NEGATIVE_PROMPT)

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def storage_dtype(name: str) -> torch.dtype:
    """The torch dtype named ``name`` (float32, bfloat16 or float16)."""
    try:
        return _DTYPES[name]
    except KeyError:
        raise ValueError(f"unknown dtype {name!r}; use one of {', '.join(_DTYPES)}") from None


def anchor_frames(semantic_encoder, num_frames: int) -> list[int]:
    """The target frames whose SigLIP tokens are stored: every frame an anchor can be drawn from."""
    if semantic_encoder.anchor_sampling == "random" and num_frames >= semantic_encoder.num_anchors:
        return list(range(num_frames))
    return sorted(
        set(sample_anchor_indices(num_frames, semantic_encoder.num_anchors, semantic_encoder.anchor_sampling))
    )


@torch.no_grad()
def encode_samples(
    components,
    targets: np.ndarray,
    sources: np.ndarray | None,
    prompts: Sequence[str],
    dtype: torch.dtype = torch.float32,
) -> list[SampleLatents]:
    """Encode a batch of equal-shaped samples with ``components``' frozen encoders.

    Args:
        components: :class:`sama.models.presets.SamaComponents` (its transformer is not used).
        targets: ``(B, T, H, W, 3)`` uint8 target frames.
        sources: ``(B, T_src, H, W, 3)`` uint8 source frames, or None (no source in this batch).
        prompts: the full prompts (task prefix included), one per sample.
        dtype: the dtype the tensors are returned (and stored) in.
    """
    vae, text_encoder, semantic = components.vae, components.text_encoder, components.semantic_encoder
    if getattr(vae, "sample_posterior", False):
        raise ValueError(
            "vae.sample_posterior is on: latents drawn once would be reused every epoch; "
            "precomputed latents store the posterior's mode (train such a model from media shards)"
        )
    device = next(text_encoder.parameters()).device
    target_frames = frames_to_tensor(targets, device)
    target_latents = vae.encode(target_frames)
    source_latents = vae.encode(frames_to_tensor(sources, device)) if sources is not None else None
    text, lengths = text_encoder.encode(list(prompts), allow_empty=True, device=device, return_lengths=True)
    tokens = frames = None
    if semantic is not None:
        frames = anchor_frames(semantic, target_frames.shape[2])
        images = target_frames[:, :, frames].transpose(1, 2).flatten(0, 1)  # (B * F, 3, H, W)
        tokens = semantic.encode_images(images).reshape(len(prompts), len(frames), -1, semantic.hidden_size)
    out = []
    for b in range(len(prompts)):
        out.append(
            SampleLatents(
                target=target_latents[b].to(dtype).cpu(),
                text=text[b, : lengths[b]].to(dtype).cpu(),
                source=None if source_latents is None else source_latents[b].to(dtype).cpu(),
                semantic=None if tokens is None else tokens[b].to(dtype).cpu(),
                anchor_frames=frames,
            )
        )
    return out


@torch.no_grad()
def null_prompt_embeddings(components, dtype: torch.dtype = torch.float32) -> list[torch.Tensor]:
    """The full-length ``(L, D)`` embeddings of :data:`NULL_PROMPTS`, in that order."""
    text_encoder = components.text_encoder
    embeds = text_encoder.encode(list(NULL_PROMPTS), allow_empty=True)
    return [e.to(dtype).cpu() for e in embeds]
