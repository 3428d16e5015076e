"""The WebDataset sample: the one definition every writer and reader imports.

A shard is a plain tar file. A sample is the group of members sharing a key::

    <key>.json       metadata (SampleMeta), UTF-8 JSON
    <key>.src.mp4    source video (H.264 mp4)   or  <key>.src.png  source image
    <key>.tgt.mp4    target video (H.264 mp4)   or  <key>.tgt.png  target image

The source is absent for plain text-to-video samples, and, by default, for the motion-alignment
pretext samples: their source is a deterministic function of the target and the parameters in the
metadata (``pretext``), derived wherever the sample is read (:meth:`Sample.decode_source`).

A *latent* shard (written by ``sama precompute``) holds, per sample, the metadata and one
safetensors member instead of media::

    <key>.json              metadata (SampleMeta), as above
    <key>.lat.safetensors   SampleLatents: normalised VAE latents of the target (and source), the
                            prompt's text embedding up to its last token, the SigLIP tokens of the
                            target frames anchors may be drawn from, and those frames' indices

and its output root holds ``latents.json`` (:class:`LatentOutputInfo`: which encoders made the
tensors, their dtype) and ``null_prompts.safetensors`` (the embeddings of the null prompts caption
dropout substitutes). Safetensors holds tensors only: nothing is unpickled there either.

Keys are deterministic (uuid5 of the input
and its span) and contain no dots, because WebDataset readers (the ``webdataset`` library and Ray
Data's ``read_webdataset``) split a member name at its first dot into key and extension.

Members are only ever parsed as JSON or decoded as media: nothing is unpickled, whatever a tar
holds (unknown members are ignored).
"""

from __future__ import annotations

import contextlib
import dataclasses
import io
import json
import random
import re
import tarfile
import uuid
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any, Literal

from sama import storage

SCHEMA_VERSION = 1
# Fixed namespace so sample keys are stable across machines, runs and versions.
KEY_NAMESPACE = uuid.UUID("6f1d1c8e-3d55-5b8e-9a51-5a3a7e0c2b10")
KEY_PATTERN = re.compile(r"^[A-Za-z0-9_-]+$")

META = "json"
LATENTS = "lat.safetensors"
SOURCE_VIDEO = "src.mp4"
TARGET_VIDEO = "tgt.mp4"
SOURCE_IMAGE = "src.png"
TARGET_IMAGE = "tgt.png"
MEDIA_MEMBERS = {"video": (SOURCE_VIDEO, TARGET_VIDEO), "image": (SOURCE_IMAGE, TARGET_IMAGE)}
# An evaluated sample (``sama eval``): the model's edit and, when the input had one, its reference
# target, beside the source (SOURCE_VIDEO / SOURCE_IMAGE).
EDIT_MEMBERS = {"video": ("edit.mp4", "ref.mp4"), "image": ("edit.png", "ref.png")}
SHARD_SUFFIX = ".tar"
# At the root of a latent output (beside its shards/ folder).
LATENT_INFO_FILE = "latents.json"
NULL_PROMPTS_FILE = "null_prompts.safetensors"
LATENT_FORMAT = "sama-latents"
LATENT_FORMAT_VERSION = 1

# Tasks: the plain text-to-video sample, the three motion-alignment pretext tasks, and edits.
TASKS = ("t2v", "cube_inpaint", "speed", "tube_shuffle", "video_edit", "image_edit")


class SchemaError(ValueError):
    """A sample or shard does not follow the schema; the message names the shard/key and the problem."""


def sample_key(*parts: object) -> str:
    """A deterministic key for a sample, from whatever identifies it (input URI, span, task...).

    32 lowercase hex characters: no dots, safe as a tar member prefix and in any file name.
    """
    if not parts:
        raise ValueError("sample_key needs at least one part")
    text = "|".join(_canonical(p) for p in parts)
    return uuid.uuid5(KEY_NAMESPACE, text).hex


def _canonical(part: object) -> str:
    if isinstance(part, float):
        return f"{part:.6f}"
    if isinstance(part, (list, tuple)):
        return "[" + ",".join(_canonical(p) for p in part) + "]"
    return str(part)


def check_key(key: str) -> str:
    if not key or not KEY_PATTERN.match(key):
        raise SchemaError(f"sample key {key!r} must be non-empty and use only letters, digits, '_' and '-'")
    return key


