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

VIDEO_SUFFIXES = (".mp4", ".mov", ".mkv", ".webm")
TAR_SUFFIX = ".tar"
CAPTION_SUFFIXES = (".txt", ".json")
_CAPTION_JSON_KEYS = ("caption", "text", "prompt", "description")
_UNIT_NAMESPACE = uuid.UUID("a3c1f3de-0f0b-5c43-8c0c-3b1b1b7d0a9e")


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

    def validate(self) -> None:
        if self.videos_per_unit < 1:
            raise ValueError("input.videos_per_unit must be >= 1")
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
            self.caption = parse_caption(storage.read_bytes(self.caption_uri), suffix)
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


def parse_caption(data: bytes, suffix: str) -> str:
    """The caption text of a ``.txt`` or ``.json`` sidecar/member ("" when it holds none)."""
    text = data.decode("utf-8", errors="replace").strip()
    if suffix == ".json":
        try:
            raw = json.loads(text)
        except json.JSONDecodeError:
            return ""
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
        captions[resolve_relative(str(path), cfg.captions_manifest)] = str(
            row.get(cfg.manifest_caption_column) or ""
        ).strip()
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


def iter_tar_videos(tar_uri: str, suffixes: tuple[str, ...]) -> Iterator[tuple[VideoInput, str]]:
    """Stream a tar of videos: yield ``(VideoInput, local_path)`` per video member.

    A member ``<key>.txt``/``<key>.json`` next to ``<key>.mp4`` is its caption (WebDataset groups
    a key's members together; a caption stored before or after the video is both fine). The local
    path is valid only until the next item is requested.
    """
    video_suffixes = tuple(s.lower() for s in suffixes)
    current_key: str | None = None
    caption = ""
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
                yield VideoInput(input_id=input_id, caption=caption), path
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
                current_key, caption = key, ""
            lower = base.lower()
            if lower.endswith(video_suffixes):
                if held_input is not None:  # two videos under one key: emit the first as is
                    yield from flush()
                held = contextlib.ExitStack()
                path = held.enter_context(_spooled_member(tar, info))
                held_input = (f"{tar_uri}#{info.name}", path)
            elif lower.endswith(CAPTION_SUFFIXES):
                suffix = ".json" if lower.endswith(".json") else ".txt"
                caption = parse_caption(tar.extractfile(info).read(), suffix) or caption
        yield from flush()
