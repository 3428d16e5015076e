"""Credentials never reach what a job records: a prep-pairs job and a short training run, with
credentials in the environment and in URIs (manifest rows, config values, tracking tags), leave
none in their output files, their MLflow params, tags and artifacts, their logs or their output,
their Ray workers' output included; what a data job's worker logs is redacted; an export's
manifest records no credential of its model config."""

from __future__ import annotations

import dataclasses
import glob
import json
import logging
import os
import time

import pytest

from pipelines import common
from sama import quickstart, storage, synthetic
from sama.cli import main
from sama.prep import ledger
from sama.prep.inputs import read_table
from sama.redaction import RedactingFilter
from sama.tracking import sqlite_uri

pytestmark = [pytest.mark.integration, pytest.mark.slow]

# Recorded by the jobs (rejected rows, config values, tags) but never read: no request is made.
CRED_URI = "s3://AKIAFAKEKEY:fakeSecretValue123@bucket/x.mp4"
PRESIGNED = "https://objects.example.com/obj.mp4?X-Amz-Signature=deadbeefsig&X-Amz-Credential=AKIAPRESIGN"
BASIC_AUTH = "http://alice:hunter2secretpw@judge.example.com/v1"
# Set in the test process only (the driver: config.yaml, summary, MLflow tags it sets, messages).
DRIVER_ENV = {
    "HF_TOKEN": "hf_fakeEnvToken0123456789",
    "OPENAI_API_KEY": "sk-fakeOpenAIKey0123456789",
    "MY_SERVICE_PASSWORD": "fakeServicePassword42",
}
URI_SECRETS = ("AKIAFAKEKEY", "fakeSecretValue123", "deadbeefsig", "AKIAPRESIGN", "hunter2secretpw")


def secrets() -> list[str]:
    # The loopback S3 server's secret key is in the environment of the driver and of every Ray
    # worker (tests/conftest.py): what a worker records is checked against it too.
    return [*URI_SECRETS, *DRIVER_ENV.values(), os.environ["AWS_SECRET_ACCESS_KEY"]]


def leaks(data: bytes | str, where: str) -> list[str]:
    text = data if isinstance(data, str) else data.decode("utf-8", "replace")
    return [f"{secret!r} in {where}" for secret in secrets() if secret in text]


def leaks_in_tree(root: str) -> list[str]:
    found = []
    for directory, _, files in os.walk(root):
        for name in files:
            path = os.path.join(directory, name)
            with open(path, "rb") as handle:
                found += leaks(handle.read(), path)
    return found


def leaks_in_mlflow(tracking_uri: str, run_name: str, workdir: str) -> tuple[list[str], int]:
    """Every param, tag and artifact of the runs named ``run_name``; returns (leaks, artifacts)."""
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri)
    experiment = client.get_experiment_by_name("sama-tests")
    runs = client.search_runs([experiment.experiment_id], f"attributes.run_name = '{run_name}'")
    assert runs, f"no MLflow run named {run_name}"
    found, artifacts = [], 0
    for run in runs:
        run_id = run.info.run_id
        found += leaks(json.dumps(run.data.params), f"params of {run_id}")
        found += leaks(json.dumps(run.data.tags), f"tags of {run_id}")
        local = client.download_artifacts(run_id, "", os.path.join(workdir, run_id))
        artifacts += sum(len(files) for _, _, files in os.walk(local))
        found += leaks_in_tree(local)
    for version in client.search_model_versions(f"run_id = '{runs[0].info.run_id}'"):
        found += leaks(json.dumps(dict(version)), f"model version {version.version}")
    return found, artifacts


def _worker_files() -> list[str]:
    """The stdout/stderr files of the test cluster's worker processes (``worker-*.out|err``)."""
    import ray

    logs_dir = os.path.join(ray._private.worker._global_node.get_session_dir_path(), "logs")
    return sorted(glob.glob(os.path.join(logs_dir, "worker-*")))


def worker_output_mark() -> dict[str, int]:
    """Where each worker file ends now: :func:`worker_output_since` reads what comes after. The
    cluster is the session's: what workers wrote for earlier tests is not this test's."""
    return {path: os.path.getsize(path) for path in _worker_files()}


def worker_output_since(mark: dict[str, int], expect: str, timeout_s: float = 60) -> str:
    """What the workers wrote since ``mark``, once it contains ``expect`` (or ``timeout_s`` passed:
    the caller's assertion on ``expect`` then fails with the text)."""
    deadline = time.monotonic() + timeout_s
    while True:
        text = ""
        for path in _worker_files():
            with open(path, "rb") as handle:
                handle.seek(mark.get(path, 0))
                text += handle.read().decode("utf-8", "replace")
        if expect in text or time.monotonic() > deadline:
            return text
        time.sleep(0.2)  # between polls only


