"""An evaluation's summary, its HTML report and its MLflow run, built from per-sample records.

A record is what the eval job produces for one sample (``key``, ``task``, ``category``,
``instruction``, ``metrics`` {name: float}, ``judge`` {criterion: mean score}, ``judge_error`` ...).

:func:`summarize` averages the metrics and judge scores over all samples, per task and per
category, and says how often an edit beats the copy baseline (the unchanged source) on MSE.
:func:`write_report` writes a self-contained ``report/index.html`` (inline CSS, no script, nothing
fetched from the internet) that plays source, edit and reference side by side.
:func:`log_eval_run` records all of it as one MLflow run.

Choices:

* An identical pair has an infinite PSNR; every ``*psnr`` value is capped at :data:`PSNR_CAP_DB`
  (100 dB, the usual cap) before it is averaged, shown or logged, so an exact edit counts as
  excellent rather than vanishing from the mean. Any other non-finite value is skipped.
* Records without a category are grouped under :data:`NO_CATEGORY` (a real category of that name
  shares the group).
* Every mapping in the summary has a fixed key order (groups and metric names sorted), so the same
  records always give byte-identical JSON and HTML.
"""

from __future__ import annotations

import contextlib
import hashlib
import html
import json
import logging
import math
import os
import posixpath
import re
import shutil
import tempfile
import time
import urllib.parse
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

from sama import storage
from sama.eval.metrics import PSNR_CAP_DB  # one cap, shared with MetricSuite
from sama.redaction import redact_config

log = logging.getLogger(__name__)

__all__ = [
    "NO_CATEGORY",
    "PSNR_CAP_DB",
    "REPORT_FILE",
    "eval_metrics",
    "log_eval_run",
    "render_html",
    "sample_row",
    "sample_table",
    "summarize",
    "write_report",
]

NO_CATEGORY = "uncategorized"
# Where the report lives under the eval's output URI; media paths are relative to this directory.
REPORT_DIR = "report"
REPORT_FILE = f"{REPORT_DIR}/index.html"

_VIDEO_SUFFIXES = (".mp4", ".webm")
_IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".gif")
_MEDIA_ROLES = ("source", "edit", "reference")

# MLflow's limits: a param value of 6000 characters, a key of 250, 100 params and 1000 metrics
# per log_batch call.
_MAX_PARAM_CHARS = 6000
_MAX_KEY_CHARS = 250
_PARAM_BATCH = 100
_METRIC_BATCH = 1000
# A task or category name inside a metric key; longer names are cut and given a hash suffix.
_MAX_SEGMENT_CHARS = 80
_UNSAFE_SEGMENT = re.compile(r"[^A-Za-z0-9_.\-]")
_UNSAFE_KEY = re.compile(r"[^A-Za-z0-9_.\-/ ]")


# ----------------------------------------------------------------------------------------------
# Values


def _finite(name: str, value: Any) -> float | None:
    """``value`` as a float fit for JSON and MLflow: PSNR's infinity capped, anything else that is
    not a finite number dropped (None)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    number = float(value)
    if name.endswith("psnr") and number == math.inf:
        return PSNR_CAP_DB
    if not math.isfinite(number):
        return None
    if name.endswith("psnr"):
        return min(number, PSNR_CAP_DB)
    return number


def _metrics(record: Mapping[str, Any]) -> dict[str, float]:
    """The record's metrics, made finite (see :func:`_finite`), by name."""
    values = {}
    for name, value in sorted((record.get("metrics") or {}).items()):
        number = _finite(str(name), value)
        if number is not None:
            values[str(name)] = number
    return values


def _judge(record: Mapping[str, Any]) -> dict[str, float]:
    """The record's judge scores as ``judge_<criterion>``, finite ones only."""
    values = {}
    for criterion, value in sorted((record.get("judge") or {}).items()):
        number = _finite("", value)
        if number is not None:
            values[f"judge_{criterion}"] = number
    return values


def _category(record: Mapping[str, Any]) -> str:
    category = record.get("category")
    return NO_CATEGORY if category is None or category == "" else str(category)