@dataclass
class SampleMeta:
    """The metadata JSON of a sample. Unknown fields in a newer minor version land in ``extra``."""

    key: str
    task: str
    media: Literal["video", "image"]
    instruction: str
    fps: float
    num_frames: int
    height: int
    width: int
    bucket: str
    source_uri: str
    caption: str = ""
    # Start and end time (seconds) of the clip in ``source_uri``; None for a whole file or an image.
    span: list[float] | None = None
    target_uri: str | None = None
    # Frame count of the source when it differs from the target (the speed task).
    source_num_frames: int | None = None
    # Pretext parameters (mask span, permutation, speed factor); empty for edits.
    pretext: dict[str, Any] = field(default_factory=dict)
    # Judge scores, e.g. {"if": 9, "vq": 9, "cp": 8, "mc": 8}.
    scores: dict[str, float] = field(default_factory=dict)
    category: str | None = None
    dataset: str | None = None
    extra: dict[str, Any] = field(default_factory=dict)
    schema_version: int = SCHEMA_VERSION

    def validate(self) -> None:
        check_key(self.key)
        if self.task not in TASKS:
            raise SchemaError(f"sample {self.key}: unknown task {self.task!r} (known: {', '.join(TASKS)})")
        if self.media not in MEDIA_MEMBERS:
            raise SchemaError(f"sample {self.key}: media must be 'video' or 'image', got {self.media!r}")
        if self.num_frames < 1 or self.height < 1 or self.width < 1:
            raise SchemaError(f"sample {self.key}: frames/height/width must be positive")
        if self.media == "image" and self.num_frames != 1:
            raise SchemaError(f"sample {self.key}: an image sample has exactly 1 frame")
        if self.task != "t2v" and not self.instruction.strip():
            raise SchemaError(f"sample {self.key}: empty instruction")

    def to_json(self) -> bytes:
        return json.dumps(dataclasses.asdict(self), sort_keys=True, ensure_ascii=False).encode("utf-8")

    @classmethod
    def from_json(cls, data: bytes | str | Mapping, where: str = "") -> SampleMeta:
        try:
            raw = dict(data) if isinstance(data, Mapping) else json.loads(data)
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise SchemaError(f"{where}: metadata is not valid JSON ({exc})") from None
        version = raw.get("schema_version", SCHEMA_VERSION)
        if not isinstance(version, int) or version > SCHEMA_VERSION:
            raise SchemaError(
                f"{where}: schema_version {version!r} is newer than this reader "
                f"({SCHEMA_VERSION}); upgrade sama"
            )
        names = {f.name for f in dataclasses.fields(cls)}
        extra = dict(raw.get("extra") or {})
        extra.update({k: v for k, v in raw.items() if k not in names})
        known = {k: v for k, v in raw.items() if k in names}
        known["extra"] = extra
        try:
            meta = cls(**known)
        except TypeError as exc:
            raise SchemaError(f"{where}: metadata is missing fields ({exc})") from None
        return meta


