"""Finding raw videos and their captions under a URI prefix, and grouping them into work units.

Inputs are plain video files (mp4, mov, mkv, webm) and/or tar shards of videos. A plain file's
caption comes from a caption manifest (parquet, jsonl or csv mapping path -> caption) when it lists
the file, else from a sidecar ``.txt``/``.json`` beside it. A video inside a tar takes its caption
from the member with the same key (``clip1.mp4`` + ``clip1.txt``/``clip1.json``).
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import posixpath
import tarfile
import tempfile
import uuid
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field

from sama import storage
from sama.prep.common import RejectInput

VIDEO_SUFFIXES = (".mp4", ".mov", ".mkv", ".webm")
TAR_SUFFIX = ".tar"
CAPTION_SUFFIXES = (".txt", ".json")
_CAPTION_JSON_KEYS = ("caption", "text", "prompt", "description")
_UNIT_NAMESPACE = uuid.UUID("a3c1f3de-0f0b-5c43-8c0c-3b1b1b7d0a9e")
# A caption is a sentence or a paragraph; anything larger is not one and is never read whole.
MAX_CAPTION_BYTES = 1024 * 1024
# Default cap on one video inside an input tar (it is spooled to local disk to be decoded).
DEFAULT_MAX_MEMBER_BYTES = 4 * 1024**3


@dataclass
class InputConfig:
    """Where raw videos are and how they are grouped into work units."""

    uri: str = ""
    suffixes: list[str] = field(default_factory=lambda: list(VIDEO_SUFFIXES))
    # Optional manifest (parquet/jsonl/csv) mapping video path -> caption; paths may be absolute
    # URIs or relative to the manifest's folder.
    captions_manifest: str | None = None
    manifest_path_column: str = "path"
    manifest_caption_column: str = "caption"
    # Plain files are processed in units of this many videos: one task, one set of shards per
    # bucket, one completion marker. Each input tar is a unit of its own.
    videos_per_unit: int = 16
    # A tar member larger than this (or sparse) is rejected unread: it would be spooled to disk.
    max_member_bytes: int = DEFAULT_MAX_MEMBER_BYTES

    def validate(self) -> None:
        if self.videos_per_unit < 1:
            raise ValueError("input.videos_per_unit must be >= 1")
        if self.max_member_bytes < 1:
            raise ValueError("input.max_member_bytes must be >= 1")
        if not self.suffixes:
            raise ValueError("input.suffixes must list at least one video suffix")


@dataclass
class VideoInput:
    """One video to process: its URI (or ``tar_uri#member``), where to read it, and its caption."""

    input_id: str
    caption: str = ""
    # A sidecar to read the caption from (read by the worker, not while listing millions of files).
    caption_uri: str | None = None

    def resolve_caption(self) -> str:
        if self.caption_uri and not self.caption:
            suffix = ".json" if self.caption_uri.lower().endswith(".json") else ".txt"
            with storage.open_read(self.caption_uri) as handle:
                data = handle.read(MAX_CAPTION_BYTES + 1)  # never more than one cap into memory
            self.caption = parse_caption(data, suffix, self.caption_uri)
            self.caption_uri = None
        return self.caption


@dataclass
class WorkUnit:
    """A batch of inputs processed by one task. ``tar_uri`` is set for a unit that is a tar."""

    unit_id: str
    videos: list[VideoInput] = field(default_factory=list)
    tar_uri: str | None = None

    @property
    def input_ids(self) -> list[str]:
        return [self.tar_uri] if self.tar_uri else [v.input_id for v in self.videos]

    def to_json(self) -> str:
        return json.dumps(asdict(self))

    @classmethod
    def from_json(cls, text: str) -> WorkUnit:
        raw = json.loads(text)
        raw["videos"] = [VideoInput(**v) for v in raw.get("videos", [])]
        return cls(**raw)


def unit_id_for(input_ids: list[str]) -> str:
    """A deterministic id for a unit: uuid5 of its sorted inputs (32 hex chars, no dots/dashes)."""
    return uuid.uuid5(_UNIT_NAMESPACE, "\n".join(sorted(input_ids))).hex


class CaptionError(RejectInput):
    """A caption file that cannot be used: not UTF-8, too large, or JSON built to exhaust the
    parser (nesting, huge numbers). The video it describes is rejected with reason
    ``bad_caption`` rather than trained on without it."""

    def __init__(self, detail: str):
        super().__init__("bad_caption", detail)

    def __reduce__(self):
        return (type(self), (self.detail,))


def parse_caption(data: bytes, suffix: str, name: str = "caption") -> str:
    """The caption text of a ``.txt`` or ``.json`` sidecar/member ("" when it holds none).

    JSON that is not valid JSON holds no caption (""). Raises :class:`CaptionError` for data
    larger than :data:`MAX_CAPTION_BYTES`, not valid UTF-8, or JSON that exhausts the parser.
    """
    if len(data) > MAX_CAPTION_BYTES:
        raise CaptionError(f"{name}: {len(data)} bytes, more than a caption's {MAX_CAPTION_BYTES}")
    try:
        text = data.decode("utf-8").strip()
    except UnicodeDecodeError as exc:
        raise CaptionError(f"{name}: not UTF-8 text ({exc.reason} at byte {exc.start})") from None
    if suffix == ".json":
        try:
            raw = json.loads(text)
        except json.JSONDecodeError:
            return ""
        except (RecursionError, ValueError) as exc:
            # "[" * 100000 recurses past Python's limit; a 5000-digit number exceeds int's.
            why = "nested too deeply" if isinstance(exc, RecursionError) else str(exc)
            raise CaptionError(f"{name}: JSON the parser refuses ({why})") from None
        if isinstance(raw, str):
            return raw.strip()
        if isinstance(raw, dict):
            for key in _CAPTION_JSON_KEYS:
                if isinstance(raw.get(key), str):
                    return raw[key].strip()
        return ""
    return text


def read_table(uri: str) -> list[dict]:
    """Rows of a csv, jsonl or parquet file as dicts (values kept as parsed)."""
    suffix = posixpath.splitext(storage.parse(uri).path)[1].lower()
    if suffix == ".parquet":
        import pyarrow as pa
        import pyarrow.parquet as pq

        with storage.open_read(uri) as handle:
            try:
                return pq.read_table(handle).to_pylist()
            except (pa.ArrowException, OSError) as exc:
                raise ValueError(f"{uri}: not a readable parquet file ({exc})") from None
    text = storage.read_text(uri)
    if suffix in (".jsonl", ".ndjson"):
        rows = []
        for number, line in enumerate(text.splitlines(), start=1):
            if not line.strip():
                continue
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError as exc:
                raise ValueError(f"{uri}: line {number} is not valid JSON ({exc})") from None
        return rows
    if suffix == ".csv":
        import csv

        return list(csv.DictReader(io.StringIO(text)))
    raise ValueError(f"{uri}: unsupported table format {suffix!r} (use .csv, .jsonl or .parquet)")


def resolve_relative(path: str, base_uri: str) -> str:
    """``path`` as a URI: absolute URIs/paths stay, relative ones resolve against ``base_uri``'s folder."""
    if "://" in path or os.path.isabs(path):
        return storage.parse(path).uri()
    base = storage.parse(base_uri)
    folder = posixpath.dirname(base.path)
    joined = posixpath.normpath(posixpath.join(folder, path))
    return f"s3://{joined}" if base.is_s3 else joined


class DisallowedLocation(ValueError):
    """A manifest row points somewhere a job may not read (message already redacted)."""


def resolve_manifest_path(path: str, manifest_uri: str, allowed_prefixes: list[str]) -> str:
    """A manifest row's path as a URI the job may read.

    Relative paths resolve against the manifest's folder. The result must lie under the
    manifest's folder or one of ``allowed_prefixes``: a row cannot make a worker read
    ``/etc/passwd``, another bucket or ``../..`` beyond them. ``file://`` and any URL scheme other
    than ``s3://`` (http, https, presigned links) are refused. Raises :class:`DisallowedLocation`
    naming the row's path with credentials and query string removed.
    """
    text = str(path).strip()
    scheme = text.split("://", 1)[0].lower() if "://" in text else ""
    if scheme and scheme not in storage.S3_SCHEMES:
        raise DisallowedLocation(f"{storage.redact(text)}: {scheme}:// locations are not read by data jobs")
    if not scheme and text.startswith("~"):
        raise DisallowedLocation(f"{text}: home-relative paths are not read by data jobs")
    try:
        resolved = resolve_relative(text, manifest_uri)
    except storage.StorageError as exc:
        raise DisallowedLocation(f"{storage.redact(text)}: {exc.reason}") from None
    roots = [posixpath.dirname(storage.parse(manifest_uri).uri()) or "/", *allowed_prefixes]
    if not any(storage.is_under(resolved, root) for root in roots):
        raise DisallowedLocation(
            f"{storage.redact(text)}: resolves to {storage.redact(resolved)}, outside the manifest's "
            f"folder and input.allowed_prefixes"
        )
    return resolved


def load_caption_manifest(cfg: InputConfig) -> dict[str, str]:
    """URI -> caption from ``cfg.captions_manifest`` (empty without one)."""
    if not cfg.captions_manifest:
        return {}
    rows = read_table(cfg.captions_manifest)
    captions = {}
    for row in rows:
        path = row.get(cfg.manifest_path_column)
        if not path:
            raise ValueError(
                f"{cfg.captions_manifest}: a row has no {cfg.manifest_path_column!r} column "
                f"(set input.manifest_path_column)"
            )
        try:
            uri = resolve_relative(str(path), cfg.captions_manifest)
        except storage.StorageError:
            continue  # a URL or other scheme: names no listed video, so captions nothing
        captions[uri] = str(row.get(cfg.manifest_caption_column) or "").strip()
    return captions


def list_units(cfg: InputConfig, done_inputs: set[str] | None = None) -> tuple[list[WorkUnit], int]:
    """List the inputs under ``cfg.uri`` and group those not in ``done_inputs`` into units.

    Returns the pending units and the number of inputs skipped because a completed unit covers
    them. Grouping is by sorted URI, so the same pending inputs always form the same units.
    """
    cfg.validate()
    done_inputs = done_inputs or set()
    files = storage.list_files(cfg.uri)
    if not files and not storage.exists(cfg.uri):
        raise storage.StorageError(cfg.uri, "input prefix does not exist or holds no files")
    manifest = load_caption_manifest(cfg)
    file_set = set(files)
    video_suffixes = tuple(s.lower() for s in cfg.suffixes)
    videos: list[VideoInput] = []
    tars: list[str] = []
    skipped = 0
    for uri in files:
        lower = uri.lower()
        if uri in done_inputs:
            skipped += 1
            continue
        if lower.endswith(TAR_SUFFIX):
            tars.append(uri)
        elif lower.endswith(video_suffixes):
            caption = manifest.get(uri)
            sidecar = None
            if caption is None:
                stem = posixpath.splitext(uri)[0]
                sidecar = next((stem + s for s in CAPTION_SUFFIXES if stem + s in file_set), None)
            videos.append(VideoInput(input_id=uri, caption=caption or "", caption_uri=sidecar))
    units = []
    step = cfg.videos_per_unit
    for start in range(0, len(videos), step):
        chunk = videos[start : start + step]
        units.append(WorkUnit(unit_id=unit_id_for([v.input_id for v in chunk]), videos=chunk))
    for tar_uri in tars:
        units.append(WorkUnit(unit_id=unit_id_for([tar_uri]), tar_uri=tar_uri))
    return units, skipped


def check_input_prefix(cfg: InputConfig) -> str:
    """Preflight of ``prep-pretext``'s input: the prefix lists, and holds videos or tars of videos
    among its first listing page. Raises :class:`sama.preflight.CheckFailed` naming the problem."""
    from sama.preflight import CheckFailed, CheckWarning, storage_access

    where = storage.redact(cfg.uri)
    with storage_access("list", cfg.uri, "--input"):
        files, complete = storage.list_files_head(cfg.uri)
    if not files:
        raise CheckFailed(f"the input prefix {where} holds no files", "check --input")
    usable = (*(s.lower() for s in cfg.suffixes), TAR_SUFFIX)
    inputs = sum(f.lower().endswith(usable) for f in files)
    listed = f"{len(files)} file(s)" if complete else f"the first {len(files)} file(s)"
    if inputs:
        return f"{where}: {inputs} video or tar input(s) among {listed}"
    message = f"{where}: none of {listed} is a video ({', '.join(cfg.suffixes)}) or a .tar of videos"
    fix = "check --input, or list the videos' suffixes in input.suffixes"
    if complete:
        raise CheckFailed(message, fix)
    raise CheckWarning(message + "; the job lists the rest", fix)


@contextlib.contextmanager
def _spooled_member(tar: tarfile.TarFile, info: tarfile.TarInfo) -> Iterator[str]:
    """Copy one tar member to a temporary file (videos need seekable input; never all in memory)."""
    src = tar.extractfile(info)
    suffix = posixpath.splitext(info.name)[1]
    with tempfile.NamedTemporaryFile(suffix=suffix, prefix="sama-member-") as tmp:
        while chunk := src.read(4 * 1024 * 1024):
            tmp.write(chunk)
        tmp.flush()
        yield tmp.name


@dataclass
class BadMember:
    """A tar member rejected while streaming the tar (yielded in place of its local path)."""

    reason: str
    detail: str


def iter_tar_videos(
    tar_uri: str, suffixes: tuple[str, ...], max_member_bytes: int = DEFAULT_MAX_MEMBER_BYTES
) -> Iterator[tuple[VideoInput, str | BadMember]]:
    """Stream a tar of videos: yield ``(VideoInput, local_path)`` per video member.

    A member ``<key>.txt``/``<key>.json`` next to ``<key>.mp4`` is its caption (WebDataset groups
    a key's members together; a caption stored before or after the video is both fine). The local
    path is valid only until the next item is requested. A video member that is sparse or larger
    than ``max_member_bytes`` is never spooled, and one whose caption member is unusable is not
    decoded: each comes with a :class:`BadMember` instead of a path.
    """
    video_suffixes = tuple(s.lower() for s in suffixes)
    current_key: str | None = None
    caption = ""
    caption_problem: BadMember | None = None
    with storage.open_read(tar_uri) as handle:
        tar = tarfile.open(fileobj=handle, mode="r|")
        # A streamed tar can only be read forward, so a video is spooled to disk the moment it is
        # seen and held until its key's captions (which may follow it) have been read.
        held: contextlib.ExitStack | None = None
        held_input: tuple[str, str] | None = None

        def flush():
            nonlocal held, held_input
            if held_input is not None:
                input_id, path = held_input
                if caption_problem is not None and not isinstance(path, BadMember):
                    path = caption_problem
                yield VideoInput(input_id=input_id, caption=caption), path
                if held is not None:
                    held.close()
            held = None
            held_input = None

        for info in tar:
            if not info.isfile():
                continue
            base = posixpath.basename(info.name)
            if base.startswith("."):  # e.g. macOS resource forks (._clip.mp4)
                continue
            key = posixpath.join(posixpath.dirname(info.name), base.split(".", 1)[0])
            if key != current_key:
                yield from flush()
                current_key, caption, caption_problem = key, "", None
            lower = base.lower()
            member_id = f"{tar_uri}#{info.name}"
            if lower.endswith(video_suffixes):
                if held_input is not None:  # two videos under one key: emit the first as is
                    yield from flush()
                if info.issparse() or info.size > max_member_bytes:
                    why = "a sparse member" if info.issparse() else f"{info.size} bytes"
                    problem = BadMember(
                        "member_too_large",
                        f"{member_id}: {why}; input.max_member_bytes={max_member_bytes}",
                    )
                    held, held_input = None, (member_id, problem)
                    continue
                held = contextlib.ExitStack()
                path = held.enter_context(_spooled_member(tar, info))
                held_input = (member_id, path)
            elif lower.endswith(CAPTION_SUFFIXES):
                suffix = ".json" if lower.endswith(".json") else ".txt"
                if info.issparse() or info.size > MAX_CAPTION_BYTES:
                    caption_problem = BadMember(
                        "bad_caption", f"{member_id}: {info.size} bytes, more than a caption's"
                    )
                    continue
                try:
                    caption = parse_caption(tar.extractfile(info).read(), suffix, member_id) or caption
                except CaptionError as exc:
                    caption_problem = BadMember(exc.reason, exc.detail)
        yield from flush()
