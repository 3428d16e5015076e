"""Benchmark `sama precompute` against a bare loop doing the same work without Ray.

CPU (always): synthesises raw videos and runs prep-pretext at the quickstart's settings (9-frame
clips in 48x64 buckets), cached in the workdir, then encodes those pixel shards with the tiny
preset's encoders:

* the bare loop: the encoders loaded once (timed apart), then per sample ``decode_pair`` and, per
  batch of equal shapes, ``encode_samples``; nothing else (no shards written, no Ray);
* the job (``pipelines.precompute.run``) on a fresh local Ray with 1 and with 2 CPUs (one actor
  per CPU), its Ray start and worker warm-up timed apart; its fixed cost per run (actor start,
  encoder load, Ray Data planning) is measured by a run over one single-clip shard and reported,
  and subtracted for the steady-state figure.

Wan2.1 VAE (preset wan2.1-1.3b's autoencoder, random init) with the tiny text encoder and SigLIP
(the umT5-XXL and SigLIP-so400m random inits would cost minutes of start-up and measure nothing of
the job), pixel shards written directly from synthetic frames: on the CPU at 96x160 x 9 frames
(an encode costs seconds, as a real encode does on a GPU, so the job's fixed cost per run is
measured against real work), and with CUDA at 480x832 x 49 frames in bfloat16.

Target from the issue: job / bare <= 1.10x. Numbers only, no assertions.

    python bench/precompute.py [--videos 24] [--batch-size 4] [--workdir /tmp/sama-bench-precompute]
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import os
import shutil
import sys
import time

sys.path.insert(0, os.path.abspath(os.path.join(os.path.dirname(__file__), "..")))

from bench.floor import on_cores, timed_run
from pipelines import precompute, prep_pretext
from sama import config, schema, storage, synthetic, video
from sama.prep import ledger
from sama.prep.precompute_job import PrecomputeConfig, load_encoders, model_config_of
from sama.prep.pretext_job import PrepPretextConfig
from sama.quickstart import PREP_SETTINGS


def make_pixels(workdir: str, videos: int) -> str:
    """prep-pretext's output for ``videos`` synthetic videos (2 clips each), cached."""
    root = os.path.join(workdir, f"pixels-{videos}")
    if os.path.exists(os.path.join(root, ledger.SUMMARY_FILE)):
        return root
    shutil.rmtree(root, ignore_errors=True)
    raw = os.path.join(workdir, f"raw-{videos}")
    shutil.rmtree(raw, ignore_errors=True)
    synthetic.write_raw_videos(raw, videos, seed=2026, fps=8.0, seconds=2.5)
    cfg = config.load(PrepPretextConfig, None, [*PREP_SETTINGS, f"input.uri={raw}", f"output.uri={root}"])
    import ray

    prep_pretext.run(cfg)
    ray.shutdown()  # the benchmark starts a fresh Ray per timed run
    return root


def write_wan_pixels(root: str, clips: int, frames_per_clip: int, height: int, width: int) -> str:
    """``clips`` text-to-video samples of ``frames_per_clip`` frames at ``height x width``, four per
    shard (cached)."""
    if schema.list_shards(root):
        return root
    with schema.ShardWriter(root, "wan", schema.ShardConfig(max_samples=4)) as writer:
        for i in range(clips):
            scene = synthetic.random_scene(i)
            frames = synthetic.render(scene, frames_per_clip, 16.0, height, width)
            meta = schema.SampleMeta(
                key=schema.sample_key("wan-bench", i), task="t2v", media="video",
                instruction=synthetic.caption(scene), caption=synthetic.caption(scene), fps=16.0,
                num_frames=frames_per_clip, height=height, width=width, bucket=f"{height}x{width}",
                source_uri=f"synthetic:{i}",
            )  # fmt: skip
            writer.write(schema.Sample(meta=meta, target=video.encode_mp4(frames, 16.0, preset="ultrafast")))
    return root


