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

A job whose units need something expensive loaded once per process (``sama precompute``'s
encoders) runs them on a pool of actors instead of tasks (:class:`ActorPool`): the pool's
``factory`` runs once in each actor and returns the per-unit function; each actor takes a GPU
when the cluster has GPUs.
"""

from __future__ import annotations

import functools
import json
import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from sama import cluster, config, logs, preflight, storage
from sama.prep import ledger

log = logging.getLogger(__name__)


@dataclass
class ActorPool:
    """Run units on a pool of long-lived actors rather than tasks.

    ``factory()`` runs once in each actor and returns the per-unit function (``unit_json ->
    UnitResult``), e.g. a closure over models it loaded. ``size`` None: one actor per GPU when the
    cluster has GPUs, else one per ``num_cpus`` CPUs. ``num_gpus`` None: 1 per actor when the
    cluster has GPUs, else 0.
    """

    factory: Callable[[], Callable[[str], ledger.UnitResult]]
    size: int | None = None
    num_cpus: float = 1.0
    num_gpus: float | None = None

    @classmethod
    def of(cls, factory: Callable[[], Callable[[str], ledger.UnitResult]], ray_cfg) -> ActorPool:
        """A pool sized by a job's :class:`sama.prep.common.ActorRayConfig`."""
        return cls(factory, ray_cfg.actors, ray_cfg.num_cpus_per_actor, ray_cfg.num_gpus_per_actor)

    def resolved(self) -> tuple[int, float]:
        """(actors, GPUs per actor) for the connected cluster."""
        import ray

        resources = ray.cluster_resources()
        gpus = float(resources.get("GPU", 0))
        num_gpus = self.num_gpus if self.num_gpus is not None else (1.0 if gpus >= 1 else 0.0)
        if self.size is not None:
            return self.size, num_gpus
        if num_gpus > 0:
            return max(1, int(gpus // num_gpus)), num_gpus
        return max(1, int(float(resources.get("CPU", 1)) // self.num_cpus)), num_gpus


def _unit_row(process: Callable[[str], ledger.UnitResult], level: int, row: dict) -> dict:
    # Runs on a Ray worker: its log lines at the driver's `level`, redacted (sama.logs).
    # A unit's exception must not reach Ray Data: it would fail the whole job (Ray Data retries
    # crashed workers, not exceptions). It comes back as the unit's failure instead; the unit has
    # no marker, so the next run retries it.
    with logs.worker_logging(level):
        try:
            return {"result": process(row["unit"]).to_json(), "failed_unit": "", "error": ""}
        except Exception as exc:
            unit_id = json.loads(row["unit"]).get("unit_id", "?")
            return {"result": "", "failed_unit": unit_id, "error": f"{type(exc).__name__}: {exc}"}


class _UnitActor:
    """A Ray Data actor: builds its per-unit function once (``ActorPool.factory``), then runs
    units; both log at the driver's ``level``, redacted (:func:`sama.logs.worker_logging`)."""

    def __init__(self, factory: Callable[[], Callable[[str], ledger.UnitResult]], level: int):
        self.level = level
        with logs.worker_logging(level):
            self.process = factory()

    def __call__(self, row: dict) -> dict:
        return _unit_row(self.process, self.level, row)


def run_units(
    units: list[str],
    process: Callable[[str], ledger.UnitResult] | None,
    *,
    what: str,
    num_cpus_per_task: float = 1.0,
    concurrency: int | None = None,
    progress_interval_s: float = 10.0,
    actors: ActorPool | None = None,
) -> tuple[list[ledger.UnitResult], list[ledger.UnitFailure]]:
    """Run ``process`` over serialised ``units`` on Ray Data workers: tasks, or with ``actors``
    the pool's actors (``process`` is then unused: each actor's comes from the pool's factory).

    Returns the results of the units that completed and the failures of those that raised.
    """
    import ray.data

    if not units:
        return [], []

    # The pipeline is one map over units. Ray Data's per-operator resource reservation would hold
    # back half the cluster's CPUs for operators that do not exist (measured on 2 CPUs: 8 one-second
    # units took 8.5 s with it, 4.1 s without).
    ray.data.DataContext.get_current().op_resource_reservation_enabled = False

    dataset = ray.data.from_items([{"unit": u} for u in units], override_num_blocks=len(units))
    level = logs.worker_level()
    # Ray Data retries a failed task; a retried unit rewrites the same shard names, so no duplicates.
    # At most 3 times (Ray Data's default: without limit), which map takes only as ray_remote_args
    # (deprecated; sama.logs ignores the warning for these calls).
    if actors is not None:
        size, num_gpus = actors.resolved()
        size = min(size, len(units))  # an actor with no unit would load its models for nothing
        logs.spend_actor_argument_warning()  # Ray's false alarm about the pool's arguments (sama.logs)
        log.info("%d actor(s), %g CPU and %g GPU each", size, actors.num_cpus, num_gpus)
        dataset = dataset.map(
            _UnitActor,
            fn_constructor_args=(actors.factory, level),
            compute=ray.data.ActorPoolStrategy(size=size),
            num_cpus=actors.num_cpus,
            num_gpus=num_gpus or None,
            max_restarts=3,
            max_task_retries=3,
        )
    else:
        if process is None:
            raise ValueError("run_units needs a process function or an actor pool")
        map_kwargs: dict = {"num_cpus": num_cpus_per_task}
        if concurrency:
            map_kwargs["compute"] = ray.data.TaskPoolStrategy(size=concurrency)
        dataset = dataset.map(functools.partial(_unit_row, process, level), max_retries=3, **map_kwargs)
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
    process: Callable[[str], ledger.UnitResult] | None,
    ray_cfg,
    what: str,
    actors: ActorPool | None = None,
    extra_checks: Sequence[preflight.Check] = (),
    setup_output: Callable[[], None] | None = None,
) -> ledger.Summary:
    """The driver of a data-prep job, from preflight to the summary.

    ``check_input()`` is the input's preflight check (:mod:`sama.preflight`), run with the output's
    (and ``extra_checks``) before anything is written or Ray starts. ``list_units(done_sources)``
    lists the pending work units (objects with ``to_json``) given the inputs completed units
    already cover; ``process(unit_json)`` runs one on a worker task, or, with ``actors``, the
    pool's actors run them (:class:`ActorPool`). ``setup_output()`` runs once the output is
    prepared and before anything else is written to it (a job's own files; it may refuse the
    output by raising). The run holds the output's lease (:class:`sama.prep.ledger.OutputLease`)
    from start to summary.
    """
    started = time.monotonic()
    checks = [
        preflight.Check("input", check_input),
        preflight.Check("output", lambda: preflight.writable(output_uri)),
        *extra_checks,
    ]
    results = preflight.run_checks(checks)
    for result in results:
        log.info("%s preflight: %s [%s] %s", name, result.name, result.status, result.found)
    preflight.require(name, results)
    # Everything below deletes or commits under the output root: only with its lease.
    with ledger.OutputLease(output_uri, cfg.output.lease_ttl_s) as lease:
        done = ledger.prepare_output(output_uri, overwrite)
        if setup_output is not None:
            setup_output()
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
            num_cpus_per_task=getattr(ray_cfg, "num_cpus_per_task", 1.0),
            concurrency=getattr(ray_cfg, "concurrency", None),
            progress_interval_s=ray_cfg.progress_interval_s,
            actors=actors,
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
