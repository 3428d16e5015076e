"""Benchmark `sama prep-pretext` against the physical floor, and its scaling from 1 to 2 Ray CPUs.

Synthesises 720p (1280x720, 24 fps) raw videos with moving objects, then:

* runs the job on a local Ray with 1 CPU and with 2 CPUs (49-frame clips at 16 fps, cut to the
  nearest 480p bucket: 448x896 for 16:9), timing the whole job driver call;
* measures the floor for the same work: a bare PyAV decode of the same source frames (seek to
  the clip start, decode, swscale to the cover size, crop) plus a bare libx264 encode of the job's
  actual outputs (target and perturbed source, same settings), one process per core;
* prints clips/s per core, job time vs. floor time, and the 1 -> 2 CPU speed-up side by side.

Targets from the issue: job within 1.25x of the floor; speed-up >= 1.7x. Numbers only.

    python bench/prep_pretext.py [--videos 10] [--seconds 4] [--workdir /tmp/sama-bench-pretext]
"""

from __future__ import annotations

import argparse
import logging
import os
import shutil
import sys

sys.path.insert(0, os.path.abspath(os.path.join(os.path.dirname(__file__), "..")))

from bench.floor import FloorItem, floor_time, timed_run
from pipelines import prep_pretext
from sama import schema, storage, synthetic
from sama.config import apply_override
from sama.prep import ledger
from sama.prep.pretext_job import PrepPretextConfig

HEIGHT, WIDTH, SOURCE_FPS = 720, 1280, 24.0


def make_videos(root: str, count: int, seconds: float) -> list[str]:
    """720p synthetic videos (cached between runs in ``root``)."""
    marker = os.path.join(root, f".done-{count}-{seconds}")
    if os.path.exists(marker):
        return storage.list_files(root, suffixes=(".mp4",))
    shutil.rmtree(root, ignore_errors=True)
    uris = synthetic.write_raw_videos(
        root, count, seed=2026, fps=SOURCE_FPS, seconds=seconds, sizes=[(HEIGHT, WIDTH)], captions="txt"
    )
    open(marker, "w").close()
    return uris


def job_config(input_uri: str, output_uri: str) -> PrepPretextConfig:
    cfg = PrepPretextConfig()
    for assignment in (
        f"input.uri={input_uri}",
        f"output.uri={output_uri}",
        "input.videos_per_unit=1",
        "clips.num_frames=49",
        "clips.fps=16",
        "clips.max_clips_per_video=1",
        "ray.progress_interval_s=1000",
    ):
        cfg = apply_override(cfg, assignment)
    return cfg


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--videos", type=int, default=10)
    parser.add_argument("--seconds", type=float, default=4.0)
    parser.add_argument("--workdir", default="/tmp/sama-bench-pretext")
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)

    raw = os.path.join(args.workdir, "raw")
    print(f"synthesising {args.videos} videos of {args.seconds:g} s at {WIDTH}x{HEIGHT} ...", flush=True)
    make_videos(raw, args.videos, args.seconds)

    times, warm, summaries = {}, {}, {}
    for cpus in (1, 2):
        out = os.path.join(args.workdir, f"out-{cpus}cpu")
        timed = timed_run(prep_pretext.run, job_config(raw, out), cpus)
        times[cpus], warm[cpus], summaries[cpus] = timed.seconds, timed.warm_up_seconds, timed.result
        clips = summaries[cpus].samples
        print(f"job on {cpus} Ray CPU(s): {times[cpus]:.2f} s for {clips} clips", flush=True)

    # The floor encodes exactly what the job wrote (decoded back from its shards, untimed).
    items = []
    for sample in schema.iter_samples(ledger.shards_uri(os.path.join(args.workdir, "out-2cpu"))):
        meta = sample.meta
        outputs = [sample.decode_target()]
        if sample.source is not None:
            outputs.append(sample.decode_source())
        start_s = meta.span[0] if meta.span else 0.0
        decode = (meta.source_uri, start_s, meta.num_frames, meta.fps, meta.height, meta.width)
        items.append(FloorItem(decodes=[decode], outputs=outputs, fps=meta.fps))
    floors = {cpus: floor_time(items, cpus) for cpus in (1, 2)}

    clips = summaries[2].samples
    print()
    print(f"{'':28}{'1 CPU':>12}{'2 CPUs':>12}")
    print(f"{'Ray Data warm-up (s)':28}{warm[1]:>12.2f}{warm[2]:>12.2f}")
    print(f"{'job time (s)':28}{times[1]:>12.2f}{times[2]:>12.2f}")
    print(f"{'floor time (s)':28}{floors[1]:>12.2f}{floors[2]:>12.2f}")
    print(f"{'job / floor':28}{times[1] / floors[1]:>12.2f}{times[2] / floors[2]:>12.2f}")
    print(f"{'clips/s':28}{clips / times[1]:>12.3f}{clips / times[2]:>12.3f}")
    print(f"{'clips/s per core':28}{clips / times[1]:>12.3f}{clips / times[2] / 2:>12.3f}")
    print(f"{'floor clips/s per core':28}{clips / floors[1]:>12.3f}{clips / floors[2] / 2:>12.3f}")
    print()
    print(f"speed-up 1 -> 2 Ray CPUs: {times[1] / times[2]:.2f}x (target >= 1.7x)")
    print(f"job vs floor on 2 CPUs:   {times[2] / floors[2]:.2f}x (target <= 1.25x)")
    print(f"clips: {clips}, buckets {summaries[2].samples_per_bucket}, tasks {summaries[2].samples_per_task}")


if __name__ == "__main__":
    main()
