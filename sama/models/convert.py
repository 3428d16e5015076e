"""``sama convert``: the authors' SAMA checkpoint, or an original-format Wan2.1, as a SAMA export.

The authors released SAMA-14B as a DiT state dict in the original Wan / DiffSynth key layout
(``blocks.N.self_attn.q``, ``norm3``, ``modulation``, ``head.head``, ...) plus the SAMA modules
(``segment_embedding``, ``siglip_feat_mlp``, ``semantic_head``), loaded over Wan2.1-T2V-14B with
``strict=False`` (SAMA.md, last section). This module owns every key mapping between those layouts
and this project's (diffusers names, :class:`SamaTransformer3DModel`), and :func:`convert` writes
the directory :meth:`sama.pipeline_edit.SamaEditPipeline.from_pretrained` loads and training takes
as ``model.init_from``.

The transformer (``--checkpoint``, safetensors only, never unpickled) may be:

* ``sama-official``: original Wan key names plus all SAMA modules, keys optionally prefixed
  ``pipe.dit.`` or ``dit.``; the export gets ``parity = "authors"``.
* ``wan-original``: an original-format Wan2.1 DiT without SAMA modules; the SAMA parameters are
  initialised exactly as :meth:`SamaTransformer3DModel.from_wan` does (zero type embedding,
  default-initialised projector and head), so stage 0 can start from it.
* ``diffusers``: a diffusers-layout (``WanTransformer3DModel`` / SAMA) state dict, same rules.

The mapping is a pure rename (shapes are identical, e.g. ``modulation`` (1, 6, dim) is
``scale_shift_table``), checked completely before anything is written: every checkpoint key must
map to a model parameter of the same shape and every model parameter must be provided (SAMA
parameters all or none). Shapes come from the safetensors headers, so a bad checkpoint fails before
a byte of tensor data is read. The model is built on the meta device and receives the tensors one
by one (``assign=True``), so a 14B checkpoint needs its own size in RAM, not twice that.

The base (``--base``) gives the architecture, the VAE and the text encoder:

* a Wan diffusers directory or hub id (``transformer/config.json``): the VAE and text encoder are
  *referenced* (``pretrained`` in the manifest, as ``save_pretrained(copy_frozen=False)`` does), so
  an export does not carry another copy of umT5-XXL; ``copy_frozen=True`` copies their directories
  into the export instead (a self-contained export, e.g. to upload);
* an original-format Wan2.1 directory (``config.json`` with ``dim``/``num_heads``/...,
  ``Wan2.1_VAE.pth``, ``models_t5_umt5-xxl-enc-bf16.pth``, ``google/umt5-xxl/``): the VAE and umT5
  weights are read with ``torch.load(weights_only=True, mmap=True)`` (no code execution), renamed to
  diffusers ``AutoencoderKLWan`` / transformers ``UMT5EncoderModel`` keys, loaded strictly and
  always written into the export (there is no diffusers-format copy to reference);
* a SAMA export (``sama_pipeline.json``): its model configuration is reused and its VAE and text
  encoder are copied (directories) or kept as the references it records.

The scheduler is always a fresh ``FlowMatchEulerDiscreteScheduler`` with :class:`PipelineConfig`'s
shift (5) and the inference defaults are ``PipelineConfig()`` (50 steps, CFG 5), the authors'
sampler, whatever a base export recorded. The export's ``torch_dtype`` is the conversion dtype.
Output is written into a temporary sibling directory and renamed into place at the end.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import re
import shutil
import uuid
from collections.abc import Callable, Iterator, Mapping
from contextlib import ExitStack
from dataclasses import dataclass, field
from typing import Any, Literal

import torch

from sama.models.config import ModelConfig
from sama.models.parity import resolve as resolve_parity

__all__ = [
    "BASE_ORIGINAL_T5",
    "BASE_ORIGINAL_VAE",
    "DIT_PREFIXES",
    "CheckpointPlan",
    "ConversionError",
    "ConversionReport",
    "build_converted_transformer",
    "convert",
    "diffusers_key_for_dit",
    "diffusers_key_for_umt5",
    "diffusers_key_for_vae",
    "infer_preset",
    "plan_checkpoint",
]

log = logging.getLogger(__name__)

Layout = Literal["sama-official", "wan-original", "diffusers"]
DTYPES: dict[str, torch.dtype] = {
    "bfloat16": torch.bfloat16,
    "float32": torch.float32,
    "float16": torch.float16,
}

# Prefixes the released checkpoints carry (DiffSynth's pipeline module names); stripped.
DIT_PREFIXES = ("pipe.dit.", "dit.")
BASE_ORIGINAL_VAE = "Wan2.1_VAE.pth"
BASE_ORIGINAL_T5 = "models_t5_umt5-xxl-enc-bf16.pth"
BASE_ORIGINAL_TOKENIZER = os.path.join("google", "umt5-xxl")

# Checkpoint shapes of the known backbones: (width, layers) -> preset.
_PRESET_BY_SHAPE = {(5120, 40): "wan2.1-14b", (1536, 30): "wan2.1-1.3b"}


class ConversionError(ValueError):
    """A conversion input is missing, unreadable or does not fit; the message names it and why."""


# ------------------------------------------------------------------------------------------------
# Key mappings (the only place they are stated)

# Inside ``blocks.N.``: original Wan / DiffSynth name prefix -> diffusers name prefix.
_DIT_BLOCK_RENAMES: tuple[tuple[str, str], ...] = (
    ("self_attn.q.", "attn1.to_q."),
    ("self_attn.k.", "attn1.to_k."),
    ("self_attn.v.", "attn1.to_v."),
    ("self_attn.o.", "attn1.to_out.0."),
    ("self_attn.norm_q.", "attn1.norm_q."),
    ("self_attn.norm_k.", "attn1.norm_k."),
    ("cross_attn.q.", "attn2.to_q."),
    ("cross_attn.k.", "attn2.to_k."),
    ("cross_attn.v.", "attn2.to_v."),
    ("cross_attn.o.", "attn2.to_out.0."),
    ("cross_attn.norm_q.", "attn2.norm_q."),
    ("cross_attn.norm_k.", "attn2.norm_k."),
    # The affine LayerNorm before cross-attention is norm3 in Wan and norm2 in diffusers (Wan's
    # norm1/norm2 and diffusers' norm1/norm3 have no parameters).
    ("norm3.", "norm2."),
    ("ffn.0.", "ffn.net.0.proj."),
    ("ffn.2.", "ffn.net.2."),
)
_DIT_BLOCK_EXACT = {"modulation": "scale_shift_table"}
# Outside the blocks: original prefix -> diffusers prefix.
_DIT_TOP_RENAMES: tuple[tuple[str, str], ...] = (
    ("patch_embedding.", "patch_embedding."),
    ("text_embedding.0.", "condition_embedder.text_embedder.linear_1."),
    ("text_embedding.2.", "condition_embedder.text_embedder.linear_2."),
    ("time_embedding.0.", "condition_embedder.time_embedder.linear_1."),
    ("time_embedding.2.", "condition_embedder.time_embedder.linear_2."),
    ("time_projection.1.", "condition_embedder.time_proj."),
    ("head.head.", "proj_out."),
)
_DIT_TOP_EXACT = {"head.modulation": "scale_shift_table"}
# The SAMA modules of the release -> this project's.
_SAMA_RENAMES: tuple[tuple[str, str], ...] = (
    ("segment_embedding.", "type_embedding."),
    ("siglip_feat_mlp.norm.", "semantic_projector.norm."),
    ("siglip_feat_mlp.fc1.", "semantic_projector.fc1."),
    ("siglip_feat_mlp.fc2.", "semantic_projector.fc2."),
    ("semantic_head.norm.", "semantic_head.norm."),
    ("semantic_head.proj.", "semantic_head.proj."),
)
_BLOCK_KEY = re.compile(r"^blocks\.(\d+)\.(.+)$")


def _rename(key: str, renames: tuple[tuple[str, str], ...]) -> str | None:
    for old, new in renames:
        if key.startswith(old):
            return new + key[len(old) :]
    return None


def diffusers_key_for_dit(key: str) -> str | None:
    """The diffusers / SAMA parameter name of an original-layout DiT key (prefix already stripped),
    or None when the key has no counterpart."""
    match = _BLOCK_KEY.match(key)
    if match:
        index, rest = match.groups()
        if rest in _DIT_BLOCK_EXACT:
            return f"blocks.{index}.{_DIT_BLOCK_EXACT[rest]}"
        renamed = _rename(rest, _DIT_BLOCK_RENAMES)
        return f"blocks.{index}.{renamed}" if renamed is not None else None
    if key in _DIT_TOP_EXACT:
        return _DIT_TOP_EXACT[key]
    return _rename(key, _DIT_TOP_RENAMES) or _rename(key, _SAMA_RENAMES)


# Wan VAE residual block: nn.Sequential(RMS_norm, SiLU, CausalConv3d, RMS_norm, SiLU, Dropout,
# CausalConv3d) and a ``shortcut`` conv -> diffusers WanResidualBlock.
_VAE_RESIDUAL: tuple[tuple[str, str], ...] = (
    ("residual.0.", "norm1."),
    ("residual.2.", "conv1."),
    ("residual.3.", "norm2."),
    ("residual.6.", "conv2."),
    ("shortcut.", "conv_shortcut."),
)
_VAE_TOP: tuple[tuple[str, str], ...] = (
    ("conv1.", "quant_conv."),
    ("conv2.", "post_quant_conv."),
    ("encoder.conv1.", "encoder.conv_in."),
    ("decoder.conv1.", "decoder.conv_in."),
    ("encoder.head.0.", "encoder.norm_out."),
    ("encoder.head.2.", "encoder.conv_out."),
    ("decoder.head.0.", "decoder.norm_out."),
    ("decoder.head.2.", "decoder.conv_out."),
)
_VAE_SAMPLE = re.compile(r"^(encoder|decoder)\.(downsamples|upsamples|middle)\.(\d+)\.(.+)$")


def diffusers_key_for_vae(key: str, num_res_blocks: int = 2) -> str | None:
    """The ``AutoencoderKLWan`` name of an original Wan2.1 VAE key, or None.

    Facts from diffusers' ``convert_wan_vae_to_diffusers``: the encoder's flat ``downsamples``
    list keeps its indices as ``down_blocks``; the decoder's flat ``upsamples`` list holds, per
    up block, ``num_res_blocks + 1`` residual blocks then one resample (none after the last), which
    diffusers groups as ``up_blocks.B.resnets.R`` / ``up_blocks.B.upsamplers.0``; ``middle`` is
    residual, attention, residual (``mid_block.resnets.0``, ``attentions.0``, ``resnets.1``).
    """
    top = _rename(key, _VAE_TOP)
    if top is not None:
        return top
    match = _VAE_SAMPLE.match(key)
    if not match:
        return None
    part, kind, index_text, rest = match.groups()
    index = int(index_text)
    if kind == "middle":
        if index == 1:
            return (
                f"{part}.mid_block.attentions.0.{rest}"
                if rest.startswith(("norm.", "to_qkv.", "proj."))
                else None
            )
        if index not in (0, 2):
            return None
        residual = _rename(rest, _VAE_RESIDUAL)
        return f"{part}.mid_block.resnets.{index // 2}.{residual}" if residual is not None else None
    is_resample = rest.startswith(("resample.", "time_conv."))
    if kind == "downsamples" and part == "encoder":
        renamed = rest if is_resample else _rename(rest, _VAE_RESIDUAL)
        return f"encoder.down_blocks.{index}.{renamed}" if renamed is not None else None
    if kind == "upsamples" and part == "decoder":
        per_block = num_res_blocks + 2
        block, position = divmod(index, per_block)
        if position == num_res_blocks + 1:
            return f"decoder.up_blocks.{block}.upsamplers.0.{rest}" if is_resample else None
        residual = _rename(rest, _VAE_RESIDUAL)
        return f"decoder.up_blocks.{block}.resnets.{position}.{residual}" if residual is not None else None
    return None


# Wan's T5Encoder block (T5SelfAttention) -> transformers UMT5Block.
_T5_BLOCK: tuple[tuple[str, str], ...] = (
    ("norm1.", "layer.0.layer_norm."),
    ("attn.q.", "layer.0.SelfAttention.q."),
    ("attn.k.", "layer.0.SelfAttention.k."),
    ("attn.v.", "layer.0.SelfAttention.v."),
    ("attn.o.", "layer.0.SelfAttention.o."),
    ("pos_embedding.embedding.", "layer.0.SelfAttention.relative_attention_bias."),
    ("norm2.", "layer.1.layer_norm."),
    # Wan: fc2(fc1(x) * gelu(gate(x))); UMT5: wo(gelu(wi_0(x)) * wi_1(x)).
    ("ffn.gate.0.", "layer.1.DenseReluDense.wi_0."),
    ("ffn.fc1.", "layer.1.DenseReluDense.wi_1."),
    ("ffn.fc2.", "layer.1.DenseReluDense.wo."),
)


def diffusers_key_for_umt5(key: str) -> tuple[str, ...]:
    """The ``UMT5EncoderModel`` names of a key of Wan's umT5 encoder (``T5Encoder``), or ``()``.

    The token embedding is two names in transformers (``shared`` and the tied
    ``encoder.embed_tokens``); every other key has one.
    """
    if key == "token_embedding.weight":
        return ("shared.weight", "encoder.embed_tokens.weight")
    if key == "norm.weight":
        return ("encoder.final_layer_norm.weight",)
    match = _BLOCK_KEY.match(key)
    if match:
        index, rest = match.groups()
        renamed = _rename(rest, _T5_BLOCK)
        if renamed is not None:
            return (f"encoder.block.{index}.{renamed}",)
    return ()


# ------------------------------------------------------------------------------------------------
# Reading the checkpoint


@dataclass
class CheckpointPlan:
    """What a DiT checkpoint holds and where each model parameter comes from.

    Attributes:
        path: the checkpoint as given.
        files: the safetensors files read.
        layout: ``sama-official``, ``wan-original`` or ``diffusers``.
        prefix: the key prefix stripped (``""`` when none).
        sources: model parameter name -> (file, checkpoint key).
        shapes: model parameter name -> checkpoint shape.
        has_sama: whether the checkpoint provides the SAMA parameters.
        width / num_layers: the DiT's width and depth, read from the shapes.
    """

    path: str
    files: list[str]
    layout: Layout
    prefix: str
    sources: dict[str, tuple[str, str]]
    shapes: dict[str, tuple[int, ...]]
    has_sama: bool
    width: int | None
    num_layers: int
    unmapped: list[str] = field(default_factory=list)


def _checkpoint_files(path: str) -> list[str]:
    if os.path.isfile(path):
        if not path.endswith(".safetensors"):
            raise ConversionError(
                f"--checkpoint {path}: not a .safetensors file (only safetensors are read: a pickled "
                ".pt/.bin/.pth checkpoint could run code when loaded)"
            )
        return [path]
    if not os.path.isdir(path):
        raise ConversionError(f"--checkpoint {path}: does not exist")
    indexes = sorted(n for n in os.listdir(path) if n.endswith(".safetensors.index.json"))
    if len(indexes) > 1:
        raise ConversionError(f"--checkpoint {path}: several safetensors indexes ({', '.join(indexes)})")
    if indexes:
        index_path = os.path.join(path, indexes[0])
        try:
            with open(index_path) as handle:
                weight_map = json.load(handle)["weight_map"]
        except (OSError, ValueError, KeyError, TypeError) as exc:
            raise ConversionError(f"--checkpoint {index_path}: unreadable index: {exc}") from None
        names = sorted(set(weight_map.values()))
        missing = [n for n in names if not os.path.isfile(os.path.join(path, n))]
        if missing:
            raise ConversionError(f"--checkpoint {path}: shards named by {indexes[0]} are missing: {missing}")
        return [os.path.join(path, n) for n in names]
    files = sorted(os.path.join(path, n) for n in os.listdir(path) if n.endswith(".safetensors"))
    if not files:
        raise ConversionError(f"--checkpoint {path}: no .safetensors files in this directory")
    return files


def _read_headers(files: list[str]) -> dict[str, tuple[str, tuple[int, ...]]]:
    """checkpoint key -> (file, shape), from the safetensors headers only."""
    from safetensors import safe_open

    found: dict[str, tuple[str, tuple[int, ...]]] = {}
    for path in files:
        try:
            with safe_open(path, framework="pt") as handle:
                for key in handle.keys():  # noqa: SIM118 - safe_open is not a mapping
                    if key in found:
                        raise ConversionError(
                            f"--checkpoint: key {key!r} is in both {found[key][0]} and {path}"
                        )
                    found[key] = (path, tuple(handle.get_slice(key).get_shape()))
        except ConversionError:
            raise
        except Exception as exc:  # safetensors raises its own error types for damaged files
            raise ConversionError(f"--checkpoint {path}: not a readable safetensors file: {exc}") from None
    return found


def _strip_prefix(keys: list[str]) -> str:
    for prefix in DIT_PREFIXES:
        if any(k.startswith(prefix) for k in keys):
            return prefix
    return ""


def _detect_layout(keys: list[str]) -> Literal["original", "diffusers"]:
    original = any(".self_attn." in k or k.startswith(("head.head.", "time_embedding.")) for k in keys)
    diffusers = any(".attn1." in k or k.startswith("condition_embedder.") for k in keys)
    if original == diffusers:
        what = "both" if original else "neither"
        raise ConversionError(
            f"--checkpoint: the keys look like {what} the original Wan layout (blocks.N.self_attn.*) "
            "and the diffusers layout (blocks.N.attn1.*); not a Wan DiT checkpoint"
        )
    return "original" if original else "diffusers"


def plan_checkpoint(path: str) -> CheckpointPlan:
    """Read a DiT checkpoint's headers and map its keys to SAMA model parameter names.

    Raises:
        ConversionError: the checkpoint is missing, not safetensors, or not a Wan DiT.
    """
    files = _checkpoint_files(path)
    headers = _read_headers(files)
    if not headers:
        raise ConversionError(f"--checkpoint {path}: holds no tensors")
    prefix = _strip_prefix(list(headers))
    stripped = {k[len(prefix) :]: k for k in headers if k.startswith(prefix)}
    unmapped = [k for k in headers if not k.startswith(prefix)]
    kind = _detect_layout(list(stripped))
    sources: dict[str, tuple[str, str]] = {}
    shapes: dict[str, tuple[int, ...]] = {}
    for key, original in sorted(stripped.items()):
        target = diffusers_key_for_dit(key) if kind == "original" else key
        if target is None:
            unmapped.append(original)
            continue
        if target in sources:
            unmapped.append(f"{original} (maps to {target}, already given by {sources[target][1]})")
            continue
        sources[target] = (headers[original][0], original)
        shapes[target] = headers[original][1]
    from sama.models.transformer_sama import _NEW_PARAMETER_PREFIXES

    has_sama = any(k.startswith(_NEW_PARAMETER_PREFIXES) for k in sources)
    layout: Layout = "diffusers" if kind == "diffusers" else ("sama-official" if has_sama else "wan-original")
    width_shape = shapes.get("patch_embedding.weight")
    layers = {int(m.group(1)) for k in sources if (m := _BLOCK_KEY.match(k))}
    return CheckpointPlan(
        path=path,
        files=files,
        layout=layout,
        prefix=prefix,
        sources=sources,
        shapes=shapes,
        has_sama=has_sama,
        width=int(width_shape[0]) if width_shape else None,
        num_layers=max(layers) + 1 if layers else 0,
        unmapped=sorted(unmapped),
    )


def infer_preset(plan: CheckpointPlan) -> str | None:
    """The preset a checkpoint's width and depth name (Wan2.1-14B or 1.3B), or None."""
    if plan.width is None:
        return None
    return _PRESET_BY_SHAPE.get((plan.width, plan.num_layers))


