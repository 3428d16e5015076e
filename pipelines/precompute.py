"""``sama precompute``: pixel shards -> latent shards (the frozen encoders' outputs), on Ray Data.

Driver (:func:`pipelines.common.run_job`): check the inputs and the output, take the output's
lease, refuse an output made by other encoders (unless ``--overwrite``), write ``latents.json``
and the null-prompt embeddings, list one unit per input shard not yet covered by a completion
marker, and run the units on a pool of actors that each load the encoders once (one GPU each when
the cluster has GPUs, else CPU); then write the summary and rejects file from every marker.
Actors run ``sama.prep.precompute_job.process_unit``. See ``sama.prep.ledger`` for the output
layout and the rerun guarantees.
"""

from __future__ import annotations

import logging

from pipelines import common
from sama import config
from sama.prep import ledger
from sama.prep.precompute_job import (
    PrecomputeConfig,
    ShardUnit,
    check_inputs,
    list_shard_units,
    load_encoders,
    model_config_of,
    process_unit,
    write_output_info,
)

log = logging.getLogger(__name__)


class _EncoderProcess:
    """The per-unit function of one actor: holds the encoders it loaded once (on the actor's
    GPU when it was given one)."""

    def __init__(self, cfg: PrecomputeConfig):
        import torch

        self.cfg = cfg
        model_config = model_config_of(cfg.model)
        device = "cuda" if torch.cuda.is_available() else None
        self.components = load_encoders(cfg.model, model_config, device=device)

    def __call__(self, unit_json: str) -> ledger.UnitResult:
        return process_unit(ShardUnit.from_json(unit_json), self.cfg, self.components)


def run(cfg: PrecomputeConfig, overwrite: bool = False) -> ledger.Summary:
    """Run the job to completion (or resume it); returns the summary also written to the output."""
    if not cfg.inputs:
        raise config.ConfigError("inputs: no input given (use --input SHARDS)")
    if not cfg.output.uri:
        raise config.ConfigError("output.uri: no output given (use --output URI)")
    try:
        cfg.validate()
    except ValueError as exc:
        raise config.ConfigError(str(exc)) from None
    # Resolved on the driver first: a bad preset, override or export fails here, before Ray.
    model_config = model_config_of(cfg.model)
    return common.run_job(
        name="precompute",
        cfg=cfg,
        output_uri=cfg.output.uri,
        overwrite=overwrite,
        check_input=lambda: check_inputs(cfg),
        list_units=lambda done: list_shard_units(cfg, done),
        process=None,
        ray_cfg=cfg.ray,
        what="clips",
        actors=common.ActorPool.of(lambda: _EncoderProcess(cfg), cfg.ray),
        setup_output=lambda: write_output_info(cfg, model_config, overwrite),
    )