def _task(record: Mapping[str, Any]) -> str:
    if "task" not in record or "key" not in record:
        raise ValueError(f"an eval record needs a key and a task, got keys {sorted(record)}")
    return str(record["task"])


def _order(record: Mapping[str, Any]) -> tuple[str, str, str]:
    return (_task(record), _category(record), str(record["key"]))


def sample_row(record: Mapping[str, Any], metric_names: Sequence[str], criteria: Sequence[str]) -> dict:
    """One record as a flat row: key, input, task, category, dataset, media, instruction, each of
    ``metric_names`` (finite, PSNR capped; None when absent), ``judge_<c>`` for each of
    ``criteria``, judge_error, edit_seconds and reference. The shape of the MLflow table."""
    metrics = _metrics(record)
    judge = _judge(record)
    row: dict[str, Any] = {
        "key": str(record["key"]),
        "input": record.get("input"),
        "task": _task(record),
        "category": record.get("category"),
        "dataset": record.get("dataset"),
        "media": record.get("media"),
        "instruction": record.get("instruction"),
    }
    for name in metric_names:
        row[name] = metrics.get(name)
    for criterion in criteria:
        row[f"judge_{criterion}"] = judge.get(f"judge_{criterion}")
    row["judge_error"] = record.get("judge_error")
    row["edit_seconds"] = _finite("", record.get("edit_seconds"))
    row["reference"] = record.get("reference")
    return row


def _columns(records: Iterable[Mapping[str, Any]]) -> tuple[list[str], list[str]]:
    """Every metric name and every judge criterion found in ``records``, sorted."""
    metric_names: set[str] = set()
    criteria: set[str] = set()
    for record in records:
        metric_names.update(str(name) for name in (record.get("metrics") or {}))
        criteria.update(str(name) for name in (record.get("judge") or {}))
    return sorted(metric_names), sorted(criteria)


# ----------------------------------------------------------------------------------------------
# Summary


