"""``sama quickstart``: the whole path on the embedded default, on synthetic data.

synthesise raw videos and edit pairs -> ``prep-pretext`` -> ``prep-pairs`` -> ``precompute`` ->
stage 0 -> stage 1 -> edit the held-out videos -> ``sama eval`` of the stage-1 model on the held-out
pairs, all under one work directory::

    <workdir>/store/raw, raw-val            synthetic raw videos (+ a few broken files)
    <workdir>/store/edits, edits-val        synthetic edit pairs and their manifests
    <workdir>/store/pretext, pretext-val    prep-pretext output (shards, summary, rejects)
    <workdir>/store/pairs, pairs-val        prep-pairs output
    <workdir>/store/latents/<name>          precompute output of each of the four (latent shards)
    <workdir>/runs/debug-stage0, -stage1    checkpoints, export, run_info.json
    <workdir>/runs/mlruns                   the local MLflow store
    <workdir>/store/eval                    sama eval output: results.jsonl, metrics.json, report/index.html
    <workdir>/edits/<kind>.mp4              every held-out pair edited by `sama edit`
    <workdir>/edits/<kind>_strip.mp4        the same beside its source and target: source | edit | target
    <workdir>/edited.mp4                    one of them: the recolor

Local Ray, a local directory as object storage, a local MLflow store and the tiny model. A rerun
skips finished work (the prep jobs resume, finished training stages are kept); ``--overwrite``
starts over.
"""

from __future__ import annotations

import concurrent.futures
import csv
import io
import json
import logging
import os
import shutil
import time

import numpy as np

from sama import cluster, config, logs, storage, synthetic

log = logging.getLogger(__name__)

# Small enough for the tiny model on 2 CPU cores in minutes (9-frame clips in 48x64-pixel
# buckets); the same code runs the full-size recipes (49 or 81 frames at 480p).
BUCKETS = [
    "buckets.base_height=48",
    "buckets.base_width=64",
    "buckets.multiple=16",
    "buckets.preset=paper",
    'buckets.aspect_ratios=["3:4", "4:3"]',
]
PREP_SETTINGS = [
    *BUCKETS,
    "clips.num_frames=9",
    "clips.fps=8",
    "clips.max_clips_per_video=2",
    "clips.min_side=48",
    "input.videos_per_unit=4",
    "encode.preset=veryfast",
]
PAIR_SETTINGS = [
    *BUCKETS,
    "align.max_fps=8",
    "align.max_frames=9",
    "align.min_side=48",
    "input.rows_per_unit=8",
    "encode.preset=veryfast",
]
# What the tiny models train at, recorded in their exports so `sama edit` resizes and resamples
# real videos to it (the debug recipes say the same; these keep the exports in step with BUCKETS).
INFERENCE_SETTINGS = [
    *(f"inference.{setting}" for setting in BUCKETS),
    "inference.fps=8",
    "inference.max_frames=9",
]


def inference_config():
    """The :class:`~sama.pipeline_edit.PipelineConfig` a tiny quickstart model is exported with:
    the pipeline defaults with :data:`INFERENCE_SETTINGS` applied (its buckets, fps and clip length)."""
    from sama.pipeline_edit import PipelineConfig

    settings = PipelineConfig()
    for setting in INFERENCE_SETTINGS:
        settings = config.apply_override(settings, setting.removeprefix("inference."))
    settings.validate()
    return settings


# Synthetic media: landscape and portrait, a little larger than the buckets they are cut to.
SIZES = [(72, 96), (96, 72)]
# Edit kinds of the synthetic pairs. Not background replacement: painting a new textured backdrop
# from a sentence is beyond the tiny model in minutes, and pairs where most of the frame changes
# arbitrarily slowed its learning to copy what an edit keeps (bench/learning.py, measured).
EDIT_KINDS = ("recolor", "remove", "add", "style")
# The held-out edit shown as edited.mp4: a recolor keeps all but one object, so copying the source
# is a strong baseline it has to stay close to.
HEADLINE_KIND = "recolor"
# Clips of 9 frames at 8 fps, the length of the training clips (align.max_frames).
CLIP_SECONDS = 1.125


class _Steps:
    def __init__(self, total: int):
        self.total = total
        self.index = 0
        self.started = time.monotonic()

    def start(self, what: str) -> None:
        self.index += 1
        elapsed = time.monotonic() - self.started
        print(f"[{self.index}/{self.total}] {what}  (t={elapsed:.0f}s)", flush=True)


