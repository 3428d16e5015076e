"""Does a small run learn to edit? The debug recipes on synthetic edits, against the copy baseline.

Trains the tiny model with the debug recipes (``configs/train_debug*.toml``: stage 0 on
motion-alignment pretext clips and image edits, then stage 1 on video and image edits) in this
process, through :class:`sama.train.trainer.Trainer` (its steps, optimizer, schedule and EMA; only
the data comes from memory instead of shards: scenes rendered by :mod:`sama.synthetic`, pretext
sources made by :mod:`sama.pretext`). By default its scenes draw shapes of 0.4-0.6 of the frame's
shorter side (``--shape-sizes``; the quickstart's are 0.18-0.36), so a local edit changes about an
eighth of the frame, and the edit pairs are of the quickstart's kinds (``--kinds``: recolor,
remove, add, style; held-out pairs cover all five). At every evaluation point the averaged (EMA)
model, with the recipe's inference settings, edits held-out pairs of every kind and restores
held-out pretext clips; the script prints PSNR and SSIM against the targets beside those of doing
nothing:

* edits: the source against the target (the copy baseline: an edit that changes nothing scores
  exactly that, so an edit is worth something only where it beats it);
* where the edit loses: PSNR on the pixels the edit must keep (source and target agree within
  8/255) and on those it must change, beside the source there;
* restorations: the perturbed source against the original clip (a sped-up source stretched back
  to the clip's length);
* how precisely the model returns what a local edit (recolor, remove, add) keeps: PSNR on the kept
  pixels of its one-step estimate of the target from a noisy one, at a few noise levels, beside the
  noisy input's own (:func:`sama.eval.probes.kept_precision`; the source shows those pixels
  exactly, so a model that reads it beats its input by far at every level);
* whether a local edit's estimate depends on what its instruction asks: the one-step estimate
  from pure noise made again with another local edit's instruction for the same scene (a recolor
  told to remove the object, ...), and how far it moves where the edit changes the frame and
  elsewhere (:func:`sama.eval.probes.instruction_dependence`; a model that ignores its text: 0);
* whether recolor edits follow the colour they name: each held-out recolor pair is also edited
  with its twin instruction (the same words naming another colour) and scored against both targets
  (:func:`named_colour`; an edit that ignores the colour word scores 50%).

``--no-sa`` drops Semantic Anchoring (no semantic tokens, no L_sem) from both stages, ``--no-ma``
replaces the pretext tasks of stage 0 by plain text-to-video clips; ``--table5`` runs the four
combinations (baseline / +SA / +MA / SA+MA, the paper's Table 5 layout) with shorter stages and
prints the measured ordering. The global batch is the recipe's (per-worker batch x workers) on one
process. 25-31 minutes on 2 cores with the defaults (measured on different days); ``--table5``
(400 + 500 steps per variant, evaluated at the end of each stage) about 28.

    python bench/learning.py                  # per kind, per evaluation point
    python bench/learning.py --table5         # the SA / MA ablation at toy scale
    python bench/learning.py --copy-steps 600 --eval-every 200   # copy pairs only: how precise
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
import tempfile
import time
from dataclasses import dataclass

import numpy as np
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

from sama import config as config_lib  # noqa: E402
from sama import pretext, quickstart, synthetic, video  # noqa: E402
from sama.cli import add_override_argument  # noqa: E402
from sama.eval import metrics  # noqa: E402
from sama.eval.probes import instruction_dependence, kept_precision  # noqa: E402
from sama.models.training import EDIT_PROMPT_PREFIX  # noqa: E402
from sama.train.recipes import recipe_path  # noqa: E402
from sama.train.trainer import TrainConfig, Trainer  # noqa: E402

KINDS = synthetic.EDIT_KINDS
# The quickstart's clips: 9 frames at 8 fps in a 48x64 bucket.
HEIGHT, WIDTH, FRAMES, FPS = 48, 64, 9, 8.0
RESTORED_TASKS = (pretext.TASK_CUBE, pretext.TASK_SPEED, pretext.TASK_TUBE)
# Edits that keep most of the frame, each with the kind of another local edit of the same scene
# whose instruction its estimate is also made with; and the data fractions (1 - sigma) their
# estimates are probed at.
OTHER_KIND = {"recolor": "remove", "remove": "recolor", "add": "remove"}
LOCAL_KINDS = tuple(OTHER_KIND)
PROBE_TIMES = (0.0, 0.5, 0.9, 0.97)
# Shapes larger than the quickstart's (synthetic.SHAPE_SIZES, 0.18-0.36): a local edit then
# changes about 15% of the frame instead of 4%, enough signal for the tiny model to learn in 30
# minutes which colour an instruction names (see the README).
BENCH_SHAPE_SIZES = (0.4, 0.6)
_EMPTY = np.zeros((0, 0, 0, 3), dtype=np.uint8)


# -------------------------------------------------------------------------------------------------
# Data: decoded rows, as the training stream yields them


def _row(key: str, task: str, media: str, instruction: str, target, source=None) -> dict:
    return {
        "key": key,
        "task": task,
        "media": media,
        "instruction": instruction,
        "bucket": f"{target.shape[1]}x{target.shape[2]}",
        "target": target,
        "source": _EMPTY if source is None else source,
        "error": "",
    }


def edit_rows(
    count: int, seed: int, media: str, kinds=KINDS, twins: bool = False, sizes=synthetic.SHAPE_SIZES
) -> list[dict]:
    """``count`` edit pairs of ``media`` ("video" or "image"), kinds in turn. With ``twins``, each
    recolor row also holds its twin (``twin_instruction``, ``twin_target``: the same edit naming
    another colour, :func:`sama.synthetic.recolor_twin`), and each local edit (``LOCAL_KINDS``) the
    instruction of another local edit of the same scene (``other_instruction``, of the kind
    ``OTHER_KIND`` names)."""
    frames = FRAMES if media == "video" else 1
    rows = []
    for i in range(count):
        kind = kinds[i % len(kinds)]
        scene = synthetic.random_scene(synthetic.derive_seed(seed, i), sizes)
        edit_seed = synthetic.derive_seed(seed, i, "edit")
        edited, instruction = synthetic.make_edit(
            scene, kind, edit_seed, video=media == "video", shape_sizes=sizes
        )
        source = synthetic.render(scene, frames, FPS, HEIGHT, WIDTH)
        target = synthetic.render(edited, frames, FPS, HEIGHT, WIDTH)
        row = _row(f"{media}-{seed}-{i}", kind, media, EDIT_PROMPT_PREFIX + instruction, target, source)
        if twins and kind in LOCAL_KINDS:
            _, other = synthetic.make_edit(
                scene, OTHER_KIND[kind], edit_seed, video=media == "video", shape_sizes=sizes
            )
            row["other_instruction"] = EDIT_PROMPT_PREFIX + other
        if twins and kind == "recolor":
            twin, twin_instruction = synthetic.recolor_twin(scene, edit_seed)
            row["twin_instruction"] = EDIT_PROMPT_PREFIX + twin_instruction
            row["twin_target"] = synthetic.render(twin, frames, FPS, HEIGHT, WIDTH)
        rows.append(row)
    return rows


def clip_rows(
    count: int, seed: int, motion_alignment: bool, tasks=None, sizes=synthetic.SHAPE_SIZES
) -> list[dict]:
    """Stage-0 video samples: pretext tasks by the paper's mix (or only ``tasks``, in turn), or,
    without motion alignment, plain text-to-video clips (the caption, no source)."""
    config = pretext.PretextConfig()
    rows = []
    for i in range(count):
        scene = synthetic.random_scene(synthetic.derive_seed(seed, i, "clip"), sizes)
        clip = synthetic.render(scene, FRAMES, FPS, HEIGHT, WIDTH)
        caption = synthetic.caption(scene)
        rng = np.random.default_rng(synthetic.derive_seed(seed, i, "task"))
        if not motion_alignment:
            rows.append(_row(f"clip-{seed}-{i}", pretext.TASK_NONE, "video", caption, clip))
            continue
        task = tasks[i % len(tasks)] if tasks else pretext.choose_task(rng, config.weights)
        result = pretext.apply_task(task, clip, rng, config)
        instruction = pretext.instruction_for(task, caption)
        rows.append(_row(f"clip-{seed}-{i}", task, "video", instruction, clip, result.source))
    return rows


def copy_rows(count: int, seed: int, media: str, sizes=synthetic.SHAPE_SIZES) -> list[dict]:
    """``count`` pairs whose target is their source: what an edit keeps, and nothing else."""
    frames = FRAMES if media == "video" else 1
    rows = []
    for i in range(count):
        clip = synthetic.render(
            synthetic.random_scene(synthetic.derive_seed(seed, i), sizes), frames, FPS, HEIGHT, WIDTH
        )
        rows.append(
            _row(f"copy-{media}-{seed}-{i}", "copy", media, EDIT_PROMPT_PREFIX + COPY_INSTRUCTION, clip, clip)
        )
    return rows


COPY_INSTRUCTION = "Keep the video as it is."


@dataclass
class Data:
    pairs: list[dict]
    images: list[dict]
    clips: list[dict]
    plain_clips: list[dict]
    held_out: list[dict]
    held_out_clips: list[dict]


def make_data(args) -> Data:
    kinds, sizes = tuple(args.kinds.split(",")), args.shape_sizes
    return Data(
        pairs=edit_rows(args.pairs, 3, "video", kinds, sizes=sizes),
        images=edit_rows(args.images, 5, "image", kinds, sizes=sizes),
        clips=clip_rows(args.clips, 7, True, sizes=sizes),
        plain_clips=clip_rows(args.clips, 7, False, sizes=sizes),
        held_out=edit_rows(args.held_out * len(KINDS), 11, "video", twins=True, sizes=sizes),
        held_out_clips=clip_rows(args.held_out * len(RESTORED_TASKS), 13, True, RESTORED_TASKS, sizes),
    )


# -------------------------------------------------------------------------------------------------
# Training


def stage_config(recipe: str, steps: int, args, semantic: bool, init_from: str | None) -> TrainConfig:
    """The recipe with the bench's steps and ``--set`` overrides, one in-process worker carrying
    the recipe's global batch."""
    overrides = [f"max_steps={steps}", "data.val_uri=null", *args.overrides]
    cfg = config_lib.load(TrainConfig, recipe_path(recipe), overrides)
    workers = cfg.scaling.num_workers
    cfg.data.video_batch_size *= workers
    cfg.data.image_batch_size *= workers
    cfg.scaling.num_workers = 1
    cfg.scaling.torch_threads = args.threads
    if not semantic:
        cfg.model.overrides = {**cfg.model.overrides, "semantic.enabled": False}
        cfg.objective.semantic = False
    if init_from:
        cfg.model.init_from = init_from
    cfg.validate()
    return cfg


