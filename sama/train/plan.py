"""The per-GPU memory plan of a training recipe, computed without running it (``sama plan``).

Nothing is loaded: the transformer, the umT5 text encoder, the VAE and SigLIP are built on the meta
device (accelerate ``init_empty_weights``) from the recipe's model configuration, so parameter
counts are exact; the LoRA adapters (``model.lora``) are injected there too. ``sama train`` checks
the same plan before it starts a GPU run (:func:`sama.train.preflight.check_memory_plan`).

Notation. ``W`` = workers (``scaling.num_workers``), ``C`` = context-parallel degree
(``parallel.context_parallel_size``, 1 when absent), ``N`` = all transformer parameters, ``N_t``
= the trainable ones (all of them; with LoRA the adapters and SAMA's modules), ``m`` = bytes of a
master parameter (the model's ``torch_dtype``; LoRA adapters are float32), ``c`` = bytes of a
compute value (2 with bf16 mixed precision on GPU, else 4), ``L`` layers, ``D`` width, ``F`` FFN
width, ``d`` head dim. ``N_blk`` / ``N_root`` = parameters of one block / outside the blocks.

State (per GPU; FSDP2 shards over ``S = W``, DDP and a single worker hold everything, ``S = 1``):

* params     = ``N * m / S`` + compute copies. FSDP2: ``c * (N_root + P * N_blk)`` when
  ``c != m`` or ``S > 1`` (the all-gathered root, and ``P = prefetch_blocks`` = 2 unsharded blocks:
  the running one and the prefetched one); DDP with bf16 autocast: ``c * N_t`` (autocast's cache of
  the trainable weights' bf16 casts, held for the forward).
* grads      = ``N_t * m / S``, plus under FSDP2 one block's unsharded fp32 gradient before its
  reduce-scatter (``4 * N_t,blk``), under DDP (``W > 1``) the gradient buckets (``N_t * m``).
* optimizer  = ``2 * N_t * m / S`` (AdamW's exp_avg and exp_avg_sq, in the parameter's dtype: fp32
  for an fp32 master).
* ema        = ``4 * N_t / S`` (an fp32 shadow of the trainable weights, sharded like them).
* encoders   = the frozen umT5 + VAE + SigLIP parameters at their dtype (``torch_dtype``), whole on
  every GPU (they are not sharded); 0 when every training source is precomputed (``sama
  precompute``: training builds no frozen encoder), the bytes saved shown as frozen_encoders_bytes.
* overhead   = ``overhead_gib`` (CUDA context, NCCL buffers, allocator slack; not seen by
  ``torch.cuda.max_memory_allocated``).

Activations (the micro-batch that costs most: ``B`` samples of the largest bucket; a video
sample has ``num_frames`` frames, an image 1):

* tokens per sample = source + semantic + target tokens: ``2 * T_lat * (H/s/p_h) * (W/s/p_w) +
  anchors * (grid^2 + 1)`` with ``T_lat = (frames - 1) / t + 1`` (VAE compression ``t`` in time,
  ``s`` in space, patch ``p``); the source has the target's length.
* ``T = B * tokens_per_sample / C`` tokens on one GPU (context parallelism splits the sequence).
* per layer and token, the tensors autograd saves at bf16 (flash attention: no ``seq^2`` term):
  ``a_layer = (width_bytes * D + ffn_bytes * F) * c / 2``. ``width_bytes`` = 54 counts the Wan
  block's saved tensors: the fp32 LayerNorm inputs and outputs of norm1/norm3 and norm2's input
  (4 + 4 + 4 + 4 + 4 bytes per element), the modulated bf16 inputs of q/k/v, the cross-attention
  query and FFN (2 + 2 + 2), q/k/v and the RMSNorm'd, rotated q/k of self-attention (2 * 7), the
  cross-attention query before/after its RMSNorm (2 + 2), both attention outputs (2 + 2), the
  gated attention output (2) and the FFN output upcast to fp32 (4); ``ffn_bytes`` = 4 is the FFN's
  hidden pre- and post-GELU (2 + 2).
* with activation checkpointing (per block): ``T * (L * boundary_bytes * D * c / 2 + a_layer +
  a_bwd)``: every block's input is kept, one block is recomputed at a time, and its backward
  needs ``a_bwd = backward_bytes * D * c / 2`` per token of gradient temporaries.
* without: ``T * (L * a_layer + a_bwd)``.
* plus, either way, ``T * (model_bytes * D + 16 * d) * c / 2``: the tensors outside the blocks
  (patch embedding, type embedding, output norm and projection, semantic head, and the fp32
  rotary tables, cos and sin of ``d`` values).

total = params + grads + optimizer + ema + encoders + activations + overhead; it fits when
``total <= gpu_memory`` (``--gpu-memory``, else ``plan.gpu_memory_gib``, 80 GiB by default). The
activation constants are :class:`ActivationModel` fields (``plan.activation.*``), to be calibrated
against measured peaks.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from sama.train.trainer import TrainConfig

GIB = 2**30
PER_GPU_KEYS = ("params", "grads", "optimizer", "ema", "encoders", "activations", "overhead", "total")


@dataclass
class ActivationModel:
    """Bytes autograd keeps per token, at bf16 (see the module docstring for each term)."""

    # Saved tensors of one transformer block, per width element and per FFN element.
    width_bytes: float = 54.0
    ffn_bytes: float = 4.0
    # With activation checkpointing: each block's saved input, per width element.
    boundary_bytes: float = 2.0
    # Gradient temporaries of the block being differentiated, per width element.
    backward_bytes: float = 16.0
    # Everything outside the blocks, per width element.
    model_bytes: float = 16.0
    # FSDP2: unsharded blocks held at once (the running one and the prefetched one).
    prefetch_blocks: int = 2


@dataclass
class PlanSection:
    """``plan``: what ``sama plan`` and ``sama train``'s memory check assume."""

    # Memory of one GPU (80 for H100/A100-80G, 141 for H200).
    gpu_memory_gib: float = 80.0
    # Frames of a training video clip (the prep jobs' clips.num_frames / align.max_frames); None:
    # inference.max_frames (what the data was prepared at, 81 by default).
    num_frames: int | None = None
    # CUDA context, NCCL buffers and allocator slack.
    overhead_gib: float = 2.0
    # A GPU run whose plan does not fit is refused before it starts; false (`sama train --force`)
    # only warns.
    enforce: bool = True
    activation: ActivationModel = field(default_factory=ActivationModel)

    def validate(self) -> None:
        if self.gpu_memory_gib <= 0:
            raise ValueError("plan.gpu_memory_gib must be positive")
        if self.num_frames is not None and self.num_frames < 1:
            raise ValueError("plan.num_frames must be >= 1")


