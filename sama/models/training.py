"""The trainer's entry point to the model: a batch of frames (or latents) in, the loss parts out.

:class:`SamaTrainingModule` holds the trainable SAMA transformer (its projector and semantic head
included) and the frozen encoders (autoencoder, text encoder, SigLIP). One training step is::

    out = module(batch, generator)          # LossOutput(loss, loss_fm, loss_sem)
    out.loss.backward()
    optimizer.step()                        # over module.trainable_parameters() only

The work splits in two so precomputed inputs can skip the frozen encoders:

* :meth:`SamaTrainingModule.encode_batch` (no grad): frames -> normalised latents (target and
  optional source), prompts -> text embeddings (with caption dropout), target frames -> clean
  semantic anchor tokens. Anything already present in the :class:`SamaBatch` is kept.
* :meth:`SamaTrainingModule.compute_loss`: samples ``t`` and noise, noises target latents and
  semantic tokens with the same ``t`` (SAMA.md), runs the transformer on
  ``[source | semantic | target]`` and returns :class:`sama.losses.LossOutput`.

A batch is equal-shaped: every sample has a source or none has (text-to-video batches), all
targets share one shape, all sources share one shape (a source may be shorter than its target:
speed perturbation).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch
from torch import nn

from sama.losses import (
    LossConfig,
    LossOutput,
    add_noise,
    bell_weight,
    model_timestep,
    randn,
    sama_loss,
    sample_timesteps,
    velocity_from_model_output,
    velocity_target,
)
from sama.models.parity import resolve
from sama.models.presets import SamaComponents

__all__ = [
    "EDIT_NEGATIVE_PROMPT",
    "EDIT_PROMPT_PREFIX",
    "SamaBatch",
    "SamaTrainingModule",
    "TrainingModuleConfig",
    "frames_to_tensor",
    "null_prompt",
]

EDIT_PROMPT_PREFIX = "[Video edit] "
EDIT_NEGATIVE_PROMPT = "[Video edit]"


def null_prompt(prompt: str, prefix: str = EDIT_PROMPT_PREFIX) -> str:
    """The unconditional prompt paired with ``prompt``.

    Edit prompts (those starting with the edit prefix) pair with the bare prefix, the negative
    prompt used at inference (SAMA.md, code); anything else pairs with the empty prompt.
    """
    return prefix.strip() if prompt.startswith(prefix) else ""


def frames_to_tensor(
    frames: torch.Tensor | np.ndarray, device: torch.device | str | None = None
) -> torch.Tensor:
    """``(B, T, H, W, 3)`` uint8 frames -> ``(B, 3, T, H, W)`` float32 in ``[-1, 1]``."""
    tensor = torch.as_tensor(frames)
    if tensor.ndim != 5 or tensor.shape[-1] != 3:
        raise ValueError(f"frames must be (B, T, H, W, 3), got {tuple(tensor.shape)}")
    if tensor.dtype != torch.uint8:
        raise ValueError(f"frames must be uint8, got {tensor.dtype}")
    tensor = tensor.to(device) if device is not None else tensor
    return tensor.permute(0, 4, 1, 2, 3).float().div(127.5).sub(1.0)


@dataclass
class TrainingModuleConfig:
    """Objective knobs for :class:`SamaTrainingModule`.

    Attributes:
        loss: the loss weights, timestep sampler and weighting, and the semantic loss's space;
            its unset (None) knobs follow the model's parity profile (:mod:`sama.models.parity`).
        text_dropout_prob: (choice) probability of replacing a prompt with its null prompt
            (:func:`null_prompt`) so classifier-free guidance has an unconditional model to use.
        semantic: run Semantic Anchoring when the model has a semantic branch (off: no semantic
            tokens, no L_sem; the stage-1/ablation switch).
    """

    loss: LossConfig = field(default_factory=LossConfig)
    text_dropout_prob: float = 0.1
    semantic: bool = True

    def validate(self) -> None:
        self.loss.validate()
        if not 0.0 <= self.text_dropout_prob <= 1.0:
            raise ValueError("text_dropout_prob must be in [0, 1]")


@dataclass
class SamaBatch:
    """One training batch; frames or precomputed tensors (precomputed wins).

    Attributes:
        prompts: the full prompts (task prefix included), one per sample.
        target: ``(B, T, H, W, 3)`` uint8 target frames (``T = 1`` for images).
        source: ``(B, T_src, H, W, 3)`` uint8 source frames, or None (text-to-video batch).
        target_latents / source_latents: ``(B, C, T', H', W')`` normalised latents.
        text_embeds: ``(B, L, text_dim)`` prompt embeddings, full length (caption dropout
            substitutes the null prompts' embeddings in training mode).
        semantic_tokens: ``(B, S, semantic_dim)`` clean anchor tokens.
        semantic_candidates: ``(B, F, tokens_per_anchor, semantic_dim)`` precomputed clean SigLIP
            tokens of the target frames ``anchor_frames[b]``, from which :meth:`encode_batch`
            draws the anchors as it would from the frames (``num_frames[b]``: the target's frame
            count).
        keys / tasks / media / source_name: where the samples come from (logs, tests).
        encoded: set by :meth:`SamaTrainingModule.encode_batch`; an encoded batch is not encoded
            (nor caption-dropped) a second time when passed to ``forward``.
    """

    prompts: list[str]
    target: torch.Tensor | np.ndarray | None = None
    source: torch.Tensor | np.ndarray | None = None
    target_latents: torch.Tensor | None = None
    source_latents: torch.Tensor | None = None
    text_embeds: torch.Tensor | None = None
    semantic_tokens: torch.Tensor | None = None
    semantic_candidates: torch.Tensor | None = None
    anchor_frames: list[list[int]] | None = None
    num_frames: list[int] | None = None
    keys: list[str] = field(default_factory=list)
    tasks: list[str] = field(default_factory=list)
    media: str = ""
    source_name: str = ""
    encoded: bool = False

    def __len__(self) -> int:
        return len(self.prompts)


class SamaTrainingModule(nn.Module):
    """Trainable SAMA transformer + frozen encoders, computing the SAMA loss from a batch.

    Args:
        components: from :func:`sama.models.build_model` (the encoders may be None when every
            batch brings the corresponding precomputed tensors).
        config: objective knobs; unset ones are resolved with the model config's parity.
    """

    def __init__(self, components: SamaComponents, config: TrainingModuleConfig | None = None):
        super().__init__()
        self.config = resolve(config or TrainingModuleConfig(), components.config.parity, "objective")
        self.config.validate()
        self.model_config = components.config
        self.transformer = components.transformer
        self.vae = components.vae
        self.text_encoder = components.text_encoder
        self.semantic_encoder = components.semantic_encoder
        for frozen in (self.vae, self.text_encoder, self.semantic_encoder):
            if frozen is not None:
                frozen.requires_grad_(False)
                frozen.eval()
        self._null_embeds: dict[str, torch.Tensor] = {}

    @property
    def uses_semantic(self) -> bool:
        """Whether batches run the semantic branch (model has one and the config enables it)."""
        return self.config.semantic and self.transformer.semantic_projector is not None

    def trainable_parameters(self) -> list[nn.Parameter]:
        """The parameters to optimise: the transformer's (incl. type embedding, projector, head)."""
        return [p for p in self.transformer.parameters() if p.requires_grad]

    def train(self, mode: bool = True) -> SamaTrainingModule:
        super().train(mode)
        # The frozen encoders stay in eval mode (no dropout) during training.
        for frozen in (self.vae, self.text_encoder, self.semantic_encoder):
            if frozen is not None:
                frozen.eval()
        return self

    def _device(self) -> torch.device:
        return next(self.transformer.parameters()).device

    # ----------------------------------------------------------------------------------------
    # Encoding

    def _drop_prompts(
        self, prompts: list[str], generator: torch.Generator | None
    ) -> tuple[list[str], list[bool]]:
        prob = self.config.text_dropout_prob if self.training else 0.0
        if prob <= 0.0:
            return list(prompts), [False] * len(prompts)
        gen_device = generator.device if generator is not None else "cpu"
        draws = torch.rand((len(prompts),), generator=generator, device=gen_device).tolist()
        dropped = [d < prob for d in draws]
        return [null_prompt(p) if drop else p for p, drop in zip(prompts, dropped, strict=True)], dropped

    def _null_embedding(self, prompt: str, device: torch.device) -> torch.Tensor:
        if prompt not in self._null_embeds:
            if self.text_encoder is None:
                raise ValueError(
                    f"caption dropout on precomputed text embeddings needs a text encoder or the "
                    f"stored embedding of the null prompt {prompt!r} (set_null_embeddings)"
                )
            self._null_embeds[prompt] = self.text_encoder.encode([prompt], allow_empty=True)[0].cpu()
        return self._null_embeds[prompt].to(device)

    def set_null_embeddings(self, embeddings: dict[str, torch.Tensor]) -> None:
        """Use these full-length ``(L, D)`` embeddings of null prompts for caption dropout on
        precomputed text embeddings (``sama precompute`` stores them), so no text encoder is needed."""
        for prompt, embedding in embeddings.items():
            self._null_embeds[prompt] = torch.as_tensor(embedding).detach().float().cpu()

    def _anchor_settings(self) -> tuple[int, str]:
        if self.semantic_encoder is not None:
            return self.semantic_encoder.num_anchors, self.semantic_encoder.anchor_sampling
        semantic = self.model_config.semantic
        return int(semantic.num_anchors), semantic.anchor_sampling

    def _anchors_from_candidates(self, batch: SamaBatch, generator: torch.Generator | None) -> torch.Tensor:
        """The anchor tokens drawn from precomputed candidates: the same draw per sample, from the
        same generator, as :class:`sama.models.semantic.SemanticEncoder` makes from frames."""
        from sama.models.semantic import sample_anchor_indices

        candidates = batch.semantic_candidates
        if batch.anchor_frames is None or batch.num_frames is None:
            raise ValueError("semantic_candidates need anchor_frames and num_frames")
        num_anchors, mode = self._anchor_settings()
        picked = []
        for b in range(candidates.shape[0]):
            drawn = sample_anchor_indices(int(batch.num_frames[b]), num_anchors, mode, generator)
            stored = list(batch.anchor_frames[b])
            missing = [i for i in drawn if i not in stored]
            if missing:
                key = batch.keys[b] if b < len(batch.keys) else str(b)
                raise ValueError(
                    f"sample {key}: anchor frame(s) {missing} ({mode} anchors) are not among the "
                    f"precomputed semantic frames {stored}; precompute with this model's semantic settings"
                )
            rows = candidates[b, [stored.index(i) for i in drawn]]  # (num_anchors, tokens, D)
            picked.append(rows.reshape(-1, rows.shape[-1]))
        return torch.stack(picked).float()

    @torch.no_grad()
    def encode_batch(self, batch: SamaBatch, generator: torch.Generator | None = None) -> SamaBatch:
        """Fill in latents, text embeddings and semantic tokens with the frozen encoders.

        Precomputed fields are kept (cast to float32, the encoders' output dtype). Caption dropout
        (training mode only) is applied here, to the prompts before encoding or to precomputed
        embeddings by substituting the null prompts' (stored ones first: :meth:`set_null_embeddings`).
        Precomputed semantic candidates give the anchor tokens by the same draw as from frames.
        A batch that is already encoded is returned as is.
        """
        if batch.encoded:
            return batch
        device = self._device()
        if not batch.prompts:
            raise ValueError("a batch needs at least one sample")
        size = len(batch.prompts)
        target_frames = frames_to_tensor(batch.target, device) if batch.target is not None else None
        source_frames = frames_to_tensor(batch.source, device) if batch.source is not None else None
        for name, frames in (("target", target_frames), ("source", source_frames)):
            if frames is not None and frames.shape[0] != size:
                raise ValueError(f"{name} has {frames.shape[0]} samples but there are {size} prompts")

        # Precomputed tensors may be stored in a narrower dtype: the encoders' output dtype (float32).
        target_latents = batch.target_latents.float() if batch.target_latents is not None else None
        if target_latents is None:
            if target_frames is None or self.vae is None:
                raise ValueError("the batch needs target frames and an autoencoder, or target_latents")
            target_latents = self.vae.encode(target_frames, generator)
        source_latents = batch.source_latents.float() if batch.source_latents is not None else None
        if source_latents is None and source_frames is not None:
            if self.vae is None:
                raise ValueError("source frames need an autoencoder (or pass source_latents)")
            source_latents = self.vae.encode(source_frames, generator)

        prompts, dropped = self._drop_prompts(batch.prompts, generator)
        text_embeds = batch.text_embeds
        if text_embeds is None:
            if self.text_encoder is None:
                raise ValueError("the batch needs prompts and a text encoder, or text_embeds")
            # Dropped prompts may legitimately be empty (the null prompt of a plain caption).
            for index, (prompt, drop) in enumerate(zip(prompts, dropped, strict=True)):
                if not drop and not prompt.strip():
                    raise ValueError(f"prompt {index} is empty")
            text_embeds = self.text_encoder.encode(prompts, allow_empty=True, device=device)
        elif any(dropped):
            text_embeds = text_embeds.float().clone()
            for index, drop in enumerate(dropped):
                if drop:
                    text_embeds[index] = self._null_embedding(prompts[index], text_embeds.device)

        semantic_tokens = batch.semantic_tokens
        if self.uses_semantic and semantic_tokens is None and batch.semantic_candidates is not None:
            # After the caption-dropout draw, as from frames: the generator stream is the same.
            semantic_tokens = self._anchors_from_candidates(batch, generator)
        elif self.uses_semantic and semantic_tokens is None:
            if target_frames is None or self.semantic_encoder is None:
                raise ValueError(
                    "Semantic Anchoring needs target frames and a semantic encoder, or semantic_tokens"
                )
            semantic_tokens = self.semantic_encoder(target_frames, generator)
        if not self.uses_semantic:
            semantic_tokens = None
        return SamaBatch(
            prompts=prompts,
            target_latents=target_latents.to(device),
            source_latents=source_latents.to(device) if source_latents is not None else None,
            text_embeds=text_embeds.to(device),
            semantic_tokens=semantic_tokens.to(device) if semantic_tokens is not None else None,
            keys=batch.keys,
            tasks=batch.tasks,
            media=batch.media,
            source_name=batch.source_name,
            encoded=True,
        )

    # ----------------------------------------------------------------------------------------
    # Loss

    def compute_loss(self, encoded: SamaBatch, generator: torch.Generator | None = None) -> LossOutput:
        """The SAMA loss of an encoded batch (see :mod:`sama.losses` for the conventions)."""
        if encoded.target_latents is None or encoded.text_embeds is None:
            raise ValueError("compute_loss needs an encoded batch (see encode_batch)")
        device = self._device()
        dtype = next(self.transformer.parameters()).dtype
        clean = encoded.target_latents.to(device)
        batch_size = clean.shape[0]
        t = sample_timesteps(batch_size, self.config.loss.timesteps, generator, device)
        noise = randn(clean.shape, generator, device)
        noisy = add_noise(clean, noise, t)

        semantic_clean = encoded.semantic_tokens if self.uses_semantic else None
        semantic_noisy = semantic_noise = None
        if semantic_clean is not None:
            semantic_clean = semantic_clean.to(device)
            semantic_noise = randn(semantic_clean.shape, generator, device)
            semantic_noisy = add_noise(semantic_clean, semantic_noise, t)

        source = encoded.source_latents.to(device, dtype) if encoded.source_latents is not None else None
        out = self.transformer(
            hidden_states=noisy.to(dtype),
            timestep=model_timestep(t),
            encoder_hidden_states=encoded.text_embeds.to(device, dtype),
            source_latents=source,
            semantic_tokens=semantic_noisy.to(dtype) if semantic_noisy is not None else None,
        )
        semantic_pred = velocity_from_model_output(out.semantic) if out.semantic is not None else None
        loss = self.config.loss
        weight = bell_weight(t, loss.timesteps.shift) if loss.timestep_weighting == "bell" else None
        return sama_loss(
            velocity_from_model_output(out.sample),
            velocity_target(clean, noise),
            t,
            semantic_velocity_pred=semantic_pred,
            semantic_noisy=semantic_noisy,
            semantic_clean=semantic_clean,
            semantic_weight=loss.semantic_weight,
            semantic_noise=semantic_noise,
            semantic_space=loss.semantic_space,
            weight=weight,
        )

    def forward(self, batch: SamaBatch, generator: torch.Generator | None = None) -> LossOutput:
        """``compute_loss(encode_batch(batch))``: the loss parts of one batch (raw or encoded)."""
        return self.compute_loss(self.encode_batch(batch, generator), generator)