def _sources(cfg: TrainConfig, video: list[dict], images: list[dict]) -> dict[str, list[dict]]:
    by_media = {"video": video, "image": images}
    return {source.name: by_media[source.media] for source in cfg.data.sources}


# -------------------------------------------------------------------------------------------------
# Evaluation


@torch.no_grad()
def evaluate(trainer: Trainer, data: Data) -> dict:
    """Per edit kind and per pretext task: the averaged model's metrics and the do-nothing ones."""
    pipeline = trainer.averaged_pipeline(trainer.device)
    kinds: dict[str, list[dict]] = {}
    for row in data.held_out:
        edited = pipeline(row["source"], row["instruction"], seed=0, add_prefix=False).frames
        scores = {
            **metrics.compare_to_copy(edited, row["source"], row["target"]),
            **regions(edited, row["source"], row["target"]),
        }
        if "twin_instruction" in row:
            twin_edit = pipeline(row["source"], row["twin_instruction"], seed=0, add_prefix=False).frames
            scores.update(named_colour(edited, twin_edit, row["target"], row["twin_target"]))
        kinds.setdefault(row["task"], []).append(scores)
    tasks: dict[str, list[dict]] = {}
    for row in data.held_out_clips:
        target, source = row["target"], row["source"]
        restored = pipeline(
            source, row["instruction"], seed=0, add_prefix=False, num_frames=len(target)
        ).frames
        tasks.setdefault(row["task"], []).append(
            metrics.compare_to_copy(restored, video.stretch_frames(source, len(target)), target)
        )

    def mean(groups: dict[str, list[dict]]) -> dict[str, dict[str, float]]:
        # A score some rows lack (the twin of a recolor whose targets agree) averages over the rest.
        def keys(ms: list[dict]) -> list[str]:
            return list(dict.fromkeys(k for m in ms for k in m))

        return {
            name: {k: float(np.mean([m[k] for m in ms if k in m])) for k in keys(ms)}
            for name, ms in groups.items()
        }

    local = [row for row in data.held_out if row["task"] in LOCAL_KINDS]
    probes = kept_precision(
        pipeline,
        [(r["source"], r["target"], r["instruction"].removeprefix(EDIT_PROMPT_PREFIX)) for r in local],
        PROBE_TIMES,
        KEPT_THRESHOLD,
    )
    told_otherwise = instruction_dependence(
        pipeline,
        [
            (
                r["source"],
                r["target"],
                *(r[k].removeprefix(EDIT_PROMPT_PREFIX) for k in ("instruction", "other_instruction")),
            )
            for r in local
        ],
        threshold=KEPT_THRESHOLD,
    )
    return {
        "edits": mean(kinds),
        "restorations": mean(tasks),
        "kept_estimate": [dataclasses.asdict(p) for p in probes],
        "instruction_dependence": [dataclasses.asdict(p) for p in told_otherwise],
    }