@dataclass
class Sample:
    """One training example: metadata plus encoded source (optional) and target media bytes."""

    meta: SampleMeta
    target: bytes
    source: bytes | None = None

    @property
    def key(self) -> str:
        return self.meta.key

    @property
    def source_member(self) -> str:
        return MEDIA_MEMBERS[self.meta.media][0]

    @property
    def target_member(self) -> str:
        return MEDIA_MEMBERS[self.meta.media][1]

    def members(self) -> dict[str, bytes]:
        """Member extension -> bytes, in the order they are written to a tar."""
        self.meta.validate()
        if not self.target:
            raise SchemaError(f"sample {self.key}: empty target")
        out = {META: self.meta.to_json()}
        if self.source is not None:
            out[self.source_member] = self.source
        out[self.target_member] = self.target
        return out

    def nbytes(self) -> int:
        return sum(len(v) for v in self.members().values())

    @classmethod
    def from_members(cls, members: Mapping[str, Any], where: str = "") -> Sample:
        """Rebuild a sample from its members (``{"json": b"...", "tgt.mp4": b"..."}``).

        Accepts the dicts produced by the ``webdataset`` library and by Ray Data's
        ``read_webdataset(decoder=None)`` (``__key__``/``__url__`` entries are used for messages).
        """
        meta, where = _member_meta(members, where)
        source_name, target_name = MEDIA_MEMBERS.get(meta.media, (None, None))
        if target_name is None or target_name not in members:
            raise SchemaError(f"{where}: sample has no target member {target_name}")
        source = members.get(source_name)
        if isinstance(source, float):
            # Ray Data fills a member a sample lacks (a text-to-video sample has no source) with NaN.
            source = None
        return cls(
            meta=meta,
            target=_as_bytes(members[target_name]),
            source=None if source is None else _as_bytes(source),
        )

    def decode_target(self):
        """The target as THWC uint8 frames (an image is one frame)."""
        return _decode_media(self.target, self.meta.media, f"{self.key}.{self.target_member}")

    def decode_source(self):
        """The source as THWC uint8 frames, or None for a sample without source (t2v).

        A stored source member is decoded. A pretext sample written without one (cube_inpaint,
        speed, tube_shuffle) has its source rebuilt from the decoded target and ``meta.pretext``
        (:func:`sama.pretext.derive_source`); use :meth:`decode_pair` to get both with one decode.
        """
        if self.source is not None:
            return _decode_media(self.source, self.meta.media, f"{self.key}.{self.source_member}")
        from sama import pretext  # lazily: schema, imported everywhere, loads no task code

        if self.meta.task not in pretext.DERIVED_SOURCE_TASKS:
            return None
        return self.decode_pair()[1]

    def decode_pair(self):
        """``(target, source)`` as THWC uint8 frames, decoding the target once; the source is None
        for a sample without source and is rebuilt from the target when derived (see
        :meth:`decode_source`). Raises SchemaError naming the sample when the metadata's pretext
        parameters cannot rebuild it."""
        target = self.decode_target()
        if self.source is not None:
            return target, _decode_media(self.source, self.meta.media, f"{self.key}.{self.source_member}")
        from sama import pretext  # lazily: schema, imported everywhere, loads no task code

        if self.meta.task not in pretext.DERIVED_SOURCE_TASKS:
            return target, None
        try:
            source = pretext.derive_source(self.meta.task, target, self.meta.pretext)
        except ValueError as exc:
            raise SchemaError(f"sample {self.key}: {exc}") from None
        return target, source


@dataclass
class SampleLatents:
    """A sample's precomputed encoder outputs (the ``lat.safetensors`` member).

    Attributes:
        target: ``(C, T', H', W')`` normalised VAE latents of the target (the posterior's mode).
        text: ``(L, D)`` the prompt's embedding up to its last token; the text encoder's output is
            zero past it, so padding with zeros to the encoder's length restores it exactly.
        source: ``(C, T_src', H', W')`` latents of the source, or None (no source).
        semantic: ``(F, tokens_per_anchor, D)`` clean SigLIP tokens of the target frames
            ``anchor_frames`` (every frame when anchors are drawn at random; the anchors
            themselves when they are fixed), or None (no semantic branch).
        anchor_frames: frame indices of ``semantic``'s rows, increasing.
    """

    target: Any
    text: Any
    source: Any = None
    semantic: Any = None
    anchor_frames: list[int] | None = None

    _NAMES = ("target", "text", "source", "semantic")

    def to_bytes(self) -> bytes:
        from safetensors.torch import save

        tensors = {name: getattr(self, name) for name in self._NAMES if getattr(self, name) is not None}
        if self.anchor_frames is not None:
            import torch

            tensors["anchor_frames"] = torch.tensor(self.anchor_frames, dtype=torch.int64)
        return save({k: v.detach().contiguous().cpu() for k, v in tensors.items()})

    @classmethod
    def from_bytes(cls, data: bytes, where: str = "") -> SampleLatents:
        from safetensors.torch import load

        try:
            tensors = load(bytes(data))
        except Exception as exc:  # safetensors raises its own error types for a damaged header
            raise SchemaError(f"{where}: {LATENTS} is not a readable safetensors member ({exc})") from None
        for required in ("target", "text"):
            if required not in tensors:
                raise SchemaError(f"{where}: {LATENTS} has no {required!r} tensor")
        anchors = tensors.get("anchor_frames")
        latents = cls(
            target=tensors["target"],
            text=tensors["text"],
            source=tensors.get("source"),
            semantic=tensors.get("semantic"),
            anchor_frames=None if anchors is None else [int(i) for i in anchors.tolist()],
        )
        if (latents.semantic is None) != (latents.anchor_frames is None) or (
            latents.semantic is not None and latents.semantic.shape[0] != len(latents.anchor_frames)
        ):
            raise SchemaError(f"{where}: {LATENTS}: semantic tokens and anchor_frames do not match")
        if latents.target.ndim != 4 or latents.text.ndim != 2:
            raise SchemaError(
                f"{where}: {LATENTS}: target must be (C, T, H, W) and text (L, D), got "
                f"{tuple(latents.target.shape)} and {tuple(latents.text.shape)}"
            )
        return latents


