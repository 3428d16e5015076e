"""Does the quickstart's model learn to edit? Checks of learning, not of loss, on its held-out pairs.

The quickstart (shared with test_mlflow_ui.py through the session fixture in conftest.py) trains
stage 0 and stage 1 of the tiny model with the debug recipes. Its held-out pairs (one per edit
kind, never trained on) are edited here again by the exported stage-1 model:

(a) its prediction depends on its source: the one-step clean estimate of the target is clearly
    better with the true source latents than with the same latents displaced by 8 latent pixels
    (:func:`sama.eval.probes.source_dependence`);
(b) its local edits (recolor, remove, add: one object changes, the rest of the scene stays) are
    close to their targets: mean squared error at most a fixed fraction of what uniform noise
    scores against the same target; and the one the quickstart shows as edited.mp4 at most 1.5x
    what copying the source scores;
(c) the sample edits it logged to MLflow at its last validation (source | edit | target strips)
    pass the same bound as (b).

Each of these failed on the debug recipes before they were tuned (bench/learning.py: the model
ignored its source, its edits scored 3-5x worse than copying and about half as bad as noise).
"""

from __future__ import annotations

import csv

import numpy as np
import pytest

from tests.e2e.quickstart_run import Quickstart

pytestmark = [pytest.mark.slow, pytest.mark.timeout(1800)]

STAGE1 = "debug-stage1"
# An edit's MSE to its target, as a share of uniform noise's MSE to the same target (before the
# recipes were tuned: 0.26-0.43; after: about 0.1).
NOISE_FRACTION = 0.2
# The kinds (b) bounds. Not style: which of the seven looks (warm, cool, invert, sketch, ...) the
# 360-step model gives an unseen clip from a few words varies with the machine's float rounding.
# The same recipe and data scored a held-out "warm, golden look" at MSE 1150 here and 5244 on CI
# (noise: 8523), while its recolor, remove and add scored within 10% of each other on both.
# bench/learning.py measures style edits, longer.
LOCAL_KINDS = ("recolor", "remove", "add")
# The headline edit's MSE to its target, as a multiple of the unchanged source's.
COPY_MULTIPLE = 1.5


def _noise_mse(target: np.ndarray) -> float:
    noise = np.random.default_rng(0).integers(0, 256, size=target.shape, dtype=np.uint8)
    return float(np.mean((noise.astype(np.float64) - target) ** 2))


def _held_out(quickstart: Quickstart) -> list[dict]:
    from sama import video

    root = quickstart.workdir / "store" / "edits-val"
    with open(root / "manifest.csv", newline="") as handle:
        rows = list(csv.DictReader(handle))
    assert rows, f"no held-out pairs in {root}"
    for row in rows:
        row["source_uri"] = str(root / row["source"])
        row["source_frames"] = video.decode_clip(row["source_uri"])
        row["target_frames"] = video.decode_clip(str(root / row["target"]))
    return rows


def _stage1_export(quickstart: Quickstart) -> str:
    return str(quickstart.workdir / "runs" / STAGE1 / "export")


def test_a_prediction_depends_on_the_source(quickstart: Quickstart):
    from sama.eval.probes import source_dependence
    from sama.pipeline_edit import SamaEditPipeline

    pipeline = SamaEditPipeline.from_pretrained(_stage1_export(quickstart))
    pairs = [(r["source_frames"], r["target_frames"], r["instruction"]) for r in _held_out(quickstart)]
    probes = source_dependence(pipeline, pairs, times=(0.1, 0.5))
    report = [(p.t, round(p.true_source, 4), round(p.shifted_source, 4)) for p in probes]
    for probe in probes:
        assert probe.ratio < 0.8, f"estimate errors (t, true source, shifted source): {report}"


def test_b_held_out_edits_are_close_to_their_targets(quickstart: Quickstart, tmp_path):
    from sama import video
    from sama.edit import run_edit
    from sama.eval import metrics
    from sama.quickstart import HEADLINE_KIND

    results = []
    for row in _held_out(quickstart):
        out = str(tmp_path / f"{row['category']}.mp4")
        # The export's own inference settings, as `sama edit` uses them.
        run_edit(row["source_uri"], row["instruction"], _stage1_export(quickstart), out)
        edited, target = video.decode_clip(out), row["target_frames"]
        assert edited.shape == row["source_frames"].shape
        scores = metrics.compare_to_copy(edited, row["source_frames"], target)
        results.append((row["category"], scores["mse"], _noise_mse(target), scores["copy_mse"]))
    report = "\n".join(f"{k}: edit {e:.0f}, noise {n:.0f}, copy {c:.0f}" for k, e, n, c in results)
    assert {kind for kind, *_ in results} >= set(LOCAL_KINDS), report
    for kind, edit, noise, copy in results:
        if kind not in LOCAL_KINDS:
            continue
        assert edit <= NOISE_FRACTION * noise, f"{kind} is too far from its target:\n{report}"
        if kind == HEADLINE_KIND:
            assert edit <= COPY_MULTIPLE * copy, f"{kind} is far worse than copying the source:\n{report}"


def test_c_logged_sample_edits_are_close_to_their_targets(quickstart: Quickstart):
    from mlflow import MlflowClient

    from sama import video

    client = MlflowClient(tracking_uri=quickstart.tracking_uri)
    experiment = client.get_experiment_by_name("sama-debug")
    [run] = client.search_runs([experiment.experiment_id], f"attributes.run_name = '{STAGE1}'")
    steps = [a.path for a in client.list_artifacts(run.info.run_id, "samples") if a.is_dir]
    assert steps, "the stage-1 run logged no sample edits"
    last = max(steps)  # samples/step_NNNNNNN: the last validation
    mp4s = [a.path for a in client.list_artifacts(run.info.run_id, last) if a.path.endswith(".mp4")]
    assert mp4s, f"no mp4 under {last}"
    for path in mp4s:
        local = client.download_artifacts(run.info.run_id, path)
        strip = video.decode_clip(local)
        width = strip.shape[2] // 3
        edit, target = strip[:, :, width : 2 * width], strip[:, :, 2 * width : 3 * width]
        error = float(np.mean((edit.astype(np.float64) - target) ** 2))
        noise = _noise_mse(target)
        assert error <= NOISE_FRACTION * noise, f"{path}: edit MSE {error:.0f} vs noise {noise:.0f}"
