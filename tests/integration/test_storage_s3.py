"""Object-storage writes under injected faults, on the loopback S3 server."""

from __future__ import annotations

import os

import boto3
import pytest
import s3fs.core

from sama import storage

pytestmark = pytest.mark.integration


def _fail_upload_part(monkeypatch, failing_part: int) -> list[int]:
    """Make the ``failing_part``-th ``upload_part`` call of any S3 file raise, as a 5xx would."""
    monkeypatch.setattr(storage, "_UPLOAD_PART_SIZE", 5 * 1024 * 1024)
    parts: list[int] = []
    real_call = s3fs.core.S3File._call_s3

    def call_s3(self, method, *args, **kwargs):
        if method == "upload_part":
            parts.append(kwargs.get("PartNumber", 0))
            if len(parts) == failing_part:
                raise OSError("injected: upload_part failed (503 Slow Down)")
        return real_call(self, method, *args, **kwargs)

    monkeypatch.setattr(s3fs.core.S3File, "_call_s3", call_s3)
    return parts


@pytest.mark.parametrize("failing_part", [1, 2])
def test_failed_multipart_part_publishes_nothing_and_aborts_the_upload(
    s3_bucket, s3_server, monkeypatch, failing_part
):
    # 12 MiB in 8 MiB writes over 5 MiB parts: part 1 goes out (and fails) inside a write, part 2
    # inside the final close.
    data = os.urandom(12 * 1024 * 1024)
    uri = storage.join(s3_bucket, "shards", "big.tar")
    parts = _fail_upload_part(monkeypatch, failing_part)
    with pytest.raises(OSError, match="injected"):
        storage.write_bytes(uri, data)
    assert len(parts) == failing_part
    assert not storage.exists(uri)
    assert storage.list_files(s3_bucket) == []
    client = boto3.client("s3", endpoint_url=s3_server)
    bucket = s3_bucket.removeprefix("s3://")
    assert client.list_multipart_uploads(Bucket=bucket).get("Uploads", []) == []

    monkeypatch.undo()
    storage.write_bytes(uri, data)
    assert storage.read_bytes(uri) == data


def test_failed_atomic_write_keeps_the_previous_object(s3_bucket, monkeypatch):
    uri = storage.join(s3_bucket, "_markers", "unit.json")
    storage.write_text(uri, "old")
    _fail_upload_part(monkeypatch, 1)
    with pytest.raises(OSError, match="injected"):
        storage.write_bytes(uri, os.urandom(11 * 1024 * 1024))
    assert storage.read_text(uri) == "old"


def _put(s3_server: str, bucket_uri: str, key: str, body: bytes) -> None:
    bucket = bucket_uri.removeprefix("s3://")
    boto3.client("s3", endpoint_url=s3_server).put_object(Bucket=bucket, Key=key, Body=body)


def test_localize_dir_downloads_once_and_refetches_a_changed_tree(s3_bucket, s3_server, tmp_path):
    _put(s3_server, s3_bucket, "export/sama_pipeline.json", b"{}")
    _put(s3_server, s3_bucket, "export/transformer/config.json", b'{"a": 1}')
    cache = str(tmp_path / "cache")
    first = storage.localize_dir(f"{s3_bucket}/export", cache_dir=cache)
    with open(os.path.join(first, "transformer", "config.json"), "rb") as handle:
        assert handle.read() == b'{"a": 1}'
    assert sorted(os.listdir(first)) == ["sama_pipeline.json", "transformer"]
    # Unchanged: the same directory, nothing fetched again; the prefix "export2" is not "export".
    _put(s3_server, s3_bucket, "export2/other.json", b"x")
    assert storage.localize_dir(f"{s3_bucket}/export/", cache_dir=cache) == first
    # Changed remotely: a new copy; no staging directory is left behind.
    _put(s3_server, s3_bucket, "export/transformer/config.json", b'{"a": 2}')
    second = storage.localize_dir(f"{s3_bucket}/export", cache_dir=cache)
    assert second != first
    with open(os.path.join(second, "transformer", "config.json"), "rb") as handle:
        assert handle.read() == b'{"a": 2}'
    assert sorted(os.listdir(os.path.join(cache, "models"))) == sorted(
        [os.path.basename(first), os.path.basename(second)]
    )


@pytest.mark.parametrize("bad_key", ["export/../../escaped", "export/a/../../../x"])
def test_localize_dir_refuses_names_that_escape_the_target(s3_bucket, s3_server, tmp_path, bad_key):
    _put(s3_server, s3_bucket, "export/sama_pipeline.json", b"{}")
    _put(s3_server, s3_bucket, bad_key, b"payload")
    cache = tmp_path / "cache"
    with pytest.raises(storage.StorageError, match="outside the model directory"):
        storage.localize_dir(f"{s3_bucket}/export", cache_dir=str(cache))
    # Nothing written anywhere: no published copy, no staging directory, no escaped file.
    assert not (cache / "models").exists() or os.listdir(cache / "models") == []
    assert not list(tmp_path.rglob("escaped")) and not list(tmp_path.rglob("x"))


def test_localize_dir_on_an_empty_prefix_says_so(s3_bucket, tmp_path):
    with pytest.raises(storage.StorageError, match="no objects under this prefix"):
        storage.localize_dir(f"{s3_bucket}/nothing", cache_dir=str(tmp_path))


def test_localize_dir_that_cannot_read_an_object_publishes_nothing(
    s3_bucket, s3_server, s3_faults, tmp_path, monkeypatch
):
    monkeypatch.setenv("AWS_MAX_ATTEMPTS", "2")  # the failure is persistent: fewer retries, same end
    _put(s3_server, s3_bucket, "export/sama_pipeline.json", b"{}")
    _put(s3_server, s3_bucket, "export/transformer/weights.bin", b"w" * 1024)
    s3_faults.fail("GET", r"/export/transformer/weights\.bin")
    cache = tmp_path / "cache"
    with pytest.raises(storage.StorageUnavailable, match="weights.bin"):
        storage.localize_dir(f"{s3_bucket}/export", cache_dir=str(cache))
    # Neither a published copy nor a staging directory is left; the next try downloads it all.
    assert os.listdir(cache / "models") == []
    s3_faults.clear()
    local = storage.localize_dir(f"{s3_bucket}/export", cache_dir=str(cache))
    with open(os.path.join(local, "transformer", "weights.bin"), "rb") as handle:
        assert handle.read() == b"w" * 1024
