"""Exponential moving average of the trainable weights (SAMA: decay 0.9998, every step).

The shadow copy lives next to the parameters in fp32 and with the same placement: under FSDP2
(build the EMA after sharding) each rank averages and checkpoints its own shards (DTensors), so EMA
costs no communication; only the export gathers it, one tensor at a time (:func:`full_tensor`).
"""

from __future__ import annotations

import torch
from torch import nn


def full_tensor(tensor: torch.Tensor) -> torch.Tensor:
    """The whole tensor: a DTensor's shards gathered (a collective every rank must call in the
    same order), a plain tensor as it is."""
    return tensor.full_tensor() if hasattr(tensor, "full_tensor") else tensor


class EMA:
    """``shadow = decay * shadow + (1 - decay) * param`` over a model's trainable parameters."""

    def __init__(self, model: nn.Module, decay: float = 0.9998):
        if not 0.0 <= decay < 1.0:
            raise ValueError(f"EMA decay must be in [0, 1), got {decay}")
        self.decay = decay
        self.names = [name for name, p in model.named_parameters() if p.requires_grad]
        params = dict(model.named_parameters())
        self.shadow = {name: params[name].detach().clone().float() for name in self.names}

    @torch.no_grad()
    def update(self, model: nn.Module) -> None:
        params = dict(model.named_parameters())
        shadows = [self.shadow[name] for name in self.names]
        current = [params[name].detach().float() for name in self.names]
        torch._foreach_lerp_(shadows, current, 1.0 - self.decay)

    def state_dict(self) -> dict[str, torch.Tensor]:
        """The fp32 shadow as it is held: this rank's shards (DTensors) under FSDP2, never gathered.
        The tensors are the shadow's own (a checkpoint load writes into them)."""
        return dict(self.shadow)

    @torch.no_grad()
    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        """Copy ``state`` into the shadow: tensors of the shadow's own placement (DTensors of the
        same sharding), or full tensors, which each rank slices to its own shards."""
        missing = [name for name in self.names if name not in state]
        if missing:
            raise KeyError(f"EMA state lacks {len(missing)} parameter(s), e.g. {missing[0]}")
        for name, shadow in self.shadow.items():
            value = state[name]
            if value is shadow:
                continue
            if hasattr(shadow, "full_tensor") and not hasattr(value, "full_tensor"):
                from torch.distributed.tensor import distribute_tensor

                value = distribute_tensor(
                    value.to(shadow.device, torch.float32), shadow.device_mesh, shadow.placements
                )
            shadow.copy_(value.to(shadow.device, torch.float32))

    @torch.no_grad()
    def copy_to(self, model: nn.Module) -> None:
        """Load the averaged weights into ``model`` (of the shadow's placement)."""
        params = dict(model.named_parameters())
        for name, shadow in self.shadow.items():
            params[name].copy_(shadow.to(params[name].dtype))
