"""One way to reach any object: local paths, ``file://`` URIs and ``s3://`` URIs.

Every module that reads or writes data goes through here, so a job runs against a local directory
or an S3 bucket (AWS, MinIO, a loopback test server) by changing only the URI.

S3 credentials and the endpoint come from the standard AWS environment variables
(``AWS_ACCESS_KEY_ID``, ``AWS_SECRET_ACCESS_KEY``, ``AWS_SESSION_TOKEN``, ``AWS_DEFAULT_REGION``,
``AWS_ENDPOINT_URL``/``AWS_ENDPOINT_URL_S3``); they are never part of a URI or a configuration, so
they cannot leak into logs, saved configs or experiment tracking.

Writes are atomic: an object appears under its final name only once it is complete. Locally a
temporary sibling is renamed into place; on S3 the object is uploaded in one request (or one
multipart upload) only after the writer closes without error, and S3 never exposes a partial object.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import os
import posixpath
import re
import shutil
import stat
import tempfile
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from typing import IO

import fsspec

S3_SCHEMES = ("s3", "s3a")
_SPOOL_LIMIT = 64 * 1024 * 1024
# Multipart part size of S3 uploads (S3's minimum is 5 MiB; larger objects go out in parts).
_UPLOAD_PART_SIZE = 16 * 1024 * 1024


class StorageError(OSError):
    """A storage operation failed; the message names the URI and the cause."""

    def __init__(self, uri: str, reason: str):
        super().__init__(f"{uri}: {reason}")
        self.uri = uri
        self.reason = reason


class StorageUnavailable(OSError):
    """The storage service failed (5xx, throttling, a dropped connection) after the storage
    library's own retries: the object may be fine, so a job fails the work and retries it on its
    next run instead of rejecting the input."""

    def __init__(self, uri: str, reason: str):
        super().__init__(f"{uri}: storage unavailable: {reason}")
        self.uri = uri
        self.reason = reason

    def __reduce__(self):
        return (type(self), (self.uri, self.reason))


# Retries of S3 calls, by botocore's "standard" mode (exponential backoff with jitter on 5xx,
# throttling and connection errors). AWS_MAX_ATTEMPTS / AWS_RETRY_MODE override them as usual.
S3_MAX_ATTEMPTS = 8
S3_RETRY_MODE = "standard"


@dataclass(frozen=True)
class Location:
    """A parsed URI: the scheme (``file`` or ``s3``) and the path as the filesystem sees it."""

    scheme: str
    path: str

    @property
    def is_s3(self) -> bool:
        return self.scheme == "s3"

    def uri(self) -> str:
        return f"s3://{self.path}" if self.is_s3 else self.path


def parse(uri: str | os.PathLike) -> Location:
    """Split ``uri`` into a scheme and a filesystem path; local paths become absolute."""
    text = os.fspath(uri)
    if not text:
        raise StorageError(repr(text), "empty URI")
    if "://" in text:
        scheme, rest = text.split("://", 1)
        scheme = scheme.lower()
        if scheme in S3_SCHEMES:
            if not rest or rest.startswith("/"):
                raise StorageError(text, "an s3:// URI needs a bucket name")
            return Location("s3", rest.rstrip("/"))
        if scheme == "file":
            return Location("file", os.path.abspath(rest))
        raise StorageError(text, f"unsupported URI scheme {scheme!r} (use a local path, file:// or s3://)")
    return Location("file", os.path.abspath(os.path.expanduser(text)))


def s3_options() -> dict:
    """Keyword arguments for ``s3fs.S3FileSystem`` taken from the standard AWS variables."""
    options: dict = {}
    endpoint = os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL")
    client_kwargs: dict = {}
    if endpoint:
        client_kwargs["endpoint_url"] = endpoint
    region = os.environ.get("AWS_DEFAULT_REGION") or os.environ.get("AWS_REGION")
    if region:
        client_kwargs["region_name"] = region
    if client_kwargs:
        options["client_kwargs"] = client_kwargs
    retries = {
        "max_attempts": int(os.environ.get("AWS_MAX_ATTEMPTS") or S3_MAX_ATTEMPTS),
        "mode": os.environ.get("AWS_RETRY_MODE") or S3_RETRY_MODE,
    }
    options["config_kwargs"] = {"retries": retries}
    return options


def filesystem(uri: str | os.PathLike) -> tuple[fsspec.AbstractFileSystem, str]:
    """The fsspec filesystem serving ``uri`` and the path to pass to it."""
    loc = parse(uri)
    if loc.is_s3:
        # skip_instance_cache: the endpoint may change between tests or jobs in one process.
        fs = fsspec.filesystem("s3", skip_instance_cache=True, **s3_options())
        return fs, loc.path
    return fsspec.filesystem("file"), loc.path


def pyarrow_filesystem(uri: str | os.PathLike):
    """A ``pyarrow.fs.FileSystem`` for ``uri`` and the path in it (what Ray Data readers take)."""
    import pyarrow.fs as pafs

    loc = parse(uri)
    if not loc.is_s3:
        return pafs.LocalFileSystem(), loc.path
    endpoint = os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL")
    kwargs: dict = {}
    if endpoint:
        scheme, _, host = endpoint.partition("://")
        kwargs["endpoint_override"] = host or endpoint
        kwargs["scheme"] = scheme if host else "https"
    region = os.environ.get("AWS_DEFAULT_REGION") or os.environ.get("AWS_REGION")
    if region:
        kwargs["region"] = region
    return pafs.S3FileSystem(**kwargs), loc.path


def redact(uri: str) -> str:
    """``uri`` fit for a log or a rejects file: :func:`sama.redaction.redact_uri` (no
    user/password, the query string and fragment replaced by ``?<redacted>``, credential
    environment values replaced)."""
    from sama.redaction import redact_uri

    return redact_uri(uri)


def is_under(uri: str, prefix: str) -> bool:
    """Whether ``uri`` lies at or under ``prefix`` (both parsed; ``..`` already resolved)."""
    loc, base = parse(uri), parse(prefix)
    if loc.scheme != base.scheme:
        return False
    root = base.path.rstrip("/")
    return loc.path == root or loc.path.startswith(root + "/")


def join(base: str | os.PathLike, *parts: str) -> str:
    """Join path segments onto a URI, keeping its scheme."""
    base = os.fspath(base)
    if "://" in base:
        scheme, rest = base.split("://", 1)
        return f"{scheme}://" + posixpath.join(rest, *parts)
    return os.path.join(base, *parts)


def basename(uri: str) -> str:
    return posixpath.basename(parse(uri).path.rstrip("/"))


def exists(uri: str | os.PathLike) -> bool:
    fs, path = filesystem(uri)
    return fs.exists(path)


def size(uri: str | os.PathLike) -> int:
    fs, path = filesystem(uri)
    try:
        return int(fs.size(path))
    except FileNotFoundError as exc:
        raise StorageError(os.fspath(uri), "no such file") from exc


class _S3Reader(io.RawIOBase):
    """A seekable reader over an s3fs file whose service failures are :class:`StorageUnavailable`.

    s3fs raises plain ``OSError`` for a 5xx or a dropped connection that outlived botocore's
    retries; a decoder reading through it would take that for a damaged file.
    """

    def __init__(self, handle, uri: str):
        super().__init__()
        self._handle = handle
        self._uri = uri

    def _call(self, method, *args):
        try:
            return method(*args)
        except (FileNotFoundError, PermissionError) as exc:
            raise StorageError(self._uri, str(exc)) from exc
        except ValueError:
            raise  # a caller's mistake (a closed file, a bad whence), not the service
        except Exception as exc:
            raise StorageUnavailable(self._uri, f"{type(exc).__name__}: {exc}") from exc

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def readinto(self, buffer) -> int:
        data = self._call(self._handle.read, len(buffer))
        buffer[: len(data)] = data
        return len(data)

    def read(self, size: int = -1) -> bytes:
        return self._call(self._handle.read, size)

    def seek(self, offset: int, whence: int = io.SEEK_SET) -> int:
        return self._call(self._handle.seek, offset, whence)

    def tell(self) -> int:
        return self._handle.tell()

    def close(self) -> None:
        if not self.closed:
            self._handle.close()
        super().close()


def open_read(uri: str | os.PathLike, block_size: int = 4 * 1024 * 1024) -> IO[bytes]:
    """Open ``uri`` for streaming, seekable binary reading (never reads the whole object first).

    A missing object, a directory, no permission or (locally) something other than a regular
    file is a :class:`StorageError`; an S3 service failure, on opening or on any later read, is a
    :class:`StorageUnavailable`.
    """
    fs, path = filesystem(uri)
    try:
        if isinstance(fs, fsspec.implementations.local.LocalFileSystem):
            mode = os.stat(path).st_mode
            if stat.S_ISDIR(mode):
                raise IsADirectoryError(path)
            if not stat.S_ISREG(mode):
                # A FIFO or a device would block or never end: not an input.
                raise StorageError(os.fspath(uri), "not a regular file (a pipe, socket or device)")
            return open(path, "rb")  # the caller owns the handle
        return _S3Reader(fs.open(path, "rb", block_size=block_size), os.fspath(uri))
    except FileNotFoundError as exc:
        raise StorageError(os.fspath(uri), "no such file") from exc
    except IsADirectoryError as exc:
        raise StorageError(os.fspath(uri), "is a directory, not a file") from exc
    except PermissionError as exc:
        raise StorageError(os.fspath(uri), f"permission denied ({exc})") from exc
    except StorageError:
        raise
    except OSError as exc:
        if parse(uri).is_s3:
            raise StorageUnavailable(os.fspath(uri), f"{type(exc).__name__}: {exc}") from exc
        raise


def read_bytes(uri: str | os.PathLike) -> bytes:
    with open_read(uri) as handle:
        return handle.read()


def read_text(uri: str | os.PathLike, encoding: str = "utf-8") -> str:
    return read_bytes(uri).decode(encoding)


@contextlib.contextmanager
def atomic_writer(uri: str | os.PathLike) -> Iterator[IO[bytes]]:
    """Yield a binary file whose content appears at ``uri`` only if the block exits cleanly.

    On an exception (or a crash) nothing is left under the final name: a local write goes to a
    hidden temporary sibling that is renamed into place; an S3 write is spooled locally and
    uploaded once complete.
    """
    loc = parse(uri)
    if loc.is_s3:
        with tempfile.SpooledTemporaryFile(max_size=_SPOOL_LIMIT) as spool:
            yield spool
            spool.seek(0)
            _upload_all_or_nothing(spool, uri)
        return
    tmp_path = _temp_sibling(loc.path)
    try:
        with open(tmp_path, "wb") as handle:
            yield handle
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp_path, loc.path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp_path)
        raise


def _makedirs_local(path: str, attempts: int = 5) -> None:
    """``os.makedirs(path, exist_ok=True)``, retried when a parent vanishes meanwhile.

    Jobs writing sibling outputs at the same time share parents, and a job's preflight removes
    the empty directories its probe created (:func:`sama.preflight.writable`): one job's cleanup
    can remove a parent between another's existence check and its ``mkdir``. Once the child
    exists the parent is no longer empty and stays."""
    for attempt in range(attempts):
        try:
            os.makedirs(path, exist_ok=True)
            return
        except FileNotFoundError:
            if attempt == attempts - 1:
                raise


def _temp_sibling(path: str) -> str:
    """A fresh hidden temporary name beside local ``path`` (its folder created): where a write
    goes before it is renamed or linked into place; :func:`list_files` never lists it."""
    directory = os.path.dirname(path) or "."
    _makedirs_local(directory)
    return os.path.join(directory, f".{os.path.basename(path)}.{uuid.uuid4().hex}.tmp")


def _upload_all_or_nothing(source: IO[bytes], uri: str | os.PathLike) -> None:
    """Upload ``source`` to an S3 ``uri``; on any failure nothing appears under the name.

    fsspec's ``close()`` completes a multipart upload with the parts sent so far even when a part
    failed (a ``with fs.open(...)`` block calls it on the way out of an exception), which would
    publish a truncated object. So the file is closed only after every byte went out, and on a
    failure the multipart upload is aborted instead.
    """
    fs, path = filesystem(uri)
    remote = fs.open(path, "wb", block_size=_UPLOAD_PART_SIZE)
    try:
        shutil.copyfileobj(source, remote, length=8 * 1024 * 1024)
        remote.close()
    except BaseException:
        # discard() aborts the multipart upload (a one-shot PUT never started has nothing to abort);
        # marking the file closed keeps its finaliser from trying to flush what was discarded.
        with contextlib.suppress(Exception):
            remote.discard()
        remote.closed = True
        raise


def write_bytes(uri: str | os.PathLike, data: bytes) -> None:
    """Atomically write ``data`` to ``uri``."""
    with atomic_writer(uri) as handle:
        handle.write(data)


def create_exclusive(uri: str | os.PathLike, data: bytes) -> bool:
    """Write ``data`` to ``uri`` only if nothing is there; returns whether this call created it.

    Atomic against a concurrent creator: locally a complete temporary file is hard-linked into
    place (``link`` fails when the name exists); on S3 a conditional PUT (``If-None-Match: *``).
    """
    loc = parse(uri)
    if loc.is_s3:
        fs, path = filesystem(uri)
        try:
            fs.pipe_file(path, data, mode="create")
        except FileExistsError:
            return False
        return True
    tmp_path = _temp_sibling(loc.path)
    try:
        with open(tmp_path, "wb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        try:
            os.link(tmp_path, loc.path)
        except FileExistsError:
            return False
        return True
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp_path)


def write_text(uri: str | os.PathLike, text: str, encoding: str = "utf-8") -> None:
    write_bytes(uri, text.encode(encoding))


def makedirs(uri: str | os.PathLike) -> None:
    """Create a local directory; a no-op for S3, which has no directories."""
    loc = parse(uri)
    if not loc.is_s3:
        _makedirs_local(loc.path)


def list_files(prefix: str | os.PathLike, suffixes: tuple[str, ...] | None = None) -> list[str]:
    """All files under ``prefix`` (recursively), as URIs with the prefix's scheme, sorted.

    ``suffixes`` keeps only names ending in one of them (case-insensitive). Hidden files and the
    temporary files of unfinished atomic writes are never listed.
    """
    fs, path = filesystem(prefix)
    loc = parse(prefix)
    try:
        found = [path] if fs.isfile(path) else fs.find(path)
    except FileNotFoundError:
        return []
    uris = []
    for item in found:
        name = posixpath.basename(item)
        if name.startswith("."):
            continue
        if suffixes and not name.lower().endswith(tuple(s.lower() for s in suffixes)):
            continue
        uris.append(f"s3://{item}" if loc.is_s3 else item)
    return sorted(uris)


def list_files_head(prefix: str | os.PathLike, limit: int = 1000) -> tuple[list[str], bool]:
    """Up to ``limit`` files under ``prefix`` (in the store's listing order, not sorted), and whether
    that is all of them: a look at a prefix that costs one listing page, not the whole listing."""
    loc = parse(prefix)
    fs, path = filesystem(prefix)
    found: list[str] = []
    if not loc.is_s3:
        if os.path.isfile(path):
            return [path], True
        for root, dirs, files in os.walk(path):
            dirs[:] = sorted(d for d in dirs if not d.startswith("."))
            for name in sorted(files):
                if not name.startswith("."):
                    found.append(os.path.join(root, name))
                    if len(found) >= limit:
                        return found, False
        return found, True
    bucket, _, key = path.partition("/")
    if fs.isfile(path):
        return [f"s3://{path}"], True
    request = {"Bucket": bucket, "Prefix": key.rstrip("/") + "/" if key else "", "MaxKeys": min(limit, 1000)}
    while True:
        page = fs.call_s3("list_objects_v2", **request)
        for item in page.get("Contents", []):
            if not posixpath.basename(item["Key"]).startswith("."):
                found.append(f"s3://{bucket}/{item['Key']}")
        if len(found) >= limit:
            return found[:limit], False
        if not page.get("IsTruncated"):
            return found, True
        request["ContinuationToken"] = page["NextContinuationToken"]


def delete(uri: str | os.PathLike, recursive: bool = False) -> None:
    """Remove an object (or, with ``recursive``, everything under a prefix); missing is fine."""
    fs, path = filesystem(uri)
    with contextlib.suppress(FileNotFoundError):
        if fs.exists(path):
            fs.rm(path, recursive=recursive)


def local_path(uri: str | os.PathLike) -> str | None:
    """The local filesystem path of ``uri``, or None when it is remote."""
    loc = parse(uri)
    return None if loc.is_s3 else loc.path


def upload_dir(local_dir: str, uri: str) -> None:
    """Copy a local directory tree to ``uri`` (a local path or an s3:// prefix), file by file."""
    loc = parse(uri)
    for root, _dirs, files in os.walk(local_dir):
        for name in files:
            path = os.path.join(root, name)
            relative = os.path.relpath(path, local_dir).replace(os.sep, "/")
            target = join(uri, relative)
            if loc.is_s3:
                with open(path, "rb") as handle, atomic_writer(target) as out:
                    shutil.copyfileobj(handle, out, length=8 * 1024 * 1024)
            else:
                os.makedirs(os.path.dirname(parse(target).path), exist_ok=True)
                shutil.copyfile(path, parse(target).path)


_HUB_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*/[A-Za-z0-9][A-Za-z0-9._-]*$")


def default_cache_dir() -> str:
    """Where remote model directories are cached: ``$SAMA_CACHE_DIR`` or ``~/.cache/sama``."""
    return os.environ.get("SAMA_CACHE_DIR") or os.path.join(os.path.expanduser("~"), ".cache", "sama")


def localize_dir(uri: str | os.PathLike, cache_dir: str | None = None) -> str:
    """A local directory holding the directory tree at ``uri``; remote trees are downloaded once.

    ``uri`` is a local path, a ``file://`` URI, an ``s3://`` prefix or a Hugging Face hub id
    (``org/name``, used only when no local path of that name exists). Local paths come back as they
    are (absolute; whether they exist is the caller's to report). An S3 tree is copied into
    ``cache_dir/models/<digest>``, where the digest covers the URI (credentials removed) and every
    object's name, size and version tag, so a changed tree is fetched again and an unchanged one is
    reused. The copy is published atomically: written into a temporary sibling and renamed, so a
    crash or a concurrent reader never sees half a directory. Object names that would land outside
    the target (``..`` segments, absolute names, backslashes) refuse the whole download. Hub ids go
    through ``huggingface_hub.snapshot_download`` and its own cache.

    Raises:
        StorageError: the tree is empty or missing remotely, an object name escapes the target,
            or the hub id cannot be fetched.
    """
    text = os.fspath(uri)
    loc = parse(text)
    if not loc.is_s3:
        if "://" not in text and not os.path.exists(loc.path) and _HUB_ID.match(text):
            return _hub_snapshot(text)
        return loc.path
    fs, base = filesystem(text)
    try:
        found = fs.find(base, detail=True)
    except FileNotFoundError:
        found = {}
    objects = []
    for key, info in sorted(found.items()):
        relative = key[len(base) :].lstrip("/") if key.startswith(base + "/") else None
        parts = relative.split("/") if relative else []
        if not parts or "\\" in relative or any(part in ("", ".", "..") for part in parts):
            raise StorageError(
                redact(text),
                f"refusing to download object {redact('s3://' + key)}: its name would land outside the "
                "model directory",
            )
        tag = info.get("ETag") or info.get("VersionId") or info.get("LastModified") or ""
        objects.append((relative, int(info.get("size") or 0), str(tag)))
    if not objects:
        raise StorageError(redact(text), "no model directory there (no objects under this prefix)")
    digest = hashlib.sha256(json.dumps([redact(loc.uri()), objects]).encode()).hexdigest()[:24]
    root = os.path.join(cache_dir or default_cache_dir(), "models")
    target = os.path.join(root, digest)
    if os.path.isdir(target):
        return target
    os.makedirs(root, exist_ok=True)
    staging = tempfile.mkdtemp(prefix=f".{digest}.", dir=root)
    try:
        for relative, _size, _tag in objects:
            destination = os.path.join(staging, *relative.split("/"))
            os.makedirs(os.path.dirname(destination), exist_ok=True)
            with open_read(join(text, relative)) as src, open(destination, "wb") as dst:
                shutil.copyfileobj(src, dst, length=8 * 1024 * 1024)
        try:
            os.rename(staging, target)
        except OSError:
            # Another process published the same tree first: theirs is complete, use it.
            if not os.path.isdir(target):
                raise
            shutil.rmtree(staging, ignore_errors=True)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return target


def _hub_snapshot(repo_id: str) -> str:
    try:
        from huggingface_hub import snapshot_download

        return snapshot_download(repo_id)
    except Exception as exc:  # the hub raises many kinds (offline, 404, auth); all mean "not here"
        raise StorageError(
            repo_id, f"not a local directory, and the Hugging Face hub could not provide it: {exc}"
        ) from exc