@dataclass
class LatentSample:
    """One precomputed training example: metadata plus :class:`SampleLatents`."""

    meta: SampleMeta
    latents: SampleLatents

    @property
    def key(self) -> str:
        return self.meta.key

    def members(self) -> dict[str, bytes]:
        self.meta.validate()
        return {META: self.meta.to_json(), LATENTS: self.latents.to_bytes()}

    def nbytes(self) -> int:
        return sum(len(v) for v in self.members().values())

    @classmethod
    def from_members(cls, members: Mapping[str, Any], where: str = "") -> LatentSample:
        meta, where = _member_meta(members, where)
        if LATENTS not in members or isinstance(members[LATENTS], float):
            raise SchemaError(f"{where}: sample has no {LATENTS} member")
        return cls(meta=meta, latents=SampleLatents.from_bytes(_as_bytes(members[LATENTS]), where))


@dataclass
class EvalSample:
    """One evaluated example (``sama eval``'s output shards): the input's metadata with the
    evaluation record under ``meta.extra["eval"]``, and the source, the edit and the reference
    target (None when the input had none), encoded as the media's files."""

    meta: SampleMeta
    source: bytes
    edit: bytes
    reference: bytes | None = None

    @property
    def key(self) -> str:
        return self.meta.key

    def members(self) -> dict[str, bytes]:
        self.meta.validate()
        edit_member, reference_member = EDIT_MEMBERS[self.meta.media]
        out = {
            META: self.meta.to_json(),
            MEDIA_MEMBERS[self.meta.media][0]: self.source,
            edit_member: self.edit,
        }
        if self.reference is not None:
            out[reference_member] = self.reference
        return out

    def nbytes(self) -> int:
        return sum(len(v) for v in self.members().values())

    @classmethod
    def from_members(cls, members: Mapping[str, Any], where: str = "") -> EvalSample:
        meta, where = _member_meta(members, where)
        source_member = MEDIA_MEMBERS[meta.media][0]
        edit_member, reference_member = EDIT_MEMBERS[meta.media]
        for name in (source_member, edit_member):
            if name not in members or isinstance(members[name], float):
                raise SchemaError(f"{where}: evaluated sample has no {name} member")
        reference = members.get(reference_member)
        return cls(
            meta=meta,
            source=_as_bytes(members[source_member]),
            edit=_as_bytes(members[edit_member]),
            reference=None if reference is None or isinstance(reference, float) else _as_bytes(reference),
        )


def _member_meta(members: Mapping[str, Any], where: str = "") -> tuple[SampleMeta, str]:
    """A sample's metadata from its members, checked against the member key; and the sample's
    name for messages (``shard:key`` unless ``where`` is given)."""
    key = members.get("__key__")
    where = where or f"{members.get('__url__', '<shard>')}:{key}"
    if META not in members:
        raise SchemaError(f"{where}: sample has no {META} member")
    meta = SampleMeta.from_json(_as_bytes(members[META]), where=where)
    if key is not None and str(key).split("/")[-1] != meta.key:
        raise SchemaError(f"{where}: member key {key!r} does not match metadata key {meta.key!r}")
    return meta, where


def is_latent_members(members: Mapping[str, Any]) -> bool:
    """Whether a sample's members are a precomputed (latent) sample's."""
    value = members.get(LATENTS)
    return value is not None and not isinstance(value, float)


def is_eval_members(members: Mapping[str, Any]) -> bool:
    """Whether a sample's members are an evaluated sample's (``sama eval``'s output)."""
    return any(
        members.get(edit) is not None and not isinstance(members.get(edit), float)
        for edit, _ in EDIT_MEMBERS.values()
    )


