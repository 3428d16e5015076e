"""``sama eval``'s stages: held-out samples or a benchmark manifest -> edits -> metrics (-> judge).

Pure functions over one work unit; the Ray Data driver (``pipelines/eval.py``) only schedules
them on actors that each load the model, the metric models and the judge client once
(:class:`Evaluator`). Inputs are of two kinds:

* **shards** (a job output, its ``shards/`` folder, a ``shards/<media>`` folder or one ``.tar``):
  held-out samples, pixel or latent. One unit per shard, one input per sample
  (``<shard>#<key>``). A sample is edited at its own size and length (it was cut to a training
  bucket): its source with its instruction (which carries its task prefix already), to its
  target's frame count (restoring a sped-up clip lengthens it). Its target is the reference. A
  latent sample's source and target are its stored latents decoded by the model's autoencoder.
* **manifests** (``.csv``, ``.jsonl`` or ``.json`` lists): benchmark rows of a source video (or
  image), an instruction and optionally a category and a reference target, at their own size and
  rate. One unit per ``rows_per_unit`` rows, one input per row (``<manifest>#<index>``). A row is
  edited as ``sama edit`` edits a file (:meth:`SamaEditPipeline.edit_video`: resized to the nearest
  training bucket, edited, restored to the source's size, rate and length).

Per input: the edit, its metrics (:class:`sama.eval.metrics.MetricSuite`) against the reference and
the source, and, with ``judge.enabled``, the judge's scores (:class:`sama.eval.judge.Judge`); it is
written as a :class:`sama.schema.EvalSample` (source, edit, reference) to the output's shards and
its record (the per-sample result, :func:`record_of`) goes into the unit's completion marker.
Inputs that cannot be evaluated are rejected with a reason (``no_source``: a text-to-video sample;
``schema``, ``bad_row``, ``bad_location``, the decoder's kinds); a judge failure is recorded in the
record, never a reject. Edits are seeded with ``inference.seed``: a rerun reproduces them.
"""

from __future__ import annotations

import json
import logging
import os
import time
from dataclasses import asdict, dataclass, field

import numpy as np

from sama import schema, storage, video
from sama.config import ConfigError
from sama.eval.judge import Judge, JudgeConfig
from sama.eval.metrics import MetricsConfig, MetricSuite
from sama.prep import ledger
from sama.prep.common import ActorRayConfig, OutputConfig, RejectInput
from sama.prep.inputs import DisallowedLocation, read_table, resolve_manifest_path, unit_id_for
from sama.prep.unit import RejectSource, run_unit
from sama.schema import ShardConfig
from sama.tracking import TrackingConfig

log = logging.getLogger(__name__)

MANIFEST_SUFFIXES = (".csv", ".jsonl", ".json")
MLFLOW_MODEL_PREFIX = "models:/"
EVAL_EXPERIMENT = "sama-eval"

# Column layouts of benchmark manifests: role -> candidate column names, first present wins.
# The VIE-Bench, OpenVE-Bench and ReCo-Bench releases could not be read from here, so their
# presets take the column names those releases and the tools around them are known to use
# (Kiwi-Edit's ``src_video``/``tgt_video``/``prompt``, ``edit_type`` categories); set
# ``columns.source`` / ``.instruction`` / ``.target`` / ``.category`` for any other layout.
COLUMN_PRESETS: dict[str, dict[str, list[str]]] = {
    "generic": {
        "source": ["source", "source_video", "src_video", "video"],
        "instruction": ["instruction", "prompt", "edit_instruction", "edit_prompt"],
        "target": ["target", "reference", "target_video", "tgt_video"],
        "category": ["category", "edit_type", "type"],
    },
    "vie_bench": {
        "source": ["source_video", "video", "video_path", "source"],
        "instruction": ["instruction", "edit_instruction", "prompt"],
        "target": ["target_video", "reference"],
        "category": ["category", "edit_type", "task"],
    },
    "openve_bench": {
        "source": ["src_video", "source_video", "video", "source"],
        "instruction": ["prompt", "instruction", "edit_prompt"],
        "target": ["tgt_video", "target_video", "target"],
        "category": ["edit_type", "category", "type"],
    },
    "reco_bench": {
        "source": ["source_video", "src_video", "video", "source"],
        "instruction": ["instruction", "prompt", "edit_instruction"],
        "target": ["target_video", "tgt_video", "target"],
        "category": ["task", "category", "edit_type"],
    },
}


