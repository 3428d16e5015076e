"""The SAMA trainer: configuration, and the per-worker loop in small named steps.

Stage 0 (factorized pre-training) and stage 1 (SFT) run the same loop with different recipes:
stage 0 mixes image edits and motion-alignment pretext clips and starts from Wan weights (or a
random tiny model); stage 1 mixes paired video edits with some image edits and starts from a
stage-0 export (``model.init_from``).

A worker's life (:class:`Trainer`): ``build`` the model, data stream, optimizer, scheduler and EMA;
``restore`` from the latest checkpoint when there is one; then ``train``: ``train_step`` until
``max_steps``, each made of ``forward_backward_step`` per micro-batch and one optimizer step and
followed by ``step_end`` (metric logging, ``validate``, sample renders, evaluation and
``save_checkpoint`` on their schedules); finally ``export`` the EMA model and ``publish`` it.
Nothing here imports Ray: :func:`sama.train.launch.train_loop` runs ``train`` on a Ray Train
worker and hands it the hook that reports checkpoints to Ray Train.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import json
import logging
import math
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

import numpy as np
import torch

from sama import config as config_lib
from sama.eval.metrics import MetricsConfig
from sama.models.lora import LoraSection
from sama.models.training import TrainingModuleConfig
from sama.pipeline_edit import PipelineConfig
from sama.tracking import TrackingConfig
from sama.train.data import DataConfig, DataPosition, MixedBatchIterator
from sama.train.flops import batch_flops, get_peak_flops
from sama.train.parallelize import ParallelConfig, distributed
from sama.train.plan import PlanSection

FROZEN_ENCODERS = ("vae", "text_encoder", "semantic_encoder")
# A run's outputs under {run.storage_uri}/{run.name} (run_uri): its EMA export, and the summary
# rank 0 writes once it is published (the export, the MLflow run and registered model).
EXPORT_DIR = "export"
RUN_INFO_FILE = "run_info.json"

log = logging.getLogger(__name__)


@dataclass
class ModelSection:
    """Which model to train and where its starting weights come from."""

    # A preset of sama.models.presets (tiny, wan2.1-1.3b, wan2.1-14b, wan2.2-5b).
    preset: str = "tiny"
    # Wan diffusers weights (local dir or hub id) for stage 0; None = random init.
    pretrained: str | None = None
    # A SAMA export (``save_pretrained`` directory) to start from: stage 1 starts from stage 0's.
    init_from: str | None = None
    # Dotted overrides of the preset's ModelConfig, e.g. {"transformer.num_layers": 2}.
    overrides: dict[str, Any] = field(default_factory=dict)
    # The parity profile (sama.models.parity): "sama" (this project's choices) or "authors" (the
    # authors' release). None: the model's own (the preset's "sama", or the init_from export's,
    # "authors" for a converted official checkpoint). It also decides the unset knobs of the
    # objective and inference sections; resolve_train_config writes the concrete values.
    parity: Literal["sama", "authors"] | None = None
    # LoRA adapters (rank 0: off, every transformer weight trains); see sama.models.lora.
    lora: LoraSection = field(default_factory=LoraSection)
    # A LoRA run's export: "merged" (a full model) or "adapter" (the adapters and SAMA's modules
    # over the model.init_from export, for `sama edit --lora`).
    lora_export: Literal["merged", "adapter"] = "merged"


@dataclass
class OptimConfig:
    """AdamW with linear warmup, then a constant rate (SAMA code defaults) or a decay to the end."""

    lr: float = 2e-5
    betas: tuple[float, float] = (0.9, 0.999)
    eps: float = 1e-8
    weight_decay: float = 0.01
    warmup_frac: float = 0.1
    grad_clip: float = 1.0
    # After warmup: "constant" (SAMA's code), or a "linear" / "cosine" decay reaching
    # min_lr_frac * lr at max_steps (a short run ends far more precise with a decay).
    decay: Literal["constant", "linear", "cosine"] = "constant"
    min_lr_frac: float = 0.0

    def validate(self) -> None:
        if self.lr <= 0:
            raise ValueError("optim.lr must be positive")
        if not 0 <= self.warmup_frac < 1:
            raise ValueError("optim.warmup_frac must be in [0, 1)")
        if self.decay not in ("constant", "linear", "cosine"):
            raise ValueError(f"optim.decay must be constant, linear or cosine, got {self.decay!r}")
        if not 0 <= self.min_lr_frac <= 1:
            raise ValueError("optim.min_lr_frac must be in [0, 1]")
        if self.grad_clip < 0:
            raise ValueError("optim.grad_clip must be >= 0 (0 disables clipping)")


@dataclass
class ScalingSection:
    """Ray Train workers."""

    num_workers: int = 1
    use_gpu: bool = False
    # CPUs each worker reserves; leave some for the Ray Data tasks that decode the shards.
    cpus_per_worker: float = 1.0
    # Torch intra-op threads per worker on CPU (None: what the worker's CPU budget allows).
    torch_threads: int | None = None
    # Host memory each worker reserves, in GiB (0: no reservation); Ray places workers by it.
    memory_per_worker_gb: float = 0.0
    # Only nodes with this accelerator (Ray's accelerator_type, e.g. "H100"); None: any.
    accelerator_type: str | None = None
    # How long to wait for a cluster that can provide the workers but has not yet (autoscaling,
    # other jobs) before failing; a cluster that never can fails at once (preflight).
    resource_timeout_s: float = 900.0

    def worker_resources(self) -> dict[str, float]:
        """The Ray resources one training worker reserves."""
        resources: dict[str, float] = {"CPU": self.cpus_per_worker}
        if self.use_gpu:
            resources["GPU"] = 1
        if self.memory_per_worker_gb > 0:
            resources["memory"] = self.memory_per_worker_gb * 2**30
        if self.accelerator_type:
            # How Ray expresses an accelerator constraint: a sliver of the node's type resource.
            resources[f"accelerator_type:{self.accelerator_type}"] = 0.001
        return resources

    def validate(self) -> None:
        if self.num_workers < 1:
            raise ValueError("scaling.num_workers must be >= 1")
        if self.cpus_per_worker < 0 or self.memory_per_worker_gb < 0:
            raise ValueError("scaling.cpus_per_worker and scaling.memory_per_worker_gb must be >= 0")
        if self.resource_timeout_s < 0:
            raise ValueError("scaling.resource_timeout_s must be >= 0")


@dataclass
class CheckpointSection:
    every_steps: int = 500
    keep_last: int = 3


@dataclass
class ValidationSection:
    """Validation loss on held-out shards, and sample edits rendered to mp4 artifacts."""

    every_steps: int = 500
    # Validation loss = mean over samples x this many (timestep, noise) draws, seeded identically
    # at every validation so the values are comparable across steps.
    draws: int = 4
    render_samples: int = 1
    # Sample edits use the run's inference settings (TrainConfig.inference); these override its
    # steps and guidance for the renders only (None: the inference settings').
    render_steps: int | None = None
    render_cfg: float | None = None
    # Evaluation during training: every this many steps (0: never) the first ``eval_samples``
    # editable held-out samples are edited with the current weights (the render settings) and
    # measured by the judge-free metrics (``eval/*`` in MLflow), so quality is a curve, not only a loss.
    eval_every: int = 0
    eval_samples: int = 4
    # Model-based metrics (CLIP, DINOv2, LPIPS) when their weights are configured; the weight-free
    # ones always run.
    metrics: MetricsConfig = field(default_factory=MetricsConfig)

    def validate(self) -> None:
        if self.eval_every < 0 or self.eval_samples < 0:
            raise ValueError("validation.eval_every and validation.eval_samples must be >= 0")
        self.metrics.validate()


@dataclass
class RunSection:
    """Where the run lives: checkpoints, the export and (by default) the MLflow store."""

    name: str = "sama-run"
    # A local directory or an s3:// prefix.
    storage_uri: str = "runs"
    # Worker failures survived per run (Ray Train FailureConfig).
    max_failures: int = 0


@dataclass
class TrainConfig:
    """``sama train``: one training stage."""

    stage: int = 0
    max_steps: int = 1000
    grad_accum: int = 1
    seed: int = 0
    log_every: int = 10
    ema_decay: float = 0.9998
    model: ModelSection = field(default_factory=ModelSection)
    objective: TrainingModuleConfig = field(default_factory=TrainingModuleConfig)
    data: DataConfig = field(default_factory=DataConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    scaling: ScalingSection = field(default_factory=ScalingSection)
    checkpoint: CheckpointSection = field(default_factory=CheckpointSection)
    validation: ValidationSection = field(default_factory=ValidationSection)
    tracking: TrackingConfig = field(default_factory=TrackingConfig)
    run: RunSection = field(default_factory=RunSection)
    # How the exported model edits by default (sama edit, the MLflow model, sample edits): written
    # into the export, where `sama edit --steps/--cfg` override it. Defaults: SAMA's (50 steps,
    # CFG 5, shift 5). It also records what the data was prepared at (inference.buckets, .fps,
    # .max_frames: the prep jobs' buckets, clips.fps / align.max_fps and clip length), which
    # `sama edit` resizes and resamples real videos to; the shards do not carry the bucket set, so
    # a recipe over non-480p/16 fps data must say so here (the quickstart's does).
    inference: PipelineConfig = field(default_factory=PipelineConfig)
    # What `sama plan` and the memory check of `sama train` assume (sama.train.plan).
    plan: PlanSection = field(default_factory=PlanSection)

    def validate(self) -> None:
        if self.stage not in (0, 1):
            raise ValueError("stage must be 0 (pre-training) or 1 (SFT)")
        if self.max_steps < 1 or self.grad_accum < 1 or self.log_every < 1:
            raise ValueError("max_steps, grad_accum and log_every must be >= 1")
        if not 0 <= self.ema_decay < 1:
            raise ValueError("ema_decay must be in [0, 1)")
        if self.checkpoint.every_steps < 1 or self.validation.every_steps < 1:
            raise ValueError("checkpoint.every_steps and validation.every_steps must be >= 1")
        if self.checkpoint.keep_last < 1:
            raise ValueError("checkpoint.keep_last must be >= 1")
        if self.stage == 1 and not self.model.init_from:
            raise ValueError("stage 1 (SFT) starts from a stage-0 export: set model.init_from")
        self.scaling.validate()
        self.parallel.validate()
        self.validation.validate()
        cp = self.parallel.context_parallel_size
        if self.scaling.num_workers % cp:
            raise ValueError(
                f"scaling.num_workers ({self.scaling.num_workers}) must be a multiple of "
                f"parallel.context_parallel_size ({cp}): workers form context-parallel groups of {cp}"
            )
        self.data.validate()
        self.optim.validate()
        self.objective.validate()
        self.inference.validate()
        self.plan.validate()
        self.model.lora.validate()
        if self.model.lora_export not in ("merged", "adapter"):
            raise ValueError(f"model.lora_export must be merged or adapter, got {self.model.lora_export!r}")
        if self.model.lora.enabled and self.model.lora_export == "adapter" and not self.model.init_from:
            raise ValueError("model.lora_export='adapter' needs model.init_from: the export it applies to")


def run_uri(cfg: TrainConfig) -> str:
    """Where the run lives: its checkpoints, export and run_info.json."""
    from sama import storage

    return storage.join(cfg.run.storage_uri, cfg.run.name)


def export_model_config(uri: str):
    """The model configuration the SAMA export at ``uri`` records, from its manifest alone.

    Raises:
        ModelDirectoryError: ``uri`` is not a SAMA export (:meth:`sama.pipeline_edit.SamaExport.read`),
            named as ``model.init_from``.
        ValueError: the export records no model configuration.
    """
    from sama.pipeline_edit import ModelDirectoryError, SamaExport

    try:
        model_config = SamaExport.read(uri).model_config
    except ModelDirectoryError as exc:
        raise ModelDirectoryError(f"model.init_from {exc.path}", exc.reason) from None
    if model_config is None:
        raise ValueError(f"model.init_from {uri}: the export records no model configuration")
    return model_config


def resolve_model_config(section: ModelSection):
    """The ModelConfig to build: the export's own (init_from), else the preset with overrides;
    ``section.parity`` (when set) names its profile, whose values fill the unset parity knobs."""
    from sama.models.presets import get_preset

    if section.init_from:
        model_config = export_model_config(section.init_from)
    else:
        model_config = get_preset(section.preset)
        if section.pretrained:
            model_config = dataclasses.replace(model_config, pretrained=section.pretrained)
    for key, value in config_lib.flatten(section.overrides).items():
        model_config = config_lib.apply_override(model_config, f"{key}={_override_text(value)}")
    if section.parity is not None:
        model_config = dataclasses.replace(model_config, parity=section.parity)
    model_config = model_config.resolved()
    model_config.validate()
    return model_config


def resolve_train_config(cfg: TrainConfig, model_config=None, *, strict: bool = True) -> TrainConfig:
    """``cfg`` with its parity knobs concrete (:mod:`sama.models.parity`): ``model.parity`` set to
    the model's profile, and the unset knobs of ``objective`` and ``inference`` filled from it
    (explicit values win). Resolving twice is resolving once.

    ``model_config``: the resolved model config when the caller has it; otherwise the profile is
    ``model.parity``, else a ``parity`` override, else the ``init_from`` export's (read from its
    manifest), else the preset's. When that export cannot be read, ``strict=False`` returns ``cfg``
    unchanged (``--print-config`` without access to it; the trainer resolves it once it has the
    export) and ``strict=True`` raises.
    """
    from sama.models.parity import resolve

    overridden = config_lib.flatten(cfg.model.overrides).get("parity")
    if model_config is not None:
        parity = model_config.parity
    elif cfg.model.parity is not None:
        parity = cfg.model.parity
    elif overridden is not None:
        parity = str(overridden)
    elif cfg.model.init_from:
        try:
            parity = export_model_config(cfg.model.init_from).parity
        except Exception as exc:  # storage or format errors: the export is needed to know
            if strict:
                raise
            log.warning("model.parity follows model.init_from, which cannot be read now: %s", exc)
            return cfg
    else:
        from sama.models.presets import get_preset

        parity = get_preset(cfg.model.preset).parity
    return dataclasses.replace(
        cfg,
        model=dataclasses.replace(cfg.model, parity=parity),
        objective=resolve(cfg.objective, parity, "objective"),
        inference=resolve(cfg.inference, parity, "inference"),
    )


def _override_text(value: Any) -> str:
    return value if isinstance(value, str) else json.dumps(value)


def frozen_encoder_identity(section: ModelSection, model_config) -> dict[str, Any]:
    """What the frozen encoders of a model built from ``section`` are
    (:func:`sama.models.presets.encoder_identity`): with ``init_from``, the autoencoder and text
    encoder are the export's, so their identity is the one the export records (an export written
    before exports recorded it is named by its location); otherwise, and for SigLIP, the model
    config's. ``sama precompute`` records it in its output and training compares the two."""
    from sama import storage
    from sama.models.presets import encoder_identity
    from sama.pipeline_edit import SamaExport

    identity = encoder_identity(model_config)
    if section.init_from:
        recorded = SamaExport.read(section.init_from).encoders or {}
        for name in ("vae", "text_encoder"):
            identity[name] = recorded.get(name) or {
                **identity[name],
                "weights": f"export:{storage.redact(section.init_from)}",
            }
    return identity


