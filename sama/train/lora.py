"""A LoRA run's adapter export (``model.lora_export = "adapter"``): see :mod:`sama.models.lora`."""

from __future__ import annotations

import dataclasses
import logging

log = logging.getLogger(__name__)


def export_adapter(trainer, directory: str) -> None:
    """Write the EMA of the trainable weights (the adapters and SAMA's modules) as an adapter over
    the run's ``model.init_from`` export into the local ``directory`` (rank 0 writes).

    The tensors are gathered one at a time, in the same order on every rank (under FSDP2 each
    gather is a collective).
    """
    from sama.models.lora import save_adapter
    from sama.train.ema import full_tensor

    weights = {}
    for name, shadow in trainer.ema.shadow.items():
        tensor = full_tensor(shadow.detach())
        if trainer.rank == 0:
            weights[name] = tensor.to("cpu")
        del tensor
    if trainer.rank != 0:
        return
    cfg = trainer.cfg
    save_adapter(
        directory,
        weights,
        cfg.model.lora,
        cfg.model.init_from,
        preset=trainer.model_config.preset,
        extra={"pipeline": dataclasses.asdict(cfg.inference)},
    )
    log.info(
        "wrote the LoRA adapter (%d tensors) over %s to %s", len(weights), cfg.model.init_from, directory
    )
