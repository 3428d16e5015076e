"""The SAMA model: transformer, semantic anchoring, autoencoders, text encoder, presets, training module.

Configuration classes import without torch (``from sama.models.config import ModelConfig``); the
rest is loaded on first use, so ``import sama.models`` stays cheap for recipe parsing.

Main entry points:

* :func:`build_model` (``sama.models.presets``): preset name or :class:`ModelConfig` -> components.
* :class:`SamaTrainingModule` (``sama.models.training``): batch -> ``LossOutput``.
* :class:`SamaTransformer3DModel` (``sama.models.transformer_sama``): the DiT.
"""

from __future__ import annotations

import importlib
from typing import Any

from sama.models.config import AutoencoderConfig, ModelConfig, SemanticConfig, TextConfig, TransformerConfig

__all__ = [
    "PRESETS",
    "AutoencoderConfig",
    "ByteTokenizer",
    "LatentAutoencoder",
    "ModelConfig",
    "SamaBatch",
    "SamaComponents",
    "SamaTrainingModule",
    "SamaTransformer3DModel",
    "SamaTransformerOutput",
    "SemanticConfig",
    "SemanticEncoder",
    "SpaceToDepthAutoencoder",
    "TextConfig",
    "TextEncoder",
    "TrainingModuleConfig",
    "TransformerConfig",
    "WanAutoencoder",
    "build_model",
    "get_preset",
]

_LAZY = {
    "PRESETS": "sama.models.presets",
    "SamaComponents": "sama.models.presets",
    "build_model": "sama.models.presets",
    "get_preset": "sama.models.presets",
    "SamaTransformer3DModel": "sama.models.transformer_sama",
    "SamaTransformerOutput": "sama.models.transformer_sama",
    "SemanticEncoder": "sama.models.semantic",
    "LatentAutoencoder": "sama.models.autoencoders",
    "SpaceToDepthAutoencoder": "sama.models.autoencoders",
    "WanAutoencoder": "sama.models.autoencoders",
    "ByteTokenizer": "sama.models.text",
    "TextEncoder": "sama.models.text",
    "SamaBatch": "sama.models.training",
    "SamaTrainingModule": "sama.models.training",
    "TrainingModuleConfig": "sama.models.training",
}


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'sama.models' has no attribute {name!r}")
    return getattr(importlib.import_module(module), name)
