"""Per-frame embeddings from pretrained vision models: CLIP (images and text) and DINOv2 (images).

Both load with ``transformers`` from a local directory, an ``s3://`` prefix (fetched once through
:func:`sama.storage.localize_dir`) or a Hugging Face hub id, together with the model's own image
processor (and, for CLIP, its tokenizer), so frames are resized, cropped and normalised exactly as
the model was trained. Models run in eval mode without gradients, frames in batches.

* :class:`ClipEmbedder`: unit-normalised projected image and text embeddings;
  :meth:`ClipEmbedder.clip_score` is ``max(100 * cos(text, frame), 0)`` averaged over frames.
* :class:`DinoEmbedder`: unit-normalised CLS embeddings (``Dinov2Model``'s last hidden state at
  position 0, after its final LayerNorm).
* :func:`temporal_consistency`: mean cosine similarity of consecutive rows of an embedding matrix.

A checkpoint of another architecture, or one missing weights the model needs, is refused
(``transformers`` would otherwise fill the gaps with random weights and carry on).
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable

import numpy as np
import torch
import torch.nn.functional as F

from sama.eval.lpips import WeightsError

__all__ = [
    "ClipEmbedder",
    "DinoEmbedder",
    "WeightsError",
    "clip_score_from_embeddings",
    "temporal_consistency",
]

DEFAULT_BATCH_FRAMES = 16


def _model_source(reference: str, what: str) -> str:
    """What ``from_pretrained`` should read: remote URIs are localised, local paths and hub ids
    pass through (``transformers`` then downloads only the files the model needs)."""
    if "://" not in reference:
        return reference
    from sama import storage

    try:
        return storage.localize_dir(reference)
    except OSError as exc:
        raise WeightsError(f"{what} {reference!r} cannot be fetched: {exc}") from exc


def _load_pretrained(model_class, source: str, reference: str, model_type: str, what: str):
    """``model_class.from_pretrained(source)`` after checking the checkpoint's architecture.

    Raises:
        WeightsError: naming ``reference``, when the files cannot be read, describe another model
            type, or lack weights the model needs.
    """
    from transformers import AutoConfig

    try:
        found = AutoConfig.from_pretrained(source).model_type
    except (OSError, ValueError, KeyError) as exc:
        raise WeightsError(f"{what} {reference!r} cannot be loaded: {exc}") from exc
    if found != model_type:
        raise WeightsError(f"{what} {reference!r} is a {found!r} checkpoint, expected {model_type!r}")
    try:
        model, info = model_class.from_pretrained(source, output_loading_info=True)
    except (OSError, ValueError, KeyError, RuntimeError) as exc:
        raise WeightsError(f"{what} {reference!r} cannot be loaded: {exc}") from exc
    if info["missing_keys"]:
        missing = sorted(info["missing_keys"])
        raise WeightsError(f"{what} {reference!r} lacks {len(missing)} weights, e.g. {missing[:3]}")
    return model


def _load_processor(loader: Callable, source: str, reference: str, what: str):
    try:
        return loader(source)
    except (OSError, ValueError, KeyError) as exc:
        raise WeightsError(f"{what} {reference!r}: cannot load its preprocessing files: {exc}") from exc


def _check_tokenizer(tokenizer, reference: str, what: str) -> None:
    # transformers builds an empty tokenizer when a directory has no tokenizer files; it would
    # map every word to the unknown token and every instruction to the same embedding.
    probe = tokenizer("a photo", add_special_tokens=False)["input_ids"]
    if not probe or tokenizer.unk_token_id in probe:
        raise WeightsError(f"{what} {reference!r}: its tokenizer cannot encode plain words (no vocabulary?)")


def _prepare(model: torch.nn.Module, device: str | torch.device) -> torch.nn.Module:
    model.requires_grad_(False)
    return model.eval().to(device)


def temporal_consistency(embeddings: torch.Tensor | np.ndarray) -> float:
    """Mean cosine similarity of consecutive rows of a ``(T, D)`` matrix (``T >= 2``)."""
    rows = torch.as_tensor(embeddings, dtype=torch.float64)
    if rows.ndim != 2 or rows.shape[0] < 2:
        raise ValueError(f"temporal consistency needs a (T >= 2, D) matrix, got {tuple(rows.shape)}")
    return float(F.cosine_similarity(rows[:-1], rows[1:], dim=1).mean())


def clip_score_from_embeddings(image_embeddings: torch.Tensor, text_embedding: torch.Tensor) -> float:
    """``max(100 * cos(text, image), 0)`` averaged over the rows of ``image_embeddings``."""
    cosines = F.cosine_similarity(image_embeddings.double(), text_embedding.double().reshape(1, -1), dim=1)
    return float((100.0 * cosines).clamp(min=0.0).mean())


class _FrameEmbedder(ABC):
    """Batches ``(T, H, W, 3)`` uint8 frames through an image processor and a model."""

    def __init__(self, model, image_processor, batch_size: int):
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        self.model = model
        self.image_processor = image_processor
        self.batch_size = int(batch_size)

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    def _pixels(self, frames: np.ndarray) -> torch.Tensor:
        # Stated, not guessed: transformers guesses channels-first for frames only 3 pixels tall.
        inputs = self.image_processor(
            images=list(frames), return_tensors="pt", input_data_format="channels_last"
        )
        return inputs["pixel_values"].to(self.device, dtype=next(self.model.parameters()).dtype)

    @abstractmethod
    def _embed_batch(self, pixels: torch.Tensor) -> torch.Tensor:
        """``(N, 3, h, w)`` model-ready pixels -> ``(N, D)`` raw embeddings."""

    @torch.no_grad()
    def image_embeddings(self, frames: np.ndarray) -> torch.Tensor:
        """``(T, H, W, 3)`` uint8 frames -> ``(T, D)`` unit-normalised float32 embeddings (on CPU)."""
        frames = np.asarray(frames)
        if frames.ndim != 4 or frames.shape[-1] != 3 or len(frames) == 0:
            raise ValueError(f"frames must be (T >= 1, H, W, 3), got {frames.shape}")
        batches = [
            self._embed_batch(self._pixels(frames[start : start + self.batch_size])).float().cpu()
            for start in range(0, len(frames), self.batch_size)
        ]
        return F.normalize(torch.cat(batches), dim=-1)


class ClipEmbedder(_FrameEmbedder):
    """A ``transformers`` CLIPModel with its tokenizer and image processor."""

    def __init__(self, model, tokenizer, image_processor, batch_size: int = DEFAULT_BATCH_FRAMES):
        super().__init__(model, image_processor, batch_size)
        self.tokenizer = tokenizer

    @classmethod
    def load(
        cls, reference: str, device: str | torch.device = "cpu", batch_size: int = DEFAULT_BATCH_FRAMES
    ) -> ClipEmbedder:
        """Model, tokenizer and image processor from one directory or hub id.

        Raises:
            WeightsError: naming ``reference`` when any part cannot be loaded.
        """
        from transformers import AutoImageProcessor, AutoTokenizer, CLIPModel

        what = "CLIP model"
        source = _model_source(reference, what)
        model = _load_pretrained(CLIPModel, source, reference, "clip", what)
        tokenizer = _load_processor(AutoTokenizer.from_pretrained, source, reference, what)
        _check_tokenizer(tokenizer, reference, what)
        processor = _load_processor(AutoImageProcessor.from_pretrained, source, reference, what)
        return cls(_prepare(model, device), tokenizer, processor, batch_size)

    def _embed_batch(self, pixels: torch.Tensor) -> torch.Tensor:
        return self.model.get_image_features(pixel_values=pixels).pooler_output

    @torch.no_grad()
    def text_embedding(self, text: str) -> torch.Tensor:
        """The unit-normalised ``(D,)`` float32 embedding of ``text`` (truncated to the model's
        context length)."""
        max_length = int(self.model.config.text_config.max_position_embeddings)
        tokens = self.tokenizer(
            [text], padding=True, truncation=True, max_length=max_length, return_tensors="pt"
        ).to(self.device)
        features = self.model.get_text_features(
            input_ids=tokens["input_ids"], attention_mask=tokens["attention_mask"]
        ).pooler_output
        return F.normalize(features.float().cpu()[0], dim=-1)

    def clip_score(self, frames: np.ndarray, text: str) -> float:
        """``max(100 * cos(text, frame), 0)`` averaged over ``(T, H, W, 3)`` uint8 frames."""
        return clip_score_from_embeddings(self.image_embeddings(frames), self.text_embedding(text))


class DinoEmbedder(_FrameEmbedder):
    """A ``transformers`` Dinov2Model with its image processor; embeddings are CLS tokens."""

    @classmethod
    def load(
        cls, reference: str, device: str | torch.device = "cpu", batch_size: int = DEFAULT_BATCH_FRAMES
    ) -> DinoEmbedder:
        """Model and image processor from one directory or hub id.

        Raises:
            WeightsError: naming ``reference`` when either cannot be loaded.
        """
        from transformers import AutoImageProcessor, Dinov2Model

        what = "DINOv2 model"
        source = _model_source(reference, what)
        model = _load_pretrained(Dinov2Model, source, reference, "dinov2", what)
        processor = _load_processor(AutoImageProcessor.from_pretrained, source, reference, what)
        return cls(_prepare(model, device), processor, batch_size)

    def _embed_batch(self, pixels: torch.Tensor) -> torch.Tensor:
        return self.model(pixel_values=pixels).last_hidden_state[:, 0]
