"""Named model presets and :func:`build_model`, which turns a :class:`ModelConfig` into modules.

Presets (configurations only; weights come from ``pretrained``, a local dir or hub id):

* ``tiny``: CPU tests and the quickstart. 2 layers, width 192 (3 heads x 64), ffn 384; a 2-layer
  32-d UMT5 text encoder with a hashed word tokenizer (32 words); a 2-layer 32-d SigLIP on 64 px
  with an 8x8 patch grid; the lossless space-to-depth autoencoder (4x temporal, 2x spatial, 48
  channels). The width equals the values per token (48 channels x 2x2 patch) so the model can
  represent a lossless latent, noise included. Random init, with every self-attention head
  starting local (``transformer.attention_locality_init``), as a pretrained Wan's are.
* ``wan2.1-1.3b``: Wan2.1-T2V-1.3B. Width 1536 (12 x 128), ffn 8960, 30 layers, 16 channels,
  Wan2.1 VAE, umT5-XXL. Weights e.g. ``Wan-AI/Wan2.1-T2V-1.3B-Diffusers``.
* ``wan2.1-14b``: Wan2.1-T2V-14B, the paper's backbone. Width 5120 (40 x 128), ffn 13824, 40
  layers. Weights e.g. ``Wan-AI/Wan2.1-T2V-14B-Diffusers``.
* ``wan2.2-5b``: Wan2.2-TI2V-5B, the paper's ablation backbone. Width 3072 (24 x 128), ffn 14336,
  30 layers, 48 channels, Wan2.2 VAE (z 48, patchified, 16x spatial). Weights e.g.
  ``Wan-AI/Wan2.2-TI2V-5B-Diffusers``.

The Wan presets use SigLIP so400m-patch14-384 (1152-d) for Semantic Anchoring; its weights are
``semantic.pretrained`` (e.g. ``google/siglip-so400m-patch14-384``).
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import hashlib
import json
import threading
import zlib
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import torch

from sama.models.autoencoders import LatentAutoencoder, build_autoencoder
from sama.models.config import (
    WAN22_LATENTS_MEAN,
    WAN22_LATENTS_STD,
    AutoencoderConfig,
    ModelConfig,
    SemanticConfig,
    TextConfig,
    TransformerConfig,
)
from sama.models.semantic import SemanticEncoder
from sama.models.text import TextEncoder, build_text_encoder
from sama.models.transformer_sama import SamaTransformer3DModel

__all__ = [
    "PRESETS",
    "SamaComponents",
    "build_model",
    "build_semantic_encoder",
    "build_transformer",
    "encoder_identity",
    "encoder_mismatch",
    "get_preset",
    "resolve_model_config",
    "siglip_vision_config",
    "torch_dtype_of",
    "transformer_mismatch",
]

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def torch_dtype_of(config: ModelConfig) -> torch.dtype:
    """The ``torch.dtype`` named by ``config.torch_dtype``."""
    return _DTYPES[config.torch_dtype]


def _tiny() -> ModelConfig:
    return ModelConfig(
        preset="tiny",
        # Width 192 = the 48 latent channels x 2x2 patch: a token carries 192 values of a lossless
        # latent, and a narrower model could not even represent the noise it must remove.
        transformer=TransformerConfig(
            num_attention_heads=3,
            attention_head_dim=64,
            in_channels=48,
            out_channels=48,
            text_dim=32,
            freq_dim=64,
            ffn_dim=384,
            num_layers=2,
            # A random DiT attends uniformly and takes hundreds of steps to find the source token
            # that shares a target token's position; local heads find it at once (bench/learning.py).
            attention_locality_init=2.0,
        ),
        vae=AutoencoderConfig(kind="space_to_depth", spatial_factor=2, temporal_factor=4),
        text=TextConfig(
            # One token per word: a small DiT learns to read words from a frozen random encoder far
            # sooner than it assembles them from bytes (bench/learning.py).
            tokenizer="word",
            max_length=32,
            d_model=32,
            d_kv=8,
            d_ff=64,
            num_layers=2,
            num_heads=4,
            vocab_size=32768,
            relative_attention_num_buckets=8,
            relative_attention_max_distance=32,
        ),
        semantic=SemanticConfig(
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=2,
            num_attention_heads=2,
            image_size=64,
            patch_size=8,
            projector_hidden_dim=64,
        ),
    )


def _wan(preset: str, heads: int, ffn: int, layers: int) -> ModelConfig:
    return ModelConfig(
        preset=preset,
        transformer=TransformerConfig(
            num_attention_heads=heads, attention_head_dim=128, ffn_dim=ffn, num_layers=layers
        ),
    )


def _wan22_5b() -> ModelConfig:
    config = _wan("wan2.2-5b", heads=24, ffn=14336, layers=30)
    config.transformer.in_channels = 48
    config.transformer.out_channels = 48
    config.vae = AutoencoderConfig(
        kind="wan",
        base_dim=160,
        decoder_base_dim=256,
        z_dim=48,
        dim_mult=[1, 2, 4, 4],
        temperal_downsample=[False, True, True],
        is_residual=True,
        in_channels=12,
        out_channels=12,
        patch_size=2,
        scale_factor_temporal=4,
        scale_factor_spatial=16,
        latents_mean=list(WAN22_LATENTS_MEAN),
        latents_std=list(WAN22_LATENTS_STD),
    )
    return config


PRESETS: dict[str, Callable[[], ModelConfig]] = {
    "tiny": _tiny,
    "wan2.1-1.3b": lambda: _wan("wan2.1-1.3b", heads=12, ffn=8960, layers=30),
    "wan2.1-14b": lambda: _wan("wan2.1-14b", heads=40, ffn=13824, layers=40),
    "wan2.2-5b": _wan22_5b,
}


def get_preset(name: str) -> ModelConfig:
    """A fresh :class:`ModelConfig` for preset ``name`` (one of :data:`PRESETS`)."""
    try:
        factory = PRESETS[name]
    except KeyError:
        raise ValueError(f"unknown model preset {name!r}; known presets: {', '.join(PRESETS)}") from None
    config = factory()
    config.validate()
    return config


def resolve_model_config(preset_or_config: str | ModelConfig, pretrained: str | None = None) -> ModelConfig:
    """A validated copy of the preset / config, with ``pretrained`` set when given and every unset
    parity knob filled from ``config.parity``'s profile (:mod:`sama.models.parity`)."""
    if isinstance(preset_or_config, str):
        config = get_preset(preset_or_config)
    elif isinstance(preset_or_config, ModelConfig):
        config = copy.deepcopy(preset_or_config)
    else:
        raise TypeError(f"expected a preset name or a ModelConfig, got {type(preset_or_config).__name__}")
    if pretrained is not None:
        config = dataclasses.replace(config, pretrained=pretrained)
    config = config.resolved()
    config.validate()
    return config


