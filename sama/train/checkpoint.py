"""Training checkpoints as safetensors + JSON: nothing in a checkpoint is ever unpickled.

A checkpoint directory holds::

    model.safetensors      trainable weights (full, unsharded), by parameter name
    ema.safetensors        EMA weights, same names
    optimizer.safetensors  optimizer tensors, keyed "<param name>/<state name>"
    rng.safetensors        torch (and CUDA) RNG states as uint8 tensors
    state.json             step, optimizer scalars and param groups, scheduler, data position,
                           the run's MLflow run id, config digest

Full (unsharded) state dicts come from ``torch.distributed.checkpoint.state_dict``, which handles
DDP and FSDP2 alike; loading broadcasts from rank 0.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from typing import Any

import torch
from safetensors.torch import load_file, save_file

MODEL_FILE = "model.safetensors"
EMA_FILE = "ema.safetensors"
OPTIMIZER_FILE = "optimizer.safetensors"
RNG_FILE = "rng.safetensors"
STATE_FILE = "state.json"


@dataclass
class TrainState:
    """The scalar side of a checkpoint (state.json)."""

    step: int = 0
    samples_seen: int = 0
    scheduler: dict[str, Any] = field(default_factory=dict)
    optimizer_scalars: dict[str, Any] = field(default_factory=dict)
    param_groups: list[dict[str, Any]] = field(default_factory=list)
    data_position: str = ""
    mlflow_run_id: str | None = None
    extra: dict[str, Any] = field(default_factory=dict)


def _contiguous_cpu(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {k: v.detach().to("cpu").contiguous() for k, v in tensors.items()}


def flatten_optimizer_state(
    state_dict: dict[str, Any],
) -> tuple[dict[str, torch.Tensor], dict[str, Any], list]:
    """An optimizer state dict keyed by parameter name -> (tensors, JSON scalars, param groups)."""
    tensors: dict[str, torch.Tensor] = {}
    scalars: dict[str, Any] = {}
    for name, per_param in state_dict.get("state", {}).items():
        for key, value in per_param.items():
            if isinstance(value, torch.Tensor):
                tensors[f"{name}/{key}"] = value
            else:
                scalars[f"{name}/{key}"] = value
    return tensors, scalars, state_dict.get("param_groups", [])


def unflatten_optimizer_state(
    tensors: dict[str, torch.Tensor], scalars: dict[str, Any], param_groups: list
) -> dict[str, Any]:
    state: dict[str, dict[str, Any]] = {}
    for flat, value in [*tensors.items(), *scalars.items()]:
        name, key = flat.rsplit("/", 1)
        state.setdefault(name, {})[key] = value
    return {"state": state, "param_groups": param_groups}


def rng_state() -> dict[str, torch.Tensor]:
    states = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        states["cuda"] = torch.cuda.get_rng_state()
    return states


def set_rng_state(states: dict[str, torch.Tensor]) -> None:
    if "torch" in states:
        torch.set_rng_state(states["torch"])
    if "cuda" in states and torch.cuda.is_available():
        torch.cuda.set_rng_state(states["cuda"])


def save(
    directory: str,
    model: dict[str, torch.Tensor],
    ema: dict[str, torch.Tensor],
    optimizer: dict[str, Any],
    state: TrainState,
) -> None:
    """Write a checkpoint into a local ``directory`` (Ray Train uploads it to the run's storage)."""
    os.makedirs(directory, exist_ok=True)
    save_file(_contiguous_cpu(model), os.path.join(directory, MODEL_FILE))
    save_file(_contiguous_cpu(ema), os.path.join(directory, EMA_FILE))
    tensors, scalars, groups = flatten_optimizer_state(optimizer)
    save_file(_contiguous_cpu(tensors), os.path.join(directory, OPTIMIZER_FILE))
    save_file(rng_state(), os.path.join(directory, RNG_FILE))
    state.optimizer_scalars = scalars
    state.param_groups = groups
    with open(os.path.join(directory, STATE_FILE), "w") as handle:
        json.dump(state.__dict__, handle, indent=2, sort_keys=True, default=_json_default)


def _json_default(value: Any) -> Any:
    if isinstance(value, torch.Tensor):
        return value.item() if value.numel() == 1 else value.tolist()
    if isinstance(value, tuple):
        return list(value)
    raise TypeError(f"cannot store {type(value).__name__} in state.json")


@dataclass
class LoadedCheckpoint:
    model: dict[str, torch.Tensor]
    ema: dict[str, torch.Tensor]
    optimizer: dict[str, Any]
    rng: dict[str, torch.Tensor]
    state: TrainState


def load(directory: str) -> LoadedCheckpoint:
    """Read a checkpoint written by :func:`save` (safetensors and JSON only)."""
    missing = [
        name
        for name in (MODEL_FILE, EMA_FILE, OPTIMIZER_FILE, STATE_FILE)
        if not os.path.exists(os.path.join(directory, name))
    ]
    if missing:
        raise FileNotFoundError(f"checkpoint {directory} is incomplete: missing {', '.join(missing)}")
    with open(os.path.join(directory, STATE_FILE)) as handle:
        state = TrainState(**json.load(handle))
    groups = [dict(g, betas=tuple(g["betas"])) if "betas" in g else g for g in state.param_groups]
    optimizer = unflatten_optimizer_state(
        load_file(os.path.join(directory, OPTIMIZER_FILE)), state.optimizer_scalars, groups
    )
    rng_path = os.path.join(directory, RNG_FILE)
    return LoadedCheckpoint(
        model=load_file(os.path.join(directory, MODEL_FILE)),
        ema=load_file(os.path.join(directory, EMA_FILE)),
        optimizer=optimizer,
        rng=load_file(rng_path) if os.path.exists(rng_path) else {},
        state=state,
    )
