"""Launching a training stage on Ray Train (local Ray, or a cluster via RAY_ADDRESS).

The driver resolves the run's storage, refuses to overwrite an existing run unless asked to
resume it, builds a ``TorchTrainer`` whose workers run :func:`train_loop`, and reads back the run's
summary (``run_info.json``) written by rank 0: the MLflow run, the export and the registered model.

Checkpoints go to ``{run.storage_uri}/{run.name}/checkpoint_*`` through ``ray.train.report`` (Ray
keeps the last ``checkpoint.keep_last``); the EMA export to ``{run.storage_uri}/{run.name}/export``.
A worker failure restarts the workers from the last checkpoint within the same job (up to
``run.max_failures`` times); ``--resume`` continues a stopped run from its last checkpoint, in the
same MLflow run, with continuous step numbers.

Every rank writes its own shards of a checkpoint (:mod:`sama.train.checkpoint`) and reports its
own directory; Ray Train merges them into one ``checkpoint_*`` directory and registers it (in
``checkpoint_manager_snapshot.json``) only once every rank has reported. Before each attempt the
driver picks the newest registered checkpoint that is committed and complete
(:func:`usable_checkpoint`: state.json present, every file of its manifest at its size), falling
back to the previous one with a warning that names what is wrong. A resume compares the
configuration with the checkpoint's (:func:`config_changes`): a changed model, objective,
optimizer, data sources or batch sizes stops it unless ``allow_config_change``.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import time
import traceback
from typing import Any

from sama import cluster, storage
from sama import config as config_lib
from sama.preflight import describe_error
from sama.redaction import install_log_filter, redact_config
from sama.tracking import LocalTrackingServer, sqlite_uri, training_store
from sama.train.preflight import describe_resources
from sama.train.trainer import RUN_INFO_FILE, TrainConfig, run_uri

log = logging.getLogger(__name__)

SNAPSHOT_FILE = "checkpoint_manager_snapshot.json"


def latest_checkpoint(cfg: TrainConfig) -> str | None:
    """The run's latest *registered* checkpoint (what Ray Train restores from), or None.

    Ray Train records reported checkpoints in ``checkpoint_manager_snapshot.json``; a checkpoint
    directory it does not list (a worker died while reporting it) is never restored from.
    """
    snapshot = storage.join(run_uri(cfg), SNAPSHOT_FILE)
    if not storage.exists(snapshot):
        return None
    latest = json.loads(storage.read_text(snapshot)).get("latest_checkpoint_result") or {}
    name = latest.get("checkpoint_dir_name")
    return storage.join(run_uri(cfg), name) if name else None


def registered_checkpoints(cfg: TrainConfig) -> list[str]:
    """The run's checkpoints that Ray Train registered, newest first (its latest first)."""
    snapshot = storage.join(run_uri(cfg), SNAPSHOT_FILE)
    if not storage.exists(snapshot):
        return []
    data = json.loads(storage.read_text(snapshot))
    results = data.get("checkpoint_results") or []
    indices = data.get("checkpoint_report_indices") or list(range(len(results)))
    ordered_results = sorted(zip(indices, results, strict=False), key=lambda pair: pair[0])
    names = [result["checkpoint_dir_name"] for _, result in ordered_results]
    latest = (data.get("latest_checkpoint_result") or {}).get("checkpoint_dir_name")
    ordered = ([latest] if latest else []) + [n for n in reversed(names) if n != latest]
    return [storage.join(run_uri(cfg), name) for name in ordered]


def checkpoint_problems(uri: str) -> list[str]:
    """What makes the checkpoint at ``uri`` unusable (empty: it is committed and complete); reads
    its state.json and the files' sizes only."""
    from sama.train import checkpoint as ckpt

    state_uri = storage.join(uri, ckpt.STATE_FILE)
    if not storage.exists(state_uri):
        return [f"no {ckpt.STATE_FILE} (the commit marker): its save did not finish"]
    try:
        state = ckpt.TrainState.from_json(storage.read_text(state_uri))
    except (ValueError, TypeError) as exc:
        return [f"{ckpt.STATE_FILE} is unreadable ({exc})"]
    sizes = {}
    for name in state.files:
        file_uri = storage.join(uri, name)
        sizes[name] = storage.size(file_uri) if storage.exists(file_uri) else None
    return ckpt.problems(state, sizes)


