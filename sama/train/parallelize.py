"""Parallelism and memory techniques, applied from outside the model (torchtitan style).

* ``ddp``: the training module is wrapped in DistributedDataParallel (gloo on CPU, NCCL on GPU).
* ``fsdp2``: every transformer block, then the transformer itself, is sharded with ``fully_shard``
  (bf16 parameters for compute, fp32 gradient reduction when mixed precision is on).
* activation checkpointing: diffusers' own per-block gradient checkpointing.
* context parallelism (``context_parallel_size > 1``): Ulysses sequence sharding of the transformer
  (:mod:`sama.train.context_parallel`) over the ``cp`` dimension of a 2-D ``("dp", "cp")`` device
  mesh; FSDP2 shards (and averages gradients) over the flattened ``dp x cp`` mesh, DDP over the
  world, which are the same ranks (see that module for why the average is the right gradient).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch
from torch import nn


@dataclass
class ParallelConfig:
    """How the transformer is spread over workers and how memory is saved."""

    strategy: Literal["ddp", "fsdp2"] = "ddp"
    activation_checkpointing: bool = False
    # bf16 autocast (ddp) or bf16 FSDP parameters (fsdp2) on GPU; CPUs always compute in fp32.
    mixed_precision: Literal["bf16", "fp32"] = "bf16"
    # DDP only: needed when some trainable parameter can go unused in a step.
    find_unused_parameters: bool = False
    # Ulysses context parallelism: the ranks of a group of this many share each micro-batch and
    # hold 1/cp of its tokens through the blocks (long 81-frame clips). Must divide
    # scaling.num_workers and the transformer's attention heads; 1 = off.
    context_parallel_size: int = 1

    def validate(self) -> None:
        if self.strategy not in ("ddp", "fsdp2"):
            raise ValueError(f"parallel.strategy must be ddp or fsdp2, got {self.strategy!r}")
        if int(self.context_parallel_size) < 1:
            raise ValueError(f"parallel.context_parallel_size must be >= 1, got {self.context_parallel_size}")


def distributed() -> bool:
    """Whether a ``torch.distributed`` process group exists (collectives are needed)."""
    import torch.distributed as dist

    return dist.is_available() and dist.is_initialized()


def compute_dtype(cfg: ParallelConfig, device: torch.device) -> torch.dtype | None:
    """The autocast dtype, or None for plain fp32."""
    if device.type == "cuda" and cfg.mixed_precision == "bf16":
        return torch.bfloat16
    return None


def apply_activation_checkpointing(transformer: nn.Module) -> None:
    if not getattr(transformer, "_supports_gradient_checkpointing", False):
        raise ValueError(f"{type(transformer).__name__} does not support activation checkpointing")
    transformer.enable_gradient_checkpointing()


def apply_fsdp2(transformer: nn.Module, cfg: ParallelConfig, device: torch.device, mesh=None) -> None:
    """Shard each block, then the root, over ``mesh`` (default: the whole world)."""
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    block_kwargs: dict = {}
    root_kwargs: dict = {}
    if mesh is not None:
        block_kwargs["mesh"] = root_kwargs["mesh"] = mesh
    if compute_dtype(cfg, device) is not None:
        # Inputs are cast once, at the root. Casting again at each block would cast inside the
        # activation-checkpointed region, and the recomputation would then see fp32 tensors where
        # the forward saved bf16 ones (a CheckpointError, seen on an H200).
        root_kwargs["mp_policy"] = MixedPrecisionPolicy(
            param_dtype=torch.bfloat16, reduce_dtype=torch.float32
        )
        block_kwargs["mp_policy"] = MixedPrecisionPolicy(
            param_dtype=torch.bfloat16, reduce_dtype=torch.float32, cast_forward_inputs=False
        )
    for block in transformer.blocks:
        fully_shard(block, **block_kwargs)
    fully_shard(transformer, **root_kwargs)


def parallelize(
    module: nn.Module, cfg: ParallelConfig, device: torch.device, world_size: int, mesh=None
) -> nn.Module:
    """Apply checkpointing and the sharding strategy; returns what the training step calls.

    ``module`` is the :class:`~sama.models.training.SamaTrainingModule`; its ``transformer`` is the
    only trainable part. DDP is skipped for a single worker; FSDP2 applies whenever a process group
    exists.

    ``mesh``: the 2-D ``("dp", "cp")`` device mesh (:func:`sama.train.context_parallel.build_device_mesh`),
    needed when ``cfg.context_parallel_size > 1``.
    """

    if cfg.activation_checkpointing:
        apply_activation_checkpointing(module.transformer)
    shard_mesh = None
    if cfg.context_parallel_size > 1:
        from sama.train.context_parallel import apply_context_parallel

        if mesh is None:
            raise ValueError("context parallelism needs the (dp, cp) device mesh")
        apply_context_parallel(module.transformer, mesh["cp"])
        # torchtitan's choice: parameters are sharded over (and gradients averaged across) every
        # rank, dp x cp flattened; a cp group's ranks compute with the same weights, so sharding
        # over cp too divides parameter and optimizer memory by cp as well.
        shard_mesh = mesh["dp", "cp"]._flatten("dp_cp")
    if cfg.strategy == "fsdp2" and distributed():
        # Sharded even on one rank, so the same (DTensor) code path runs at every scale.
        apply_fsdp2(module.transformer, cfg, device, shard_mesh)
        return module
    if world_size <= 1:
        return module
    from torch.nn.parallel import DistributedDataParallel

    device_ids = [device.index] if device.type == "cuda" else None
    return DistributedDataParallel(
        module, device_ids=device_ids, find_unused_parameters=cfg.find_unused_parameters
    )