# ------------------------------------------------------------------------------------------------
# The base


@dataclass
class _Base:
    """A resolved ``--base``: its kind, the local directory and what it gives."""

    given: str
    kind: Literal["diffusers", "wan-original", "sama-export"]
    local: str
    hub_id: str | None = None
    architecture: dict[str, Any] | None = None  # diffusers transformer config keys
    export_manifest: dict[str, Any] | None = None
    export_config: ModelConfig | None = None


def _looks_like_hub_id(text: str) -> bool:
    return bool(re.fullmatch(r"[A-Za-z0-9][\w.-]*/[\w.-]+", text)) and not text.startswith((".", "/"))


def _read_json(path: str, what: str) -> dict[str, Any]:
    try:
        with open(path) as handle:
            data = json.load(handle)
    except (OSError, ValueError) as exc:
        raise ConversionError(f"{what} {path}: unreadable: {exc}") from None
    if not isinstance(data, dict):
        raise ConversionError(f"{what} {path}: not a JSON object")
    return data


def _original_architecture(config: Mapping[str, Any], where: str) -> dict[str, Any]:
    """An original Wan ``config.json`` as diffusers ``WanTransformer3DModel`` config keys."""
    required = ("dim", "ffn_dim", "freq_dim", "in_dim", "out_dim", "num_heads", "num_layers", "eps")
    missing = [k for k in required if k not in config]
    if missing:
        raise ConversionError(f"--base {where}: config.json lacks {missing}")
    if config.get("model_type", "t2v") != "t2v":
        raise ConversionError(
            f"--base {where}: model_type {config.get('model_type')!r}; SAMA builds on text-to-video Wan (t2v)"
        )
    heads = int(config["num_heads"])
    if int(config["dim"]) % heads:
        raise ConversionError(f"--base {where}: dim {config['dim']} is not a multiple of num_heads {heads}")
    return {
        "patch_size": list(config.get("patch_size", (1, 2, 2))),
        "num_attention_heads": heads,
        "attention_head_dim": int(config["dim"]) // heads,
        "in_channels": int(config["in_dim"]),
        "out_channels": int(config["out_dim"]),
        "text_dim": int(config.get("text_dim", 4096)),
        "freq_dim": int(config["freq_dim"]),
        "ffn_dim": int(config["ffn_dim"]),
        "num_layers": int(config["num_layers"]),
        "cross_attn_norm": bool(config.get("cross_attn_norm", True)),
        "qk_norm": "rms_norm_across_heads" if config.get("qk_norm", True) else None,
        "eps": float(config["eps"]),
    }