@dataclass
class EvalColumns:
    """Which manifest columns hold what; unset roles come from the preset ("auto": the first
    preset whose source and instruction columns the header has)."""

    preset: str = "auto"
    source: str | None = None
    instruction: str | None = None
    target: str | None = None
    category: str | None = None

    def validate(self) -> None:
        if self.preset != "auto" and self.preset not in COLUMN_PRESETS:
            raise ValueError(
                f"columns.preset {self.preset!r} is unknown (known: auto, {', '.join(COLUMN_PRESETS)})"
            )

    def resolve(self, header: list[str], where: str) -> dict[str, str | None]:
        """Column per role for a manifest with ``header`` (target and category may be None)."""
        names = [self.preset] if self.preset != "auto" else list(COLUMN_PRESETS)
        for name in names:
            layout = COLUMN_PRESETS[name]
            chosen: dict[str, str | None] = {}
            for role, candidates in layout.items():
                explicit = getattr(self, role)
                chosen[role] = explicit or next((c for c in candidates if c in header), None)
            if chosen["source"] in header and chosen["instruction"] in header:
                return chosen
        raise ValueError(
            f"{where}: cannot find the source and instruction columns in header {header} "
            f"(preset {self.preset!r}; set columns.source and columns.instruction, or columns.preset)"
        )


@dataclass
class EvalInference:
    """How every sample is edited; None: the export's own settings (as ``sama edit``)."""

    steps: int | None = None
    cfg: float | None = None
    seed: int = 0
    # float32, bfloat16 or float16; None: bfloat16 on a GPU, float32 on CPU.
    dtype: str | None = None
    # Frames per window for manifest videos longer than the export's clip length.
    max_frames: int | None = None

    def validate(self) -> None:
        if self.steps is not None and self.steps < 1:
            raise ValueError("inference.steps must be >= 1")
        if self.max_frames is not None and self.max_frames < 1:
            raise ValueError("inference.max_frames must be >= 1")


@dataclass
class ReportSection:
    """The HTML report: how many samples it shows with players (the summary covers all)."""

    max_samples: int = 32


@dataclass
class EvalConfig:
    """``sama eval``: edit held-out samples or benchmark rows with a model and measure the edits."""

    # An export directory (local, s3:// or a hub id) or a registered model (models:/NAME/VERSION).
    model: str = ""
    # A LoRA adapter export applied over the model.
    lora: str | None = None
    # Held-out shard prefixes (pixel or latent) and/or manifests (.csv, .jsonl, .json).
    data: list[str] = field(default_factory=list)
    output: OutputConfig = field(default_factory=OutputConfig)
    columns: EvalColumns = field(default_factory=EvalColumns)
    # Manifest paths may point under the manifest's folder or these prefixes only.
    allowed_prefixes: list[str] = field(default_factory=list)
    rows_per_unit: int = 8
    # At most this many samples per data input (the first ones; None: all).
    limit: int | None = None
    inference: EvalInference = field(default_factory=EvalInference)
    metrics: MetricsConfig = field(default_factory=MetricsConfig)
    judge: JudgeConfig = field(default_factory=JudgeConfig)
    report: ReportSection = field(default_factory=ReportSection)
    # Where the eval run is logged (:func:`eval_tracking_uri`); its own experiment by default.
    tracking: TrackingConfig = field(default_factory=lambda: TrackingConfig(experiment=EVAL_EXPERIMENT))
    ray: ActorRayConfig = field(default_factory=ActorRayConfig)
    shards: ShardConfig = field(default_factory=ShardConfig)

    def validate(self) -> None:
        if self.rows_per_unit < 1:
            raise ValueError("rows_per_unit must be >= 1")
        if self.limit is not None and self.limit < 1:
            raise ValueError("limit must be >= 1 (or null: every sample)")
        for part in (self.columns, self.inference, self.metrics, self.judge, self.ray, self.shards):
            part.validate()
        if self.report.max_samples < 0:
            raise ValueError("report.max_samples must be >= 0")


