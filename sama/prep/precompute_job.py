"""The precompute job's stages: pixel shards -> frozen-encoder outputs -> latent shards.

Pure functions over one input shard (the work unit); the Ray Data pipeline
(``pipelines/precompute.py``) only schedules them, on actors that load the encoders once. Per
sample: read and check its members, decode the target and source (a derived pretext source is
rebuilt from the target, :meth:`sama.schema.Sample.decode_pair`), then encode equal-shaped samples
together (:func:`sama.precompute.encode_samples`, ``batch_size`` at a time) and write each as a
:class:`sama.schema.LatentSample` with its metadata unchanged (same key) under
``shards/<media>/<bucket>/``. A sample that cannot be read or decoded is rejected with its reason;
the unit goes on (:func:`sama.prep.unit.run_unit`).

The output root also holds ``latents.json`` and ``null_prompts.safetensors``
(:func:`sama.schema.write_latent_info`), written by the driver before any unit runs: which
encoders made the tensors. A rerun with other encoders or another dtype is refused
(:func:`check_latent_output`) unless it overwrites.
"""

from __future__ import annotations

import json
import logging
from dataclasses import asdict, dataclass, field
from typing import Any

from sama import schema, storage
from sama.config import ConfigError
from sama.prep import ledger
from sama.prep.common import ActorRayConfig, OutputConfig, RejectInput
from sama.prep.inputs import unit_id_for
from sama.prep.unit import Batching, RejectSource, run_unit
from sama.schema import ShardConfig
from sama.train.trainer import ModelSection

log = logging.getLogger(__name__)


@dataclass
class PrecomputeConfig:
    """``sama precompute``: pixel shards (prep-pretext / prep-pairs outputs) -> latent shards."""

    # Shard prefixes: a job output root, its shards/ folder, a shards/<media> folder or one .tar.
    inputs: list[str] = field(default_factory=list)
    output: OutputConfig = field(default_factory=OutputConfig)
    # The model whose frozen encoders run: ``model.preset`` (with ``pretrained`` / ``overrides``)
    # or ``model.init_from`` (a SAMA export: its autoencoder and text encoder).
    model: ModelSection = field(default_factory=ModelSection)
    # Seeds torch before each unit, so anything stochastic an encoder does repeats on a rerun.
    seed: int = 0
    # The dtype the tensors are stored in (float32, bfloat16, float16); None = the model's.
    dtype: str | None = None
    # Samples per encoder call; only samples of equal shapes share a call.
    batch_size: int = 4
    ray: ActorRayConfig = field(default_factory=ActorRayConfig)
    shards: ShardConfig = field(default_factory=ShardConfig)

    def validate(self) -> None:
        if self.batch_size < 1:
            raise ValueError("batch_size must be >= 1")
        if self.dtype is not None:
            from sama.precompute import storage_dtype

            storage_dtype(self.dtype)
        self.ray.validate()
        self.shards.validate()


@dataclass
class ShardUnit:
    """One input shard, processed by one actor call into one set of latent shards and a marker."""

    unit_id: str
    shard: str

    @property
    def input_ids(self) -> list[str]:
        return [self.shard]

    def to_json(self) -> str:
        return json.dumps(asdict(self))

    @classmethod
    def from_json(cls, text: str) -> ShardUnit:
        return cls(**json.loads(text))


class LatentOutputMismatch(ConfigError):
    """The output holds latents made by other encoders (or in another dtype), or is not a latent
    output at all; mixing them would train on inconsistent tensors."""


# --- inputs -------------------------------------------------------------------------------------


def input_shards(prefix: str) -> list[str]:
    """The shards under one input ``prefix``, sorted.

    ``prefix`` is one ``.tar``, a job output root, its ``shards/`` folder or a ``shards/<media>``
    folder. In a job output (it has completion markers) only shards a completed unit lists are
    taken: a killed run's leftovers, which the next run of that job deletes, never are.
    """
    base = str(prefix).rstrip("/")
    if base.endswith(schema.SHARD_SUFFIX):
        return [base]
    root = schema.output_root(base)
    if storage.list_files(storage.join(root, ledger.MARKERS_DIR), suffixes=(".json",)):
        relative = base[len(root) :].strip("/")
        listed = [s["path"] for r in ledger.read_markers(root) for s in r.shards]
        wanted = [p for p in listed if not relative or p == relative or p.startswith(relative + "/")]
        return sorted(storage.join(root, p) for p in wanted)
    return schema.list_shards(base)