def _identify_base(local: str, given: str) -> _Base:
    from sama.pipeline_edit import PIPELINE_FILE, parse_manifest

    if os.path.isfile(os.path.join(local, PIPELINE_FILE)):
        with open(os.path.join(local, PIPELINE_FILE)) as handle:
            manifest, model_config, _ = parse_manifest(handle.read(), given)
        if model_config is None:
            raise ConversionError(f"--base {given}: the SAMA export records no model configuration")
        return _Base(given, "sama-export", local, export_manifest=manifest, export_config=model_config)
    transformer_config = os.path.join(local, "transformer", "config.json")
    if os.path.isfile(transformer_config):
        return _Base(given, "diffusers", local, architecture=_read_json(transformer_config, "--base"))
    original_config = os.path.join(local, "config.json")
    if os.path.isfile(original_config):
        config = _read_json(original_config, "--base")
        if "dim" in config and "num_heads" in config:
            return _Base(given, "wan-original", local, architecture=_original_architecture(config, given))
    raise ConversionError(
        f"--base {given}: not a Wan2.1 diffusers directory (transformer/config.json), an original-format "
        "Wan2.1 directory (config.json with dim/num_heads, Wan2.1_VAE.pth, "
        f"{BASE_ORIGINAL_T5}) or a SAMA export (sama_pipeline.json)"
    )