def read_sample(members: Mapping[str, Any], where: str = "") -> Sample | LatentSample | EvalSample:
    """A sample of any kind from its members: media, precomputed latents, or an evaluated edit."""
    if is_latent_members(members):
        return LatentSample.from_members(members, where)
    if is_eval_members(members):
        return EvalSample.from_members(members, where)
    return Sample.from_members(members, where)


@dataclass
class LatentOutputInfo:
    """``latents.json`` at the root of a latent output: what made its tensors.

    ``encoders`` is :func:`sama.models.presets.encoder_identity` of the model the precompute ran
    with; ``dtype`` the dtype the tensors are stored in; ``null_prompts`` the prompts whose
    embeddings ``null_prompts.safetensors`` holds (tensors ``null_0``, ``null_1``... in this order).
    """

    encoders: dict[str, Any]
    dtype: str
    null_prompts: list[str] = field(default_factory=list)
    model: str = ""
    format: str = LATENT_FORMAT
    format_version: int = LATENT_FORMAT_VERSION

    def to_json(self) -> str:
        return json.dumps(dataclasses.asdict(self), indent=2, sort_keys=True) + "\n"

    @classmethod
    def from_json(cls, text: str, where: str = "") -> LatentOutputInfo:
        try:
            raw = json.loads(text)
        except json.JSONDecodeError as exc:
            raise SchemaError(f"{where}: {LATENT_INFO_FILE} is not valid JSON ({exc})") from None
        if not isinstance(raw, dict) or raw.get("format") != LATENT_FORMAT:
            raise SchemaError(f"{where}: not a {LATENT_FORMAT} description")
        if int(raw.get("format_version", 0)) > LATENT_FORMAT_VERSION:
            raise SchemaError(
                f"{where}: latent format version {raw.get('format_version')} is newer than this reader "
                f"({LATENT_FORMAT_VERSION}); upgrade sama"
            )
        names = {f.name for f in dataclasses.fields(cls)}
        try:
            return cls(**{k: v for k, v in raw.items() if k in names})
        except TypeError as exc:
            raise SchemaError(f"{where}: {LATENT_INFO_FILE} is missing fields ({exc})") from None


def output_root(uri: str) -> str:
    """The root of the job output a shard prefix or shard lies in: the part before its last
    ``shards`` segment (``.../latents/shards/video`` -> ``.../latents``); ``uri`` itself when it
    has none."""
    text = str(uri).rstrip("/")
    parts = text.split("/")
    if "shards" not in parts[1:]:
        return text
    index = len(parts) - 1 - parts[::-1].index("shards")
    return "/".join(parts[:index])


def write_latent_info(output_uri: str, info: LatentOutputInfo, null_embeddings: list[Any]) -> None:
    """Write ``null_prompts.safetensors`` then ``latents.json`` at a latent output's root."""
    from safetensors.torch import save

    if len(null_embeddings) != len(info.null_prompts):
        raise ValueError("one null embedding per null prompt is needed")
    tensors = {f"null_{i}": t.detach().contiguous().cpu() for i, t in enumerate(null_embeddings)}
    storage.write_bytes(storage.join(output_uri, NULL_PROMPTS_FILE), save(tensors))
    storage.write_text(storage.join(output_uri, LATENT_INFO_FILE), info.to_json())


def read_latent_info(uri: str) -> LatentOutputInfo | None:
    """The description of the latent output ``uri`` (a shard prefix or the root) belongs to, or
    None when it holds media shards (no ``latents.json`` at its root)."""
    where = storage.join(output_root(uri), LATENT_INFO_FILE)
    if not storage.exists(where):
        return None
    return LatentOutputInfo.from_json(storage.read_text(where), where=storage.redact(where))


def read_null_embeddings(uri: str) -> dict[str, Any]:
    """Null prompt -> its ``(L, D)`` embedding, for the latent output ``uri`` belongs to."""
    from safetensors.torch import load

    info = read_latent_info(uri)
    if info is None:
        raise SchemaError(f"{storage.redact(uri)}: not a latent output (no {LATENT_INFO_FILE})")
    where = storage.join(output_root(uri), NULL_PROMPTS_FILE)
    try:
        tensors = load(storage.read_bytes(where))
    except Exception as exc:
        raise SchemaError(f"{storage.redact(where)}: unreadable null-prompt embeddings ({exc})") from None
    missing = [p for i, p in enumerate(info.null_prompts) if f"null_{i}" not in tensors]
    if missing:
        raise SchemaError(f"{storage.redact(where)}: no embedding for null prompt(s) {missing}")
    return {p: tensors[f"null_{i}"] for i, p in enumerate(info.null_prompts)}


