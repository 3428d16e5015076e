"""End to end through the real job path: ``ray start --head`` -> ``ray job submit`` of the three jobs.

A Ray head of its own (not the session's in-process ``ray_cluster``) is started with the real CLI,
with the dashboard (the job API lives there) and token authentication, the way a cluster runs. The
test submits ``python -m jobs.prep_pretext`` (train and validation clips), ``python -m
jobs.prep_pairs`` and ``python -m jobs.train --recipe debug`` with ``ray job submit --working-dir
<checkout> --runtime-env infra/runtime_env.yaml``, waits for each to succeed, and checks the outputs
and the MLflow server (the ``mlflow_server`` fixture) the training job tracked to.

How a job finds its interpreter: the job supervisor runs the entrypoint with ``shell=True`` in the
environment the head's processes inherited from ``ray start``; Ray does not rewrite ``PATH``. So
``python`` is the first one on the head's ``PATH``: the head is started with this interpreter's
``bin`` directory (the venv) first on ``PATH``, as activating the venv would. The uploaded working
directory is the job's cwd and first on ``PYTHONPATH``, so ``jobs``/``sama``/``configs`` come from
the uploaded copy; the dependencies come from the venv.

The head is stopped by SIGTERM to its ``ray start --block`` process (which then stops everything it
started), never by ``ray stop``, which would stop every Ray instance on the machine, the session's
in-process one included. What is left after a grace period (the head's processes as seen while it
ran, and anything naming its unique temp dir) is killed, and the test checks none survive.
"""

from __future__ import annotations

import contextlib
import json
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path

import pytest

from sama import storage, synthetic
from sama.prep import ledger
from sama.quickstart import PAIR_SETTINGS, PREP_SETTINGS, SIZES

pytestmark = [pytest.mark.slow, pytest.mark.integration]

REPO = Path(__file__).resolve().parents[2]
RUNTIME_ENV = REPO / "infra" / "runtime_env.yaml"
BIN = Path(sys.executable).parent
TERMINAL = {"SUCCEEDED", "FAILED", "STOPPED"}
STOP_GRACE_S = 15


def _free_ports(count: int) -> list[int]:
    """``count`` distinct free loopback ports (all held open at once, so no duplicates)."""
    socks = [socket.socket() for _ in range(count)]
    try:
        for sock in socks:
            sock.bind(("127.0.0.1", 0))
        return [sock.getsockname()[1] for sock in socks]
    finally:
        for sock in socks:
            sock.close()


def _ray_cli() -> str:
    path = BIN / "ray"
    return str(path) if path.exists() else (shutil.which("ray") or "ray")


@dataclass
class RayHead:
    address: str  # the job submission address (the dashboard's HTTP endpoint)
    env: dict[str, str]  # what a client needs: RAY_AUTH_MODE=token and the token
    token: str
    temp_dir: str
    log_path: Path

    def request(self, path: str, token: bool = True) -> dict | list:
        headers = {"Authorization": f"Bearer {self.token}"} if token else {}
        req = urllib.request.Request(f"{self.address}{path}", headers=headers)
        with urllib.request.urlopen(req, timeout=10) as resp:
            return json.loads(resp.read())

    def cli(self, *args: str, timeout: float = 120) -> subprocess.CompletedProcess:
        return subprocess.run(
            [_ray_cli(), *args],
            env=self.env,
            cwd=REPO,
            capture_output=True,
            text=True,
            timeout=timeout,
            check=False,
        )

    def logs(self, submission_id: str) -> str:
        try:
            return str(self.request(f"/api/jobs/{submission_id}/logs").get("logs", ""))
        except (OSError, ValueError) as exc:
            return f"<no logs: {exc}>"

    def submit(self, submission_id: str, entrypoint: list[str]) -> None:
        done = self.cli(
            "job",
            "submit",
            "--address",
            self.address,
            "--working-dir",
            str(REPO),
            "--runtime-env",
            str(RUNTIME_ENV),
            "--submission-id",
            submission_id,
            "--no-wait",
            "--",
            *entrypoint,
        )
        assert done.returncode == 0, f"ray job submit failed:\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}"

    def wait(self, submission_id: str, timeout: float) -> str:
        """Poll the job API until the job ends; return its logs. Fails (with the logs) unless SUCCEEDED."""
        started = time.monotonic()
        deadline = started + timeout
        status = "?"
        info: dict = {}
        while time.monotonic() < deadline:
            info = self.request(f"/api/jobs/{submission_id}")  # type: ignore[assignment]
            status = info.get("status", "?")
            if status in TERMINAL:
                break
            time.sleep(2)  # between polls only
        else:
            self.cli("job", "stop", "--address", self.address, submission_id, timeout=60)
        print(f"job {submission_id}: {status} after {time.monotonic() - started:.0f}s")
        logs = self.logs(submission_id)
        assert status == "SUCCEEDED", (
            f"job {submission_id} ended {status} after at most {timeout:.0f}s: "
            f"{info.get('message')}\n--- job logs (tail) ---\n{logs[-8000:]}"
        )
        # The CLI agrees.
        shown = self.cli("job", "status", "--address", self.address, submission_id, timeout=60)
        assert f"Job '{submission_id}' succeeded" in shown.stdout + shown.stderr, shown.stdout + shown.stderr
        return logs