def _resolve_base(base: str, downloads: str, copy_frozen: bool) -> _Base:
    """Find the base locally, on S3 (downloaded) or on the hub (downloaded, only when named)."""
    from sama import storage

    if "://" in base and storage.local_path(base) is None:
        target = os.path.join(downloads, "base")
        try:
            storage.download_dir(base, target)
        except OSError as exc:
            raise ConversionError(f"--base {storage.redact(base)}: cannot download: {exc}") from None
        if not os.path.isdir(target):
            raise ConversionError(f"--base {storage.redact(base)}: nothing there")
        return _identify_base(target, storage.redact(base))
    local = storage.local_path(base) or base
    if os.path.isdir(local):
        return _identify_base(os.path.abspath(local), base)
    if os.path.exists(local):
        raise ConversionError(f"--base {base}: is a file; give the base model's directory")
    if not _looks_like_hub_id(base):
        raise ConversionError(
            f"--base {base}: does not exist (and is not a hub id such as Wan-AI/Wan2.1-T2V-14B)"
        )
    return _download_hub_base(base, downloads, copy_frozen)


def _download_hub_base(repo_id: str, downloads: str, copy_frozen: bool) -> _Base:
    """Fetch what the conversion needs of a hub base: configs first, then only the needed files."""
    from huggingface_hub import snapshot_download

    target = os.path.join(downloads, "hub")
    configs = ["config.json", "model_index.json", "transformer/config.json", "sama_pipeline.json"]
    try:
        snapshot_download(repo_id, local_dir=target, allow_patterns=configs)
        base = _identify_base(target, repo_id)
        needed: list[str] = []
        if base.kind == "wan-original":
            needed = [BASE_ORIGINAL_VAE, BASE_ORIGINAL_T5, "google/umt5-xxl/*"]
        elif base.kind == "diffusers" and copy_frozen:
            needed = ["vae/*", "text_encoder/*", "tokenizer/*"]
        elif base.kind == "sama-export":
            needed = ["vae/*", "text_encoder/*", "tokenizer/*", "scheduler/*"]
        if needed:
            snapshot_download(repo_id, local_dir=target, allow_patterns=needed)
    except ConversionError:
        raise
    except Exception as exc:  # hub errors come in many types (network, auth, not found)
        raise ConversionError(f"--base {repo_id}: cannot download from the hub: {exc}") from None
    base.hub_id = repo_id
    return base


