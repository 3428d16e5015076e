"""``sama eval``: edit held-out samples or benchmark rows with a model, measure and report, on Ray Data.

Driver (:func:`pipelines.common.run_job`): check the data, the model and the output, take the
output's lease, list one unit per held-out shard or per ``rows_per_unit`` manifest rows not yet
covered by a completion marker, and run them on a pool of actors that each load the model, the
metric models and the judge client once (one GPU each when the cluster has GPUs). Actors run
``sama.eval.job.process_unit``. Then, from every marker (so a resumed run reports the whole
evaluation, not only what it added):

* ``results.jsonl``: one record per evaluated sample, sorted by key;
* ``metrics.json``: the summary (:func:`sama.eval.report.summarize`: overall, per task, per
  category, the copy baseline);
* ``report/index.html`` with ``report/media/``: source | edit | reference of up to
  ``report.max_samples`` samples (task, category, key order);
* an MLflow run (experiment ``tracking.experiment``, tag ``sama.kind=eval``) with the metrics,
  the per-sample table and the report; its id is kept in ``eval_run.json``, and a rerun that
  evaluated nothing new does not log another.

A rerun skips evaluated samples (their markers) and re-edits nothing; ``--overwrite`` starts over.
"""

from __future__ import annotations

import json
import logging
import os
import tempfile

from pipelines import common
from sama import config, preflight, schema, storage
from sama.eval import report
from sama.eval.job import (
    MLFLOW_MODEL_PREFIX,
    EvalConfig,
    Evaluator,
    check_data,
    eval_tracking_uri,
    list_eval_units,
    model_name_version,
)
from sama.prep import ledger

log = logging.getLogger(__name__)

RESULTS_FILE = "results.jsonl"
METRICS_FILE = "metrics.json"
RUN_FILE = "eval_run.json"


def check_model(cfg: EvalConfig) -> str:
    """The model exists: a registered version, or an export directory with its manifest."""
    from sama.pipeline_edit import PIPELINE_FILE, ModelDirectoryError, parse_manifest

    uri = cfg.model
    if uri.startswith(MLFLOW_MODEL_PREFIX):
        import mlflow

        name, version = model_name_version(uri)
        tracking_uri = eval_tracking_uri(cfg.tracking)
        registry = cfg.tracking.registry_uri or tracking_uri
        client = mlflow.MlflowClient(tracking_uri=tracking_uri, registry_uri=registry)
        try:
            found = client.get_model_version(name, version)
        except Exception as exc:
            raise preflight.CheckFailed(
                f"--model {uri}: not found in the registry at {storage.redact(str(registry))} "
                f"({type(exc).__name__})",
                "set MLFLOW_TRACKING_URI (or tracking.uri / tracking.registry_uri) to the store it was "
                "registered in",
            ) from None
        return f"registered model {name} version {found.version}"
    where = storage.redact(uri)
    if not storage.local_path(uri) and not uri.startswith("s3://"):
        return f"{where}: a hub id, checked when the actors load it"
    manifest_uri = storage.join(uri, PIPELINE_FILE)
    fix = "point --model at a training run's export ({run.storage_uri}/{run.name}/export)"
    if not storage.exists(manifest_uri):
        raise preflight.CheckFailed(f"--model {where} has no {PIPELINE_FILE}: not a SAMA export", fix)
    try:
        _, model_config, _ = parse_manifest(storage.read_text(manifest_uri), where)
    except ModelDirectoryError as exc:
        raise preflight.CheckFailed(f"--model {exc}", fix) from None
    preset = model_config.preset if model_config is not None else "unknown"
    return f"SAMA export of a '{preset}' model at {where}"


def run(cfg: EvalConfig, overwrite: bool = False) -> dict:
    """Run the evaluation to completion (or resume it); returns the eval summary (``metrics.json``)
    with ``job`` (the data-job summary), ``report`` and ``mlflow_run_id``."""
    if not cfg.data:
        raise config.ConfigError("data: no data given (use --data SHARDS_OR_MANIFEST)")
    if not cfg.model:
        raise config.ConfigError("model: no model given (use --model DIR or models:/NAME/VERSION)")
    if not cfg.output.uri:
        raise config.ConfigError("output.uri: no output given (use --output URI)")
    try:
        cfg.validate()
    except ValueError as exc:
        raise config.ConfigError(str(exc)) from None
    # The model check reads the export's manifest with the pipeline module, which imports torch
    # and diffusers: imported here, before the checks' deadline starts (on a busy machine the
    # import alone can take longer than a check is given).
    import sama.pipeline_edit  # noqa: F401

    job_summary = common.run_job(
        name="eval",
        cfg=cfg,
        output_uri=cfg.output.uri,
        overwrite=overwrite,
        check_input=lambda: check_data(cfg),
        list_units=lambda done: list_eval_units(cfg, done),
        process=None,
        ray_cfg=cfg.ray,
        what="samples",
        actors=common.ActorPool.of(lambda: Evaluator(cfg), cfg.ray),
        extra_checks=[preflight.Check("model", lambda: check_model(cfg))],
        setup_output=lambda: _forget_previous_run(cfg.output.uri) if overwrite else None,
    )
    return finish(cfg, job_summary)


