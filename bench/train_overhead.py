"""Benchmark the training step under Ray Train (1 worker) against a plain PyTorch loop.

Both arms train the same model (preset ``tiny``) on the same data with the same per-worker batch
size and the same torch thread count:

* **Ray Train**: the real path, ``sama.train.launch.run_training`` (TorchTrainer, 1 worker,
  ``train_loop`` -> ``Trainer.build``/``train_step``) with its data streamed from the shards by
  Ray Data (decode tasks on the cluster's other CPUs). MLflow is off (``tracking.enabled=false``),
  validation is off (no ``val_uri``) and the only checkpoint is the final one. The per-step
  metrics the worker logs (``perf/step_s``, ``perf/data_wait_frac``, ``perf/tokens_per_s``) are
  captured by wrapping ``launch.train_loop`` in the worker and recording what ``train_loop``
  passes to ``Tracker.log_metrics`` (``log_every=1``, so every step is logged unaveraged); nothing
  else on the path changes.
* **Plain PyTorch**: one process, no Ray: the same ``SamaTrainingModule`` (same seed, same frozen
  encoders), AdamW with the same hyper-parameters, gradient clipping, the LR schedule and the EMA
  update (the same math as ``Trainer.train_step``), on batches decoded beforehand into memory from
  the same shards and grouped by shape as the trainer groups them. It replays the sequence of batch
  shapes the Ray Train worker trained on (matched by tokens per batch), so both arms time the same
  work step for step.

Reported: median step time of each arm after warmup and their ratio (target <= 1.10x), the data
wait fraction of the Ray Train run over the timed steps and amortised over a whole data pass with
its pipeline restart (target < 5%), and two less load-sensitive comparisons for a shared machine:
the fastest step of the most common batch shape, and the training thread's CPU time per step
(``time.thread_time``; its ratio to wall time is printed as a load indicator). The local Ray
starts its workers at niceness 0, as ``sama train`` does, and the plain arm runs at the worker's
niceness too (``--plain-nice``).
The Ray Train warmup covers the first data pass (one repeat of the shards, then a new Ray Data
pipeline). Ray Data decodes each later pass (``data.min_rows_per_pass`` rows) ahead of training,
on the same 2 cores here, with decode tasks at ``data.decode_niceness``: the timed steps share the
machine with that decoding, as they would not on a node whose other cores decode. The dataset
(prep-pretext on synthetic videos, 9-frame clips in 48x64 buckets, as the quickstart) is cached in
the work dir. Numbers only.

    python bench/train_overhead.py [--steps 30] [--batch 2] [--threads 1] [--workdir /tmp/sama-bench-train]
"""

from __future__ import annotations

import argparse
import hashlib
import itertools
import json
import logging
import math
import os
import shutil
import statistics
import sys
import time

sys.path.insert(0, os.path.abspath(os.path.join(os.path.dirname(__file__), "..")))

from sama import config as config_lib
from sama import schema, synthetic

RUN_NAME = "bench-train-overhead"


# ------------------------------------------------------------------------------------------------
# Data


def make_shards(workdir: str, videos: int, seconds: float, cpus: int) -> tuple[str, int]:
    """prep-pretext shards of synthetic videos (quickstart settings), cached: (video shards, rows)."""
    from sama.quickstart import PREP_SETTINGS, SIZES

    digest = hashlib.sha1(json.dumps([*PREP_SETTINGS, str(SIZES)]).encode()).hexdigest()[:10]
    key = f"{videos}-{seconds}-{digest}"
    raw = os.path.join(workdir, "raw")
    out = os.path.join(workdir, "pretext")
    shards = os.path.join(out, "shards", "video")
    marker = os.path.join(workdir, f".done-{key}")
    if os.path.exists(marker):
        with open(marker) as handle:
            return shards, int(handle.read())
    import ray

    from pipelines import prep_pretext
    from sama.prep.pretext_job import PrepPretextConfig

    for stale in (raw, out):
        shutil.rmtree(stale, ignore_errors=True)
    for old in [f for f in os.listdir(workdir) if f.startswith(".done-")]:
        os.remove(os.path.join(workdir, old))
    print(f"synthesising {videos} videos of {seconds:g} s and running prep-pretext ...", flush=True)
    synthetic.write_raw_videos(raw, videos, seed=1, fps=12.0, seconds=seconds, sizes=SIZES)
    cfg = config_lib.load(
        PrepPretextConfig,
        None,
        [*PREP_SETTINGS, f"input.uri={raw}", f"output.uri={out}", "ray.progress_interval_s=1000"],
    )
    ray.init(num_cpus=cpus, include_dashboard=False, log_to_driver=False, configure_logging=False)
    logging.getLogger("ray.data").setLevel(logging.WARNING)
    try:
        import ray.data

        ray.data.DataContext.get_current().enable_progress_bars = False
        summary = prep_pretext.run(cfg, overwrite=True)
    finally:
        ray.shutdown()
    with open(marker, "w") as handle:
        handle.write(str(summary.samples))
    return shards, summary.samples


