"""The e2e tests' shared quickstart: one real ``sama quickstart`` run per test session.

``SAMA_QUICKSTART_DIR`` names the work directory of a quickstart that already ran (its output log
``<dir>.log`` beside it is optional); the tests then check that one instead of running a new one
(to look again at a run, or at one made by other recipes).
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.e2e.quickstart_run import BIN, Quickstart, tail


@pytest.fixture(scope="session")
def quickstart(tmp_path_factory) -> Quickstart:
    """One ``sama quickstart --workdir DIR`` run (about 7 minutes on 2 cores) for the whole session."""
    existing = os.environ.get("SAMA_QUICKSTART_DIR")
    if existing:
        log = Path(existing).parent / f"{Path(existing).name}.log"
        return Quickstart(Path(existing), log.read_text(errors="replace") if log.is_file() else "")
    workdir = tmp_path_factory.mktemp("quickstart")
    sama = BIN / "sama"
    cmd = [str(sama)] if sama.exists() else [sys.executable, "-m", "sama.cli"]
    cmd += ["quickstart", "--workdir", str(workdir)]
    # The quickstart runs on the embedded default: its own local Ray and a local MLflow store.
    env = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", "MLFLOW_TRACKING_URI")}
    log_path = workdir.parent / f"{workdir.name}.log"
    started = time.monotonic()
    with open(log_path, "wb") as log:
        try:
            done = subprocess.run(
                cmd, env=env, stdout=log, stderr=subprocess.STDOUT, timeout=1200, check=False
            )
        except subprocess.TimeoutExpired:
            pytest.fail(f"sama quickstart did not finish in 20 min:\n{tail(log_path)}")
    output = log_path.read_text(errors="replace")
    assert done.returncode == 0, f"sama quickstart exited {done.returncode}:\n{tail(log_path)}"
    print(f"sama quickstart took {time.monotonic() - started:.0f}s (log: {log_path})")
    return Quickstart(workdir, output)