def _as_bytes(value: Any) -> bytes:
    if isinstance(value, bytes):
        return value
    if isinstance(value, (bytearray, memoryview)):
        return bytes(value)
    if isinstance(value, str):
        return value.encode("utf-8")
    raise SchemaError(
        f"member of type {type(value).__name__} is not raw bytes (read shards without decoders)"
    )


def _decode_media(data: bytes, media: str, name: str):
    from sama import video

    if media == "image":
        return video.read_image(data, uri=name)[None]
    return video.decode_video_bytes(data, uri=name)


@dataclass
class ShardInfo:
    """A committed shard: where it is and what it holds."""

    uri: str
    samples: int
    bytes: int
    keys: list[str] = field(default_factory=list)


@dataclass
class ShardConfig:
    """Target shard size: a shard is closed when either limit is reached."""

    max_samples: int = 256
    max_bytes: int = 1024 * 1024 * 1024

    def validate(self) -> None:
        if self.max_samples < 1:
            raise ValueError("shards.max_samples must be >= 1")
        if self.max_bytes < 1:
            raise ValueError("shards.max_bytes must be >= 1")


def shard_name(stem: str, index: int) -> str:
    """``{stem}-{index:06d}.tar``; the stem may contain '/' to place shards in sub-folders."""
    if not stem or "." in stem.split("/")[-1]:
        raise ValueError(f"shard stem {stem!r} must be non-empty and its last segment free of dots")
    return f"{stem}-{index:06d}{SHARD_SUFFIX}"


class ShardWriter:
    """Write samples into size-limited tar shards with deterministic names and atomic commits.

    Shards are ``{output}/{stem}-000000.tar``, ``-000001.tar``, ... A shard is committed (appears
    under its name) only when it is full or the writer is closed; leaving the ``with`` block on an
    exception discards the shard being written. Tar headers carry fixed metadata (mtime 0, uid 0),
    so the same samples in the same order give byte-identical shards.
    """

    def __init__(
        self,
        output_uri: str,
        stem: str,
        config: ShardConfig | None = None,
        start_index: int = 0,
    ):
        self.output_uri = output_uri
        self.stem = stem
        self.config = config or ShardConfig()
        self.config.validate()
        shard_name(stem, start_index)  # validate the stem early
        self._index = start_index
        self._stack: contextlib.ExitStack | None = None
        self._tar: tarfile.TarFile | None = None
        self._current: ShardInfo | None = None
        self.shards: list[ShardInfo] = []

    def __enter__(self) -> ShardWriter:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            self.close()
        else:
            self.abort()

    def _open(self) -> None:
        uri = storage.join(self.output_uri, shard_name(self.stem, self._index))
        self._stack = contextlib.ExitStack()
        handle = self._stack.enter_context(storage.atomic_writer(uri))
        self._tar = self._stack.enter_context(
            tarfile.open(fileobj=handle, mode="w", format=tarfile.USTAR_FORMAT)
        )
        self._current = ShardInfo(uri=uri, samples=0, bytes=0)
        self._index += 1

    def write(self, sample: Sample) -> None:
        """Add one sample, rolling over to a new shard when the current one is full."""
        members = sample.members()
        size = sum(len(v) for v in members.values())
        if self._current is not None and (
            self._current.samples >= self.config.max_samples
            or (self._current.samples > 0 and self._current.bytes + size > self.config.max_bytes)
        ):
            self._commit()
        if self._current is None:
            self._open()
        assert self._tar is not None and self._current is not None
        for ext, data in members.items():
            info = tarfile.TarInfo(name=f"{sample.key}.{ext}")
            info.size = len(data)
            info.mtime = 0
            info.mode = 0o644
            info.uname = info.gname = ""
            self._tar.addfile(info, io.BytesIO(data))
        self._current.samples += 1
        self._current.bytes += size
        self._current.keys.append(sample.key)

    def _commit(self) -> None:
        assert self._stack is not None and self._current is not None
        # Closing the stack writes the tar's end blocks, then renames/uploads the shard into place.
        self._stack.close()
        self.shards.append(self._current)
        self._stack = self._tar = self._current = None

    def close(self) -> list[ShardInfo]:
        """Commit the last shard; returns every shard written."""
        if self._current is not None:
            self._commit()
        return self.shards

    def abort(self) -> None:
        """Discard the shard being written (already committed shards stay)."""
        if self._stack is not None:
            aborted = RuntimeError(f"shard writer for {self.stem} aborted")
            with contextlib.suppress(RuntimeError):
                self._stack.__exit__(RuntimeError, aborted, None)
        self._stack = self._tar = self._current = None


