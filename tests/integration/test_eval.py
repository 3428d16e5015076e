"""End-to-end tests of `sama eval` on the shared local Ray cluster: held-out pair shards and a
benchmark manifest edited by a tiny export, measured, reported and tracked; a killed run resumes
without re-editing what it finished."""

from __future__ import annotations

import csv
import json
import os

import mlflow
import pytest

from pipelines import eval as eval_pipeline
from pipelines import prep_pairs
from sama import config, schema, storage, synthetic
from sama.eval.job import EvalConfig
from sama.prep import ledger
from sama.prep.pairs_job import PrepPairsConfig
from sama.quickstart import CLIP_SECONDS, PAIR_SETTINGS
from tests.integration.killing import kill_after_markers
from tests.integration.ledger_invariants import assert_ledger_invariants

pytestmark = pytest.mark.integration

KINDS = ("recolor", "remove", "add", "style")


@pytest.fixture(scope="module")
def held_out(tmp_path_factory):
    """Four held-out video pairs (one per kind) as prep-pairs shards, one shard per pair, and
    their manifest."""
    root = tmp_path_factory.mktemp("held-out")
    manifest = synthetic.write_edit_pairs(
        str(root / "edits"),
        4,
        seed=4,
        media="video",
        fps=8.0,
        seconds=CLIP_SECONDS,
        sizes=[(48, 64)],
        low_score_every=100,
        kinds=KINDS,
    )
    shards = str(root / "pairs")
    cfg = config.load(
        PrepPairsConfig,
        None,
        [*PAIR_SETTINGS, f'input.manifests=["{manifest}"]', f"output.uri={shards}", "shards.max_samples=1"],
    )
    assert prep_pairs.run(cfg).samples == 4
    return {"shards": shards, "manifest": manifest}


def eval_cfg(model: str, data: list[str], out: str, store: str, *extra: str) -> EvalConfig:
    overrides = [
        f"model={model}",
        f"data={json.dumps(data)}",
        f"output.uri={out}",
        f"tracking.uri=sqlite:///{store}",
        "ray.actors=1",
        "ray.progress_interval_s=1000",
        *extra,
    ]
    return config.load(EvalConfig, None, overrides)


def test_eval_of_held_out_shards_and_a_manifest(ray_cluster, tmp_path, held_out, tiny_edit_export):
    out, store = str(tmp_path / "eval"), str(tmp_path / "mlflow.db")
    data = [held_out["shards"], held_out["manifest"]]
    result = eval_pipeline.run(eval_cfg(tiny_edit_export, data, out, store))

    # Every input accounted for: 4 shard samples and 4 manifest rows, each evaluated once.
    assert result["job"].accepted == 8 and result["job"].rejected == 0
    samples = assert_ledger_invariants(out)
    assert all(isinstance(s, schema.EvalSample) for s in samples)
    records = [
        json.loads(line) for line in storage.read_text(storage.join(out, "results.jsonl")).splitlines()
    ]
    assert len(records) == 8 and len({r["key"] for r in records}) == 8
    assert {r["category"] for r in records} == set(KINDS)
    for record in records:
        metrics = record["metrics"]
        # Every sample had a reference: reference metrics and the copy baseline are there.
        for name in ("mse", "psnr", "ssim", "copy_mse", "copy_psnr", "flow_epe", "flow_warp_error"):
            assert name in metrics, (name, record)
        # Preservation is measured where source and reference agree: none of a style edit's pixels.
        assert ("preserve_psnr" in metrics) == (record["category"] != "style"), record
        assert record["reference"] and record["judge"] == {} and record["judge_error"] is None
        assert (record["frames"], record["height"], record["width"]) == (9, 48, 64)

    summary = json.loads(storage.read_text(storage.join(out, "metrics.json")))
    assert summary["counts"]["samples"] == 8
    assert set(summary["per_category"]) == set(KINDS)
    assert set(summary["per_task"]) == {"video_edit"}
    mean_psnr = sum(r["metrics"]["psnr"] for r in records) / 8
    assert summary["overall"]["means"]["psnr"] == pytest.approx(mean_psnr)

    # The report shows every sample with its three players, media beside it.
    report = storage.read_text(result["report"])
    assert report.count("<video") == 3 * 8
    media = os.listdir(os.path.join(out, "report", "media"))
    assert len(media) == 3 * 8

    # The MLflow run: metrics per task and category, the table and the report.
    client = mlflow.MlflowClient(tracking_uri=f"sqlite:///{store}")
    run = client.get_run(result["mlflow_run_id"])
    assert run.data.tags["sama.kind"] == "eval"
    assert run.data.metrics["eval/psnr"] == pytest.approx(mean_psnr)
    assert any(k.startswith("eval/task/video_edit/") for k in run.data.metrics)
    assert any(k.startswith("eval/category/recolor/") for k in run.data.metrics)
    artifacts = {a.path for a in client.list_artifacts(run.info.run_id, "eval")}
    assert "eval/samples.json" in artifacts
    assert "report/index.html" in {a.path for a in client.list_artifacts(run.info.run_id, "report")}

    # A rerun evaluates nothing again and logs no second run.
    again = eval_pipeline.run(eval_cfg(tiny_edit_export, data, out, store))
    assert again["job"].run_units == 0 and again["mlflow_run_id"] == result["mlflow_run_id"]
    assert len(client.search_runs([run.info.experiment_id])) == 1


