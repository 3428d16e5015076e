"""``sama quickstart`` end to end, and its MLflow runs as a person sees them in the MLflow UI.

One quickstart run (the real ``sama quickstart --workdir DIR`` command, in a subprocess: it starts
its own local Ray) is shared by the tests of this module. They check what the quickstart promises
(shards, two MLflow runs with metrics and mp4 samples, two registered models, an edited video), then
serve its MLflow store with ``mlflow ui`` and open the UI in headless Chromium (Debian's
``chromium``: ``--dump-dom`` for the rendered page, ``--screenshot`` for a picture). The UI tests
skip when ``chromium`` is not installed; ``.ci/run`` installs it.
"""

from __future__ import annotations

import ast
import json
import shutil
import subprocess
import tempfile
import urllib.parse
import urllib.request
from pathlib import Path

import pytest

from tests.e2e.quickstart_run import Quickstart

# The quickstart (fixture set-up, counted in the first test's time) takes ~7 min on 2 idle cores.
pytestmark = [pytest.mark.slow, pytest.mark.timeout(1800)]

EXPERIMENT = "sama-debug"
RUN_NAMES = ("debug-stage0", "debug-stage1")
MODELS = ("sama-debug-stage0", "sama-debug-stage1")
RECIPES = ("debug", "debug_sft")
# The quickstart's output: at most this many non-empty lines, none of them from Ray's internals.
MAX_OUTPUT_LINES = 60
RAY_INTERNALS = (
    # Ray's C++ log records ("[... E ...] core_worker.cc:...: Actor ... has constructor arguments in
    # the object store and max_restarts > 0", "logging.cc: Set ray log level ..."): sama.logs.
    "core_worker.cc",
    "logging.cc",
    "RayDeprecationWarning",
    "streaming_executor",
    "Progress bars disabled",
    "PlacementGroupCleaner",
    "Token authentication",
    "Loading weights",
)


def _sample_dir(run_name: str) -> str:
    """``samples/step_N`` of a quickstart run's last validation: its recipe's ``max_steps``."""
    from sama import config
    from sama.train.recipes import recipe_path
    from sama.train.trainer import TrainConfig

    recipe = RECIPES[RUN_NAMES.index(run_name)]
    return f"samples/step_{config.load(TrainConfig, recipe_path(recipe), []).max_steps:07d}"


def _runs_by_name(tracking_uri: str) -> tuple[str, dict]:
    from mlflow import MlflowClient

    client = MlflowClient(tracking_uri=tracking_uri)
    experiment = client.get_experiment_by_name(EXPERIMENT)
    assert experiment is not None, f"no experiment {EXPERIMENT!r} at {tracking_uri}"
    runs = client.search_runs([experiment.experiment_id], max_results=100)
    return experiment.experiment_id, {r.info.run_name: r for r in runs}


def _sample_mp4(client, run_id: str) -> str:
    sample_dir = _sample_dir(client.get_run(run_id).info.run_name)
    listed = [a.path for a in client.list_artifacts(run_id, sample_dir)]
    mp4s = sorted(p for p in listed if p.endswith(".mp4"))
    assert mp4s, f"run {run_id}: no mp4 under {sample_dir}: {listed}"
    return mp4s[0]


