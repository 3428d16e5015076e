"""Probes of what a trained model has learned, beyond its loss.

:func:`source_dependence` asks whether a model's prediction depends on its source. It noises the
target latents of held-out pairs to a data fraction ``t``, lets the model estimate the clean target
once (``x1_hat = x_t + (1 - t) * v_hat``, see :mod:`sama.losses`) and measures the estimate's mean
squared error in latent space twice: with the true source latents, and with the same latents
rolled sideways by ``shift`` latent pixels (the same content in the wrong place). A model that
uses its source is clearly better with the true one; a model that ignores it scores the same
(measured on the first debug recipes: 0.1207 vs 0.1206 at ``t = 0.1``).

Everything else is held fixed between the two passes: the noise, the timestep, the prompt and the
noise the semantic tokens start from (as at inference, where they start from noise).

:func:`kept_precision` asks how precisely that one-step estimate returns what an edit keeps: the
PSNR (0-255 pixels, decoded) of the estimate against the target on the pixels where source and
target agree, beside that of the noisy input itself, decoded as it is. The source shows those
pixels exactly, so a model that reads it beats its noisy input by far at every ``t``; the debug
recipes' stage-0 model in ``bench/learning.py`` does not: 35.2 dB against its noisy input's 36.3
at ``t = 0.97``, 27.6 against 25.8 at ``t = 0.9``.

:func:`instruction_dependence` asks whether the estimate depends on the instruction: the same
one-step estimate (same noise, same source) made twice, with the pair's instruction and with
another one (say, a remove instead of a recolor of the same object), decoded and compared pixel by
pixel where the pair's edit changes the frame and where it keeps it. A model that reads what a
local instruction asks moves the edited pixels far more than the rest; one that ignores its text
moves neither. The debug recipes' stage-1 model in ``bench/learning.py`` (2026-12-02, 1200 + 2000
steps, held-out video pairs) barely reads it: told to remove the object instead of recolouring it
(and so on), its estimate from pure noise moves by 2.9 / 4.1 / 3.7 levels (0-255) on the pixels a
recolor / remove / add changes, where the recolor edits themselves change those pixels by 50-140.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch

from sama.losses import add_noise, clean_estimate, model_timestep, randn, velocity_from_model_output

__all__ = [
    "InstructionDependence",
    "KeptPrecision",
    "SourceDependence",
    "instruction_dependence",
    "kept_precision",
    "source_dependence",
]


@dataclass
class SourceDependence:
    """Clean-estimate errors (latent MSE) per data fraction ``t``: with the true source and with
    a displaced one; ``ratio`` is true / displaced (1 when the source is ignored)."""

    t: float
    true_source: float
    shifted_source: float

    @property
    def ratio(self) -> float:
        return self.true_source / self.shifted_source


@torch.no_grad()
def source_dependence(
    pipeline,
    pairs: Sequence[tuple[np.ndarray, np.ndarray, str]],
    times: Sequence[float] = (0.1, 0.5),
    shift: int = 8,
    seed: int = 0,
) -> list[SourceDependence]:
    """Mean clean-estimate errors over ``pairs`` with the true and the displaced source, per ``t``.

    Args:
        pipeline: a :class:`sama.pipeline_edit.SamaEditPipeline` (its transformer, autoencoder and
            text encoder are used; prompts are built as the pipeline builds them).
        pairs: ``(source, target, instruction)`` with ``(T, H, W, 3)`` uint8 videos of one shape
            per pair (padded as the pipeline pads its source).
        times: data fractions ``t`` to probe (0 = pure noise, 1 = clean).
        shift: latent pixels the displaced source is rolled by along the width.
        seed: seeds the noise.
    """
    generator = torch.Generator("cpu").manual_seed(seed)
    sums = {float(t): [0.0, 0.0] for t in times}
    for source, target, instruction in pairs:
        pair = _EncodedPair(pipeline, source, target, instruction, generator)
        displaced = torch.roll(pair.source, shift, dims=-1)
        for t_value in sums:
            noisy, t = pair.noisy(t_value, generator)
            for index, src in enumerate((pair.source, displaced)):
                estimate = pair.estimate(noisy, t, src)
                sums[t_value][index] += float(torch.mean((estimate - pair.target) ** 2))
    count = max(1, len(pairs))
    return [SourceDependence(t, true / count, shifted / count) for t, (true, shifted) in sums.items()]


@dataclass
class KeptPrecision:
    """PSNR (dB, 0-255) on the pixels an edit keeps, at data fraction ``t``: of the one-step clean
    estimate and of the noisy input it was made from (both decoded), averaged over pairs."""

    t: float
    estimate_psnr: float
    noisy_psnr: float


@torch.no_grad()
def kept_precision(
    pipeline,
    pairs: Sequence[tuple[np.ndarray, np.ndarray, str]],
    times: Sequence[float] = (0.0, 0.5, 0.9, 0.97),
    threshold: float = 8.0,
    seed: int = 0,
) -> list[KeptPrecision]:
    """Mean PSNR of the one-step estimate and of its noisy input on the kept pixels, per ``t``.

    Args:
        pipeline / pairs / times / seed: as :func:`source_dependence`.
        threshold: a pixel is kept where no channel of source and target differs by more (0-255).
            Pairs with no kept pixel are skipped; a ``t`` no pair scores gives NaN.
    """
    from sama.eval.metrics import changed_pixels

    generator = torch.Generator("cpu").manual_seed(seed)
    scores: dict[float, list[tuple[float, float]]] = {float(t): [] for t in times}
    for source, target, instruction in pairs:
        kept = ~changed_pixels(source, target, threshold)
        if not kept.any():
            continue
        pair = _EncodedPair(pipeline, source, target, instruction, generator)
        for t_value, found in scores.items():
            noisy, t = pair.noisy(t_value, generator)
            estimate = pair.estimate(noisy, t, pair.source)
            found.append(tuple(_kept_psnr(pipeline.vae, x, target, kept) for x in (estimate, noisy)))
    nan = float("nan")
    return [
        KeptPrecision(t, *(np.mean(found, axis=0).tolist() if found else (nan, nan)))
        for t, found in scores.items()
    ]


@dataclass
class InstructionDependence:
    """Mean absolute change (0-255, decoded) of the one-step estimate at data fraction ``t`` when
    the instruction is replaced: on the pixels the pair's edit changes (``edited``) and on those it
    keeps (``kept``), averaged over pairs (NaN where no pair has such pixels)."""

    t: float
    edited: float
    kept: float


@torch.no_grad()
def instruction_dependence(
    pipeline,
    pairs: Sequence[tuple[np.ndarray, np.ndarray, str, str]],
    times: Sequence[float] = (0.0,),
    threshold: float = 8.0,
    seed: int = 0,
) -> list[InstructionDependence]:
    """How far the one-step estimate moves when ``pairs``' instructions are replaced, per ``t``.

    Args:
        pipeline / times / seed: as :func:`source_dependence`.
        pairs: ``(source, target, instruction, other_instruction)``; both instructions are edited
            from the same noise and source.
        threshold: a pixel is edited where a channel of source and target differs by more (0-255).
    """
    from sama.eval.metrics import changed_pixels

    generator = torch.Generator("cpu").manual_seed(seed)
    scores: dict[float, dict[str, list[float]]] = {float(t): {"edited": [], "kept": []} for t in times}
    for source, target, instruction, other in pairs:
        edited = changed_pixels(source, target, threshold)
        pair = _EncodedPair(pipeline, source, target, instruction, generator)
        other_text = pair.encode_prompt(pipeline, other)
        for t_value, found in scores.items():
            noisy, t = pair.noisy(t_value, generator)
            own, told = (
                _decoded(pipeline.vae, pair.estimate(noisy, t, pair.source, text), target).astype(np.float64)
                for text in (pair.text, other_text)
            )
            change = np.abs(own - told)
            for name, where in (("edited", edited), ("kept", ~edited)):
                if where.any():
                    found[name].append(float(change[where].mean()))
    nan = float("nan")
    return [
        InstructionDependence(t, *(float(np.mean(found[k])) if found[k] else nan for k in ("edited", "kept")))
        for t, found in scores.items()
    ]


def _kept_psnr(vae, latents: torch.Tensor, target: np.ndarray, kept: np.ndarray) -> float:
    """PSNR of ``latents`` decoded (cropped to ``target``'s frames and size) on the ``kept`` pixels."""
    from sama.eval.metrics import psnr_of

    residual = _decoded(vae, latents, target)[kept].astype(np.float64) - target[kept].astype(np.float64)
    return psnr_of(float(np.mean(residual**2)))


def _decoded(vae, latents: torch.Tensor, target: np.ndarray) -> np.ndarray:
    """``(1, C, T, H, W)`` latents decoded to uint8 frames, cropped to ``target``'s frames and size
    (the pipeline pads its inputs)."""
    from sama.pipeline_edit import decode_latents

    return decode_latents(vae, latents[0])[: len(target), : target.shape[1], : target.shape[2]]


class _EncodedPair:
    """One pair as the probes feed it to the model: latents, prompt embedding, semantic noise."""

    def __init__(self, pipeline, source: np.ndarray, target: np.ndarray, instruction: str, generator):
        self.transformer = pipeline.transformer
        self.device, self.dtype = pipeline.device, pipeline.dtype
        self.source = pipeline.encode_frames(source).to(self.dtype)
        self.target = pipeline.encode_frames(target)
        self.text = self.encode_prompt(pipeline, instruction)
        self.semantic = None
        if pipeline.num_semantic_tokens:
            shape = (1, pipeline.num_semantic_tokens, int(self.transformer.config.semantic_dim))
            self.semantic = randn(shape, generator, self.device).to(self.dtype)

    def encode_prompt(self, pipeline, instruction: str) -> torch.Tensor:
        """The prompt embedding of ``instruction``, built as the pipeline builds prompts."""
        prompt, _ = pipeline.build_prompts(instruction)
        return pipeline.text_encoder.encode([prompt], device=self.device, dtype=self.dtype)

    def noisy(self, t_value: float, generator) -> tuple[torch.Tensor, torch.Tensor]:
        """The target noised to data fraction ``t_value`` (fresh noise), and ``t`` as a tensor."""
        t = torch.full((1,), t_value, device=self.device)
        return add_noise(self.target, randn(self.target.shape, generator, self.device), t), t

    def estimate(
        self, noisy: torch.Tensor, t: torch.Tensor, source: torch.Tensor, text: torch.Tensor | None = None
    ) -> torch.Tensor:
        """The model's one-step clean estimate from ``noisy`` given ``source`` latents and the
        pair's prompt embedding (or ``text``)."""
        out = self.transformer(
            hidden_states=noisy.to(self.dtype),
            timestep=model_timestep(t),
            encoder_hidden_states=self.text if text is None else text,
            source_latents=source,
            semantic_tokens=self.semantic,
        )
        return clean_estimate(noisy, velocity_from_model_output(out.sample), t)