def without_weight_sources(model_config):
    """The config with the transformer/VAE/text weight sources removed (SigLIP's kept)."""
    return dataclasses.replace(
        model_config,
        pretrained=None,
        transformer=dataclasses.replace(model_config.transformer, pretrained=None),
        vae=dataclasses.replace(model_config.vae, pretrained=None),
        text=dataclasses.replace(model_config.text, pretrained=None),
    )


def components_from_export(export_uri: str, model_config, *, with_encoders: bool = True):
    """The model components of a run that starts from the SAMA export at ``export_uri``, read
    through :class:`sama.pipeline_edit.SamaExport`.

    The transformer is built from ``model_config`` (the export's own configuration with the run's
    overrides, so e.g. a changed ``semantic.rope`` applies) on the meta device and receives the
    export's tensors (``assign=True``): a 14B start holds one copy of the weights, never a random
    model beside the loaded one. The autoencoder and text encoder are the export's (copied into it
    or referenced by it, whatever the preset's tokenizer); SigLIP comes from ``model_config``.
    ``with_encoders=False`` keeps none of the frozen encoders (every training source is
    precomputed): the export's autoencoder and text encoder are not read, SigLIP not built.

    Raises:
        ValueError: the export's transformer does not fit ``model_config`` (names the keys).
        ModelDirectoryError: the export is missing, unreadable, or its components do not fit
            together.
    """
    from accelerate import init_empty_weights

    from sama.models.presets import (
        SamaComponents,
        build_semantic_encoder,
        build_transformer,
        torch_dtype_of,
        transformer_mismatch,
    )
    from sama.pipeline_edit import SamaExport, check_compatible

    dtype = torch_dtype_of(model_config)
    export = SamaExport.read(export_uri)
    exported = export.load_transformer(dtype)
    mismatch = transformer_mismatch(model_config, exported.config)
    if mismatch:
        raise ValueError(f"model.init_from {export_uri}: {mismatch}")
    vae = text_encoder = None
    if with_encoders:
        vae, text_encoder = export.load_vae(dtype), export.load_text_encoder(dtype)
        check_compatible(exported, vae, text_encoder, export.where)
    # Parameters on the meta device; buffers (the rotary tables, not in a state dict) are real.
    with init_empty_weights():
        transformer = build_transformer(model_config, load_weights=False)
    result = transformer.load_state_dict(exported.state_dict(), strict=False, assign=True)
    if result.missing_keys or result.unexpected_keys:
        raise ValueError(
            f"model.init_from {export_uri} does not fit the model: missing {result.missing_keys[:3]}, "
            f"unexpected {result.unexpected_keys[:3]}"
        )
    del exported
    log.info("initialised from %s", export_uri)
    semantic = build_semantic_encoder(model_config) if with_encoders else None
    # No .to(dtype): the export's tensors arrive in their loaded dtypes, the modules Wan keeps in
    # float32 (norms, time embedder, rope) included, as from_pretrained(torch_dtype=...) leaves them.
    return SamaComponents(model_config, transformer, vae, text_encoder, semantic)


