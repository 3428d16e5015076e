"""Sharded training checkpoints as safetensors + JSON: nothing in a checkpoint is ever unpickled.

A checkpoint directory (``{run.storage_uri}/{run.name}/checkpoint_*``) holds::

    tensors/shard-0000R-model-00001-of-00001.safetensors
                           what rank R-1 owns of the trainable weights ("model/<name>"), their EMA
                           ("ema/<name>") and the optimizer's tensors ("optim/<name>/<state>"):
                           under FSDP2 each rank's local DTensor shards, with their offsets in the
                           safetensors header (JSON); replicated tensors (DDP, one worker, AdamW's
                           step) are written once, by one rank
    rng-0000R.safetensors  rank R's torch (and CUDA) RNG states as uint8 tensors
    config.yaml            the resolved configuration that wrote the checkpoint (``--resume``
                           compares the new one with it)
    state.json             step, samples seen, scheduler, optimizer scalars and param groups, the
                           data position of every logical data-parallel rank, MLflow run id, config
                           digest, world size, and the manifest:
                           every file above with its size in bytes. Written last, by rank 0, once
                           every rank has written its files: it is the commit marker.

The tensors are written and read with ``torch.distributed.checkpoint`` (DCP) through its
Hugging Face storage writer/reader (``save_distributed=True``): each rank writes only its own
shards, and a load plans, from the safetensors headers alone, which slices of which files each
rank needs, so a checkpoint written by N workers restores on M (resharding). DCP's default
``FileSystemWriter`` would add a pickled ``.metadata`` file; the Hugging Face layout has none.
Only tensors go through DCP: optimizer scalars and param groups are JSON in state.json.

No rank gathers a full model, optimizer or EMA to save or load one: the state dicts come from
``torch.distributed.checkpoint.state_dict`` with ``full_state_dict=False`` (sharded DTensors under
FSDP2, plain tensors otherwise), and only the parameters that train are saved (the frozen base
weights come from the model's own source).

A checkpoint is usable only when :func:`verify` passes: state.json exists and every file of its
manifest exists with its recorded size. Ray Train registers a checkpoint only after every worker
reported its directory; :func:`sama.train.launch.usable_checkpoint` walks the registered ones from
the newest and falls back past any that fails :func:`verify`, with a warning naming what is wrong.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass, field, fields
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from sama.train.parallelize import distributed

FORMAT = "sama-sharded-v1"
TENSORS_DIR = "tensors"
STATE_FILE = "state.json"
CONFIG_FILE = "config.yaml"
MODEL_PREFIX = "model/"
EMA_PREFIX = "ema/"
OPTIM_PREFIX = "optim/"


class CheckpointError(RuntimeError):
    """A checkpoint that cannot be restored from (not committed, incomplete or truncated)."""


@dataclass
class TrainState:
    """The scalar side of a checkpoint (state.json)."""

    step: int = 0
    samples_seen: int = 0
    scheduler: dict[str, Any] = field(default_factory=dict)
    optimizer_scalars: dict[str, Any] = field(default_factory=dict)
    param_groups: list[dict[str, Any]] = field(default_factory=list)
    data_position: str = ""
    # Every logical data-parallel rank's data position (JSON, by logical rank; their number is the
    # run's logical ranks, sama.train.data): an exact replay needs each one's own. Absent from
    # checkpoints written before exact replay (only ``data_position``, rank 0's).
    data_positions: list[str] = field(default_factory=list)
    mlflow_run_id: str | None = None
    config_digest: str = ""
    world_size: int = 1
    format: str = FORMAT
    # Relative path -> size in bytes of every file the checkpoint holds (state.json aside).
    files: dict[str, int] = field(default_factory=dict)

    @classmethod
    def from_json(cls, text: str) -> TrainState:
        """A ``state.json``; keys this version does not know (``extra``, written by earlier
        versions and never read) are ignored."""
        data = json.loads(text)
        known = {f.name for f in fields(cls)}
        return cls(**{key: value for key, value in data.items() if key in known})


def config_digest(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def rng_file(rank: int) -> str:
    return f"rng-{rank:05d}.safetensors"


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


def _json_default(value: Any) -> Any:
    if isinstance(value, torch.Tensor):
        return value.item() if value.numel() == 1 else value.tolist()
    if isinstance(value, tuple):
        return list(value)
    raise TypeError(f"cannot store {type(value).__name__} in state.json")


def _rank_world() -> tuple[int, int]:
    import torch.distributed as dist

    if distributed():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def flat_tensors(
    model: dict[str, torch.Tensor], ema: dict[str, torch.Tensor], optimizer: dict[str, Any]
) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """One flat, tensor-only dict for DCP (``model/``, ``ema/``, ``optim/<name>/<state>`` keys) and
    the optimizer's non-tensor per-parameter values (JSON scalars)."""
    flat: dict[str, torch.Tensor] = {}
    scalars: dict[str, Any] = {}
    flat.update({MODEL_PREFIX + k: v for k, v in model.items()})
    flat.update({EMA_PREFIX + k: v for k, v in ema.items()})
    for name, per_param in optimizer.get("state", {}).items():
        for key, value in per_param.items():
            if isinstance(value, torch.Tensor):
                flat[f"{OPTIM_PREFIX}{name}/{key}"] = value
            else:
                scalars[f"{name}/{key}"] = value
    return flat, scalars