def test_quickstart_outputs(quickstart: Quickstart):
    from mlflow import MlflowClient

    from sama import schema, storage, video
    from sama.prep import ledger

    store = quickstart.workdir / "store"
    for prefix in ("pretext", "pretext-val", "pairs", "pairs-val"):
        shards = storage.list_files(ledger.shards_uri(str(store / prefix)), suffixes=(".tar",))
        assert shards, f"no shards under {store / prefix}"
    first = next(iter(schema.iter_samples(ledger.shards_uri(str(store / "pairs")))))
    assert first.target
    # Each shard set was precomputed once, by the tiny preset's encoders, keys unchanged.
    for prefix in ("pretext", "pretext-val", "pairs", "pairs-val"):
        latents = store / "latents" / prefix
        info = schema.read_latent_info(str(latents))
        assert info is not None and info.model == "tiny", (prefix, info)
        pixel_keys = {s.key for s in schema.iter_samples(ledger.shards_uri(str(store / prefix)))}
        latent_samples = list(schema.iter_samples(ledger.shards_uri(str(latents))))
        assert all(isinstance(s, schema.LatentSample) for s in latent_samples), prefix
        assert {s.key for s in latent_samples} == pixel_keys, prefix

    assert quickstart.tracking_db.is_file(), quickstart.output[-3000:]
    client = MlflowClient(tracking_uri=quickstart.tracking_uri)
    _, runs = _runs_by_name(quickstart.tracking_uri)
    assert set(RUN_NAMES) <= set(runs), sorted(runs)
    for name in RUN_NAMES:
        run = runs[name]
        assert run.info.status == "FINISHED", (name, run.info.status)
        for key in ("train/loss", "val/loss"):
            assert key in run.data.metrics, (name, sorted(run.data.metrics))
        assert run.data.params.get("run.name") == name
        # Both stages trained from the latent shards, not from the media, without frozen encoders.
        sources = ast.literal_eval(run.data.params["data.sources"])  # MLflow holds the list's repr
        assert all("/store/latents/" in source["uri"] for source in sources), sources
        info = json.loads((quickstart.workdir / "runs" / name / "run_info.json").read_text())
        assert info["precomputed"] is True, info
        assert "training" not in info["frozen_encoders_loaded"].values(), info
        # Artifacts live in the local store beside mlflow.db, where `mlflow ui` finds them.
        assert run.info.artifact_uri.startswith(f"file://{quickstart.artifacts}/"), run.info.artifact_uri
        mp4 = _sample_mp4(client, run.info.run_id)
        local = Path(run.info.artifact_uri[len("file://") :]) / mp4
        assert local.read_bytes()[4:8] == b"ftyp", local

    for stage, name in enumerate(MODELS):
        versions = client.search_model_versions(f"name = '{name}'")
        assert versions, f"registered model {name} has no version"
        latest = max(versions, key=lambda v: int(v.version))
        assert latest.run_id == runs[RUN_NAMES[stage]].info.run_id
        assert latest.tags.get("stage") == f"stage{stage}"

    # Every held-out pair was edited to its source's size, and shown beside source and target.
    from sama import quickstart as quickstart_module

    held_out = store / "edits-val" / "pairs"
    for index, kind in enumerate(quickstart_module.EDIT_KINDS):
        source = video.probe(str(held_out / f"pair_{index:04d}_source.mp4"))
        edit = video.probe(str(quickstart.workdir / "edits" / f"{kind}.mp4"))
        strip = video.probe(str(quickstart.workdir / "edits" / f"{kind}_strip.mp4"))
        assert (edit.num_frames, edit.width, edit.height) == (source.num_frames, source.width, source.height)
        assert (strip.num_frames, strip.width) == (source.num_frames, 3 * source.width)
        assert f"{kind:<11}" in quickstart.output, quickstart.output[-3000:]
    edited = quickstart.workdir / "edited.mp4"
    assert edited.is_file(), quickstart.output[-3000:]
    # The headline edit's error to its target and the copy baseline's are printed beside it.
    assert f"{edited}: {quickstart_module.HEADLINE_KIND} edit" in quickstart.output
    assert "copying the source:" in quickstart.output

    # What a person reads: the quickstart's own step and result lines, not Ray's internals (sama.logs).
    lines = [line for line in quickstart.output.splitlines() if line.strip()]
    assert len(lines) <= MAX_OUTPUT_LINES, f"{len(lines)} lines:\n" + "\n".join(lines[:200])
    noise = [line for line in lines if any(pattern in line for pattern in RAY_INTERNALS)]
    assert not noise, "\n".join(noise[:50])
    assert sum(line.startswith("Ray's logs") for line in lines) == 1, quickstart.output[:3000]

    # It ends with `sama eval` of the stage-1 model: an eval run with per-task metrics and the report.
    eval_experiment = client.get_experiment_by_name(quickstart_module.EVAL_EXPERIMENT)
    assert eval_experiment is not None, quickstart.output[-3000:]
    (eval_run,) = client.search_runs([eval_experiment.experiment_id])
    assert eval_run.info.status == "FINISHED" and eval_run.data.tags["sama.kind"] == "eval"
    assert eval_run.data.metrics["eval/count/samples"] == len(quickstart_module.EDIT_KINDS)
    for name in ("psnr", "ssim", "copy_psnr", "flow_epe"):
        assert f"eval/task/video_edit/{name}" in eval_run.data.metrics, sorted(eval_run.data.metrics)
    for kind in quickstart_module.EDIT_KINDS:
        assert f"eval/category/{kind}/psnr" in eval_run.data.metrics, sorted(eval_run.data.metrics)
    report = {a.path for a in client.list_artifacts(eval_run.info.run_id, "report")}
    assert "report/index.html" in report, report
    assert (store / "eval" / "report" / "index.html").is_file()
    assert f"report: {store / 'eval' / 'report' / 'index.html'}" in quickstart.output
    # Evaluation during training: the stage-1 run has eval/* curves.
    stage1 = runs[RUN_NAMES[1]]
    assert "eval/psnr" in stage1.data.metrics, sorted(stage1.data.metrics)
    assert len(client.get_metric_history(stage1.info.run_id, "eval/psnr")) >= 2