@dataclass
class MemoryPlan:
    """Per-GPU bytes of a recipe (see the module docstring for every term)."""

    recipe: str
    world_size: int
    context_parallel_size: int
    strategy: str
    activation_checkpointing: bool
    preset: str
    num_frames: int
    bucket: str
    media: str
    micro_batch: int
    tokens_per_sample: int
    tokens_per_gpu: int
    tokens_per_bucket: dict[str, int]
    param_counts: dict[str, int]
    per_gpu: dict[str, int]
    gpu_memory: int
    notes: list[str] = field(default_factory=list)
    # Every training source is precomputed (sama precompute): training builds no frozen encoder,
    # so the encoders' bytes (frozen_encoders_bytes) are not in per_gpu.
    precomputed: bool = False
    frozen_encoders_bytes: int = 0

    @property
    def total(self) -> int:
        return self.per_gpu["total"]

    @property
    def fits(self) -> bool:
        return self.total <= self.gpu_memory

    def to_dict(self) -> dict[str, Any]:
        return {
            "recipe": self.recipe,
            "world_size": self.world_size,
            "per_gpu": dict(self.per_gpu),
            "gpu_memory": self.gpu_memory,
            "fits": self.fits,
            "context_parallel_size": self.context_parallel_size,
            "strategy": self.strategy,
            "activation_checkpointing": self.activation_checkpointing,
            "preset": self.preset,
            "num_frames": self.num_frames,
            "bucket": self.bucket,
            "media": self.media,
            "micro_batch": self.micro_batch,
            "tokens_per_sample": self.tokens_per_sample,
            "tokens_per_gpu": self.tokens_per_gpu,
            "tokens_per_bucket": dict(self.tokens_per_bucket),
            "param_counts": dict(self.param_counts),
            "precomputed": self.precomputed,
            "frozen_encoders_bytes": self.frozen_encoders_bytes,
            "notes": list(self.notes),
        }

    def format(self) -> str:
        counts = self.param_counts
        lines = [
            f"memory plan of {self.recipe}: {self.preset}, {self.world_size} worker(s), {self.strategy}"
            f"{' + activation checkpointing' if self.activation_checkpointing else ''}, context parallel "
            f"{self.context_parallel_size}",
            f"  transformer {counts['transformer'] / 1e9:.3f}B params ({counts['trainable'] / 1e9:.3f}B "
            f"trainable); encoders {counts['encoders'] / 1e9:.3f}B",
            f"  largest micro-batch: {self.micro_batch} {self.media} sample(s) of {self.bucket} x "
            f"{self.num_frames if self.media == 'video' else 1} frame(s), {self.tokens_per_sample} tokens "
            f"each, {self.tokens_per_gpu} tokens per GPU",
            "  per GPU:",
        ]
        for key in PER_GPU_KEYS:
            if key == "total":
                continue
            lines.append(f"    {key:<12}{self.per_gpu[key] / GIB:10.2f} GiB")
        lines.append(f"    {'total':<12}{self.total / GIB:10.2f} GiB")
        if self.precomputed:
            lines.append(
                f"  every source is precomputed: the frozen encoders ({self.frozen_encoders_bytes / GIB:.2f} "
                "GiB) are not loaded on the GPUs"
            )
        else:
            lines.append(
                f"  precomputing every source (sama precompute) would save the frozen encoders' "
                f"{self.frozen_encoders_bytes / GIB:.2f} GiB per GPU"
            )
        verdict = "fits" if self.fits else "does NOT fit"
        lines.append(f"  {verdict} in {self.gpu_memory / GIB:.0f} GiB per GPU")
        lines += [f"  note: {note}" for note in self.notes]
        return "\n".join(lines)


