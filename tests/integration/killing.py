"""Run a data-prep job module as its own driver on the shared Ray cluster and SIGKILL it mid-run."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

from sama import storage
from sama.prep import ledger


def kill_after_markers(job_args: list[str], output_uri: str, markers: int = 2, timeout_s: float = 120) -> int:
    """Start ``python -m jobs.<job> ...`` connected to this session's Ray and kill its process group
    once ``markers`` units have committed; returns how many had committed at the kill (0: never)."""
    import ray

    env = {
        **os.environ,
        "RAY_ADDRESS": ray.get_runtime_context().gcs_address,
        "RAY_AUTH_MODE": "token",
        "PYTHONUNBUFFERED": "1",
    }
    proc = subprocess.Popen(
        [sys.executable, "-m", *job_args],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    marker_dir = storage.join(output_uri, ledger.MARKERS_DIR)
    deadline = time.monotonic() + timeout_s
    killed_at = 0
    while time.monotonic() < deadline and proc.poll() is None:
        # Committed markers only: an atomic write in flight is a hidden temporary file.
        done = len(storage.list_files(marker_dir, suffixes=(".json",)))
        if done >= markers:
            working = _others_work()
            os.killpg(proc.pid, signal.SIGKILL)
            killed_at = done
            break
        time.sleep(0.05)  # between polls only
    proc.wait(timeout=30)
    if killed_at:
        _wait_until_stopped(working)
    return killed_at


def _others_work() -> dict[str, set[str]]:
    """The (non-detached) actors alive and tasks running on the shared cluster for jobs other than
    this test's (the driver about to be killed), by Ray's state API."""
    import ray
    from ray.util.state import list_actors, list_tasks

    address, own = ray.test_dashboard_url, ray.get_runtime_context().get_job_id()
    actors = list_actors(address=address, filters=[("state", "=", "ALIVE")], limit=10_000, detail=True)
    tasks = list_tasks(address=address, filters=[("state", "=", "RUNNING")], limit=10_000)
    return {
        # Detached actors (Ray Data's statistics actor) outlive their driver by design.
        "actors": {a.actor_id for a in actors if a.job_id != own and not a.is_detached},
        "tasks": {t.task_id for t in tasks if t.job_id != own},
    }


def _wait_until_stopped(working: dict[str, set[str]], timeout_s: float = 60) -> None:
    """Poll the state API until the killed driver's actors are dead and its tasks no longer run
    (Ray cancels them once it sees the driver gone), so the test's next run does not share the
    cluster with its leftovers."""
    deadline = time.monotonic() + timeout_s
    while True:
        now = _others_work()
        left = {kind: ids & now[kind] for kind, ids in working.items()}
        if not any(left.values()):
            return
        if time.monotonic() > deadline:
            raise AssertionError(f"the killed driver's work still runs after {timeout_s:.0f} s: {left}")
        time.sleep(0.2)  # between polls only
