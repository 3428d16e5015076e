"""Benchmark `sama prep-pairs` against the decode+encode floor of the same pairs, on 1 and 2 Ray CPUs.

Synthesises 480p (848x480, 24 fps, 3 s) video edit pairs, runs the job on a local Ray with 1 and
with 2 CPUs (alignment to 16 fps, 45 frames, the 448x896 bucket), and compares each run with the
floor: a bare PyAV decode of the same source and target frames plus a bare libx264 encode of the
job's outputs, one process per core. Prints pairs/s per core, job/floor and the speed-up.

    python bench/prep_pairs.py [--pairs 10] [--workdir /tmp/sama-bench-pairs]
"""

from __future__ import annotations

import argparse
import logging
import os
import shutil
import sys

sys.path.insert(0, os.path.abspath(os.path.join(os.path.dirname(__file__), "..")))

from bench.floor import FloorItem, floor_time, timed_run
from pipelines import prep_pairs
from sama import schema, synthetic
from sama.config import apply_override
from sama.prep import ledger
from sama.prep.pairs_job import PrepPairsConfig


def make_pairs(root: str, count: int) -> str:
    """Video edit pairs and their manifest (cached between runs in ``root``)."""
    manifest = os.path.join(root, "manifest.csv")
    marker = os.path.join(root, f".done-{count}")
    if os.path.exists(marker):
        return manifest
    shutil.rmtree(root, ignore_errors=True)
    # low_score_every > count: every pair passes the judge filter, so all are processed.
    synthetic.write_edit_pairs(
        root,
        count,
        seed=7,
        media="video",
        fps=24.0,
        seconds=3.0,
        sizes=[(480, 848)],
        low_score_every=count + 1,
    )
    open(marker, "w").close()
    return manifest


def job_config(manifest: str, output_uri: str) -> PrepPairsConfig:
    cfg = PrepPairsConfig()
    for assignment in (
        f'input.manifests=["{manifest}"]',
        f"output.uri={output_uri}",
        "input.rows_per_unit=1",
        "ray.progress_interval_s=1000",
    ):
        cfg = apply_override(cfg, assignment)
    return cfg


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--pairs", type=int, default=10)
    parser.add_argument("--workdir", default="/tmp/sama-bench-pairs")
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)

    print(f"synthesising {args.pairs} video pairs at 848x480 ...", flush=True)
    manifest = make_pairs(os.path.join(args.workdir, "in"), args.pairs)
    times, warm, summaries = {}, {}, {}
    for cpus in (1, 2):
        out = os.path.join(args.workdir, f"out-{cpus}cpu")
        timed = timed_run(prep_pairs.run, job_config(manifest, out), cpus)
        times[cpus], warm[cpus], summaries[cpus] = timed.seconds, timed.warm_up_seconds, timed.result
        print(
            f"job on {cpus} Ray CPU(s): {times[cpus]:.2f} s for {summaries[cpus].samples} pairs", flush=True
        )

    items = []
    for sample in schema.iter_samples(ledger.shards_uri(os.path.join(args.workdir, "out-2cpu"))):
        meta = sample.meta
        decodes = [
            (uri, 0.0, meta.num_frames, meta.fps, meta.height, meta.width)
            for uri in (meta.source_uri, meta.target_uri)
        ]
        items.append(FloorItem(decodes, [sample.decode_source(), sample.decode_target()], meta.fps))
    floors = {cpus: floor_time(items, cpus) for cpus in (1, 2)}

    pairs = summaries[2].samples
    print()
    print(f"{'':28}{'1 CPU':>12}{'2 CPUs':>12}")
    print(f"{'Ray Data warm-up (s)':28}{warm[1]:>12.2f}{warm[2]:>12.2f}")
    print(f"{'job time (s)':28}{times[1]:>12.2f}{times[2]:>12.2f}")
    print(f"{'floor time (s)':28}{floors[1]:>12.2f}{floors[2]:>12.2f}")
    print(f"{'job / floor':28}{times[1] / floors[1]:>12.2f}{times[2] / floors[2]:>12.2f}")
    print(f"{'pairs/s per core':28}{pairs / times[1]:>12.3f}{pairs / times[2] / 2:>12.3f}")
    print(f"{'floor pairs/s per core':28}{pairs / floors[1]:>12.3f}{pairs / floors[2] / 2:>12.3f}")
    print()
    print(f"speed-up 1 -> 2 Ray CPUs: {times[1] / times[2]:.2f}x")
    print(
        f"pairs: {pairs} ({summaries[2].samples_per_bucket}), frames per clip: {items[0].outputs[0].shape[0]}"
    )


if __name__ == "__main__":
    main()