# ---------------------------------------------------------------------------------------------
# Counting


def _model_config(cfg: TrainConfig, notes: list[str]):
    """The resolved model config (the init_from export's when readable, else the preset's)."""
    from sama import config as config_lib
    from sama.models.presets import get_preset
    from sama.train.trainer import _override_text, resolve_model_config

    try:
        return resolve_model_config(cfg.model)
    except Exception as exc:
        if not cfg.model.init_from:
            raise
        notes.append(f"model.init_from is not readable here ({type(exc).__name__}); planned the preset")
    model_config = get_preset(cfg.model.preset)
    for key, value in config_lib.flatten(cfg.model.overrides).items():
        model_config = config_lib.apply_override(model_config, f"{key}={_override_text(value)}")
    if cfg.model.parity is not None:
        model_config = dataclasses.replace(model_config, parity=cfg.model.parity)
    if cfg.model.init_from:
        # A converted or exported Wan model is written in bfloat16 (sama convert's default).
        model_config = dataclasses.replace(model_config, torch_dtype="bfloat16")
        notes.append("assumed the export's dtype is bfloat16 (sama convert's default)")
    return model_config.resolved()


def _meta_modules(model_config, lora) -> dict[str, Any]:
    """The transformer (LoRA injected) and the frozen encoders, on the meta device."""
    from diffusers.utils import logging as diffusers_logging

    from sama.models.presets import torch_dtype_of

    dtype = torch_dtype_of(model_config)
    modules: dict[str, Any] = {}
    verbosity = diffusers_logging.get_verbosity()
    # Casting to a reduced dtype warns about fp32-only modules: noise for a count.
    diffusers_logging.set_verbosity_error()
    try:
        _build_meta(modules, model_config, lora, dtype)
    finally:
        diffusers_logging.set_verbosity(verbosity)
    return modules


