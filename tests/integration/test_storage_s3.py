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
