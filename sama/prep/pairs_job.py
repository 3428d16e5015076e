"""The paired-edit data-prep job's stages: manifest rows -> aligned (source, target) samples -> shards.

Pure functions over one row or one work unit; the Ray Data pipeline (``pipelines/prep_pairs.py``)
only schedules them.

Alignment rule (videos). Source and target may differ in frame rate, length and size:

1. Common rate: ``min(source fps, target fps, align.max_fps)``.
2. Common length: the shorter duration. The pair is rejected as ``unalignable`` when the durations
   differ by more than ``align.max_duration_mismatch`` of the longer one (a target much shorter
   than the source is a different clip, not a trimmed one), or when the aspect ratios differ by more
   than ``align.max_aspect_mismatch`` (pixels would no longer correspond).
3. Frames: the largest 4k+1 that fits the common length, capped at ``align.max_frames``; fewer than
   ``align.min_frames`` is ``too_short``.
4. Size: the bucket nearest the *source's* aspect ratio; both clips are resized to cover it and
   center-cropped identically, so the target ends up at the source's framing.

Images are single-frame pairs following the same size rule.

Judge (``judge.enabled``, ``sama prep-pairs --judge``). A row lacking any score its media's
thresholds name (``filter.image`` / ``filter.video``) is scored by the VLM judge
(:mod:`sama.eval.judge`) on the aligned clips: the pair's source as the source, its target as the
edit. The judge's means fill the scores the manifest lacks (a manifest score always wins), then
the thresholds apply as for any row; the sample's metadata keeps the scores and, in
``extra["judge_runs"]``, every run's integer scores. A row whose manifest scores already fail is
rejected before it is judged. A row the judge could not score is rejected as ``judge_failed``.
The judge scores whether or not ``filter.enabled`` is set (the scores are then only recorded).
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import uuid
from dataclasses import asdict, dataclass, field

from sama import schema, storage, video
from sama.buckets import BucketConfig, floor_4k_plus_1
from sama.eval.judge import Judge, JudgeConfig
from sama.prep import ledger
from sama.prep.common import DecodeConfig, EncodeConfig, OutputConfig, RayConfig, RejectInput
from sama.prep.inputs import DisallowedLocation, read_table, resolve_manifest_path
from sama.prep.unit import run_unit
from sama.schema import ShardConfig

log = logging.getLogger(__name__)

_UNIT_NAMESPACE = uuid.UUID("e1f0a5a2-5b7d-5f38-8f41-2f8c4b7d6a11")

# Column layouts we know. "auto" picks one from a manifest's header.
PRESETS: dict[str, dict[str, list[str]]] = {
    # source,target,instruction[,category][,score_if,score_vq,score_cp,score_mc]
    "generic": {"source": ["source"], "target": ["target"], "instruction": ["instruction"]},
    # DiffSynth-Studio's metadata.csv: the edited clip is `video`, the prompt is `prompt`, and the
    # conditioning (source) clip is one of the control columns its Wan pipelines take.
    "diffsynth": {
        "source": ["vace_video", "control_video", "input_video", "input_image"],
        "target": ["video", "image"],
        "instruction": ["prompt"],
    },
}


@dataclass
class ColumnConfig:
    """Which manifest columns hold what. Unset fields come from the preset."""

    # "auto" (recognise the header), "generic", "diffsynth".
    preset: str = "auto"
    source: str | None = None
    target: str | None = None
    instruction: str | None = None
    category: str = "category"
    # Canonical score name (if, vq, cp, mc) -> column.
    scores: dict[str, str] = field(
        default_factory=lambda: {"if": "score_if", "vq": "score_vq", "cp": "score_cp", "mc": "score_mc"}
    )

    def resolve(self, header: list[str], where: str) -> dict[str, str]:
        """Column name per role (source, target, instruction) for a manifest with ``header``."""
        presets = [self.preset] if self.preset != "auto" else list(PRESETS)
        if self.preset != "auto" and self.preset not in PRESETS:
            raise ValueError(
                f"{where}: columns.preset {self.preset!r} is unknown (known: auto, {', '.join(PRESETS)})"
            )
        explicit = {"source": self.source, "target": self.target, "instruction": self.instruction}
        for name in presets:
            layout = PRESETS[name]
            chosen = {}
            for role, candidates in layout.items():
                if explicit[role]:
                    chosen[role] = explicit[role]
                else:
                    chosen[role] = next((c for c in candidates if c in header), None)
            if all(chosen.get(role) in header for role in layout):
                return chosen
        raise ValueError(
            f"{where}: cannot find source/target/instruction columns in header {header} "
            f"(preset {self.preset!r}; set columns.source/target/instruction or columns.preset)"
        )


@dataclass
class FilterConfig:
    """Judge-score filter (SAMA.md's thresholds). A missing score passes unless required."""

    enabled: bool = True
    image: dict[str, float] = field(default_factory=lambda: {"if": 9.0, "vq": 9.0, "cp": 9.0})
    video: dict[str, float] = field(default_factory=lambda: {"if": 8.0, "vq": 9.0, "cp": 8.0, "mc": 8.0})
    require_scores: bool = False


@dataclass
class AlignConfig:
    """How source and target are brought to a common rate, length and size (see module docstring)."""

    max_fps: float = 16.0
    max_frames: int = 81
    min_frames: int = 5
    max_duration_mismatch: float = 0.25
    max_aspect_mismatch: float = 0.05
    # Videos whose shorter side is below this are rejected as too small.
    min_side: int = 128

    def validate(self) -> None:
        if self.max_fps <= 0:
            raise ValueError("align.max_fps must be positive")
        if floor_4k_plus_1(self.max_frames) != self.max_frames:
            raise ValueError(f"align.max_frames must be 4k+1, got {self.max_frames}")
        if not 1 <= self.min_frames <= self.max_frames:
            raise ValueError("align.min_frames must be between 1 and align.max_frames")
        if not 0 <= self.max_duration_mismatch < 1 or not 0 <= self.max_aspect_mismatch < 1:
            raise ValueError("align.max_duration_mismatch and align.max_aspect_mismatch must be in [0, 1)")


@dataclass
class PairsInputConfig:
    manifests: list[str] = field(default_factory=list)
    # Rows per work unit (one task, one set of shards, one completion marker).
    rows_per_unit: int = 32
    # Where manifest rows may point besides their manifest's folder (local paths or s3://
    # prefixes); a row outside them, a file:// or an http(s) URL is rejected ("bad_location").
    allowed_prefixes: list[str] = field(default_factory=list)

    def validate(self) -> None:
        if self.rows_per_unit < 1:
            raise ValueError("input.rows_per_unit must be >= 1")


@dataclass
class PrepPairsConfig:
    """``sama prep-pairs``: edit manifests -> paired-edit shards."""

    input: PairsInputConfig = field(default_factory=PairsInputConfig)
    output: OutputConfig = field(default_factory=OutputConfig)
    columns: ColumnConfig = field(default_factory=ColumnConfig)
    filter: FilterConfig = field(default_factory=FilterConfig)
    align: AlignConfig = field(default_factory=AlignConfig)
    buckets: BucketConfig = field(default_factory=BucketConfig)
    encode: EncodeConfig = field(default_factory=EncodeConfig)
    decode: DecodeConfig = field(default_factory=DecodeConfig)
    shards: ShardConfig = field(default_factory=ShardConfig)
    ray: RayConfig = field(default_factory=RayConfig)
    # SAMA prefixes editing prompts (code); an instruction already carrying it is left alone.
    video_prefix: str = "[Video edit] "
    image_prefix: str = "[Video edit] "
    # Recorded in every sample's metadata (``dataset``); defaults to the manifest's file name.
    dataset: str | None = None
    # The VLM judge that scores rows lacking scores (see the module docstring); off by default.
    judge: JudgeConfig = field(default_factory=JudgeConfig)

    def validate(self) -> None:
        for part in (self.input, self.align, self.buckets, self.shards, self.decode, self.judge):
            part.validate()


@dataclass
class PairRow:
    """One manifest row, resolved: absolute source/target URIs and the fields we keep."""

    row_id: str
    source: str
    target: str
    instruction: str
    category: str | None = None
    scores: dict[str, float] = field(default_factory=dict)
    dataset: str | None = None
    # Set on the second and later occurrences of the same (source, target, instruction).
    duplicate_of: str | None = None
    # A problem found while reading the manifest (e.g. a missing column value) and its reject
    # reason ("bad_row", or "bad_location" for a path the job may not read).
    problem: str | None = None
    problem_reason: str = "bad_row"

    @property
    def key(self) -> str:
        return schema.sample_key(self.source, self.target, self.instruction.strip())


@dataclass
class PairsUnit:
    unit_id: str
    rows: list[PairRow] = field(default_factory=list)

    @property
    def input_ids(self) -> list[str]:
        return [r.row_id for r in self.rows]

    def to_json(self) -> str:
        return json.dumps(asdict(self))

    @classmethod
    def from_json(cls, text: str) -> PairsUnit:
        raw = json.loads(text)
        return cls(unit_id=raw["unit_id"], rows=[PairRow(**r) for r in raw["rows"]])


def _score(value) -> float | None:
    """A judge score as a float; None when absent. Raises ValueError when it is not a number."""
    if value is None or value == "":
        return None
    number = float(value)
    return None if math.isnan(number) else number


def read_manifest(uri: str, cfg: PrepPairsConfig) -> list[PairRow]:
    """Rows of one manifest, with paths resolved against the manifest's folder."""
    rows = read_table(uri)
    if not rows:
        return []
    # jsonl rows may omit null keys, so the header is every key seen, in first-seen order.
    header = list(dict.fromkeys(key for row in rows for key in row))
    columns = cfg.columns.resolve(header, uri)
    dataset = cfg.dataset or uri.rstrip("/").rsplit("/", 1)[-1].rsplit(".", 1)[0]
    out = []
    for index, raw in enumerate(rows):
        row_id = f"{uri}#{index}"
        source = raw.get(columns["source"])
        target = raw.get(columns["target"])
        instruction = raw.get(columns["instruction"])
        # The prefix is added when the sample is built; stripping it here lets a prefixed and an
        # unprefixed copy of the same edit be recognised as duplicates.
        instruction = _strip_prefixes(
            "" if instruction is None else str(instruction), (cfg.video_prefix, cfg.image_prefix)
        )
        problem, problem_reason = None, "bad_row"
        if not source or not target:
            problem = f"row {index} has no {'source' if not source else 'target'} path"
        paths = {}
        for role, path in (("source", source), ("target", target)):
            if not path:
                paths[role] = ""
                continue
            try:
                paths[role] = resolve_manifest_path(str(path), uri, cfg.input.allowed_prefixes)
            except DisallowedLocation as exc:
                paths[role] = ""
                if problem is None:
                    problem, problem_reason = f"row {index} {role} {exc}", "bad_location"
        scores = {}
        for name, column in cfg.columns.scores.items():
            try:
                value = _score(raw.get(column))
            except (TypeError, ValueError):
                problem = problem or f"row {index} has a non-numeric {column} score {raw.get(column)!r}"
                continue
            if value is not None:
                scores[name] = value
        category = raw.get(cfg.columns.category)
        out.append(
            PairRow(
                row_id=row_id,
                source=paths["source"],
                target=paths["target"],
                instruction=instruction,
                category=None if category in (None, "") else str(category),
                scores=scores,
                dataset=dataset,
                problem=problem,
                problem_reason=problem_reason,
            )
        )
    return out


def _strip_prefixes(instruction: str, prefixes: tuple[str, ...]) -> str:
    text = instruction.strip()
    for prefix in prefixes:
        marker = prefix.strip()
        if marker and text.startswith(marker):
            return text[len(marker) :].strip()
    return text


def mark_duplicates(rows: list[PairRow]) -> int:
    """Flag every repeat of an identical (source, target, instruction); returns how many."""
    first: dict[str, str] = {}
    count = 0
    for row in rows:
        if row.problem:
            continue
        key = row.key
        if key in first:
            row.duplicate_of = first[key]
            count += 1
        else:
            first[key] = row.row_id
    return count


def check_manifests(cfg: PrepPairsConfig) -> str:
    """Preflight of ``prep-pairs``' input: every manifest exists and is not empty."""
    from sama.preflight import CheckFailed, storage_access

    if not cfg.input.manifests:
        raise CheckFailed("no manifest given", "pass --manifest URI (csv, jsonl or parquet)")
    total = 0
    for uri in cfg.input.manifests:
        with storage_access("read the manifest", uri, "--manifest"):
            size = storage.size(uri)
        if size == 0:
            raise CheckFailed(f"manifest {storage.redact(uri)} is empty", "check --manifest")
        total += size
    return f"{len(cfg.input.manifests)} manifest(s), {total} bytes"


def list_pair_units(cfg: PrepPairsConfig, done_rows: set[str]) -> tuple[list[PairsUnit], int]:
    """Read every manifest, flag duplicates, and group rows not yet done into units."""
    cfg.input.validate()
    rows: list[PairRow] = []
    for uri in cfg.input.manifests:
        rows.extend(read_manifest(uri, cfg))
    mark_duplicates(rows)
    pending = [r for r in rows if r.row_id not in done_rows]
    skipped = len(rows) - len(pending)
    step = cfg.input.rows_per_unit
    units = []
    for start in range(0, len(pending), step):
        chunk = pending[start : start + step]
        unit_id = uuid.uuid5(_UNIT_NAMESPACE, "\n".join(r.row_id for r in chunk)).hex
        units.append(PairsUnit(unit_id=unit_id, rows=chunk))
    return units, skipped


def check_scores(row: PairRow, media: str, cfg: FilterConfig) -> None:
    """Reject a pair whose judge scores fall below the media's thresholds."""
    if not cfg.enabled:
        return
    thresholds = cfg.image if media == "image" else cfg.video
    for name, minimum in thresholds.items():
        value = row.scores.get(name)
        if value is None:
            if cfg.require_scores:
                raise RejectInput("missing_score", f"{row.row_id}: no {name} score and filter.require_scores")
            continue
        if value < minimum:
            raise RejectInput("low_score", f"{row.row_id}: score {name}={value:g} is below {minimum:g}")


def missing_scores(row: PairRow, media: str, cfg: FilterConfig) -> list[str]:
    """The scores ``media``'s thresholds name that ``row`` lacks (what the judge is asked for)."""
    thresholds = cfg.image if media == "image" else cfg.video
    return [name for name in thresholds if row.scores.get(name) is None]


def judged_row(
    row: PairRow, media: str, source, target, judge: Judge, cfg: PrepPairsConfig
) -> tuple[PairRow, dict]:
    """``row`` with the judge's scores of the aligned ``source``/``target`` frames filling the scores
    it lacks, and the metadata extras recording the runs; then the thresholds apply.

    Raises RejectInput "judge_failed" when no judge run succeeded, "low_score" as check_scores."""
    result = judge.score(source, target, row.instruction, media)
    if result.error is not None:
        raise RejectInput("judge_failed", f"{row.row_id}: {result.error}")
    # Manifest scores win: the judge only fills what the manifest left out.
    scored = dataclasses.replace(row, scores={**result.scores, **row.scores})
    check_scores(scored, media, cfg.filter)
    extra = {"judge_runs": result.runs, "judge_model": cfg.judge.model, "judge_rubric": cfg.judge.rubric}
    if result.failed_runs:
        extra["judge_failed_runs"] = result.failed_runs
    return scored, extra


def with_prefix(instruction: str, prefix: str) -> str:
    text = instruction.strip()
    if not prefix or text.startswith(prefix.strip()):
        return text
    return prefix + text


def _media_of(uri: str) -> str:
    if video.is_image_uri(uri):
        return "image"
    return "video"


def _aspect_mismatch(a: tuple[int, int], b: tuple[int, int]) -> float:
    ra, rb = a[1] / a[0], b[1] / b[0]
    return abs(math.log(ra / rb))


def pair_sample(row: PairRow, cfg: PrepPairsConfig, judge: Judge | None = None) -> schema.Sample:
    """Validate, filter, align and encode one pair; raises RejectInput/VideoDecodeError if unusable.

    With ``judge``, a row lacking scores its thresholds need is judged on its aligned clips (see the
    module docstring); without it (or with every score present) the manifest's scores are used."""
    if row.problem:
        raise RejectInput(row.problem_reason, f"{row.row_id}: {row.problem}")
    if row.duplicate_of:
        raise RejectInput(
            "duplicate", f"{row.row_id}: same source, target and instruction as {row.duplicate_of}"
        )
    if not row.instruction.strip():
        raise RejectInput("empty_instruction", f"{row.row_id}: empty instruction ({row.source})")
    media = _media_of(row.source)
    if _media_of(row.target) != media:
        raise RejectInput(
            "media_mismatch", f"{row.row_id}: source {row.source} and target {row.target} differ"
        )
    if judge is not None and missing_scores(row, media, cfg.filter):
        # Scores the manifest has may already fail: no need to ask the judge then. The missing
        # ones are checked once the judge has filled them in.
        check_scores(row, media, dataclasses.replace(cfg.filter, require_scores=False))
    else:
        judge = None
        check_scores(row, media, cfg.filter)
    if media == "image":
        return _image_pair(row, cfg, judge)
    return _video_pair(row, cfg, judge)


def _meta(
    row: PairRow, cfg: PrepPairsConfig, media: str, judge_extra: dict | None = None, **fields
) -> schema.SampleMeta:
    prefix = cfg.image_prefix if media == "image" else cfg.video_prefix
    return schema.SampleMeta(
        key=row.key,
        task="image_edit" if media == "image" else "video_edit",
        media=media,
        instruction=with_prefix(row.instruction, prefix),
        source_uri=row.source,
        target_uri=row.target,
        category=row.category,
        scores=dict(row.scores),
        dataset=row.dataset,
        extra={"manifest_row": row.row_id, **(judge_extra or {})},
        **fields,
    )


def _image_pair(row: PairRow, cfg: PrepPairsConfig, judge: Judge | None = None) -> schema.Sample:
    source = video.read_image(row.source)
    target = video.read_image(row.target)
    src_hw, tgt_hw = source.shape[:2], target.shape[:2]
    if min(src_hw) < cfg.align.min_side:
        raise RejectInput(
            "too_small", f"{row.row_id}: source {src_hw[1]}x{src_hw[0]} is below align.min_side"
        )
    if _aspect_mismatch(src_hw, tgt_hw) > cfg.align.max_aspect_mismatch:
        raise RejectInput(
            "unalignable",
            f"{row.row_id}: aspect ratios differ "
            f"(source {src_hw[1]}x{src_hw[0]}, target {tgt_hw[1]}x{tgt_hw[0]})",
        )
    bucket = cfg.buckets.nearest(*src_hw)
    src = video.resize_center_crop(source, bucket.height, bucket.width)
    tgt = video.resize_center_crop(target, bucket.height, bucket.width)
    judge_extra = None
    if judge is not None:
        row, judge_extra = judged_row(row, "image", src[None], tgt[None], judge, cfg)
    meta = _meta(
        row,
        cfg,
        "image",
        judge_extra,
        fps=0.0,
        num_frames=1,
        height=bucket.height,
        width=bucket.width,
        bucket=bucket.name,
    )
    return schema.Sample(
        meta=meta, source=video.encode_image(src, "png"), target=video.encode_image(tgt, "png")
    )


def align_videos(
    src: video.VideoInfo, tgt: video.VideoInfo, row_id: str, cfg: AlignConfig
) -> tuple[float, int]:
    """The common frame rate and 4k+1 frame count of a video pair (see the module docstring)."""
    for name, info in (("source", src), ("target", tgt)):
        if not info.has_video:
            raise RejectInput("no_video_stream", f"{row_id}: {name} {info.uri} has no video stream")
    for name, info in (("source", src), ("target", tgt)):
        if min(info.width, info.height) < cfg.min_side:
            raise RejectInput(
                "too_small", f"{row_id}: {name} {info.width}x{info.height} is below align.min_side"
            )
    longer = max(src.duration_s, tgt.duration_s)
    mismatch = abs(src.duration_s - tgt.duration_s) / longer if longer > 0 else 0.0
    if mismatch > cfg.max_duration_mismatch:
        raise RejectInput(
            "unalignable",
            f"{row_id}: durations differ by {mismatch:.0%} (source {src.duration_s:.2f}s, target "
            f"{tgt.duration_s:.2f}s; align.max_duration_mismatch={cfg.max_duration_mismatch:g})",
        )
    if _aspect_mismatch((src.height, src.width), (tgt.height, tgt.width)) > cfg.max_aspect_mismatch:
        raise RejectInput(
            "unalignable",
            f"{row_id}: aspect ratios differ "
            f"(source {src.width}x{src.height}, target {tgt.width}x{tgt.height})",
        )
    fps = min(src.fps, tgt.fps, cfg.max_fps)
    duration = min(src.duration_s, tgt.duration_s)
    # Half a frame of slack absorbs container duration rounding.
    frames = floor_4k_plus_1(min(int(math.floor(duration * fps + 0.5)), cfg.max_frames))
    if frames < cfg.min_frames:
        raise RejectInput(
            "too_short",
            f"{row_id}: only {frames} aligned frames at {fps:g} fps (align.min_frames={cfg.min_frames})",
        )
    return fps, frames


def _video_pair(row: PairRow, cfg: PrepPairsConfig, judge: Judge | None = None) -> schema.Sample:
    src_info = video.probe(row.source)
    tgt_info = video.probe(row.target)
    fps, frames = align_videos(src_info, tgt_info, row.row_id, cfg.align)
    bucket = cfg.buckets.nearest(src_info.height, src_info.width)
    size = (bucket.height, bucket.width)
    enc = cfg.encode
    strict = cfg.decode.max_errors
    src = video.decode_clip(
        row.source, 0.0, frames, fps=fps, size=size, threads=enc.threads, max_errors=strict
    )
    tgt = video.decode_clip(
        row.target, 0.0, frames, fps=fps, size=size, threads=enc.threads, max_errors=strict
    )
    judge_extra = None
    if judge is not None:
        row, judge_extra = judged_row(row, "video", src, tgt, judge, cfg)
    meta = _meta(
        row,
        cfg,
        "video",
        judge_extra,
        fps=fps,
        num_frames=frames,
        height=bucket.height,
        width=bucket.width,
        bucket=bucket.name,
        span=[0.0, round(frames / fps, 6)],
    )
    return schema.Sample(
        meta=meta,
        source=enc.encode(src, fps),
        target=enc.encode(tgt, fps),
    )


def process_pairs_unit(unit: PairsUnit, cfg: PrepPairsConfig) -> ledger.UnitResult:
    """Process every row of a unit, write its shards, then its completion marker
    (:func:`sama.prep.unit.run_unit`: rejects recorded, environment failures raise UnitFailed).

    With ``judge.enabled`` one :class:`~sama.eval.judge.Judge` serves the whole unit; rows are
    judged one after the other, each row's ``judge.runs`` requests concurrently."""
    judge = Judge(cfg.judge) if cfg.judge.enabled else None
    try:
        return run_unit(
            unit.unit_id,
            unit.input_ids,
            cfg.output.uri,
            cfg.shards,
            ((row.row_id, row) for row in unit.rows),
            lambda row, _dropped: [pair_sample(row, cfg, judge)],
        )
    finally:
        if judge is not None:
            judge.close()
