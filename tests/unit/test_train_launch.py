"""Which training failures are retried (sama.train.launch.classify_failure), without a cluster."""

from __future__ import annotations

from typing import ClassVar

import pytest
from ray.exceptions import ActorDiedError
from ray.train import ControllerError, WorkerGroupError
from ray.train.v2._internal.exceptions import WorkerHealthCheckFailedError

from sama.train.launch import TrainingError, classify_failure
from sama.train.trainer import Trainer

GLOO_PEER_GONE = RuntimeError(
    "[third_party/gloo/gloo/transport/tcp/pair.cc:553] Connection closed by peer [127.0.0.1]:44967"
)


def _group(**failures: BaseException) -> WorkerGroupError:
    return WorkerGroupError("training failed", {int(rank[1:]): error for rank, error in failures.items()})


def test_errors_of_the_training_function_are_not_retried():
    assert classify_failure(_group(r0=FileNotFoundError("no shards (*.tar) under s3://b/x"))) == "error"
    assert classify_failure(_group(r0=ValueError("bad"), r1=KeyError("k"))) == "error"
    assert classify_failure(ValueError("raised outside the workers")) == "error"
    # A RuntimeError is an error of the code unless it is a collective's failure.
    assert classify_failure(_group(r0=RuntimeError("shape mismatch: [2, 3] vs [3, 2]"))) == "error"


def test_lost_workers_are_retried():
    dead = WorkerHealthCheckFailedError("A worker health check failed.", ActorDiedError())
    # One worker died; the others' collective failed with it.
    assert classify_failure(_group(r0=GLOO_PEER_GONE, r1=dead)) == "worker_lost"
    assert classify_failure(_group(r0=GLOO_PEER_GONE)) == "worker_lost"
    assert classify_failure(_group(r0=ActorDiedError())) == "worker_lost"
    import torch.distributed

    assert (
        classify_failure(_group(r0=torch.distributed.DistBackendError("NCCL watchdog timeout")))
        == "worker_lost"
    )
    # A deterministic error on one rank next to a lost worker is still a loss: the next attempt
    # tells them apart (a real bug recurs, and is not retried then).
    assert classify_failure(_group(r0=ValueError("bad"), r1=dead)) == "worker_lost"


def test_a_controller_failure_is_a_startup_failure():
    assert classify_failure(ControllerError(RuntimeError("placement timed out"))) == "startup"


def test_training_error_keeps_the_first_failing_ranks_error_and_traceback():
    def fail():
        raise FileNotFoundError("no shards (*.tar) under s3://b/x")

    try:
        fail()
    except FileNotFoundError as exc:
        first = exc
    error = TrainingError("debug-stage0", {1: ValueError("other"), 0: first})
    assert error.original is first
    assert "failed on rank(s) 0, 1 with FileNotFoundError: no shards (*.tar) under s3://b/x" in str(error)
    assert "not retried" in str(error)
    assert "in fail" in error.traceback and error.traceback.endswith("no shards (*.tar) under s3://b/x")


# ----------------------------------------------------------------------------------------------
# Tracking cleanup never masks the run's own error


class _FailingTracker:
    """A tracker whose every call works until ``end``, which raises (a broken tracking store)."""

    tracking_uri = "http://tracking.invalid"
    created_run = False
    run_id = "run"
    ended: ClassVar[list[str]] = []

    def __init__(self, cfg, enabled, default_local_dir=None):
        pass

    def start(self, *args, **kwargs):
        return self.run_id

    def log_metrics(self, metrics, step):
        pass

    def end(self, status="FINISHED"):
        _FailingTracker.ended.append(status)
        raise ConnectionError("tracking store gone")


class _FailingTrainer(Trainer):
    """The trainer with nothing built and a first step that raises: its own loop (``train``) runs."""

    def build(self, rows=None):
        pass

    def validate(self):
        return {}

    def train_step(self, batches=None):
        raise ValueError("loss is nan at step 0")


def test_a_failing_run_reports_its_error_when_tracking_cleanup_fails_too(monkeypatch, caplog):
    import ray.train

    import sama.tracking
    import sama.train.trainer
    from sama import config as config_lib
    from sama.train import launch
    from sama.train.recipes import recipe_path

    class _Context:
        def get_world_rank(self):
            return 0

        def get_world_size(self):
            return 1

        def get_local_rank(self):
            return 0

    monkeypatch.setattr(ray.train, "get_context", lambda: _Context())
    monkeypatch.setattr(ray.train, "get_checkpoint", lambda: None)
    monkeypatch.setattr(sama.tracking, "Tracker", _FailingTracker)
    monkeypatch.setattr(sama.train.trainer, "Trainer", _FailingTrainer)
    cfg = config_lib.load(launch.TrainConfig, recipe_path("debug"))
    _FailingTracker.ended = []
    with pytest.raises(ValueError, match="loss is nan at step 0"):
        launch.train_loop({"config": config_lib.to_dict(cfg)})
    assert _FailingTracker.ended == ["FAILED"]
    assert "ending the tracked run (status FAILED) failed" in caplog.text
    assert "tracking store gone" in caplog.text