# A pixel whose source and target differ by at most this much (0-255, any channel) is one the
# edit must keep.
KEPT_THRESHOLD = 8


def regions(edited: np.ndarray, source: np.ndarray, target: np.ndarray) -> dict[str, float]:
    """Where an edit loses to copying: PSNR of the edit against the target on the pixels the edit
    must keep (``kept``; copying scores nearly perfectly there) and on those it must change
    (``changed``, beside ``copy_changed``, the source there)."""
    kept = metrics.preservation(edited, source, target, KEPT_THRESHOLD).get("preserve_psnr", float("nan"))
    changed = metrics.changed_pixels(source, target, KEPT_THRESHOLD)
    if not changed.any():
        return {"kept": kept, "changed": float("nan"), "copy_changed": float("nan")}

    def psnr(video: np.ndarray) -> float:
        residual = video[changed].astype(np.float64) - target[changed].astype(np.float64)
        return metrics.psnr_of(float(np.mean(residual**2)))

    return {"kept": kept, "changed": psnr(edited), "copy_changed": psnr(source)}


def named_colour(edited: np.ndarray, twin_edit: np.ndarray, target: np.ndarray, twin_target: np.ndarray):
    """Does the edit recolour to the colour it is told? A recolor pair edited twice, with its own
    instruction and with its twin's (the same words, another colour), on the pixels where the two
    targets differ (the object): ``named`` is the share of the two edits nearer their own target
    than the other's. An edit that ignores the colour word (copying the source included) makes the
    same video twice, nearer one of the targets: 0.5; reading the word: 1. ``colour_gap`` is the
    mean |edit - twin edit| there (0-255) beside ``target_gap``, the targets' own.
    """
    region = metrics.changed_pixels(target, twin_target, KEPT_THRESHOLD)
    if not region.any():
        return {}
    # The four videos on the object only, once.
    edit, twin, own, other = (v[region].astype(np.float64) for v in (edited, twin_edit, target, twin_target))

    def error(a: np.ndarray, b: np.ndarray) -> float:
        return float(np.mean((a - b) ** 2))

    hits = (error(edit, own) < error(edit, other)) + (error(twin, other) < error(twin, own))
    return {
        "named": hits / 2,
        "colour_gap": float(np.mean(np.abs(edit - twin))),
        "target_gap": float(np.mean(np.abs(own - other))),
    }