def usable_checkpoint(cfg: TrainConfig) -> str | None:
    """The newest registered checkpoint that is committed and complete, or None when the run has
    none registered. A broken one is skipped with a warning naming what is wrong.

    Raises:
        CheckpointError: checkpoints are registered but none is usable.
    """
    from sama.train.checkpoint import CheckpointError

    broken = []
    for uri in registered_checkpoints(cfg):
        wrong = checkpoint_problems(uri)
        if not wrong:
            return uri
        where = storage.redact(uri)
        log.warning(
            "checkpoint %s is unusable (%s): falling back to the previous checkpoint", where, "; ".join(wrong)
        )
        broken.append(f"{storage.basename(where)}: {'; '.join(wrong)}")
    if broken:
        raise CheckpointError(f"run {cfg.run.name!r} has no usable checkpoint ({' | '.join(broken)})")
    return None


# What a resume may not change silently: what is trained, on what, and how (``--allow-config-change``
# lets it). Workers, parallelism, cadences, max_steps, tracking, inference and the run may change.
LOCKED_CONFIG = (
    "stage",
    "seed",
    "grad_accum",
    "ema_decay",
    "model.",
    "objective.",
    "optim.",
    "data.sources",
    "data.video_batch_size",
    "data.image_batch_size",
    "data.seed",
)


def _locked(key: str) -> bool:
    return any(key == p or key.startswith(p if p.endswith(".") else p + ".") for p in LOCKED_CONFIG)


def config_changes(saved: TrainConfig, new: TrainConfig) -> list[str]:
    """``key: old -> new`` for every locked key that differs (values shown only when they are
    numbers or booleans, so no URI or credential lands in a message)."""
    before, after = config_lib.flatten(saved), config_lib.flatten(new)
    changes = []
    for key in sorted(set(before) | set(after)):
        if not _locked(key):
            continue
        old, value = before.get(key), after.get(key)
        if value is None and old is not None and key.startswith("objective."):
            continue  # unresolved here (the model's parity decides it): not a change
        if old == value or (isinstance(old, list | tuple) and list(old) == list(value or [])):
            continue
        plain = all(isinstance(v, int | float | bool) for v in (old, value))
        changes.append(f"{key}: {old} -> {value}" if plain else f"{key}: changed")
    return changes


def check_config_change(cfg: TrainConfig, checkpoint: str, allow: bool) -> list[str]:
    """The locked keys a resume from ``checkpoint`` changes; :class:`ConfigChanged` unless
    ``allow``. The checkpoint's config.yaml is the resolved configuration that wrote it."""
    import yaml

    from sama.train import checkpoint as ckpt
    from sama.train.trainer import resolve_train_config

    saved_uri = storage.join(checkpoint, ckpt.CONFIG_FILE)
    if not storage.exists(saved_uri):
        return []
    saved = config_lib.from_dict(TrainConfig, yaml.safe_load(storage.read_text(saved_uri)))
    # config.yaml is saved redacted (config_lib.dumps): compare with the redacted configuration,
    # or a URI with credentials would read as changed.
    current = config_lib.to_dict(resolve_train_config(cfg, strict=False))
    changes = config_changes(saved, config_lib.from_dict(TrainConfig, redact_config(current)))
    if changes and not allow:
        raise ConfigChanged(cfg.run.name, storage.basename(checkpoint), changes)
    if changes:
        log.warning("resuming %s with a changed configuration: %s", cfg.run.name, ", ".join(changes))
    return changes


class ConfigChanged(ValueError):
    """A resume would change what the run trains (model, objective, optimizer, data, batch sizes)."""

    def __init__(self, run_name: str, checkpoint: str, changes: list[str]):
        self.keys = [c.split(":", 1)[0] for c in changes]
        super().__init__(
            f"--resume of run {run_name!r} changes its configuration since {checkpoint}: "
            f"{', '.join(changes)}. Restore those values, or pass --allow-config-change "
            "(run_training(..., allow_config_change=True)) to train on with the new ones"
        )


