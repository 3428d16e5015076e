"""MLflow tracking (sama.tracking.Tracker) against a real tracking server and the local default store."""

from __future__ import annotations

import os
import uuid

import pytest

mlflow = pytest.importorskip("mlflow")

from sama import config as config_lib  # noqa: E402
from sama import quickstart, synthetic, video  # noqa: E402
from sama.tracking import (  # noqa: E402
    LocalTrackingServer,
    Tracker,
    TrackingConfig,
    TrackingNotConfigured,
    local_artifact_root,
    resolve_tracking_uri,
    training_store,
)

pytestmark = pytest.mark.integration


@pytest.fixture(autouse=True)
def clean_tracking_env(monkeypatch):
    """No MLFLOW_TRACKING_URI before a test, and none left after it.

    ``mlflow.set_tracking_uri`` (called by ``Tracker.start``) writes the variable into os.environ;
    setting it through monkeypatch first makes the teardown remove whatever MLflow put there.
    """
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "unset")
    monkeypatch.delenv("MLFLOW_TRACKING_URI")


def _name(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:8]}"


def _tracker(uri: str | None, experiment: str | None = None, **kwargs) -> Tracker:
    cfg = TrackingConfig(uri=uri, experiment=experiment or _name("exp"), system_metrics=False, **kwargs)
    return Tracker(cfg, enabled=True)


def _debug_config():
    from sama.train.recipes import recipe_path
    from sama.train.trainer import TrainConfig

    return config_lib.load(TrainConfig, recipe_path("debug"))


@pytest.fixture(scope="module")
def tiny_export(tmp_path_factory):
    pytest.importorskip("torch")
    import torch

    from sama.models.presets import build_model
    from sama.pipeline_edit import SamaEditPipeline

    torch.manual_seed(0)
    directory = str(tmp_path_factory.mktemp("export"))
    # Recorded with the quickstart's small buckets: the 480p default would make the pyfunc edit
    # below run the tiny model on 100k tokens.
    pipeline = SamaEditPipeline.from_components(build_model("tiny"), quickstart.inference_config())
    pipeline.save_pretrained(directory)
    return directory


# ----------------------------------------------------------------------------------------------
# Against the tracking server


def test_start_creates_a_run_in_the_experiment(mlflow_server):
    experiment = _name("sama-start")
    tracker = _tracker(mlflow_server, experiment, tags={"team": "video"})
    run_id = tracker.start("stage0-run", tags={"stage": "0"})
    assert run_id and tracker.run_id == run_id and tracker.tracking_uri == mlflow_server
    run = tracker.client.get_run(run_id)
    exp = tracker.client.get_experiment_by_name(experiment)
    assert run.info.experiment_id == exp.experiment_id
    assert run.info.run_name == "stage0-run" and run.info.status == "RUNNING"
    assert run.data.tags["team"] == "video" and run.data.tags["stage"] == "0"
    # A second tracker reuses the experiment and makes another run.
    other = _tracker(mlflow_server, experiment)
    second = other.start("stage0-run-2")
    assert second != run_id
    assert other.client.get_run(second).info.experiment_id == exp.experiment_id
    runs = tracker.client.search_runs([exp.experiment_id])
    assert {r.info.run_id for r in runs} == {run_id, second}
    tracker.end()
    other.end()