def _synthesise(store: str) -> None:
    if not storage.exists(storage.join(store, "raw", ".done")):
        synthetic.write_raw_videos(storage.join(store, "raw"), 96, seed=1, fps=12.0, seconds=2.5, sizes=SIZES)
        synthetic.write_bad_inputs(storage.join(store, "raw", "broken"))
        synthetic.write_raw_videos(
            storage.join(store, "raw-val"), 4, seed=2, fps=12.0, seconds=1.5, sizes=SIZES
        )
        storage.write_text(storage.join(store, "raw", ".done"), "")
    if not storage.exists(storage.join(store, "edits", ".done")):
        synthetic.write_edit_pairs(
            storage.join(store, "edits"),
            240,
            seed=3,
            media="mixed",
            fps=8.0,
            seconds=CLIP_SECONDS,
            sizes=SIZES,
            low_score_every=8,
            kinds=EDIT_KINDS,
        )
        # One held-out video pair per kind, never trained on.
        synthetic.write_edit_pairs(
            storage.join(store, "edits-val"),
            len(EDIT_KINDS),
            seed=4,
            media="video",
            fps=8.0,
            seconds=CLIP_SECONDS,
            sizes=[(48, 64)],
            low_score_every=100,
            kinds=EDIT_KINDS,
        )
        storage.write_text(storage.join(store, "edits", ".done"), "")


def _prep_pretext(input_uri: str, output_uri: str) -> dict:
    from pipelines import prep_pretext
    from sama.prep.pretext_job import PrepPretextConfig

    cfg = config.load(
        PrepPretextConfig, None, [*PREP_SETTINGS, f"input.uri={input_uri}", f"output.uri={output_uri}"]
    )
    return prep_pretext.run(cfg).__dict__


def _prep_pairs(manifest: str, output_uri: str) -> dict:
    from pipelines import prep_pairs
    from sama.prep.pairs_job import PrepPairsConfig

    cfg = config.load(
        PrepPairsConfig, None, [*PAIR_SETTINGS, f'input.manifests=["{manifest}"]', f"output.uri={output_uri}"]
    )
    return prep_pairs.run(cfg).__dict__


# The shard sets the quickstart precomputes (each its own latent output, so training can weigh them).
LATENT_SETS = ("pretext", "pretext-val", "pairs", "pairs-val")


def _precompute(input_uri: str, output_uri: str) -> dict:
    from pipelines import precompute
    from sama.prep.precompute_job import PrecomputeConfig

    cfg = config.load(
        PrecomputeConfig,
        None,
        [
            f"inputs={json.dumps([input_uri])}",
            f"output.uri={output_uri}",
            "model.preset=tiny",
            "ray.actors=1",
        ],
    )
    return precompute.run(cfg).__dict__


def _train(recipe: str, workdir: str, extra: list[str]) -> dict:
    from sama.train.launch import RUN_INFO_FILE, run_training, run_uri
    from sama.train.recipes import recipe_path
    from sama.train.trainer import TrainConfig

    overrides = [f"run.storage_uri={os.path.join(workdir, 'runs')}", *INFERENCE_SETTINGS, *extra]
    cfg = config.load(TrainConfig, recipe_path(recipe), overrides)
    info_uri = storage.join(run_uri(cfg), RUN_INFO_FILE)
    if storage.exists(info_uri):
        print(f"      {cfg.run.name} already trained; kept (use --overwrite to retrain)")
        return json.loads(storage.read_text(info_uri))
    # A stage that died midway is continued from its last checkpoint.
    from sama.train.launch import latest_checkpoint

    return run_training(cfg, resume=latest_checkpoint(cfg) is not None)


EVAL_EXPERIMENT = "sama-eval"


def _eval(store: str, stage: dict) -> dict:
    """``sama eval`` of a stage's registered model on the held-out pairs, tracked in its store."""
    from pipelines import eval as eval_pipeline
    from sama.eval.job import EvalConfig

    model = f"models:/{stage['mlflow_registered_model']}/{stage['mlflow_version']}"
    cfg = config.load(
        EvalConfig,
        None,
        [
            f"model={model}",
            f"data={json.dumps([os.path.join(store, 'pairs-val')])}",
            f"output.uri={os.path.join(store, 'eval')}",
            f"tracking.uri={stage['mlflow_tracking_uri']}",
            f"tracking.experiment={EVAL_EXPERIMENT}",
            "ray.actors=1",
        ],
    )
    return eval_pipeline.run(cfg)


def _encoders_line(info: dict) -> str:
    """What the frozen encoders did in a training stage, from its run_info.json."""
    loaded = info.get("frozen_encoders_loaded") or {}
    if not info.get("precomputed"):
        return f"      frozen encoders built for training: {', '.join(loaded) or 'none'}"
    others = ", ".join(f"{name} ({purpose})" for name, purpose in sorted(loaded.items())) or "none"
    return f"      trained from latent shards: no frozen encoder built; loaded on rank 0 only for {others}"


