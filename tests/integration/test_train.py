"""Training on the shared local Ray cluster: stage 0 then stage 1 on shards of both prep jobs,
MLflow contents, resume with continuous steps, and recovery from a killed worker."""

from __future__ import annotations

import json
import os
import signal
import threading
import time

import pytest

from sama import config, quickstart, storage, video
from sama.train.launch import RUN_INFO_FILE, latest_checkpoint, run_training, run_uri
from sama.train.recipes import recipe_path
from sama.train.trainer import TrainConfig

pytestmark = [pytest.mark.integration, pytest.mark.slow]

REQUIRED_METRICS = {
    "train/loss",
    "train/loss_fm",
    "train/loss_sem",
    "train/lr",
    "train/grad_norm",
    "perf/samples_per_s",
    "perf/tokens_per_s",
    "perf/data_wait_frac",
    "val/loss",
}


@pytest.fixture(scope="module")
def store(ray_cluster, tmp_path_factory):
    """Synthetic raw videos and edit pairs through both prep jobs (the quickstart's data)."""
    root = str(tmp_path_factory.mktemp("train-store"))
    quickstart._synthesise(root)
    quickstart._prep_pretext(os.path.join(root, "raw"), os.path.join(root, "pretext"))
    quickstart._prep_pretext(os.path.join(root, "raw-val"), os.path.join(root, "pretext-val"))
    quickstart._prep_pairs(os.path.join(root, "edits", "manifest.csv"), os.path.join(root, "pairs"))
    quickstart._prep_pairs(os.path.join(root, "edits-val", "manifest.csv"), os.path.join(root, "pairs-val"))
    return root


def stage0_config(store: str, runs: str, tracking_uri: str, name: str, *extra: str) -> TrainConfig:
    overrides = [
        quickstart._sources(
            ("pretext", f"{store}/pretext/shards/video", "video", 3.0), quickstart._image_edits(store)
        ),
        f"data.val_uri={store}/pretext-val/shards/video",
        f"run.storage_uri={runs}",
        f"run.name={name}",
        f"tracking.uri={tracking_uri}",
        "tracking.experiment=sama-tests",
        *extra,
    ]
    return config.load(TrainConfig, recipe_path("debug"), overrides)


def runs_named(tracking_uri: str, name: str):
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri)
    experiment = client.get_experiment_by_name("sama-tests")
    return client, client.search_runs([experiment.experiment_id], f"attributes.run_name = '{name}'")


def metric_steps(client, run_id: str, key: str) -> list[int]:
    return sorted(m.step for m in client.get_metric_history(run_id, key))


def test_stage0_then_stage1_tracked_in_mlflow_and_editing(store, mlflow_server, tmp_path):
    runs = str(tmp_path / "runs")
    cfg0 = stage0_config(
        store,
        runs,
        mlflow_server,
        "t-stage0",
        "max_steps=60",
        "validation.every_steps=30",
        "checkpoint.every_steps=30",
    )
    info0 = run_training(cfg0)
    client, found = runs_named(mlflow_server, "t-stage0")
    assert len(found) == 1
    run0 = client.get_run(info0["mlflow_run_id"])
    assert run0.info.status == "FINISHED"
    assert set(run0.data.metrics) >= REQUIRED_METRICS
    assert any(key.startswith("system/") for key in run0.data.metrics)  # MLflow system metrics
    assert run0.data.params["optim.lr"] == "0.002" and run0.data.params["stage"] == "0"
    assert run0.data.params["model.preset"] == "tiny"
    # The validation loss falls at least 30% from its step-0 value on the synthetic data.
    val = {m.step: m.value for m in client.get_metric_history(run0.info.run_id, "val/loss")}
    assert 0 in val and 60 in val
    assert val[60] <= 0.7 * val[0], val
    # Sample edits are browser-playable mp4 artifacts.
    artifacts = [a.path for a in client.list_artifacts(run0.info.run_id, "samples/step_0000060")]
    assert artifacts and all(p.endswith(".mp4") for p in artifacts)
    local = client.download_artifacts(run0.info.run_id, artifacts[0], str(tmp_path / "art"))
    with open(local, "rb") as handle:
        assert handle.read(12)[4:8] == b"ftyp"
    # The export is registered, tagged with its stage.
    versions = client.search_model_versions("name = 'sama-debug-stage0'")
    assert any(v.run_id == run0.info.run_id and v.tags.get("stage") == "stage0" for v in versions)

    cfg1 = config.load(
        TrainConfig,
        recipe_path("debug_sft"),
        [
            f"model.init_from={info0['export_uri']}",
            quickstart._sources(
                ("video_edits", f"{store}/pairs/shards/video", "video", 3.0), quickstart._image_edits(store)
            ),
            f"data.val_uri={store}/pairs-val/shards/video",
            f"run.storage_uri={runs}",
            "run.name=t-stage1",
            f"tracking.uri={mlflow_server}",
            "tracking.experiment=sama-tests",
            "max_steps=20",
            "validation.every_steps=20",
            "checkpoint.every_steps=20",
        ],
    )
    info1 = run_training(cfg1)
    run1 = client.get_run(info1["mlflow_run_id"])
    assert set(run1.data.metrics) >= REQUIRED_METRICS and run1.data.params["stage"] == "1"
    assert client.list_artifacts(run1.info.run_id, "samples/step_0000020")
    versions = client.search_model_versions("name = 'sama-debug-stage1'")
    assert any(v.run_id == run1.info.run_id and v.tags.get("stage") == "stage1" for v in versions)

    # The exported stage-1 model edits a video through `sama edit`.
    from sama.cli import main

    source = sorted(storage.list_files(os.path.join(store, "edits-val", "pairs"), suffixes=("_source.mp4",)))[
        0
    ]
    out = str(tmp_path / "edited.mp4")
    args = ["edit", "--video", source, "--instruction", "make it blue", "--model", info1["export_uri"]]
    assert main([*args, "--output", out, "--steps", "4"]) == 0
    got, want = video.probe(out), video.probe(source)
    assert (got.num_frames, got.width, got.height) == (want.num_frames, want.width, want.height)


