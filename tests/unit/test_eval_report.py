"""The eval summary, HTML report and MLflow run (sama.eval.report) on hand-made records."""

from __future__ import annotations

import html
import json
import math
import os
import re

import pytest

from sama.eval import report


def _record(
    key, task, category, metrics, judge=None, judge_error=None, instruction="edit it", reference=True
):
    return {
        "key": key,
        "input": f"in-{key}",
        "task": task,
        "category": category,
        "dataset": "bench",
        "media": "video",
        "instruction": instruction,
        "frames": 5,
        "height": 32,
        "width": 32,
        "metrics": metrics,
        "judge": judge or {},
        "judge_runs": [],
        "judge_error": judge_error,
        "edit_seconds": 1.5,
        "reference": reference,
    }


def _records():
    return [
        # An identical pair: infinite PSNR (capped at 100 dB), edit no better than copy (equal MSE).
        _record(
            "a",
            "edit",
            "style",
            {"mse": 0.0, "psnr": math.inf, "copy_mse": 0.0, "copy_psnr": math.inf, "clip_score": 30.0},
            judge={"if": 8.0, "vq": 9.0},
        ),
        _record(
            "b",
            "edit",
            "add",
            {"mse": 10.0, "psnr": 38.0, "copy_mse": 40.0, "copy_psnr": 32.0, "clip_score": 20.0},
            judge={"if": 6.0, "vq": 7.0},
        ),
        # No category, no reference metrics, a failed judge.
        _record(
            "c",
            "pretext",
            None,
            {"clip_score": 25.0},
            judge_error="judge timed out",
            instruction='<script>alert("x")</script> & more',
            reference=False,
        ),
        # Edit worse than copy; a NaN metric is skipped.
        _record(
            "d",
            "edit",
            "style",
            {"mse": 50.0, "psnr": 31.0, "copy_mse": 20.0, "copy_psnr": 35.0, "ssim": float("nan")},
            judge={"if": 10.0},
        ),
    ]


def test_summary_counts_means_and_copy_baseline():
    summary = report.summarize(_records())
    assert summary["counts"] == {"samples": 4, "with_reference": 3, "judged": 3, "judge_failed": 1}
    overall = summary["overall"]
    assert overall["count"] == 4
    assert overall["means"] == pytest.approx(
        {
            "clip_score": (30 + 20 + 25) / 3,
            "copy_mse": (0 + 40 + 20) / 3,
            "copy_psnr": (100 + 32 + 35) / 3,
            "judge_if": (8 + 6 + 10) / 3,
            "judge_vq": (9 + 7) / 2,
            "mse": (0 + 10 + 50) / 3,
            "psnr": (100 + 38 + 31) / 3,
        }
    )
    assert overall["counts"]["psnr"] == 3 and overall["counts"]["judge_vq"] == 2
    assert "ssim" not in overall["means"]  # its only value was NaN
    # Only b's edit has a lower MSE than its copy (a ties, d loses).
    assert overall["copy_compared"] == 3 and overall["edit_beats_copy"] == pytest.approx(1 / 3)
    assert list(summary["per_task"]) == ["edit", "pretext"]
    edit = summary["per_task"]["edit"]
    assert edit["count"] == 3 and edit["means"]["mse"] == pytest.approx(20.0)
    pretext = summary["per_task"]["pretext"]
    assert pretext == {
        "count": 1,
        "means": {"clip_score": 25.0},
        "counts": {"clip_score": 1},
        "copy_compared": 0,
        "edit_beats_copy": None,
    }
    assert list(summary["per_category"]) == sorted(["add", "style", report.NO_CATEGORY])
    style = summary["per_category"]["style"]
    assert style["means"]["psnr"] == pytest.approx((100 + 31) / 2) and style["edit_beats_copy"] == 0.0
    assert summary["per_category"]["add"]["edit_beats_copy"] == 1.0
    assert summary["per_category"][report.NO_CATEGORY]["count"] == 1
    # Strict JSON (no NaN/inf) and deterministic whatever the record order.
    text = json.dumps(summary, allow_nan=False)
    assert json.dumps(report.summarize(list(reversed(_records()))), allow_nan=False) == text


def test_summary_of_no_records():
    summary = report.summarize([])
    assert summary["counts"]["samples"] == 0 and summary["overall"]["means"] == {}
    assert summary["per_task"] == {} and summary["overall"]["edit_beats_copy"] is None


