"""``sama prep-pretext``: raw videos in object storage -> motion-alignment pretext WebDataset shards.

Driver: list inputs, skip those covered by completion markers, group the rest into units, fan the
units out over Ray Data (``pipelines.common.run_units``), then write the summary and rejects file
from every marker. Workers run ``sama.prep.pretext_job.process_unit``. See ``sama.prep.ledger`` for
the output layout and the rerun guarantees.
"""

from __future__ import annotations

import functools
import logging

from pipelines import common
from sama import config
from sama.prep import ledger
from sama.prep.inputs import WorkUnit, check_input_prefix, list_units
from sama.prep.pretext_job import PrepPretextConfig, process_unit

log = logging.getLogger(__name__)


def _process(unit_json: str, cfg: PrepPretextConfig) -> ledger.UnitResult:
    return process_unit(WorkUnit.from_json(unit_json), cfg)


def run(cfg: PrepPretextConfig, overwrite: bool = False) -> ledger.Summary:
    """Run the job to completion (or resume it); returns the summary also written to the output."""
    if not cfg.input.uri:
        raise config.ConfigError("input.uri: no input given (use --input URI)")
    if not cfg.output.uri:
        raise config.ConfigError("output.uri: no output given (use --output URI)")
    cfg.validate()
    return common.run_job(
        name="prep-pretext",
        cfg=cfg,
        output_uri=cfg.output.uri,
        overwrite=overwrite,
        check_input=lambda: check_input_prefix(cfg.input),
        list_units=lambda done: list_units(cfg.input, done),
        process=functools.partial(_process, cfg=cfg),
        ray_cfg=cfg.ray,
        what="clips",
    )