def test_log_params_logs_the_flattened_config_and_a_resume_relogs_safely(mlflow_server):
    cfg = _debug_config()
    flat = config_lib.flatten(config_lib.to_dict(cfg))
    tracker = _tracker(mlflow_server)
    run_id = tracker.start("params")
    tracker.log_params(config_lib.to_dict(cfg))
    assert tracker.flush()  # writes are sent from a background thread
    params = tracker.client.get_run(run_id).data.params
    assert params == {key: str(value) for key, value in flat.items()}
    assert params["optim.lr"] == "0.002" and params["scaling.num_workers"] == "2"
    assert params["model.preset"] == "tiny" and params["model.init_from"] == "None"
    assert "'name': 'pretext'" in params["data.sources"]
    tracker.end()

    # A resumed run (same run id, e.g. after --resume with more steps) re-logs without failing and
    # keeps the values it started with; keys it did not have are added.
    resumed = _tracker(mlflow_server, tracker.cfg.experiment)
    assert resumed.start("params", run_id=run_id) == run_id
    assert resumed.client.get_run(run_id).info.status == "RUNNING"
    changed = config_lib.to_dict(cfg)
    changed["max_steps"] = cfg.max_steps * 2
    changed["extra_key"] = "x" * 7000
    resumed.log_params(changed)
    assert resumed.flush()
    params = resumed.client.get_run(run_id).data.params
    assert params["max_steps"] == str(cfg.max_steps)
    assert params["extra_key"] == "x" * 6000  # MLflow's cap on a param value
    resumed.end()


def test_log_params_in_batches_of_one_hundred(mlflow_server):
    # MLflow takes at most 100 params per log_batch call.
    tracker = _tracker(mlflow_server)
    run_id = tracker.start("many")
    many = {"section": {f"key{i:03d}": i for i in range(250)}}
    tracker.log_params(many)
    assert tracker.flush()
    params = tracker.client.get_run(run_id).data.params
    assert params == {f"section.key{i:03d}": str(i) for i in range(250)}
    tracker.end()


def test_log_metrics_with_steps(mlflow_server):
    tracker = _tracker(mlflow_server)
    run_id = tracker.start("metrics")
    for step, loss in [(10, 1.5), (20, 1.25), (30, 1.0)]:
        tracker.log_metrics({"train/loss": loss, "perf/samples_per_s": step * 2}, step)
    tracker.log_metrics({}, 40)  # nothing to log: no call
    assert tracker.flush()
    history = tracker.client.get_metric_history(run_id, "train/loss")
    assert sorted((m.step, m.value) for m in history) == [(10, 1.5), (20, 1.25), (30, 1.0)]
    assert tracker.client.get_run(run_id).data.metrics["perf/samples_per_s"] == 60.0
    tracker.end()


def test_log_video_stores_an_mp4_artifact(mlflow_server, tmp_path):
    frames = synthetic.render(synthetic.random_scene(3), 5, 8.0, 32, 48)
    data = video.encode_mp4(frames, 8.0)
    tracker = _tracker(mlflow_server)
    run_id = tracker.start("video")
    tracker.log_video(data, "samples/step_0000050/abc123.mp4")
    tracker.log_video(data, "top.mp4")
    assert tracker.flush()
    listed = [a.path for a in tracker.client.list_artifacts(run_id, "samples/step_0000050")]
    assert listed == ["samples/step_0000050/abc123.mp4"]
    assert "top.mp4" in [a.path for a in tracker.client.list_artifacts(run_id)]
    local = tracker.client.download_artifacts(run_id, "samples/step_0000050/abc123.mp4", str(tmp_path))
    with open(local, "rb") as handle:
        assert handle.read() == data
    assert video.decode_video_bytes(data).shape == (5, 32, 48, 3)
    tracker.end()


