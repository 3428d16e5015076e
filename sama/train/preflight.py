"""What ``sama train`` checks on the driver before it requests a single worker.

:func:`run_preflight` runs every check and returns the results (``sama train --check`` prints
them); :func:`sama.train.launch.run_training` raises :class:`sama.preflight.PreflightError` when one
failed. The checks:

- ``config``: the resolved configuration is valid (the model preset and its overrides included);
- ``run``: a run of that name is new, or ``--resume`` names one with a usable checkpoint (the
  newest committed, complete one) whose configuration the resume does not change (model,
  objective, optimizer, data sources, batch sizes) unless ``--allow-config-change``;
- ``model``: the ``init_from`` export exists, is a SAMA export and is the recipe's preset; or the
  pretrained weights (local directory or hub id) hold each component and the transformer's
  architecture is the preset's;
- ``data source 'NAME'`` and ``validation shards``: the prefix lists shards, and the first
  sample of the first shard reads, has a schema version this code reads and the declared media;
- ``run storage``: a probe object can be written and removed under the run's directory;
- ``tracking``: the MLflow server answers (a warning only: training still runs);
- ``memory plan`` (GPU runs): the per-GPU memory plan (:mod:`sama.train.plan`) fits
  ``plan.gpu_memory_gib`` (a warning only with ``plan.enforce=false``, ``sama train --force``);
- ``cluster``: the cluster (its nodes, or the node types its autoscaler may add) can place every
  worker's CPUs, GPUs, memory and accelerator type.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import urllib.error
import urllib.request
from typing import Any

from sama import preflight, schema, storage
from sama.preflight import Check, CheckFailed, CheckResult, CheckWarning, describe_error, storage_access
from sama.train.trainer import TrainConfig

log = logging.getLogger(__name__)

WHAT = "sama train"


def run_preflight(
    cfg: TrainConfig,
    resume: bool = False,
    *,
    cluster: bool = True,
    timeout_s: float = preflight.DEFAULT_CHECK_TIMEOUT_S,
    allow_config_change: bool = False,
) -> list[CheckResult]:
    """Every check's result; ``cluster=False`` skips the one that connects to Ray."""
    from sama.train.launch import run_uri

    checks = [
        Check("config", lambda: check_config(cfg)),
        Check("run", lambda: check_run(cfg, resume, allow_config_change)),
        Check("model", lambda: check_model(cfg)),
    ]
    for index, source in enumerate(cfg.data.sources):
        key = f"data.sources[{index}].uri"
        checks.append(
            Check(
                f"data source {source.name!r}",
                lambda s=source, k=key: (
                    check_shards(s.uri, s.media, k) + check_precomputed(cfg, s.name, s.uri, k)
                ),
            )
        )
    if cfg.data.val_uri:
        checks.append(
            Check("validation shards", lambda: check_shards(cfg.data.val_uri, None, "data.val_uri"))
        )
    checks.append(Check("run storage", lambda: preflight.writable(run_uri(cfg))))
    if cfg.tracking.enabled:
        checks.append(Check("tracking", lambda: check_tracking(cfg)))
    if cfg.scaling.use_gpu:
        checks.append(Check("memory plan", lambda: check_memory_plan(cfg)))
    results = preflight.run_checks(checks, timeout_s)
    if cluster:
        # In this thread: ray.init belongs to the driver's main thread.
        results.append(preflight.run_check(Check("cluster", lambda: check_cluster(cfg))))
    return results


def check_config(cfg: TrainConfig) -> str:
    from sama.train.trainer import resolve_model_config

    try:
        cfg.validate()
        if not cfg.model.init_from:
            # The preset and its overrides (an init_from export brings its own: see check_model).
            resolve_model_config(cfg.model)
    except (ValueError, KeyError) as exc:
        raise CheckFailed(str(exc).strip("'\""), "fix the recipe or the --set override") from None
    media = sorted({s.media for s in cfg.data.sources})
    return (
        f"stage {cfg.stage}, {cfg.max_steps} steps, {len(cfg.data.sources)} source(s) ({', '.join(media)}), "
        f"{cfg.scaling.num_workers} worker(s)"
    )