def list_shard_units(cfg: PrecomputeConfig, done_shards: set[str]) -> tuple[list[ShardUnit], int]:
    """One unit per input shard not yet covered by a completion marker; returns the units and how
    many shards were skipped as done. A shard named by two inputs is one unit."""
    shards = sorted({uri for prefix in cfg.inputs for uri in input_shards(prefix)})
    pending = [uri for uri in shards if uri not in done_shards]
    units = [ShardUnit(unit_id=unit_id_for([uri]), shard=uri) for uri in pending]
    return units, len(shards) - len(pending)


def check_inputs(cfg: PrecomputeConfig) -> str:
    """Preflight of the inputs: each prefix holds shards (among its first listing page) and is
    not itself a latent output; the output is none of them. Raises CheckFailed naming the input."""
    from sama.preflight import CheckFailed, storage_access

    found = []
    for prefix in cfg.inputs:
        where = storage.redact(prefix)
        with storage_access("list", prefix, "--input"):
            files, complete = storage.list_files_head(prefix)
            if schema.read_latent_info(prefix) is not None:
                raise CheckFailed(
                    f"{where} is a latent output (it has {schema.LATENT_INFO_FILE}): its samples are "
                    "already precomputed",
                    "give the pixel shards (a prep-pretext or prep-pairs output) as --input",
                )
        tars = sum(f.endswith(schema.SHARD_SUFFIX) for f in files)
        if not tars:
            listed = f"{len(files)} file(s)" if complete else f"the first {len(files)} file(s)"
            raise CheckFailed(f"{where}: no shard (.tar) among {listed}", "check --input")
        if _overlaps(cfg.output.uri, prefix):
            raise CheckFailed(
                f"the output {storage.redact(cfg.output.uri)} and the input {where} overlap",
                "write the latents to a prefix of their own",
            )
        found.append(f"{where}: {tars}{'' if complete else '+'} shard(s)")
    return "; ".join(found)


def _overlaps(a: str, b: str) -> bool:
    a, b = schema.output_root(a), schema.output_root(b)
    return storage.is_under(a, b) or storage.is_under(b, a)


# --- the model ----------------------------------------------------------------------------------


def model_config_of(section: ModelSection):
    """The resolved ModelConfig whose frozen encoders run (the export's own with ``init_from``)."""
    from sama.train.trainer import resolve_model_config

    return resolve_model_config(section)


def storage_dtype_name(cfg: PrecomputeConfig, model_config) -> str:
    return cfg.dtype or model_config.torch_dtype


def latent_info(cfg: PrecomputeConfig, model_config) -> schema.LatentOutputInfo:
    """What ``latents.json`` records for a run of ``cfg``."""
    from sama.precompute import NULL_PROMPTS
    from sama.train.trainer import frozen_encoder_identity

    model = f"export:{storage.redact(cfg.model.init_from)}" if cfg.model.init_from else cfg.model.preset
    return schema.LatentOutputInfo(
        encoders=frozen_encoder_identity(cfg.model, model_config),
        dtype=storage_dtype_name(cfg, model_config),
        null_prompts=list(NULL_PROMPTS),
        model=model,
    )


def load_encoders(
    section: ModelSection,
    model_config,
    *,
    with_vae: bool = True,
    with_semantic_encoder: bool = True,
    device: str | None = None,
):
    """The frozen encoders of ``section`` as :class:`sama.models.presets.SamaComponents` without a
    transformer (its ``transformer`` is None).

    A preset builds them as :func:`sama.models.presets.build_model` does (same seeded init, same
    weight sources). An export (``init_from``) loads its autoencoder and text encoder the way
    :meth:`sama.pipeline_edit.SamaEditPipeline.from_pretrained` does, from its manifest, without
    reading its transformer; SigLIP comes from ``model_config``, as in training.
    """
    from sama.models.presets import SamaComponents, build_model, build_semantic_encoder

    if not section.init_from:
        components = build_model(
            model_config,
            with_transformer=False,
            with_vae=with_vae,
            with_semantic_encoder=with_semantic_encoder,
        )
    else:
        vae, text = _export_encoders(section.init_from, model_config, with_vae)
        semantic = build_semantic_encoder(model_config) if with_semantic_encoder else None
        components = SamaComponents(model_config, None, vae, text, semantic)
    for module in (components.vae, components.text_encoder, components.semantic_encoder):
        if module is not None:
            module.eval().requires_grad_(False)
    if device is not None:
        components.to(device)
    return components


