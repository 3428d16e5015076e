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
    assert_sama_edit_runs(store, info1["export_uri"], tmp_path, steps=4)


def assert_sama_edit_runs(store: str, model_uri: str, tmp_path, steps: int) -> None:
    """`sama edit --model model_uri` edits a held-out source into a video of its size and length."""
    from sama.cli import main

    held_out = os.path.join(store, "edits-val", "pairs")
    source = sorted(storage.list_files(held_out, suffixes=("_source.mp4",)))[0]
    out = str(tmp_path / "edited.mp4")
    args = ["edit", "--video", source, "--instruction", "make it blue", "--model", model_uri]
    assert main([*args, "--output", out, "--steps", str(steps)]) == 0
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


# ----------------------------------------------------------------------------------------------
# Fail fast: preflight before any worker, bounded waits, which failures are retried


def _train_workers_created(ray_cluster) -> int:
    """Ray Train worker actors this cluster has ever created (alive or dead)."""
    from ray.util.state import list_actors

    actors = list_actors(
        address=ray_cluster.test_dashboard_url,
        filters=[("class_name", "=", "RayTrainWorker")],
        limit=10_000,
        raise_on_missing_output=False,
    )
    return len(actors)


def test_a_gpu_recipe_on_the_cpu_cluster_fails_within_seconds_naming_the_gpus(
    store, mlflow_server, ray_cluster, tmp_path
):
    from sama.preflight import PreflightError

    before = _train_workers_created(ray_cluster)
    cfg = stage0_config(store, str(tmp_path / "runs"), mlflow_server, "t-gpu", "scaling.use_gpu=true")
    started = time.monotonic()
    with pytest.raises(PreflightError) as caught:
        run_training(cfg)
    elapsed = time.monotonic() - started
    assert elapsed < 30, elapsed
    failed = {r.name: r for r in caught.value.results if r.status == "fail"}
    assert list(failed) == ["cluster"]
    assert "each worker needs 1 GPU and the cluster has 0 GPUs" in failed["cluster"].found
    assert "scaling.use_gpu=false" in failed["cluster"].fix
    assert _train_workers_created(ray_cluster) == before


def test_train_check_prints_every_check_and_exits_by_the_verdict(
    store, mlflow_server, ray_cluster, tmp_path, capsys
):
    from sama.cli import main

    args = [
        "train",
        "--check",
        "--recipe",
        "debug",
        "--set",
        quickstart._sources(
            ("pretext", f"{store}/pretext/shards/video", "video", 3.0), quickstart._image_edits(store)
        ),
        "--set",
        f"data.val_uri={store}/pretext-val/shards/video",
        "--set",
        f"run.storage_uri={tmp_path / 'runs'}",
        "--set",
        f"tracking.uri={mlflow_server}",
    ]
    assert main(args) == 0
    out = capsys.readouterr().out
    for name in ("config", "run", "model", "data source 'pretext'", "data source 'image_edits'"):
        assert f"[ok  ] {name}: " in out
    assert "[ok  ] validation shards: " in out and "[ok  ] run storage: " in out
    assert f"[ok  ] tracking: MLflow server {mlflow_server} answers" in out
    assert "[ok  ] cluster: 2 worker(s) x {CPU 0.5}: the cluster's 1 node(s) can place them" in out
    assert out.rstrip().endswith("passed: 9 ok, 0 warning(s), 0 failure(s)")
    assert not (tmp_path / "runs").exists()  # a check leaves nothing behind

    assert main([*args, "--set", "scaling.use_gpu=true", "--set", "tracking.uri=http://127.0.0.1:9"]) == 1
    out = capsys.readouterr().out
    assert "[FAIL] cluster: the cluster cannot place 2 worker(s) x {CPU 0.5, GPU 1}" in out
    assert "[WARN] tracking: the MLflow server at http://127.0.0.1:9 does not answer" in out
    # A GPU run is planned too: the tiny model fits any GPU.
    assert "[ok  ] memory plan: " in out
    assert out.rstrip().endswith("FAILED: 8 ok, 1 warning(s), 1 failure(s)")


