"""Experiment tracking with MLflow, from rank 0 only.

One MLflow run per training run. Its id is stored in every checkpoint, so a resumed or restarted
run continues the same MLflow run with continuous step numbers. Params are the flattened resolved
configuration; metrics are namespaced (``train/*``, ``perf/*``, ``val/*``); sample edits are logged
as browser-playable H.264 mp4 artifacts; the exported model is logged as an MLflow pyfunc model
(code-based, nothing pickled) and registered in the model registry, tagged with its stage.

The tracking URI comes from ``tracking.uri``, else ``MLFLOW_TRACKING_URI``, else a local store: a
SQLite database ``mlflow.db`` with an ``artifacts/`` folder beside it (MLflow 3 retired the plain
file store), under the run's storage when that is local. Credentials for a remote server come
only from the environment (``MLFLOW_TRACKING_USERNAME``/``PASSWORD`` or ``..._TOKEN``).
"""

from __future__ import annotations

import contextlib
import logging
import os
import tempfile
from dataclasses import dataclass, field
from typing import Any

from sama import config as config_lib

log = logging.getLogger(__name__)

# MLflow caps a param value at 6000 characters and a log_batch call at 100 params.
_MAX_PARAM_CHARS = 6000
_PARAM_BATCH = 100


@dataclass
class TrackingConfig:
    """Where and how runs are tracked."""

    enabled: bool = True
    # An MLflow tracking URI; "local": a store in ``local_dir`` on the driver's machine, served to
    # the workers by an MLflow server the driver runs; None: MLFLOW_TRACKING_URI, else (training
    # with local run storage only) a store beside the runs.
    uri: str | None = None
    # The directory of tracking.uri = "local" (relative to the driver's working directory).
    local_dir: str = "mlruns"
    experiment: str = "sama"
    # Register the exported model under this name (None: do not register).
    registered_model: str | None = None
    # The model registry; None: MLFLOW_REGISTRY_URI, else the tracking store.
    registry_uri: str | None = None
    system_metrics: bool = True
    tags: dict[str, str] = field(default_factory=dict)


LOCAL = "local"


class TrackingNotConfigured(config_lib.ConfigError):
    """A run on object storage with no tracking store that outlives the job."""


def training_store(cfg: TrackingConfig, run_storage_uri: str) -> tuple[str | None, str | None]:
    """Where a training run is tracked, decided on the driver: ``(tracking URI, local directory)``.

    The URI is ``tracking.uri``, else ``MLFLOW_TRACKING_URI``, else, with local run storage, a
    SQLite store beside the runs (``{run storage}/mlruns``). ``tracking.uri = "local"`` gives
    ``(None, directory)``: the driver serves that directory (:class:`LocalTrackingServer`). A
    store is never a worker's working directory (Ray's temporary session directory, gone with
    the session), so run storage on object storage with nothing configured is an error.
    """
    from sama import storage

    if cfg.uri == LOCAL:
        return None, local_store_dir(cfg)
    if cfg.uri:
        return cfg.uri, None
    if os.environ.get("MLFLOW_TRACKING_URI"):
        return os.environ["MLFLOW_TRACKING_URI"], None
    local_runs = storage.local_path(run_storage_uri)
    if local_runs is None:
        raise TrackingNotConfigured(
            f"run.storage_uri is {storage.redact(run_storage_uri)} but no MLflow tracking store is "
            "configured: the run's metrics and model would land in a temporary directory of the Ray session. "
            "Set tracking.uri (or MLFLOW_TRACKING_URI) to your MLflow server, or tracking.uri=local "
            f"to keep a store in tracking.local_dir ({cfg.local_dir}) on the driver's machine"
        )
    return sqlite_uri(os.path.join(os.path.abspath(local_runs), "mlruns")), None


def local_store_dir(cfg: TrackingConfig) -> str:
    """The absolute directory of ``tracking.uri = "local"``."""
    return os.path.abspath(os.path.expanduser(cfg.local_dir))


def sqlite_uri(directory: str) -> str:
    """The tracking URI of a local store: ``mlflow.db`` in ``directory`` (artifacts beside it)."""
    return f"sqlite:///{os.path.join(directory, 'mlflow.db')}"


