"""What sama's commands print, and where Ray's own output goes: every logging knob, in one place.

A command prints its own progress and results; Ray's internals go to the Ray session directory
(``<session>/logs``: ``ray-data.log``, ``worker-*.out|err``, ``python-core-driver-*.log``, the Ray
Train logs), whose path :func:`ray_started` logs once. ``sama --verbose`` (:func:`configure` with
``verbose=True``) turns every knob below off: DEBUG logging, Ray's console output as Ray sets it.

The knobs, each where the output arises:

* Python logging (:func:`configure`): the root logger at INFO with a timestamped format (DEBUG with
  ``--verbose``). :func:`summary_only` (``sama quickstart``, which prints its own step and result
  lines) raises it to WARNING.
* ``RayDeprecationWarning: `ray_remote_args` is deprecated`` (:func:`prepare_ray_init`): Ray Data's
  ``map`` has no named parameter for ``max_retries`` / ``max_restarts`` / ``max_task_retries``,
  and its defaults retry a crashed worker without limit where :func:`pipelines.common.run_units`
  gives up after 3; the warning is ignored for calls from ``pipelines.common`` only.
* Ray's notice that it enabled token authentication for the local cluster it starts ("Token
  authentication is enabled for this Ray cluster") (:func:`prepare_ray_init`): its logger at ERROR.
  Setting ``RAY_AUTH_MODE=token`` to say so explicitly is no way out: Ray then does not create the
  token the default mode creates, and the local GCS refuses the driver.
* Ray Data's console handler (:func:`ray_started`): WARNING instead of INFO, so the
  ``streaming_executor`` lines ("Starting execution of Dataset ...", "Execution plan ...",
  "execution finished") stay in ``ray-data.log`` (its file handler is untouched).
* Ray Data progress bars (:func:`ray_started`): on when stdout and stderr are terminals; off
  otherwise (a log file gets the commands' own progress lines, ``sama.prep.ledger.Progress``), and
  then Ray Data's warning that they are off ("Progress bars disabled") is dropped.
* Worker output (:func:`prepare_ray_init`): forwarded to the driver (``log_to_driver``), which is
  where ``sama train`` prints its step lines from, except after :func:`summary_only`: then it stays
  in the session's ``worker-*`` files. That includes Ray Train's controller lines, MLflow's warnings
  in the workers and the C++ ``core_worker.cc`` warnings of worker processes.
* ``worker_process_setup_hook`` (:func:`prepare_ray_init`, local cluster only): runs
  :func:`setup_worker` in every worker. Ray Train's ``PlacementGroupCleaner`` asks Ray's state API,
  which the dashboard serves, whether the controller is alive; the local cluster runs without the
  dashboard (:func:`sama.cluster.connect`), so it warned every second for the whole training run
  ("Failed to query Ray Train Controller actor state"). Its logger is raised to ERROR.
* Download and weight-loading progress bars (:func:`summary_only`): ``HF_HUB_DISABLE_PROGRESS_BARS``
  (transformers' "Loading weights", huggingface_hub's) and ``MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR``
  off when stderr is not a terminal; set before Ray starts, so local workers inherit them.
* Ray's warning about actor arguments (:func:`spend_actor_argument_warning`, before a job's first
  actor pool, :func:`pipelines.common.run_units`). Creating an actor whose constructor arguments
  are in the object store with ``max_restarts > 0`` makes the creating process's core worker log
  "core_worker.cc: ... has constructor arguments in the object store and max_restarts > 0" at
  ERROR, once per process, and a driver's C++ ERROR records go to its stderr as well as to
  ``python-core-driver-*.log``. Ray Data always passes its actors' arguments by reference and
  keeps them alive for the pool's life, so for its pools the warning is a false alarm
  (ray-project/ray#53727). ``max_restarts=0`` would silence it and lose the pools' crash
  restarts; ``RAY_BACKEND_LOG_LEVEL=fatal``, even in the driver's environment alone, replaces it
  with its own line on stderr ("logging.cc: Set ray log level from environment variable ...")
  and drops the driver's other C++ records from its file. So the once-per-process warning is
  spent on a throwaway actor (killed at once) whose creation's stderr goes to
  ``<session>/logs/sama-driver-stderr.log``; the record is in ``python-core-driver-*.log`` as
  always. Should Ray start logging it per actor, the line is back on the console, and the
  quickstart's e2e test counts it (``tests/integration/test_quiet_output.py`` too).

Redaction (:mod:`sama.redaction`) is no knob: ``--verbose`` keeps it. The CLI installs its filter
on the driver's handlers, ``sama.train.launch`` in each Ray Train worker, and :func:`worker_logging`
around each unit of a data job's Ray Data task or actor (``pipelines.common``): a redacting stderr
handler at :func:`worker_level` (WARNING; INFO with ``--verbose``, where each rejected input's line
comes from) while the unit runs, on whatever cluster the job joined; the records reach the
session's ``worker-*`` files and, with ``log_to_driver``, the driver.
"""