def _beats_copy(scores: dict[str, float]) -> bool:
    # The mean PSNR over the held-out pairs, as printed: a mean MSE can favour an edit that is far
    # better on one pair and worse on the others.
    return scores["psnr"] > scores["copy_psnr"]


def print_point(label: str, seconds: float, result: dict) -> None:
    print(f"\n{label}  (t={seconds:.0f}s)")
    print(
        f"  {'edit kind':<12}{'PSNR':>8}{'copy':>8}{'SSIM':>8}{'copy':>8}   beats copy"
        f"{'kept':>8}{'changed':>9}{'copy':>8}"
    )
    for kind in KINDS:
        m = result["edits"].get(kind)
        if m is None:
            continue
        beats = "yes" if _beats_copy(m) else "no"
        scores = f"{m['psnr']:8.2f}{m['copy_psnr']:8.2f}{m['ssim']:8.3f}{m['copy_ssim']:8.3f}"
        where = f"{m['kept']:8.2f}{m['changed']:9.2f}{m['copy_changed']:8.2f}"
        print(f"  {kind:<12}{scores}   {beats:<10}{where}")
    recolor = result["edits"].get("recolor", {})
    if "named" in recolor:
        print(
            f"  recolor told another colour: the edit nearer the colour it names in "
            f"{100 * recolor['named']:.0f}% of edits (ignoring the word: 50%); edits differ by "
            f"{recolor['colour_gap']:.1f} on the object (targets: {recolor['target_gap']:.1f}, 0-255)"
        )
    probes = result.get("kept_estimate")
    if probes:
        sigmas = " / ".join(f"{1 - p['t']:g}" for p in probes)
        estimates = " / ".join(f"{p['estimate_psnr']:.1f}" for p in probes)
        inputs = " / ".join(f"{p['noisy_psnr']:.1f}" for p in probes)
        print(
            f"  one-step estimate of the kept pixels (recolor, remove, add) at sigma {sigmas}: "
            f"{estimates} dB (its noisy input: {inputs})"
        )
    for p in result.get("instruction_dependence", []):
        print(
            f"  told another local edit ({', '.join(f'{a} -> {b}' for a, b in OTHER_KIND.items())}), the "
            f"sigma-{1 - p['t']:g} estimate moves by {p['edited']:.1f} on the pixels the edit changes, "
            f"{p['kept']:.1f} elsewhere (0-255; ignoring the instruction: 0)"
        )
    print(f"  {'restoration':<12}{'PSNR':>8}{'source':>8}{'SSIM':>8}{'source':>8}")
    for task in RESTORED_TASKS:
        m = result["restorations"].get(task)
        if m is not None:
            print(f"  {task:<12}{m['psnr']:8.2f}{m['copy_psnr']:8.2f}{m['ssim']:8.3f}{m['copy_ssim']:8.3f}")
    sys.stdout.flush()