def _export_encoders(export_uri: str, model_config, with_vae: bool):
    """The autoencoder (None unless ``with_vae``) and text encoder of the SAMA export at
    ``export_uri``, read as ``SamaEditPipeline.from_pretrained`` reads them
    (:class:`sama.pipeline_edit.SamaExport`)."""
    from sama.models.presets import torch_dtype_of
    from sama.pipeline_edit import SamaExport

    export = SamaExport.read(export_uri)
    dtype = torch_dtype_of(model_config)
    vae = export.load_vae(dtype, model_config) if with_vae else None
    return vae, export.load_text_encoder(dtype, model_config)


def check_latent_output(output_uri: str, info: schema.LatentOutputInfo, overwrite: bool) -> bool:
    """Whether ``output_uri`` already records exactly ``info`` (its null-prompt embeddings
    present). Raises :class:`LatentOutputMismatch` when it records other encoders, dtype or null
    prompts, or is another job's output, unless ``overwrite`` (which recomputes it all)."""
    where = storage.redact(output_uri)
    existing = schema.read_latent_info(output_uri)
    if existing is None:
        markers = storage.list_files(storage.join(output_uri, ledger.MARKERS_DIR), suffixes=(".json",))
        if markers and not overwrite:
            raise LatentOutputMismatch(
                f"{where} holds a job output that is not a latent output (no {schema.LATENT_INFO_FILE}); "
                "write the latents elsewhere, or pass --overwrite to replace it"
            )
        return False
    differing = [
        name
        for name in ("encoders", "dtype", "null_prompts")
        if getattr(existing, name) != getattr(info, name)
    ]
    if differing and not overwrite:
        detail = "; ".join(
            f"{name}: output {getattr(existing, name)!r} vs this run {getattr(info, name)!r}"
            for name in differing
        )
        raise LatentOutputMismatch(
            f"{where} holds latents made by other encoders or stored differently ({detail}); "
            "use the same model and dtype, another --output, or --overwrite to recompute it"
        )
    return not differing and storage.exists(storage.join(output_uri, schema.NULL_PROMPTS_FILE))


def write_output_info(cfg: PrecomputeConfig, model_config, overwrite: bool) -> schema.LatentOutputInfo:
    """Check the output (:func:`check_latent_output`) and write ``latents.json`` and
    ``null_prompts.safetensors`` unless it records them already (only then is a text encoder
    built here, for the null prompts)."""
    from sama.precompute import null_prompt_embeddings, storage_dtype

    info = latent_info(cfg, model_config)
    if check_latent_output(cfg.output.uri, info, overwrite):
        return info
    components = load_encoders(cfg.model, model_config, with_vae=False, with_semantic_encoder=False)
    nulls = null_prompt_embeddings(components, storage_dtype(info.dtype))
    schema.write_latent_info(cfg.output.uri, info, nulls)
    return info


# --- one unit -----------------------------------------------------------------------------------


@dataclass
class Decoded:
    """A sample read and decoded, waiting for its batch."""

    meta: schema.SampleMeta
    target: Any
    source: Any

    @property
    def shape_key(self) -> tuple:
        return (self.meta.media, self.target.shape, None if self.source is None else self.source.shape)