def _processes_of(temp_dir: str, roots: list) -> list:
    """Live processes that belong to the head: descendants seen earlier, or naming its temp dir."""
    import psutil

    found = {p.pid: p for p in roots if _alive(p)}
    for proc in psutil.process_iter(["pid", "cmdline"]):
        with contextlib.suppress(psutil.Error):
            if temp_dir in " ".join(proc.info["cmdline"] or []) and _alive(proc):
                found[proc.pid] = proc
    return list(found.values())


def _describe(proc) -> str:
    import psutil

    try:
        return f"{proc.pid} {' '.join(os.path.basename(a) for a in proc.cmdline()[:2])[:60]}"
    except psutil.Error:
        return str(proc.pid)


def _alive(proc) -> bool:
    """Running and not a zombie (an exited child whose parent has not reaped it yet)."""
    import psutil

    try:
        return proc.is_running() and proc.status() != psutil.STATUS_ZOMBIE
    except psutil.Error:
        return False


def _wait_gone(procs: list, timeout: float) -> list:
    """Wait until ``procs`` have exited, SIGKILL what is left after ``timeout``; describe those."""
    import psutil

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and any(_alive(p) for p in procs):
        time.sleep(0.5)  # between polls only
    left = [p for p in procs if _alive(p)]
    described = [_describe(p) for p in left]
    for proc in left:
        with contextlib.suppress(psutil.Error):
            proc.kill()
    return described


def _survivors(temp_dir: str, roots: list, timeout: float) -> list[str]:
    """The head's processes (:func:`_processes_of`) still alive ``timeout`` seconds from now, or
    none as soon as none is: a process SIGKILLed a moment ago takes a moment to go."""
    deadline = time.monotonic() + timeout
    while (left := _processes_of(temp_dir, roots)) and time.monotonic() < deadline:
        time.sleep(0.2)  # between polls only
    return [_describe(p) for p in left]


@pytest.fixture
def ray_head():
    """A Ray head started with ``ray start --head --block`` on its own ports and temp dir."""
    import psutil

    # A short temp dir: Ray's unix sockets live under it (108-byte path limit).
    temp_dir = tempfile.mkdtemp(prefix="sama-rayhead-", dir="/tmp")
    gcs, dash, agent_http, agent_grpc, env_agent, client, metrics, node_mgr, obj_mgr = _free_ports(9)
    token = secrets.token_hex(32)
    env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_")}
    env.update(
        {
            # Token auth, with a token of this test's own (not ~/.ray/auth_token).
            "RAY_AUTH_MODE": "token",
            "RAY_AUTH_TOKEN": token,
            "RAY_USAGE_STATS_ENABLED": "0",
            # `python` in a job entrypoint resolves through the head's PATH: this venv first.
            "PATH": f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}",
        }
    )
    log_path = Path(temp_dir) / "head.log"
    cmd = [
        _ray_cli(),
        "start",
        "--head",
        "--block",
        "--num-cpus=2",
        f"--port={gcs}",
        "--include-dashboard=true",
        "--dashboard-host=127.0.0.1",
        f"--dashboard-port={dash}",
        f"--dashboard-agent-listen-port={agent_http}",
        f"--dashboard-agent-grpc-port={agent_grpc}",
        f"--runtime-env-agent-port={env_agent}",
        f"--ray-client-server-port={client}",
        f"--metrics-export-port={metrics}",
        f"--node-manager-port={node_mgr}",
        f"--object-manager-port={obj_mgr}",
        f"--object-store-memory={512 * 1024 * 1024}",
        f"--temp-dir={temp_dir}",
        "--disable-usage-stats",
    ]
    with open(log_path, "wb") as log:
        proc = subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    head = RayHead(f"http://127.0.0.1:{dash}", env, token, temp_dir, log_path)
    seen: list = []
    try:
        starting = time.monotonic()
        deadline = starting + 120
        while True:
            with contextlib.suppress(psutil.Error):
                seen = [psutil.Process(proc.pid), *psutil.Process(proc.pid).children(recursive=True)]
            try:
                head.request("/api/jobs/")
                break
            except (OSError, ValueError):
                pass
            if proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"the Ray head did not come up:\n{log_path.read_text()[-4000:]}")
            time.sleep(1)  # between polls only
        print(f"the Ray head is up at {head.address} after {time.monotonic() - starting:.0f}s")
        yield head
    finally:
        with contextlib.suppress(psutil.Error):
            seen += psutil.Process(proc.pid).children(recursive=True)
        # `ray start --block` stops what it started on SIGTERM (gcs, raylet, dashboard, workers).
        # After a Ray Data job its GCS takes ~30 s to exit on SIGTERM; the cluster is disposable,
        # so whatever is still running after a grace period is killed.
        stopping = time.monotonic()
        proc.send_signal(signal.SIGTERM)
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.wait(timeout=STOP_GRACE_S)
        killed = _wait_gone(_processes_of(temp_dir, seen), timeout=0)
        proc.wait(timeout=10)
        _wait_gone(_processes_of(temp_dir, seen), timeout=10)
        print(f"the Ray head stopped in {time.monotonic() - stopping:.0f}s; killed after the grace: {killed}")
        left = _survivors(temp_dir, seen, timeout=10)
        shutil.rmtree(temp_dir, ignore_errors=True)
        assert not left, f"processes of the test's Ray head survived its shutdown: {left}"