# --- units ---------------------------------------------------------------------------------------


@dataclass
class EvalRow:
    """One manifest row, resolved: the source, instruction, optional reference and category."""

    row_id: str
    source: str
    instruction: str
    target: str | None = None
    category: str | None = None
    dataset: str | None = None
    problem: str | None = None
    problem_reason: str = "bad_row"

    @property
    def key(self) -> str:
        return schema.sample_key(self.source, self.instruction.strip(), self.target or "")


@dataclass
class EvalUnit:
    """One shard (``shard``, with at most ``limit`` of its samples) or a batch of manifest rows."""

    unit_id: str
    shard: str | None = None
    rows: list[EvalRow] = field(default_factory=list)
    limit: int | None = None

    @property
    def input_ids(self) -> list[str]:
        return [self.shard] if self.shard is not None else [r.row_id for r in self.rows]

    def to_json(self) -> str:
        return json.dumps(asdict(self))

    @classmethod
    def from_json(cls, text: str) -> EvalUnit:
        raw = json.loads(text)
        raw["rows"] = [EvalRow(**r) for r in raw.get("rows", [])]
        return cls(**raw)


def is_manifest(uri: str) -> bool:
    return storage.parse(uri).path.lower().endswith(MANIFEST_SUFFIXES)


def read_eval_manifest(uri: str, cfg: EvalConfig) -> list[EvalRow]:
    """The rows of one benchmark manifest, paths resolved against its folder (a row pointing
    outside it or ``allowed_prefixes`` carries a ``bad_location`` problem)."""
    rows = read_table(uri)
    if not rows:
        return []
    header = list(dict.fromkeys(key for row in rows for key in row))
    columns = cfg.columns.resolve(header, storage.redact(uri))
    dataset = uri.rstrip("/").rsplit("/", 1)[-1].rsplit(".", 1)[0]
    out = []
    for index, raw in enumerate(rows[: cfg.limit] if cfg.limit else rows):
        row_id = f"{uri}#{index}"
        instruction = str(raw.get(columns["instruction"]) or "").strip()
        problem, reason = None, "bad_row"
        if not instruction:
            problem = f"row {index} has no instruction"
        paths: dict[str, str | None] = {}
        for role in ("source", "target"):
            column = columns[role]
            value = raw.get(column) if column else None
            if value in (None, ""):
                paths[role] = None
                if role == "source":
                    problem = problem or f"row {index} has no source path"
                continue
            try:
                paths[role] = resolve_manifest_path(str(value), uri, cfg.allowed_prefixes)
            except DisallowedLocation as exc:
                paths[role] = None
                if problem is None:
                    problem, reason = f"row {index} {role} {exc}", "bad_location"
        category = raw.get(columns["category"]) if columns["category"] else None
        out.append(
            EvalRow(
                row_id=row_id,
                source=paths["source"] or "",
                instruction=instruction,
                target=paths["target"],
                category=None if category in (None, "") else str(category),
                dataset=dataset,
                problem=problem,
                problem_reason=reason,
            )
        )
    return out