def _media(tmp_path, keys_with_reference, keys_without):
    """Write small media files under tmp_path/report/media; returns the media map (paths relative
    to the report directory, as the eval job gives them)."""
    media = {}
    for key in [*keys_with_reference, *keys_without]:
        paths = {"source": f"media/{key}_source.mp4", "edit": f"media/{key}_edit.mp4"}
        if key in keys_with_reference:
            paths["reference"] = f"media/{key}_reference.png"
        for relpath in paths.values():
            (tmp_path / "report" / relpath).parent.mkdir(parents=True, exist_ok=True)
            (tmp_path / "report" / relpath).write_bytes(b"not really media")
        media[key] = paths
    return media


def test_report_html_escapes_and_plays_three_side_by_side(tmp_path):
    records = _records()
    summary = report.summarize(records)
    media = _media(tmp_path, ["a", "b", "d"], ["c"])
    uri = report.write_report(str(tmp_path), records, summary, media)
    assert uri == str(tmp_path / "report" / "index.html")
    page = (tmp_path / "report" / "index.html").read_text()
    # The untrusted instruction appears only escaped.
    assert "<script>" not in page
    assert html.escape('<script>alert("x")</script> & more') in page
    assert "http://" not in page and "https://" not in page  # nothing fetched from the internet
    # Samples in (task, category, key) order: edit/add/b, edit/style/a, edit/style/d, pretext/none/c.
    sections = re.findall(r'<div class="sample" id="([^"]+)">', page)
    assert sections == ["b", "a", "d", "c"]
    blocks = page.split('<div class="sample"')[1:]
    for key, block in zip(sections, blocks, strict=True):
        sources = re.findall(r'<(?:video|img) src="([^"]+)"', block)
        expected = 3 if key != "c" else 2
        assert len(sources) == expected
        for source in sources:
            # Relative to index.html, and the file is there.
            assert not source.startswith("/") and os.path.isfile(tmp_path / "report" / source)
        assert block.count("<video") == 2 and "controls loop muted playsinline" in block
    assert "no reference" in blocks[3] and "no reference" not in blocks[0]
    assert 'src="media/b_reference.png"' in blocks[0]
    assert "judge timed out" in blocks[3]
    # The summary tables with the copy-baseline column.
    assert "Per task" in page and "Per category" in page and "edit beats copy" in page
    assert "33% of 3" in page  # overall edit_beats_copy
    assert "<th>mse</th><th>copy_mse</th>" in page  # each copy baseline beside the edit's metric


def test_report_refuses_bad_media(tmp_path):
    records = _records()
    summary = report.summarize(records)
    with pytest.raises(ValueError, match="no record"):
        report.write_report(str(tmp_path), records, summary, {"zz": {"source": "a.mp4", "edit": "b.mp4"}})
    for outside in ("../x.mp4", "media/../../x.mp4", "/abs/x.mp4", "s3://bucket/x.mp4"):
        with pytest.raises(ValueError, match="inside the report directory"):
            report.write_report(str(tmp_path), records, summary, {"a": {"source": outside, "edit": "b.mp4"}})
    with pytest.raises(ValueError, match="neither a video nor an image"):
        report.write_report(str(tmp_path), records, summary, {"a": {"source": "a.txt", "edit": "b.mp4"}})
    with pytest.raises(ValueError, match="lacks edit"):
        report.write_report(str(tmp_path), records, summary, {"a": {"source": "media/x.mp4"}})
    assert not (tmp_path / "report" / "index.html").exists()


def test_metric_names_are_sanitized_without_collisions():
    records = [
        _record("a", "edit", "object removal", {"mse": 1.0}),
        _record("b", "edit", "object_removal", {"mse": 3.0}),
        _record("c", "edit", "..", {"mse": 5.0}),
    ]
    metrics = report.eval_metrics(report.summarize(records))
    assert metrics["eval/category/object_removal/mse"] == 3.0
    spaced = [k for k in metrics if k.startswith("eval/category/object_removal-") and k.endswith("/mse")]
    assert len(spaced) == 1 and metrics[spaced[0]] == 1.0
    assert metrics["eval/category/__/mse"] == 5.0
    assert all(re.fullmatch(r"[A-Za-z0-9_.\-/]+", key) for key in metrics)