def _local_files(directory: str) -> dict[str, int]:
    found = {}
    for root, _dirs, names in os.walk(directory):
        for name in names:
            path = os.path.join(root, name)
            relative = os.path.relpath(path, directory).replace(os.sep, "/")
            if relative != STATE_FILE:
                found[relative] = os.path.getsize(path)
    return found


def save(
    directory: str,
    model: dict[str, torch.Tensor],
    ema: dict[str, torch.Tensor],
    optimizer: dict[str, Any],
    state: TrainState,
    config_text: str | None = None,
) -> None:
    """Every rank writes its shards into its local ``directory``; rank 0 writes state.json last.

    ``model``/``optimizer``: ``get_model_state_dict``/``get_optimizer_state_dict`` with
    ``full_state_dict=False`` (trainable parameters only); ``ema``: the EMA shadow (DTensors under
    FSDP2). A collective when a process group exists: every rank calls it. Ray Train merges the
    ranks' directories into one checkpoint (every rank reports its own).
    """
    import torch.distributed as dist
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint import HuggingFaceStorageWriter

    rank, world = _rank_world()
    os.makedirs(os.path.join(directory, TENSORS_DIR), exist_ok=True)
    flat, scalars = flat_tensors(model, ema, optimizer)
    flat = {k: v.detach() for k, v in flat.items()}
    writer = HuggingFaceStorageWriter(os.path.join(directory, TENSORS_DIR), save_distributed=True)
    dcp.save(flat, storage_writer=writer, no_dist=not distributed())
    save_file(rng_state(), os.path.join(directory, rng_file(rank)))
    files = _local_files(directory)
    if distributed():
        everyone: list[dict[str, int] | None] = [None] * world
        dist.all_gather_object(everyone, files)
        files = {k: v for part in everyone for k, v in (part or {}).items()}
    if rank != 0:
        return
    if config_text is not None:
        with open(os.path.join(directory, CONFIG_FILE), "w") as handle:
            handle.write(config_text)
        files[CONFIG_FILE] = os.path.getsize(os.path.join(directory, CONFIG_FILE))
        state.config_digest = config_digest(config_text)
    state.optimizer_scalars = scalars
    state.param_groups = optimizer.get("param_groups", [])
    state.world_size = world
    state.files = dict(sorted(files.items()))
    # The commit marker: written after every rank's files, atomically (rename).
    temp = os.path.join(directory, f".{STATE_FILE}.tmp")
    with open(temp, "w") as handle:
        json.dump(state.__dict__, handle, indent=2, sort_keys=True, default=_json_default)
    os.replace(temp, os.path.join(directory, STATE_FILE))


def read_state(directory: str) -> TrainState:
    path = os.path.join(directory, STATE_FILE)
    if not os.path.exists(path):
        raise CheckpointError(f"checkpoint {directory} is not committed: no {STATE_FILE}")
    try:
        with open(path) as handle:
            return TrainState.from_json(handle.read())
    except (ValueError, TypeError) as exc:
        raise CheckpointError(f"checkpoint {directory}: {STATE_FILE} is unreadable ({exc})") from None