def _build_meta(modules: dict[str, Any], model_config, lora, dtype) -> None:
    import torch
    from accelerate import init_empty_weights

    from sama.models.presets import _sama_kwargs, cast_keeping_float32_modules
    from sama.models.transformer_sama import SamaTransformer3DModel

    with init_empty_weights():
        # The dtypes a loaded checkpoint has (Wan's float32 modules stay float32).
        transformer = cast_keeping_float32_modules(
            SamaTransformer3DModel(**model_config.transformer.wan_kwargs(), **_sama_kwargs(model_config)),
            dtype,
        )
        if lora is not None and lora.enabled:
            from sama.models.lora import apply_lora

            apply_lora(transformer, lora)
            for name, param in transformer.named_parameters():
                if ".lora_" in name:  # peft keeps a reduced-precision base's adapters in fp32
                    param.data = param.data.to(torch.float32)
        modules["transformer"] = transformer
        modules["text_encoder"] = _meta_text_encoder(model_config.text)
        if model_config.vae.kind == "wan":
            from diffusers import AutoencoderKLWan

            modules["vae"] = AutoencoderKLWan(**model_config.vae.wan_kwargs())
        sem = model_config.semantic
        if sem.enabled:
            from transformers import SiglipVisionModel

            from sama.models.presets import siglip_vision_config

            modules["semantic_encoder"] = SiglipVisionModel(siglip_vision_config(sem))
    for name, module in modules.items():
        if name != "transformer":
            module.to(dtype)


def _meta_text_encoder(text):
    from transformers import UMT5EncoderModel

    from sama.models.text import umt5_config

    vocab = text.vocab_size
    if text.tokenizer != "auto":
        from sama.models.text import _vocabulary_free_tokenizer

        vocab = max(vocab, _vocabulary_free_tokenizer(text).vocab_size)
    model = UMT5EncoderModel(umt5_config(text, vocab_size=vocab))
    # The token embedding is shared (tied) as in a loaded model; on the meta device the tie is
    # not made, so make it here for the count.
    model.encoder.embed_tokens = model.shared
    return model


def _bytes(params) -> int:
    return sum(p.numel() * p.element_size() for p in params)


def _count(params) -> int:
    return sum(p.numel() for p in params)


