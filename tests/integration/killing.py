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
            os.killpg(proc.pid, signal.SIGKILL)
            killed_at = done
            break
        time.sleep(0.05)
    proc.wait(timeout=30)
    time.sleep(2)  # let Ray cancel the dead driver's tasks
    return killed_at
