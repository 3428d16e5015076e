"""Shared test fixtures: one small local Ray cluster, a loopback S3 server and a local MLflow server.

Each service is started at most once per test session, by the first test that asks for it, and
stopped at the end. Unit tests ask for none of them.
"""

from __future__ import annotations

import os
import socket
import uuid

import pytest


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def pytest_collection_modifyitems(config, items):
    try:
        import torch

        has_cuda = torch.cuda.is_available()
    except ImportError:
        has_cuda = False
    if has_cuda:
        return
    skip_gpu = pytest.mark.skip(reason="needs a CUDA device (none here)")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip_gpu)


@pytest.fixture(scope="session")
def s3_server():
    """A moto S3 server on loopback; sets the standard AWS_* variables for the whole session.

    Yields the endpoint URL. Tests create their own bucket with ``s3_bucket``.
    """
    from moto.server import ThreadedMotoServer

    from tests.s3_faults import S3FaultProxy

    port = _free_port()
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    # Every request goes through a proxy that tests can tell to fail (``s3_faults``).
    proxy = S3FaultProxy("127.0.0.1", port).start()
    endpoint = proxy.endpoint
    saved = {k: os.environ.get(k) for k in _AWS_VARS}
    os.environ.update(
        {
            "AWS_ACCESS_KEY_ID": "testing",
            "AWS_SECRET_ACCESS_KEY": "testing-secret-never-logged",
            "AWS_DEFAULT_REGION": "us-east-1",
            "AWS_ENDPOINT_URL": endpoint,
            # Botocore's retries with backoff, kept short so a persistent fault fails in seconds.
            "AWS_MAX_ATTEMPTS": "3",
        }
    )
    os.environ.pop("AWS_SESSION_TOKEN", None)
    os.environ.pop("AWS_ENDPOINT_URL_S3", None)
    _s3_proxy.append(proxy)
    try:
        yield endpoint
    finally:
        _s3_proxy.clear()
        proxy.stop()
        server.stop()
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


_AWS_VARS = (
    "AWS_ACCESS_KEY_ID",
    "AWS_SECRET_ACCESS_KEY",
    "AWS_DEFAULT_REGION",
    "AWS_ENDPOINT_URL",
    "AWS_ENDPOINT_URL_S3",
    "AWS_SESSION_TOKEN",
    "AWS_MAX_ATTEMPTS",
)
_s3_proxy: list = []


@pytest.fixture
def s3_faults(s3_server):
    """The fault-injecting proxy every S3 request goes through; its rules end with the test."""
    proxy = _s3_proxy[0]
    proxy.clear()
    try:
        yield proxy
    finally:
        proxy.clear()


@pytest.fixture
def s3_bucket(s3_server):
    """A fresh, empty bucket on the loopback server; yields its ``s3://`` URI."""
    import boto3

    name = f"sama-test-{uuid.uuid4().hex[:12]}"
    boto3.client("s3", endpoint_url=s3_server).create_bucket(Bucket=name)
    return f"s3://{name}"


@pytest.fixture(scope="session")
def ray_cluster(tmp_path_factory, s3_server):
    """One local Ray instance for the session (2 CPUs).

    It depends on the S3 server so that Ray's worker processes inherit the AWS_* variables.
    """
    import ray

    if ray.is_initialized():
        yield ray
        return
    context = ray.init(
        num_cpus=2,
        # The dashboard serves the state API (ray.util.state), which tests use to find workers.
        include_dashboard=True,
        dashboard_port=_free_port(),
        log_to_driver=False,
        configure_logging=False,
        _temp_dir=str(tmp_path_factory.mktemp("ray")),
        runtime_env={"env_vars": {k: v for k in _AWS_VARS if (v := os.environ.get(k))}},
    )
    # Other Ray clusters may run on this machine: state-API calls must name ours.
    ray.test_dashboard_url = f"http://{context.dashboard_url}"
    try:
        yield ray
    finally:
        ray.shutdown()


@pytest.fixture(scope="session")
def mlflow_server(tmp_path_factory):
    """A local MLflow tracking server (sqlite backend, local artifacts); yields its URI."""
    from sama.tracking import LocalTrackingServer

    with LocalTrackingServer(str(tmp_path_factory.mktemp("mlflow"))) as server:
        yield server.uri


@pytest.fixture(scope="session")
def tiny_edit_export(tmp_path_factory):
    """A tiny SAMA export (seeded random weights) that edits at the quickstart's buckets, fps and
    clip length, in 2 steps without guidance: what the evaluation tests edit with."""
    import dataclasses

    import torch

    from sama.models.presets import build_model
    from sama.pipeline_edit import SamaEditPipeline
    from sama.quickstart import inference_config

    torch.manual_seed(0)
    directory = str(tmp_path_factory.mktemp("tiny-edit-export"))
    settings = dataclasses.replace(inference_config(), num_inference_steps=2, guidance_scale=1.0)
    SamaEditPipeline.from_components(build_model("tiny"), settings).save_pretrained(directory)
    return directory