# ------------------------------------------------------------------------------------------------
# The model configuration


def _model_config(
    plan: CheckpointPlan, base: _Base, preset: str | None, model_config: ModelConfig | None
) -> ModelConfig:
    """The export's configuration: explicit config > --preset > the base export's > inferred."""
    from sama.models.presets import get_preset, transformer_mismatch

    if model_config is not None:
        config = dataclasses.replace(model_config)
    elif preset is not None:
        config = get_preset(preset)
    elif base.export_config is not None:
        config = base.export_config
    else:
        inferred = infer_preset(plan) or _preset_matching(base.architecture)
        if inferred is None:
            raise ConversionError(
                f"--checkpoint {plan.path}: width {plan.width} x {plan.num_layers} layers is not a known "
                "backbone (Wan2.1-14B 5120 x 40, 1.3B 1536 x 30); name it with --preset"
            )
        config = get_preset(inferred)
    if base.export_config is not None and config is not base.export_config:
        mismatch = transformer_mismatch(config, base.export_config.transformer.wan_kwargs())
        if mismatch:
            raise ConversionError(f"--base {base.given} (SAMA export): {mismatch}")
    if base.architecture is not None:
        mismatch = transformer_mismatch(config, base.architecture)
        if mismatch:
            raise ConversionError(f"--base {base.given}: {mismatch}")
    return config


def _preset_matching(architecture: Mapping[str, Any] | None) -> str | None:
    from sama.models.presets import PRESETS, get_preset, transformer_mismatch

    if architecture is None:
        return None
    for name in PRESETS:
        if transformer_mismatch(get_preset(name), architecture) is None:
            return name
    return None


# ------------------------------------------------------------------------------------------------
# Building the transformer