def test_log_model_logs_and_registers_with_the_stage(mlflow_server, tiny_export, tmp_path):
    import pandas as pd

    name = _name("sama-model")
    tracker = _tracker(mlflow_server, registered_model=name)
    run_id = tracker.start("model")
    first = tracker.log_model(tiny_export, 0)
    assert first["registered_model"] == name and int(first["version"]) == 1
    second = tracker.log_model(tiny_export, 1)
    assert int(second["version"]) == 2
    client = tracker.client
    assert client.get_model_version(name, "1").tags["stage"] == "stage0"
    assert client.get_model_version(name, "2").tags["stage"] == "stage1"
    assert client.get_model_version(name, "1").run_id == run_id
    assert client.get_registered_model(name).tags["task"] == "instruction-guided video editing"
    model_id = first["model_uri"].split("/")[-1]
    assert client.get_logged_model(model_id).source_run_id == run_id
    tracker.end()
    # Without a registered name (in the call or the config) the model is logged only.
    plain = _tracker(mlflow_server)
    plain.start("unregistered")
    unregistered = plain.log_model(tiny_export, 0)
    assert set(unregistered) == {"model_uri"}
    plain.end()

    # The tracker left MLflow's global tracking URI alone.
    assert os.environ.get("MLFLOW_TRACKING_URI") != mlflow_server
    # The logged pyfunc model edits a video with the exported pipeline.
    mlflow.set_tracking_uri(mlflow_server)
    model = mlflow.pyfunc.load_model(second["model_uri"])
    assert model.metadata.metadata == {"sama_stage": 1}
    clip = synthetic.render(synthetic.random_scene(5), 5, 8.0, 32, 32)
    source = tmp_path / "in.mp4"
    source.write_bytes(video.encode_mp4(clip, 8.0))
    output = tmp_path / "out.mp4"
    frame = pd.DataFrame(
        [{"video": str(source), "instruction": "make it red", "output": str(output), "steps": 2, "cfg": 1.0}]
    )
    reports = model.predict(frame)
    assert reports[0]["frames"] == 5 and reports[0]["steps"] == 2
    assert video.decode_video_bytes(output.read_bytes()).shape == (5, 32, 32, 3)


def test_end_sets_the_final_status(mlflow_server):
    tracker = _tracker(mlflow_server)
    run_id = tracker.start("ends")
    tracker.end()
    run = tracker.client.get_run(run_id)
    assert run.info.status == "FINISHED" and run.info.end_time is not None
    failing = _tracker(mlflow_server, tracker.cfg.experiment)
    failed_id = failing.start("fails")
    failing.end("FAILED")
    assert failing.client.get_run(failed_id).info.status == "FAILED"


def test_system_metrics_are_logged_while_the_run_lasts(mlflow_server):
    """The monitor samples CPU and memory into the run (``system/*``) until the run ends."""
    import time

    cfg = TrackingConfig(
        uri=mlflow_server, experiment=_name("sysmetrics"), system_metrics=True, system_metrics_interval_s=0.5
    )
    tracker = Tracker(cfg, enabled=True)
    run_id = tracker.start("system")
    deadline = time.monotonic() + 60
    metrics: dict = {}
    while time.monotonic() < deadline and "system/cpu_utilization_percentage" not in metrics:
        metrics = tracker.client.get_run(run_id).data.metrics  # polled: the monitor logs when it samples
        time.sleep(0.1)  # between polls only; the condition above is what is waited for
    tracker.end()
    assert "system/cpu_utilization_percentage" in metrics, sorted(metrics)
    assert "system/system_memory_usage_megabytes" in metrics, sorted(metrics)
    assert tracker.client.get_run(run_id).info.status == "FINISHED"


def test_the_aws_secret_never_reaches_the_run(mlflow_server, monkeypatch):
    """The secret is in the environment and, as users write it, inside the config's URIs (userinfo
    and a presigned query): what the trainer logs (params, tags, config.yaml) must hold none of it."""
    secret = f"secret-{uuid.uuid4().hex}"
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", secret)
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "key-id")
    cfg = _debug_config()
    cfg.data.sources[0].uri = f"s3://key-id:{secret}@bucket/pretext/shards/video"
    cfg.data.val_uri = f"https://bucket.s3.amazonaws.com/val?X-Amz-Signature={secret}"
    tracker = _tracker(mlflow_server)
    run_id = tracker.start(cfg.run.name, tags={"stage": "0"})
    tracker.log_params(config_lib.to_dict(cfg))
    tracker.log_text(config_lib.dumps(cfg), "config.yaml")
    assert tracker.flush()
    run = tracker.client.get_run(run_id)
    assert run.data.params
    for key, value in [*run.data.params.items(), *run.data.tags.items()]:
        assert secret not in key and secret not in value, key
    with open(tracker.client.download_artifacts(run_id, "config.yaml")) as handle:
        assert secret not in handle.read()
    tracker.end()