def test_bad_rows_are_rejected_and_the_job_goes_on(ray_cluster, tmp_path, held_out, tiny_edit_export):
    folder = os.path.dirname(held_out["manifest"])
    manifest = os.path.join(folder, "with-bad-rows.jsonl")
    with open(held_out["manifest"]) as handle:
        rows = list(csv.DictReader(handle))
    good = {"source": rows[0]["source"], "instruction": rows[0]["instruction"], "category": "recolor"}
    bad = [
        {"source": "../../etc/passwd", "instruction": "make it blue"},
        {"source": rows[1]["source"], "instruction": ""},
        {"source": "missing.mp4", "instruction": "make it blue"},
    ]
    with open(manifest, "w") as handle:
        handle.writelines(json.dumps(r) + "\n" for r in [good, *bad])
    out = str(tmp_path / "eval")
    result = eval_pipeline.run(eval_cfg(tiny_edit_export, [manifest], out, str(tmp_path / "m.db")))
    assert result["counts"]["samples"] == 1 and result["job"].rejected == 3
    reasons = result["job"].rejected_per_reason
    assert reasons.get("bad_location") == 1 and reasons.get("bad_row") == 1, reasons
    # No reference for the good row: no reference metrics, the rest measured.
    record = json.loads(storage.read_text(storage.join(out, "results.jsonl")))
    assert not record["reference"] and "psnr" not in record["metrics"] and "flow_epe" in record["metrics"]


def test_a_killed_eval_resumes_without_re_editing_finished_samples(
    ray_cluster, tmp_path, held_out, tiny_edit_export
):
    out, store = str(tmp_path / "eval"), str(tmp_path / "mlflow.db")
    args = ["jobs.eval", "--model", tiny_edit_export, "--data", held_out["shards"], "--output", out]
    args += [
        "--set=ray.actors=1",
        "--set=ray.progress_interval_s=1000",
        f"--set=tracking.uri=sqlite:///{store}",
    ]
    killed_at = kill_after_markers(args, out, markers=1, timeout_s=150)
    assert 1 <= killed_at < 4, f"the job was not killed mid-run (markers at kill: {killed_at})"
    markers = {
        uri: storage.read_bytes(uri)
        for uri in storage.list_files(storage.join(out, ledger.MARKERS_DIR), (".json",))
    }

    result = eval_pipeline.run(eval_cfg(tiny_edit_export, [held_out["shards"]], out, store))
    # Finished units were skipped (their markers, which hold each edit's timing, are untouched);
    # only the rest were edited.
    assert result["job"].run_units_skipped == len(markers)
    assert result["job"].run_samples == 4 - len(markers)
    assert all(storage.read_bytes(uri) == data for uri, data in markers.items())
    assert result["counts"]["samples"] == 4
    assert len(assert_ledger_invariants(out)) == 4