from __future__ import annotations

import contextlib
import logging
import os
import sys
import threading
import warnings
from collections.abc import Iterator

from sama.redaction import RedactingFilter, install_log_filter

log = logging.getLogger(__name__)

_state = {"verbose": False, "summary_only": False, "actor_warning_spent": False}

# Ray Train's cleaner of placement groups; see the module docstring.
PLACEMENT_GROUP_CLEANER = "ray.train.v2._internal.execution.controller.placement_group_cleaner"


def configure(verbose: bool) -> None:
    """Set up logging for a sama command: INFO (DEBUG when ``verbose``) with timestamps."""
    _state["verbose"] = verbose
    logging.basicConfig(
        level=logging.DEBUG if verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )


def verbose() -> bool:
    """Whether the command runs with ``--verbose``."""
    return _state["verbose"]


def terminal() -> bool:
    """Whether both stdout and stderr are terminals (where progress bars redraw in place)."""
    return sys.stdout.isatty() and sys.stderr.isatty()


def summary_only() -> None:
    """For a command that prints its own progress and results (``sama quickstart``): only warnings
    and errors from Python logging, worker output kept in the session directory, no download
    bars in a log file. Does nothing with ``--verbose``. Call before Ray starts."""
    if _state["verbose"]:
        return
    _state["summary_only"] = True
    logging.getLogger().setLevel(logging.WARNING)
    if not sys.stderr.isatty():
        os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
        os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
        # transformers reads the variable once, at import; it may already be imported.
        if "transformers" in sys.modules:
            from transformers.utils import logging as hf_logging

            hf_logging.disable_progress_bar()


# Where Ray logs its token-authentication notice; see the module docstring.
TOKEN_NOTICE = "ray._private.authentication.authentication_token_setup"


def prepare_ray_init(local: bool) -> dict:
    """Keyword arguments of ``ray.init`` for the cluster :func:`sama.cluster.connect` joins
    (``local``: the one it starts); unless ``--verbose``, also quiets Ray's token-authentication
    notice and ignores the ``ray_remote_args`` deprecation of ``pipelines.common``'s calls."""
    if _state["verbose"]:
        return {}
    logging.getLogger(TOKEN_NOTICE).setLevel(logging.ERROR)
    # Here, after `import ray`: importing it puts its own filter for the category first.
    from ray.util.annotations import RayDeprecationWarning

    warnings.filterwarnings(
        "ignore",
        message=r"`ray_remote_args` is deprecated",
        category=RayDeprecationWarning,
        module=r"pipelines\.common",
    )
    options: dict = {"log_to_driver": not _state["summary_only"]}
    if local:
        options["runtime_env"] = {"worker_process_setup_hook": f"{__name__}.setup_worker"}
    return options


def worker_level() -> int:
    """The Python logging level of a data job's workers (:func:`worker_logging`): WARNING, INFO
    with ``--verbose``. Read in the driver; the workers get it as an argument."""
    return logging.INFO if _state["verbose"] else logging.WARNING