def test_missing_data_unwritable_storage_and_a_missing_export_fail_before_any_worker(
    store, mlflow_server, ray_cluster, s3_bucket, s3_faults, tmp_path
):
    from sama.preflight import PreflightError

    before = _train_workers_created(ray_cluster)
    missing = f"{store}/no-such-prep/shards/video"
    cfg = stage0_config(
        store,
        f"{s3_bucket}/runs",
        mlflow_server,
        "t-preflight",
        quickstart._sources(("pretext", missing, "video", 3.0), quickstart._image_edits(store)),
    )
    s3_faults.fail("PUT", r"/runs/t-preflight/", status=403)
    with pytest.raises(PreflightError) as caught:
        run_training(cfg)
    failed = {r.name: r for r in caught.value.results if r.status == "fail"}
    assert set(failed) == {"data source 'pretext'", "run storage"}
    assert failed["data source 'pretext'"].found == f"no shards (*.tar) under {missing}"
    assert "data.sources[0].uri" in failed["data source 'pretext'"].fix
    assert failed["run storage"].found.startswith(f"cannot write under {s3_bucket}/runs/t-preflight")
    assert "PermissionError" in failed["run storage"].found
    message = str(caught.value)
    assert "2 preflight check(s) failed, nothing was started" in message and missing in message

    export = str(tmp_path / "runs" / "t-stage0" / "export")
    cfg1 = config.load(
        TrainConfig,
        recipe_path("debug_sft"),
        [
            quickstart._sources(
                ("video_edits", f"{store}/pairs/shards/video", "video", 3.0), quickstart._image_edits(store)
            ),
            f"data.val_uri={store}/pairs-val/shards/video",
            f"run.storage_uri={tmp_path / 'runs'}",
            f"tracking.uri={mlflow_server}",
            f"model.init_from={export}",
        ],
    )
    with pytest.raises(PreflightError) as caught:
        run_training(cfg1)
    failed = {r.name: r for r in caught.value.results if r.status == "fail"}
    assert list(failed) == ["model"]
    assert failed["model"].found == f"model.init_from {export} does not exist: not a SAMA export"
    assert _train_workers_created(ray_cluster) == before


def test_an_error_of_the_training_function_is_not_retried(store, mlflow_server, ray_cluster, tmp_path):
    from sama.train.launch import TrainingError

    before = _train_workers_created(ray_cluster)
    missing = f"{store}/no-such-prep/shards/video"
    cfg = stage0_config(
        store,
        str(tmp_path / "runs"),
        mlflow_server,
        "t-error",
        quickstart._sources(("pretext", missing, "video", 3.0), quickstart._image_edits(store)),
        "run.max_failures=3",
    )
    # Without the preflight, the error reaches the workers, as a data problem appearing after
    # the checks would.
    with pytest.raises(TrainingError) as caught:
        run_training(cfg, preflight=False)
    assert isinstance(caught.value.original, FileNotFoundError)
    assert f"no shards (*.tar) under {missing}" in str(caught.value)
    assert "not retried" in str(caught.value)
    # One attempt: one worker group of 2, although run.max_failures allows 3 restarts.
    assert _train_workers_created(ray_cluster) - before == cfg.scaling.num_workers


def test_workers_the_cluster_cannot_provide_in_time_fail_after_the_resource_timeout(
    store, mlflow_server, ray_cluster, tmp_path
):
    from ray.util.placement_group import placement_group, remove_placement_group

    from sama.train.launch import ResourcesUnavailable

    # Another job holds both CPUs of the cluster: the run could start, but not now.
    other = placement_group([{"CPU": 2}])
    assert other.wait(timeout_seconds=30)
    before = _train_workers_created(ray_cluster)
    try:
        cfg = stage0_config(
            store, str(tmp_path / "runs"), mlflow_server, "t-wait", "scaling.resource_timeout_s=4"
        )
        started = time.monotonic()
        with pytest.raises(ResourcesUnavailable, match=r"did not provide 2 worker\(s\) x \{CPU 0.5\} within"):
            run_training(cfg)
        assert 4 <= time.monotonic() - started < 30
    finally:
        remove_placement_group(other)
    assert _train_workers_created(ray_cluster) == before