def test_log_eval_run_into_a_local_store(tmp_path, monkeypatch):
    pytest.importorskip("mlflow")
    from mlflow import MlflowClient

    # A run that sets MLflow's global URI leaves nothing behind for other tests.
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "unset")
    monkeypatch.delenv("MLFLOW_TRACKING_URI")
    records = _records()
    summary = report.summarize(records)
    output = tmp_path / "out"
    media = _media(output, ["a", "b", "d"], ["c"])
    report.write_report(str(output), records, summary, media)
    tracking_uri = f"sqlite:///{tmp_path / 'mlruns' / 'mlflow.db'}"
    (tmp_path / "mlruns").mkdir()
    run_id = report.log_eval_run(
        tracking_uri=tracking_uri,
        experiment="sama-eval",
        run_name="eval-1",
        params={"eval.model": "s3://bucket/export", "eval.long": "x" * 7000, "eval.samples": 4},
        records=records,
        summary=summary,
        report_dir=str(output / "report"),
        tags={"stage": "1"},
    )
    client = MlflowClient(tracking_uri)
    run = client.get_run(run_id)
    assert run.info.status == "FINISHED" and run.info.run_name == "eval-1"
    assert run.data.tags["stage"] == "1"
    params = run.data.params
    assert params["eval.model"] == "s3://bucket/export" and params["eval.samples"] == "4"
    assert len(params["eval.long"]) == 6000
    metrics = run.data.metrics
    assert metrics["eval/mse"] == pytest.approx(20.0)
    assert metrics["eval/psnr"] == pytest.approx((100 + 38 + 31) / 3)
    assert metrics["eval/judge_if"] == pytest.approx(8.0)
    assert metrics["eval/edit_beats_copy"] == pytest.approx(1 / 3)
    assert metrics["eval/count/samples"] == 4 and metrics["eval/count/judge_failed"] == 1
    assert metrics["eval/task/edit/mse"] == pytest.approx(20.0)
    assert metrics["eval/task/pretext/clip_score"] == pytest.approx(25.0)
    assert metrics["eval/task/pretext/count"] == 1
    assert metrics["eval/category/style/psnr"] == pytest.approx(65.5)
    assert metrics["eval/category/add/edit_beats_copy"] == 1.0
    assert metrics[f"eval/category/{report.NO_CATEGORY}/clip_score"] == pytest.approx(25.0)

    download = tmp_path / "download"
    download.mkdir()
    table_path = client.download_artifacts(run_id, "eval/samples.json", str(download))
    table = json.loads(open(table_path).read())
    rows = [dict(zip(table["columns"], row, strict=True)) for row in table["data"]]
    assert [row["key"] for row in rows] == ["b", "a", "d", "c"]
    by_key = {row["key"]: row for row in rows}
    assert by_key["a"]["psnr"] == 100.0 and by_key["c"]["mse"] is None
    assert by_key["c"]["judge_error"] == "judge timed out" and by_key["c"]["category"] is None
    assert by_key["b"]["judge_vq"] == 7.0 and by_key["c"]["instruction"].startswith("<script>")
    summary_path = client.download_artifacts(run_id, "eval/summary.json", str(download))
    assert json.loads(open(summary_path).read()) == json.loads(json.dumps(summary))
    page = client.download_artifacts(run_id, "report/index.html", str(download))
    assert "Per category" in open(page).read()
    media_files = {os.path.basename(a.path) for a in client.list_artifacts(run_id, "report/media")}
    assert {"b_source.mp4", "b_edit.mp4", "b_reference.png", "c_edit.mp4"} <= media_files


def test_log_eval_run_marks_the_run_failed_when_a_write_fails(tmp_path, monkeypatch):
    pytest.importorskip("mlflow")
    from mlflow import MlflowClient

    monkeypatch.setenv("MLFLOW_TRACKING_URI", "unset")
    monkeypatch.delenv("MLFLOW_TRACKING_URI")
    records = _records()
    tracking_uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    with pytest.raises(FileNotFoundError, match="report directory"):
        report.log_eval_run(
            tracking_uri=tracking_uri,
            experiment="sama-eval",
            run_name="eval-missing-report",
            params={},
            records=records,
            summary=report.summarize(records),
            report_dir=str(tmp_path / "no-such-report"),
        )
    client = MlflowClient(tracking_uri)
    experiment = client.get_experiment_by_name("sama-eval")
    (run,) = client.search_runs([experiment.experiment_id])
    assert run.info.status == "FAILED" and run.info.run_name == "eval-missing-report"