def bare_loop(cfg: PrecomputeConfig, shards: list[str], device: str | None) -> tuple[float, float, int]:
    """(encoder load seconds, loop seconds, clips): decode + encode_samples per equal-shaped batch."""
    import numpy as np

    from sama.precompute import encode_samples, storage_dtype

    started = time.perf_counter()
    model_config = model_config_of(cfg.model)
    components = load_encoders(cfg.model, model_config, device=device)
    dtype = storage_dtype(cfg.dtype or model_config.torch_dtype)
    loaded = time.perf_counter() - started

    def flush(group):
        targets = np.stack([t for t, _, _ in group])
        sources = None if group[0][1] is None else np.stack([s for _, s, _ in group])
        encode_samples(components, targets, sources, [p for _, _, p in group], dtype)

    started = time.perf_counter()
    clips = 0
    for shard in shards:
        pending: dict[tuple, list] = {}
        for sample in schema.iter_samples([shard]):
            target, source = sample.decode_pair()
            key = (target.shape, None if source is None else source.shape)
            pending.setdefault(key, []).append((target, source, sample.meta.instruction))
            clips += 1
            if len(pending[key]) >= cfg.batch_size:
                flush(pending.pop(key))
        for group in pending.values():
            flush(group)
    if device == "cuda":
        import torch

        torch.cuda.synchronize()
    return loaded, time.perf_counter() - started, clips


def job_cfg(inputs: list[str], out: str, batch_size: int, *extra: str) -> PrecomputeConfig:
    overrides = [f"inputs={json.dumps(inputs)}", f"output.uri={out}", f"batch_size={batch_size}"]
    return config.load(PrecomputeConfig, None, [*overrides, "ray.progress_interval_s=1000", *extra])


def single_clip_input(pixels: str, workdir: str) -> str:
    """A one-shard, one-clip input: the job's fixed cost per run."""
    root = os.path.join(workdir, "one-clip")
    if not schema.list_shards(root):
        first = next(iter(schema.iter_samples(ledger.shards_uri(pixels))))
        with schema.ShardWriter(root, "one") as writer:
            writer.write(first)
    return root


def cpu_bench(args) -> None:
    import torch

    pixels = make_pixels(args.workdir, args.videos)
    shards = [ledger.shard_uri(pixels, s) for r in ledger.read_markers(pixels) for s in r.shards]
    one = single_clip_input(pixels, args.workdir)
    print(f"tiny preset on CPU: {len(shards)} pixel shards from {pixels}", flush=True)
    rows = {}
    for cpus in (1, 2):
        with on_cores(cpus):
            torch.set_num_threads(cpus)
            loaded, bare_s, clips = bare_loop(job_cfg([pixels], "", args.batch_size), shards, None)
        ray_started = time.perf_counter()
        timed = timed_run(
            precompute.run,
            job_cfg([pixels], os.path.join(args.workdir, f"out-{cpus}"), args.batch_size),
            cpus,
        )
        total = time.perf_counter() - ray_started
        fixed = timed_run(
            precompute.run, job_cfg([one], os.path.join(args.workdir, f"one-{cpus}"), args.batch_size), cpus
        )
        assert timed.result.samples == clips, (timed.result.samples, clips)
        steady = timed.seconds - fixed.seconds
        rows[cpus] = {
            "clips": clips,
            "bare: encoder load (s)": loaded,
            "bare: loop (s)": bare_s,
            "job: Ray start + warm-up (s)": total - timed.seconds,
            "job: run (s)": timed.seconds,
            "job: fixed cost, 1-clip run (s)": fixed.seconds,
            "job: run - fixed (s)": timed.seconds - fixed.seconds,
            "bare clips/s": clips / bare_s,
            "job clips/s": clips / timed.seconds,
            # nan: the run was no longer than its fixed cost (the work is lost in the noise).
            "job clips/s (steady)": clips / steady if steady > 0 else float("nan"),
            "job / bare": timed.seconds / bare_s,
            "job (steady) / bare": steady / bare_s if steady > 0 else float("nan"),
        }
    print()
    print(f"{'':36}{'1 CPU':>12}{'2 CPUs':>12}")
    for name in rows[1]:
        print(f"{name:36}{rows[1][name]:>12.3f}{rows[2][name]:>12.3f}")
    print("(bare loop on 2 CPUs: one process, 2 torch threads, confined to 2 cores)")