def train_config(args: argparse.Namespace, shards: str, max_steps: int):
    """The debug recipe, narrowed to one worker, one pretext source, no tracking/validation."""
    from sama.train.recipes import recipe_path
    from sama.train.trainer import TrainConfig

    source = [{"name": "pretext", "uri": shards, "media": "video", "weight": 1.0}]
    overrides = [
        f"data.sources={json.dumps(source)}",
        "data.val_uri=null",
        f"data.video_batch_size={args.batch}",
        f"data.decode_num_cpus={args.decode_cpus}",
        f"model.preset={args.preset}",
        f"max_steps={max_steps}",
        "log_every=1",
        "scaling.num_workers=1",
        f"scaling.cpus_per_worker={args.cpus_per_worker}",
        f"scaling.torch_threads={args.threads}",
        "tracking.enabled=false",
        f"checkpoint.every_steps={max_steps}",
        f"validation.every_steps={max_steps}",
        f"run.storage_uri={os.path.join(args.workdir, 'runs')}",
        f"run.name={RUN_NAME}",
        "run.max_failures=0",
    ]
    return config_lib.load(TrainConfig, recipe_path("debug"), overrides)


def load_rows(shards: str) -> list[dict]:
    """Every sample of the shards, decoded in this process (no Ray), as the trainer's rows."""
    from sama.train.data import decode_row

    rows = []
    for sample in schema.iter_samples(shards):
        row = decode_row({"__key__": sample.key, **sample.members()})
        if not row["error"]:
            rows.append(row)
    return rows


# ------------------------------------------------------------------------------------------------
# Ray Train arm


def _recording_loop(records_path: str):
    """``launch.train_loop`` plus a record of every metrics dict it logs (runs in the worker)."""

    def loop(loop_config):
        import json as _json
        import os as _os
        import time as _time

        import sama.tracking
        from sama.train import launch as _launch

        records = []
        original = sama.tracking.Tracker.log_metrics

        def log_metrics(self, metrics, step):
            if "perf/step_s" in metrics:
                records.append(
                    {
                        "wall": _time.time(),
                        "cpu": _time.thread_time(),
                        "nice": _os.nice(0),
                        "step": step,
                        **metrics,
                    }
                )
            return original(self, metrics, step)

        sama.tracking.Tracker.log_metrics = log_metrics
        try:
            _launch.train_loop(loop_config)
        finally:
            sama.tracking.Tracker.log_metrics = original
            with open(records_path, "w") as handle:
                _json.dump(records, handle)

    return loop


def ray_arm(args: argparse.Namespace, shards: str, max_steps: int) -> dict:
    import ray

    from sama.train import launch

    cfg = train_config(args, shards, max_steps)
    shutil.rmtree(os.path.join(args.workdir, "runs"), ignore_errors=True)
    records_path = os.path.join(args.workdir, "ray_records.json")
    if os.path.exists(records_path):
        os.remove(records_path)
    if __name__ != "__main__":  # imported: ship the wrapper by value (workers cannot import bench/)
        import ray.cloudpickle

        ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])
    load_before = os.getloadavg()[0]
    started = time.time()
    # As ``sama train`` starts a local cluster: workers at niceness 0 (Ray's default is 15), the
    # decode tasks lower their own priority (data.decode_niceness).
    os.environ.setdefault("RAY_worker_niceness", "0")
    ray.init(num_cpus=args.cpus, include_dashboard=False, log_to_driver=args.verbose, configure_logging=False)
    init_s = time.time() - started
    original = launch.train_loop
    launch.train_loop = _recording_loop(records_path)
    try:
        fit_started = time.time()
        launch.run_training(cfg)
        fit_s = time.time() - fit_started
    finally:
        launch.train_loop = original
        ray.shutdown()
    with open(records_path) as handle:
        records = json.load(handle)
    return {
        "records": records,
        "init_s": init_s,
        "fit_s": fit_s,
        "first_step_s": records[0]["wall"] - fit_started,
        "after_last_step_s": fit_started + fit_s - records[-1]["wall"],
        "load": (load_before, os.getloadavg()[0]),
        "nice": os.nice(0),
    }