def test_node_types_of_an_autoscaler_count_as_capacity(ray_cluster):
    import ray._raylet
    from ray.core.generated import autoscaler_pb2
    from ray.experimental import internal_kv

    from sama.train import preflight as train_preflight
    from sama.train.launch import ResourcesUnavailable, wait_for_workers

    cfg = config.load(
        TrainConfig, recipe_path("debug"), ["scaling.use_gpu=true", "scaling.resource_timeout_s=2"]
    )
    with pytest.raises(Exception, match="the cluster has 0 GPUs.*no autoscaler node types reported"):
        train_preflight.check_cluster(cfg)
    cluster_config = autoscaler_pb2.ClusterConfig()
    group = cluster_config.node_group_configs.add()
    group.name = "gpu-workers"
    group.resources["CPU"] = 16
    group.resources["GPU"] = 2
    group.max_count = 1
    namespace = ray._raylet.GCS_AUTOSCALER_STATE_NAMESPACE
    key = ray._raylet.GCS_AUTOSCALER_CLUSTER_CONFIG_KEY
    internal_kv._internal_kv_put(key, cluster_config.SerializeToString(), namespace=namespace)
    try:
        found = train_preflight.check_cluster(cfg)
        assert "the nodes hold 0 now, the autoscaler can add the rest" in found
        # No autoscaler actually runs here: the bounded wait ends it.
        with pytest.raises(ResourcesUnavailable, match="within scaling.resource_timeout_s=2 s"):
            wait_for_workers(cfg, poll_s=1)
        cfg.scaling.num_workers = 3  # more than one node of two GPUs holds
        with pytest.raises(Exception, match="node types: gpu-workers x1"):
            train_preflight.check_cluster(cfg)
    finally:
        internal_kv._internal_kv_del(key, namespace=namespace)


# ----------------------------------------------------------------------------------------------
# The cluster path: everything on object storage


@pytest.fixture(scope="module")
def s3_store(store, s3_server):
    """Both prep jobs writing to the loopback S3 server (held-out inputs: a few clips and pairs)."""
    import boto3

    bucket = f"sama-train-{os.getpid()}"
    boto3.client("s3", endpoint_url=s3_server).create_bucket(Bucket=bucket)
    root = f"s3://{bucket}"
    pretext = quickstart._prep_pretext(os.path.join(store, "raw-val"), f"{root}/pretext")
    pairs = quickstart._prep_pairs(os.path.join(store, "edits-val", "manifest.csv"), f"{root}/pairs")
    assert pretext["samples"] > 0 and pairs["samples"] > 0
    return root


def s3_stage0(root: str, tracking: list[str], name: str, *extra: str) -> TrainConfig:
    shards = f"{root}/pretext/shards/video"
    overrides = [
        quickstart._sources(("pretext", shards, "video", 1.0)),
        f"data.val_uri={shards}",
        "data.val_samples=2",
        f"run.storage_uri={root}/runs",
        f"run.name={name}",
        "tracking.experiment=sama-tests",
        "log_every=3",
        "checkpoint.every_steps=3",
        "validation.every_steps=1000",
        *tracking,
        *extra,
    ]
    return config.load(TrainConfig, recipe_path("debug"), overrides)


