"""Benchmark ``sama eval``: samples/s of evaluating vs editing alone (tiny model, CPU).

Held-out edit pairs at the quickstart's settings (9-frame clips in 48x64 buckets, prep-pairs'
output, cached in the workdir) and a tiny export with the quickstart's inference settings
(random weights: an edit costs the same whatever the weights). Three figures, side by side:

* **edit alone**: the pipeline loaded once (timed apart), then per sample ``decode_pair`` and the
  edit, exactly as the job edits it; nothing measured, nothing written;
* **eval, in process**: the job's own unit function (:func:`sama.eval.job.process_unit`) over the
  same shards with one :class:`~sama.eval.job.Evaluator` (loaded once, timed apart): decode, edit,
  the weight-free metrics, mp4 encode of source / edit / reference, shard and marker writes;
* **eval job**: ``pipelines.eval.run`` on a fresh local Ray with one CPU (one actor), results,
  report and MLflow run included; its fixed cost (Ray start, actor start and model load, the
  report) is what a single-sample run costs, reported apart.

The issue's target: eval / edit alone <= 1.2x (the metrics' overhead). Numbers only.

    python bench/eval.py [--pairs 16] [--steps 10] [--workdir /tmp/sama-bench-eval]
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import shutil
import sys
import time

sys.path.insert(0, os.path.abspath(os.path.join(os.path.dirname(__file__), "..")))

from bench.floor import on_cores, timed_run
from pipelines import eval as eval_pipeline
from pipelines import prep_pairs
from sama import config, schema, synthetic
from sama.eval.job import EvalConfig, Evaluator, EvalUnit, list_eval_units, process_unit
from sama.prep import ledger
from sama.prep.pairs_job import PrepPairsConfig
from sama.quickstart import CLIP_SECONDS, EDIT_KINDS, PAIR_SETTINGS, inference_config


def make_pairs(workdir: str, pairs: int) -> str:
    """prep-pairs' output for ``pairs`` synthetic video pairs (every kind in turn), cached."""
    root = os.path.join(workdir, f"pairs-{pairs}")
    if os.path.exists(os.path.join(root, ledger.SUMMARY_FILE)):
        return root
    manifest = synthetic.write_edit_pairs(
        os.path.join(workdir, f"edits-{pairs}"),
        pairs,
        seed=5,
        media="video",
        fps=8.0,
        seconds=CLIP_SECONDS,
        sizes=[(48, 64)],
        low_score_every=1000,
        kinds=EDIT_KINDS,
    )
    cfg = config.load(
        PrepPairsConfig, None, [*PAIR_SETTINGS, f'input.manifests=["{manifest}"]', f"output.uri={root}"]
    )
    prep_pairs.run(cfg)
    import ray

    ray.shutdown()  # the timed runs start their own Ray, confined to the cores they measure
    return root


def make_export(workdir: str, steps: int) -> str:
    """A tiny export (random weights) with the quickstart's inference settings and ``steps`` steps."""
    import dataclasses

    import torch

    from sama.models.presets import build_model
    from sama.pipeline_edit import SamaEditPipeline

    directory = os.path.join(workdir, f"export-{steps}")
    if not os.path.exists(os.path.join(directory, "sama_pipeline.json")):
        torch.manual_seed(0)
        settings = dataclasses.replace(inference_config(), num_inference_steps=steps, guidance_scale=1.0)
        SamaEditPipeline.from_components(build_model("tiny"), settings).save_pretrained(directory)
    return directory


def eval_config(model: str, data: str, output: str) -> EvalConfig:
    return config.load(
        EvalConfig,
        None,
        [
            f"model={model}",
            f"data={json.dumps([data])}",
            f"output.uri={output}",
            f"tracking.uri=sqlite:///{os.path.join(os.path.dirname(output), 'mlruns.db')}",
            "ray.actors=1",
            "inference.dtype=float32",
        ],
    )


