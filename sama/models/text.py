"""Text conditioning: Wan's umT5 encoder through transformers, or a tiny byte-level stand-in.

:class:`TextEncoder` turns prompts into the ``(B, max_length, D)`` embeddings Wan's cross-attention
reads, prepared the way diffusers' ``WanPipeline`` prepares them: whitespace cleaned, tokenised to
``max_length`` with an end-of-sequence token, encoded with the attention mask, and every position
past the prompt set to zero.

Real runs load ``UMT5EncoderModel`` + ``AutoTokenizer`` from a Wan diffusers repository
(``text_encoder/`` and ``tokenizer/``). Randomly initialised small UMT5s (tests, the tiny preset)
use a tokenizer that needs no vocabulary file and no download: :class:`ByteTokenizer` (one token per
UTF-8 byte) or :class:`HashWordTokenizer` (one token per word, its id a hash of the word). The tiny
preset uses words: a frozen random encoder then gives every word its own embedding, which a small
DiT learns to read from a few hundred edits; from bytes it has to assemble every word from several
tokens first (measured in ``bench/learning.py``).

Empty prompts are refused (``ValueError``) unless ``allow_empty=True``, which the unconditional
branch of classifier-free guidance and caption dropout ask for explicitly.
"""

from __future__ import annotations

import json
import os
import re
import zlib
from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

from sama.models.config import TextConfig

__all__ = ["ByteTokenizer", "HashWordTokenizer", "TextEncoder", "build_text_encoder", "clean_prompt"]

_BYTE_TOKENIZER_FILE = "byte_tokenizer.json"
_WORD_TOKENIZER_FILE = "word_tokenizer.json"


def clean_prompt(text: str) -> str:
    """Collapse runs of whitespace and strip the ends (Wan's ``prompt_clean`` without ftfy)."""
    return re.sub(r"\s+", " ", text).strip()


class _VocabularyFreeTokenizer:
    """What :class:`ByteTokenizer` and :class:`HashWordTokenizer` share: T5's special ids and a
    call that mimics a transformers tokenizer with ``padding="max_length", truncation=True,
    return_tensors="pt"``. Subclasses give ``encode(text, max_length)`` (ids, truncated, then eos)."""

    pad_token_id = 0
    eos_token_id = 1
    unk_token_id = 2
    offset = 3
    model_max_length: int

    def encode(self, text: str, max_length: int | None = None) -> list[int]:
        raise NotImplementedError

    def __call__(
        self,
        texts: str | Sequence[str],
        max_length: int | None = None,
        return_tensors: str = "pt",
        **_: Any,
    ) -> dict[str, torch.Tensor]:
        """``{"input_ids", "attention_mask"}``, each ``(B, max_length)`` long tensors (pad id 0)."""
        if return_tensors != "pt":
            raise ValueError(f"{type(self).__name__} only returns PyTorch tensors")
        if isinstance(texts, str):
            texts = [texts]
        length = int(max_length or self.model_max_length)
        ids = torch.full((len(texts), length), self.pad_token_id, dtype=torch.long)
        mask = torch.zeros((len(texts), length), dtype=torch.long)
        for row, text in enumerate(texts):
            tokens = self.encode(text, length)
            ids[row, : len(tokens)] = torch.tensor(tokens, dtype=torch.long)
            mask[row, : len(tokens)] = 1
        return {"input_ids": ids, "attention_mask": mask}