def run_variant(
    name: str, semantic: bool, motion: bool, stage0: int, stage1: int, args, data: Data, workdir: str
) -> list[dict]:
    """Stage 0 then stage 1 from its export; returns the evaluation points."""
    started = time.monotonic()
    points: list[dict] = []

    def record(stage: int, trainer: Trainer) -> None:
        result = evaluate(trainer, data)
        seconds = time.monotonic() - started
        points.append({"variant": name, "stage": stage, "step": trainer.step, "seconds": seconds, **result})
        print_point(f"[{name}] stage {stage} step {trainer.step}/{trainer.cfg.max_steps}", seconds, result)

    cfg0 = stage_config("debug", stage0, args, semantic, None)
    trainer = Trainer(cfg0)
    trainer.build(_sources(cfg0, data.clips if motion else data.plain_clips, data.images))
    while trainer.step < cfg0.max_steps:
        trainer.train_step()
    record(0, trainer)
    export = os.path.join(workdir, f"{name}-stage0")
    trainer.export(export)
    trainer.batches.close()

    cfg1 = stage_config("debug_sft", stage1, args, semantic, export)
    trainer = Trainer(cfg1)
    trainer.build(_sources(cfg1, data.pairs, data.images))
    while trainer.step < cfg1.max_steps:
        trainer.train_step()
        if trainer.step % args.eval_every == 0 or trainer.step == cfg1.max_steps:
            record(1, trainer)
    trainer.export(os.path.join(workdir, f"{name}-stage1"))
    trainer.batches.close()
    return points