def sample_tokens(model_config, height: int, width: int, frames: int) -> dict[str, int]:
    """Source, semantic and target tokens of one sample of ``frames`` frames at ``height x width``."""
    vae = model_config.vae
    p_t, p_h, p_w = model_config.transformer.patch_size
    latent_frames = (frames - 1) // vae.temporal_compression + 1
    s = vae.spatial_compression
    grid = (latent_frames // p_t) * (height // s // p_h) * (width // s // p_w)
    sem = model_config.semantic
    semantic = sem.num_anchors * (sem.grid_size**2 + 1) if sem.enabled else 0
    return {"source": grid, "semantic": semantic, "target": grid, "total": 2 * grid + semantic}


def all_sources_precomputed(cfg: TrainConfig, notes: list[str]) -> bool:
    """Whether every training source of ``cfg`` is a latent output (``sama precompute``), judged
    from their ``latents.json``; False (with a note) when a source cannot be read from here."""
    from sama import schema

    if not cfg.data.sources:
        return False
    try:
        return all(schema.read_latent_info(source.uri) is not None for source in cfg.data.sources)
    except Exception as exc:  # storage errors: the plan does not need the data to be reachable
        notes.append(
            f"could not tell whether the sources are precomputed ({type(exc).__name__}); "
            "planned with the frozen encoders"
        )
        return False


def memory_plan(
    cfg: TrainConfig,
    recipe: str = "recipe",
    gpu_memory_gib: float | None = None,
    precomputed: bool | None = None,
) -> MemoryPlan:
    """The per-GPU memory plan of ``cfg`` (see the module docstring).

    ``precomputed``: whether every training source is precomputed (no frozen encoder on the
    GPUs); None: decided from the sources' ``latents.json`` when they are reachable.
    """
    notes: list[str] = []
    if precomputed is None:
        precomputed = all_sources_precomputed(cfg, notes)
    section: PlanSection = getattr(cfg, "plan", None) or PlanSection()
    act = section.activation
    model_config = _model_config(cfg, notes)
    lora = getattr(cfg.model, "lora", None)
    modules = _meta_modules(model_config, lora)
    transformer = modules["transformer"]
    params = list(transformer.parameters())
    trainable = [p for p in params if p.requires_grad]
    block_params = list(transformer.blocks[0].parameters())
    block_ids = {id(p) for block in transformer.blocks for p in block.parameters()}
    root_params = [p for p in params if id(p) not in block_ids]
    encoders = [p for name, m in modules.items() if name != "transformer" for p in m.parameters()]

    parallel = cfg.parallel
    workers = cfg.scaling.num_workers
    cp = max(1, int(getattr(parallel, "context_parallel_size", 1) or 1))
    gpu = cfg.scaling.use_gpu
    compute = 2 if (gpu and parallel.mixed_precision == "bf16") else 4
    fsdp = parallel.strategy == "fsdp2"
    shards = workers if fsdp else 1

    param_bytes = _bytes(params)
    trainable_bytes = _bytes(trainable)
    trainable_count = _count(trainable)
    master = param_bytes / max(1, _count(params))
    copies = 0.0
    grad_extra = 0.0
    if fsdp:
        if shards > 1 or compute != master:
            copies = compute * (_count(root_params) + act.prefetch_blocks * _count(block_params))
        grad_extra = 4 * _count(p for p in block_params if p.requires_grad)
    else:
        if compute < master:
            copies = compute * trainable_count
        if workers > 1:
            grad_extra = trainable_bytes
    per_gpu = {
        "params": param_bytes / shards + copies,
        "grads": trainable_bytes / shards + grad_extra,
        "optimizer": 2 * trainable_bytes / shards,
        "ema": 4 * trainable_count / shards,
        "encoders": 0.0 if precomputed else float(_bytes(encoders)),
    }

    # Activations: the largest micro-batch.
    buckets = cfg.inference.buckets.buckets()
    frames = section.num_frames or getattr(cfg.data, "num_frames", None) or cfg.inference.max_frames
    tokens_per_bucket = {
        b.name: sample_tokens(model_config, b.height, b.width, frames)["total"] for b in buckets
    }
    largest = max(buckets, key=lambda b: tokens_per_bucket[b.name])
    media_present = {s.media for s in cfg.data.sources} or {"video"}
    candidates = []
    for media in sorted(media_present):
        sample_frames = frames if media == "video" else 1
        per_sample = sample_tokens(model_config, largest.height, largest.width, sample_frames)["total"]
        candidates.append((cfg.data.batch_size(media) * per_sample, media, per_sample))
    batch_tokens, media, per_sample = max(candidates)
    tokens = math.ceil(batch_tokens / cp)
    t = model_config.transformer
    width = t.num_attention_heads * t.attention_head_dim
    scale = compute / 2
    a_layer = (act.width_bytes * width + act.ffn_bytes * t.ffn_dim) * scale
    a_bwd = act.backward_bytes * width * scale
    outside = (act.model_bytes * width + 16 * t.attention_head_dim) * scale
    if parallel.activation_checkpointing:
        per_token = t.num_layers * act.boundary_bytes * width * scale + a_layer + a_bwd
    else:
        per_token = t.num_layers * a_layer + a_bwd
    per_gpu["activations"] = tokens * (per_token + outside)
    per_gpu["overhead"] = section.overhead_gib * GIB if gpu else 0.0
    per_gpu = {key: int(round(value)) for key, value in per_gpu.items()}
    per_gpu["total"] = sum(per_gpu.values())
    per_gpu = {key: per_gpu[key] for key in PER_GPU_KEYS}

    if cp > 1 and not hasattr(parallel, "context_parallel_size"):
        notes.append("context parallelism is not available in this version")
    memory = section.gpu_memory_gib if gpu_memory_gib is None else gpu_memory_gib
    return MemoryPlan(
        recipe=recipe,
        world_size=workers,
        context_parallel_size=cp,
        strategy=parallel.strategy,
        activation_checkpointing=bool(parallel.activation_checkpointing),
        preset=model_config.preset,
        num_frames=frames,
        bucket=largest.name,
        media=media,
        micro_batch=cfg.data.batch_size(media),
        tokens_per_sample=per_sample,
        tokens_per_gpu=tokens,
        tokens_per_bucket=tokens_per_bucket,
        param_counts={
            "transformer": _count(params),
            "trainable": trainable_count,
            "text_encoder": _count(modules["text_encoder"].parameters()),
            "vae": _count(modules["vae"].parameters()) if "vae" in modules else 0,
            "semantic_encoder": (
                _count(modules["semantic_encoder"].parameters()) if "semantic_encoder" in modules else 0
            ),
            "encoders": _count(encoders),
        },
        per_gpu=per_gpu,
        gpu_memory=int(memory * GIB),
        notes=notes,
        precomputed=bool(precomputed),
        frozen_encoders_bytes=int(_bytes(encoders)),
    )