def list_eval_units(cfg: EvalConfig, done_inputs: set[str]) -> tuple[list[EvalUnit], int]:
    """Units of every data input not yet covered by a completion marker; returns the units and
    how many inputs (shards or rows) were skipped as done."""
    from sama.prep.precompute_job import input_shards

    units: list[EvalUnit] = []
    skipped = 0
    shards = sorted({uri for prefix in cfg.data if not is_manifest(prefix) for uri in input_shards(prefix)})
    for shard in shards:
        if shard in done_inputs:
            skipped += 1
            continue
        units.append(EvalUnit(unit_id=unit_id_for([shard]), shard=shard, limit=cfg.limit))
    for manifest in (uri for uri in cfg.data if is_manifest(uri)):
        rows = read_eval_manifest(manifest, cfg)
        pending = [r for r in rows if r.row_id not in done_inputs]
        skipped += len(rows) - len(pending)
        for start in range(0, len(pending), cfg.rows_per_unit):
            batch = pending[start : start + cfg.rows_per_unit]
            units.append(EvalUnit(unit_id=unit_id_for([r.row_id for r in batch]), rows=batch))
    return units, skipped


def check_data(cfg: EvalConfig) -> str:
    """Preflight of the data inputs: each shard prefix holds shards among its first listing page;
    each manifest is readable with source and instruction columns. Raises CheckFailed."""
    from sama.preflight import CheckFailed, storage_access

    found = []
    for uri in cfg.data:
        where = storage.redact(uri)
        if is_manifest(uri):
            with storage_access("read", uri, "--data"):
                try:
                    rows = read_eval_manifest(uri, cfg)
                except ValueError as exc:
                    raise CheckFailed(str(exc), "fix the manifest or set columns.*") from None
            if not rows:
                raise CheckFailed(f"{where}: the manifest has no rows", "check --data")
            found.append(f"{where}: {len(rows)} row(s)")
            continue
        with storage_access("list", uri, "--data"):
            files, complete = storage.list_files_head(uri)
        tars = sum(f.endswith(schema.SHARD_SUFFIX) for f in files)
        if not tars:
            raise CheckFailed(
                f"{where}: no shard (.tar) and not a manifest (.csv, .jsonl, .json)", "check --data"
            )
        found.append(f"{where}: {tars}{'' if complete else '+'} shard(s)")
    return "; ".join(found)


# --- the model ----------------------------------------------------------------------------------


def resolve_model(uri: str, tracking_uri: str | None = None, registry_uri: str | None = None) -> str:
    """A local directory holding the SAMA export ``uri`` names.

    ``models:/NAME/VERSION`` (a model registered by ``sama train``) is looked up in the MLflow
    registry (``registry_uri``, else ``tracking_uri``, else MLflow's environment) and downloaded
    once into the local cache, keyed by the version's logged model (so two stores that both hold
    a "version 1" never share a cache entry); the export is the pyfunc model's ``pipeline``
    artifact, found through its MLmodel file. Anything else is fetched by
    :func:`sama.storage.localize_dir` (a local path, ``s3://`` or a hub id).
    """
    if not uri.startswith(MLFLOW_MODEL_PREFIX):
        return storage.localize_dir(uri)
    import hashlib
    import shutil

    import mlflow

    name, version = model_name_version(uri)
    client = mlflow.MlflowClient(tracking_uri=tracking_uri, registry_uri=registry_uri or tracking_uri)
    source = client.get_model_version(name, version).source
    digest = hashlib.sha256(f"{source}".encode()).hexdigest()[:16]
    target = os.path.join(storage.default_cache_dir(), "mlflow-models", f"{name}--{version}--{digest}")
    if not os.path.isfile(os.path.join(target, "MLmodel")):
        staging = f"{target}.part-{os.getpid()}"
        shutil.rmtree(staging, ignore_errors=True)
        try:
            if tracking_uri:
                mlflow.set_tracking_uri(tracking_uri)
            mlflow.artifacts.download_artifacts(artifact_uri=uri, dst_path=staging)
            os.makedirs(os.path.dirname(target), exist_ok=True)
            os.replace(staging, target)
        except OSError:
            if not os.path.isfile(os.path.join(target, "MLmodel")):  # not put in place by another process
                raise
        finally:
            shutil.rmtree(staging, ignore_errors=True)
    return _pipeline_artifact(target, uri)


