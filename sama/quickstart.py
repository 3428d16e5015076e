"""``sama quickstart``: the whole path on the embedded default, on synthetic data.

synthesise raw videos and edit pairs -> ``prep-pretext`` -> ``prep-pairs`` -> stage 0 -> stage 1 ->
edit a held-out video, all under one work directory::

    <workdir>/store/raw, raw-val            synthetic raw videos (+ a few broken files)
    <workdir>/store/edits, edits-val        synthetic edit pairs and their manifests
    <workdir>/store/pretext, pretext-val    prep-pretext output (shards, summary, rejects)
    <workdir>/store/pairs, pairs-val        prep-pairs output
    <workdir>/runs/debug-stage0, -stage1    checkpoints, export, run_info.json
    <workdir>/runs/mlruns                   the local MLflow store
    <workdir>/edited.mp4                    the edit of a held-out video

Local Ray, a local directory as object storage, a local MLflow store and the tiny model. A rerun
skips finished work (the prep jobs resume, finished training stages are kept); ``--overwrite``
starts over.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import time

from sama import config, storage, synthetic

log = logging.getLogger(__name__)

# Small enough for the tiny model on 2 CPU cores in minutes (9-frame clips in 48x64-pixel
# buckets); the same code runs the full-size recipes (49 or 81 frames at 480p).
BUCKETS = [
    "buckets.base_height=48",
    "buckets.base_width=64",
    "buckets.multiple=16",
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
# Synthetic media: landscape and portrait, a little larger than the buckets they are cut to.
SIZES = [(72, 96), (96, 72)]


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
        synthetic.write_raw_videos(storage.join(store, "raw"), 32, seed=1, fps=12.0, seconds=2.5, sizes=SIZES)
        synthetic.write_bad_inputs(storage.join(store, "raw", "broken"))
        synthetic.write_raw_videos(
            storage.join(store, "raw-val"), 4, seed=2, fps=12.0, seconds=1.5, sizes=SIZES
        )
        storage.write_text(storage.join(store, "raw", ".done"), "")
    if not storage.exists(storage.join(store, "edits", ".done")):
        synthetic.write_edit_pairs(
            storage.join(store, "edits"), 48, seed=3, media="mixed", fps=8.0, seconds=1.25, sizes=SIZES
        )
        synthetic.write_edit_pairs(
            storage.join(store, "edits-val"),
            4,
            seed=4,
            media="video",
            fps=8.0,
            seconds=1.25,
            sizes=[(48, 64)],
            low_score_every=100,
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


def _train(recipe: str, workdir: str, extra: list[str]) -> dict:
    from sama.train.launch import RUN_INFO_FILE, run_training, run_uri
    from sama.train.recipes import recipe_path
    from sama.train.trainer import TrainConfig

    overrides = [f"run.storage_uri={os.path.join(workdir, 'runs')}", *extra]
    cfg = config.load(TrainConfig, recipe_path(recipe), overrides)
    info_uri = storage.join(run_uri(cfg), RUN_INFO_FILE)
    if storage.exists(info_uri):
        print(f"      {cfg.run.name} already trained; kept (use --overwrite to retrain)")
        return json.loads(storage.read_text(info_uri))
    # A stage that died midway is continued from its last checkpoint.
    from sama.train.launch import latest_checkpoint

    return run_training(cfg, resume=latest_checkpoint(cfg) is not None)


def _sources(*sources: tuple[str, str, str, float]) -> str:
    """A ``data.sources=[...]`` override for the given (name, uri, media, weight) streams."""
    items = [{"name": n, "uri": u, "media": m, "weight": w} for n, u, m, w in sources]
    return f"data.sources={json.dumps(items)}"


def _image_edits(store: str) -> tuple[str, str, str, float]:
    return ("image_edits", f"{store}/pairs/shards/image", "image", 1.0)


def run(workdir: str = "quickstart", overwrite: bool = False) -> int:
    """Run every stage; prints where everything is. Returns the exit status."""
    import ray

    workdir = os.path.abspath(workdir)
    if overwrite and os.path.isdir(workdir):
        shutil.rmtree(workdir)
    store = os.path.join(workdir, "store")
    os.makedirs(store, exist_ok=True)
    steps = _Steps(7)
    if not ray.is_initialized():
        ray.init(include_dashboard=False, configure_logging=False)
    try:
        import ray.data

        ray.data.DataContext.get_current().enable_progress_bars = False
    except ImportError:
        pass

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

    steps.start("stage 0: factorized pre-training (image edits + pretext clips), tiny model, 2 workers")
    stage0 = _train(
        "debug",
        workdir,
        [
            _sources(("pretext", f"{store}/pretext/shards/video", "video", 3.0), _image_edits(store)),
            f"data.val_uri={store}/pretext-val/shards/video",
        ],
    )
    steps.start("stage 1: SFT on paired video edits (+ image edits) from the stage-0 export")
    stage1 = _train(
        "debug_sft",
        workdir,
        [
            f"model.init_from={stage0['export_uri']}",
            _sources(("video_edits", f"{store}/pairs/shards/video", "video", 3.0), _image_edits(store)),
            f"data.val_uri={store}/pairs-val/shards/video",
        ],
    )

    steps.start("edit a held-out video with the stage-1 model")
    from sama.edit import run_edit

    held_out = sorted(
        storage.list_files(os.path.join(store, "edits-val", "pairs"), suffixes=("_source.mp4",))
    )[0]
    edited = os.path.join(workdir, "edited.mp4")
    report = run_edit(
        held_out, "Change the background to a blue checkered wall.", stage1["export_uri"], edited, steps=20
    )
    print(f"      {report['frames']} frames at {report['width']}x{report['height']} -> {edited}")

    steps.start("done")
    tracking = stage1.get("mlflow_tracking_uri", "")
    print()
    print("Outputs")
    print(f"  shards:          {store}/pretext/shards, {store}/pairs/shards  (sama inspect <dir>)")
    print(f"  stage-0 model:   {stage0['export_uri']}  (MLflow run {stage0.get('mlflow_run_id')})")
    print(f"  stage-1 model:   {stage1['export_uri']}  (MLflow run {stage1.get('mlflow_run_id')})")
    print(
        f"  registered:      {stage0.get('mlflow_registered_model')} v{stage0.get('mlflow_version')}, "
        f"{stage1.get('mlflow_registered_model')} v{stage1.get('mlflow_version')}"
    )
    print(f"  edited video:    {edited}")
    print()
    print("Browse the runs:")
    print(f"  mlflow ui --backend-store-uri {tracking} --port 5000    # then open http://127.0.0.1:5000")
    return 0