def train_loop(loop_config: dict[str, Any]) -> None:
    """The function every Ray Train worker runs: the trainer of this worker's rank, restored from
    the chosen checkpoint, runs :meth:`~sama.train.trainer.Trainer.train` with its checkpoints
    reported to Ray Train."""
    import ray.train

    from sama.train.trainer import Trainer

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    install_log_filter()
    cfg = config_lib.from_dict(TrainConfig, loop_config["config"])
    context = ray.train.get_context()
    trainer = Trainer(cfg, context.get_world_rank(), context.get_world_size(), context.get_local_rank())
    trainer.build()
    # The checkpoint the driver chose (usable_checkpoint), else Ray Train's latest.
    checkpoint = ray.train.get_checkpoint()
    if loop_config.get("checkpoint_uri"):
        fs, path = storage.pyarrow_filesystem(loop_config["checkpoint_uri"])
        checkpoint = ray.train.Checkpoint(path, filesystem=fs)
    if checkpoint is not None:
        with checkpoint.as_directory() as directory:
            trainer.restore(directory)

    def report(metrics: dict[str, float], directory: str) -> None:
        # Every rank reports its own directory: Ray Train merges them and registers the
        # checkpoint once all ranks have reported.
        ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(directory))

    trainer.train(
        # The store the driver chose (sama.tracking.training_store): never the worker's directory.
        tracking_uri=loop_config.get("tracking_uri"),
        resumed_from=(
            storage.join(run_uri(trainer.cfg), storage.basename(checkpoint.path))
            if checkpoint is not None
            else None
        ),
        report=report,
    )


class TrainingError(RuntimeError):
    """The training function raised an error that a restart would raise again (configuration,
    data or code): the job fails at once with the original error instead of being retried."""

    def __init__(self, run_name: str, failures: dict[int, BaseException]):
        first = failures[min(failures)]
        ranks = ", ".join(str(r) for r in sorted(failures))
        self.run_name = run_name
        self.failures = failures
        self.original = first
        self.traceback = "".join(traceback.format_exception(first)).rstrip()
        super().__init__(
            f"run {run_name!r} failed on rank(s) {ranks} with {type(first).__name__}: {first} "
            "(an error of the configuration, the data or the code: not retried, since a restart "
            "would raise it again)"
        )


class ResourcesUnavailable(RuntimeError):
    """The cluster could provide the workers but did not within scaling.resource_timeout_s."""


# Errors in a worker that mean the worker, its node or the link between workers was lost, not
# that the training function is wrong: a restart from the last checkpoint may well succeed.
_COLLECTIVE_FAILURE_MARKERS = (
    "gloo/transport",
    "Connection closed by peer",
    "Connection reset by peer",
    "NCCL communicator was aborted",
    "NCCL error",
    "ncclRemoteError",
    "ncclSystemError",
    "uncorrectable ECC error",
)


def is_worker_loss(error: BaseException) -> bool:
    """Whether one worker's failure is the loss of a worker (death, preemption, OOM kill, a failed
    collective) rather than an error of the training function."""
    import ray.exceptions

    if isinstance(
        error, ray.exceptions.RayActorError | ray.exceptions.NodeDiedError | ray.exceptions.OutOfMemoryError
    ):
        return True
    # Ray Train V2 reports a worker process that vanished as a failed health check.
    if type(error).__name__ in ("WorkerHealthCheckFailedError", "WorkerHealthCheckTimeoutError"):
        return True
    import torch.distributed

    if isinstance(error, torch.distributed.DistError):
        return True
    text = str(error)
    return isinstance(error, RuntimeError) and any(marker in text for marker in _COLLECTIVE_FAILURE_MARKERS)


def classify_failure(error: BaseException) -> str:
    """``"worker_lost"`` (restart from the last checkpoint, within run.max_failures), ``"startup"``
    (the worker group could not start), or ``"error"`` (fail now: a restart raises it again)."""
    from ray.train import ControllerError, WorkerGroupError

    if isinstance(error, WorkerGroupError):
        failures = list(error.worker_failures.values())
        # One lost worker makes the others fail too (aborted collectives): any loss is a loss.
        if failures and any(is_worker_loss(f) for f in failures):
            return "worker_lost"
        return "error" if failures else "worker_lost"
    if isinstance(error, ControllerError):
        return "startup"
    return "error"