def _trained_line(info: dict) -> str:
    """What a training stage did, from its run_info.json (its step lines are in Ray's worker logs)."""
    return (
        f"      {info.get('steps')} steps, {info.get('samples_seen')} samples; MLflow run "
        f"{info.get('mlflow_run_id')}, registered {info.get('mlflow_registered_model')} "
        f"v{info.get('mlflow_version')}"
    )


def _sources(*sources: tuple[str, str, str, float]) -> str:
    """A ``data.sources=[...]`` override for the given (name, uri, media, weight) streams."""
    items = [{"name": n, "uri": u, "media": m, "weight": w} for n, u, m, w in sources]
    return f"data.sources={json.dumps(items)}"


def _image_edits(latents: str) -> tuple[str, str, str, float]:
    return ("image_edits", f"{latents}/pairs/shards/image", "image", 1.0)


def edit_held_out(store: str, model_uri: str, workdir: str) -> list[dict]:
    """Edit every held-out pair's source with its instruction through ``sama edit``'s function.

    Returns one record per pair: kind, instruction, the edit's output, its MSE / PSNR / SSIM to the
    target and the same for the unchanged source (the copy baseline). ``edits/<kind>.mp4`` is the
    edit, ``edits/<kind>_strip.mp4`` the strip source | edit | target.
    """
    from sama import video
    from sama.edit import run_edit
    from sama.eval import metrics

    root = storage.join(store, "edits-val")
    rows = list(csv.DictReader(io.StringIO(storage.read_text(storage.join(root, "manifest.csv")))))
    out_dir = os.path.join(workdir, "edits")
    os.makedirs(out_dir, exist_ok=True)
    records = []
    for row in rows:
        kind = row["category"]
        output = os.path.join(out_dir, f"{kind}.mp4")
        source_uri, target_uri = storage.join(root, row["source"]), storage.join(root, row["target"])
        run_edit(source_uri, row["instruction"], model_uri, output)
        source, target, edited = (video.decode_clip(u) for u in (source_uri, target_uri, output))
        strip = np.concatenate([source, edited, target], axis=2)
        strip_uri = os.path.join(out_dir, f"{kind}_strip.mp4")
        storage.write_bytes(strip_uri, video.encode_mp4(strip, video.probe(source_uri).fps or 8.0))
        record = {"kind": kind, "instruction": row["instruction"], "output": output}
        records.append({**record, **metrics.compare_to_copy(edited, source, target)})
    return records


def format_edits(edits: list[dict]) -> list[str]:
    """The table of held-out edits printed by the quickstart."""
    lines = [f"{'kind':<11}{'edit PSNR':>10}{'copy PSNR':>11}{'edit/copy MSE':>15}  instruction"]
    for e in edits:
        ratio = e["mse"] / e["copy_mse"] if e["copy_mse"] else float("inf")
        lines.append(
            f"{e['kind']:<11}{e['psnr']:>10.1f}{e['copy_psnr']:>11.1f}{ratio:>15.2f}  {e['instruction']}"
        )
    return lines