def _sama_kwargs(config: ModelConfig) -> dict[str, Any]:
    sem = config.resolved().semantic
    return {
        "semantic_dim": sem.hidden_size if sem.enabled else None,
        "semantic_hidden_dim": sem.projector_hidden_dim,
        "semantic_grid_size": sem.grid_size,
        "semantic_rope": sem.rope,
        "semantic_layernorm_eps": sem.layernorm_eps,
        "semantic_head_init": sem.head_init,
    }


def cast_keeping_float32_modules(model: torch.nn.Module, dtype: torch.dtype) -> torch.nn.Module:
    """``model`` with its parameters and buffers in ``dtype``, except those of the modules its
    ``_keep_in_fp32_modules`` names (any part of a module's dotted name), which stay float32: what
    diffusers' ``from_pretrained(torch_dtype=dtype)`` loads, where ``model.to(dtype)`` would cast
    them too. Works on the meta device."""
    keep = set(getattr(model, "_keep_in_fp32_modules", None) or ())

    def cast(name: str, key: str, tensor: torch.Tensor) -> bool:
        # diffusers matches every part of the full name (a parameter like scale_shift_table too).
        return tensor.is_floating_point() and not keep.intersection(f"{name}.{key}".split("."))

    for name, module in model.named_modules():
        for key, param in module.named_parameters(recurse=False):
            if cast(name, key, param):
                param.data = param.data.to(dtype)
        for key, buffer in module.named_buffers(recurse=False):
            if cast(name, key, buffer):
                module._buffers[key] = buffer.to(dtype)
    return model


def build_transformer(config: ModelConfig, *, load_weights: bool = True) -> SamaTransformer3DModel:
    """The SAMA transformer: Wan weights from the config's source, or random init.

    With weights, the checkpoint's architecture must match ``config.transformer`` (a mismatch is an
    error naming the differing keys, so a recipe cannot silently train another model than it says).
    ``load_weights=False`` builds the architecture only (random init), e.g. to receive a trained
    state dict for export without reading the Wan checkpoint again.
    """
    source = config.component_source("transformer") if load_weights else None
    dtype = torch_dtype_of(config)
    if source is None:
        model = SamaTransformer3DModel(**config.transformer.wan_kwargs(), **_sama_kwargs(config))
        model.init_attention_locality(config.transformer.attention_locality_init)
        # Random init happens in float32; a reduced-precision config casts all but the modules Wan
        # keeps in float32, as from_pretrained(torch_dtype=...) leaves a loaded model.
        return model if dtype == torch.float32 else cast_keeping_float32_modules(model, dtype)
    from diffusers import WanTransformer3DModel

    base = WanTransformer3DModel.from_pretrained(
        source, subfolder=config.transformer.subfolder or None, torch_dtype=dtype
    )
    mismatch = transformer_mismatch(config, base.config)
    if mismatch:
        raise ValueError(f"{source}: {mismatch}")
    return SamaTransformer3DModel.from_wan(base, **_sama_kwargs(config))