def test_a_disabled_tracker_does_nothing(tmp_path):
    for tracker in (
        Tracker(TrackingConfig(), enabled=False, default_local_dir=str(tmp_path / "a")),
        Tracker(TrackingConfig(enabled=False), enabled=True, default_local_dir=str(tmp_path / "b")),
    ):
        assert tracker.tracking_uri is None
        assert tracker.start("x") is None
        tracker.log_params({"a": 1})
        tracker.log_metrics({"m": 1.0}, 1)
        tracker.log_video(b"data", "v.mp4")
        assert tracker.log_model(str(tmp_path), 0) == {}
        tracker.end()
    assert not os.path.exists(tmp_path / "a") and not os.path.exists(tmp_path / "b")


# ----------------------------------------------------------------------------------------------
# The local default store


def test_default_local_store_is_sqlite_with_artifacts_beside_it(tmp_path):
    assert "MLFLOW_TRACKING_URI" not in os.environ
    directory = tmp_path / "runs" / "mlruns"
    tracker = Tracker(
        TrackingConfig(experiment="sama-local", system_metrics=False), True, default_local_dir=str(directory)
    )
    database = directory / "mlflow.db"
    assert tracker.tracking_uri == f"sqlite:///{database}"
    assert local_artifact_root(tracker.tracking_uri) == f"file://{directory / 'artifacts'}"
    run_id = tracker.start("local")
    tracker.log_text("hello", "notes/config.yaml")
    tracker.log_metrics({"train/loss": 0.5}, 1)
    tracker.end()
    assert database.is_file()
    experiment = tracker.client.get_experiment_by_name("sama-local")
    assert experiment.artifact_location == f"file://{directory / 'artifacts'}"
    artifact_uri = tracker.client.get_run(run_id).info.artifact_uri
    assert artifact_uri.startswith(f"file://{directory / 'artifacts'}/")
    stored = os.path.join(artifact_uri[len("file://") :], "notes", "config.yaml")
    with open(stored) as handle:
        assert handle.read() == "hello"
    assert sorted(os.listdir(directory)) == ["artifacts", "mlflow.db"]


def test_tracking_uri_resolution_order(tmp_path, monkeypatch):
    local = str(tmp_path / "store")
    assert resolve_tracking_uri(TrackingConfig(), local) == f"sqlite:///{local}/mlflow.db"
    assert os.path.isdir(local)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://tracking.example:5000")
    assert resolve_tracking_uri(TrackingConfig(), local) == "http://tracking.example:5000"
    assert resolve_tracking_uri(TrackingConfig(uri="http://explicit:1"), local) == "http://explicit:1"
    assert local_artifact_root("http://explicit:1") is None


def test_two_local_trackers_in_one_process_keep_their_own_stores(tmp_path):
    first = Tracker(TrackingConfig(system_metrics=False), True, default_local_dir=str(tmp_path / "a"))
    first.start("a")
    first.end()
    second = Tracker(TrackingConfig(system_metrics=False), True, default_local_dir=str(tmp_path / "b"))
    assert second.tracking_uri == f"sqlite:///{tmp_path / 'b' / 'mlflow.db'}"


def test_log_model_uses_the_trackers_own_store(tmp_path, tiny_export):
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    first = _tracker(f"sqlite:///{tmp_path / 'a' / 'mlflow.db'}")
    first.start("a")
    second = _tracker(f"sqlite:///{tmp_path / 'b' / 'mlflow.db'}")
    second.start("b")
    result = first.log_model(tiny_export, 0)
    model_id = result["model_uri"].split("/")[-1]
    assert first.client.get_logged_model(model_id).source_run_id == first.run_id