def test_a_run_on_object_storage_trains_resumes_exports_and_edits(s3_store, store, mlflow_server, tmp_path):
    tracking = [f"tracking.uri={mlflow_server}"]
    first = run_training(s3_stage0(s3_store, tracking, "t-s3", "max_steps=6"))
    cfg = s3_stage0(s3_store, tracking, "t-s3", "max_steps=12")
    checkpoint = latest_checkpoint(cfg)
    assert checkpoint and checkpoint.startswith(f"{s3_store}/runs/t-s3/checkpoint_")
    second = run_training(cfg, resume=True)
    assert (first["steps"], second["steps"]) == (6, 12)
    assert second["mlflow_run_id"] == first["mlflow_run_id"]
    client, found = runs_named(mlflow_server, "t-s3")
    assert len(found) == 1
    assert metric_steps(client, first["mlflow_run_id"], "train/loss") == [3, 6, 9, 12]
    export = second["export_uri"]
    assert export == f"{s3_store}/runs/t-s3/export" and storage.exists(f"{export}/sama_pipeline.json")

    sft = config.load(
        TrainConfig,
        recipe_path("debug_sft"),
        [
            f"model.init_from={export}",
            quickstart._sources(("video_edits", f"{s3_store}/pairs/shards/video", "video", 1.0)),
            f"data.val_uri={s3_store}/pairs/shards/video",
            "data.val_samples=2",
            f"run.storage_uri={s3_store}/runs",
            "run.name=t-s3-sft",
            *tracking,
            "tracking.experiment=sama-tests",
            "max_steps=4",
            "checkpoint.every_steps=4",
            "validation.every_steps=4",
        ],
    )
    stage1 = run_training(sft)
    assert stage1["steps"] == 4 and stage1["export_uri"] == f"{s3_store}/runs/t-s3-sft/export"
    assert_sama_edit_runs(store, stage1["export_uri"], tmp_path, steps=2)
    # The library call takes object storage everywhere too (model, source and output).
    from sama.edit import run_edit

    held_out = sorted(
        storage.list_files(os.path.join(store, "edits-val", "pairs"), suffixes=("_source.mp4",))
    )
    source = f"{s3_store}/edit-in/source.mp4"
    storage.write_bytes(source, storage.read_bytes(held_out[0]))
    report = run_edit(
        source, "make it blue", stage1["export_uri"], f"{s3_store}/edit-out/edited.mp4", steps=2
    )
    assert (
        storage.exists(f"{s3_store}/edit-out/edited.mp4")
        and report["frames"] == video.probe(source).num_frames
    )


def test_a_resume_whose_mlflow_run_is_gone_continues_in_a_linked_run(s3_store, tmp_path):
    from mlflow.tracking import MlflowClient

    # Tracked locally on the driver (tracking.uri=local): a store that outlives the Ray session.
    store_dir = tmp_path / "mlruns"
    tracking = ["tracking.uri=local", f"tracking.local_dir={store_dir}"]
    first = run_training(s3_stage0(s3_store, tracking, "t-s3-gone", "max_steps=6"))
    assert first["mlflow_tracking_uri"] == f"sqlite:///{store_dir}/mlflow.db"
    client = MlflowClient(first["mlflow_tracking_uri"])
    assert metric_steps(client, first["mlflow_run_id"], "train/loss") == [3, 6]
    client.delete_run(first["mlflow_run_id"])

    cfg = s3_stage0(s3_store, tracking, "t-s3-gone", "max_steps=12")
    checkpoint = latest_checkpoint(cfg)
    second = run_training(cfg, resume=True)
    assert second["steps"] == 12 and second["mlflow_run_id"] != first["mlflow_run_id"]
    run = client.get_run(second["mlflow_run_id"])
    assert run.data.tags["sama.previous_mlflow_run"] == first["mlflow_run_id"]
    assert run.data.tags["sama.resumed_from"] == f"{checkpoint} (step 6)"
    assert run.data.params["run.name"] == "t-s3-gone"  # a new run gets the config again
    # Metrics continue at the checkpoint's step.
    assert metric_steps(client, second["mlflow_run_id"], "train/loss") == [9, 12]