# Logged by a data job's worker (run_units' task, and an actor of its pool): a credentialed URI
# and the worker-wide secret.
WORKER_LOGGER = "sama.prep.unit"


def _unit_logging_credentials(unit_json: str) -> ledger.UnitResult:
    unit_id = json.loads(unit_json)["unit_id"]
    logging.getLogger(WORKER_LOGGER).warning(
        "unit %s reads %s with key %s", unit_id, CRED_URI, os.environ["AWS_SECRET_ACCESS_KEY"]
    )
    return ledger.UnitResult(unit_id=unit_id)


def _pool_logging_credentials():
    logging.getLogger(WORKER_LOGGER).warning("actor loads its models from %s", PRESIGNED)
    return _unit_logging_credentials


def test_data_workers_log_no_credentials(ray_cluster):
    """What a Ray Data worker of a data job logs (its tasks, and its actors' set-up and units)
    reaches the worker's output, and the driver with ``log_to_driver``, redacted."""
    mark = worker_output_mark()
    units = [json.dumps({"unit_id": f"creds-{i}"}) for i in range(2)]
    results, failures = common.run_units(units, _unit_logging_credentials, what="units")
    assert not failures and len(results) == 2
    pool = common.ActorPool(_pool_logging_credentials, size=1, num_cpus=1, num_gpus=0)
    actor_units = [json.dumps({"unit_id": f"creds-actor-{i}"}) for i in range(2)]
    results, failures = common.run_units(actor_units, None, what="units", actors=pool)
    assert not failures and len(results) == 2

    expected = "unit creds-actor-1 reads s3://bucket/x.mp4 with key <redacted>"
    text = worker_output_since(mark, expected)
    assert not leaks(text, "the workers' output"), text[-3000:]
    for unit_id in ("creds-0", "creds-1", "creds-actor-0", "creds-actor-1"):
        assert f"unit {unit_id} reads s3://bucket/x.mp4 with key <redacted>" in text, text[-3000:]
    assert "actor loads its models from https://objects.example.com/obj.mp4?<redacted>" in text


def test_export_manifest_records_no_credentials(tmp_path):
    """A model config whose weights come from a credentialed URI: the export's manifest
    (``sama_pipeline.json``: the model config, the frozen encoders' references) names the bucket
    without the credentials."""
    import torch

    from sama.models.presets import build_model
    from sama.pipeline_edit import PIPELINE_FILE, SamaEditPipeline

    torch.manual_seed(0)
    components = build_model("tiny")
    weights = "s3://AKIAFAKEKEY:fakeSecretValue123@bucket/wan?X-Amz-Signature=deadbeefsig"
    components.config = dataclasses.replace(components.config, pretrained=weights)
    for copy_frozen in (True, False):  # encoders copied, or referenced by their source
        export = tmp_path / f"export-{copy_frozen}"
        SamaEditPipeline.from_components(components).save_pretrained(str(export), copy_frozen=copy_frozen)
        text = (export / PIPELINE_FILE).read_text()
        found = [f"{secret!r} in {PIPELINE_FILE}" for secret in URI_SECRETS if secret in text]
        assert not found, "\n".join(found)
        manifest = json.loads(text)
        assert manifest["model"]["pretrained"] == "s3://bucket/wan?<redacted>"


def build_manifest(root: str) -> str:
    """Synthetic pairs plus rows that are rejected without being read: a credentialed s3:// URI,
    a presigned https URL, and a missing file whose name is the worker-wide secret."""
    base = synthetic.write_edit_pairs(storage.join(root, "data"), 6, seed=5, media="mixed", fps=8.0)
    rows = read_table(base)
    target = rows[0]["target"]
    rows += [
        {"source": CRED_URI, "target": target, "instruction": "make it red"},
        {"source": PRESIGNED, "target": target, "instruction": "make it blue"},
        {"source": f"pairs/{os.environ['AWS_SECRET_ACCESS_KEY']}.mp4", "target": target, "instruction": "x"},
    ]
    uri = storage.join(root, "data", "edits.csv")
    synthetic.write_manifest(rows, uri, columns=synthetic.MANIFEST_COLUMNS)
    return uri


