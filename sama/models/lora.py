"""LoRA adapters on the SAMA transformer, through peft.

:func:`apply_lora` injects peft LoRA layers (``peft.inject_adapter_in_model``) into the DiT's
attention and FFN linears and leaves trainable only the adapters and SAMA's own modules
(``type_embedding``, ``semantic_projector``, ``semantic_head``); every base weight is frozen. It
runs before the model is parallelised (FSDP2 shards adapters and frozen weights alike).

A LoRA model leaves a run in one of two forms (``model.lora_export``):

* ``"merged"``: ``W + (alpha / rank) * B @ A`` folded into every adapted linear
  (:func:`merge_lora_modules`, peft's merge): a full export that loads like any other.
* ``"adapter"``: a directory (:func:`save_adapter`) with the adapters in peft's format
  (``adapter_config.json`` + ``adapter_model.safetensors``, keys as
  ``peft.get_peft_model_state_dict`` writes them), the SAMA modules
  (``sama_modules.safetensors``) and a manifest (``sama_lora.json``) naming the base export it
  applies to. :func:`load_adapter` applies it to a transformer (merged by default), which is what
  ``SamaEditPipeline.load_lora`` and ``sama edit --lora`` do.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from typing import Any

# The Wan DiT's attention (self: attn1, cross: attn2) and FFN linears; peft matches a name when a
# module's dotted name equals it or ends with "." + it.
DEFAULT_TARGET_MODULES = (
    "attn1.to_q",
    "attn1.to_k",
    "attn1.to_v",
    "attn1.to_out.0",
    "attn2.to_q",
    "attn2.to_k",
    "attn2.to_v",
    "attn2.to_out.0",
    "ffn.net.0.proj",
    "ffn.net.2",
)
# SAMA's own modules (not in a Wan checkpoint): they train with the adapters.
SAMA_MODULE_PREFIXES = ("type_embedding.", "semantic_projector.", "semantic_head.")
ADAPTER_NAME = "default"
MANIFEST_FILE = "sama_lora.json"
ADAPTER_WEIGHTS_FILE = "adapter_model.safetensors"
ADAPTER_CONFIG_FILE = "adapter_config.json"
SAMA_MODULES_FILE = "sama_modules.safetensors"
FORMAT = "sama-lora"


@dataclass
class LoraSection:
    """``model.lora``: low-rank adapters on the transformer (rank 0 = full fine-tuning)."""

    rank: int = 0
    # The update is scaled by alpha / rank (peft's ``lora_alpha``).
    alpha: float = 16.0
    target_modules: list[str] = field(default_factory=lambda: list(DEFAULT_TARGET_MODULES))
    dropout: float = 0.0

    @property
    def enabled(self) -> bool:
        return self.rank > 0

    @property
    def scaling(self) -> float:
        return self.alpha / self.rank

    def validate(self) -> None:
        if self.rank < 0:
            raise ValueError(f"model.lora.rank must be >= 0 (0 = off), got {self.rank}")
        if self.rank and self.alpha <= 0:
            raise ValueError(f"model.lora.alpha must be positive, got {self.alpha}")
        if self.rank and not self.target_modules:
            raise ValueError("model.lora.target_modules must name at least one module")
        if not 0 <= self.dropout < 1:
            raise ValueError(f"model.lora.dropout must be in [0, 1), got {self.dropout}")

    def peft_config(self):
        from peft import LoraConfig

        return LoraConfig(
            r=self.rank,
            lora_alpha=self.alpha,
            lora_dropout=self.dropout,
            target_modules=list(self.target_modules),
            bias="none",
        )


def is_sama_module(name: str) -> bool:
    return name.startswith(SAMA_MODULE_PREFIXES)


def apply_lora(transformer, section: LoraSection):
    """Inject LoRA layers into ``transformer`` (in place) and set what trains: the adapters and
    SAMA's modules; every other parameter is frozen. Returns the transformer."""
    from peft import inject_adapter_in_model

    section.validate()
    if not section.enabled:
        return transformer
    # Adapters of a reduced-precision base are kept in float32 (peft's autocast_adapter_dtype).
    inject_adapter_in_model(section.peft_config(), transformer, adapter_name=ADAPTER_NAME)
    if not any(".lora_A." in name for name, _ in transformer.named_parameters()):
        raise ValueError(f"model.lora.target_modules {section.target_modules} match no linear of the model")
    for name, param in transformer.named_parameters():
        param.requires_grad_(".lora_" in name or is_sama_module(name))
    return transformer


def merge_lora_modules(transformer):
    """Fold every LoRA layer of ``transformer`` into its base linear (``W + alpha / rank * B @ A``,
    peft's merge) and put the base linear back in its place: a plain transformer again, whose state
    dict loads like any other. Returns it."""
    from peft.tuners.lora import LoraLayer

    for name, module in list(transformer.named_modules()):
        if not isinstance(module, LoraLayer):
            continue
        module.merge(safe_merge=False)
        parent_name, _, child = name.rpartition(".")
        parent = transformer.get_submodule(parent_name) if parent_name else transformer
        setattr(parent, child, module.get_base_layer())
    return transformer