class LocalTrackingServer:
    """An MLflow tracking server over a local directory (``mlflow.db`` and ``artifacts/``), run by
    the driver for the length of a job so that workers on any node track into the driver's disk.

    It listens on loopback when Ray is local, else on the driver node's address (inside the
    cluster's network, like Ray's own ports).
    """

    def __init__(self, directory: str, host: str = "127.0.0.1", start_timeout_s: float = 120.0):
        self.directory = directory
        self.host = host
        self.start_timeout_s = start_timeout_s
        self.uri: str | None = None
        self._process = None
        self._log = None

    def __enter__(self) -> LocalTrackingServer:
        import socket
        import subprocess
        import sys
        import time
        import urllib.request

        os.makedirs(self.directory, exist_ok=True)
        with socket.socket() as sock:
            sock.bind((self.host, 0))
            port = sock.getsockname()[1]
        command = [
            sys.executable,
            "-m",
            "mlflow",
            "server",
            "--backend-store-uri",
            sqlite_uri(self.directory),
            "--artifacts-destination",
            os.path.join(self.directory, "artifacts"),
            "--host",
            self.host,
            "--port",
            str(port),
            "--workers",
            "1",
        ]
        self._log = open(os.path.join(self.directory, "server.log"), "ab")  # lives with the server
        # Its store is the one named above, whatever the environment says.
        env = {k: v for k, v in os.environ.items() if k not in ("MLFLOW_TRACKING_URI", "MLFLOW_REGISTRY_URI")}
        self._process = subprocess.Popen(
            command, env=env, stdout=self._log, stderr=subprocess.STDOUT, start_new_session=True
        )
        uri = f"http://{self.host}:{port}"
        deadline = time.monotonic() + self.start_timeout_s
        while True:
            try:
                with urllib.request.urlopen(f"{uri}/health", timeout=2) as response:
                    if response.status == 200:
                        break
            except OSError:
                pass
            if self._process.poll() is not None or time.monotonic() > deadline:
                self.__exit__(None, None, None)
                raise RuntimeError(
                    f"the local MLflow server over {self.directory} did not start (its log: "
                    f"{os.path.join(self.directory, 'server.log')})"
                )
            time.sleep(0.5)
        self.uri = uri
        return self

    def __exit__(self, *exc_info) -> None:
        """Stop the server and every process it started (uvicorn workers, its job runner)."""
        import signal
        import time

        import psutil

        if self._process is not None:
            members = []
            with contextlib.suppress(psutil.Error):
                parent = psutil.Process(self._process.pid)
                members = [parent, *parent.children(recursive=True)]
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self._process.pid, signal.SIGTERM)
            deadline = time.monotonic() + 20
            while time.monotonic() < deadline and any(_running(p) for p in members):
                time.sleep(0.2)
            for process in members:
                if _running(process):
                    with contextlib.suppress(psutil.Error):
                        process.kill()
            self._process.wait()
        if self._log is not None:
            self._log.close()
        self._process = self._log = None


def _running(process) -> bool:
    """Running and not a zombie (an exited process nobody has reaped yet counts as gone)."""
    import psutil

    try:
        return process.is_running() and process.status() != psutil.STATUS_ZOMBIE
    except psutil.Error:
        return False


def resolve_tracking_uri(cfg: TrackingConfig, default_local_dir: str | None) -> str:
    if cfg.uri == LOCAL:
        return sqlite_uri(local_store_dir(cfg))
    if cfg.uri:
        return cfg.uri
    if os.environ.get("MLFLOW_TRACKING_URI"):
        return os.environ["MLFLOW_TRACKING_URI"]
    directory = os.path.abspath(default_local_dir or "mlruns")
    os.makedirs(directory, exist_ok=True)
    return sqlite_uri(directory)


def resolve_registry_uri(cfg: TrackingConfig, tracking_uri: str) -> str:
    return cfg.registry_uri or os.environ.get("MLFLOW_REGISTRY_URI") or tracking_uri


def local_artifact_root(tracking_uri: str) -> str | None:
    """Where a local SQLite store keeps artifacts (beside the database), else None."""
    if tracking_uri.startswith("sqlite:///"):
        return "file://" + os.path.join(os.path.dirname(tracking_uri[len("sqlite:///") :]), "artifacts")
    return None