def decode_members(members: dict[str, Any], input_id: str) -> Decoded:
    """One pixel sample's members -> its metadata and decoded frames; raises for a reject:
    ``schema`` (members that do not follow the schema), ``latent_input`` (already precomputed) or
    the media's decode error kind."""
    try:
        sample = schema.read_sample(members, where=input_id)
    except schema.SchemaError as exc:
        raise RejectInput("schema", f"{input_id}: {exc}") from None
    if isinstance(sample, schema.LatentSample):
        raise RejectInput("latent_input", f"{input_id}: already a precomputed (latent) sample")
    decode_pair = getattr(sample, "decode_pair", None)
    try:
        if decode_pair is not None:
            target, source = decode_pair()
        else:
            target, source = sample.decode_target(), sample.decode_source()
    except schema.SchemaError as exc:
        raise RejectInput("schema", f"{input_id}: {exc}") from None
    meta = sample.meta
    if tuple(target.shape[:3]) != (meta.num_frames, meta.height, meta.width):
        raise RejectInput(
            "schema",
            f"{input_id}: target decodes to {tuple(target.shape[:3])} frames x height x width, "
            f"metadata says {(meta.num_frames, meta.height, meta.width)}",
        )
    return Decoded(meta, target, source)


def encode_decoded(components, batch: list[Decoded], dtype) -> list[list[schema.LatentSample] | Exception]:
    """Encode equal-shaped decoded samples together; per sample its latent sample or, when the
    batch fails on an input's account, the exception rejecting it (each retried alone first)."""
    import numpy as np
    import torch

    from sama.precompute import encode_samples

    def encode(group: list[Decoded]) -> list[list[schema.LatentSample]]:
        targets = np.stack([d.target for d in group])
        sources = None if group[0].source is None else np.stack([d.source for d in group])
        try:
            latents = encode_samples(components, targets, sources, [d.meta.instruction for d in group], dtype)
        except torch.OutOfMemoryError as exc:  # the device's, not the input's: the unit is retried
            raise MemoryError(f"out of device memory encoding a batch of {len(group)}: {exc}") from exc
        return [[schema.LatentSample(d.meta, lat)] for d, lat in zip(group, latents, strict=True)]

    try:
        return list(encode(batch))
    except MemoryError:
        raise
    except Exception as exc:
        if len(batch) == 1:
            return [exc]
    outcomes: list[list[schema.LatentSample] | Exception] = []
    for item in batch:  # find which input the batch failed on
        try:
            outcomes.extend(encode([item]))
        except MemoryError:
            raise
        except Exception as exc:
            outcomes.append(exc)
    return outcomes


def _shard_inputs(shard: str):
    """``(input_id, members)`` for every sample of ``shard`` (input id ``<shard>#<key>``)."""
    seen: set[str] = set()
    try:
        for members in schema.iter_members(shard):
            input_id = f"{shard}#{members['__key__']}"
            if input_id in seen:  # a key twice in one tar: the later copy is an input of its own
                n = 1
                while f"{input_id}@{n}" in seen:
                    n += 1
                input_id = f"{input_id}@{n}"
                members = {**members, "__duplicate__": True}
            seen.add(input_id)
            yield input_id, (input_id, members)
    except schema.SchemaError as exc:  # the tar is unreadable past here
        raise RejectSource(shard, "bad_tar", str(exc)) from exc
    except storage.StorageError as exc:  # gone or unreadable in itself (not a service failure)
        raise RejectSource(shard, "missing", str(exc)) from exc


def process_unit(unit: ShardUnit, cfg: PrecomputeConfig, components) -> ledger.UnitResult:
    """Encode every sample of a unit's shard with ``components`` (loaded by
    :func:`load_encoders`), write the latent shards, then the completion marker
    (:func:`sama.prep.unit.run_unit`: rejects recorded, environment failures raise UnitFailed)."""
    import torch

    from sama.precompute import storage_dtype

    dtype = storage_dtype(storage_dtype_name(cfg, components.config))
    torch.manual_seed(cfg.seed)

    def prepare(item: tuple[str, dict], dropped: list[ledger.Reject]) -> Decoded:
        input_id, members = item
        if members.get("__duplicate__"):
            raise RejectInput("duplicate", f"{input_id}: key {members['__key__']} appears twice in the shard")
        return decode_members(members, input_id)

    batching = Batching(
        key=lambda decoded: decoded.shape_key,
        size=cfg.batch_size,
        finish=lambda batch: encode_decoded(components, batch, dtype),
    )
    return run_unit(
        unit.unit_id,
        unit.input_ids,
        cfg.output.uri,
        cfg.shards,
        _shard_inputs(unit.shard),
        prepare,
        batching,
    )
