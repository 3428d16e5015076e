"""The data-job contract, and the one module that runs Ray Data for the jobs.

Every job is: list inputs -> work units -> a pure ``process_unit`` (in ``sama/``, no Ray; its loop
is :func:`sama.prep.unit.run_unit`) -> completion marker -> summary + rejects. :func:`run_job` is
the driver: it takes the output's lease, prepares the output (resume or ``--overwrite``), lists
the pending units, connects (:func:`sama.cluster.connect`), fans the units out and writes the
summary. Each unit becomes one row (and one block, so units run in parallel) of a Ray Data
dataset; a ``map`` runs ``process_unit`` on CPU workers, which write shards and markers
themselves. Only the small per-unit results, or a unit's failure, stream back to the driver.
Ray Data provides scheduling, backpressure, retries of crashed workers and progress bars; a unit
that raises comes back as a failure (counted in the summary, retried by the next run) instead
of failing the job.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Callable

from sama import cluster, config, preflight, storage
from sama.prep import ledger

log = logging.getLogger(__name__)


def quiet_progress_bars() -> None:
    """Turn Ray Data's progress bars off (for a caller that prints its own progress)."""
    import ray.data

    ray.data.DataContext.get_current().enable_progress_bars = False


def run_units(
    units: list[str],
    process: Callable[[str], ledger.UnitResult],
    *,
    what: str,
    num_cpus_per_task: float = 1.0,
    concurrency: int | None = None,
    progress_interval_s: float = 10.0,
) -> tuple[list[ledger.UnitResult], list[ledger.UnitFailure]]:
    """Run ``process`` over serialised ``units`` on Ray Data workers.

    Returns the results of the units that completed and the failures of those that raised.
    """
    import ray.data

    if not units:
        return [], []

    # The pipeline is one map over units. Ray Data's per-operator resource reservation would hold
    # back half the cluster's CPUs for operators that do not exist (measured on 2 CPUs: 8 one-second
    # units took 8.5 s with it, 4.1 s without).
    ray.data.DataContext.get_current().op_resource_reservation_enabled = False

    def run_one(row: dict) -> dict:
        # A unit's exception must not reach Ray Data: it would fail the whole job (Ray Data
        # retries crashed workers, not exceptions). It comes back as the unit's failure instead;
        # the unit has no marker, so the next run retries it.
        try:
            return {"result": process(row["unit"]).to_json(), "failed_unit": "", "error": ""}
        except Exception as exc:
            unit_id = json.loads(row["unit"]).get("unit_id", "?")
            return {"result": "", "failed_unit": unit_id, "error": f"{type(exc).__name__}: {exc}"}

    dataset = ray.data.from_items([{"unit": u} for u in units], override_num_blocks=len(units))
    map_kwargs: dict = {"num_cpus": num_cpus_per_task}
    if concurrency:
        map_kwargs["compute"] = ray.data.TaskPoolStrategy(size=concurrency)
    # Ray Data retries a failed task; a retried unit rewrites the same shard names, so no duplicates.
    dataset = dataset.map(run_one, max_retries=3, **map_kwargs)
    progress = ledger.Progress(what, len(units), progress_interval_s)
    results, failures = [], []
    for row in dataset.iter_rows():
        if row["failed_unit"]:
            failure = ledger.UnitFailure(row["failed_unit"], row["error"])
            log.error("unit %s failed (a rerun retries it): %s", failure.unit_id, failure.error)
            failures.append(failure)
            continue
        result = ledger.UnitResult.from_json(row["result"])
        results.append(result)
        progress.update(result)
    return results, failures


def run_job(
    *,
    name: str,
    cfg,
    output_uri: str,
    overwrite: bool,
    check_input: Callable[[], str],
    list_units: Callable[[set[str]], tuple[list, int]],
    process: Callable[[str], ledger.UnitResult],
    ray_cfg,
    what: str,
) -> ledger.Summary:
    """The driver of a data-prep job, from preflight to the summary.

    ``check_input()`` is the input's preflight check (:mod:`sama.preflight`), run with the output's
    before anything is written or Ray starts. ``list_units(done_sources)`` lists the pending work
    units (objects with ``to_json``) given the inputs completed units already cover;
    ``process(unit_json)`` runs one on a worker. The run holds the output's lease
    (:class:`sama.prep.ledger.OutputLease`) from start to summary.
    """
    started = time.monotonic()
    checks = [
        preflight.Check("input", check_input),
        preflight.Check("output", lambda: preflight.writable(output_uri)),
    ]
    results = preflight.run_checks(checks)
    for result in results:
        log.info("%s preflight: %s [%s] %s", name, result.name, result.status, result.found)
    preflight.require(name, results)
    # Everything below deletes or commits under the output root: only with its lease.
    with ledger.OutputLease(output_uri, cfg.output.lease_ttl_s) as lease:
        done = ledger.prepare_output(output_uri, overwrite)
        done_sources = {source for result in done for source in result.sources}
        units, skipped = list_units(done_sources)
        log.info(
            "%s: %d unit(s) to process, %d input(s) already done by %d unit(s), output %s",
            name,
            len(units),
            skipped,
            len(done),
            output_uri,
        )
        config.save(cfg, storage.join(output_uri, ledger.CONFIG_FILE))
        if units:
            cluster.connect(ray_cfg.address)
        run_results, failures = run_units(
            [u.to_json() for u in units],
            process,
            what=what,
            num_cpus_per_task=ray_cfg.num_cpus_per_task,
            concurrency=ray_cfg.concurrency,
            progress_interval_s=ray_cfg.progress_interval_s,
        )
        lease.check()  # a run that lost its lease must not delete what the new owner writes
        results = ledger.read_markers(output_uri)
        ledger.remove_orphan_shards(output_uri, results)
        summary = ledger.summarize(results, run_results, time.monotonic() - started, failures)
        ledger.write_summary(output_uri, results, summary)
        log.info(
            "%s done: %d inputs, %d accepted, %d rejected %s, %d %s in %d shards, %.2f %s/s",
            name,
            summary.inputs_seen,
            summary.accepted,
            summary.rejected,
            summary.rejected_per_reason,
            summary.samples,
            what,
            summary.shards,
            summary.samples_per_s,
            what,
        )
        if failures:
            log.error(
                "%s: %d unit(s) failed (%s); their inputs are not done: "
                "run the same command again to retry them",
                name,
                len(failures),
                ", ".join(f.unit_id for f in failures[:5]) + (" ..." if len(failures) > 5 else ""),
            )
        return summary