class Tracker:
    """A thin, rank-0-only wrapper around one MLflow run. Every method is a no-op when disabled."""

    def __init__(self, cfg: TrackingConfig, enabled: bool, default_local_dir: str | None = None):
        self.cfg = cfg
        self.enabled = enabled and cfg.enabled
        self.run_id: str | None = None
        self.tracking_uri = resolve_tracking_uri(cfg, default_local_dir) if self.enabled else None
        self.registry_uri = resolve_registry_uri(cfg, self.tracking_uri) if self.enabled else None
        self._client = None
        self.created_run = False

    @property
    def client(self):
        if self._client is None:
            from mlflow.tracking import MlflowClient

            # Both URIs explicit: a client left to resolve them reads MLflow's process-global state.
            self._client = MlflowClient(tracking_uri=self.tracking_uri, registry_uri=self.registry_uri)
        return self._client

    def start(
        self,
        run_name: str,
        run_id: str | None = None,
        tags: dict[str, str] | None = None,
        resumed_from: str | None = None,
    ) -> str | None:
        """Start a new run, or continue ``run_id`` (after a resume or restart).

        A ``run_id`` this store does not have (another store, a deleted run) starts a new run
        instead, tagged ``sama.previous_mlflow_run`` and ``sama.resumed_from`` (``resumed_from``:
        the checkpoint), with a warning: tracking never stops a run from resuming.
        ``self.created_run`` says whether a new run was created.
        """
        self.created_run = False
        if not self.enabled:
            return None
        # Only this tracker's client is used: no process-global MLflow state is touched.
        experiment = self.client.get_experiment_by_name(self.cfg.experiment)
        if experiment is None:
            # Another process may create it first: then the lookup below finds theirs.
            with contextlib.suppress(Exception):
                self.client.create_experiment(
                    self.cfg.experiment, artifact_location=local_artifact_root(self.tracking_uri)
                )
            experiment = self.client.get_experiment_by_name(self.cfg.experiment)
        all_tags = {**self.cfg.tags, **(tags or {})}
        if run_id and not self._has_active_run(run_id):
            log.warning(
                "MLflow run %s is not in the store %s (another store, or deleted): continuing the "
                "resumed training in a new MLflow run, tagged with the previous run's id",
                run_id,
                self.tracking_uri,
            )
            all_tags["sama.previous_mlflow_run"] = run_id
            if resumed_from:
                all_tags["sama.resumed_from"] = resumed_from
            run_id = None
        if run_id:
            self.run_id = run_id
            self.client.update_run(run_id, status="RUNNING")
        else:
            run = self.client.create_run(experiment.experiment_id, run_name=run_name, tags=all_tags)
            self.run_id = run.info.run_id
            self.created_run = True
        if self.cfg.system_metrics:
            self._start_system_metrics()
        log.info(
            "tracking to %s (experiment %s, run %s)", self.tracking_uri, self.cfg.experiment, self.run_id
        )
        return self.run_id

    def _has_active_run(self, run_id: str) -> bool:
        from mlflow.exceptions import MlflowException
        from mlflow.protos.databricks_pb2 import RESOURCE_DOES_NOT_EXIST, ErrorCode

        try:
            run = self.client.get_run(run_id)
        except MlflowException as exc:
            if exc.error_code == ErrorCode.Name(RESOURCE_DOES_NOT_EXIST):
                return False
            raise
        return run.info.lifecycle_stage != "deleted"

    def _start_system_metrics(self) -> None:
        try:
            from mlflow.system_metrics.system_metrics_monitor import SystemMetricsMonitor

            self._monitor = SystemMetricsMonitor(
                self.run_id, resume_logging=True, tracking_uri=self.tracking_uri
            )
            self._monitor.start()
        except Exception as exc:  # psutil missing or the monitor's API moved: training goes on
            log.warning("system metrics are not logged: %s", exc)
            self._monitor = None

    def log_params(self, params: dict[str, Any]) -> None:
        """Log the flattened configuration (values stringified and capped as MLflow requires)."""
        if not self.enabled:
            return
        from mlflow.entities import Param

        existing = set(self.client.get_run(self.run_id).data.params)
        items = [
            Param(key, str(value)[:_MAX_PARAM_CHARS])
            for key, value in config_lib.flatten(params).items()
            if key not in existing  # a resumed run keeps its params (MLflow forbids changing them)
        ]
        for start in range(0, len(items), _PARAM_BATCH):
            self.client.log_batch(self.run_id, params=items[start : start + _PARAM_BATCH])

    def log_metrics(self, metrics: dict[str, float], step: int) -> None:
        if not self.enabled or not metrics:
            return
        import time

        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        batch = [Metric(key, float(value), now, step) for key, value in metrics.items()]
        self.client.log_batch(self.run_id, metrics=batch)

    @contextlib.contextmanager
    def _global_uri(self):
        """Point MLflow's process-global tracking and registry URIs at this tracker's stores for a
        block, then put back exactly what was there (explicit settings and environment variables),
        so that no other client in the process resolves to this tracker's stores afterwards.
        MLflow's fluent API (log_model) and its proxied ``mlflow-artifacts:`` locations resolve the
        server from the global URIs, not the client's."""
        import mlflow
        from mlflow.tracking._model_registry import utils as registry_utils

        saved_tracking = mlflow.get_tracking_uri() if mlflow.is_tracking_uri_set() else None
        # MLflow has no public "is the registry URI set" query; None when it moved.
        saved_registry = getattr(registry_utils, "_registry_uri", None)
        saved_env = {key: os.environ.get(key) for key in ("MLFLOW_TRACKING_URI", "MLFLOW_REGISTRY_URI")}
        mlflow.set_tracking_uri(self.tracking_uri)
        mlflow.set_registry_uri(self.registry_uri)
        try:
            yield
        finally:
            mlflow.set_tracking_uri(saved_tracking)
            if hasattr(registry_utils, "_registry_uri"):
                registry_utils._registry_uri = saved_registry
            for key, value in saved_env.items():
                if value is None:
                    os.environ.pop(key, None)
                else:
                    os.environ[key] = value

    def log_text(self, text: str, artifact_file: str) -> None:
        if self.enabled:
            with self._global_uri():
                self.client.log_text(self.run_id, text, artifact_file)

    def log_artifact(self, local_path: str, artifact_path: str | None = None) -> None:
        if self.enabled:
            with self._global_uri():
                self.client.log_artifact(self.run_id, local_path, artifact_path)

    def log_video(self, data: bytes, artifact_file: str) -> None:
        """Log mp4 bytes as an artifact (the MLflow UI plays H.264 mp4 in the browser)."""
        if not self.enabled:
            return
        with tempfile.TemporaryDirectory() as tmp:
            path = os.path.join(tmp, os.path.basename(artifact_file))
            with open(path, "wb") as handle:
                handle.write(data)
            self.log_artifact(path, os.path.dirname(artifact_file) or None)

    def log_model(self, export_dir: str, stage: int, registered_model: str | None = None) -> dict[str, Any]:
        """Log the exported pipeline as an MLflow pyfunc model; register it when a name is set."""
        if not self.enabled:
            return {}
        import mlflow

        from sama import mlflow_model

        name = registered_model or self.cfg.registered_model
        with self._global_uri(), mlflow.start_run(run_id=self.run_id, log_system_metrics=False):
            info = mlflow.pyfunc.log_model(
                name="model",
                python_model=mlflow_model.__file__,
                artifacts={"pipeline": export_dir},
                pip_requirements=["sama[train]"],
                registered_model_name=name,
                metadata={"sama_stage": stage},
            )
        result: dict[str, Any] = {"model_uri": info.model_uri}
        if name:
            version = info.registered_model_version
            self.client.set_model_version_tag(name, str(version), "stage", f"stage{stage}")
            self.client.set_registered_model_tag(name, "task", "instruction-guided video editing")
            result.update({"registered_model": name, "version": version})
            log.info("registered %s version %s (stage %d)", name, version, stage)
        return result

    def end(self, status: str = "FINISHED") -> None:
        if not self.enabled or self.run_id is None:
            return
        monitor = getattr(self, "_monitor", None)
        if monitor is not None:
            monitor.finish()
        self.client.set_terminated(self.run_id, status=status)