def wait_for_workers(cfg: TrainConfig, poll_s: float = 30.0) -> None:
    """Block until the cluster can place every worker (a placement group of the workers' bundles
    is ready), at most ``scaling.resource_timeout_s``; the reservation is released before Ray Train
    makes its own. Pending autoscaler demand comes from this reservation, so nodes start early."""
    import ray
    from ray.util.placement_group import placement_group, remove_placement_group

    need = cfg.scaling.worker_resources()
    workers = cfg.scaling.num_workers
    timeout = cfg.scaling.resource_timeout_s
    group = placement_group([dict(need)] * workers, strategy="PACK")
    started = time.monotonic()
    try:
        while True:
            waited = time.monotonic() - started
            if group.wait(timeout_seconds=max(0.0, min(poll_s, timeout - waited))):
                if waited > poll_s:
                    log.info("the cluster can place the %d worker(s) after %.0f s", workers, waited)
                return
            waited = time.monotonic() - started
            available = ray.available_resources()
            if waited >= timeout:
                asked = f"{workers} worker(s) x {{{describe_resources(need)}}}"
                raise ResourcesUnavailable(
                    f"run {cfg.run.name!r}: the cluster did not provide {asked} within "
                    f"scaling.resource_timeout_s={timeout:g} s "
                    f"(available now: {describe_resources(available)}). Other jobs may hold them, or "
                    "the autoscaler cannot start the nodes (quota, instance availability): check "
                    "`ray status`, then retry, raise scaling.resource_timeout_s, or ask for fewer workers"
                )
            log.info(
                "waiting for %d worker(s) x {%s}: %.0f of %.0f s, available now {%s}",
                workers,
                describe_resources(need),
                waited,
                timeout,
                describe_resources(available),
            )
    finally:
        remove_placement_group(group)


def run_training(
    cfg: TrainConfig, resume: bool = False, *, preflight: bool = True, allow_config_change: bool = False
) -> dict[str, Any]:
    """Train one stage to completion; returns run_info (export URI, MLflow run, model version).

    Runs the preflight checks first (:mod:`sama.train.preflight`; ``PreflightError`` when one
    fails, before any worker is requested), then waits at most ``scaling.resource_timeout_s`` for
    the workers. A lost worker restarts the workers from the last checkpoint, up to
    ``run.max_failures`` times; an error the training function raises fails the run at once
    (:class:`TrainingError`). A resume that changes the model, objective, optimizer, data sources
    or batch sizes fails (preflight "run", or :class:`ConfigChanged`) unless
    ``allow_config_change``: then the new values apply, ``optim.lr`` included.
    """
    from sama import preflight as preflight_lib
    from sama.train.preflight import WHAT, run_preflight

    if preflight:
        results = run_preflight(cfg, resume, allow_config_change=allow_config_change)
        for result in results:
            if result.status == "warn":
                log.warning("preflight: %s: %s (%s)", result.name, result.found, result.fix)
        preflight_lib.require(WHAT, results)
    else:
        cfg.validate()
        if resume and (chosen := usable_checkpoint(cfg)):
            check_config_change(cfg, chosen, allow_config_change)
    tracking_uri, tracking_dir = (
        training_store(cfg.tracking, cfg.run.storage_uri) if cfg.tracking.enabled else (None, None)
    )
    cluster.connect()
    storage.makedirs(cfg.run.storage_uri)
    with contextlib.ExitStack() as stack:
        if tracking_dir is not None:
            server = stack.enter_context(LocalTrackingServer(tracking_dir, host=cluster.driver_host()))
            tracking_uri = server.uri
            log.info("tracking locally in %s, served to the workers at %s", tracking_dir, tracking_uri)
        _train_with_restarts(cfg, tracking_uri)
    info_uri = storage.join(run_uri(cfg), RUN_INFO_FILE)
    info = json.loads(storage.read_text(info_uri))
    if tracking_dir is not None and info.get("mlflow_tracking_uri"):
        # The server is gone with the job: point at the store itself.
        info["mlflow_tracking_uri"] = sqlite_uri(tracking_dir)
        storage.write_text(info_uri, json.dumps(info, indent=2) + "\n")
        log.info(
            "run %s is tracked in %s: mlflow ui --backend-store-uri %s",
            cfg.run.name,
            tracking_dir,
            info["mlflow_tracking_uri"],
        )
    return info