def _check_plan(plan: CheckpointPlan, expected: Mapping[str, torch.Size]) -> None:
    """Every key maps to a parameter of the right shape; every parameter is provided."""
    from sama.models.transformer_sama import _NEW_PARAMETER_PREFIXES

    unmapped = list(plan.unmapped)
    unmapped += [f"{plan.sources[k][1]} (-> {k})" for k in plan.sources if k not in expected]
    mismatched = [
        f"{plan.sources[k][1]}: checkpoint {list(plan.shapes[k])} vs model {list(expected[k])}"
        for k in plan.sources
        if k in expected and tuple(expected[k]) != plan.shapes[k]
    ]
    missing = [
        k
        for k in expected
        if k not in plan.sources and (plan.has_sama or not k.startswith(_NEW_PARAMETER_PREFIXES))
    ]
    if not (unmapped or mismatched or missing):
        return
    parts = []
    if unmapped:
        parts.append(f"{len(unmapped)} unmapped key(s): {', '.join(sorted(unmapped))}")
    if missing:
        parts.append(f"{len(missing)} missing parameter(s): {', '.join(sorted(missing))}")
    if mismatched:
        parts.append(f"{len(mismatched)} shape mismatch(es): {'; '.join(sorted(mismatched))}")
    raise ConversionError(
        f"--checkpoint {plan.path} ({plan.layout} layout) does not fit the model: " + "; ".join(parts)
    )


def _stream_tensors(plan: CheckpointPlan, dtype: torch.dtype) -> Iterator[tuple[str, torch.Tensor]]:
    """(model parameter name, tensor in ``dtype``), one tensor read at a time."""
    from safetensors import safe_open

    by_file: dict[str, list[tuple[str, str]]] = {}
    for target, (path, key) in plan.sources.items():
        by_file.setdefault(path, []).append((target, key))
    for path, entries in by_file.items():
        with safe_open(path, framework="pt") as handle:
            for target, key in entries:
                tensor = handle.get_tensor(key)
                yield target, tensor.to(dtype) if tensor.is_floating_point() else tensor


def build_converted_transformer(plan: CheckpointPlan, config: ModelConfig, dtype: torch.dtype):
    """The :class:`SamaTransformer3DModel` the checkpoint describes, built on the meta device and
    filled tensor by tensor; a checkpoint without SAMA parameters goes through ``from_wan``.

    Raises:
        ConversionError: listing unmapped keys, missing parameters and shape mismatches.
    """
    from accelerate import init_empty_weights
    from diffusers import WanTransformer3DModel

    from sama.models.presets import _sama_kwargs
    from sama.models.transformer_sama import SamaTransformer3DModel

    sama_kwargs = _sama_kwargs(config)
    with init_empty_weights():
        model = SamaTransformer3DModel(**config.transformer.wan_kwargs(), **sama_kwargs)
    _check_plan(plan, {k: v.shape for k, v in model.state_dict().items()})
    if plan.has_sama:
        state = dict(_stream_tensors(plan, dtype))
        model.load_state_dict(state, strict=True, assign=True)
        return model
    del model
    with init_empty_weights():
        base = WanTransformer3DModel(**config.transformer.wan_kwargs())
    base.load_state_dict(dict(_stream_tensors(plan, dtype)), strict=True, assign=True)
    return SamaTransformer3DModel.from_wan(base, **sama_kwargs)


# ------------------------------------------------------------------------------------------------
# Frozen components of an original-format base


def _load_pth(path: str) -> dict[str, torch.Tensor]:
    if not os.path.isfile(path):
        raise ConversionError(f"--base: {path} is missing")
    try:
        # weights_only: tensors and containers only, no code runs; mmap: read lazily.
        state = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except Exception as exc:  # torch raises UnpicklingError, RuntimeError, ... for bad files
        raise ConversionError(f"--base: {path} is not a readable weights-only checkpoint: {exc}") from None
    if isinstance(state, dict) and "state_dict" in state and isinstance(state["state_dict"], dict):
        state = state["state_dict"]
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise ConversionError(f"--base: {path} is not a state dict of tensors")
    return state


def _load_renamed(
    module: torch.nn.Module,
    state: Mapping[str, torch.Tensor],
    rename: Callable[[str], tuple[str, ...]],
    path: str,
) -> None:
    """Rename ``state`` into ``module``'s (meta) parameters, strictly, reporting every problem."""
    expected = module.state_dict()
    mapped: dict[str, torch.Tensor] = {}
    unmapped: list[str] = []
    mismatched: list[str] = []
    for key, tensor in state.items():
        targets = rename(key)
        if not targets or any(t not in expected for t in targets):
            unmapped.append(key)
            continue
        for target in targets:
            if tuple(expected[target].shape) != tuple(tensor.shape):
                mismatched.append(f"{key}: {list(tensor.shape)} vs {list(expected[target].shape)}")
            mapped[target] = tensor
    missing = [k for k in expected if k not in mapped]
    if unmapped or missing or mismatched:
        raise ConversionError(
            f"--base: {path} does not fit the configured model: unmapped {sorted(unmapped)}, "
            f"missing {sorted(missing)}, shape mismatches {sorted(mismatched)}"
        )
    module.load_state_dict(mapped, strict=True, assign=True)


def _convert_original_vae(base: _Base, config: ModelConfig, directory: str) -> None:
    from accelerate import init_empty_weights
    from diffusers import AutoencoderKLWan

    if config.vae.kind != "wan":
        raise ConversionError(
            f"--base {base.given}: an original-format Wan VAE needs a model with vae.kind='wan', "
            f"the '{config.preset}' configuration has {config.vae.kind!r}"
        )
    path = os.path.join(base.local, BASE_ORIGINAL_VAE)
    state = _load_pth(path)
    with init_empty_weights():
        vae = AutoencoderKLWan(**config.vae.wan_kwargs())
    blocks = config.vae.num_res_blocks

    def rename(key: str) -> tuple[str, ...]:
        target = diffusers_key_for_vae(key, blocks)
        return (target,) if target is not None else ()

    _load_renamed(vae, state, rename, path)
    vae.save_pretrained(directory)