def wan_bench(args, device: str) -> None:
    """The Wan2.1 VAE (random init) with the tiny text encoder and SigLIP: bare loop vs job, on
    CUDA at 480x832 x 49 frames (bfloat16), or on the CPU at a size a CPU encodes in seconds
    (float32; 2 cores: the bare loop with 2 torch threads, the job with one 1-CPU actor per core)."""
    import torch

    from sama.models.presets import get_preset

    tiny = get_preset("tiny")
    overrides = {
        "text": dataclasses.asdict(tiny.text),
        "semantic": dataclasses.asdict(tiny.semantic),
        "transformer.text_dim": tiny.transformer.text_dim,
    }
    if device == "cuda":
        frames, height, width, clips, dtype = 49, 480, 832, args.wan_clips, "bfloat16"
    else:
        frames, height, width, clips, dtype = 9, 96, 160, args.wan_cpu_clips, "float32"
    name = f"wan-pixels-{frames}x{height}x{width}-{clips}"
    pixels = write_wan_pixels(os.path.join(args.workdir, name), clips, frames, height, width)
    shards = schema.list_shards(pixels)
    extra = [
        "model.preset=wan2.1-1.3b",
        f"model.overrides={json.dumps({**overrides, 'torch_dtype': dtype})}",
        f"dtype={dtype}",
    ]
    cfg = job_cfg([pixels], "", 1, *extra)
    if device == "cpu":
        torch.set_num_threads(2)
    loaded, bare_s, clips = bare_loop(cfg, shards, device)
    out = os.path.join(args.workdir, f"{name}-out")
    import ray

    gpus = 1 if device == "cuda" else 0
    ray.init(
        num_cpus=4 if gpus else 2,
        num_gpus=gpus,
        include_dashboard=False,
        log_to_driver=False,
        configure_logging=False,
    )
    try:
        started = time.perf_counter()
        summary = precompute.run(job_cfg([pixels], out, 1, *extra), overwrite=True)
        job_s = time.perf_counter() - started
    finally:
        ray.shutdown()
    where = torch.cuda.get_device_name() if device == "cuda" else "2 CPU cores"
    print()
    print(f"Wan2.1 VAE (random init, {dtype}) on {where}, {height}x{width} x {frames} frames:")
    print(
        f"  {clips} clips: bare {bare_s:.2f} s ({clips / bare_s:.3f} clips/s, "
        f"encoders loaded in {loaded:.1f} s apart)"
    )
    print(
        f"  job {job_s:.2f} s ({summary.samples / job_s:.3f} clips/s; actor start and encoder load "
        f"included), job / bare {job_s / bare_s:.2f}x"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--videos", type=int, default=24, help="synthetic videos (2 clips each)")
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--wan-clips", type=int, default=8, help="clips of the CUDA Wan2.1 VAE arm")
    parser.add_argument(
        "--wan-cpu-clips", type=int, default=24, help="clips of the CPU Wan2.1 VAE arm (0: skip it)"
    )
    parser.add_argument("--workdir", default="/tmp/sama-bench-precompute")
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    storage.makedirs(args.workdir)
    cpu_bench(args)
    import torch

    if args.wan_cpu_clips:
        wan_bench(args, "cpu")
    if torch.cuda.is_available():
        wan_bench(args, "cuda")
    else:
        print("\nno CUDA device: the Wan2.1 VAE arm at 480x832 x 49 frames did not run")


if __name__ == "__main__":
    main()
