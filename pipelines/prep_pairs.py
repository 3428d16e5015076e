"""``sama prep-pairs``: edit manifests -> paired-edit WebDataset shards.

Driver: read the manifests, flag duplicate rows, skip rows covered by completion markers, group the
rest into units and fan them out over Ray Data (``pipelines.common.run_units``); then write the
summary and rejects file from every marker. Workers run ``sama.prep.pairs_job.process_pairs_unit``.
"""

from __future__ import annotations

import functools
import logging

from pipelines import common
from sama import config
from sama.prep import ledger
from sama.prep.pairs_job import (
    PairsUnit,
    PrepPairsConfig,
    check_manifests,
    list_pair_units,
    process_pairs_unit,
)

log = logging.getLogger(__name__)


def _process(unit_json: str, cfg: PrepPairsConfig) -> ledger.UnitResult:
    return process_pairs_unit(PairsUnit.from_json(unit_json), cfg)


def run(cfg: PrepPairsConfig, overwrite: bool = False) -> ledger.Summary:
    """Run the job to completion (or resume it); returns the summary also written to the output."""
    if not cfg.input.manifests:
        raise config.ConfigError("input.manifests: no manifest given (use --manifest URI)")
    if not cfg.output.uri:
        raise config.ConfigError("output.uri: no output given (use --output URI)")
    cfg.validate()
    return common.run_job(
        name="prep-pairs",
        cfg=cfg,
        output_uri=cfg.output.uri,
        overwrite=overwrite,
        check_input=lambda: check_manifests(cfg),
        list_units=lambda done: list_pair_units(cfg, done),
        process=functools.partial(_process, cfg=cfg),
        ray_cfg=cfg.ray,
        what="pairs",
    )