def frozen_encoders_needed(cfg: TrainConfig, model_config) -> tuple[str, ...]:
    """The frozen encoders whose outputs training consumes: the autoencoder, the text encoder, and
    SigLIP when the objective runs the semantic branch."""
    names = ("vae", "text_encoder")
    if cfg.objective.semantic and model_config.semantic.enabled:
        names += ("semantic_encoder",)
    return names


def check_latent_encoders(
    name: str, uri: str, info, identity: dict[str, Any], needed: tuple[str, ...]
) -> None:
    """Refuse latents made by other encoders than the run's (``info``: the source's
    :class:`sama.schema.LatentOutputInfo`; ``identity``: :func:`frozen_encoder_identity`).

    Raises:
        ValueError: naming the source, its (redacted) URI and the differing fields.
    """
    from sama import storage
    from sama.models.presets import encoder_mismatch

    mismatch = encoder_mismatch(info.encoders or {}, identity, needed)
    if mismatch:
        raise ValueError(
            f"data source {name!r} ({storage.redact(uri)}) holds latents made by other encoders than "
            f"this run's model: {mismatch}; rerun `sama precompute` with the run's model"
        )


def lr_lambda(warmup_steps: int, max_steps: int = 0, decay: str = "constant", min_lr_frac: float = 0.0):
    """The learning-rate factor of each step: linear warmup over ``warmup_steps``, then constant or
    a linear / cosine decay from 1 at the end of warmup to ``min_lr_frac`` at ``max_steps``."""

    def factor(step: int) -> float:
        if warmup_steps > 0 and step < warmup_steps:
            return (step + 1) / warmup_steps
        if decay == "constant" or max_steps <= warmup_steps:
            return 1.0
        progress = min(1.0, (step - warmup_steps) / (max_steps - warmup_steps))
        shape = 1.0 - progress if decay == "linear" else 0.5 * (1.0 + math.cos(math.pi * progress))
        return min_lr_frac + (1.0 - min_lr_frac) * shape

    return factor


def build_optimizer(params: list[torch.nn.Parameter], cfg: TrainConfig):
    """AdamW over ``params`` and its LR schedule (linear warmup over ``optim.warmup_frac`` of the run)."""
    optimizer = torch.optim.AdamW(
        params,
        lr=cfg.optim.lr,
        betas=tuple(cfg.optim.betas),
        eps=cfg.optim.eps,
        weight_decay=cfg.optim.weight_decay,
    )
    warmup = int(cfg.optim.warmup_frac * cfg.max_steps)
    schedule = lr_lambda(warmup, cfg.max_steps, cfg.optim.decay, cfg.optim.min_lr_frac)
    return optimizer, torch.optim.lr_scheduler.LambdaLR(optimizer, schedule)


def step_generator(seed: int, *parts: int) -> torch.Generator:
    """The CPU generator of one micro-batch (``logical rank, step, micro``): its noise, timesteps and
    caption dropout depend on the run's seed and where it is, not on what ran before."""
    generator = torch.Generator(device="cpu")
    generator.manual_seed(int(np.random.SeedSequence([seed, *parts]).generate_state(1)[0]))
    return generator