@contextlib.contextmanager
def worker_logging(level: int) -> Iterator[None]:
    """In a data job's Ray worker (task or actor) while it runs a unit: its log records at
    ``level`` and above go to stderr (the session's ``worker-*.err``, and the driver with
    ``log_to_driver``) through :class:`sama.redaction.RedactingFilter`. Ray leaves a worker's root
    logger without handlers (Python's last-resort handler, which nothing can filter, prints its
    warnings); the handler added here is removed afterwards, so a process Ray reuses for another
    task, or for a Ray Train worker whose ``logging.basicConfig`` needs a root without handlers,
    is left as it was. A root that has handlers already gets the filter on them instead."""
    root = logging.getLogger()
    if root.handlers:
        install_log_filter(root)
        yield
        return
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    handler.addFilter(RedactingFilter())
    previous = root.level
    root.addHandler(handler)
    root.setLevel(level)
    try:
        yield
    finally:
        root.removeHandler(handler)
        root.setLevel(previous)
        handler.flush()


_ACTOR_WARNING_LOCK = threading.Lock()


class _ActorArgumentWarning:
    """The throwaway actor :func:`spend_actor_argument_warning` creates (never runs a method)."""

    def __init__(self, argument: object) -> None:
        pass


def spend_actor_argument_warning() -> None:
    """Before this driver's first Ray Data actor pool: spend the core worker's once-per-process
    warning about actor arguments in the object store (see the module docstring) on a throwaway
    actor, its stderr output in the session's ``sama-driver-stderr.log``. Does nothing with
    ``--verbose`` or when already done in this process; needs ``ray.init``."""
    import ray

    if _state["verbose"]:
        return
    # Jobs run side by side in threads (the quickstart's precomputes): the second waits here, so
    # that its pool's actors are created after the warning is spent.
    with _ACTOR_WARNING_LOCK:
        if _state["actor_warning_spent"]:
            return
        _state["actor_warning_spent"] = True
        node = getattr(ray._private.worker, "_global_node", None)
        session = node.get_session_dir_path() if node is not None else None
        # A driver outside the cluster (ray.init with a remote address) has no session directory.
        if not session or not os.path.isdir(os.path.join(session, "logs")):
            return
        try:
            _spend_actor_argument_warning(ray, os.path.join(session, "logs", "sama-driver-stderr.log"))
        except Exception as exc:  # a knob of what is printed never fails a job
            log.debug("Ray's actor-argument warning was not spent: %s", exc)


def _spend_actor_argument_warning(ray, path: str) -> None:
    actor_class = ray.remote(num_cpus=0, max_restarts=1)(_ActorArgumentWarning)
    argument = ray.put(None)  # an argument by reference: what the warning is about
    sys.stderr.flush()
    console = os.dup(2)
    try:
        with open(path, "ab") as sink:
            # The C++ record is written to file descriptor 2 by the creation call itself; only
            # that call runs with the descriptor pointing at the file.
            os.dup2(sink.fileno(), 2)
            try:
                actor = actor_class.remote(argument)
            finally:
                os.dup2(console, 2)
    finally:
        os.close(console)
    ray.kill(actor, no_restart=True)


def setup_worker() -> None:
    """Run in every worker process of the local cluster: Ray Train's placement-group cleaner's
    logger at ERROR (it cannot reach the state API without the dashboard)."""
    logging.getLogger(PLACEMENT_GROUP_CLEANER).setLevel(logging.ERROR)


def ray_started() -> str | None:
    """After ``ray.init``: Ray Data's console output at WARNING and its progress bars on a
    terminal only (unless ``--verbose``); logs the session directory once. Returns its path."""
    import ray
    import ray.data

    if not _state["verbose"]:
        for handler in logging.getLogger("ray.data").handlers:
            # The file handlers keep every record (ray-data.log); only the console is quieted.
            if not isinstance(handler, logging.FileHandler) and "File" not in type(handler).__name__:
                handler.setLevel(logging.WARNING)
        bars = terminal()
        ray.data.DataContext.get_current().enable_progress_bars = bars
        if not bars:
            logging.getLogger("ray.data._internal.progress").setLevel(logging.ERROR)
    node = getattr(ray._private.worker, "_global_node", None)
    session = node.get_session_dir_path() if node is not None else None
    if session:
        log.info("Ray's own logs: %s", os.path.join(session, "logs"))
    return session