def run(workdir: str = "quickstart", overwrite: bool = False) -> int:
    """Run every stage; prints where everything is. Returns the exit status."""

    workdir = os.path.abspath(workdir)
    if overwrite and os.path.isdir(workdir):
        shutil.rmtree(workdir)
    store = os.path.join(workdir, "store")
    os.makedirs(store, exist_ok=True)
    steps = _Steps(9)
    # The quickstart prints its own step and result lines; the rest goes to Ray's session logs.
    logs.summary_only()
    session = cluster.connect()
    if session:
        print(f"Ray's logs (workers, Ray Data, Ray Train): {os.path.join(session, 'logs')}")

    steps.start("synthesising raw videos and edit pairs")
    _synthesise(store)

    steps.start("prep-pretext: raw videos -> motion-alignment pretext shards")
    pretext = _prep_pretext(os.path.join(store, "raw"), os.path.join(store, "pretext"))
    _prep_pretext(os.path.join(store, "raw-val"), os.path.join(store, "pretext-val"))
    print(
        f"      {pretext['samples']} clips from {pretext['accepted']}/{pretext['inputs_seen']} videos, "
        f"rejected {pretext['rejected_per_reason']}"
    )

    steps.start("prep-pairs: edit manifest -> paired-edit shards")
    pairs = _prep_pairs(os.path.join(store, "edits", "manifest.csv"), os.path.join(store, "pairs"))
    _prep_pairs(os.path.join(store, "edits-val", "manifest.csv"), os.path.join(store, "pairs-val"))
    rejected = pairs["rejected_per_reason"]
    print(f"      {pairs['samples']} pairs from {pairs['inputs_seen']} rows, rejected {rejected}")

    steps.start("precompute: shards -> latent shards (VAE latents, text embeddings, SigLIP tokens)")
    latents = os.path.join(store, "latents")
    # Two jobs at a time on the 2 CPUs: each job's fixed cost (its actor starting and loading the
    # encoders) overlaps the other's work.
    with concurrent.futures.ThreadPoolExecutor(max_workers=2) as pool:
        futures = {
            name: pool.submit(_precompute, os.path.join(store, name), os.path.join(latents, name))
            for name in LATENT_SETS
        }
        counts = {name: future.result() for name, future in futures.items()}
    print(
        f"      {sum(c['samples'] for c in counts.values())} samples encoded once into {latents}/"
        f"{{{','.join(LATENT_SETS)}}}; training reads these, not the media"
    )

    steps.start("stage 0: factorized pre-training (image edits + pretext clips), tiny model, 2 workers")
    stage0 = _train(
        "debug",
        workdir,
        [
            _sources(("pretext", f"{latents}/pretext/shards/video", "video", 3.0), _image_edits(latents)),
            f"data.val_uri={latents}/pretext-val/shards/video",
        ],
    )
    print(_trained_line(stage0))
    print(_encoders_line(stage0))
    steps.start("stage 1: SFT on paired video edits (+ image edits) from the stage-0 export")
    stage1 = _train(
        "debug_sft",
        workdir,
        [
            f"model.init_from={stage0['export_uri']}",
            _sources(("video_edits", f"{latents}/pairs/shards/video", "video", 3.0), _image_edits(latents)),
            f"data.val_uri={latents}/pairs-val/shards/video",
        ],
    )
    print(_trained_line(stage1))
    print(_encoders_line(stage1))

    steps.start("edit the held-out videos with the stage-1 model (sama edit), against copying the source")
    edits = edit_held_out(store, stage1["export_uri"], workdir)
    for line in format_edits(edits):
        print(f"      {line}")
    headline = next(e for e in edits if e["kind"] == HEADLINE_KIND)
    edited = os.path.join(workdir, "edited.mp4")
    shutil.copyfile(headline["output"], edited)
    print(
        f"      {edited}: {headline['kind']} edit '{headline['instruction']}', error to the target "
        f"{headline['mse']:.0f} (PSNR {headline['psnr']:.1f} dB); copying the source: "
        f"{headline['copy_mse']:.0f} ({headline['copy_psnr']:.1f} dB)"
    )

    steps.start("sama eval: the stage-1 model (from the registry) on the held-out pairs: metrics, report")
    evaluated = _eval(store, stage1)
    means = evaluated["overall"]["means"]
    overall = {name: means.get(name, float("nan")) for name in ("psnr", "copy_psnr", "ssim")}
    print(
        f"      {evaluated['counts']['samples']} held-out pairs: PSNR {overall['psnr']:.1f} dB (copying the "
        f"source: {overall['copy_psnr']:.1f}), SSIM {overall['ssim']:.3f}"
    )
    print(f"      MLflow run {evaluated.get('mlflow_run_id')} (experiment {EVAL_EXPERIMENT})")
    print(f"      report: {evaluated['report']}")

    steps.start("done")
    tracking = stage1.get("mlflow_tracking_uri", "")
    print()
    print("Outputs")
    print(f"  shards:          {store}/pretext/shards, {store}/pairs/shards  (sama inspect <dir>)")
    print(f"  latent shards:   {latents}/<set>/shards, what training read  (sama inspect <dir>)")
    print(f"  stage-0 model:   {stage0['export_uri']}  (MLflow run {stage0.get('mlflow_run_id')})")
    print(f"  stage-1 model:   {stage1['export_uri']}  (MLflow run {stage1.get('mlflow_run_id')})")
    print(
        f"  registered:      {stage0.get('mlflow_registered_model')} v{stage0.get('mlflow_version')}, "
        f"{stage1.get('mlflow_registered_model')} v{stage1.get('mlflow_version')}"
    )
    strips = os.path.join(workdir, "edits", "*_strip.mp4")
    print(f"  edited videos:   {edited}; {strips} (source | edit | target)")
    print(f"  evaluation:      {evaluated['report']}  (results.jsonl, metrics.json beside it)")
    print()
    print("Browse the runs:")
    print(f"  mlflow ui --backend-store-uri {tracking} --port 5000    # then open http://127.0.0.1:5000")
    return 0