def _forget_previous_run(output_uri: str) -> None:
    for name in (RESULTS_FILE, METRICS_FILE, RUN_FILE):
        storage.delete(storage.join(output_uri, name))
    storage.delete(storage.join(output_uri, report.REPORT_DIR), recursive=True)


def finish(cfg: EvalConfig, job_summary: ledger.Summary) -> dict:
    """Results, summary, report and MLflow run from every completed unit of the output."""
    output = cfg.output.uri
    markers = ledger.read_markers(output)
    records = sorted((r for m in markers for r in m.records), key=lambda r: r["key"])
    storage.write_text(
        storage.join(output, RESULTS_FILE), "".join(json.dumps(r, sort_keys=True) + "\n" for r in records)
    )
    summary = report.summarize(records)
    summary["rejected"] = job_summary.rejected
    summary["rejected_per_reason"] = job_summary.rejected_per_reason
    storage.write_text(
        storage.join(output, METRICS_FILE), json.dumps(summary, indent=2, sort_keys=True) + "\n"
    )
    with tempfile.TemporaryDirectory(prefix="sama-eval-report-") as local:
        media = _write_report_media(output, markers, records, cfg.report.max_samples, local)
        report.write_report(local, records, summary, media)
        storage.upload_dir(os.path.join(local, report.REPORT_DIR), storage.join(output, report.REPORT_DIR))
        report_uri = storage.join(output, report.REPORT_FILE)
        run_id = _log_run(cfg, job_summary, records, summary, os.path.join(local, report.REPORT_DIR))
    log.info("eval: %d sample(s) evaluated; report %s", len(records), storage.redact(report_uri))
    return {**summary, "job": job_summary, "report": report_uri, "mlflow_run_id": run_id}


def reported_records(records: list[dict], limit: int) -> list[dict]:
    """The records the report shows players for: the first ``limit`` in (task, category, key) order."""
    ordered = sorted(records, key=lambda r: (r["task"], r.get("category") or report.NO_CATEGORY, r["key"]))
    return ordered[:limit]


def _write_report_media(
    output: str, markers: list[ledger.UnitResult], records: list[dict], limit: int, local: str
) -> dict:
    """Copy source / edit / reference of the reported samples out of the eval shards into
    ``<local>/report/media/``; returns key -> {role: path relative to the report}."""
    wanted = {r["key"] for r in reported_records(records, limit)}
    media_dir = os.path.join(local, report.REPORT_DIR, "media")
    os.makedirs(media_dir, exist_ok=True)
    found: dict[str, dict[str, str]] = {}
    for marker in markers:
        for shard in marker.shards:
            if not wanted - set(found):
                return found
            uri = ledger.shard_uri(output, shard)
            for members in schema.iter_members(uri):
                sample = schema.EvalSample.from_members(members)
                if sample.key not in wanted or sample.key in found:
                    continue
                found[sample.key] = _save_media(sample, media_dir)
    return found


def _save_media(sample: schema.EvalSample, media_dir: str) -> dict[str, str]:
    suffix = ".png" if sample.meta.media == "image" else ".mp4"
    paths = {}
    for role, data in (("source", sample.source), ("edit", sample.edit), ("reference", sample.reference)):
        if data is None:
            continue
        name = f"{sample.key}.{role}{suffix}"
        with open(os.path.join(media_dir, name), "wb") as handle:
            handle.write(data)
        paths[role] = f"media/{name}"
    return paths


def _log_run(cfg: EvalConfig, job_summary: ledger.Summary, records, summary, report_dir: str) -> str | None:
    """Log the evaluation as an MLflow run unless tracking is off or this run evaluated nothing
    new since the run recorded in ``eval_run.json``; returns the run id (the recorded one when
    nothing was logged)."""
    tracking_uri = eval_tracking_uri(cfg.tracking)
    run_file = storage.join(cfg.output.uri, RUN_FILE)
    previous = json.loads(storage.read_text(run_file)) if storage.exists(run_file) else None
    if tracking_uri is None:
        return None
    if previous and job_summary.run_samples == 0 and previous.get("samples") == len(records):
        log.info("eval: nothing new since MLflow run %s; not logging another", previous["run_id"])
        return previous["run_id"]
    params = {
        key: storage.redact(value) if isinstance(value, str) else value
        for key, value in config.flatten(cfg).items()
    }
    run_id = report.log_eval_run(
        tracking_uri=tracking_uri,
        experiment=cfg.tracking.experiment,
        run_name=f"eval-{storage.basename(cfg.output.uri)}",
        params=params,
        records=records,
        summary=summary,
        report_dir=report_dir,
        tags={"sama.kind": "eval", "sama.model": storage.redact(cfg.model), **cfg.tracking.tags},
    )
    storage.write_text(run_file, json.dumps({"run_id": run_id, "samples": len(records)}) + "\n")
    return run_id


__all__ = ["check_model", "finish", "run"]