def _group(records: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
    """``{"count", "means", "counts", "copy_compared", "edit_beats_copy"}`` of a group of records.

    ``means`` holds every metric and ``judge_<criterion>`` that at least one record has, averaged
    over the records that have it (``counts`` says how many). ``edit_beats_copy`` is the fraction of
    the ``copy_compared`` records (those with both ``mse`` and ``copy_mse``) whose edit has the lower
    MSE; None when there are none.
    """
    sums: dict[str, list[float]] = {}
    beats = compared = 0
    for record in records:
        metrics = _metrics(record)
        for name, value in {**metrics, **_judge(record)}.items():
            sums.setdefault(name, []).append(value)
        if "mse" in metrics and "copy_mse" in metrics:
            compared += 1
            beats += metrics["mse"] < metrics["copy_mse"]
    names = sorted(sums)
    return {
        "count": len(records),
        "means": {name: math.fsum(sums[name]) / len(sums[name]) for name in names},
        "counts": {name: len(sums[name]) for name in names},
        "copy_compared": compared,
        "edit_beats_copy": beats / compared if compared else None,
    }


def summarize(records: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
    """The summary of an evaluation (JSON-ready: no NaN or infinity; fixed key order).

    ``{"counts": {"samples", "with_reference", "judged", "judge_failed"}, "overall": group,
    "per_task": {task: group}, "per_category": {category: group}, "psnr_cap_db": 100.0}`` where a
    group is described in :func:`_group`. ``judged`` counts records with at least one judge score,
    ``judge_failed`` those with a ``judge_error``. Tasks and categories are sorted by name; records
    without a category are under :data:`NO_CATEGORY`.
    """
    records = list(records)
    by_task: dict[str, list[Mapping[str, Any]]] = {}
    by_category: dict[str, list[Mapping[str, Any]]] = {}
    for record in records:
        by_task.setdefault(_task(record), []).append(record)
        by_category.setdefault(_category(record), []).append(record)
    return {
        "counts": {
            "samples": len(records),
            "with_reference": sum(bool(r.get("reference")) for r in records),
            "judged": sum(bool(_judge(r)) for r in records),
            "judge_failed": sum(r.get("judge_error") is not None for r in records),
        },
        "overall": _group(records),
        "per_task": {task: _group(by_task[task]) for task in sorted(by_task)},
        "per_category": {category: _group(by_category[category]) for category in sorted(by_category)},
        "psnr_cap_db": PSNR_CAP_DB,
    }


# ----------------------------------------------------------------------------------------------
# HTML report

_CSS = """
body { font-family: system-ui, sans-serif; margin: 1.5em; color: #222; }
h1 { font-size: 1.4em; } h2 { font-size: 1.2em; margin-top: 1.6em; }
table.summary { border-collapse: collapse; font-size: 0.85em; margin-bottom: 1em; }
table.summary th, table.summary td { border: 1px solid #ccc; padding: 0.25em 0.5em; text-align: right; }
table.summary th:first-child, table.summary td:first-child { text-align: left; }
table.summary th { background: #f2f2f2; }
.sample { border-top: 2px solid #ddd; padding: 0.8em 0; }
.sample .meta { font-size: 0.9em; }
.sample .instruction { font-style: italic; margin: 0.3em 0; white-space: pre-wrap; }
.sample .scores { font-size: 0.8em; color: #444; }
.players { display: flex; gap: 0.6em; margin-top: 0.5em; }
.players figure { margin: 0; flex: 1 1 0; min-width: 0; }
.players video, .players img { width: 100%; height: auto; background: #000; }
.players figcaption { font-size: 0.8em; color: #555; }
.missing { display: flex; align-items: center; justify-content: center; min-height: 6em;
  background: #f4f4f4; color: #888; font-size: 0.9em; }
.error { color: #a00; }
"""


def _fmt(value: Any) -> str:
    if value is None:
        return "\u2014"
    if isinstance(value, float):
        return f"{value:.4g}"
    return html.escape(str(value))


def _summary_table(title: str, groups: Mapping[str, Mapping[str, Any]]) -> str:
    """One table: a row per group, its count, the copy-baseline comparison, then every mean."""
    # Each copy-baseline metric right after the edit's own (mse, copy_mse, psnr, copy_psnr, ...).
    names = sorted(
        {name for group in groups.values() for name in group["means"]},
        key=lambda name: (name.removeprefix("copy_"), name.startswith("copy_")),
    )
    header = "".join(f"<th>{html.escape(name)}</th>" for name in names)
    rows = []
    for label, group in groups.items():
        cells = "".join(f"<td>{_fmt(group['means'].get(name))}</td>" for name in names)
        beats = group["edit_beats_copy"]
        copy = "\u2014" if beats is None else f"{beats:.0%} of {group['copy_compared']}"
        rows.append(f"<tr><td>{html.escape(label)}</td><td>{group['count']}</td><td>{copy}</td>{cells}</tr>")
    return (
        f'<h2>{html.escape(title)}</h2>\n<table class="summary"><tr><th></th><th>samples</th>'
        f"<th>edit beats copy (mse)</th>{header}</tr>\n" + "\n".join(rows) + "\n</table>"
    )


def _media_href(relpath: str) -> str:
    """``relpath`` (relative to the report directory, where ``index.html`` is) as a URL.

    Raises:
        ValueError: the path is absolute, carries a scheme or climbs out of the report directory
            (whose copy in MLflow would then lack the file).
    """
    text = str(relpath).replace("\\", "/")
    normal = posixpath.normpath(text)
    if "://" in text or text.startswith("/") or normal == ".." or normal.startswith("../"):
        raise ValueError(f"report media {relpath!r} must be a path inside the report directory")
    return urllib.parse.quote(normal)


def _player(role: str, relpath: str | None) -> str:
    if relpath is None:
        body = f'<div class="missing">no {role}</div>'
    else:
        href = html.escape(_media_href(relpath), quote=True)
        suffix = posixpath.splitext(str(relpath))[1].lower()
        if suffix in _VIDEO_SUFFIXES:
            body = f'<video src="{href}" controls loop muted playsinline preload="metadata"></video>'
        elif suffix in _IMAGE_SUFFIXES:
            body = f'<img src="{href}" alt="{html.escape(role)}" loading="lazy">'
        else:
            raise ValueError(
                f"report media {relpath!r} is neither a video nor an image (known suffixes: "
                f"{', '.join(_VIDEO_SUFFIXES + _IMAGE_SUFFIXES)})"
            )
    return f"<figure>{body}<figcaption>{html.escape(role)}</figcaption></figure>"


def _sample_section(record: Mapping[str, Any], paths: Mapping[str, str]) -> str:
    metrics = _metrics(record)
    judge = _judge(record)
    scores = " &middot; ".join(f"{html.escape(name)} {_fmt(value)}" for name, value in metrics.items())
    judged = " &middot; ".join(f"{html.escape(name)} {_fmt(value)}" for name, value in judge.items())
    error = record.get("judge_error")
    parts = [
        f'<div class="sample" id="{html.escape(str(record["key"]), quote=True)}">',
        f'<div class="meta"><b>{html.escape(str(record["key"]))}</b> &middot; task '
        f"{html.escape(_task(record))} &middot; category {html.escape(_category(record))}"
        f"{' &middot; ' + html.escape(str(record['dataset'])) if record.get('dataset') else ''}</div>",
        f'<div class="instruction">{html.escape(str(record.get("instruction") or ""))}</div>',
        f'<div class="scores">metrics: {scores or "none"}</div>',
        f'<div class="scores">judge: {judged or "none"}</div>',
    ]
    if error is not None:
        parts.append(f'<div class="scores error">judge error: {html.escape(str(error))}</div>')
    players = "".join(_player(role, paths.get(role)) for role in _MEDIA_ROLES)
    parts.append(f'<div class="players">{players}</div></div>')
    return "\n".join(parts)


def render_html(
    records: Sequence[Mapping[str, Any]],
    summary: Mapping[str, Any],
    media: Mapping[str, Mapping[str, str]],
    title: str = "SAMA evaluation",
) -> str:
    """The report page (see :func:`write_report`) as text."""
    by_key = {str(record["key"]): record for record in records}
    unknown = sorted(set(map(str, media)) - set(by_key))
    if unknown:
        raise ValueError(f"report media for keys with no record: {unknown[:5]}")
    for key, paths in media.items():
        missing = [role for role in ("source", "edit") if not paths.get(role)]
        if missing:
            raise ValueError(f"report media of {key!r} lacks {', '.join(missing)}")
    reported = sorted((by_key[str(key)] for key in media), key=_order)
    counts = summary["counts"]
    sections = "\n".join(_sample_section(record, media[str(record["key"])]) for record in reported)
    return f"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>{html.escape(title)}</title>
<style>{_CSS}</style></head>
<body>
<h1>{html.escape(title)}</h1>
<p>{counts["samples"]} samples, {counts["with_reference"]} with a reference, {counts["judged"]} judged,
{counts["judge_failed"]} judge failures. PSNR of identical pairs is capped at {_fmt(summary["psnr_cap_db"])}
dB.
"Edit beats copy": the share of samples whose edit has a lower MSE to the reference than the unchanged
source has.</p>
{_summary_table("Overall", {"all": summary["overall"]})}
{_summary_table("Per task", summary["per_task"])}
{_summary_table("Per category", summary["per_category"])}
<h2>Samples ({len(reported)})</h2>
{sections}
</body></html>
"""


def write_report(
    output_uri: str,
    records: Sequence[Mapping[str, Any]],
    summary: Mapping[str, Any],
    media: Mapping[str, Mapping[str, str]],
    title: str = "SAMA evaluation",
) -> str:
    """Write ``report/index.html`` under ``output_uri`` (local or ``s3://``); returns its URI.

    ``media`` maps a record's key to ``{"source", "edit", "reference" (optional)}``: paths relative
    to the report directory ``<output_uri>/report/`` (``media/k.edit.mp4``), of mp4 (played by
    ``<video>``) or png/jpg (shown by ``<img>``) files already written there, so the report
    directory is complete on its own (it is what :func:`log_eval_run` uploads).
    The page holds the summary tables (overall, per task, per category, with the copy-baseline
    column) and, for every record with media, in (task, category, key) order, its key, task,
    category, instruction, metrics, judge scores and the three players side by side ("no
    reference" where there is none). Every string from a record is HTML-escaped.

    Raises:
        ValueError: a media key has no record, lacks a source or an edit, has a path that leaves
            the report directory or is neither a video nor an image.
    """
    page = render_html(records, summary, media, title=title)
    uri = storage.join(output_uri, REPORT_FILE)
    storage.write_text(uri, page)
    return uri


# ----------------------------------------------------------------------------------------------
# MLflow


def _segment(name: str) -> str:
    """A task or category name as one segment of an MLflow metric key (its allowed characters;
    never ``.`` or ``..``, which MLflow refuses as path-like)."""
    safe = _UNSAFE_SEGMENT.sub("_", name) or "_"
    if set(safe) == {"."}:
        safe = safe.replace(".", "_")
    if len(safe) > _MAX_SEGMENT_CHARS:
        safe = safe[:_MAX_SEGMENT_CHARS] + "-" + hashlib.sha1(name.encode()).hexdigest()[:8]
    return safe


def _segments(names: Iterable[str]) -> dict[str, str]:
    """Each name's key segment; names that would share one (``"a b"`` and ``"a_b"``) and were
    changed get a hash of the original appended, so no group's metrics overwrite another's."""
    names = sorted(set(names))
    plain = {name: _segment(name) for name in names}
    taken: dict[str, int] = {}
    for segment in plain.values():
        taken[segment] = taken.get(segment, 0) + 1
    return {
        name: (
            f"{segment}-{hashlib.sha1(name.encode()).hexdigest()[:8]}"
            if taken[segment] > 1 and segment != name
            else segment
        )
        for name, segment in plain.items()
    }


def _key(name: str) -> str:
    """A metric name (``mse``, ``judge_if``) fit for an MLflow key."""
    return _UNSAFE_KEY.sub("_", name)[:_MAX_KEY_CHARS]


def eval_metrics(summary: Mapping[str, Any]) -> dict[str, float]:
    """The summary as flat MLflow metrics.

    ``eval/<name>`` (overall means), ``eval/edit_beats_copy``, ``eval/count/<count>`` (samples,
    with_reference, judged, judge_failed), and per group ``eval/task/<task>/<name>`` and
    ``eval/category/<category>/<name>`` with their ``count`` and ``edit_beats_copy``. Task and
    category names are reduced to letters, digits, ``_ . -`` (others become ``_``).
    """
    metrics: dict[str, float] = {}

    def add_group(prefix: str, group: Mapping[str, Any]) -> None:
        for name, value in group["means"].items():
            metrics[f"{prefix}/{_key(name)}"] = float(value)
        if group["edit_beats_copy"] is not None:
            metrics[f"{prefix}/edit_beats_copy"] = float(group["edit_beats_copy"])

    add_group("eval", summary["overall"])
    for name, value in summary["counts"].items():
        metrics[f"eval/count/{_key(name)}"] = float(value)
    for level, groups in (("task", summary["per_task"]), ("category", summary["per_category"])):
        segments = _segments(groups)
        for label, group in groups.items():
            prefix = f"eval/{level}/{segments[label]}"
            metrics[f"{prefix}/count"] = float(group["count"])
            add_group(prefix, group)
    return {key[:_MAX_KEY_CHARS]: value for key, value in metrics.items()}


def sample_table(records: Sequence[Mapping[str, Any]]) -> dict[str, list]:
    """The per-sample table as columns (see :func:`sample_row`), rows in (task, category, key) order."""
    metric_names, criteria = _columns(records)
    rows = [sample_row(record, metric_names, criteria) for record in sorted(records, key=_order)]
    columns = list(sample_row({"key": "", "task": ""}, metric_names, criteria))
    return {column: [row[column] for row in rows] for column in columns}


@contextlib.contextmanager
def _local_report_dir(report_dir: str):
    """``report_dir`` as a local directory: itself when local, else a temporary copy of every
    object under the ``s3://`` prefix (removed afterwards)."""
    local = storage.local_path(report_dir)
    if local is not None:
        if not os.path.isdir(local):
            raise FileNotFoundError(f"the report directory {local} does not exist")
        yield local
        return
    scratch = tempfile.mkdtemp(prefix="sama-eval-report-")
    try:
        base = storage.parse(report_dir).path
        for uri in storage.list_files(report_dir):
            relative = storage.parse(uri).path[len(base) :].lstrip("/")
            destination = os.path.join(scratch, *relative.split("/"))
            os.makedirs(os.path.dirname(destination), exist_ok=True)
            with storage.open_read(uri) as source, open(destination, "wb") as target:
                shutil.copyfileobj(source, target, length=8 * 1024 * 1024)
        yield scratch
    finally:
        shutil.rmtree(scratch, ignore_errors=True)


def log_eval_run(
    *,
    tracking_uri: str,
    experiment: str,
    run_name: str,
    params: Mapping[str, Any],
    records: Sequence[Mapping[str, Any]],
    summary: Mapping[str, Any],
    report_dir: str,
    tags: Mapping[str, str] | None = None,
) -> str:
    """Record an evaluation as one new MLflow run; returns its id.

    The run (created in ``experiment``, made if missing, through :class:`sama.tracking.Tracker`
    so a local SQLite store keeps its artifacts beside the database) gets: ``params`` (a flat,
    already-redacted dict, passed through :func:`sama.redaction.redact_config` again, as the
    tags are; values stringified and cut to MLflow's 6000 characters; nothing else, and nothing
    from the environment, is logged as a param), the metrics of :func:`eval_metrics`
    at step 0, the per-sample table ``eval/samples.json`` (``log_table``: one row per record,
    columns of :func:`sample_row`), ``eval/summary.json`` and the report directory (``index.html``
    and its media) under ``report/``. ``report_dir`` is a local directory, or an ``s3://`` prefix
    that is first copied to a temporary directory.

    Writes are synchronous: a store that cannot take them raises (after marking the run FAILED
    when it was created), and the caller decides whether that fails the job.
    """
    from mlflow.entities import Metric, Param

    from sama import tracking

    if not tracking_uri:
        raise ValueError("log_eval_run needs a tracking URI")
    summary_text = json.dumps(summary, indent=2, allow_nan=False)
    table = sample_table(records)
    metrics = eval_metrics(summary)
    # Redacted again here (callers pass redacted params): MLflow params and tags are readable by
    # every user of the server, so this function does not rely on its callers.
    flat_params = [
        Param(_key(str(key)), str(value)[:_MAX_PARAM_CHARS])
        for key, value in sorted(redact_config(dict(params)).items())
    ]
    tracker = tracking.Tracker(
        tracking.TrackingConfig(uri=tracking_uri, experiment=experiment, system_metrics=False),
        enabled=True,
    )
    run_id = tracker.start(run_name, tags=redact_config(dict(tags or {})))
    client = tracker.client
    status = "FAILED"
    try:
        # Artifact writes resolve a proxied (mlflow-artifacts:) store through MLflow's global URI:
        # the tracker points it at this store for the block and restores it afterwards.
        with tracker._global_uri(), _local_report_dir(report_dir) as local_report:
            for start in range(0, len(flat_params), _PARAM_BATCH):
                client.log_batch(run_id, params=flat_params[start : start + _PARAM_BATCH])
            now = int(time.time() * 1000)
            batch = [Metric(key, value, now, 0) for key, value in metrics.items()]
            for start in range(0, len(batch), _METRIC_BATCH):
                client.log_batch(run_id, metrics=batch[start : start + _METRIC_BATCH])
            client.log_table(run_id, data=table, artifact_file="eval/samples.json")
            client.log_text(run_id, summary_text, "eval/summary.json")
            client.log_artifacts(run_id, local_report, REPORT_DIR)
        status = "FINISHED"
    finally:
        tracker.end(status)
    log.info("logged the evaluation to MLflow run %s (%s)", run_id, storage.redact(tracking_uri))
    return run_id