def test_a_run_on_object_storage_without_a_tracking_store_fails_at_once(s3_store, monkeypatch):
    from sama.preflight import PreflightError

    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    started = time.monotonic()
    with pytest.raises(PreflightError) as caught:
        run_training(s3_stage0(s3_store, [], "t-s3-untracked", "max_steps=2"))
    assert time.monotonic() - started < 30
    failed = {r.name: r for r in caught.value.results if r.status == "fail"}
    assert list(failed) == ["tracking"]
    assert "tracking.uri (or MLFLOW_TRACKING_URI)" in failed["tracking"].fix
    assert "tracking.uri=local" in failed["tracking"].fix


def test_the_same_seed_trains_the_same_run(store, mlflow_server, tmp_path):
    """Two runs of one config see the same data stream and report the same losses: Ray Data's
    parallel decode must not reorder rows."""
    common = ["max_steps=10", "log_every=1", "checkpoint.every_steps=1000", "validation.every_steps=1000"]
    losses = []
    for name in ("t-seed-a", "t-seed-b"):
        info = run_training(stage0_config(store, str(tmp_path / "runs"), mlflow_server, name, *common))
        client, _ = runs_named(mlflow_server, name)
        history = sorted(client.get_metric_history(info["mlflow_run_id"], "train/loss"), key=lambda m: m.step)
        losses.append([m.value for m in history])
    assert len(losses[0]) == 10
    assert losses[0] == losses[1]


def _export_weights(info: dict) -> dict:
    from safetensors.torch import load_file

    directory = os.path.join(storage.local_path(info["export_uri"]), "transformer")
    weights = {}
    for name in sorted(os.listdir(directory)):
        if name.endswith(".safetensors"):
            weights.update({k: v.clone() for k, v in load_file(os.path.join(directory, name)).items()})
    return weights