def check_run(cfg: TrainConfig, resume: bool, allow_config_change: bool = False) -> str:
    from sama.train.checkpoint import CheckpointError
    from sama.train.launch import (
        ConfigChanged,
        check_config_change,
        latest_checkpoint,
        run_uri,
        usable_checkpoint,
    )

    where = storage.redact(run_uri(cfg))
    with storage_access("read the run's directory", run_uri(cfg), "run.storage_uri"):
        latest = latest_checkpoint(cfg)
    if latest and not resume:
        raise CheckFailed(
            f"run {cfg.run.name!r} already has checkpoints in {where} (latest {storage.basename(latest)})",
            "pass --resume to continue it, or set run.name to start a new run",
        )
    if resume and not latest:
        raise CheckFailed(
            f"--resume: run {cfg.run.name!r} has no checkpoint in {where}",
            "drop --resume to start it, or set run.name / run.storage_uri to the run to continue",
        )
    if latest:
        with storage_access("read the run's checkpoints", run_uri(cfg), "run.storage_uri"):
            try:
                usable = usable_checkpoint(cfg)
                changes = check_config_change(cfg, usable, allow_config_change) if usable else []
            except CheckpointError as exc:
                fix = "start a new run (set run.name), or restore the run's files"
                raise CheckFailed(str(exc), fix) from None
            except ConfigChanged as exc:
                raise CheckFailed(
                    str(exc).split(". Restore", 1)[0],
                    "restore those values, or pass --allow-config-change to train on with the new ones",
                ) from None
        fallback = "" if usable == latest else f" (the latest, {storage.basename(latest)}, is unusable)"
        changed = f", with changed {', '.join(c.split(':', 1)[0] for c in changes)}" if changes else ""
        return f"resuming {cfg.run.name!r} from {storage.basename(usable)}{fallback}{changed}"
    return f"new run {cfg.run.name!r} in {where}"


def check_model(cfg: TrainConfig) -> str:
    if cfg.model.init_from:
        return _check_export(cfg)
    from sama.train.trainer import resolve_model_config

    try:
        model_config = resolve_model_config(cfg.model)
    except (ValueError, KeyError):
        raise CheckFailed("the model configuration is invalid (see the config check)") from None
    found = []
    components = {
        "transformer": model_config.transformer.subfolder,
        "vae": model_config.vae.subfolder if model_config.vae.kind == "wan" else None,
        "text": model_config.text.subfolder,
    }
    for component, subfolder in components.items():
        source = model_config.component_source(component)
        if source is None or subfolder is None:
            continue
        checkpoint_config = _weights_config(source, subfolder, f"model weights ({component})")
        if component == "transformer":
            from sama.models.presets import transformer_mismatch

            mismatch = transformer_mismatch(model_config, checkpoint_config)
            if mismatch:
                raise CheckFailed(
                    f"{storage.redact(source)}: {mismatch}",
                    "use the preset these weights are (model.preset) or the weights of the preset",
                )
        found.append(f"{component} from {storage.redact(source)}")
    semantic = model_config.semantic
    if semantic.enabled and semantic.pretrained:
        _weights_config(semantic.pretrained, "", "semantic encoder weights")
        found.append(f"semantic encoder from {storage.redact(semantic.pretrained)}")
    transformer = model_config.transformer
    shape = f"{transformer.num_layers} layers, width {transformer.dim}"
    if not found:
        return f"'{model_config.preset}' preset ({shape}), random init"
    return f"'{model_config.preset}' preset ({shape}): " + ", ".join(found)


def _check_export(cfg: TrainConfig) -> str:
    """model.init_from is a SAMA export of the recipe's preset, with every component it lists."""
    from sama.pipeline_edit import PIPELINE_FILE, ModelDirectoryError, parse_manifest

    export = cfg.model.init_from or ""
    where = storage.redact(export)
    fix = "point model.init_from at a stage-0 run's export ({run.storage_uri}/{run.name}/export)"
    manifest_uri = storage.join(export, PIPELINE_FILE)
    if not storage.exists(manifest_uri):
        missing = "does not exist" if not storage.exists(export) else f"has no {PIPELINE_FILE}"
        raise CheckFailed(f"model.init_from {where} {missing}: not a SAMA export", fix)
    try:
        manifest, model_config, _ = parse_manifest(storage.read_text(manifest_uri), where)
    except ModelDirectoryError as exc:
        raise CheckFailed(f"model.init_from {exc}", fix) from None
    if model_config is None:
        raise CheckFailed(f"model.init_from {where}: the export records no model configuration", fix)
    if model_config.preset != cfg.model.preset:
        raise CheckFailed(
            f"model.init_from {where} is a '{model_config.preset}' model; the recipe says model.preset="
            f"'{cfg.model.preset}'",
            f"set model.preset={model_config.preset}, or start from an export of '{cfg.model.preset}'",
        )
    for name, entry in (manifest.get("components") or {}).items():
        local = entry.get("path") if isinstance(entry, dict) else None
        if local and not storage.exists(storage.join(export, local)):
            raise CheckFailed(f"model.init_from {where}: the {name} directory ({local}) is missing", fix)
    return f"SAMA export of a '{model_config.preset}' model at {where}"


