from __future__ import annotations

import os

import pytest

from sama import storage
from sama.storage import StorageError


def test_parse_schemes(tmp_path):
    assert storage.parse("s3://bucket/a/b").path == "bucket/a/b"
    assert storage.parse("s3://bucket/a/").path == "bucket/a"
    assert storage.parse(f"file://{tmp_path}/x").path == f"{tmp_path}/x"
    assert storage.parse("relative/x").path == os.path.abspath("relative/x")
    with pytest.raises(StorageError, match="unsupported URI scheme 'gs'"):
        storage.parse("gs://bucket/x")
    with pytest.raises(StorageError, match="needs a bucket"):
        storage.parse("s3:///x")


def test_join_keeps_scheme(tmp_path):
    assert storage.join("s3://b/p", "x", "y.tar") == "s3://b/p/x/y.tar"
    assert storage.join(str(tmp_path), "a") == os.path.join(str(tmp_path), "a")


def test_write_read_list_delete(tmp_path):
    base = str(tmp_path / "root")
    storage.write_bytes(storage.join(base, "a", "1.mp4"), b"one")
    storage.write_text(storage.join(base, "b", "2.txt"), "two")
    storage.write_bytes(storage.join(base, ".hidden.mp4"), b"h")
    assert storage.read_bytes(storage.join(base, "a", "1.mp4")) == b"one"
    assert storage.read_text(storage.join(base, "b", "2.txt")) == "two"
    assert storage.list_files(base) == [storage.join(base, "a", "1.mp4"), storage.join(base, "b", "2.txt")]
    assert storage.list_files(base, suffixes=(".MP4",)) == [storage.join(base, "a", "1.mp4")]
    assert storage.list_files(str(tmp_path / "absent")) == []
    assert storage.size(storage.join(base, "a", "1.mp4")) == 3
    storage.delete(base, recursive=True)
    assert not storage.exists(base)


def test_missing_file_error_names_uri(tmp_path):
    missing = str(tmp_path / "nope.mp4")
    with pytest.raises(StorageError, match="nope.mp4: no such file"):
        storage.read_bytes(missing)
    with pytest.raises(StorageError, match="is a directory"):
        storage.open_read(str(tmp_path))


def test_atomic_write_leaves_nothing_on_failure(tmp_path):
    target = tmp_path / "out" / "shard.tar"
    with pytest.raises(RuntimeError, match="boom"), storage.atomic_writer(str(target)) as handle:
        handle.write(b"partial data")
        raise RuntimeError("boom")
    assert not target.exists()
    assert list((tmp_path / "out").iterdir()) == []  # no temporary file left behind either
    storage.write_bytes(str(target), b"complete")
    assert target.read_bytes() == b"complete"


def test_atomic_overwrite_is_all_or_nothing(tmp_path):
    target = tmp_path / "summary.json"
    storage.write_text(str(target), "old")
    with pytest.raises(ValueError), storage.atomic_writer(str(target)) as handle:
        handle.write(b"new but unfinished")
        raise ValueError
    assert target.read_text() == "old"


def test_s3_options_come_from_environment(monkeypatch):
    monkeypatch.setenv("AWS_ENDPOINT_URL", "http://127.0.0.1:9")
    monkeypatch.setenv("AWS_DEFAULT_REGION", "eu-west-1")
    monkeypatch.delenv("AWS_MAX_ATTEMPTS", raising=False)
    monkeypatch.delenv("AWS_RETRY_MODE", raising=False)
    opts = storage.s3_options()
    assert opts == {
        "client_kwargs": {"endpoint_url": "http://127.0.0.1:9", "region_name": "eu-west-1"},
        # Transient S3 errors are retried by botocore with backoff, not by a loop of ours.
        "config_kwargs": {"retries": {"max_attempts": storage.S3_MAX_ATTEMPTS, "mode": "standard"}},
    }
    monkeypatch.setenv("AWS_ENDPOINT_URL_S3", "http://127.0.0.1:10")
    monkeypatch.setenv("AWS_MAX_ATTEMPTS", "3")
    opts = storage.s3_options()
    assert opts["client_kwargs"]["endpoint_url"] == "http://127.0.0.1:10"
    assert opts["config_kwargs"]["retries"]["max_attempts"] == 3


def test_open_read_refuses_what_is_not_a_regular_file(tmp_path):
    fifo = tmp_path / "clip.mp4"
    os.mkfifo(fifo)  # opening it would block until a writer appears: forever
    with pytest.raises(storage.StorageError, match="not a regular file"):
        storage.open_read(str(fifo))
    with pytest.raises(storage.StorageError, match="directory"):
        storage.open_read(str(tmp_path))


def test_localize_dir_returns_local_directories_as_they_are(tmp_path, monkeypatch):
    (tmp_path / "export").mkdir()
    assert storage.localize_dir(str(tmp_path / "export")) == str(tmp_path / "export")
    assert storage.localize_dir(f"file://{tmp_path}/export") == str(tmp_path / "export")
    # A relative name that exists locally is a directory, never a hub id.
    monkeypatch.chdir(tmp_path)
    (tmp_path / "org").mkdir()
    (tmp_path / "org" / "model").mkdir()
    assert storage.localize_dir("org/model") == str(tmp_path / "org" / "model")
    # A missing local path with more than one separator is left for the caller to report.
    assert storage.localize_dir("runs/a/export") == str(tmp_path / "runs" / "a" / "export")


def test_localize_dir_reports_an_unreachable_hub_id(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    with pytest.raises(storage.StorageError, match="Hugging Face hub could not provide it"):
        storage.localize_dir("no-such-org/no-such-model")


def test_a_parent_removed_meanwhile_by_a_sibling_jobs_cleanup_is_made_again(tmp_path, monkeypatch):
    """Two jobs writing sibling outputs share a parent that one's preflight probe created and then
    removes (empty); the other's write must not fail when that happens between its directory
    checks (seen as FileNotFoundError in the quickstart's concurrent precompute jobs)."""
    real_mkdir = os.mkdir
    removed = []

    def mkdir_after_a_sibling_cleanup(path, *args, **kwargs):
        if str(path).endswith("pretext") and not removed:
            removed.append(path)
            os.rmdir(os.path.dirname(path))  # the sibling's cleanup: its empty parent goes
        return real_mkdir(path, *args, **kwargs)

    monkeypatch.setattr(os, "mkdir", mkdir_after_a_sibling_cleanup)
    target = tmp_path / "latents" / "pretext" / "_lease.json"
    storage.write_bytes(str(target), b"{}")
    assert removed and target.read_bytes() == b"{}"