def test_sharded_checkpoints_reshard_fall_back_and_check_the_config(store, mlflow_server, tmp_path, caplog):
    """2 FSDP2 workers checkpoint their shards; the run resumes on 1 and on 2 workers with the
    same EMA (its export is bit-identical); a truncated latest checkpoint falls back to the
    previous one with a warning, and the run resumed there, on 2 workers or on 1 (playing both
    logical data-parallel ranks), replays the data stream exactly (its per-step losses are the
    uninterrupted run's); a changed optim.lr stops the resume unless allowed, then applies."""
    import logging

    import torch

    from sama.preflight import PreflightError
    from sama.train.checkpoint import TENSORS_DIR
    from sama.train.trainer import lr_lambda

    runs = str(tmp_path / "runs")
    common = [
        "parallel.strategy=fsdp2",
        "checkpoint.every_steps=2",
        "checkpoint.keep_last=3",  # the step-2 checkpoint outlives two truncated step-4 ones
        "validation.every_steps=1000",
        "validation.render_samples=0",
        "log_every=1",
    ]

    def cfg(workers: int, *extra: str) -> TrainConfig:
        return stage0_config(
            store, runs, mlflow_server, "t-sharded", f"scaling.num_workers={workers}", *common, *extra
        )

    started = time.monotonic()
    first = run_training(cfg(2, "max_steps=4"))
    assert first["steps"] == 4
    exported = _export_weights(first)
    latest = latest_checkpoint(cfg(2, "max_steps=4"))
    shards = sorted(os.listdir(os.path.join(latest, TENSORS_DIR)))
    assert len(shards) == 2  # one file per rank, merged by Ray Train into one checkpoint
    # Resharding: the step-4 checkpoint on 1 worker, then on 2; nothing left to train, so the
    # export is the restored EMA, which must be the first run's exactly.
    for workers in (1, 2):
        again = run_training(cfg(workers, "max_steps=4"), resume=True)
        assert again["steps"] == 4 and again["mlflow_run_id"] == first["mlflow_run_id"]
        weights = _export_weights(again)
        assert sorted(weights) == sorted(exported)
        assert all(torch.equal(weights[k], exported[k]) for k in exported), workers
    timings = {"train + 2 resumes": time.monotonic() - started}

    # A truncated shard in the latest checkpoint: the previous one (step 2) is used, with a warning,
    # and the run resumed there replays every rank's data stream from where it was: steps 3 and 4
    # report the uninterrupted run's losses (the same batches, noise and restored state).
    latest = latest_checkpoint(cfg(2, "max_steps=4"))
    shard = os.path.join(latest, TENSORS_DIR, sorted(os.listdir(os.path.join(latest, TENSORS_DIR)))[-1])
    with open(shard, "r+b") as handle:
        handle.truncate(os.path.getsize(shard) // 2)
    with caplog.at_level(logging.WARNING, logger="sama.train.launch"):
        replayed = run_training(cfg(2, "max_steps=4"), resume=True)
    assert any(
        storage.basename(latest) in r.getMessage() and "truncated" in r.getMessage() for r in caplog.records
    )
    assert replayed["steps"] == 4 and replayed["mlflow_run_id"] == first["mlflow_run_id"]
    client, _ = runs_named(mlflow_server, "t-sharded")

    def step_losses() -> dict[int, list[float]]:
        losses: dict[int, list[float]] = {}
        history = client.get_metric_history(first["mlflow_run_id"], "train/loss")
        for metric in sorted(history, key=lambda m: (m.step, m.timestamp)):
            losses.setdefault(metric.step, []).append(metric.value)
        return losses

    losses = step_losses()
    assert sorted(losses) == [1, 2, 3, 4] and [len(losses[s]) for s in (1, 2, 3, 4)] == [1, 1, 2, 2], losses
    for step in (3, 4):
        uninterrupted, resumed_loss = losses[step]
        assert resumed_loss == pytest.approx(uninterrupted, rel=1e-6, abs=0), (step, losses)
    timings["fallback + exact replay"] = time.monotonic() - started - timings["train + 2 resumes"]

    # The step-2 checkpoint again (the replay's step-4 one truncated too), on 1 worker: it plays
    # both logical data-parallel ranks of the 2-worker run, so steps 3 and 4 log the uninterrupted
    # run's global mean losses (summed in another order).
    latest = latest_checkpoint(cfg(2, "max_steps=4"))
    shard = os.path.join(latest, TENSORS_DIR, sorted(os.listdir(os.path.join(latest, TENSORS_DIR)))[-1])
    with open(shard, "r+b") as handle:
        handle.truncate(os.path.getsize(shard) // 2)
    assert run_training(cfg(1, "max_steps=4"), resume=True)["steps"] == 4
    losses = step_losses()
    assert [len(losses[s]) for s in (1, 2, 3, 4)] == [1, 1, 3, 3], losses
    for step in (3, 4):
        uninterrupted, _, on_one_worker = losses[step]
        assert on_one_worker == pytest.approx(uninterrupted, rel=1e-5, abs=0), (step, losses)
    timings["replay on 1 worker"] = time.monotonic() - started - sum(timings.values())

    # A changed learning rate stops the resume before any worker starts, naming the key.
    changed = cfg(2, "max_steps=6", "optim.lr=0.004")
    with pytest.raises(PreflightError) as caught:
        run_training(changed, resume=True)
    failed = {r.name: r for r in caught.value.results if r.status == "fail"}
    assert list(failed) == ["run"] and "optim.lr: 0.002 -> 0.004" in failed["run"].found
    resumed = run_training(changed, resume=True, allow_config_change=True)
    assert resumed["steps"] == 6
    lr: dict[int, list[float]] = {}
    for metric in client.get_metric_history(resumed["mlflow_run_id"], "train/lr"):
        lr.setdefault(metric.step, []).append(metric.value)
    # Step 5 is the first after the replayed run's step-4 checkpoint: the new rate on the new schedule.
    warmup = int(changed.optim.warmup_frac * changed.max_steps)
    schedule = lr_lambda(warmup, changed.max_steps, changed.optim.decay, changed.optim.min_lr_frac)
    assert lr[5] == [pytest.approx(0.004 * schedule(4))] and lr[6] == [pytest.approx(0.004 * schedule(5))]
    assert lr[1] == [pytest.approx(0.002)]
    timings["lr change"] = time.monotonic() - started - sum(timings.values())
    print(timings)