class Trainer:
    """One worker's training loop. ``rank``/``world_size`` come from Ray Train (1/0 standalone)."""

    def __init__(self, cfg: TrainConfig, rank: int = 0, world_size: int = 1, local_rank: int = 0):
        self.cfg = cfg
        self.rank = rank
        self.world_size = world_size
        # Context parallelism: groups of cp consecutive ranks share each micro-batch, so the data
        # stream, the noise and the sample counts follow the data-parallel rank and size.
        self.cp = int(cfg.parallel.context_parallel_size)
        if world_size % self.cp:
            raise ValueError(f"{world_size} workers cannot form context-parallel groups of {self.cp}")
        self.dp_rank = rank // self.cp
        self.dp_size = world_size // self.cp
        # Logical data-parallel ranks: the data partition, data positions and noise keys are
        # defined over them, fixed for the life of a run (set_logical_ranks); this rank plays
        # ``logical`` (one per data-parallel rank unless resumed on fewer).
        self.logical_ranks = self.dp_size
        self.logical = [self.dp_rank]
        self.streams: list[MixedBatchIterator] = []
        self.mesh = None
        if cfg.scaling.use_gpu and torch.cuda.is_available():
            self.device = torch.device("cuda", local_rank)
            torch.cuda.set_device(self.device)
        else:
            self.device = torch.device("cpu")
        self.step = 0
        self.samples_seen = 0
        self.mlflow_run_id: str | None = None
        # Frozen encoders loaded after build, when first needed (every training source precomputed):
        # encoder -> what it was loaded for ("validation", "render" or "export").
        self.frozen_loaded: dict[str, str] = {}
        self._lazy_frozen: dict[str, torch.nn.Module] = {}
        self._val_encoded: list | None = None

    # ------------------------------------------------------------------------------------------
    # Build

    def build(self, rows: dict[str, list[Any]] | None = None) -> None:
        """Model (with frozen encoders), optimizer, scheduler, EMA and the data stream.

        ``rows`` (source name -> :class:`sama.train.data.TrainingRow` records) trains on samples
        held in memory instead of the sources' shards (benchmarks and tests; see
        :class:`sama.train.data.RowStream`); a source is precomputed when its uri belongs to a latent
        output all the same (its ``latents.json`` gives the encoders and null prompts).

        A source of latent shards (``sama precompute``) must have been made by this run's frozen
        encoders (refused otherwise). When every training source is precomputed, no frozen encoder
        is built: validation, sample renders and the export load the ones they need on rank 0,
        when first needed (:attr:`frozen_loaded`).
        """
        from sama.models.presets import build_model
        from sama.models.training import SamaTrainingModule
        from sama.train.data import load_validation
        from sama.train.ema import EMA
        from sama.train.parallelize import parallelize

        cfg = self.cfg
        if self.device.type == "cpu":
            threads = cfg.scaling.torch_threads or max(1, int(cfg.scaling.cpus_per_worker))
            torch.set_num_threads(threads)
        # Same seed on every rank: identical initial weights (and identical frozen encoders).
        torch.manual_seed(cfg.seed)
        self.model_config = resolve_model_config(cfg.model)
        # The objective and inference knobs follow the model's parity (concrete from here on).
        self.cfg = cfg = resolve_train_config(cfg, self.model_config)
        self.encoder_identity = frozen_encoder_identity(cfg.model, self.model_config)
        null_embeddings = self._check_latent_sources(rows)
        self.precomputed = len(self.latent_sources) == len(cfg.data.sources)
        with_encoders = not self.precomputed
        if self.precomputed and self.rank == 0:
            log.info(
                "every training source is precomputed: the frozen encoders (%s) are not built; "
                "validation, renders and the export load what they need on rank 0 when first needed",
                ", ".join(FROZEN_ENCODERS),
            )
        if cfg.model.init_from:
            # Every weight but SigLIP's comes from the export: do not read stage 0's sources again.
            self.model_config = without_weight_sources(self.model_config)
            self.components = components_from_export(
                cfg.model.init_from, self.model_config, with_encoders=with_encoders
            )
        else:
            self.components = build_model(
                self.model_config,
                with_vae=with_encoders,
                with_text_encoder=with_encoders,
                with_semantic_encoder=with_encoders,
            )
        if cfg.model.lora.enabled:  # before sharding: only the adapters and SAMA's modules train
            from sama.models.lora import apply_lora

            apply_lora(self.components.transformer, cfg.model.lora)
        self.components.to(self.device)
        self.frozen_loaded = {
            name: "training" for name in FROZEN_ENCODERS if getattr(self.components, name) is not None
        }
        self._lazy_frozen = {}
        self.module = SamaTrainingModule(self.components, cfg.objective)
        if null_embeddings:
            self.module.set_null_embeddings(null_embeddings)
        self.module.train()
        if self.cp > 1:
            from sama.train.context_parallel import build_device_mesh

            self.mesh = build_device_mesh(self.device.type, self.world_size, self.cp)
        self.model = parallelize(self.module, cfg.parallel, self.device, self.world_size, self.mesh)
        # After sharding: under FSDP2 the shadow is a DTensor of each rank's own shards.
        self.ema = EMA(self.module.transformer, cfg.ema_decay)
        self.params = [p for p in self.module.transformer.parameters() if p.requires_grad]
        self.optimizer, self.scheduler = build_optimizer(self.params, cfg)
        self.rows = rows
        self.set_logical_ranks(self.dp_size)
        settings = cfg.validation
        evaluated = settings.eval_samples if settings.eval_every else 0
        self.val_rows, edit_rows = load_validation(cfg.data, max(settings.render_samples, evaluated))
        # Sample renders and evaluation edit the same held-out samples (the first ones).
        self.render_rows, self.eval_rows = edit_rows[: settings.render_samples], edit_rows[:evaluated]
        self._metric_suite = None
        self._val_encoded = None
        self.peak = get_peak_flops(self.device)

    def _check_latent_sources(self, rows: dict[str, list[Any]] | None) -> dict[str, torch.Tensor]:
        """Find the precomputed sources (``latent_sources``: name -> their latents.json), refuse
        those made by other encoders than the run's, and return the stored null-prompt embeddings
        (the same for every precomputed source, which is checked)."""
        from sama import schema, storage

        cfg = self.cfg
        needed = frozen_encoders_needed(cfg, self.model_config)
        text_length = int(self.model_config.text.max_length)
        self.latent_sources: dict[str, Any] = {}
        null_embeddings: dict[str, torch.Tensor] = {}
        null_from = ""
        named = [(s.name, s.uri) for s in cfg.data.sources]
        if cfg.data.val_uri:
            named.append(("validation (data.val_uri)", cfg.data.val_uri))
        for name, uri in named:
            info = schema.read_latent_info(uri)
            if rows is not None and name in rows:
                latent_rows = {data_row_is_latent(row) for row in rows[name]}
                if latent_rows and latent_rows != {info is not None}:
                    kind = "latent" if True in latent_rows else "pixel"
                    output = "a latent output" if info is not None else "no latent output (no latents.json)"
                    raise ValueError(
                        f"data source {name!r}: its rows are {kind} samples but its uri "
                        f"({storage.redact(uri)}) is {output}"
                    )
            if info is None:
                continue
            check_latent_encoders(name, uri, info, self.encoder_identity, needed)
            if name in {s.name for s in cfg.data.sources}:
                self.latent_sources[name] = info
            stored = schema.read_null_embeddings(uri)
            for prompt, embedding in stored.items():
                if embedding.shape[0] != text_length:
                    raise ValueError(
                        f"data source {name!r} ({storage.redact(uri)}): its null-prompt embeddings have "
                        f"{embedding.shape[0]} tokens but the text encoder's max_length is {text_length}"
                    )
                if prompt in null_embeddings and not torch.equal(null_embeddings[prompt], embedding):
                    raise ValueError(
                        f"data source {name!r} ({storage.redact(uri)}) stores another embedding of the "
                        f"null prompt {prompt!r} than {null_from}: the precomputed sources disagree"
                    )
                null_embeddings.setdefault(prompt, embedding)
            null_from = null_from or f"data source {name!r}"
        return null_embeddings

    # ------------------------------------------------------------------------------------------
    # State

    def restore(self, checkpoint_dir: str | None) -> None:
        """Load a checkpoint written by any number of workers into this rank's shards (a
        collective: every rank calls it). The optimizer's hyperparameters and the learning-rate
        schedule are the configuration's (``--allow-config-change`` may have changed them); only
        the schedule's position comes from the checkpoint."""
        if checkpoint_dir is None:
            return
        from sama.train import checkpoint as ckpt

        loaded = ckpt.load_trainable(checkpoint_dir, self.module.transformer, self.optimizer, self.ema)
        state = loaded.state
        self.step = state.step
        self.samples_seen = state.samples_seen
        self.mlflow_run_id = state.mlflow_run_id
        self._set_schedule_position(int(state.scheduler.get("last_epoch", state.step)))
        self.scheduler._step_count = int(state.scheduler.get("_step_count", self.step + 1))
        ckpt.set_rng_state(loaded.rng)
        self.set_logical_ranks(*self._restored_positions(state))
        log.info(
            "rank %d resumed from %s at step %d (written by %d worker(s)), playing logical data-parallel "
            "rank(s) %s of %d",
            self.rank,
            checkpoint_dir,
            self.step,
            state.world_size,
            self.logical,
            self.logical_ranks,
        )

    def _restored_positions(self, state) -> tuple[int, list[DataPosition]]:
        """The run's logical data-parallel ranks and their data positions, from a checkpoint: one
        per logical rank, each replayed exactly, when this run's data-parallel ranks divide them;
        otherwise (another split, with a warning, or a checkpoint written before exact replay:
        rank 0's position alone) one logical rank per data-parallel rank of this run, every source
        starting a new pass salted by the resume step (see :mod:`sama.train.data`)."""
        if state.data_positions and len(state.data_positions) % self.dp_size == 0:
            logical_ranks = len(state.data_positions)
            positions = [DataPosition.from_json(text) for text in state.data_positions]
        else:
            if state.data_positions and self.rank == 0:
                # The model, optimizer and EMA still restore exactly; only the data order changes.
                log.warning(
                    "the run has %d logical data-parallel rank(s), which %d data-parallel rank(s) "
                    "cannot share evenly: the data streams start fresh passes (salted by step %d) "
                    "instead of replaying; resume on a number of data-parallel ranks that divides %d "
                    "to replay them exactly",
                    len(state.data_positions),
                    self.dp_size,
                    state.step,
                    len(state.data_positions),
                )
            logical_ranks = self.dp_size
            saved = state.data_positions[0] if state.data_positions else state.data_position
            position = DataPosition.from_json(saved) if saved else DataPosition()
            position.restart_passes(state.step)
            positions = [position]
        for position in positions:
            position.step = state.step
        return logical_ranks, positions

    def set_logical_ranks(self, logical_ranks: int, positions: list[DataPosition] | None = None) -> None:
        """Play ``logical_ranks`` logical data-parallel ranks (fixed for the life of a run): this
        rank plays ``logical_ranks / dp_size`` consecutive ones, each with its own data stream
        (its part of every source) and noise, from ``positions`` (one per logical rank, or one
        shared by all; None: fresh streams). See "Resume semantics" in :mod:`sama.train.data`."""
        if logical_ranks % self.dp_size:
            raise ValueError(
                f"the run has {logical_ranks} logical data-parallel rank(s), which {self.dp_size} "
                f"data-parallel rank(s) (workers / parallel.context_parallel_size) cannot share "
                f"evenly: resume on a number of data-parallel ranks that divides {logical_ranks}"
            )
        per_rank = logical_ranks // self.dp_size
        self.logical_ranks = logical_ranks
        self.logical = list(range(self.dp_rank * per_rank, (self.dp_rank + 1) * per_rank))
        if positions is None:
            positions = [DataPosition(step=self.step)]
        for stream in self.streams:
            stream.close()
        self.streams = [
            MixedBatchIterator(
                self.cfg.data,
                positions[j] if len(positions) > 1 else copy.deepcopy(positions[0]),
                j,
                logical_ranks,
                self.rows,
                text_length=int(self.model_config.text.max_length),
            )
            for j in self.logical
        ]

    @property
    def batches(self):
        """The stream of this rank's first logical rank (its only one when logical = physical)."""
        return self.streams[0]

    @property
    def position(self) -> DataPosition:
        return self.streams[0].position

    def _data_positions(self) -> list[str]:
        """Every logical rank's data position, JSON, by logical rank (a collective under a process
        group; context-parallel peers share their streams, so their positions)."""
        import torch.distributed as dist

        mine = [(j, stream.position.to_json()) for j, stream in zip(self.logical, self.streams, strict=True)]
        if not distributed():
            return [text for _, text in mine]
        everyone: list[list[tuple[int, str]] | None] = [None] * dist.get_world_size()
        dist.all_gather_object(everyone, mine)
        by_rank = dict(item for items in everyone if items for item in items)
        return [by_rank[j] for j in range(self.logical_ranks)]

    def _set_schedule_position(self, last_epoch: int) -> None:
        """The scheduler at ``last_epoch`` of this configuration's schedule (its base rate is
        ``optim.lr``, never the checkpoint's)."""
        scheduler = self.scheduler
        groups = self.optimizer.param_groups
        scheduler.base_lrs = [group.setdefault("initial_lr", self.cfg.optim.lr) for group in groups]
        scheduler.last_epoch = last_epoch
        for group, base, schedule in zip(
            self.optimizer.param_groups, scheduler.base_lrs, scheduler.lr_lambdas, strict=True
        ):
            group["lr"] = base * schedule(last_epoch)
        scheduler._last_lr = [group["lr"] for group in self.optimizer.param_groups]

    def save_checkpoint(self, directory: str) -> None:
        """Every rank writes its own shards into its local ``directory`` (no gather; a collective
        under a process group); rank 0 adds state.json, the commit marker, last."""
        from sama import config as config_lib
        from sama.train import checkpoint as ckpt

        train_state = ckpt.TrainState(
            step=self.step,
            samples_seen=self.samples_seen,
            scheduler=self.scheduler.state_dict(),
            data_position=self.position.to_json(),
            data_positions=self._data_positions(),
            mlflow_run_id=self.mlflow_run_id,
        )
        ckpt.save_trainable(
            directory,
            self.module.transformer,
            self.optimizer,
            self.ema,
            train_state,
            config_text=config_lib.dumps(self.cfg),
        )

    # ------------------------------------------------------------------------------------------
    # Steps

    def _generator(self, *parts: int) -> torch.Generator:
        return step_generator(self.cfg.seed, *parts)

    def _tokens(self, encoded) -> int:
        transformer = self.module.transformer
        p_t, p_h, p_w = transformer.config.patch_size
        total = 0
        for latents in (encoded.target_latents, encoded.source_latents):
            if latents is not None:
                b, _, t, h, w = latents.shape
                total += b * (t // p_t) * (h // p_h) * (w // p_w)
        if encoded.semantic_tokens is not None:
            total += encoded.semantic_tokens.shape[0] * encoded.semantic_tokens.shape[1]
        return total

    def forward_backward_step(self, batch, micro: int, logical_rank: int | None = None) -> dict[str, float]:
        """One micro-batch (a :class:`sama.models.training.SamaBatch`) of logical rank
        ``logical_rank`` (default: this rank's first): encode with the frozen encoders (or take
        the precomputed tensors), loss through the (wrapped) model, backward."""
        from sama.train.parallelize import compute_dtype

        logical_rank = self.logical[0] if logical_rank is None else logical_rank
        # Keyed by the logical data-parallel rank: a context-parallel group draws the same noise
        # and timesteps, and so does a run resumed on fewer workers.
        generator = self._generator(logical_rank, self.step, micro)
        with torch.no_grad():
            encoded = self.module.encode_batch(batch, generator)
        dtype = compute_dtype(self.cfg.parallel, self.device)
        # Gradients are synchronized after the rank's last micro-batch of its last logical rank.
        sync = micro == self.cfg.grad_accum - 1 and logical_rank == self.logical[-1]
        context = (
            self.model.no_sync()
            if (hasattr(self.model, "no_sync") and not sync)
            else contextlib.nullcontext()
        )
        with context:
            with torch.autocast(self.device.type, dtype=dtype, enabled=dtype is not None):
                out = self.model(encoded, generator)
            # The mean over this rank's micro-batches; DDP / FSDP2 average it over the ranks.
            (out.loss / (self.cfg.grad_accum * len(self.logical))).backward()
        parts = out.to_dict()
        samples = len(batch)
        tokens = self._tokens(encoded)
        parts["samples"] = samples
        parts["tokens"] = tokens
        if self.peak:
            # A context-parallel rank does 1/cp of its group's work.
            parts["flops"] = batch_flops(self.module.transformer, encoded) / self.cp
        return parts

    def _global_sums(self, totals: dict[str, float]) -> dict[str, float]:
        """``totals`` summed over the data-parallel ranks (a collective under a process group;
        context-parallel peers hold the same values, counted once)."""
        import torch.distributed as dist

        if not distributed() or self.world_size == 1:
            return totals
        keys = sorted(totals)
        values = torch.tensor([totals[k] for k in keys], dtype=torch.float64, device=self.device)
        dist.all_reduce(values)
        return {k: float(v) / self.cp for k, v in zip(keys, values.tolist(), strict=True)}

    def train_step(self, batches: Sequence[Sequence[Any]] | None = None) -> dict[str, float]:
        """For each logical rank this rank plays, ``grad_accum`` micro-batches; then clipping, one
        optimizer step, one EMA update. The logged losses, samples and tokens are the global ones
        (over every logical rank), whatever the number of workers.

        ``batches``: the step's micro-batches (:class:`sama.models.training.SamaBatch`), a list of
        ``grad_accum`` per logical rank this rank plays, to train on instead of drawing them from
        the data streams (which then stay where they are): a known step replayed, e.g. a logged
        one. The noise and timesteps are the step's as always (keyed by :attr:`step`)."""
        started = time.perf_counter()
        wait_before = sum(stream.wait_s for stream in self.streams)
        if batches is not None and (
            len(batches) != len(self.logical) or any(len(b) != self.cfg.grad_accum for b in batches)
        ):
            raise ValueError(
                f"train_step takes {self.cfg.grad_accum} micro-batch(es) (grad_accum) for each of the "
                f"{len(self.logical)} logical rank(s) this rank plays, got {[len(b) for b in batches]}"
            )
        totals: dict[str, float] = {}
        for index, (logical_rank, stream) in enumerate(zip(self.logical, self.streams, strict=True)):
            for micro in range(self.cfg.grad_accum):
                # Every micro-batch from the step's source.
                batch = stream.next(self.step) if batches is None else batches[index][micro]
                parts = self.forward_backward_step(batch, micro, logical_rank)
                for key, value in parts.items():
                    totals[key] = totals.get(key, 0.0) + value
        flops = totals.pop("flops", 0.0)
        totals = self._global_sums(totals)
        clip = self.cfg.optim.grad_clip
        grad_norm = torch.nn.utils.clip_grad_norm_(self.params, clip if clip > 0 else float("inf"))
        grad_norm = float(grad_norm.full_tensor() if hasattr(grad_norm, "full_tensor") else grad_norm)
        lr = self.scheduler.get_last_lr()[0]  # the rate this update uses
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.scheduler.step()
        self.ema.update(self.module.transformer)
        self.step += 1
        samples = totals.pop("samples")
        self.samples_seen += int(round(samples))
        micro_batches = self.cfg.grad_accum * self.logical_ranks
        metrics = {f"train/{k}": v / micro_batches for k, v in totals.items() if k.startswith("loss")}
        metrics["train/lr"] = lr
        metrics["train/grad_norm"] = grad_norm
        elapsed = time.perf_counter() - started
        metrics["perf/step_s"] = elapsed
        metrics["perf/samples_per_s"] = samples / elapsed
        metrics["perf/tokens_per_s"] = totals["tokens"] / elapsed
        wait = sum(stream.wait_s for stream in self.streams) - wait_before
        metrics["perf/data_wait_frac"] = wait / elapsed
        if self.peak:
            metrics["perf/mfu"] = flops / elapsed / self.peak
        return metrics

    # ------------------------------------------------------------------------------------------
    # The loop

    def train(
        self,
        *,
        tracking_uri: str | None = None,
        resumed_from: str | None = None,
        report: Callable[[dict[str, float], str], None] | None = None,
    ) -> None:
        """Train from :attr:`step` to ``max_steps``, then export the EMA model and publish it.

        Rank 0 tracks the run (:meth:`start_tracking`) and ends its MLflow run FINISHED, or FAILED
        when a step, the export or the publication raises (an error ending it is logged, never
        raised over the run's own). Each :meth:`train_step` is followed by :meth:`step_end`.

        Args:
            tracking_uri: the tracking store (default ``tracking.uri``).
            resumed_from: where the restored checkpoint came from, recorded in the MLflow run.
            report: called on every rank at each checkpoint with the step's metrics and the
                local directory this rank just wrote its part of the checkpoint to (removed once
                it returns): where checkpoints are kept. None: no checkpoint is written.
        """
        tracker = self.start_tracking(tracking_uri, resumed_from)
        window: list[dict[str, float]] = []
        status = "FAILED"
        try:
            while self.step < self.cfg.max_steps:
                window.append(self.train_step())
                self.step_end(window, tracker, report)
            with tempfile.TemporaryDirectory() as export_dir:
                self.export(export_dir)
                if self.rank == 0:
                    self.publish(export_dir, tracker)
            status = "FINISHED"
        finally:
            end_tracking(tracker, status)

    def start_tracking(self, tracking_uri: str | None = None, resumed_from: str | None = None):
        """A :class:`sama.tracking.Tracker` (enabled on rank 0) on the run's MLflow run: the
        checkpoint's (:attr:`mlflow_run_id`) when there is one, else a new run, which records the
        configuration (params and config.yaml). A run that starts at step 0 logs its validation
        loss at step 0."""
        from sama.tracking import Tracker

        cfg = self.cfg
        tracker = Tracker(
            dataclasses.replace(cfg.tracking, uri=tracking_uri or cfg.tracking.uri), self.rank == 0
        )
        resumed = self.step > 0
        self.mlflow_run_id = tracker.start(
            cfg.run.name,
            run_id=self.mlflow_run_id,
            tags={"stage": str(cfg.stage), "sama.run": cfg.run.name},
            resumed_from=f"{resumed_from} (step {self.step})" if resumed_from else None,
        )
        if tracker.created_run:
            tracker.log_params(config_lib.to_dict(cfg))
            tracker.log_text(config_lib.dumps(cfg), "config.yaml")
        if not resumed:
            tracker.log_metrics(self.validate(), step=0)
        return tracker

    def step_end(
        self,
        window: list[dict[str, float]],
        tracker,
        report: Callable[[dict[str, float], str], None] | None = None,
    ) -> None:
        """What is due after optimizer step :attr:`step` (each schedule also fires at the last
        step): ``window``'s metrics (the steps' since the last log) averaged and logged, and
        ``window`` emptied (``log_every``); validation loss and sample renders
        (``validation.every_steps``); evaluation (``validation.eval_every``); a checkpoint handed
        to ``report`` with the step's loss and what was measured (``checkpoint.every_steps``)."""
        cfg, step = self.cfg, self.step
        reported: dict[str, float] = {"step": step, "train/loss": window[-1]["train/loss"]}
        if steps_due(step, cfg.log_every, cfg.max_steps):
            self._log_window(window, tracker)
            window.clear()
        if steps_due(step, cfg.validation.every_steps, cfg.max_steps):
            validated = self.validate()
            reported.update(validated)
            tracker.log_metrics(validated, step)
            for key, data in self.render_edits():
                tracker.log_video(data, f"samples/step_{step:07d}/{key}.mp4")
        if cfg.validation.eval_every and steps_due(step, cfg.validation.eval_every, cfg.max_steps):
            evaluated = self.evaluate_edits()
            reported.update(evaluated)
            tracker.log_metrics(evaluated, step)
        if report is not None and steps_due(step, cfg.checkpoint.every_steps, cfg.max_steps):
            with tempfile.TemporaryDirectory() as directory:
                self.save_checkpoint(directory)
                report(reported, directory)

    def _log_window(self, window: list[dict[str, float]], tracker) -> None:
        """The mean of each metric over ``window`` logged at the current step (and printed by rank 0)."""
        averaged = {k: sum(m[k] for m in window) / len(window) for k in window[-1]}
        tracker.log_metrics(averaged, self.step)
        if self.rank == 0:
            log.info(
                "step %d/%d loss %.4f (fm %.4f) lr %.2e %.2f samples/s data wait %.1f%%",
                self.step,
                self.cfg.max_steps,
                averaged["train/loss"],
                averaged["train/loss_fm"],
                averaged["train/lr"],
                averaged["perf/samples_per_s"],
                100 * averaged["perf/data_wait_frac"],
            )

    def publish(self, export_dir: str, tracker) -> None:
        """Rank 0: upload the export in ``export_dir`` to ``{run_uri}/export``, log and register
        it in MLflow, and write run_info.json (its URIs redacted)."""
        from sama import storage
        from sama.redaction import redact_config

        cfg = self.cfg
        export_uri = storage.join(run_uri(cfg), EXPORT_DIR)
        storage.delete(export_uri, recursive=True)
        storage.upload_dir(export_dir, export_uri)
        model = tracker.log_model(export_dir, cfg.stage)
        info = {
            "run_name": cfg.run.name,
            "stage": cfg.stage,
            "steps": self.step,
            "samples_seen": self.samples_seen,
            "export_uri": export_uri,
            "mlflow_tracking_uri": tracker.tracking_uri,
            "mlflow_experiment": cfg.tracking.experiment,
            "mlflow_run_id": tracker.run_id,
            **{f"mlflow_{k}": v for k, v in model.items()},
            # Whether every source was latent shards, and which frozen encoders rank 0 loaded for
            # what ("training" only when some source needed encoding).
            "precomputed": self.precomputed,
            "frozen_encoders_loaded": dict(self.frozen_loaded),
        }
        storage.write_text(
            storage.join(run_uri(cfg), RUN_INFO_FILE), json.dumps(redact_config(info), indent=2) + "\n"
        )

    # ------------------------------------------------------------------------------------------
    # Frozen encoders loaded when first needed (every training source precomputed)

    def _load_frozen(self, name: str) -> torch.nn.Module:
        """The frozen encoder ``name`` the run would have built (same source, same seeded
        initialisation), on the CPU."""
        from sama.models import presets

        config = self.model_config
        dtype = presets.torch_dtype_of(config)
        if name == "semantic_encoder":
            return presets.build_semantic_encoder(config)
        if self.cfg.model.init_from:
            # The export's own autoencoder or text encoder, read without its transformer (by the
            # export's manifest config: this run's drops the checkpoints they may reference).
            from sama.pipeline_edit import SamaExport

            export = SamaExport.read(self.cfg.model.init_from)
            load = export.load_vae if name == "vae" else export.load_text_encoder
            return load(dtype, config)
        with presets.frozen_init(name):
            if name == "vae":
                return presets.build_autoencoder(config.vae, config.component_source("vae"), dtype)
            return presets.build_text_encoder(config.text, config.component_source("text"), dtype)

    def frozen(self, name: str, purpose: str) -> torch.nn.Module:
        """The run's frozen encoder ``name``: the one built for training, or else one loaded now on
        the CPU (recorded in :attr:`frozen_loaded` with ``purpose``) and kept for later uses."""
        built = getattr(self.components, name)
        if built is not None:
            return built
        if name not in self._lazy_frozen:
            started = time.perf_counter()
            self._lazy_frozen[name] = self._load_frozen(name)
            log.info(
                "rank %d: loaded the %s for %s in %.1f s (training, on precomputed sources, does not use it)",
                self.rank,
                name,
                purpose,
                time.perf_counter() - started,
            )
        # An export's text encoder comes with its autoencoder: recorded when first used.
        self.frozen_loaded.setdefault(name, purpose)
        module = self._lazy_frozen[name]
        module.requires_grad_(False)
        return module.eval()

    def _missing_encoders(self, rows) -> list[str]:
        """The frozen encoders the training module lacks to encode ``rows``."""
        if not any(not row.is_latent for row in rows):
            return []
        names = ["vae", "text_encoder"] + (["semantic_encoder"] if self.module.uses_semantic else [])
        return [name for name in names if getattr(self.module, name) is None]

    @contextlib.contextmanager
    def _encoders_lent(self, names: list[str], purpose: str):
        """The training module with the frozen encoders ``names`` (loaded when first needed) on
        the run's device for the block, then without them (back on the CPU)."""
        lent = []
        try:
            for name in names:
                module = self.frozen(name, purpose).to(self.device)
                setattr(self.module, name, module)
                lent.append((name, module))
            yield
        finally:
            for name, module in lent:
                setattr(self.module, name, None)
                module.to("cpu")

    def _validation_batches(self) -> list:
        """The held-out samples encoded once (eval mode: no caption dropout; anchors from fixed
        generators, so every validation sees the same tensors), on the CPU. When the encoders they
        need were not built (precomputed training, pixel validation shards), rank 0 loads and runs
        them and hands the encoded samples to the other ranks."""
        from sama.train.data import collate
        from sama.train.parallelize import distributed

        if self._val_encoded is not None:
            return self._val_encoded
        missing = self._missing_encoders(self.val_rows)
        encoded = None
        if not missing or self.rank == 0:
            text_length = int(self.model_config.text.max_length)
            with self._encoders_lent(missing, "validation"):
                encoded = [
                    _batch_to(
                        self.module.encode_batch(collate([row], text_length), self._generator(10_000, index)),
                        "cpu",
                    )
                    for index, row in enumerate(self.val_rows)
                ]
        if missing and distributed() and self.world_size > 1:
            import torch.distributed as dist

            box = [encoded]
            dist.broadcast_object_list(box, src=0)
            encoded = box[0]
        self._val_encoded = encoded
        return encoded

    @torch.no_grad()
    def validate(self) -> dict[str, float]:
        """Mean loss over the held-out samples with the same timesteps and noise at every call."""
        if not self.val_rows:
            return {}
        self.module.eval()
        losses, fm, sem = [], [], []
        try:
            for index, encoded in enumerate(self._validation_batches()):
                encoded = _batch_to(encoded, self.device)
                for j in range(self.cfg.validation.draws):
                    out = self.module.compute_loss(encoded, self._generator(20_000, index, j))
                    losses.append(float(out.loss))
                    fm.append(float(out.loss_fm))
                    if out.loss_sem is not None:
                        sem.append(float(out.loss_sem))
        finally:
            self.module.train()
        metrics = {"val/loss": float(np.mean(losses)), "val/loss_fm": float(np.mean(fm))}
        if sem:
            metrics["val/loss_sem"] = float(np.mean(sem))
        return metrics

    def _renders_on_every_rank(self) -> bool:
        # Sharded or context-parallel transformers run their forward together on every rank.
        return self.world_size > 1 and (self.cfg.parallel.strategy == "fsdp2" or self.cp > 1)

    @torch.no_grad()
    def render_edits(self) -> list[tuple[str, bytes]]:
        """Edit held-out sources with the current weights: mp4s of [source | edit | target].

        Without a trained-with autoencoder and text encoder (every training source precomputed),
        they are loaded on the CPU when first needed, on rank 0 only (every rank when the
        transformer is sharded), and a precomputed sample's frames are its stored latents decoded.
        """
        from sama import video

        rendered = []
        for row, source, edited, target in self._edit_held_out(self.render_rows, "render"):
            # A shorter source (a sped-up clip) is shown stretched over the target's span.
            if target.shape[0] != source.shape[0]:
                source = video.stretch_frames(source, target.shape[0])
            strip = np.concatenate([source, edited, target], axis=2)
            if strip.shape[1] % 2 or strip.shape[2] % 2:
                strip = strip[:, : strip.shape[1] // 2 * 2, : strip.shape[2] // 2 * 2]
            rendered.append((row.key, video.encode_mp4(strip, 8.0)))
        return rendered

    @torch.no_grad()
    def evaluate_edits(self) -> dict[str, float]:
        """Judge-free metrics of held-out edits with the current weights (``validation.eval_*``).

        Each of ``eval_rows`` is edited as the renders are, then measured against its target and
        source (:class:`sama.eval.metrics.MetricSuite`); returns the means over samples as
        ``eval/<metric>`` and per task as ``eval/<task>/<metric>`` (empty on ranks that do not
        render)."""
        from sama.eval.job import plain_instruction
        from sama.eval.metrics import MetricSuite

        if self._metric_suite is None:
            self._metric_suite = MetricSuite(self.cfg.validation.metrics, device="cpu")
        values: dict[str, list[float]] = {}
        for row, source, edited, target in self._edit_held_out(self.eval_rows, "render"):
            measured = self._metric_suite.compute(
                edited, source=source, reference=target, instruction=plain_instruction(row.instruction)
            )
            for name, value in measured.items():
                values.setdefault(f"eval/{name}", []).append(value)
                values.setdefault(f"eval/{row.task}/{name}", []).append(value)
        return {name: float(np.mean(v)) for name, v in sorted(values.items())}

    def _edit_held_out(self, rows: list, purpose: str):
        """``(row, source, edited, target)`` frames of each held-out row edited with the current
        weights at the render settings, to its target's length (restoring a sped-up clip
        lengthens it); nothing on ranks that do not render."""
        from sama.pipeline_edit import SamaEditPipeline, decode_latents

        if not rows:
            return
        lazy = self.components.vae is None or self.components.text_encoder is None
        if lazy and self.rank != 0 and not self._renders_on_every_rank():
            return
        vae, text_encoder = self.frozen("vae", purpose), self.frozen("text_encoder", purpose)
        settings = self.cfg.validation
        pipeline = SamaEditPipeline(
            self.module.transformer,
            vae,
            text_encoder,
            model_config=self.model_config,
            config=dataclasses.replace(
                self.cfg.inference,
                num_inference_steps=settings.render_steps or self.cfg.inference.num_inference_steps,
                guidance_scale=(
                    self.cfg.inference.guidance_scale if settings.render_cfg is None else settings.render_cfg
                ),
                # Held-out instructions carry their prefix already.
                add_prefix=False,
            ),
        )
        if lazy:
            # The loaded encoders stay in CPU memory, visiting the device only while they run.
            pipeline.enable_model_cpu_offload(self.device)
        self.module.eval()
        try:
            for row in rows:
                if row.is_latent:
                    source = decode_latents(vae, row.latents.source)
                    target = decode_latents(vae, row.latents.target)
                else:
                    source, target = row.source, row.target
                edited = pipeline(source, row.instruction, seed=0, num_frames=target.shape[0]).frames
                yield row, source, edited, target
        finally:
            self.module.train()

    def averaged_pipeline(self, device: torch.device | str = "cpu", purpose: str = "export"):
        """An edit pipeline over a copy of the EMA weights, on ``device`` (rank 0; None elsewhere).

        The weights are gathered one tensor at a time onto rank 0 (under FSDP2 each gather is a
        collective that every rank calls, in the same order): no rank ever holds more than the
        export's model and one gathered tensor. The pipeline shares the run's frozen autoencoder
        and text encoder (loaded on the CPU for ``purpose`` when training did not build them) and
        uses the run's inference settings; it records their identity (written into the export's
        manifest). It is what :meth:`export` writes, and what evaluation edits with.
        """
        from accelerate import init_empty_weights
        from accelerate.utils import set_module_tensor_to_device

        from sama.models.presets import build_transformer
        from sama.pipeline_edit import SamaEditPipeline
        from sama.train.ema import full_tensor

        transformer = None
        if self.rank == 0:
            # Parameters on the meta device (buffers real), each filled by its gathered tensor.
            with init_empty_weights():
                transformer = build_transformer(self.model_config, load_weights=False)
                if self.cfg.model.lora.enabled:  # the run's own layout, merged once filled
                    from sama.models.lora import apply_lora

                    apply_lora(transformer, self.cfg.model.lora)
        for name, value in self.module.transformer.state_dict().items():
            source = self.ema.shadow.get(name, value)
            tensor = full_tensor(source.detach())
            if transformer is not None:
                dtype = value.dtype
                set_module_tensor_to_device(transformer, name, "cpu", value=tensor.to("cpu", dtype))
            del tensor
        if transformer is None:
            return None
        if self.cfg.model.lora.enabled:
            from sama.models.lora import merge_lora_modules

            transformer = merge_lora_modules(transformer)
        transformer.to(device).eval()
        pipeline = SamaEditPipeline(
            transformer,
            self.frozen("vae", purpose),
            self.frozen("text_encoder", purpose),
            model_config=self.model_config,
            config=self.cfg.inference,
        )
        pipeline.encoder_identity = self.encoder_identity
        return pipeline

    def export(self, directory: str) -> None:
        """The EMA weights as a ``save_pretrained`` pipeline that ``sama edit`` loads (rank 0 writes)."""
        if self.cfg.model.lora.enabled and self.cfg.model.lora_export == "adapter":
            from sama.train.lora import export_adapter

            return export_adapter(self, directory)
        pipeline = self.averaged_pipeline("cpu")
        if pipeline is None:
            return
        # The training encoders visit the CPU for the write; encoders loaded for it live there.
        trained = [m for m in (self.components.vae, self.components.text_encoder) if m is not None]
        for module in trained:
            module.to("cpu")
        pipeline.save_pretrained(directory)
        for module in trained:
            module.to(self.device)


def data_row_is_latent(row: Any) -> bool:
    """Whether an in-memory row (a TrainingRow, or a Ray row dict) holds precomputed latents."""
    if isinstance(row, dict):
        packed = row.get("latents")
        return packed is not None and len(packed) > 0
    return bool(row.is_latent)


def _batch_to(batch, device: torch.device | str):
    """A copy of a SamaBatch with its tensors on ``device``."""
    moved = {
        f.name: getattr(batch, f.name).to(device)
        for f in dataclasses.fields(batch)
        if isinstance(getattr(batch, f.name), torch.Tensor)
    }
    return dataclasses.replace(batch, **moved)


def end_tracking(tracker, status: str) -> None:
    """End the MLflow run from a ``finally``: a failure here is logged, never raised, so the
    training run's own error (if any) is the one reported."""
    try:
        tracker.end(status)
    except Exception:
        log.exception("ending the tracked run (status %s) failed; the run's own outcome stands", status)


def steps_due(step: int, every: int, max_steps: int) -> bool:
    return step % every == 0 or step == max_steps