def _weights_config(source: str, subfolder: str, what: str) -> dict[str, Any]:
    """The ``config.json`` of a weights component, from a local directory or the hub."""
    name = f"{subfolder}/config.json" if subfolder else "config.json"
    if os.path.isdir(source):
        path = os.path.join(source, name)
        if not os.path.isfile(path):
            raise CheckFailed(
                f"{what}: {source} has no {name}",
                "point it at the root of a diffusers-format checkpoint (the Wan *-Diffusers layout)",
            )
        with open(path) as handle:
            return json.load(handle)
    if source.startswith(("/", ".", "~")) or source.count("/") != 1:
        raise CheckFailed(
            f"{what}: {source} is neither a local directory nor a hub id (org/name)",
            "point it at a local checkpoint directory, or a hub id such as Wan-AI/Wan2.1-T2V-1.3B-Diffusers",
        )
    from huggingface_hub import hf_hub_download

    try:
        path = hf_hub_download(source, "config.json", subfolder=subfolder or None, etag_timeout=10)
    except Exception as exc:
        raise CheckFailed(
            f"{what}: cannot read {name} of {source} from the hub: {describe_error(exc)}",
            "check the hub id and this machine's network (HF_ENDPOINT, HF_TOKEN), or download the "
            "checkpoint and point the recipe at the directory",
        ) from None
    with open(path) as handle:
        return json.load(handle)


def check_shards(uri: str, media: str | None, key: str) -> str:
    """The prefix lists shards and its first sample reads (schema version, declared media)."""
    where = storage.redact(uri)
    with storage_access("list", uri, key):
        shards = schema.list_shards(uri)
    if not shards:
        raise CheckFailed(
            f"no shards (*.tar) under {where}",
            f"write them with `sama prep-pretext` / `sama prep-pairs` (their --output + /shards/<media>), "
            f"or fix {key}",
        )
    first = shards[0]
    try:
        with contextlib.closing(schema.iter_samples([first])) as samples:
            sample = next(samples, None)
        if sample is None:
            raise CheckFailed(
                f"the first shard {storage.redact(first)} holds no sample", f"rewrite it, or fix {key}"
            )
        meta = sample.meta
    except CheckFailed:
        raise
    except Exception as exc:
        raise CheckFailed(
            f"the first sample of {storage.redact(first)} does not read: {describe_error(exc)}",
            "rewrite the shards with this version of sama's prep jobs",
        ) from None
    if media is not None and meta.media != media:
        raise CheckFailed(
            f"{where} holds {meta.media} samples (first: {meta.key}), the source declares media={media!r}",
            f"set the source's media to {meta.media!r}, or point {key} at its .../shards/{media} prefix",
        )
    return f"{len(shards)} shard(s); first sample {meta.task} ({meta.media}, schema v{meta.schema_version})"


def check_precomputed(cfg: TrainConfig, name: str, uri: str, key: str) -> str:
    """For a source of latent shards (``sama precompute``): its tensors were made by this run's
    frozen encoders (the check :meth:`sama.train.trainer.Trainer.build` makes). Empty for media."""
    from sama.train.trainer import (
        check_latent_encoders,
        frozen_encoder_identity,
        frozen_encoders_needed,
        resolve_model_config,
    )

    with storage_access("read", uri, key):
        info = schema.read_latent_info(uri)
    if info is None:
        return ""
    try:
        model_config = resolve_model_config(cfg.model)
        identity = frozen_encoder_identity(cfg.model, model_config)
    except Exception as exc:  # the model check reports why; the encoders cannot be compared here
        return f"; precomputed ({info.dtype}), encoders not compared: {describe_error(exc)}"
    try:
        check_latent_encoders(name, uri, info, identity, frozen_encoders_needed(cfg, model_config))
    except ValueError as exc:
        raise CheckFailed(str(exc), f"rerun `sama precompute` with this run's model, or fix {key}") from None
    return f"; precomputed ({info.dtype}) by this run's encoders"