def model_name_version(uri: str) -> tuple[str, str]:
    parts = uri[len(MLFLOW_MODEL_PREFIX) :].strip("/").split("/")
    if len(parts) != 2 or not all(parts):
        raise ConfigError(f"model {uri}: expected models:/NAME/VERSION")
    return parts[0], parts[1]


def _pipeline_artifact(model_dir: str, uri: str) -> str:
    """The export inside a downloaded pyfunc model: its ``pipeline`` artifact's path (MLmodel)."""
    import yaml

    with open(os.path.join(model_dir, "MLmodel")) as handle:
        mlmodel = yaml.safe_load(handle) or {}
    artifacts = (mlmodel.get("flavors", {}).get("python_function", {}) or {}).get("artifacts") or {}
    path = (artifacts.get("pipeline") or {}).get("path")
    if not path or not os.path.isdir(os.path.join(model_dir, path)):
        raise ConfigError(f"model {uri}: the registered model has no 'pipeline' artifact (not a SAMA export)")
    return os.path.join(model_dir, path)


def eval_tracking_uri(cfg: TrackingConfig) -> str | None:
    """Where the eval run is tracked: ``tracking.uri`` ("local": the SQLite store in
    ``tracking.local_dir``), else MLFLOW_TRACKING_URI, else the SQLite store in ``local_dir``;
    None with ``tracking.enabled = false``."""
    from sama import tracking

    if not cfg.enabled:
        return None
    if cfg.uri and cfg.uri != tracking.LOCAL:
        return cfg.uri
    if not cfg.uri and os.environ.get("MLFLOW_TRACKING_URI"):
        return os.environ["MLFLOW_TRACKING_URI"]
    return tracking.sqlite_uri(tracking.local_store_dir(cfg))


class Evaluator:
    """What one actor holds: the edit pipeline, the metric suite and the judge, loaded once."""

    def __init__(self, cfg: EvalConfig, device: str | None = None):
        import torch

        from sama.edit import _torch_dtype
        from sama.pipeline_edit import SamaEditPipeline

        self.cfg = cfg
        self.device = device or ("cuda" if torch.cuda.is_available() else "cpu")
        model_dir = resolve_model(cfg.model, eval_tracking_uri(cfg.tracking), cfg.tracking.registry_uri)
        self.pipeline = SamaEditPipeline.from_pretrained(
            model_dir, device=self.device, torch_dtype=_torch_dtype(cfg.inference.dtype, self.device)
        )
        if cfg.lora:
            self.pipeline.load_lora(storage.localize_dir(cfg.lora))
        self.metrics = MetricSuite(cfg.metrics, device=self.device)
        self.judge = Judge(cfg.judge) if cfg.judge.enabled else None

    def __call__(self, unit_json: str) -> ledger.UnitResult:
        return process_unit(EvalUnit.from_json(unit_json), self)


# --- one unit -----------------------------------------------------------------------------------


@dataclass
class EvalInput:
    """One sample to evaluate: its metadata, frames and how it is edited."""

    meta: schema.SampleMeta
    source: np.ndarray
    reference: np.ndarray | None
    fps: float
    # True: edit as sama edit edits a file (bucket, rate, windows, restore); False: as is.
    real_size: bool


def _shard_inputs(unit: EvalUnit):
    """``(input_id, members)`` of a shard unit's samples (at most ``unit.limit``)."""
    shard = unit.shard
    assert shard is not None
    count = 0
    try:
        for members in schema.iter_members(shard):
            if unit.limit is not None and count >= unit.limit:
                return
            count += 1
            yield f"{shard}#{members['__key__']}", members
    except schema.SchemaError as exc:
        raise RejectSource(shard, "bad_tar", str(exc)) from exc
    except storage.StorageError as exc:
        raise RejectSource(shard, "missing", str(exc)) from exc