def _convert_original_text(base: _Base, config: ModelConfig, directory: str) -> None:
    from accelerate import init_empty_weights
    from transformers import UMT5EncoderModel

    from sama.models.text import TextEncoder, _vocabulary_free_tokenizer, umt5_config

    text = config.text
    path = os.path.join(base.local, BASE_ORIGINAL_T5)
    state = _load_pth(path)
    if text.tokenizer == "auto":
        from transformers import AutoTokenizer

        tokenizer_dir = os.path.join(base.local, BASE_ORIGINAL_TOKENIZER)
        if not os.path.isdir(tokenizer_dir):
            raise ConversionError(
                f"--base {base.given}: the tokenizer directory {BASE_ORIGINAL_TOKENIZER} is missing"
            )
        tokenizer: Any = AutoTokenizer.from_pretrained(tokenizer_dir)
    else:
        tokenizer = _vocabulary_free_tokenizer(text)
    # Wan's umT5 (eps 1e-6, untied output embedding: an encoder has none).
    model_config = umt5_config(text, layer_norm_epsilon=1e-6, tie_word_embeddings=False)
    with init_empty_weights():
        model = UMT5EncoderModel(model_config)
    _load_renamed(model, state, diffusers_key_for_umt5, path)
    # The tied embedding: one tensor under both names, as transformers keeps it.
    model.encoder.embed_tokens = model.shared
    TextEncoder(model, tokenizer, text.max_length).save_pretrained(directory, "text_encoder", "tokenizer")


# ------------------------------------------------------------------------------------------------
# Conversion


@dataclass
class ConversionReport:
    """What :func:`convert` wrote: the export, the layouts and the key counts (the manifest's
    ``converted_from`` entry)."""

    output: str
    preset: str
    parity: str
    converted_from: dict[str, Any]


def _prepare_output(output: str, overwrite: bool) -> None:
    from sama import storage

    if storage.local_path(output) is None:
        raise ConversionError(
            f"--output {storage.redact(output)}: exports are written to a local directory; "
            "upload it afterwards"
        )
    if os.path.isfile(output):
        raise ConversionError(f"--output {output}: is a file")
    if os.path.isdir(output) and os.listdir(output) and not overwrite:
        raise ConversionError(f"--output {output}: exists and is not empty (pass --overwrite to replace it)")


def _publish(staged: str, output: str) -> None:
    """Move the finished export into place (a rename on the same filesystem)."""
    if os.path.isdir(output):
        old = f"{output}.old-{uuid.uuid4().hex[:8]}"
        os.rename(output, old)
        os.rename(staged, output)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.rename(staged, output)


def _checkpoint_local(checkpoint: str, downloads: str) -> str:
    from sama import storage

    if storage.local_path(checkpoint) is not None:
        return storage.local_path(checkpoint) or checkpoint
    target = os.path.join(downloads, "checkpoint")
    try:
        if checkpoint.endswith(".safetensors"):
            os.makedirs(target, exist_ok=True)
            local = os.path.join(target, storage.basename(checkpoint))
            with storage.open_read(checkpoint) as src, open(local, "wb") as dst:
                shutil.copyfileobj(src, dst, length=8 * 1024 * 1024)
            return local
        return storage.download_dir(checkpoint, target)
    except OSError as exc:
        raise ConversionError(f"--checkpoint {storage.redact(checkpoint)}: cannot download: {exc}") from None


def _frozen_components(
    base: _Base, config: ModelConfig, staged: str, copy_frozen: bool
) -> tuple[dict[str, Any], ModelConfig]:
    """Write or reference the VAE and text encoder; returns the manifest entries and the config
    (with the references it records)."""
    text_entry = {"path": "text_encoder", "tokenizer": "tokenizer"}
    if base.kind == "wan-original":
        _convert_original_vae(base, config, os.path.join(staged, "vae"))
        _convert_original_text(base, config, staged)
        config = _without_sources(config)
        return {"vae": {"path": "vae"}, "text_encoder": text_entry}, config
    if base.kind == "diffusers":
        source = base.hub_id or base.local
        if copy_frozen:
            for name in (config.vae.subfolder, config.text.subfolder, config.text.tokenizer_subfolder):
                _copy_dir(os.path.join(base.local, name), os.path.join(staged, name), base)
            config = _without_sources(config)
            vae_entry = {"path": config.vae.subfolder}
            text_entry = {"path": config.text.subfolder, "tokenizer": config.text.tokenizer_subfolder}
            return {"vae": vae_entry, "text_encoder": text_entry}, config
        config = dataclasses.replace(
            _without_sources(config),
            vae=dataclasses.replace(config.vae, pretrained=source),
            text=dataclasses.replace(config.text, pretrained=source),
        )
        return {
            "vae": {"pretrained": source, "subfolder": config.vae.subfolder},
            "text_encoder": {"pretrained": source},
        }, config
    # A SAMA export: copy what it holds, keep what it references.
    manifest_components = (base.export_manifest or {}).get("components") or {}
    entries: dict[str, Any] = {}
    for name in ("vae", "text_encoder"):
        entry = dict(manifest_components.get(name) or {})
        if "path" in entry:
            _copy_dir(os.path.join(base.local, entry["path"]), os.path.join(staged, entry["path"]), base)
            if "tokenizer" in entry:
                tokenizer = entry["tokenizer"]
                _copy_dir(os.path.join(base.local, tokenizer), os.path.join(staged, tokenizer), base)
        elif "pretrained" not in entry:
            raise ConversionError(
                f"--base {base.given}: its {name} entry names neither a path nor a checkpoint"
            )
        entries[name] = entry
    return entries, config


def _copy_dir(source: str, target: str, base: _Base) -> None:
    if not os.path.isdir(source):
        raise ConversionError(f"--base {base.given}: {os.path.relpath(source, base.local)}/ is missing")
    if not os.path.isdir(target):
        shutil.copytree(source, target)