def run_copy(args) -> list[dict]:
    """From random init (the stage-0 recipe), train on copy pairs only and print, every
    ``--eval-every`` steps, how precisely held-out sources come back: the ceiling on the pixels an
    edit keeps."""
    cfg = stage_config("debug", args.copy_steps, args, True, None)
    trainer = Trainer(cfg)
    sizes = args.shape_sizes
    trainer.build(
        _sources(cfg, copy_rows(args.pairs, 3, "video", sizes), copy_rows(args.images, 5, "image", sizes))
    )
    held_out = Data([], [], [], [], held_out=copy_rows(args.held_out, 11, "video", sizes), held_out_clips=[])
    started, points = time.monotonic(), []
    print(f"  {'step':>6}{'seconds':>9}{'PSNR':>8}{'SSIM':>8}")
    while trainer.step < cfg.max_steps:
        trainer.train_step()
        if trainer.step % args.eval_every == 0 or trainer.step == cfg.max_steps:
            scores = evaluate(trainer, held_out)["edits"]["copy"]
            points.append({"step": trainer.step, "seconds": time.monotonic() - started, **scores})
            print(
                f"  {trainer.step:6d}{points[-1]['seconds']:9.0f}{scores['psnr']:8.2f}{scores['ssim']:8.3f}"
            )
            sys.stdout.flush()
    trainer.batches.close()
    return points


TABLE5 = (  # (name, Semantic Anchoring, Motion Alignment), the paper's Table 5 rows
    ("baseline", False, False),
    ("+SA", True, False),
    ("+MA", False, True),
    ("SA+MA", True, True),
)


def print_table5(finals: dict[str, dict]) -> None:
    print("\nTable 5 at toy scale: edit PSNR on held-out pairs after both stages (copy baseline beside)")
    print(f"  {'variant':<10}" + "".join(f"{k:>11}" for k in KINDS) + f"{'mean':>9}")
    copy = next(iter(finals.values()))["edits"]
    print(f"  {'copy':<10}" + "".join(f"{copy[k]['copy_psnr']:11.2f}" for k in KINDS))
    means = {}
    for name, result in finals.items():
        values = [result["edits"][k]["psnr"] for k in KINDS]
        means[name] = float(np.mean(values))
        print(f"  {name:<10}" + "".join(f"{v:11.2f}" for v in values) + f"{means[name]:9.2f}")
    order = " > ".join(sorted(means, key=means.get, reverse=True))
    print(f"  measured ordering (mean edit PSNR): {order}")
    print("  paper (Wan2.2-5B, VIE-Bench overall): SA+MA 7.095 > +MA 6.711 > +SA 6.696 > baseline 6.312")


