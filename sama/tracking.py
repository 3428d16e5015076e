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

Tracking never stops training. MLflow's HTTP calls get bounded timeouts and retries
(:data:`HTTP_DEFAULTS`, unless the environment sets them). Every write (metrics, params, tags,
artifacts, the final status) returns at once: a daemon thread sends the writes in order and, while
the store is unreachable, holds them in a bounded queue (the oldest dropped, and counted, past
:data:`QUEUE_LIMIT` calls or :data:`QUEUE_BYTES`) and retries, with one warning when an outage
starts and one when it ends. ``end`` flushes with a bounded wait and never raises.
"""

from __future__ import annotations

import collections
import contextlib
import logging
import os
import shutil
import tempfile
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from sama import config as config_lib
from sama.redaction import environ_snapshot, redact_config

log = logging.getLogger(__name__)

# MLflow caps a param value at 6000 characters and a log_batch call at 100 params.
_MAX_PARAM_CHARS = 6000
_PARAM_BATCH = 100

# MLflow's own defaults wait 120 s a request and retry 7 times with backoff (minutes per call).
HTTP_DEFAULTS = {
    "MLFLOW_HTTP_REQUEST_TIMEOUT": "10",
    "MLFLOW_HTTP_REQUEST_MAX_RETRIES": "2",
    "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR": "1",
}
# Uploading the exported model (gigabytes) may keep the server busy past a metric's timeout:
# MLflow's own default for it (a request that hangs costs this, times 1 + the retries).
MODEL_UPLOAD_TIMEOUT_S = 120
# Writes held while the store is unreachable: calls, and bytes of artifacts among them.
QUEUE_LIMIT = 10_000
QUEUE_BYTES = 256 * 2**20
# How often a held write is retried during an outage (seconds, doubling up to the maximum).
RETRY_MIN_S = 1.0
RETRY_MAX_S = 30.0
# A call the store answers but refuses (a bad request) is tried this many times, then dropped.
REFUSED_ATTEMPTS = 3
# MLflow's global tracking URI is process state: one tracker at a time points it anywhere.
_GLOBAL_URI_LOCK = threading.RLock()


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
    # Seconds between system-metric samples (MLflow's monitor; each sample is logged).
    system_metrics_interval_s: float = 10.0
    tags: dict[str, str] = field(default_factory=dict)
    # At the end of a run, how long to wait for writes held during an outage (then they are lost).
    flush_timeout_s: float = 60.0


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

    def __init__(
        self,
        directory: str,
        host: str = "127.0.0.1",
        start_timeout_s: float = 120.0,
        port: int | None = None,
    ):
        self.directory = directory
        self.host = host
        self.port = port  # None: a free port, chosen at start
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
        port = self.port
        if port is None:
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
        env = environ_snapshot()
        for key in ("MLFLOW_TRACKING_URI", "MLFLOW_REGISTRY_URI"):
            env.pop(key, None)
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
        self.port = port  # a restart (same directory and port) serves the same URI
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


def unreachable(exc: BaseException) -> bool:
    """Whether an MLflow call failed because the store could not be reached (a connection error,
    a timeout, a 5xx after retries), rather than because the store refused the call."""
    from mlflow.exceptions import MlflowException

    if not isinstance(exc, MlflowException):
        return True
    return exc.error_code in ("INTERNAL_ERROR", "TEMPORARILY_UNAVAILABLE", "REQUEST_LIMIT_EXCEEDED")


@dataclass
class _Write:
    name: str
    send: Callable[[], None]
    size: int = 0  # bytes held (artifacts)
    cleanup: Callable[[], None] | None = None
    attempts: int = 0


class _Sender:
    """A tracker's writes, sent in order from a daemon thread.

    While the store is unreachable (``probe`` fails too) the writes wait in a bounded queue and are
    retried with backoff; past the bounds the oldest are dropped and counted. One warning marks
    the start of an outage, one its end. A write the store refuses while it answers probes is
    retried :data:`REFUSED_ATTEMPTS` times, then dropped with a warning.
    """

    def __init__(
        self, store: str, probe: Callable[[], None], limit: int = QUEUE_LIMIT, max_bytes: int = QUEUE_BYTES
    ):
        self.store = store
        self.probe = probe
        self.limit = limit
        self.max_bytes = max_bytes
        self.dropped = 0
        self.outage_since: float | None = None
        self._items: collections.deque[_Write] = collections.deque()
        self._bytes = 0
        self._sending: _Write | None = None
        self._cond = threading.Condition()
        self._kick = False
        self._closed = False
        self._thread: threading.Thread | None = None
        self._dropped_reported = 0

    def put(self, write: _Write) -> None:
        with self._cond:
            if self._closed:
                log.warning("tracking: %s after the run ended is not sent", write.name)
                self._discard(write)
                return
            self._items.append(write)
            self._bytes += write.size
            self._trim()
            if self._thread is None:
                _quiet_retries()
                self._thread = threading.Thread(target=self._run, name=_THREAD_NAME, daemon=True)
                self._thread.start()
            self._cond.notify_all()

    def pending(self) -> int:
        with self._cond:
            return len(self._items) + (self._sending is not None)

    def flush(self, timeout_s: float) -> bool:
        """Wait up to ``timeout_s`` for every write so far to be sent (retrying a held one now)."""
        deadline = time.monotonic() + max(0.0, timeout_s)
        with self._cond:
            self._kick = True
            self._cond.notify_all()
            while self._items or self._sending is not None:
                left = deadline - time.monotonic()
                if left <= 0 or self._thread is None or not self._thread.is_alive():
                    return False
                self._cond.wait(min(left, 0.5))
            return True

    def close(self, timeout_s: float) -> int:
        """Flush with a bounded wait, stop the thread; the number of writes never sent."""
        self.flush(timeout_s)
        with self._cond:
            self._closed = True
            self._cond.notify_all()
            lost = list(self._items)
            held = len(lost) + (self._sending is not None)
            self._items.clear()
            self._bytes = 0
        for write in lost:
            self._discard(write)
        unsent = held + self.dropped
        if unsent:
            log.warning(
                "tracking: %d write(s) to %s were never sent (%d dropped from the full queue, %d still "
                "held when the run ended)",
                unsent,
                self.store,
                self.dropped,
                held,
            )
        return unsent

    # -- the thread ---------------------------------------------------------------------------

    def _trim(self) -> None:
        """Drop the oldest held writes past the bounds (with the lock held)."""
        while len(self._items) > 1 and (len(self._items) > self.limit or self._bytes > self.max_bytes):
            oldest = self._items.popleft()
            self._bytes -= oldest.size
            self._discard(oldest)
            if self.dropped == 0 or self.dropped - self._dropped_reported >= 1000:
                log.warning(
                    "tracking: the queue of writes held for %s is full (%d calls, %d MiB): dropping "
                    "the oldest (%d so far)",
                    self.store,
                    self.limit,
                    self.max_bytes // 2**20,
                    self.dropped + 1,
                )
                self._dropped_reported = self.dropped + 1
            self.dropped += 1

    @staticmethod
    def _discard(write: _Write) -> None:
        if write.cleanup is not None:
            with contextlib.suppress(Exception):
                write.cleanup()

    def _run(self) -> None:
        delay = RETRY_MIN_S
        while True:
            with self._cond:
                while not self._items and not self._closed:
                    self._cond.wait()
                if not self._items:
                    return
                write = self._items.popleft()
                self._bytes -= write.size
                self._sending = write
            done = self._attempt(write)
            with self._cond:
                self._sending = None
                if done:
                    self._discard(write)
                    delay = RETRY_MIN_S
                elif self._closed:  # the run ended while this write was being tried: lost
                    self._discard(write)
                    self._cond.notify_all()
                    return
                else:
                    self._items.appendleft(write)
                    self._bytes += write.size
                    self._trim()
                    # Wait before the retry, unless a flush asks for it now.
                    self._cond.wait_for(lambda: self._kick or self._closed, timeout=delay)
                    self._kick = False
                    delay = min(RETRY_MAX_S, delay * 2)
                self._cond.notify_all()

    def _attempt(self, write: _Write) -> bool:
        """Send one write: True when done with it (sent, or dropped as refused)."""
        try:
            write.send()
        except Exception as exc:
            if unreachable(exc) and not self._answers():
                if self.outage_since is None:
                    self.outage_since = time.monotonic()
                    log.warning(
                        "tracking store %s is unreachable (%s: %s): holding metrics and artifacts and "
                        "retrying in the background; training continues",
                        self.store,
                        type(exc).__name__,
                        _first_line(exc),
                    )
                return False
            self._recovered()
            write.attempts += 1
            if write.attempts < REFUSED_ATTEMPTS:
                return False
            log.warning("tracking: %s was refused by %s and is dropped: %s", write.name, self.store, exc)
            return True
        self._recovered()
        return True

    def _answers(self) -> bool:
        try:
            self.probe()
        except Exception as exc:
            return not unreachable(exc)
        return True

    def _recovered(self) -> None:
        if self.outage_since is not None:
            log.warning(
                "tracking store %s is reachable again after %.0f s: sending the %d held write(s)%s",
                self.store,
                time.monotonic() - self.outage_since,
                len(self._items) + 1,
                f" ({self.dropped} dropped from the full queue)" if self.dropped else "",
            )
            self.outage_since = None


_THREAD_NAME = "sama-tracking"


class _QuietRetries(logging.Filter):
    """urllib3 logs every retry of every request; the tracking thread's retries are summed up by
    its two outage warnings instead."""

    def filter(self, record: logging.LogRecord) -> bool:
        return threading.current_thread().name != _THREAD_NAME


def _quiet_retries() -> None:
    logger = logging.getLogger("urllib3.connectionpool")
    if not any(isinstance(f, _QuietRetries) for f in logger.filters):
        logger.addFilter(_QuietRetries())


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0][:300] if text else ""


class Tracker:
    """A thin, rank-0-only wrapper around one MLflow run. Every method is a no-op when disabled.

    ``start`` and ``log_model`` talk to the store directly; every other write is queued and sent
    from a background thread (see the module docstring): call :meth:`flush` to wait for them.
    """

    def __init__(self, cfg: TrackingConfig, enabled: bool, default_local_dir: str | None = None):
        self.cfg = cfg
        self.enabled = enabled and cfg.enabled
        self.run_id: str | None = None
        self.tracking_uri = resolve_tracking_uri(cfg, default_local_dir) if self.enabled else None
        self.registry_uri = resolve_registry_uri(cfg, self.tracking_uri) if self.enabled else None
        self._client = None
        self.created_run = False
        self._sender: _Sender | None = None
        self._spool: str | None = None
        if self.enabled:
            for key, value in HTTP_DEFAULTS.items():
                os.environ.setdefault(key, value)

    @property
    def client(self):
        if self._client is None:
            from mlflow.tracking import MlflowClient

            # Both URIs explicit: a client left to resolve them reads MLflow's process-global state.
            self._client = MlflowClient(tracking_uri=self.tracking_uri, registry_uri=self.registry_uri)
        return self._client

    @property
    def sender(self) -> _Sender:
        if self._sender is None:
            client = self.client  # made here, not first in the sender's thread
            self._sender = _Sender(
                self.tracking_uri,
                lambda: (
                    client.get_run(self.run_id) if self.run_id else client.search_experiments(max_results=1)
                ),
            )
        return self._sender

    def _queue(self, name: str, send: Callable[[], None], size: int = 0, cleanup=None) -> None:
        self.sender.put(_Write(name, send, size, cleanup))

    def flush(self, timeout_s: float | None = None) -> bool:
        """Wait (at most ``timeout_s``, default ``tracking.flush_timeout_s``) for the queued writes
        to reach the store; whether they all did. Never raises."""
        if self._sender is None:
            return True
        return self._sender.flush(self.cfg.flush_timeout_s if timeout_s is None else timeout_s)

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
        ``self.created_run`` says whether a new run was created. A new run needs the store (a
        call bounded by :data:`HTTP_DEFAULTS` raises when it is unreachable); continuing
        ``run_id`` does not: its writes are held until the store is back.
        """
        self.created_run = False
        if not self.enabled:
            return None
        try:
            return self._start(run_name, run_id, tags, resumed_from)
        except Exception as exc:
            if not (run_id and unreachable(exc)):
                raise
            log.warning(
                "tracking store %s is unreachable at start (%s): continuing MLflow run %s, its writes "
                "held until the store is back",
                self.tracking_uri,
                _first_line(exc),
                run_id,
            )
            self.run_id = run_id
            client = self.client
            self._queue("run status", lambda: client.update_run(run_id, status="RUNNING"))
            return run_id

    def _start(self, run_name, run_id, tags, resumed_from) -> str:
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
            # Tags, like params, are readable by every user of the server.
            run = self.client.create_run(
                experiment.experiment_id, run_name=run_name, tags=redact_config(all_tags)
            )
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
                self.run_id,
                sampling_interval=self.cfg.system_metrics_interval_s,
                resume_logging=True,
                tracking_uri=self.tracking_uri,
            )
            self._monitor.start()
        except Exception as exc:  # psutil missing or the monitor's API moved: training goes on
            log.warning("system metrics are not logged: %s", exc)
            self._monitor = None

    def log_params(self, params: dict[str, Any]) -> None:
        """Log the flattened configuration, credentials redacted (:func:`sama.redaction.redact_config`),
        values stringified and capped as MLflow requires."""
        if not self.enabled:
            return
        from mlflow.entities import Param

        client, run_id = self.client, self.run_id
        # Params are readable by every user of the tracking server: credentials never reach them.
        flat = {
            key: str(value)[:_MAX_PARAM_CHARS]
            for key, value in config_lib.flatten(redact_config(params)).items()
        }

        def send() -> None:
            # Read when sent: a resumed run keeps its params (MLflow forbids changing them), and a
            # retry after a partial send skips what arrived.
            existing = set(client.get_run(run_id).data.params)
            items = [Param(key, value) for key, value in flat.items() if key not in existing]
            for start in range(0, len(items), _PARAM_BATCH):
                client.log_batch(run_id, params=items[start : start + _PARAM_BATCH])

        self._queue("params", send)

    def log_metrics(self, metrics: dict[str, float], step: int) -> None:
        """Queue ``metrics`` at ``step``, timestamped now (returns at once)."""
        if not self.enabled or not metrics:
            return
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        batch = [Metric(key, float(value), now, step) for key, value in metrics.items()]
        client, run_id = self.client, self.run_id
        self._queue(f"metrics of step {step}", lambda: client.log_batch(run_id, metrics=batch))

    @contextlib.contextmanager
    def _global_uri(self):
        """Point MLflow's process-global tracking and registry URIs at this tracker's stores for a
        block, then put back exactly what was there (explicit settings and environment variables),
        so that no other client in the process resolves to this tracker's stores afterwards.
        MLflow's fluent API (log_model) and its proxied ``mlflow-artifacts:`` locations resolve the
        server from the global URIs, not the client's. One block at a time in the process (the
        tracking thread uploads artifacts while the training thread may log a model)."""
        import mlflow
        from mlflow.tracking._model_registry import utils as registry_utils

        with _GLOBAL_URI_LOCK:
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

    def _spool_dir(self) -> str:
        """A directory of this tracker's own for artifacts waiting to be sent."""
        if self._spool is None:
            self._spool = tempfile.mkdtemp(prefix="sama-tracking-")
        return tempfile.mkdtemp(dir=self._spool)

    def log_text(self, text: str, artifact_file: str) -> None:
        if not self.enabled:
            return
        client, run_id = self.client, self.run_id

        def send() -> None:
            with self._global_uri():
                client.log_text(run_id, text, artifact_file)

        self._queue(f"artifact {artifact_file}", send, size=len(text))

    def log_artifact(self, local_path: str, artifact_path: str | None = None) -> None:
        """Queue a file or directory as an artifact (copied now: the caller may delete it)."""
        if not self.enabled:
            return
        held = os.path.join(self._spool_dir(), os.path.basename(os.path.normpath(local_path)))
        if os.path.isdir(local_path):
            shutil.copytree(local_path, held)
            size = sum(os.path.getsize(os.path.join(d, f)) for d, _, fs in os.walk(held) for f in fs)
        else:
            shutil.copyfile(local_path, held)
            size = os.path.getsize(held)
        client, run_id = self.client, self.run_id

        def send() -> None:
            with self._global_uri():
                client.log_artifact(run_id, held, artifact_path)

        def cleanup() -> None:
            shutil.rmtree(os.path.dirname(held), ignore_errors=True)

        name = f"artifact {os.path.join(artifact_path or '', os.path.basename(held))}"
        self._queue(name, send, size=size, cleanup=cleanup)

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
        """Log the exported pipeline as an MLflow pyfunc model; register it when a name is set.

        Synchronous (its result names the model). When the store cannot take it, the error is
        logged and ``{}`` returned: the export itself is already in the run's storage.
        """
        if not self.enabled:
            return {}
        try:
            with _http_timeout(MODEL_UPLOAD_TIMEOUT_S):
                return self._log_model(export_dir, stage, registered_model)
        except Exception:
            log.exception(
                "logging the model to %s failed (the export is in the run's storage; log it again "
                "with `mlflow` when the store is back)",
                self.tracking_uri,
            )
            return {}

    def _log_model(self, export_dir: str, stage: int, registered_model: str | None) -> dict[str, Any]:
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

    def end(self, status: str = "FINISHED", timeout_s: float | None = None) -> None:
        """Set the run's final status, then send what is queued, waiting at most ``timeout_s``
        (default ``tracking.flush_timeout_s``); what is still held then is lost, with a warning.
        Never raises: it runs in the ``finally`` of a training run whose own error must surface."""
        if not self.enabled or self.run_id is None:
            return
        try:
            monitor = getattr(self, "_monitor", None)
            self._monitor = None
            if monitor is not None:
                with contextlib.suppress(Exception):
                    monitor.finish()
            client, run_id = self.client, self.run_id
            self._queue(f"run status {status}", lambda: client.set_terminated(run_id, status=status))
            self.sender.close(self.cfg.flush_timeout_s if timeout_s is None else timeout_s)
            self._sender = None
        except Exception:
            log.exception("ending the MLflow run %s failed", self.run_id)
        finally:
            if self._spool is not None:
                shutil.rmtree(self._spool, ignore_errors=True)
                self._spool = None


@contextlib.contextmanager
def _http_timeout(seconds: int):
    """MLflow's request timeout raised to at least ``seconds`` for a block (a large upload)."""
    key = "MLFLOW_HTTP_REQUEST_TIMEOUT"
    saved = os.environ.get(key)
    try:
        current = int(saved) if saved else 0
    except ValueError:
        current = 0
    os.environ[key] = str(max(current, seconds))
    try:
        yield
    finally:
        if saved is None:
            os.environ.pop(key, None)
        else:
            os.environ[key] = saved