class ByteTokenizer(_VocabularyFreeTokenizer):
    """A byte-level tokenizer: UTF-8 bytes shifted by 3 special ids (0 pad, 1 eos, 2 unk).

    The special ids match T5's conventions. Calling it mimics a transformers tokenizer with
    ``padding="max_length", truncation=True, return_tensors="pt"``: every sequence is its bytes
    (truncated to ``max_length - 1``), then eos, then padding.
    """

    vocab_size = 256 + _VocabularyFreeTokenizer.offset

    def __init__(self, max_length: int = 64):
        if max_length < 2:
            raise ValueError(f"max_length must be at least 2 (one byte and eos), got {max_length}")
        self.model_max_length = int(max_length)

    def encode(self, text: str, max_length: int | None = None) -> list[int]:
        """Token ids of one text: bytes + offset, truncated, then eos (no padding)."""
        limit = (max_length or self.model_max_length) - 1
        return [b + self.offset for b in text.encode("utf-8")[:limit]] + [self.eos_token_id]

    def decode(self, ids: Sequence[int]) -> str:
        """Text back from ids, skipping special tokens (truncation can split a UTF-8 character)."""
        data = bytes(i - self.offset for i in ids if i >= self.offset)
        return data.decode("utf-8", errors="replace")

    def save_pretrained(self, directory: str) -> None:
        os.makedirs(directory, exist_ok=True)
        with open(os.path.join(directory, _BYTE_TOKENIZER_FILE), "w") as handle:
            json.dump({"kind": "byte", "max_length": self.model_max_length, "offset": self.offset}, handle)

    @classmethod
    def from_pretrained(cls, directory: str) -> ByteTokenizer:
        with open(os.path.join(directory, _BYTE_TOKENIZER_FILE)) as handle:
            config = json.load(handle)
        if config.get("offset") != cls.offset:
            raise ValueError(f"{directory}: byte tokenizer offset {config.get('offset')} != {cls.offset}")
        return cls(int(config["max_length"]))

    @staticmethod
    def is_saved_in(directory: str) -> bool:
        return os.path.isfile(os.path.join(directory, _BYTE_TOKENIZER_FILE))


class HashWordTokenizer(_VocabularyFreeTokenizer):
    """A vocabulary-free word tokenizer: each word or punctuation mark is one token.

    A token's id is ``3 + crc32(lowercased token) % (vocab_size - 3)``, with the special ids of
    :class:`ByteTokenizer` (0 pad, 1 eos, 2 unk) below it. Distinct words collide only when their
    hashes do (a few pairs in 32k buckets for a vocabulary of hundreds of words). Calling it
    mimics a transformers tokenizer like :class:`ByteTokenizer` does.
    """

    _TOKEN = re.compile(r"\w+|[^\w\s]")

    def __init__(self, max_length: int = 64, vocab_size: int = 32768):
        if max_length < 2:
            raise ValueError(f"max_length must be at least 2 (one word and eos), got {max_length}")
        if vocab_size <= self.offset:
            raise ValueError(f"vocab_size must exceed {self.offset} (the special ids), got {vocab_size}")
        self.model_max_length = int(max_length)
        self.vocab_size = int(vocab_size)

    def token_id(self, token: str) -> int:
        """The id of one word or punctuation mark."""
        return self.offset + zlib.crc32(token.lower().encode("utf-8")) % (self.vocab_size - self.offset)

    def encode(self, text: str, max_length: int | None = None) -> list[int]:
        """Token ids of one text: one per word or punctuation mark, truncated, then eos."""
        limit = (max_length or self.model_max_length) - 1
        return [self.token_id(t) for t in self._TOKEN.findall(text)[:limit]] + [self.eos_token_id]

    def save_pretrained(self, directory: str) -> None:
        os.makedirs(directory, exist_ok=True)
        config = {"kind": "word", "max_length": self.model_max_length, "vocab_size": self.vocab_size}
        with open(os.path.join(directory, _WORD_TOKENIZER_FILE), "w") as handle:
            json.dump(config, handle)

    @classmethod
    def from_pretrained(cls, directory: str) -> HashWordTokenizer:
        with open(os.path.join(directory, _WORD_TOKENIZER_FILE)) as handle:
            config = json.load(handle)
        return cls(int(config["max_length"]), int(config["vocab_size"]))

    @staticmethod
    def is_saved_in(directory: str) -> bool:
        return os.path.isfile(os.path.join(directory, _WORD_TOKENIZER_FILE))