# ------------------------------------------------------------------------------------------------
# Plain PyTorch arm


def _tokens(transformer, encoded) -> int:
    """Tokens of an encoded batch, counted as ``Trainer._tokens`` counts them."""
    p_t, p_h, p_w = transformer.config.patch_size
    total = 0
    for latents in (encoded.target_latents, encoded.source_latents):
        if latents is not None:
            b, _, t, h, w = latents.shape
            total += b * (t // p_t) * (h // p_h) * (w // p_w)
    if encoded.semantic_tokens is not None:
        total += encoded.semantic_tokens.shape[0] * encoded.semantic_tokens.shape[1]
    return total


def plain_arm(args: argparse.Namespace, cfg, rows: list[dict], token_sequence: list[int], nice: int) -> dict:
    """The same training math in a bare loop over in-memory batches matching ``token_sequence``."""
    import torch

    from sama.models.presets import build_model
    from sama.models.training import SamaBatch, SamaTrainingModule
    from sama.train.data import collate, shape_key
    from sama.train.trainer import lr_lambda, resolve_model_config

    torch.set_num_threads(args.threads)
    torch.manual_seed(cfg.seed)
    components = build_model(resolve_model_config(cfg.model))
    module = SamaTrainingModule(components, cfg.objective)
    module.train()
    transformer = module.transformer
    params = [p for p in transformer.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(
        params,
        lr=cfg.optim.lr,
        betas=tuple(cfg.optim.betas),
        eps=cfg.optim.eps,
        weight_decay=cfg.optim.weight_decay,
    )
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lr_lambda(int(cfg.optim.warmup_frac * cfg.max_steps))
    )
    shadow = [p.detach().clone().float() for p in params]
    generator = torch.Generator().manual_seed(cfg.seed)

    # Batches of every (shape, size) the worker can form, keyed by their tokens (untimed).
    groups: dict[tuple, list[dict]] = {}
    for row in rows:
        groups.setdefault(shape_key(row), []).append(row)
    by_tokens: dict[int, list[dict]] = {}
    for group in groups.values():
        one = collate(group[:1])
        with torch.no_grad():
            encoded = module.encode_batch(
                SamaBatch(prompts=one["instructions"], target=one["target"], source=one["source"]), generator
            )
        per_sample = _tokens(transformer, encoded)
        # A pass repeats a small source's shards, so a batch may hold one sample twice: cycle
        # through the group to form batches of every size the worker can.
        for size in range(1, cfg.data.video_batch_size + 1):
            cycled = [group[i % len(group)] for i in range(max(len(group), size) // size * size)]
            batches = [collate(cycled[i : i + size]) for i in range(0, len(cycled), size)]
            by_tokens.setdefault(per_sample * size, []).extend(batches)
    missing = sorted(set(token_sequence) - set(by_tokens))
    if missing:
        raise RuntimeError(f"no in-memory batch has {missing} tokens (known: {sorted(by_tokens)})")
    used = {t: 0 for t in by_tokens}

    def next_batch(tokens: int) -> dict:
        batches = by_tokens[tokens]
        batch = batches[used[tokens] % len(batches)]
        used[tokens] += 1
        return batch

    def step(batch: dict) -> None:
        out = module(
            SamaBatch(prompts=batch["instructions"], target=batch["target"], source=batch["source"]),
            generator,
        )
        out.loss.backward()
        clip = cfg.optim.grad_clip
        float(torch.nn.utils.clip_grad_norm_(params, clip if clip > 0 else float("inf")))
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        scheduler.step()
        with torch.no_grad():
            torch._foreach_lerp_(shadow, [p.detach().float() for p in params], 1.0 - cfg.ema_decay)

    if nice > os.nice(0):  # compete with other load on this machine as the Ray worker did
        os.nice(nice - os.nice(0))
    load_before = os.getloadavg()[0]
    common = max(by_tokens, key=lambda t: len(by_tokens[t]))
    for _ in range(args.plain_warmup):
        step(next_batch(common))
    wall, cpu = [], []
    for tokens in token_sequence:
        batch = next_batch(tokens)
        started, cpu_started = time.perf_counter(), time.thread_time()
        step(batch)
        wall.append(time.perf_counter() - started)
        cpu.append(time.thread_time() - cpu_started)
    return {
        "wall": wall,
        "cpu": cpu,
        "params": sum(p.numel() for p in params),
        "shapes": {str(k[1:]): len(v) for k, v in groups.items()},
        "load": (load_before, os.getloadavg()[0]),
        "nice": os.nice(0),
    }


# ------------------------------------------------------------------------------------------------


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--preset", default="tiny")
    parser.add_argument("--steps", type=int, default=30, help="timed steps per arm (after warmup)")
    parser.add_argument(
        "--warmup",
        type=int,
        default=None,
        help="Ray Train steps not timed (default: the first, short data pass + 2)",
    )
    parser.add_argument("--plain-warmup", type=int, default=3, help="plain-loop steps not timed")
    parser.add_argument("--batch", type=int, default=2, help="per-worker video batch size")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (both arms)")
    parser.add_argument("--cpus", type=int, default=os.cpu_count(), help="CPUs of the local Ray")
    parser.add_argument("--cpus-per-worker", type=float, default=1.0)
    parser.add_argument("--decode-cpus", type=float, default=0.5, help="data.decode_num_cpus")
    parser.add_argument("--videos", type=int, default=12, help="synthetic videos (2 clips each)")
    parser.add_argument("--seconds", type=float, default=2.5)
    parser.add_argument("--workdir", default="/tmp/sama-bench-train")
    parser.add_argument(
        "--plain-nice",
        type=int,
        default=None,
        help="niceness of the plain arm (default: the Ray Train worker's, 15 unless RAY_worker_niceness)",
    )
    parser.add_argument("--verbose", action="store_true", help="show the Ray workers' logs")
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    os.makedirs(args.workdir, exist_ok=True)
    os.environ.setdefault("RAY_TRAIN_ENABLE_V2_MIGRATION_WARNINGS", "0")
    started = time.time()

    shards, samples = make_shards(args.workdir, args.videos, args.seconds, args.cpus)
    warmup = args.warmup if args.warmup is not None else math.ceil(samples / args.batch) + 2
    max_steps = warmup + args.steps

    print(f"Ray Train arm: {max_steps} steps ({warmup} warmup) ...", flush=True)
    result = ray_arm(args, shards, max_steps)
    records = result["records"]
    timed = [r for r in records if r["step"] > warmup]
    ray_wall = [r["perf/step_s"] for r in timed]
    ray_wait = [r["perf/data_wait_frac"] * r["perf/step_s"] for r in timed]
    pairs = [(a, b) for a, b in itertools.pairwise(records) if b["step"] > warmup]
    ray_iter = [b["wall"] - a["wall"] for a, b in pairs]
    ray_cpu = [b["cpu"] - a["cpu"] for a, b in pairs]
    tokens = [round(r["perf/tokens_per_s"] * r["perf/step_s"]) for r in timed]

    print(f"plain PyTorch arm: {len(tokens)} steps ({args.plain_warmup} warmup) ...", flush=True)
    cfg = train_config(args, shards, max_steps)
    rows = load_rows(shards)
    worker_nice = records[0]["nice"]
    plain = plain_arm(args, cfg, rows, tokens, worker_nice if args.plain_nice is None else args.plain_nice)

    import ray as ray_lib
    import torch

    med = statistics.median
    all_wait = sum(r["perf/data_wait_frac"] * r["perf/step_s"] for r in records)
    all_step = sum(r["perf/step_s"] for r in records)
    print()
    print("configuration")
    print(f"  model                      preset {args.preset}, {plain['params'] / 1e6:.2f} M trainable")
    print(
        f"  data                       {samples} prep-pretext clips from {args.videos} synthetic videos, "
        f"9 frames, 48x64/64x48 buckets; shapes (target, source): {plain['shapes']}"
    )
    print(f"  per-worker batch           {args.batch} videos (same batch shapes in both arms, step for step)")
    print(f"  torch threads              {args.threads} (both arms)")
    print(
        f"  Ray                        {ray_lib.__version__}, {args.cpus} CPUs, "
        f"1 worker x {args.cpus_per_worker} CPU, decode tasks {args.decode_cpus} CPU"
    )
    print(f"  torch                      {torch.__version__}, CPU, fp32")
    print(
        f"  steps                      Ray Train {max_steps} ({warmup} warmup), "
        f"plain {args.plain_warmup} warmup; {len(timed)} timed in each"
    )
    print(
        f"  load average (1 min)       Ray arm {result['load'][0]:.2f} -> {result['load'][1]:.2f}, "
        f"plain arm {plain['load'][0]:.2f} -> {plain['load'][1]:.2f} ({os.cpu_count()} cores)"
    )
    print(f"  niceness                   Ray Train worker {worker_nice}, plain arm {plain['nice']}")
    if max(*result["load"], *plain["load"]) > os.cpu_count():
        print(
            "  NOTE: the machine was loaded beyond its cores during the run: wall times are noisy; "
            "train-thread CPU per step is the less load-sensitive comparison"
        )
    print()
    print(f"{'':38}{'Ray Train':>12}{'plain':>12}{'ratio':>10}")

    def line(name: str, a: float, b: float, fmt: str = ".3f") -> None:
        print(f"{name:38}{a:>12{fmt}}{b:>12{fmt}}{a / b:>9.2f}x")

    line("median step (s)  [perf/step_s]", med(ray_wall), med(plain["wall"]))
    line("mean step (s)", statistics.fmean(ray_wall), statistics.fmean(plain["wall"]))
    line("median loop iteration (s)", med(ray_iter), med(plain["wall"]))
    common = max(set(tokens), key=tokens.count)
    line(
        f"fastest step, {tokens.count(common)}x{common} tokens (s)",
        min(w for w, t in zip(ray_wall, tokens, strict=True) if t == common),
        min(w for w, t in zip(plain["wall"], tokens, strict=True) if t == common),
    )
    line("median train-thread CPU / step (s)", med(ray_cpu), med(plain["cpu"]))
    print(
        f"{'train-thread CPU / wall':38}{sum(ray_cpu) / sum(ray_iter):>12.2f}"
        f"{sum(plain['cpu']) / sum(plain['wall']):>12.2f}"
    )
    print(
        f"{'min / max step (s)':38}{min(ray_wall):>6.3f}/{max(ray_wall):<5.3f}"
        f"{min(plain['wall']):>6.3f}/{max(plain['wall']):<5.3f}"
    )
    print()
    print("Ray Train data wait")
    print(
        f"  timed steps                {100 * sum(ray_wait) / sum(ray_wall):.2f}% of step time "
        f"(median {1000 * med(ray_wait):.1f} ms, max {1000 * max(ray_wait):.1f} ms per step)"
    )
    print(
        f"  all steps incl. warmup     {100 * all_wait / all_step:.2f}% "
        f"(first step {1000 * records[0]['perf/data_wait_frac'] * records[0]['perf/step_s']:.0f} ms)"
    )
    stalls = ", ".join(
        f"step {r['step']} {r['perf/data_wait_frac'] * r['perf/step_s']:.1f} s"
        for r in records
        if r["perf/data_wait_frac"] * r["perf/step_s"] > 1.0
    )
    print(f"  stalls > 1 s (pass starts) {stalls or 'none'}")
    # Steady state: a pass of min_rows_per_pass rows or more, then a new Ray Data pipeline (the
    # 2nd pass start, inside warmup, is what every later pass start costs).
    min_rows = cfg.data.min_rows_per_pass
    pass_steps = math.ceil(min_rows / samples) * samples // args.batch
    restart = max((r["perf/data_wait_frac"] * r["perf/step_s"] for r in records[1:warmup]), default=0.0)
    mean_wait, mean_step = statistics.fmean(ray_wait), statistics.fmean(ray_wall)
    amortised = ((pass_steps - 1) * mean_wait + restart) / (
        (pass_steps - 1) * mean_step + restart + mean_step
    )
    print(
        f"  amortised over a pass      {100 * amortised:.2f}% (a pass = {pass_steps} steps here, then a "
        f"pipeline restart like the 2nd pass start, {restart:.1f} s)"
    )
    print(
        f"  startup                    ray.init {result['init_s']:.1f} s, fit start -> first step done "
        f"{result['first_step_s']:.1f} s, last step -> fit returns {result['after_last_step_s']:.1f} s "
        f"(checkpoint, export, teardown), fit {result['fit_s']:.1f} s"
    )
    print()
    ratio = med(ray_wall) / med(plain["wall"])
    print(f"step time Ray Train / plain (median):  {ratio:.2f}x (target <= 1.10x)")
    print(
        f"data wait fraction (timed steps):      {100 * sum(ray_wait) / sum(ray_wall):.2f}% (target < 5%; "
        f"{100 * amortised:.2f}% with pass restarts amortised)"
    )
    cpu_ratio = med(ray_cpu) / med(plain["cpu"])
    print(f"train-thread CPU Ray Train / plain:    {cpu_ratio:.2f}x (load-insensitive)")
    print(f"total bench time:                      {time.time() - started:.0f} s")


if __name__ == "__main__":
    main()