def _train_with_restarts(cfg: TrainConfig, tracking_uri: str | None) -> None:
    """Ray Train attempts until one completes: a lost worker restarts from the last checkpoint,
    up to run.max_failures times; anything else ends the run."""
    restarts = 0
    while True:
        # Before a restart too: a lost node may have to be replaced first.
        wait_for_workers(cfg)
        latest = usable_checkpoint(cfg)
        if latest:
            # Ray Train V2 restores a run from its storage (same name and storage path): the
            # workers' ray.train.get_checkpoint() returns the run's latest checkpoint.
            log.info("%s %s from %s", "restarting" if restarts else "resuming", cfg.run.name, latest)
        try:
            _fit(cfg, tracking_uri, latest)
            return
        except Exception as exc:
            kind = classify_failure(exc)
            if kind == "error":
                from ray.train import WorkerGroupError

                if isinstance(exc, WorkerGroupError) and exc.worker_failures:
                    raise TrainingError(cfg.run.name, dict(exc.worker_failures)) from None
                raise
            if kind == "startup":
                raise ResourcesUnavailable(
                    f"run {cfg.run.name!r}: the training workers did not start: {exc}"
                ) from exc
            restarts += 1
            if restarts > cfg.run.max_failures:
                log.error(
                    "run %s: a worker was lost %d time(s), run.max_failures=%d",
                    cfg.run.name,
                    restarts,
                    cfg.run.max_failures,
                )
                raise
            log.warning(
                "run %s: a worker was lost (%s); restart %d of run.max_failures=%d from the last checkpoint",
                cfg.run.name,
                describe_error(exc),
                restarts,
                cfg.run.max_failures,
            )


def _fit(cfg: TrainConfig, tracking_uri: str | None, checkpoint_uri: str | None = None) -> None:
    """One Ray Train attempt: restores from the run's storage when it has a checkpoint."""
    import ray.train
    from ray.train.torch import TorchConfig, TorchTrainer

    storage_fs, storage_path = storage.pyarrow_filesystem(cfg.run.storage_uri)
    if not storage.parse(cfg.run.storage_uri).is_s3:
        storage_fs = None
    trainer = TorchTrainer(
        train_loop,
        train_loop_config={
            "config": config_lib.to_dict(cfg),
            "tracking_uri": tracking_uri,
            "checkpoint_uri": checkpoint_uri,
        },
        torch_config=TorchConfig(backend="nccl" if cfg.scaling.use_gpu else "gloo"),
        scaling_config=ray.train.ScalingConfig(
            num_workers=cfg.scaling.num_workers,
            use_gpu=cfg.scaling.use_gpu,
            resources_per_worker=cfg.scaling.worker_resources(),
        ),
        run_config=ray.train.RunConfig(
            name=cfg.run.name,
            storage_path=storage_path,
            storage_filesystem=storage_fs,
            # Restarts are decided here (run_training), by what failed: Ray Train's own would
            # retry a deterministic error too. Preemptions stay Ray Train's (its own budget).
            failure_config=ray.train.FailureConfig(
                max_failures=0, controller_failure_limit=_startup_retries(cfg)
            ),
            checkpoint_config=ray.train.CheckpointConfig(num_to_keep=cfg.checkpoint.keep_last),
        ),
    )
    trainer.fit()


def _startup_retries(cfg: TrainConfig) -> int:
    """Ray Train retries a worker group whose placement waits past its start timeout (60 s) without
    limit; wait_for_workers has already waited, so allow about the same again, then fail."""
    return max(1, math.ceil(cfg.scaling.resource_timeout_s / 60.0))
