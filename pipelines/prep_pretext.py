"""``sama prep-pretext``: raw videos in object storage -> motion-alignment pretext WebDataset shards.

Driver: list inputs, skip those covered by completion markers, group the rest into units, fan the
units out over Ray Data (``pipelines.common.run_units``), then write the summary and rejects file
from every marker. Workers run ``sama.prep.pretext_job.process_unit``. See ``sama.prep.ledger`` for
the output layout and the rerun guarantees.
"""

from __future__ import annotations

import functools
import logging
import time

from pipelines import common
from sama import config, storage
from sama.prep import ledger
from sama.prep.inputs import WorkUnit, list_units
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
    started = time.monotonic()
    done = ledger.prepare_output(cfg.output.uri, overwrite)
    done_sources = {source for result in done for source in result.sources}
    units, skipped = list_units(cfg.input, done_sources)
    log.info(
        "prep-pretext: %d unit(s) to process, %d input(s) already done (%d unit(s)), output %s",
        len(units),
        skipped,
        len(done),
        cfg.output.uri,
    )
    config.save(cfg, storage.join(cfg.output.uri, ledger.CONFIG_FILE))
    if units:
        common.connect(cfg.ray.address)
    run_results = common.run_units(
        [u.to_json() for u in units],
        functools.partial(_process, cfg=cfg),
        what="clips",
        num_cpus_per_task=cfg.ray.num_cpus_per_task,
        concurrency=cfg.ray.concurrency,
        progress_interval_s=cfg.ray.progress_interval_s,
    )
    results = ledger.read_markers(cfg.output.uri)
    ledger.remove_orphan_shards(cfg.output.uri, results)
    summary = ledger.summarize(results, run_results, time.monotonic() - started)
    ledger.write_summary(cfg.output.uri, results, summary)
    log.info(
        "prep-pretext done: %d inputs, %d accepted, %d rejected %s, %d clips in %d shards, %.2f clips/s",
        summary.inputs_seen,
        summary.accepted,
        summary.rejected,
        summary.rejected_per_reason,
        summary.samples,
        summary.shards,
        summary.samples_per_s,
    )
    return summary