def test_log_model_leaves_no_global_registry_behind(tmp_path, tiny_export, monkeypatch):
    """A tracker's registration must not redirect other clients in the process: a client made
    afterwards for another store reads that store's registry, not the tracker's."""
    from mlflow.tracking import MlflowClient

    monkeypatch.delenv("MLFLOW_REGISTRY_URI", raising=False)
    (tmp_path / "a").mkdir()
    (tmp_path / "other").mkdir()
    name = _name("model")
    tracker = _tracker(f"sqlite:///{tmp_path / 'a' / 'mlflow.db'}", registered_model=name)
    tracker.start("a")
    tracker.log_model(tiny_export, 1)
    assert "MLFLOW_REGISTRY_URI" not in os.environ
    assert "MLFLOW_TRACKING_URI" not in os.environ
    other_uri = f"sqlite:///{tmp_path / 'other' / 'mlflow.db'}"
    other = MlflowClient(other_uri)
    assert other._registry_uri == other_uri
    assert other.search_model_versions(f"name = '{name}'") == []
    versions = tracker.client.search_model_versions(f"name = '{name}'")
    assert [(v.run_id, v.tags.get("stage")) for v in versions] == [(tracker.run_id, "stage1")]


def test_a_separate_registry_gets_the_model_version(tmp_path, tiny_export):
    (tmp_path / "runs").mkdir()
    (tmp_path / "registry").mkdir()
    registry = f"sqlite:///{tmp_path / 'registry' / 'mlflow.db'}"
    name = _name("model")
    tracker = _tracker(
        f"sqlite:///{tmp_path / 'runs' / 'mlflow.db'}", registered_model=name, registry_uri=registry
    )
    tracker.start("r")
    result = tracker.log_model(tiny_export, 0)
    from mlflow.tracking import MlflowClient

    versions = MlflowClient(registry, registry_uri=registry).search_model_versions(f"name = '{name}'")
    assert [(str(v.version), v.tags.get("stage")) for v in versions] == [(str(result["version"]), "stage0")]


# ----------------------------------------------------------------------------------------------
# Where a training run is tracked, and resuming into a store that lost the run


def test_training_store_never_lands_in_a_workers_directory(tmp_path, monkeypatch):
    runs = str(tmp_path / "runs")
    assert training_store(TrackingConfig(), runs) == (f"sqlite:///{runs}/mlruns/mlflow.db", None)
    assert training_store(TrackingConfig(uri="http://mlflow:5000"), "s3://b/runs") == (
        "http://mlflow:5000",
        None,
    )
    local = TrackingConfig(uri="local", local_dir=str(tmp_path / "store"))
    assert training_store(local, "s3://b/runs") == (None, str(tmp_path / "store"))
    with pytest.raises(TrackingNotConfigured) as caught:
        training_store(TrackingConfig(), "s3://b/runs")
    message = str(caught.value)
    assert "run.storage_uri is s3://b/runs" in message
    assert "tracking.uri (or MLFLOW_TRACKING_URI)" in message and "tracking.uri=local" in message
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://from-env:5000")
    assert training_store(TrackingConfig(), "s3://b/runs") == ("http://from-env:5000", None)


def test_a_local_tracking_server_keeps_the_store_in_its_directory(tmp_path):
    directory = tmp_path / "mlruns"
    with LocalTrackingServer(str(directory)) as server:
        assert server.uri.startswith("http://127.0.0.1:")
        tracker = _tracker(server.uri)
        run_id = tracker.start("served")
        tracker.log_metrics({"train/loss": 0.25}, 3)
        tracker.log_text("hello", "notes/a.txt")
        tracker.end()
    assert (directory / "mlflow.db").is_file()
    # The store reads without the server, as `mlflow ui --backend-store-uri sqlite:///...` does.
    from mlflow.tracking import MlflowClient

    client = MlflowClient(f"sqlite:///{directory / 'mlflow.db'}")
    assert [m.value for m in client.get_metric_history(run_id, "train/loss")] == [0.25]
    stored = list((directory / "artifacts").rglob("a.txt"))
    assert len(stored) == 1 and stored[0].read_text() == "hello"


