"""Launching a training stage on Ray Train (local Ray, or a cluster via RAY_ADDRESS).

The driver resolves the run's storage, refuses to overwrite an existing run unless asked to
resume it, builds a ``TorchTrainer`` whose workers run :func:`train_loop`, and reads back the run's
summary (``run_info.json``) written by rank 0: the MLflow run, the export and the registered model.

Checkpoints go to ``{run.storage_uri}/{run.name}/checkpoint_*`` through ``ray.train.report`` (Ray
keeps the last ``checkpoint.keep_last``); the EMA export to ``{run.storage_uri}/{run.name}/export``.
A worker failure restarts the workers from the last checkpoint within the same job (up to
``run.max_failures`` times); ``--resume`` continues a stopped run from its last checkpoint, in the
same MLflow run, with continuous step numbers.
"""

from __future__ import annotations

import json
import logging
import os
import tempfile
from typing import Any

from sama import cluster, storage
from sama import config as config_lib
from sama.train.trainer import TrainConfig

log = logging.getLogger(__name__)

RUN_INFO_FILE = "run_info.json"
EXPORT_DIR = "export"
SNAPSHOT_FILE = "checkpoint_manager_snapshot.json"


def run_uri(cfg: TrainConfig) -> str:
    return storage.join(cfg.run.storage_uri, cfg.run.name)


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


def train_loop(loop_config: dict[str, Any]) -> None:
    """The function every Ray Train worker runs."""
    import ray.train

    from sama.tracking import Tracker
    from sama.train.trainer import Trainer, steps_due

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    cfg = config_lib.from_dict(TrainConfig, loop_config["config"])
    context = ray.train.get_context()
    rank, world = context.get_world_rank(), context.get_world_size()
    trainer = Trainer(cfg, rank, world, context.get_local_rank())
    trainer.build()
    checkpoint = ray.train.get_checkpoint()
    if checkpoint is not None:
        with checkpoint.as_directory() as directory:
            trainer.restore(directory)

    tracker = Tracker(cfg.tracking, enabled=rank == 0, default_local_dir=loop_config.get("mlflow_dir"))
    resumed = trainer.step > 0
    trainer.mlflow_run_id = tracker.start(
        cfg.run.name, run_id=trainer.mlflow_run_id, tags={"stage": str(cfg.stage), "sama.run": cfg.run.name}
    )
    if not resumed:
        tracker.log_params(config_lib.to_dict(cfg))
        tracker.log_text(config_lib.dumps(cfg), "config.yaml")
        tracker.log_metrics(trainer.validate(), step=0)

    window: list[dict[str, float]] = []
    status = "FAILED"
    try:
        while trainer.step < cfg.max_steps:
            metrics = trainer.train_step()
            window.append(metrics)
            step = trainer.step
            reported: dict[str, float] = {"step": step, "train/loss": metrics["train/loss"]}
            if steps_due(step, cfg.log_every, cfg.max_steps):
                averaged = {k: sum(m[k] for m in window) / len(window) for k in window[-1]}
                window = []
                tracker.log_metrics(averaged, step)
                if rank == 0:
                    log.info(
                        "step %d/%d loss %.4f (fm %.4f) lr %.2e %.2f samples/s data wait %.1f%%",
                        step,
                        cfg.max_steps,
                        averaged["train/loss"],
                        averaged["train/loss_fm"],
                        averaged["train/lr"],
                        averaged["perf/samples_per_s"],
                        100 * averaged["perf/data_wait_frac"],
                    )
            if steps_due(step, cfg.validation.every_steps, cfg.max_steps):
                val = trainer.validate()
                reported.update(val)
                tracker.log_metrics(val, step)
                for key, data in trainer.render_edits():
                    tracker.log_video(data, f"samples/step_{step:07d}/{key}.mp4")
            if steps_due(step, cfg.checkpoint.every_steps, cfg.max_steps):
                with tempfile.TemporaryDirectory() as directory:
                    trainer.save_checkpoint(directory)
                    ckpt = ray.train.Checkpoint.from_directory(directory) if rank == 0 else None
                    ray.train.report(reported, checkpoint=ckpt)
        with tempfile.TemporaryDirectory() as export_dir:
            trainer.export(export_dir)
            if rank == 0:
                _publish(cfg, trainer, tracker, export_dir, loop_config)
        status = "FINISHED"
    finally:
        tracker.end(status)