def _saved_tokenizer(directory: str) -> Any:
    """A vocabulary-free tokenizer saved in ``directory``, or None when there is none."""
    if ByteTokenizer.is_saved_in(directory):
        return ByteTokenizer.from_pretrained(directory)
    if HashWordTokenizer.is_saved_in(directory):
        return HashWordTokenizer.from_pretrained(directory)
    return None


class TextEncoder(nn.Module):
    """A frozen text encoder + tokenizer producing Wan-style prompt embeddings.

    Args:
        model: a transformers encoder (``UMT5EncoderModel``) returning ``last_hidden_state``.
        tokenizer: a transformers tokenizer, a :class:`ByteTokenizer` or a :class:`HashWordTokenizer`.
        max_length: tokens per prompt (Wan: 512); the embeddings always have this length.
    """

    def __init__(self, model: nn.Module, tokenizer: Any, max_length: int):
        super().__init__()
        self.model = model
        self.tokenizer = tokenizer
        self.max_length = int(max_length)
        self.model.requires_grad_(False)
        self.model.eval()

    def train(self, mode: bool = True) -> TextEncoder:
        # Frozen: stays in eval mode whatever the surrounding module does.
        return super().train(False)

    @property
    def hidden_size(self) -> int:
        return int(self.model.config.d_model)

    @torch.no_grad()
    def encode(
        self,
        prompts: str | Sequence[str],
        *,
        allow_empty: bool = False,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
        return_lengths: bool = False,
    ) -> torch.Tensor | tuple[torch.Tensor, list[int]]:
        """Embeddings ``(B, max_length, hidden_size)``, zero past each prompt's tokens; with
        ``return_lengths`` also each prompt's token count (its embedding's rows before the zeros).

        Raises:
            ValueError: a prompt is empty or only whitespace (unless ``allow_empty``).
        """
        if isinstance(prompts, str):
            prompts = [prompts]
        cleaned = [clean_prompt(p) for p in prompts]
        if not cleaned:
            raise ValueError("no prompts to encode")
        if not allow_empty:
            for index, text in enumerate(cleaned):
                if not text:
                    raise ValueError(f"instruction {index} is empty: an edit needs a non-empty instruction")
        tokens = self.tokenizer(
            cleaned,
            padding="max_length",
            max_length=self.max_length,
            truncation=True,
            add_special_tokens=True,
            return_attention_mask=True,
            return_tensors="pt",
        )
        param = next(self.model.parameters())
        ids = tokens["input_ids"].to(param.device)
        mask = tokens["attention_mask"].to(param.device)
        hidden = self.model(input_ids=ids, attention_mask=mask).last_hidden_state
        hidden = hidden * mask.unsqueeze(-1).to(hidden.dtype)
        hidden = hidden.to(device=device or param.device, dtype=dtype or hidden.dtype)
        if return_lengths:
            return hidden, [int(n) for n in mask.sum(dim=1).tolist()]
        return hidden

    def save_pretrained(
        self, directory: str, subfolder: str = "text_encoder", tokenizer_subfolder: str = "tokenizer"
    ) -> None:
        """Write the encoder to ``directory/subfolder`` and the tokenizer to ``tokenizer_subfolder``."""
        self.model.save_pretrained(os.path.join(directory, subfolder))
        self.tokenizer.save_pretrained(os.path.join(directory, tokenizer_subfolder))

    @classmethod
    def from_pretrained(
        cls,
        pretrained: str,
        *,
        max_length: int,
        subfolder: str = "text_encoder",
        tokenizer_subfolder: str = "tokenizer",
        torch_dtype: torch.dtype | None = None,
    ) -> TextEncoder:
        """Load encoder + tokenizer from a Wan-style repository (local dir or hub id).

        A local ``tokenizer/`` written by :class:`ByteTokenizer` or :class:`HashWordTokenizer` is
        recognised; anything else goes through ``AutoTokenizer``.
        """
        from transformers import AutoTokenizer, UMT5EncoderModel

        kwargs: dict[str, Any] = {"subfolder": subfolder} if subfolder else {}
        if torch_dtype is not None:
            kwargs["dtype"] = torch_dtype
        model = UMT5EncoderModel.from_pretrained(pretrained, **kwargs)
        local_tokenizer = os.path.join(pretrained, tokenizer_subfolder)
        tokenizer: Any = _saved_tokenizer(local_tokenizer) if os.path.isdir(pretrained) else None
        if tokenizer is None:
            tokenizer = AutoTokenizer.from_pretrained(pretrained, subfolder=tokenizer_subfolder)
        return cls(model, tokenizer, max_length)