def problems(state: TrainState, sizes: dict[str, int | None]) -> list[str]:
    """What is wrong with a checkpoint whose files have ``sizes`` (None: missing)."""
    found = []
    if state.format != FORMAT:
        found.append(f"format {state.format!r}, expected {FORMAT!r}")
    if not any(name.startswith(TENSORS_DIR + "/") for name in state.files):
        found.append("its manifest lists no tensor files")
    for name, expected in state.files.items():
        got = sizes.get(name)
        if got is None:
            found.append(f"{name} is missing")
        elif got != expected:
            found.append(f"{name} is {got} bytes, expected {expected} (truncated or rewritten)")
    return found


def verify(directory: str) -> TrainState:
    """The checkpoint's state once it is committed and complete; else :class:`CheckpointError`."""
    state = read_state(directory)
    sizes = {
        name: os.path.getsize(os.path.join(directory, name))
        if os.path.isfile(os.path.join(directory, name))
        else None
        for name in state.files
    }
    wrong = problems(state, sizes)
    if wrong:
        raise CheckpointError(f"checkpoint {directory} is incomplete: {'; '.join(wrong)}")
    return state


@dataclass
class LoadedCheckpoint:
    state: TrainState
    rng: dict[str, torch.Tensor]


def load(
    directory: str,
    model: dict[str, torch.Tensor],
    ema: dict[str, torch.Tensor],
    optimizer: dict[str, Any],
) -> LoadedCheckpoint:
    """Read a checkpoint into the given state dicts, in place (a collective; every rank calls it).

    The dicts are the current run's (any world size and sharding): each rank reads the slices its
    own shards need. Raises :class:`CheckpointError` for an uncommitted or incomplete checkpoint,
    before reading any tensor.
    """
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint import HuggingFaceStorageReader

    state = verify(directory)
    flat, _ = flat_tensors(model, ema, optimizer)
    try:
        dcp.load(
            flat,
            storage_reader=HuggingFaceStorageReader(os.path.join(directory, TENSORS_DIR)),
            no_dist=not distributed(),
        )
    except Exception as exc:  # DCP wraps every rank's failure; a corrupt file lands here
        raise CheckpointError(f"checkpoint {directory} could not be read: {exc}") from exc
    for flat_key, value in state.optimizer_scalars.items():
        name, key = flat_key.rsplit("/", 1)
        if name in optimizer.get("state", {}):
            optimizer["state"][name][key] = value
    rank, _ = _rank_world()
    path = os.path.join(directory, rng_file(rank))
    return LoadedCheckpoint(state=state, rng=load_file(path) if os.path.exists(path) else {})


def trainable_state(module: torch.nn.Module, optimizer, ema) -> tuple[dict, dict, dict]:
    """This rank's model (trainable parameters only), EMA and optimizer state dicts, unsharded
    nowhere: ``full_state_dict=False`` gives the local DTensor shards under FSDP2. The optimizer's
    state is created (a zero step) when it has none yet, so a fresh run can load into it."""
    from torch.distributed.checkpoint.state_dict import (
        StateDictOptions,
        get_model_state_dict,
        get_optimizer_state_dict,
    )

    options = StateDictOptions(full_state_dict=False)
    trainable = {name for name, p in module.named_parameters() if p.requires_grad}
    model = {k: v for k, v in get_model_state_dict(module, options=options).items() if k in trainable}
    optim = get_optimizer_state_dict(module, optimizer, options=options)
    return model, ema.state_dict(), optim


def save_trainable(
    directory: str, module, optimizer, ema, state: TrainState, config_text: str | None = None
) -> None:
    """:func:`save` of :func:`trainable_state` (a collective: every rank calls it)."""
    model, ema_state, optim = trainable_state(module, optimizer, ema)
    save(directory, model, ema_state, optim, state, config_text)


def load_trainable(directory: str, module, optimizer, ema) -> LoadedCheckpoint:
    """:func:`load` into ``module``, ``optimizer`` and ``ema`` as they are sharded now (a collective).

    The optimizer keeps its own param groups (learning rate, betas...: the configuration's); only
    its per-parameter state comes from the checkpoint.
    """
    from torch.distributed.checkpoint.state_dict import (
        StateDictOptions,
        set_model_state_dict,
        set_optimizer_state_dict,
    )

    model, ema_state, optim = trainable_state(module, optimizer, ema)
    loaded = load(directory, model, ema_state, optim)
    set_model_state_dict(module, model, options=StateDictOptions(strict=False))
    set_optimizer_state_dict(module, optimizer, optim)
    ema.load_state_dict(ema_state)
    return loaded