def edit_alone(cfg: EvalConfig, shards: list[str]) -> tuple[float, float, int]:
    """(load seconds, edit seconds, samples): decode and edit every sample, nothing else."""
    import torch

    from sama.pipeline_edit import SamaEditPipeline

    started = time.perf_counter()
    pipeline = SamaEditPipeline.from_pretrained(cfg.model, device="cpu", torch_dtype=torch.float32)
    loaded = time.perf_counter() - started
    count = 0
    started = time.perf_counter()
    for shard in shards:
        for sample in schema.iter_samples(shard):
            target, source = sample.decode_pair()
            pipeline(source, sample.meta.instruction, add_prefix=False, seed=0, num_frames=len(target))
            count += 1
    return loaded, time.perf_counter() - started, count


def eval_in_process(cfg: EvalConfig) -> tuple[float, float, int]:
    """(load seconds, eval seconds, samples): the job's unit function over every shard, no Ray."""
    shutil.rmtree(cfg.output.uri, ignore_errors=True)
    started = time.perf_counter()
    evaluator = Evaluator(cfg, device="cpu")
    loaded = time.perf_counter() - started
    units, _ = list_eval_units(cfg, set())
    count = 0
    started = time.perf_counter()
    for unit in units:
        count += process_unit(EvalUnit.from_json(unit.to_json()), evaluator).samples
    return loaded, time.perf_counter() - started, count


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--pairs", type=int, default=16)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--workdir", default="/tmp/sama-bench-eval")
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    os.makedirs(args.workdir, exist_ok=True)
    data = make_pairs(args.workdir, args.pairs)
    model = make_export(args.workdir, args.steps)
    cfg = eval_config(model, data, os.path.join(args.workdir, "eval-out"))
    shards = [ledger.shard_uri(data, s) for m in ledger.read_markers(data) for s in m.shards]

    import torch

    # One core, one torch thread (as Ray gives a 1-CPU actor): more threads than cores spin.
    torch.set_num_threads(1)
    with on_cores(1):
        edit_load, edit_s, edited = edit_alone(cfg, shards)
        print(f"edit alone: {edited} samples in {edit_s:.2f} s", flush=True)
        eval_load, eval_s, evaluated = eval_in_process(cfg)
        print(f"eval in process: {evaluated} samples in {eval_s:.2f} s", flush=True)
    job = timed_run(eval_pipeline.run, eval_config(model, data, os.path.join(args.workdir, "eval-job")), 1)
    one = eval_config(model, data, os.path.join(args.workdir, "eval-one"))
    one.limit = 1
    one.data = [shards[0]]
    fixed = timed_run(eval_pipeline.run, one, 1)

    edit_rate, eval_rate = edited / edit_s, evaluated / eval_s
    job_samples = job.result["counts"]["samples"]
    steady = job_samples / max(job.seconds - fixed.seconds, 1e-9)
    print(
        f"sama eval benchmark: {edited} held-out pairs (9 frames, 48x64), tiny model, "
        f"{args.steps} steps, 1 CPU"
    )
    print(f"{'':<26}{'samples':>8}{'seconds':>9}{'samples/s':>11}{'load s':>8}")
    print(f"{'edit alone':<26}{edited:>8}{edit_s:>9.2f}{edit_rate:>11.3f}{edit_load:>8.2f}")
    print(f"{'eval (unit fn, no Ray)':<26}{evaluated:>8}{eval_s:>9.2f}{eval_rate:>11.3f}{eval_load:>8.2f}")
    job_rate = job_samples / job.seconds
    print(f"{'eval job (Ray, 1 actor)':<26}{job_samples:>8}{job.seconds:>9.2f}{job_rate:>11.3f}")
    print(f"{'eval job, 1 sample':<26}{1:>8}{fixed.seconds:>9.2f}{'':>11}  (fixed cost per run)")
    print()
    print(f"eval / edit alone (time per sample): {edit_rate / eval_rate:.3f}x   (target <= 1.2x)")
    print(f"job steady state / edit alone:       {edit_rate / steady:.3f}x   (job minus its fixed cost)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