def sample_input(members: dict, input_id: str, pipeline) -> EvalInput:
    """A held-out sample's members -> what is evaluated; raises RejectInput for a sample that
    cannot be (``schema``, ``no_source``)."""
    try:
        sample = schema.read_sample(members, where=input_id)
        if isinstance(sample, schema.LatentSample):
            if sample.latents.source is None:
                raise RejectInput(
                    "no_source", f"{input_id}: a {sample.meta.task} sample has no source to edit"
                )
            target = _decode_latents(pipeline, sample.latents.target, sample.meta)
            source = _decode_latents(pipeline, sample.latents.source, sample.meta)
        else:
            target, source = sample.decode_pair()
    except schema.SchemaError as exc:
        raise RejectInput("schema", f"{input_id}: {exc}") from None
    if source is None:
        raise RejectInput("no_source", f"{input_id}: a {sample.meta.task} sample has no source to edit")
    return EvalInput(sample.meta, source, target, float(sample.meta.fps or 8.0), real_size=False)


def _decode_latents(pipeline, latents, meta: schema.SampleMeta) -> np.ndarray:
    """Stored latents -> uint8 frames cropped to the sample's size (as validation renders do)."""
    from sama.pipeline_edit import decode_latents

    with pipeline._on_device(pipeline.vae):
        frames = decode_latents(pipeline.vae, latents)
    return frames[:, : meta.height, : meta.width]


def _read_media(uri: str) -> tuple[np.ndarray, float, str]:
    """A manifest's video or image: frames, fps, media."""
    if video.is_image_uri(uri):
        return video.read_image(uri)[None], 1.0, "image"
    info = video.probe(uri)
    return video.decode_clip(uri), float(info.fps if info.fps > 0 else 24.0), "video"


def row_input(row: EvalRow) -> EvalInput:
    """A manifest row -> what is evaluated (its source decoded at its own size and rate); raises
    RejectInput for a row that cannot be."""
    if row.problem:
        raise RejectInput(row.problem_reason, f"{row.row_id}: {row.problem}")
    source, fps, media = _read_media(row.source)
    reference = None
    if row.target:
        reference, _, _ = _read_media(row.target)
        if reference.shape[1:3] != source.shape[1:3]:
            reference = video.resize_center_crop(reference, source.shape[1], source.shape[2])
        if len(reference) != len(source):
            reference = video.stretch_frames(reference, len(source))
    height, width = source.shape[1:3]
    meta = schema.SampleMeta(
        key=row.key,
        task="image_edit" if media == "image" else "video_edit",
        media=media,  # type: ignore[arg-type]
        instruction=row.instruction,
        fps=fps,
        num_frames=len(source),
        height=height,
        width=width,
        bucket=f"{height}x{width}",
        source_uri=storage.redact(row.source),
        target_uri=storage.redact(row.target) if row.target else None,
        category=row.category,
        dataset=row.dataset,
    )
    return EvalInput(meta, source, reference, fps, real_size=True)


def edit_input(evaluator: Evaluator, item: EvalInput) -> tuple[np.ndarray, float]:
    """The model's edit of ``item`` (frames, seconds)."""
    started = time.monotonic()
    settings = evaluator.cfg.inference
    pipeline = evaluator.pipeline
    if item.real_size:
        out = pipeline.edit_video(
            item.source,
            item.meta.instruction,
            item.fps if item.meta.media == "video" else 1.0,
            max_frames=settings.max_frames,
            num_inference_steps=settings.steps,
            guidance_scale=settings.cfg,
            seed=settings.seed,
            progress=False,
        )
        edited = out.frames
    else:
        frames = item.reference.shape[0] if item.reference is not None else item.source.shape[0]
        edited = pipeline(
            item.source,
            item.meta.instruction,
            num_inference_steps=settings.steps,
            guidance_scale=settings.cfg,
            add_prefix=False,  # a held-out sample's instruction carries its prefix already
            seed=settings.seed,
            num_frames=frames,
        ).frames
    return edited, time.monotonic() - started