def transformer_mismatch(config: ModelConfig, checkpoint_config: Mapping[str, Any]) -> str | None:
    """How a Wan transformer checkpoint's ``config.json`` differs from ``config.transformer``
    (architecture keys; the rotary table length is not one), or None when it matches."""
    differing = {
        key: (value, checkpoint_config.get(key))
        for key, value in config.transformer.wan_kwargs().items()
        if key != "rope_max_seq_len" and _normalise(checkpoint_config.get(key)) != _normalise(value)
    }
    if not differing:
        return None
    details = ", ".join(f"{k}: config {v[0]!r} vs checkpoint {v[1]!r}" for k, v in differing.items())
    return f"transformer checkpoint does not match the '{config.preset}' config ({details})"


def _normalise(value: Any) -> Any:
    return list(value) if isinstance(value, tuple | list) else value


def siglip_vision_config(sem: SemanticConfig):
    """The ``transformers.SiglipVisionConfig`` of ``sem``'s architecture (no pooling head: the
    patch tokens are pooled by :func:`sama.models.semantic.pool_patch_tokens`)."""
    from transformers import SiglipVisionConfig

    return SiglipVisionConfig(
        hidden_size=sem.hidden_size,
        intermediate_size=sem.intermediate_size,
        num_hidden_layers=sem.num_hidden_layers,
        num_attention_heads=sem.num_attention_heads,
        image_size=sem.image_size,
        patch_size=sem.patch_size,
        vision_use_head=False,
    )


def build_semantic_encoder(config: ModelConfig) -> SemanticEncoder | None:
    """The frozen SigLIP semantic encoder, or None when Semantic Anchoring is disabled."""
    sem = config.resolved().semantic
    if not sem.enabled:
        return None
    from transformers import SiglipVisionModel

    dtype = torch_dtype_of(config)
    if sem.pretrained is not None:
        kwargs: dict[str, Any] = {"subfolder": sem.subfolder} if sem.subfolder else {}
        vision = SiglipVisionModel.from_pretrained(sem.pretrained, dtype=dtype, **kwargs)
        if int(vision.config.hidden_size) != sem.hidden_size:
            raise ValueError(
                f"{sem.pretrained}: SigLIP hidden size {vision.config.hidden_size} != semantic.hidden_size "
                f"{sem.hidden_size}; set semantic.hidden_size to match the checkpoint"
            )
    else:
        with frozen_init("semantic_encoder"):
            vision = SiglipVisionModel(siglip_vision_config(sem)).to(dtype)
    return SemanticEncoder(
        vision,
        grid_size=sem.grid_size,
        num_anchors=sem.num_anchors,
        anchor_sampling=sem.anchor_sampling,
        normalize=sem.normalize,
    )


FROZEN_ENCODERS = ("vae", "text_encoder", "semantic_encoder")
_FROZEN_INIT_LOCK = threading.RLock()


@contextlib.contextmanager
def frozen_init(component: str):
    """Random initialisation of a frozen encoder as a function of its configuration alone.

    A randomly initialised frozen encoder (tests, the tiny preset) is drawn from a generator seeded
    by the component's name, whatever was built before it and whatever the run's seed: `sama
    precompute` (which builds no transformer), a training run and its export then hold the same
    encoder, so latents precomputed once fit every run of the preset. The global generator is left
    as it was. Initialisation draws from torch's process-wide generator, so builds in concurrent
    threads (the quickstart runs two precompute drivers at once) take turns.
    """
    with _FROZEN_INIT_LOCK, torch.random.fork_rng(devices=[]):
        torch.manual_seed(zlib.crc32(f"sama-frozen-{component}".encode()))
        yield


def _digest(value: Any) -> str:
    return hashlib.sha256(json.dumps(value, sort_keys=True, default=str).encode()).hexdigest()[:16]