# --- the MLflow UI ---------------------------------------------------------------------------------


@pytest.fixture(scope="session")
def mlflow_ui(quickstart: Quickstart):
    """An MLflow server over the quickstart's store (its ``mlflow.db`` and ``artifacts/``, which
    runs read directly from their own file:// location); yields its URL."""
    from sama.tracking import LocalTrackingServer

    with LocalTrackingServer(str(quickstart.artifacts.parent)) as server:
        yield server.uri


@pytest.fixture(scope="session")
def chromium():
    path = shutil.which("chromium") or shutil.which("chromium-browser")
    if path is None:
        pytest.skip("chromium is not installed (apt-get install chromium); .ci/run installs it")
    return path


class Browser:
    """Headless Chromium, one fresh profile per page load."""

    def __init__(self, executable: str, workdir: Path):
        self.executable = executable
        self.workdir = workdir

    def _run(self, url: str, *flags: str, timeout: float = 120) -> subprocess.CompletedProcess:
        profile = tempfile.mkdtemp(prefix="chromium-profile-", dir=self.workdir)
        cmd = [
            self.executable,
            "--headless",
            "--no-sandbox",  # running as root
            "--disable-gpu",
            "--disable-dev-shm-usage",
            "--disable-quic",
            "--no-first-run",
            "--disable-background-networking",
            "--disable-component-update",
            "--disable-sync",
            f"--user-data-dir={profile}",
            "--window-size=1600,1000",
            # The UI is a React app: give it (virtual) time to fetch and render before the dump.
            "--virtual-time-budget=20000",
            *flags,
            url,
        ]
        try:
            return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, check=False)
        finally:
            shutil.rmtree(profile, ignore_errors=True)

    def dom(self, url: str) -> str:
        done = self._run(url, "--dump-dom")
        assert done.returncode == 0 and "<html" in done.stdout, (
            f"chromium --dump-dom {url} failed ({done.returncode}):\n{done.stderr[-3000:]}"
        )
        return done.stdout

    def screenshot(self, url: str, path: Path) -> Path:
        done = self._run(url, f"--screenshot={path}")
        assert path.is_file() and path.stat().st_size > 0, (
            f"chromium --screenshot {url} failed ({done.returncode}):\n{done.stderr[-3000:]}"
        )
        return path


@pytest.fixture(scope="session")
def browser(chromium, tmp_path_factory) -> Browser:
    return Browser(chromium, tmp_path_factory.mktemp("chromium"))


def test_mlflow_ui_shows_the_runs(browser: Browser, mlflow_ui: str, tmp_path: Path):
    exp_id, runs = _runs_by_name(mlflow_ui)  # through the UI server's REST API
    assert set(RUN_NAMES) <= set(runs), sorted(runs)

    page = f"{mlflow_ui}/#/experiments/{exp_id}/runs"
    dom = browser.dom(page)
    missing = [name for name in RUN_NAMES if name not in dom]
    assert not missing, f"{missing} not on {page}; page text (head): {dom[:3000]}"

    png = browser.screenshot(page, tmp_path / "mlflow_ui_runs.png")
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    print(f"screenshot of the experiment page: {png}")


def test_mlflow_ui_serves_the_sample_video(browser: Browser, mlflow_ui: str, tmp_path: Path):
    from mlflow import MlflowClient

    exp_id, runs = _runs_by_name(mlflow_ui)
    run_id = runs["debug-stage1"].info.run_id
    mp4 = _sample_mp4(MlflowClient(tracking_uri=mlflow_ui), run_id)

    # The bytes the UI's player loads, through the UI's own artifact endpoint.
    query = urllib.parse.urlencode({"path": mp4, "run_uuid": run_id})
    with urllib.request.urlopen(f"{mlflow_ui}/get-artifact?{query}", timeout=30) as resp:
        data = resp.read()
    assert data[4:8] == b"ftyp", data[:16]

    # The run's artifact page with the mp4 selected: the file is listed and shown in a player.
    page = f"{mlflow_ui}/#/experiments/{exp_id}/runs/{run_id}/artifactPath/{mp4}"
    dom = browser.dom(page)
    name = mp4.rsplit("/", 1)[-1]
    assert name in dom, f"{name} not on {page}; page (head): {dom[:3000]}"
    assert "<video" in dom, f"no <video> player on {page}"

    png = browser.screenshot(page, tmp_path / "mlflow_ui_artifact.png")
    print(f"screenshot of the artifact page: {png}")
    print(json.dumps({"run_id": run_id, "artifact": mp4, "bytes": len(data)}))