def plain_instruction(instruction: str) -> str:
    """The instruction without a task prefix such as ``[Video edit] `` (what CLIP and the judge read)."""
    text = instruction.strip()
    if text.startswith("[") and "]" in text:
        text = text.split("]", 1)[1].strip()
    return text


def record_of(
    input_id: str, item: EvalInput, edited: np.ndarray, metrics: dict, judged, seconds: float
) -> dict:
    """The per-sample record (the marker's ``records`` entry and ``results.jsonl`` line)."""
    meta = item.meta
    return {
        "key": meta.key,
        "input": storage.redact(input_id),
        "task": meta.task,
        "category": meta.category,
        "dataset": meta.dataset,
        "media": meta.media,
        "instruction": meta.instruction,
        "frames": int(edited.shape[0]),
        "height": int(edited.shape[1]),
        "width": int(edited.shape[2]),
        "metrics": metrics,
        "judge": dict(judged.scores) if judged is not None else {},
        "judge_runs": list(judged.runs) if judged is not None else [],
        "judge_error": judged.error if judged is not None else None,
        "edit_seconds": round(seconds, 3),
        "reference": item.reference is not None,
    }


def _encode(frames: np.ndarray, media: str, fps: float) -> bytes:
    if media == "image":
        return video.encode_image(frames[0])
    even = frames[:, : frames.shape[1] // 2 * 2, : frames.shape[2] // 2 * 2]
    return video.encode_mp4(even, fps)


def evaluate(evaluator: Evaluator, input_id: str, item: EvalInput) -> tuple[schema.EvalSample, dict]:
    """Edit, measure and (optionally) judge one input: its output sample and record."""
    edited, seconds = edit_input(evaluator, item)
    instruction = plain_instruction(item.meta.instruction)
    metrics = evaluator.metrics.compute(
        edited, source=item.source, reference=item.reference, instruction=instruction
    )
    judged = None
    if evaluator.judge is not None:
        judged = evaluator.judge.score(item.source, edited, instruction, item.meta.media)
    record = record_of(input_id, item, edited, metrics, judged, seconds)
    meta = schema.SampleMeta(**{**asdict(item.meta), "extra": {**item.meta.extra, "eval": record}})
    media, fps = item.meta.media, item.fps
    sample = schema.EvalSample(
        meta=meta,
        source=_encode(item.source, media, fps),
        edit=_encode(edited, media, fps),
        reference=None if item.reference is None else _encode(item.reference, media, fps),
    )
    return sample, record


def process_unit(unit: EvalUnit, evaluator: Evaluator) -> ledger.UnitResult:
    """Evaluate every input of ``unit`` with ``evaluator``: write the evaluated samples' shards
    and the completion marker whose ``records`` hold the per-sample results
    (:func:`sama.prep.unit.run_unit`: rejects recorded, environment failures raise UnitFailed)."""
    records: list[dict] = []

    def make_samples(item, dropped: list[ledger.Reject]) -> list[schema.EvalSample]:
        input_id, payload = item
        if unit.shard is not None:
            prepared = sample_input(payload, input_id, evaluator.pipeline)
        else:
            prepared = row_input(payload)
        sample, record = evaluate(evaluator, input_id, prepared)
        records.append(record)
        return [sample]

    if unit.shard is not None:
        inputs = ((input_id, (input_id, members)) for input_id, members in _shard_inputs(unit))
    else:
        inputs = ((row.row_id, (row.row_id, row)) for row in unit.rows)
    return run_unit(
        unit.unit_id,
        unit.input_ids,
        evaluator.cfg.output.uri,
        evaluator.cfg.shards,
        inputs,
        make_samples,
        records=records,
    )