def _publish(cfg: TrainConfig, trainer, tracker, export_dir: str, loop_config: dict[str, Any]) -> None:
    """Rank 0: upload the export, log and register it, and write run_info.json."""
    export_uri = storage.join(run_uri(cfg), EXPORT_DIR)
    storage.delete(export_uri, recursive=True)
    storage.upload_dir(export_dir, export_uri)
    model = tracker.log_model(export_dir, cfg.stage)
    info = {
        "run_name": cfg.run.name,
        "stage": cfg.stage,
        "steps": trainer.step,
        "samples_seen": trainer.samples_seen,
        "export_uri": export_uri,
        "mlflow_tracking_uri": tracker.tracking_uri,
        "mlflow_experiment": cfg.tracking.experiment,
        "mlflow_run_id": tracker.run_id,
        **{f"mlflow_{k}": v for k, v in model.items()},
    }
    storage.write_text(storage.join(run_uri(cfg), RUN_INFO_FILE), json.dumps(info, indent=2) + "\n")


class RunExistsError(RuntimeError):
    """A run of that name already has checkpoints and --resume was not given."""


def run_training(cfg: TrainConfig, resume: bool = False) -> dict[str, Any]:
    """Train one stage to completion; returns run_info (export URI, MLflow run, model version)."""
    import ray
    import ray.train
    from ray.train.torch import TorchConfig, TorchTrainer

    cfg.validate()
    latest = latest_checkpoint(cfg)
    if latest and not resume:
        raise RunExistsError(
            f"run {cfg.run.name!r} already has checkpoints in {run_uri(cfg)} "
            f"(latest {storage.basename(latest)}): pass --resume to continue it, "
            "or set run.name to start a new run"
        )
    if resume and not latest:
        raise RunExistsError(f"--resume: run {cfg.run.name!r} has no checkpoint in {run_uri(cfg)}")

    cluster.connect()
    storage_fs, storage_path = storage.pyarrow_filesystem(cfg.run.storage_uri)
    if not storage.parse(cfg.run.storage_uri).is_s3:
        storage.makedirs(cfg.run.storage_uri)
        storage_fs = None
    resources: dict[str, float] = {"CPU": cfg.scaling.cpus_per_worker}
    if cfg.scaling.use_gpu:
        resources["GPU"] = 1
    mlflow_dir = None
    if not storage.parse(cfg.run.storage_uri).is_s3:
        # The embedded default: a local MLflow store beside the runs, shared by every stage.
        mlflow_dir = os.path.join(storage.parse(cfg.run.storage_uri).path, "mlruns")
    if latest:
        # Ray Train V2 restores a run from its storage (same name and storage path): the workers'
        # ray.train.get_checkpoint() returns the run's latest checkpoint.
        log.info("resuming %s from %s", cfg.run.name, latest)
    trainer = TorchTrainer(
        train_loop,
        train_loop_config={"config": config_lib.to_dict(cfg), "mlflow_dir": mlflow_dir},
        torch_config=TorchConfig(backend="nccl" if cfg.scaling.use_gpu else "gloo"),
        scaling_config=ray.train.ScalingConfig(
            num_workers=cfg.scaling.num_workers, use_gpu=cfg.scaling.use_gpu, resources_per_worker=resources
        ),
        run_config=ray.train.RunConfig(
            name=cfg.run.name,
            storage_path=storage_path,
            storage_filesystem=storage_fs,
            failure_config=ray.train.FailureConfig(max_failures=cfg.run.max_failures),
            checkpoint_config=ray.train.CheckpointConfig(num_to_keep=cfg.checkpoint.keep_last),
        ),
    )
    trainer.fit()
    info_uri = storage.join(run_uri(cfg), RUN_INFO_FILE)
    return json.loads(storage.read_text(info_uri))