def adapter_state(weights: dict[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
    """(adapter weights in peft's saved format, SAMA module weights) out of a trainable state dict
    (e.g. the EMA's) of a peft-injected transformer. peft's saved format drops the adapter name:
    ``x.lora_A.default.weight`` -> ``x.lora_A.weight``."""
    adapters = {k.replace(f".{ADAPTER_NAME}.", "."): v for k, v in weights.items() if ".lora_" in k}
    sama = {k: v for k, v in weights.items() if is_sama_module(k)}
    return adapters, sama


def save_adapter(
    directory: str,
    weights: dict[str, Any],
    section: LoraSection,
    base: str | None,
    *,
    preset: str | None = None,
    extra: dict[str, Any] | None = None,
) -> None:
    """Write an adapter export into ``directory`` (local): peft-format adapters, SAMA modules and
    the manifest naming the ``base`` export they apply to."""
    from safetensors.torch import save_file

    os.makedirs(directory, exist_ok=True)
    adapters, sama = adapter_state(weights)
    contiguous = {k: v.detach().contiguous().cpu() for k, v in adapters.items()}
    save_file(contiguous, os.path.join(directory, ADAPTER_WEIGHTS_FILE), metadata={"format": "pt"})
    save_file(
        {k: v.detach().contiguous().cpu() for k, v in sama.items()},
        os.path.join(directory, SAMA_MODULES_FILE),
        metadata={"format": "pt"},
    )
    section.peft_config().save_pretrained(directory)
    manifest = {
        "format": FORMAT,
        "version": 1,
        "base": base,
        "preset": preset,
        "rank": section.rank,
        "alpha": section.alpha,
        "target_modules": list(section.target_modules),
        "adapter_weights": ADAPTER_WEIGHTS_FILE,
        "sama_modules": SAMA_MODULES_FILE,
        **(extra or {}),
    }
    with open(os.path.join(directory, MANIFEST_FILE), "w") as handle:
        json.dump(manifest, handle, indent=2)


def read_manifest(directory: str) -> dict[str, Any]:
    path = os.path.join(directory, MANIFEST_FILE)
    if not os.path.isfile(path):
        raise ValueError(f"{directory}: not a SAMA LoRA adapter (no {MANIFEST_FILE})")
    with open(path) as handle:
        manifest = json.load(handle)
    if manifest.get("format") != FORMAT:
        raise ValueError(f"{directory}: {MANIFEST_FILE} is not a {FORMAT} manifest")
    return manifest


def load_adapter(transformer, directory: str, *, merge: bool = True) -> dict[str, Any]:
    """Apply the adapter export in ``directory`` to ``transformer`` (in place): its SAMA modules
    replace the transformer's, its adapters are injected and (``merge``) folded into the weights,
    leaving a plain transformer. Returns the adapter's manifest."""
    import torch
    from peft import set_peft_model_state_dict
    from safetensors.torch import load_file

    manifest = read_manifest(directory)
    section = LoraSection(
        rank=int(manifest["rank"]),
        alpha=float(manifest["alpha"]),
        target_modules=list(manifest["target_modules"]),
    )
    parameter = next(transformer.parameters())
    device = parameter.device
    sama = load_file(os.path.join(directory, manifest.get("sama_modules", SAMA_MODULES_FILE)))
    own = transformer.state_dict()
    unknown = [k for k in sama if k not in own]
    if unknown:
        raise ValueError(f"{directory}: SAMA module weights {unknown[:3]} do not fit the model")
    with torch.no_grad():
        for key, value in sama.items():
            own[key].copy_(value.to(own[key].dtype))
    adapters = load_file(os.path.join(directory, manifest.get("adapter_weights", ADAPTER_WEIGHTS_FILE)))
    from peft import inject_adapter_in_model

    inject_adapter_in_model(section.peft_config(), transformer, adapter_name=ADAPTER_NAME)
    result = set_peft_model_state_dict(transformer, adapters, adapter_name=ADAPTER_NAME)
    if getattr(result, "unexpected_keys", None):
        raise ValueError(f"{directory}: adapter weights {result.unexpected_keys[:3]} do not fit the model")
    transformer.to(device)
    if merge:
        merge_lora_modules(transformer)
    return manifest


def lora_parameter_count(transformer, section: LoraSection) -> int:
    """Parameters ``apply_lora`` would add: ``rank * (in + out)`` per adapted linear."""
    from peft.tuners.tuners_utils import check_target_module_exists
    from torch import nn

    config = section.peft_config()
    total = 0
    for name, module in transformer.named_modules():
        if isinstance(module, nn.Linear) and check_target_module_exists(config, name):
            total += section.rank * (module.in_features + module.out_features)
    return total