def encoder_identity(config: ModelConfig) -> dict[str, dict[str, Any]]:
    """What the frozen encoders of ``config`` are: per encoder, a digest of its architecture (and of
    the settings its outputs depend on), where its weights come from (``"random-init"``: the
    seeded initialisation of :func:`frozen_init`) and its dtype.

    Latent shards record the identity of the encoders that made them (``sama precompute``);
    training compares it with its own model's (:func:`encoder_mismatch`). An export records the
    identity of the encoders it was trained with, since an export's own configuration no longer
    names their original checkpoint.
    """
    config = config.resolved()
    dtype = config.torch_dtype

    def entry(architecture: Any, weights: str | None, subfolder: str | None = None) -> dict[str, Any]:
        from sama import storage

        source = "random-init" if weights is None else storage.redact(weights)
        if weights is not None and subfolder:
            source = f"{source}#{subfolder}"
        return {"architecture": _digest(architecture), "weights": source, "dtype": dtype}

    vae = dataclasses.asdict(config.vae)
    vae.pop("pretrained", None)
    vae.pop("subfolder", None)
    text = dataclasses.asdict(config.text)
    text.pop("pretrained", None)
    identity = {
        "vae": entry(vae, config.component_source("vae"), config.vae.subfolder),
        "text_encoder": entry(text, config.component_source("text")),
    }
    sem = config.semantic
    if sem.enabled:
        architecture = {
            k: v for k, v in dataclasses.asdict(sem).items() if k not in ("pretrained", "subfolder")
        }
        # Only what the frozen encoder's tokens depend on (not the trainable projector's knobs).
        for trainable in ("projector_hidden_dim", "rope", "layernorm_eps", "head_init"):
            architecture.pop(trainable, None)
        identity["semantic_encoder"] = entry(architecture, sem.pretrained, sem.subfolder)
    return identity


def encoder_mismatch(made_by: Mapping[str, Any], model: Mapping[str, Any], needed: tuple[str, ...]) -> str:
    """Why tensors made by encoders ``made_by`` cannot stand in for the model's encoders ``model``
    (both :func:`encoder_identity` dicts), over the encoders in ``needed``; empty when they can."""
    problems = []
    for name in needed:
        ours, theirs = model.get(name), made_by.get(name)
        if theirs is None:
            problems.append(f"{name}: not precomputed")
            continue
        if ours is None:
            continue
        differing = [
            f"{field} {theirs.get(field)!r} (model: {ours.get(field)!r})"
            for field in ("weights", "architecture", "dtype")
            if theirs.get(field) != ours.get(field)
        ]
        if differing:
            problems.append(f"{name}: " + ", ".join(differing))
    return "; ".join(problems)


@dataclass
class SamaComponents:
    """Everything :func:`build_model` makes. Encoders are frozen; only ``transformer`` trains.

    ``transformer``, ``vae``, ``text_encoder`` and ``semantic_encoder`` are None when not requested
    (or, for the semantic encoder, when Semantic Anchoring is disabled).
    """

    config: ModelConfig
    transformer: SamaTransformer3DModel | None
    vae: LatentAutoencoder | None
    text_encoder: TextEncoder | None
    semantic_encoder: SemanticEncoder | None

    def to(self, device: torch.device | str) -> SamaComponents:
        """Move every component to ``device`` (in place); returns self."""
        for module in (self.transformer, self.vae, self.text_encoder, self.semantic_encoder):
            if module is not None:
                module.to(device)
        return self


def build_model(
    preset_or_config: str | ModelConfig,
    pretrained: str | None = None,
    *,
    with_vae: bool = True,
    with_text_encoder: bool = True,
    with_semantic_encoder: bool = True,
    with_transformer: bool = True,
    device: torch.device | str | None = None,
) -> SamaComponents:
    """Build every component of a SAMA model.

    Args:
        preset_or_config: a preset name (:data:`PRESETS`) or a :class:`ModelConfig`.
        pretrained: root of a Wan diffusers repository (local dir or hub id); overrides
            ``config.pretrained``. None keeps the config's (random init when that is None too).
        with_vae / with_text_encoder / with_semantic_encoder: skip components a caller does not
            need (e.g. a benchmark feeding precomputed latents and text embeddings).
        with_transformer: False builds the frozen encoders only (``transformer`` is None):
            ``sama precompute`` never pays for a 14B transformer it does not run.
        device: where to put the modules (default: where they were built, the CPU).

    Returns:
        :class:`SamaComponents`, whose ``config`` is the resolved configuration.
    """
    config = resolve_model_config(preset_or_config, pretrained)
    dtype = torch_dtype_of(config)
    transformer = build_transformer(config) if with_transformer else None
    vae = text = None
    if with_vae:
        with frozen_init("vae"):
            vae = build_autoencoder(config.vae, config.component_source("vae"), dtype)
    if with_text_encoder:
        with frozen_init("text_encoder"):
            text = build_text_encoder(config.text, config.component_source("text"), dtype)
    semantic = build_semantic_encoder(config) if with_semantic_encoder else None
    if text is not None and text.hidden_size != config.transformer.text_dim:
        raise ValueError(
            f"text encoder is {text.hidden_size}-d but transformer.text_dim is {config.transformer.text_dim}"
        )
    if vae is not None and vae.latent_channels != config.transformer.in_channels:
        raise ValueError(
            f"autoencoder makes {vae.latent_channels} channels but transformer.in_channels is "
            f"{config.transformer.in_channels}"
        )
    components = SamaComponents(config, transformer, vae, text, semantic)
    if device is not None:
        components.to(device)
    return components