def test_resume_continues_the_same_mlflow_run(store, mlflow_server, tmp_path):
    runs = str(tmp_path / "runs")
    common = ["checkpoint.every_steps=10", "validation.every_steps=1000", "log_every=5"]
    first = run_training(stage0_config(store, runs, mlflow_server, "t-resume", "max_steps=10", *common))
    assert first["steps"] == 10
    # Same run name without --resume is refused, naming the way out.
    with pytest.raises(RuntimeError, match="pass --resume"):
        run_training(stage0_config(store, runs, mlflow_server, "t-resume", "max_steps=20", *common))
    second = run_training(
        stage0_config(store, runs, mlflow_server, "t-resume", "max_steps=20", *common), resume=True
    )
    assert second["steps"] == 20
    assert second["mlflow_run_id"] == first["mlflow_run_id"]
    client, found = runs_named(mlflow_server, "t-resume")
    assert len(found) == 1
    assert metric_steps(client, first["mlflow_run_id"], "train/loss") == [5, 10, 15, 20]


def test_killed_worker_recovers_from_the_last_checkpoint(store, mlflow_server, ray_cluster, tmp_path):
    import ray
    from ray.util.state import list_actors

    runs = str(tmp_path / "runs")
    cfg = stage0_config(
        store,
        runs,
        mlflow_server,
        "t-kill",
        "max_steps=40",
        "checkpoint.every_steps=10",
        "validation.every_steps=1000",
        "log_every=5",
        "run.max_failures=1",
    )
    result: dict = {}

    def train():
        try:
            result["info"] = run_training(cfg)
        except BaseException as exc:  # surfaced by the assertion below
            result["error"] = exc

    thread = threading.Thread(target=train)
    thread.start()
    deadline = time.monotonic() + 300
    killed = None
    while time.monotonic() < deadline and thread.is_alive():
        if latest_checkpoint(cfg):
            alive = list_actors(address=ray_cluster.test_dashboard_url, filters=[("state", "=", "ALIVE")])
            workers = [a for a in alive if "RayTrainWorker" in a.class_name]
            if workers:
                killed = workers[-1].pid
                os.kill(killed, signal.SIGKILL)
                break
        time.sleep(0.2)
    thread.join(timeout=600)
    assert killed, "no checkpoint appeared before the run ended"
    assert "error" not in result, result.get("error")
    info = result["info"]
    assert info["steps"] == 40
    state = json.loads(storage.read_text(storage.join(latest_checkpoint(cfg), "state.json")))
    assert state["step"] == 40
    client, found = runs_named(mlflow_server, "t-kill")
    assert len(found) == 1  # the restarted workers continued the same MLflow run
    steps = metric_steps(client, info["mlflow_run_id"], "train/loss")
    assert steps[-1] == 40 and set(range(5, 45, 5)) <= set(steps)
    assert ray.is_initialized()
    assert storage.exists(storage.join(run_uri(cfg), RUN_INFO_FILE))