def check_tracking(cfg: TrainConfig) -> str:
    from sama.tracking import TrackingNotConfigured, training_store

    try:
        uri, local_dir = training_store(cfg.tracking, cfg.run.storage_uri)
    except TrackingNotConfigured as exc:
        raise CheckFailed(
            "run storage on object storage and no MLflow tracking store: the run would be tracked "
            "in a temporary directory of the Ray session, lost with it",
            "set tracking.uri (or MLFLOW_TRACKING_URI) to your MLflow server, or tracking.uri=local "
            f"for a store in tracking.local_dir ({cfg.tracking.local_dir}) on this machine",
        ) from exc
    if local_dir is not None:
        return f"a local store in {local_dir} on this machine, served to the workers during the run"
    assert uri is not None
    where = storage.redact(uri)
    if not uri.startswith(("http://", "https://")):
        return f"MLflow store {where}"
    try:
        with urllib.request.urlopen(uri.rstrip("/") + "/health", timeout=5) as response:
            status = response.status
    except (urllib.error.URLError, OSError) as exc:
        raise CheckWarning(
            f"the MLflow server at {where} does not answer ({describe_error(exc)})",
            "start it or fix tracking.uri / MLFLOW_TRACKING_URI; or set tracking.enabled=false",
        ) from None
    if status != 200:
        raise CheckWarning(f"the MLflow server at {where} answered HTTP {status} to /health")
    return f"MLflow server {where} answers"


def check_memory_plan(cfg: TrainConfig) -> str:
    """The run's per-GPU memory plan (:mod:`sama.train.plan`) fits ``plan.gpu_memory_gib``; a plan
    that does not is a failure, or a warning with ``plan.enforce=false`` (``sama train --force``).
    The message carries the whole plan."""
    from sama.train.plan import memory_plan

    try:
        plan = memory_plan(cfg, cfg.run.name)
    except (ValueError, KeyError) as exc:
        raise CheckFailed(
            f"cannot plan the run's memory: {exc}", "fix the recipe (see the config check)"
        ) from None
    summary = (
        f"{plan.total / 2**30:.1f} GiB per GPU of {plan.gpu_memory / 2**30:.0f} GiB "
        f"({plan.micro_batch} {plan.media} x {plan.tokens_per_sample} tokens, {plan.world_size} worker(s))"
    )
    if plan.fits:
        return summary
    found = f"the run does not fit: {summary}\n{plan.format()}"
    fix = (
        "shard over more workers (scaling.num_workers, parallel.strategy=fsdp2), turn on "
        "parallel.activation_checkpointing, lower the per-worker batch sizes (raise grad_accum), use "
        "context parallelism, or set plan.gpu_memory_gib to your GPUs'; --force starts it anyway"
    )
    if not cfg.plan.enforce:
        raise CheckWarning(found, fix)
    raise CheckFailed(found, fix)


# ---------------------------------------------------------------------------------------------
# Cluster


def _fits(node: dict[str, float], need: dict[str, float]) -> int:
    """How many workers needing ``need`` fit on one node with ``node`` resources."""
    counts = [math.floor(node.get(name, 0.0) / amount + 1e-9) for name, amount in need.items() if amount > 0]
    return min(counts) if counts else 1_000_000


def describe_resources(resources: dict[str, float]) -> str:
    parts = []
    for name, amount in sorted(resources.items()):
        if name == "memory" or name == "object_store_memory":
            parts.append(f"{name} {amount / 2**30:.1f} GiB")
        elif name.startswith("node:") or name.startswith("bundle_group"):
            continue
        else:
            parts.append(f"{name} {amount:g}")
    return ", ".join(parts) or "nothing"


def cluster_nodes() -> list[dict[str, float]]:
    """The total resources of each alive node of the connected cluster."""
    import ray

    return [dict(node["Resources"]) for node in ray.nodes() if node.get("Alive")]