def _size_range(text: str) -> tuple[float, float]:
    try:
        low, high = (float(v) for v in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected LOW,HIGH (two numbers), got {text!r}") from None
    try:
        return synthetic.check_shape_sizes((low, high))
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--stage0-steps", type=int, default=1200)
    parser.add_argument("--stage1-steps", type=int, default=2000)
    parser.add_argument("--eval-every", type=int, default=500, help="stage-1 steps between evaluations")
    parser.add_argument("--pairs", type=int, default=400, help="video edit pairs to train on")
    parser.add_argument("--images", type=int, default=400, help="image edit pairs to train on")
    parser.add_argument("--clips", type=int, default=800, help="stage-0 clips to train on")
    parser.add_argument(
        "--held-out", type=int, default=4, help="held-out pairs per kind (and clips per task)"
    )
    parser.add_argument(
        "--kinds",
        default=",".join(quickstart.EDIT_KINDS),
        help="edit kinds to train on (default: the quickstart's, no background replacement; held-out "
        "pairs cover every kind)",
    )
    parser.add_argument(
        "--shape-sizes",
        type=_size_range,
        default=BENCH_SHAPE_SIZES,
        help="LOW,HIGH: shape diameters as fractions of the frame's shorter side "
        f"(default {BENCH_SHAPE_SIZES[0]},{BENCH_SHAPE_SIZES[1]}; the quickstart's: "
        f"{synthetic.SHAPE_SIZES[0]},{synthetic.SHAPE_SIZES[1]})",
    )
    parser.add_argument("--no-sa", dest="sa", action="store_false", help="without Semantic Anchoring")
    parser.add_argument("--no-ma", dest="ma", action="store_false", help="without Motion Alignment pretext")
    parser.add_argument("--table5", action="store_true", help="the four SA / MA combinations")
    parser.add_argument("--table5-stage0-steps", type=int, default=400)
    parser.add_argument("--table5-stage1-steps", type=int, default=500)
    parser.add_argument(
        "--copy-steps",
        type=int,
        default=0,
        help="instead: train this many steps on copy pairs only and print how precisely sources come back",
    )
    parser.add_argument("--threads", type=int, default=2)
    # Applied to both stages' recipes.
    add_override_argument(parser, "'model.overrides={\"transformer.num_attention_heads\": 4}'")
    parser.add_argument(
        "--workdir", default=None, help="the stages' exports and results.json (default: a temp dir)"
    )
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    from diffusers.utils import logging as diffusers_logging
    from transformers.utils import logging as transformers_logging

    diffusers_logging.disable_progress_bar()
    transformers_logging.disable_progress_bar()
    workdir = args.workdir or tempfile.mkdtemp(prefix="sama-learning-")
    os.makedirs(workdir, exist_ok=True)

    started = time.monotonic()
    points = run_copy(args) if args.copy_steps else run_edits(args, workdir, started)
    with open(os.path.join(workdir, "results.json"), "w") as handle:
        json.dump(points, handle, indent=1)
    print(f"total {time.monotonic() - started:.0f}s; results in {workdir}/results.json")
    return 0


def run_edits(args, workdir: str, started: float) -> list[dict]:
    """The edit bench (one variant, or the four of Table 5); returns its evaluation points."""
    data = make_data(args)
    print(
        f"data: {len(data.pairs)} video + {len(data.images)} image edit pairs, "
        f"{len(data.clips)} stage-0 clips, "
        f"held out {len(data.held_out)} pairs and {len(data.held_out_clips)} pretext clips "
        f"({time.monotonic() - started:.0f}s); {HEIGHT}x{WIDTH}, {FRAMES} frames, shapes "
        f"{args.shape_sizes[0]}-{args.shape_sizes[1]} of the shorter side; {args.threads} threads"
    )
    if args.table5:
        args.eval_every = args.table5_stage1_steps  # each variant at the end of each stage only
        finals, points = {}, []
        for name, semantic, motion in TABLE5:
            variant = run_variant(
                name,
                semantic,
                motion,
                args.table5_stage0_steps,
                args.table5_stage1_steps,
                args,
                data,
                workdir,
            )
            points += variant
            finals[name] = variant[-1]
        print_table5(finals)
    else:
        name = {(True, True): "SA+MA", (True, False): "+SA", (False, True): "+MA"}.get(
            (args.sa, args.ma), "baseline"
        )
        points = run_variant(
            name, args.sa, args.ma, args.stage0_steps, args.stage1_steps, args, data, workdir
        )
        final = points[-1]["edits"]
        beaten = [k for k in KINDS if _beats_copy(final[k])]
        print(f"\nheld-out kinds where the edit beats the copy baseline: {', '.join(beaten) or 'none'}")
    return points


if __name__ == "__main__":
    sys.exit(main())