@pytest.fixture
def redacted_caplog(caplog):
    """caplog at INFO; the CLI installs the redacting filter on the root handlers it finds."""
    caplog.set_level(logging.INFO)
    yield caplog
    for handler in logging.getLogger().handlers:
        for filt in [f for f in handler.filters if isinstance(f, RedactingFilter)]:
            handler.removeFilter(filt)
    for filt in [f for f in logging.getLogger().filters if isinstance(f, RedactingFilter)]:
        logging.getLogger().removeFilter(filt)


def test_prep_and_training_record_no_credentials(ray_cluster, tmp_path, monkeypatch, redacted_caplog, capsys):
    for name, value in DRIVER_ENV.items():
        monkeypatch.setenv(name, value)
    root = str(tmp_path)
    # A SQLite store (no server to start): its database file and artifacts are searched as bytes too.
    store = os.path.join(root, "mlstore")
    tracking_uri = sqlite_uri(store)
    manifest = build_manifest(root)
    pairs = os.path.join(root, "pairs")

    # prep-pairs: the credentialed rows are rejected (bad_location, missing), and config values
    # carrying credentials (allowed prefixes, the judge endpoint) land in config.yaml.
    mark = worker_output_mark()
    # --verbose: the most a job prints, its workers' INFO lines included ("rejected <row>: ...").
    prep_args = ["--verbose", "prep-pairs", "--manifest", manifest, "--output", pairs]
    for setting in [
        *quickstart.PAIR_SETTINGS,
        f'input.allowed_prefixes=["s3://AKIAFAKEKEY:fakeSecretValue123@bucket/allowed", '
        f'"/nonexistent/{DRIVER_ENV["HF_TOKEN"]}"]',
        f"judge.base_url={BASIC_AUTH}",
    ]:
        prep_args += ["--set", setting]
    assert main(prep_args) == 0
    rejects = [json.loads(line) for line in open(os.path.join(pairs, ledger.REJECTS_FILE))]
    reasons = sorted(r["reason"] for r in rejects)
    assert reasons.count("bad_location") == 2 and "missing" in reasons, rejects

    # A 2-step stage-0 run on those shards, with credentials in its tags and tracking config.
    runs = os.path.join(root, "runs")
    train_args = ["train", "--recipe", "debug"]
    for setting in [
        quickstart._sources(("pairs", f"{pairs}/shards/video", "video", 1.0)),
        f"data.val_uri={pairs}/shards/video",
        f"run.storage_uri={runs}",
        "run.name=secrets",
        f"tracking.uri={tracking_uri}",
        "tracking.experiment=sama-tests",
        f'tracking.tags={{"source"="{CRED_URI}", "presigned"="{PRESIGNED}", '
        f'"note"="{os.environ["AWS_SECRET_ACCESS_KEY"]}", "token"="{DRIVER_ENV["OPENAI_API_KEY"]}"}}',
        "max_steps=2",
        "log_every=1",
        "checkpoint.every_steps=2",
        "validation.every_steps=1000",
        "validation.eval_every=1000",
        "validation.render_samples=0",
        "scaling.num_workers=1",
    ]:
        train_args += ["--set", setting]
    assert main(train_args) == 0
    out, err = capsys.readouterr()
    info = json.loads(open(os.path.join(runs, "secrets", "run_info.json")).read())
    assert info["steps"] == 2

    found = leaks_in_tree(pairs) + leaks_in_tree(runs) + leaks_in_tree(store)
    mlflow_found, artifacts = leaks_in_mlflow(tracking_uri, "secrets", str(tmp_path / "artifacts"))
    assert artifacts > 0  # config.yaml and the model at least: the search looked at something
    found += mlflow_found
    found += leaks(out, "stdout") + leaks(err, "stderr") + leaks(redacted_caplog.text, "the logs")
    # Ray's workers (prep tasks, Ray Train workers): their output stays in the session's files.
    workers = worker_output_since(mark, ": bad_location")
    assert ": bad_location" in workers, workers[-3000:]  # the prep workers logged at INFO
    found += leaks(workers, "the Ray workers' output")
    assert not found, "\n".join(found)
    # What was redacted stays readable: config values and tags name their bucket and host.
    assert "s3://bucket/allowed" in open(os.path.join(pairs, ledger.CONFIG_FILE)).read()
    from mlflow.tracking import MlflowClient

    run = MlflowClient(tracking_uri).get_run(info["mlflow_run_id"])
    assert run.data.tags["source"] == "s3://bucket/x.mp4"
    assert run.data.tags["presigned"] == "https://objects.example.com/obj.mp4?<redacted>"
    assert run.data.params["tracking.tags.token"] == "<redacted>"
