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

Not quieted: the driver's own C++ log records at ERROR, which Ray writes to stderr as well as to
``python-core-driver-*.log``. The first Ray Data actor pool of a run brings one ("core_worker.cc:
... has constructor arguments in the object store and max_restarts > 0", ray-project/ray#53727:
Ray Data passes its actors' arguments by reference and restarts them). Only
``RAY_BACKEND_LOG_LEVEL=fatal`` drops it, and with it every C++ error of the cluster from its
files too.
"""

from __future__ import annotations

import logging
import os
import sys
import warnings

log = logging.getLogger(__name__)

_state = {"verbose": False, "summary_only": False}

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