def _without_sources(config: ModelConfig) -> ModelConfig:
    return dataclasses.replace(
        config,
        pretrained=None,
        transformer=dataclasses.replace(config.transformer, pretrained=None),
        vae=dataclasses.replace(config.vae, pretrained=None),
        text=dataclasses.replace(config.text, pretrained=None),
    )


def convert(
    checkpoint: str,
    base: str,
    output: str,
    *,
    preset: str | None = None,
    model_config: ModelConfig | None = None,
    dtype: Literal["bfloat16", "float32", "float16"] = "bfloat16",
    parity: Literal["sama", "authors"] | None = None,
    overwrite: bool = False,
    copy_frozen: bool = False,
    max_shard_size: str = "10GB",
) -> ConversionReport:
    """Convert a DiT checkpoint over a base into a SAMA export at ``output`` (see the module docstring).

    Args:
        checkpoint: a ``.safetensors`` file or a directory of shards (local or ``s3://``).
        base: a Wan2.1 diffusers directory or hub id, an original-format Wan2.1 directory, or a
            SAMA export (local, ``s3://``, or a hub id, downloaded only because it is named).
        output: the local export directory to create.
        preset: the model preset (default: the base export's, else inferred from the checkpoint).
        model_config: an explicit configuration instead of a preset (e.g. a custom small model).
        dtype: the dtype the transformer is stored in and the export loads in.
        parity: the export's parity profile (default: ``"authors"`` when the checkpoint holds the
            SAMA modules, else ``"sama"``).
        overwrite: replace a non-empty ``output``.
        copy_frozen: copy a diffusers base's VAE and text encoder into the export instead of
            referencing them.
        max_shard_size: the transformer's safetensors shard size.

    Raises:
        ConversionError: a bad input, named, with what is wrong; nothing is written then.
    """
    from diffusers import FlowMatchEulerDiscreteScheduler

    from sama import storage
    from sama.pipeline_edit import PIPELINE_FILE, PIPELINE_FORMAT, PIPELINE_FORMAT_VERSION, PipelineConfig

    if dtype not in DTYPES:
        raise ConversionError(f"--dtype {dtype!r}: use one of {', '.join(DTYPES)}")
    output = os.path.abspath(output) if storage.local_path(output) is not None else output
    _prepare_output(output, overwrite)
    parent = os.path.dirname(output.rstrip(os.sep)) or "."
    os.makedirs(parent, exist_ok=True)
    work = os.path.join(parent, f".{os.path.basename(output.rstrip(os.sep))}.convert-{uuid.uuid4().hex[:8]}")
    staged = os.path.join(work, "export")
    downloads = os.path.join(work, "downloads")
    os.makedirs(staged)
    with ExitStack() as cleanup:
        cleanup.callback(shutil.rmtree, work, ignore_errors=True)
        plan = plan_checkpoint(_checkpoint_local(checkpoint, downloads))
        resolved_base = _resolve_base(base, downloads, copy_frozen)
        config = _model_config(plan, resolved_base, preset, model_config)
        # The release's modules mean the authors' model: reproduce their inference (SAMA.md).
        chosen_parity = parity or ("authors" if plan.layout == "sama-official" else "sama")
        config = dataclasses.replace(config, torch_dtype=dtype, parity=chosen_parity)
        # The profile's knobs (sama.models.parity) decide the transformer's semantic RoPE and
        # LayerNorm eps, so they are set before it is built (whatever the base's config said).
        config = resolve_parity(config, chosen_parity, "model", overwrite=True)
        transformer = build_converted_transformer(plan, config, DTYPES[dtype])
        config.validate()
        components, config = _frozen_components(resolved_base, config, staged, copy_frozen)
        log.info("writing the transformer (%d tensors)", len(plan.sources))
        transformer.save_pretrained(os.path.join(staged, "transformer"), max_shard_size=max_shard_size)
        del transformer
        pipeline_config = resolve_parity(PipelineConfig(), chosen_parity, "inference")
        FlowMatchEulerDiscreteScheduler(shift=pipeline_config.flow_shift).save_pretrained(
            os.path.join(staged, "scheduler")
        )
        converted_from = {
            "checkpoint": storage.redact(checkpoint),
            "layout": plan.layout,
            "key_prefix": plan.prefix,
            "files": len(plan.files),
            "keys": len(plan.sources),
            "sama_keys": sum(1 for k in plan.sources if _is_sama_key(k)),
            "sama_parameters": "checkpoint" if plan.has_sama else "initialised as from_wan",
            "base": storage.redact(base),
            "base_layout": resolved_base.kind,
            "frozen_components": _frozen_mode(resolved_base, components),
            "dtype": dtype,
        }
        manifest = {
            "format": PIPELINE_FORMAT,
            "format_version": PIPELINE_FORMAT_VERSION,
            "model": config.to_dict(),
            "pipeline": dataclasses.asdict(pipeline_config),
            "text_max_length": config.text.max_length,
            "components": {
                "transformer": {"path": "transformer"},
                "scheduler": {"path": "scheduler"},
                **components,
            },
            "converted_from": converted_from,
        }
        with open(os.path.join(staged, PIPELINE_FILE), "w") as handle:
            json.dump(manifest, handle, indent=2)
        _publish(staged, output)
    log.info("converted %s (%s) -> %s", storage.redact(checkpoint), plan.layout, output)
    return ConversionReport(output, config.preset, chosen_parity, converted_from)


def _frozen_mode(base: _Base, components: Mapping[str, Any]) -> str:
    if base.kind == "wan-original":
        return "converted"
    return "referenced" if any("pretrained" in e for e in components.values()) else "copied"


def _is_sama_key(key: str) -> bool:
    from sama.models.transformer_sama import _NEW_PARAMETER_PREFIXES

    return key.startswith(_NEW_PARAMETER_PREFIXES)