def test_resuming_a_run_the_store_does_not_have_starts_a_linked_run(tmp_path):
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    first = _tracker(uri, experiment="resume-links")
    old = first.start("r")
    assert first.created_run
    first.end("FAILED")
    # Continuing an existing run creates nothing.
    again = _tracker(uri, experiment="resume-links")
    assert again.start("r", run_id=old) == old and not again.created_run
    again.end()
    # A deleted run, or an id from another store: a new run, linked to the old one and the checkpoint.
    first.client.delete_run(old)
    for missing in (old, uuid.uuid4().hex):
        tracker = _tracker(uri, experiment="resume-links")
        new = tracker.start(
            "r", run_id=missing, tags={"stage": "0"}, resumed_from="s3://b/runs/r/checkpoint_1 (step 10)"
        )
        assert new != missing and tracker.created_run
        tags = tracker.client.get_run(new).data.tags
        assert tags["sama.previous_mlflow_run"] == missing
        assert tags["sama.resumed_from"] == "s3://b/runs/r/checkpoint_1 (step 10)"
        assert tags["stage"] == "0"
        tracker.log_metrics({"train/loss": 0.1}, 11)
        tracker.end()


# ----------------------------------------------------------------------------------------------
# A tracking outage never stops training


def _wait_for(condition, timeout_s: float) -> bool:
    import time

    deadline = time.monotonic() + timeout_s
    while not condition():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.2)
    return True


def test_an_outage_holds_the_writes_and_sends_them_when_the_server_is_back(tmp_path, caplog):
    """The server stops mid-run: every call still returns at once, the loop goes on, one warning
    marks the outage; restarted on the same port and store, the held writes arrive, each once.
    Its own server (not the session's), so stopping it disturbs no other test."""
    import logging
    import time

    from mlflow.tracking import MlflowClient

    caplog.set_level(logging.WARNING, logger="sama.tracking")
    server = LocalTrackingServer(str(tmp_path / "store"))
    server.__enter__()
    try:
        tracker = _tracker(server.uri)
        run_id = tracker.start("outage")
        for step in range(1, 4):
            tracker.log_metrics({"train/loss": 1.0 / step}, step)
        assert tracker.flush(30)

        server.__exit__(None, None, None)  # the store goes away mid-run
        slowest = 0.0
        for step in range(4, 14):  # training goes on
            began = time.monotonic()
            tracker.log_metrics({"train/loss": 1.0 / step, "perf/step_s": 0.2}, step)
            if step == 8:
                tracker.log_video(b"mp4 bytes", f"samples/step_{step:07d}/clip.mp4")
            slowest = max(slowest, time.monotonic() - began)
            time.sleep(0.2)  # the time a training step takes: no wait for anything
        assert slowest < 1.0, slowest
        assert _wait_for(lambda: "is unreachable" in caplog.text, 60)
        assert not tracker.flush(1.0)  # held, not lost

        server.__enter__()  # back, on the same port over the same store
        assert tracker.flush(120)
        client = MlflowClient(server.uri)
        history = client.get_metric_history(run_id, "train/loss")
        assert sorted(m.step for m in history) == list(range(1, 14))  # every step, once
        assert {m.step: m.value for m in history}[10] == pytest.approx(0.1)
        assert [a.path for a in client.list_artifacts(run_id, "samples/step_0000008")] == [
            "samples/step_0000008/clip.mp4"
        ]
        messages = [r.getMessage() for r in caplog.records if r.name == "sama.tracking"]
        assert sum("is unreachable" in m for m in messages) == 1, messages
        assert sum("is reachable again" in m for m in messages) == 1, messages

        # A run that ends while the store is down ends within the bounded wait, never raising.
        server.__exit__(None, None, None)
        tracker.log_metrics({"train/loss": 0.0}, 14)
        began = time.monotonic()
        tracker.end("FINISHED", timeout_s=2)
        assert time.monotonic() - began < 15
        assert "never sent" in caplog.text
    finally:
        server.__exit__(None, None, None)