def build_text_encoder(
    config: TextConfig,
    pretrained: str | None = None,
    torch_dtype: torch.dtype = torch.float32,
) -> TextEncoder:
    """Build the text encoder ``config`` describes.

    With ``pretrained`` the umT5 weights (``config.subfolder``) and, for ``tokenizer="auto"``, the
    tokenizer (``config.tokenizer_subfolder``) are loaded. Without it a UMT5 is randomly initialised
    from the architecture fields, which requires a vocabulary-free tokenizer (``"byte"`` or
    ``"word"``): the real umT5 vocabulary only comes with a checkpoint.
    """
    from transformers import UMT5EncoderModel

    if pretrained is not None:
        kwargs: dict[str, Any] = {"subfolder": config.subfolder} if config.subfolder else {}
        model = UMT5EncoderModel.from_pretrained(pretrained, dtype=torch_dtype, **kwargs)
        if config.tokenizer != "auto":
            tokenizer: Any = _vocabulary_free_tokenizer(config)
        else:
            from transformers import AutoTokenizer

            tokenizer = AutoTokenizer.from_pretrained(pretrained, subfolder=config.tokenizer_subfolder)
        return TextEncoder(model, tokenizer, config.max_length)
    if config.tokenizer == "auto":
        raise ValueError(
            "text encoder: tokenizer='auto' needs pretrained weights (the umT5 vocabulary ships with the "
            "checkpoint); set model.pretrained / text.pretrained, or use tokenizer='word' or 'byte' for a "
            "random model"
        )
    tokenizer = _vocabulary_free_tokenizer(config)
    model_config = umt5_config(config, vocab_size=max(config.vocab_size, tokenizer.vocab_size))
    model = UMT5EncoderModel(model_config).to(torch_dtype)
    return TextEncoder(model, tokenizer, config.max_length)


def umt5_config(config: TextConfig, vocab_size: int | None = None, **extra: Any):
    """The ``transformers.UMT5Config`` of ``config``'s architecture (Wan's umT5: gated GELU
    feed-forward, no dropout, T5's pad 0 / eos 1 ids); ``vocab_size`` overrides the config's and
    ``extra`` sets further ``UMT5Config`` fields."""
    from transformers import UMT5Config

    return UMT5Config(
        vocab_size=config.vocab_size if vocab_size is None else vocab_size,
        d_model=config.d_model,
        d_kv=config.d_kv,
        d_ff=config.d_ff,
        num_layers=config.num_layers,
        num_heads=config.num_heads,
        relative_attention_num_buckets=config.relative_attention_num_buckets,
        relative_attention_max_distance=config.relative_attention_max_distance,
        dropout_rate=0.0,
        feed_forward_proj="gated-gelu",
        pad_token_id=ByteTokenizer.pad_token_id,
        eos_token_id=ByteTokenizer.eos_token_id,
        decoder_start_token_id=ByteTokenizer.pad_token_id,
        **extra,
    )


def _vocabulary_free_tokenizer(config: TextConfig) -> ByteTokenizer | HashWordTokenizer:
    if config.tokenizer == "byte":
        return ByteTokenizer(config.max_length)
    if config.tokenizer == "word":
        return HashWordTokenizer(config.max_length, config.vocab_size)
    raise ValueError(f"text.tokenizer must be 'auto', 'byte' or 'word', got {config.tokenizer!r}")
