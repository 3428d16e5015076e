"""What a data job's driver prints of Ray's internals (sama.logs): a job with an actor pool, run as
its own process on its own local Ray, prints no C++ record of Ray's unless ``--verbose``."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from sama.prep import ledger

pytestmark = [pytest.mark.integration, pytest.mark.slow]

REPO = Path(__file__).resolve().parents[2]

# A driver that runs one unit on a Ray Data actor pool, as `sama precompute` and `sama eval` do.
DRIVER = """
import sys
from pipelines import common
from sama import cluster, logs
from tests.integration.test_quiet_output import pool_factory

logs.configure("--verbose" in sys.argv)
cluster.connect()
pool = common.ActorPool(pool_factory, size=1, num_cpus=1, num_gpus=0)
results, failures = common.run_units(['{"unit_id": "u0"}'], None, what="units", actors=pool)
print("units done:", len(results), "failed:", len(failures))
"""


def _unit(unit_json: str) -> ledger.UnitResult:
    return ledger.UnitResult(unit_id=json.loads(unit_json)["unit_id"])


def pool_factory():
    return _unit


def _run_driver(*args: str) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", "RAY_BACKEND_LOG_LEVEL")}
    return subprocess.run(
        [sys.executable, "-c", DRIVER, *args],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )


def test_an_actor_pool_job_prints_no_ray_cpp_record():
    done = _run_driver()
    assert done.returncode == 0, done.stderr[-3000:]
    assert "units done: 1 failed: 0" in done.stdout, done.stdout
    # Ray's false alarm about the pool's arguments (ray-project/ray#53727) is spent where it stays
    # in the session's files: no C++ record ("[... E pid tid] core_worker.cc:...") on the console.
    output = done.stdout + done.stderr
    assert "core_worker.cc" not in output and "logging.cc" not in output, output[-3000:]


def test_verbose_shows_what_ray_prints():
    """With ``--verbose`` Ray prints as it does: the line the default mode keeps off the console
    is there (so the test above looks where it would appear)."""
    done = _run_driver("--verbose")
    assert done.returncode == 0, done.stderr[-3000:]
    assert "has constructor arguments in the object store" in done.stderr, done.stderr[-3000:]