def autoscaler_node_types() -> list[tuple[str, dict[str, float], int]] | None:
    """The node types the cluster's autoscaler may add, as (name, resources, max count; -1 for no
    limit), or None when the cluster reports no autoscaler configuration."""
    try:
        from ray._private.state import state

        config = state.get_cluster_config()
    except Exception:  # an older or unusual cluster: no autoscaler information
        return None
    if config is None or not config.node_group_configs:
        return None
    return [(group.name, dict(group.resources), int(group.max_count)) for group in config.node_group_configs]


def placement_capacity(
    need: dict[str, float],
    nodes: list[dict[str, float]],
    node_types: list[tuple[str, dict[str, float], int]] | None,
) -> tuple[int, int]:
    """(workers the nodes hold now, workers the cluster may ever hold with its autoscaler)."""
    now = sum(_fits(node, need) for node in nodes)
    if not node_types:
        return now, now
    scalable = 0
    for _, resources, max_count in node_types:
        per_node = _fits(resources, need)
        if per_node and max_count == -1:
            return now, 1_000_000
        scalable += per_node * max(max_count, 0)
    return now, max(now, scalable)


def check_cluster(cfg: TrainConfig) -> str:
    """Connects to the cluster (RAY_ADDRESS, or a local Ray) and judges its resources."""
    from sama import cluster

    cluster.connect()
    return cluster_verdict(cfg, cluster_nodes(), autoscaler_node_types())


def cluster_verdict(
    cfg: TrainConfig,
    nodes: list[dict[str, float]],
    node_types: list[tuple[str, dict[str, float], int]] | None,
) -> str:
    """Whether nodes with these resources (and these autoscaler node types) can place the run's
    workers; raises CheckFailed naming what is missing when they never can."""
    need = cfg.scaling.worker_resources()
    workers = cfg.scaling.num_workers
    now, ever = placement_capacity(need, nodes, node_types)
    asked = f"{workers} worker(s) x {{{describe_resources(need)}}}"
    if ever < workers:
        raise CheckFailed(_shortfall(need, workers, nodes, node_types), _shortfall_fix(cfg, need))
    if now >= workers:
        return f"{asked}: the cluster's {len(nodes)} node(s) can place them"
    return (
        f"{asked}: the nodes hold {now} now, the autoscaler can add the rest "
        f"(waiting at most scaling.resource_timeout_s={cfg.scaling.resource_timeout_s:g} s)"
    )


def _shortfall(need, workers, nodes, node_types) -> str:
    """Which resource the cluster lacks, in one sentence a user can act on."""
    totals: dict[str, float] = {}
    for node in nodes:
        for name, amount in node.items():
            totals[name] = totals.get(name, 0.0) + amount
    lacking = []
    for name, amount in need.items():
        if amount <= 0:
            continue
        biggest = max(
            [node.get(name, 0.0) for node in nodes] + [r.get(name, 0.0) for _, r, _ in node_types or []]
        )
        if biggest < amount:
            label = name.removeprefix("accelerator_type:")
            if name.startswith("accelerator_type:"):
                lacking.append(f"no node has accelerator type {label!r}")
            elif name == "GPU":
                lacking.append(
                    f"each worker needs {amount:g} GPU and the cluster has {totals.get(name, 0):g} GPUs"
                )
            else:
                lacking.append(
                    f"each worker needs {describe_resources({name: amount})} and no node has that much "
                    f"(largest: {describe_resources({name: biggest})})"
                )
    if not lacking:
        lacking.append(
            f"{workers} workers need {describe_resources({k: v * workers for k, v in need.items()})} in all"
        )
    autoscaler = (
        "its autoscaler's node types: "
        + "; ".join(f"{n} x{m} ({describe_resources(r)})" for n, r, m in node_types)
        if node_types
        else "no autoscaler node types reported"
    )
    return (
        f"the cluster cannot place {workers} worker(s) x {{{describe_resources(need)}}}: "
        f"{'; '.join(lacking)}. "
        f"It has {len(nodes)} node(s) ({describe_resources(totals)} in all); {autoscaler}"
    )


def _shortfall_fix(cfg: TrainConfig, need: dict[str, float]) -> str:
    if "GPU" in need:
        return (
            "run on a cluster with GPUs (RAY_ADDRESS), add a GPU node type, or set scaling.use_gpu=false "
            "for a CPU run"
        )
    return "lower scaling.num_workers / cpus_per_worker / memory_per_worker_gb, or add nodes"