def list_shards(prefix: str) -> list[str]:
    """Every shard (``*.tar``) under ``prefix``, sorted."""
    return storage.list_files(prefix, suffixes=(SHARD_SUFFIX,))


def _resolve_shards(shards: str | Iterable[str]) -> list[str]:
    if isinstance(shards, str):
        return [shards] if shards.endswith(SHARD_SUFFIX) else list_shards(shards)
    return list(shards)


def iter_members(shard_uri: str) -> Iterator[dict[str, Any]]:
    """Group a tar shard's members by key, streaming (one sample in memory at a time)."""
    current: dict[str, Any] | None = None
    with storage.open_read(shard_uri) as handle:
        try:
            tar = tarfile.open(fileobj=handle, mode="r|")  # a stream, closed with its handle
            for info in tar:
                if not info.isfile():
                    continue
                name = info.name.split("/")[-1]
                if "." not in name or name.startswith("."):
                    continue
                key, ext = name.split(".", 1)
                data = tar.extractfile(info).read()
                if current is None or current["__key__"] != key:
                    if current is not None:
                        yield current
                    current = {"__key__": key, "__url__": shard_uri}
                current[ext] = data
        except (tarfile.TarError, EOFError) as exc:
            raise SchemaError(f"{shard_uri}: not a readable tar shard ({exc})") from None
    if current is not None:
        yield current


def iter_samples(shards: str | Iterable[str]) -> Iterator[Sample | LatentSample]:
    """Every sample of the given shards (a prefix or a list of shard URIs), in order, streaming;
    media samples as :class:`Sample`, precomputed ones as :class:`LatentSample`."""
    for uri in _resolve_shards(shards):
        for members in iter_members(uri):
            yield read_sample(members)


def _s3_gopen(url: str, mode: str = "rb", bufsize: int = 8192, **_kw):
    if "r" not in mode:
        raise ValueError(f"{url}: sama registers s3:// for reading only")
    return storage.open_read(url)


def register_webdataset_s3() -> None:
    """Teach ``webdataset.gopen`` to open ``s3://`` URLs through sama.storage (it has no opener)."""
    import sys

    import webdataset  # noqa: F401  (imports the gopen module)

    schemes = sys.modules["webdataset.gopen"].gopen_schemes
    schemes["s3"] = _s3_gopen


def webdataset_samples(
    shards: str | Iterable[str],
    shuffle_buffer: int = 0,
    seed: int = 0,
    rank: int = 0,
    world_size: int = 1,
):
    """A ``webdataset.WebDataset`` pipeline yielding :class:`Sample` objects.

    Shards are split across ``world_size`` readers by position (rank r takes shards r, r+w, ...);
    webdataset's own node splitter refuses world sizes above 1. No decoder is installed: members
    stay raw bytes and are parsed by :meth:`Sample.from_members` only.
    """
    import webdataset as wds

    register_webdataset_s3()
    urls = _resolve_shards(shards)
    if not urls:
        raise SchemaError(f"no shards found in {shards!r}")

    def split_by_rank(src):
        for index, item in enumerate(src):
            if index % world_size == rank:
                yield item

    dataset = wds.WebDataset(
        urls,
        shardshuffle=False,
        nodesplitter=split_by_rank,
        workersplitter=wds.split_by_worker,
        empty_check=False,
    )
    if shuffle_buffer:
        dataset = dataset.shuffle(shuffle_buffer, rng=random.Random(seed))
    return dataset.map(Sample.from_members)