def _sets(settings: list[str]) -> list[str]:
    return [arg for setting in settings for arg in ("--set", setting)]


def _summary(output_uri: str) -> dict:
    return json.loads(storage.read_text(storage.join(output_uri, ledger.SUMMARY_FILE)))


def test_jobs_submitted_to_a_ray_head(ray_head: RayHead, mlflow_server: str, tmp_path: Path):
    from mlflow import MlflowClient

    # Token auth is on: the job API refuses a request without the token.
    with pytest.raises(urllib.error.HTTPError) as refused:
        ray_head.request("/api/jobs/", token=False)
    assert refused.value.code in (401, 403)

    store = tmp_path / "store"
    synthetic.write_raw_videos(str(store / "raw"), 8, seed=1, fps=12.0, seconds=2.5, sizes=SIZES)
    synthetic.write_raw_videos(str(store / "raw-val"), 2, seed=2, fps=12.0, seconds=1.5, sizes=SIZES)
    manifest = synthetic.write_edit_pairs(
        str(store / "edits"), 16, seed=3, media="mixed", fps=8.0, seconds=1.25, sizes=SIZES
    )
    tag = secrets.token_hex(4)

    for name, raw in (("pretext", "raw"), ("pretext-val", "raw-val")):
        job = f"sama-prep-pretext-{name}-{tag}"
        ray_head.submit(
            job,
            [
                "python",
                "-m",
                "jobs.prep_pretext",
                "--input",
                str(store / raw),
                "--output",
                str(store / name),
                *_sets(PREP_SETTINGS),
            ],
        )
        ray_head.wait(job, timeout=150)
        summary = _summary(str(store / name))
        assert summary["samples"] > 0 and summary["rejected"] == 0, summary

    job = f"sama-prep-pairs-{tag}"
    ray_head.submit(
        job,
        [
            "python",
            "-m",
            "jobs.prep_pairs",
            "--manifest",
            manifest,
            "--output",
            str(store / "pairs"),
            *_sets(PAIR_SETTINGS),
        ],
    )
    ray_head.wait(job, timeout=150)
    pairs = _summary(str(store / "pairs"))
    assert pairs["samples"] > 0, pairs

    sources = [
        {"name": "pretext", "uri": f"{store}/pretext/shards/video", "media": "video", "weight": 3.0},
        {"name": "image_edits", "uri": f"{store}/pairs/shards/image", "media": "image", "weight": 1.0},
    ]
    runs = tmp_path / "runs"
    job = f"sama-train-{tag}"
    ray_head.submit(
        job,
        [
            "python",
            "-m",
            "jobs.train",
            "--recipe",
            "debug",
            *_sets(
                [
                    "max_steps=20",
                    "checkpoint.every_steps=10",
                    "validation.every_steps=10",
                    f"data.sources={json.dumps(sources)}",
                    f"data.val_uri={store}/pretext-val/shards/video",
                    f"run.storage_uri={runs}",
                    f"tracking.uri={mlflow_server}",
                ]
            ),
        ],
    )
    logs = ray_head.wait(job, timeout=420)

    info = json.loads((runs / "debug-stage0" / "run_info.json").read_text())
    assert info["steps"] == 20, info
    assert info["mlflow_tracking_uri"] == mlflow_server, info
    assert (runs / "debug-stage0" / "export").is_dir()

    client = MlflowClient(tracking_uri=mlflow_server)
    run = client.get_run(info["mlflow_run_id"])
    context = f"run {run.info.run_id}; job logs (tail):\n{logs[-4000:]}"
    assert run.info.run_name == "debug-stage0", context
    assert run.info.status == "FINISHED", context
    assert client.get_experiment(run.info.experiment_id).name == "sama-debug"
    for key in ("train/loss", "val/loss"):
        history = client.get_metric_history(run.info.run_id, key)
        assert history, f"no {key} in {sorted(run.data.metrics)}; {context}"
        assert max(m.step for m in history) == 20, (key, [m.step for m in history])
    assert run.data.params.get("max_steps") == "20", context
    assert run.data.params.get("run.name") == "debug-stage0", context
    assert run.data.params.get("tracking.uri") == mlflow_server, context
    samples = [a.path for a in client.list_artifacts(run.info.run_id, "samples/step_0000020")]
    assert any(p.endswith(".mp4") for p in samples), (samples, context)
    named = client.search_runs(
        [run.info.experiment_id], filter_string="attributes.run_name = 'debug-stage0'", max_results=50
    )
    assert run.info.run_id in {r.info.run_id for r in named}
    version = client.get_model_version("sama-debug-stage0", str(info["mlflow_version"]))
    assert version.run_id == run.info.run_id
