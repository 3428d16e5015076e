"""Benchmark the training step under Ray Train (1 worker) against a plain PyTorch loop.

Both arms train the same model (preset ``tiny``) on the same data with the same per-worker batch
size and the same torch thread count:

* **Ray Train**: the real path, ``sama.train.launch.run_training`` (TorchTrainer, 1 worker,
  ``train_loop`` -> ``Trainer.build``/``train``) with its data streamed from the shards by Ray
  Data (decode tasks on the cluster's other CPUs). MLflow is off (``tracking.enabled=false``),
  validation is off (no ``val_uri``) and the only checkpoint is the final one. The per-step
  metrics the worker logs (``perf/step_s``, ``perf/data_wait_frac``, ``perf/tokens_per_s``) are
  captured by wrapping ``launch.train_loop`` in the worker and recording what ``Trainer.train``
  passes to ``Tracker.log_metrics`` (``log_every=1``, so every step is logged unaveraged); nothing
  else on the path changes.
* **Plain PyTorch**: no Ray: the same ``sama.train.trainer.Trainer`` (same seed, so the same
  initial weights and frozen encoders), built on samples decoded beforehand into memory from the
  same shards, runs ``Trainer.train_step`` on the Ray Train worker's own micro-batches: it replays
  the worker's steps in order, from step 0, each on the same samples (by key, collated in the
  timed step as the trainer collates in its own) with the same per-step random generators (noise,
  timesteps, caption dropout), so both arms do the same work step for step. Both arms leave their
  first steps (the Ray Train warmup) untimed.

Two kinds of rounds. A **round** is one Ray Train run, then the plain loop replaying its timed
steps; over ``--rounds`` (3) such rounds it reports, per round, each arm's median step time after
warmup, their ratio, the ratio of the training thread's CPU time per step (``time.thread_time``),
and the load beside each arm's timed steps (cores busy with anything else and cores stolen by the
hypervisor, from ``/proc/stat``; the training thread's kernel time and page faults), then the
pooled step times and the Ray Train data-wait fraction over the timed steps and amortised over a
whole data pass with its pipeline restart (target < 5%). On a shared VM the machine's speed drifts
by 10-20% between minutes, which moves the ratio of two runs made a minute apart. A **paired
round** (``--paired-rounds``, 2) removes that drift: the plain loop runs in its own process in
lockstep with the Ray Train worker (named pipes), each worker step followed by the same step of
the plain loop, so both arms see the same machine, step by step; it reports the ratio of the median
step times and the median of the per-step ratios (target <= 1.10x). Waiting for its partner gives
the worker's data pipeline time to read ahead, so data wait is taken from the unpaired rounds. The
local Ray starts its workers at niceness 0, as ``sama train`` does, and the plain arm runs at the
worker's niceness too (``--plain-nice``).
The Ray Train warmup covers the first data pass (one repeat of the shards, then a new Ray Data
pipeline). Ray Data decodes each later pass (``data.min_rows_per_pass`` rows) ahead of training,
on the same 2 cores here, with decode tasks at ``data.decode_niceness``: the timed steps share the
machine with that decoding, as they would not on a node whose other cores decode. The dataset
(prep-pretext on synthetic videos, 9-frame clips in 48x64 buckets, as the quickstart) is cached in
the work dir. Numbers only.

    python bench/train_overhead.py [--rounds 3] [--paired-rounds 2] [--steps 30] [--batch 2] [--threads 1]
                                   [--workdir /tmp/sama-bench-train]
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


def load_rows(shards: str) -> list:
    """Every sample of the shards, decoded in this process (no Ray), as the trainer's rows
    (:class:`sama.train.data.TrainingRow`)."""
    from sama.train.data import TrainingRow, decode_row

    rows = []
    for sample in schema.iter_samples(shards):
        row = TrainingRow.from_ray(decode_row({"__key__": sample.key, **sample.members()}))
        if not row.error:
            rows.append(row)
    return rows


# ------------------------------------------------------------------------------------------------
# Machine load


class CpuSampler:
    """Samples the machine's busy and stolen CPU time (``/proc/stat``) in a background thread, so
    the load beside each arm's timed steps can be printed next to its step times."""

    def __init__(self, interval_s: float = 0.2):
        import threading

        self.interval_s = interval_s
        self.samples: list[tuple[float, float, float]] = []  # (wall, busy CPU-s, stolen CPU-s)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="cpu-sampler", daemon=True)

    @staticmethod
    def read() -> tuple[float, float] | None:
        try:
            with open("/proc/stat") as handle:
                fields = [int(v) for v in handle.readline().split()[1:]]
        except (OSError, ValueError):
            return None
        tick = os.sysconf("SC_CLK_TCK")
        # user nice system idle iowait irq softirq steal ...: busy excludes idle, iowait and steal.
        busy = sum(fields[:3]) + sum(fields[5:7])
        return busy / tick, (fields[7] if len(fields) > 7 else 0) / tick

    def _run(self) -> None:
        while not self._stop.wait(self.interval_s):
            reading = self.read()
            if reading is None:
                return
            self.samples.append((time.time(), *reading))

    def __enter__(self) -> CpuSampler:
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()

    def window(self, start: float, end: float) -> tuple[float, float] | None:
        """(busy, stolen) CPU-seconds between the samples nearest ``start`` and ``end``."""
        inside = [s for s in self.samples if start <= s[0] <= end]
        if len(inside) < 2:
            return None
        first, last = inside[0], inside[-1]
        span = last[0] - first[0]
        scale = (end - start) / span if span > 0 else 1.0
        return (last[1] - first[1]) * scale, (last[2] - first[2]) * scale


def beside_load(sampler: CpuSampler, start: float, end: float, train_cpu_s: float) -> dict:
    """Cores busy with anything but the timed training thread, and cores stolen by the host."""
    measured = sampler.window(start, end)
    if measured is None:
        return {"other_cores": float("nan"), "steal_cores": float("nan")}
    busy, stolen = measured
    seconds = end - start
    return {"other_cores": max(0.0, busy - train_cpu_s) / seconds, "steal_cores": stolen / seconds}


def _thread_usage() -> dict[str, float]:
    """The calling thread's kernel CPU time and page faults (Linux ``RUSAGE_THREAD``)."""
    import resource

    if not hasattr(resource, "RUSAGE_THREAD"):
        return {"sys_s": 0.0, "minor_faults": 0, "major_faults": 0}
    usage = resource.getrusage(resource.RUSAGE_THREAD)
    return {"sys_s": usage.ru_stime, "minor_faults": usage.ru_minflt, "major_faults": usage.ru_majflt}


def _usage_delta(before: dict, after: dict) -> dict[str, float]:
    return {key: after[key] - before[key] for key in ("sys_s", "minor_faults", "major_faults")}


def _summed(deltas: list[dict]) -> dict[str, float]:
    return {key: sum(d[key] for d in deltas) for key in ("sys_s", "minor_faults", "major_faults")}


# ------------------------------------------------------------------------------------------------
# Ray Train arm


class _Baton:
    """The Ray Train worker's side of the lockstep with :func:`paired_plain_process` (named pipes)."""

    def __init__(self, fifo_dir: str, timeout_s: float = 300.0):
        self.fifo_dir = fifo_dir
        self.timeout_s = timeout_s
        self.requests: int | None = None
        self.replies: int | None = None

    def _open(self) -> None:
        deadline = time.monotonic() + self.timeout_s
        while True:  # non-blocking: fails with ENXIO until the plain process has opened its end
            try:
                self.requests = os.open(os.path.join(self.fifo_dir, "to_plain"), os.O_WRONLY | os.O_NONBLOCK)
                break
            except OSError:
                if time.monotonic() > deadline:
                    raise TimeoutError("the paired plain loop never opened its pipe") from None
                time.sleep(0.05)
        os.set_blocking(self.requests, True)
        self.replies = os.open(os.path.join(self.fifo_dir, "to_ray"), os.O_RDONLY)

    def pass_step(self, step: int, micro_keys: list[list[str]]) -> None:
        """Hand trainer step ``step`` (0-based, its samples' keys) to the plain loop; wait until it ran."""
        import select

        if self.requests is None:
            self._open()
        os.write(self.requests, (json.dumps({"step": step, "keys": micro_keys}) + "\n").encode())
        ready, _, _ = select.select([self.replies], [], [], self.timeout_s)
        if not ready or not os.read(self.replies, 64):
            raise RuntimeError("the paired plain loop did not answer")

    def close(self) -> None:
        for fd in (self.requests, self.replies):
            if fd is not None:
                os.close(fd)


def _recording_loop(records_path: str, fifo_dir: str | None = None):
    """``launch.train_loop`` plus a record of every metrics dict it logs (runs in the worker);
    with ``fifo_dir``, each step is followed by one step of the paired plain loop."""

    def loop(loop_config):
        import json as _json
        import os as _os
        import time as _time

        import sama.tracking
        from sama.train import data as _data
        from sama.train import launch as _launch

        records = []
        micro_keys = []  # the keys of each micro-batch since the last logged step
        original = sama.tracking.Tracker.log_metrics
        original_next = _data.MixedBatchIterator.next
        baton = _Baton(fifo_dir) if fifo_dir else None

        def next_batch(self, *args, **kwargs):
            batch = original_next(self, *args, **kwargs)
            micro_keys.append(list(batch.keys))
            return batch

        def log_metrics(self, metrics, step):
            if "perf/step_s" in metrics:
                records.append(
                    {
                        "wall": _time.time(),
                        "cpu": _time.thread_time(),
                        **_thread_usage(),
                        "nice": _os.nice(0),
                        "step": step,
                        "keys": list(micro_keys),
                        **metrics,
                    }
                )
                micro_keys.clear()
                if baton is not None:
                    baton.pass_step(step - 1, records[-1]["keys"])
            return original(self, metrics, step)

        sama.tracking.Tracker.log_metrics = log_metrics
        _data.MixedBatchIterator.next = next_batch
        try:
            _launch.train_loop(loop_config)
        finally:
            sama.tracking.Tracker.log_metrics = original
            _data.MixedBatchIterator.next = original_next
            if baton is not None:
                baton.close()
            with open(records_path, "w") as handle:
                _json.dump(records, handle)

    return loop


def ray_arm(args: argparse.Namespace, shards: str, max_steps: int, fifo_dir: str | None = None) -> dict:
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
    started = time.time()
    # As ``sama train`` starts a local cluster: workers at niceness 0 (Ray's default is 15), the
    # decode tasks lower their own priority (data.decode_niceness).
    os.environ.setdefault("RAY_worker_niceness", "0")
    ray.init(num_cpus=args.cpus, include_dashboard=False, log_to_driver=args.verbose, configure_logging=False)
    init_s = time.time() - started
    original = launch.train_loop
    launch.train_loop = _recording_loop(records_path, fifo_dir)
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
        "nice": os.nice(0),
    }


# ------------------------------------------------------------------------------------------------
# Plain PyTorch arm


class PlainLoop:
    """The plain arm: a :class:`sama.train.trainer.Trainer` without Ray, built on ``rows`` (the
    shards decoded beforehand), replaying the Ray Train worker's steps in order: step i on the very
    samples the worker trained on at step i, looked up by key."""

    def __init__(self, cfg, rows: list):
        from sama.train.trainer import Trainer

        self.trainer = Trainer(cfg)
        self.trainer.build({source.name: rows for source in cfg.data.sources})
        self.rows = {row.key: row for row in rows}

    def check(self, steps_keys: list[list[list[str]]]) -> None:
        missing = sorted({k for micro in steps_keys for keys in micro for k in keys} - set(self.rows))
        if missing:
            raise RuntimeError(
                f"{len(missing)} trained sample(s) are not among the decoded rows: {missing[:3]}"
            )

    def timed_step(self, micro_keys: list[list[str]], step: int) -> dict:
        """Trainer step ``step`` (0-based, the next one) on these samples: wall and thread CPU
        seconds, kernel time and page faults. Collation is timed, as the trainer's step time
        includes it."""
        from sama.train.data import collate

        trainer = self.trainer
        if step != trainer.step:
            raise RuntimeError(
                f"the plain loop replays steps in order: asked for step {step} at step {trainer.step}"
            )
        started, cpu_started, usage_started = time.perf_counter(), time.thread_time(), _thread_usage()
        text_length = int(trainer.model_config.text.max_length)
        trainer.train_step([[collate([self.rows[k] for k in keys], text_length) for keys in micro_keys]])
        return {
            "wall": time.perf_counter() - started,
            "cpu": time.thread_time() - cpu_started,
            **_usage_delta(usage_started, _thread_usage()),
        }


def _set_nice(nice: int) -> None:
    if nice > os.nice(0):  # compete with other load on this machine as the Ray worker did
        os.nice(nice - os.nice(0))


def _plain_result(loop: PlainLoop, steps: list[dict], window: tuple[float, float]) -> dict:
    return {
        "wall": [s["wall"] for s in steps],
        "cpu": [s["cpu"] for s in steps],
        **_summed(steps),
        "window": window,
        "params": sum(p.numel() for p in loop.trainer.params),
        "nice": os.nice(0),
    }


def plain_arm(cfg, rows: list, records: list[dict], warmup: int, nice: int) -> dict:
    """The plain loop on its own, replaying the steps ``records`` of a Ray Train run; the first
    ``warmup`` are not timed."""
    loop = PlainLoop(cfg, rows)
    loop.check([r["keys"] for r in records])
    _set_nice(nice)
    steps = []
    for index, record in enumerate(records):
        if index == warmup:
            window_start = time.time()
        steps.append(loop.timed_step(record["keys"], record["step"] - 1))
    return _plain_result(loop, steps[warmup:], (window_start, time.time()))


def paired_plain_process(cfg_dict: dict, shards: str, fifo_dir: str, nice: int) -> None:
    """The plain loop in lockstep with a Ray Train worker (a process of its own): after each of the
    worker's steps it reads that step's number and sample keys, runs the same step and answers, so
    the two arms alternate step by step under the same machine load."""
    from sama.train.trainer import TrainConfig

    logging.basicConfig(level=logging.WARNING)
    cfg = config_lib.from_dict(TrainConfig, cfg_dict)
    loop = PlainLoop(cfg, load_rows(shards))
    _set_nice(nice)
    steps = []
    started = time.time()
    with (
        open(os.path.join(fifo_dir, "to_plain")) as requests,
        open(os.path.join(fifo_dir, "to_ray"), "w") as replies,
    ):
        for line in requests:
            request = json.loads(line)
            steps.append(loop.timed_step(request["keys"], request["step"]))
            replies.write("done\n")
            replies.flush()
    with open(os.path.join(fifo_dir, "plain.json"), "w") as handle:
        json.dump(_plain_result(loop, steps, (started, time.time())), handle)


# ------------------------------------------------------------------------------------------------


def run_round(args: argparse.Namespace, shards: str, warmup: int, max_steps: int, rows, sampler) -> dict:
    """One Ray Train run, then the plain loop replaying its timed steps."""
    result = ray_arm(args, shards, max_steps)
    records = result["records"]
    timed = records[warmup:]  # log_every=1: records[i] is step i + 1
    ray = {
        "wall": [r["perf/step_s"] for r in timed],
        "wait": [r["perf/data_wait_frac"] * r["perf/step_s"] for r in timed],
        "iter": [b["wall"] - a["wall"] for a, b in itertools.pairwise(records[warmup - 1 :])],
        "cpu": [b["cpu"] - a["cpu"] for a, b in itertools.pairwise(records[warmup - 1 :])],
        **_summed([_usage_delta(a, b) for a, b in itertools.pairwise(records[warmup - 1 :])]),
        "tokens": [round(r["perf/tokens_per_s"] * r["perf/step_s"]) for r in timed],
    }
    ray.update(beside_load(sampler, records[warmup - 1]["wall"], records[-1]["wall"], sum(ray["cpu"])))
    cfg = train_config(args, shards, max_steps)
    nice = records[0]["nice"] if args.plain_nice is None else args.plain_nice
    plain = plain_arm(cfg, rows, records, warmup, nice)
    plain.update(beside_load(sampler, *plain["window"], sum(plain["cpu"])))
    return {"cfg": cfg, "result": result, "records": records, "ray": ray, "plain": plain}


def paired_round(args: argparse.Namespace, shards: str, warmup: int, max_steps: int) -> dict:
    """One Ray Train run with the plain loop in lockstep: step i of each arm back to back."""
    import multiprocessing

    fifo_dir = os.path.join(args.workdir, "lockstep")
    shutil.rmtree(fifo_dir, ignore_errors=True)
    os.makedirs(fifo_dir)
    for name in ("to_plain", "to_ray"):
        os.mkfifo(os.path.join(fifo_dir, name))
    cfg = train_config(args, shards, max_steps)
    nice = 0 if args.plain_nice is None else args.plain_nice
    plain_process = multiprocessing.get_context("spawn").Process(
        target=paired_plain_process, args=(config_lib.to_dict(cfg), shards, fifo_dir, nice)
    )
    plain_process.start()
    try:
        result = ray_arm(args, shards, max_steps, fifo_dir)
        plain_process.join(timeout=120)
    finally:
        if plain_process.is_alive():
            plain_process.terminate()
    with open(os.path.join(fifo_dir, "plain.json")) as handle:
        plain = json.load(handle)
    records = result["records"]
    if len(plain["wall"]) != len(records):
        raise RuntimeError(
            f"the plain loop ran {len(plain['wall'])} steps for {len(records)} Ray Train steps"
        )
    timed = slice(warmup, None)
    ray = {
        "wall": [r["perf/step_s"] for r in records[timed]],
        "cpu": [b["cpu"] - a["cpu"] for a, b in itertools.pairwise(records[warmup - 1 :])],
    }
    return {"ray": ray, "plain": {"wall": plain["wall"][timed], "cpu": plain["cpu"][timed]}}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--preset", default="tiny")
    parser.add_argument("--steps", type=int, default=30, help="timed steps per arm and round (after warmup)")
    parser.add_argument(
        "--rounds",
        type=int,
        default=3,
        help="Ray Train run + plain loop pairs; the target is checked on the median round",
    )
    parser.add_argument(
        "--paired-rounds",
        type=int,
        default=2,
        help="Ray Train runs with the plain loop in lockstep (step i of each arm back to back)",
    )
    parser.add_argument(
        "--warmup",
        type=int,
        default=None,
        help="steps not timed in either arm (default: the first, short data pass + 2)",
    )
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
    if args.rounds < 1 or args.steps < 1 or args.paired_rounds < 0:
        parser.error("--rounds and --steps must be >= 1, --paired-rounds >= 0")
    logging.basicConfig(level=logging.WARNING)
    os.makedirs(args.workdir, exist_ok=True)
    os.environ.setdefault("RAY_TRAIN_ENABLE_V2_MIGRATION_WARNINGS", "0")
    started = time.time()

    shards, samples = make_shards(args.workdir, args.videos, args.seconds, args.cpus)
    warmup = max(1, args.warmup if args.warmup is not None else math.ceil(samples / args.batch) + 2)
    max_steps = warmup + args.steps
    rows = load_rows(shards)

    rounds = []
    with CpuSampler() as sampler:
        for index in range(args.rounds):
            print(
                f"round {index + 1}/{args.rounds}: Ray Train {max_steps} steps ({warmup} warmup), then the "
                "plain loop replaying them ...",
                flush=True,
            )
            rounds.append(run_round(args, shards, warmup, max_steps, rows, sampler))
    paired = []
    for index in range(args.paired_rounds):
        print(
            f"paired round {index + 1}/{args.paired_rounds}: Ray Train {max_steps} steps, each followed by "
            "one step of the plain loop in its own process ...",
            flush=True,
        )
        paired.append(paired_round(args, shards, warmup, max_steps))
    report(args, samples, warmup, max_steps, rounds, shapes(rows))
    report_paired(paired)
    raw = os.path.join(args.workdir, "rounds.json")
    with open(raw, "w") as handle:
        json.dump(
            {
                "rounds": [{"ray": r["ray"], "plain": r["plain"], "records": r["records"]} for r in rounds],
                "paired": paired,
            },
            handle,
        )
    print(f"per-step figures of every round:        {raw}")
    print(f"total bench time:                      {time.time() - started:.0f} s")


def report_paired(paired: list[dict]) -> None:
    """Lockstep rounds: both arms see the same machine state, step for step."""
    if not paired:
        return
    med = statistics.median
    print()
    print("paired rounds (lockstep: each Ray Train step, then the same step of the plain loop)")
    print(
        f"  {'round':<7}{'Ray Train':>10}{'plain':>10}{'ratio':>8}"
        f"{'median of step ratios':>24}{'CPU ratio':>11}"
    )
    ratios = []
    for index, r in enumerate(paired, 1):
        ray, plain = r["ray"], r["plain"]
        ratio = med(ray["wall"]) / med(plain["wall"])
        ratios.append(ratio)
        step_ratios = [a / b for a, b in zip(ray["wall"], plain["wall"], strict=True)]
        print(
            f"  {index:<7}{med(ray['wall']):>10.3f}{med(plain['wall']):>10.3f}{ratio:>7.2f}x"
            f"{med(step_ratios):>23.2f}x{med(ray['cpu']) / med(plain['cpu']):>10.2f}x"
        )
    print(
        f"step time Ray Train / plain, paired:   {med(ratios):.2f}x median of {len(paired)} rounds "
        f"({', '.join(f'{r:.2f}x' for r in ratios)}) (target <= 1.10x)"
    )


def shapes(rows: list) -> dict[str, int]:
    """How many samples have each (target, source) frame shape."""
    from sama.train.data import shape_key

    counts: dict[str, int] = {}
    for row in rows:
        name = str(shape_key(row)[2:])
        counts[name] = counts.get(name, 0) + 1
    return counts


def report(
    args: argparse.Namespace,
    samples: int,
    warmup: int,
    max_steps: int,
    rounds: list[dict],
    sample_shapes: dict[str, int],
) -> None:
    import ray as ray_lib
    import torch

    med = statistics.median
    last = rounds[-1]
    cfg = last["cfg"]
    plain_first = last["plain"]

    def pooled(arm: str, key: str) -> list[float]:
        return [v for r in rounds for v in r[arm][key]]

    print()
    print("configuration")
    print(f"  model                      preset {args.preset}, {plain_first['params'] / 1e6:.2f} M trainable")
    print(
        f"  data                       {samples} prep-pretext clips from {args.videos} synthetic videos, "
        f"9 frames, 48x64/64x48 buckets; shapes (target, source): {sample_shapes}"
    )
    print(
        f"  per-worker batch           {args.batch} videos "
        "(the same samples and random draws in both arms, step by step)"
    )
    print(f"  torch threads              {args.threads} (both arms)")
    print(
        f"  Ray                        {ray_lib.__version__}, {args.cpus} CPUs, "
        f"1 worker x {args.cpus_per_worker} CPU, decode tasks {args.decode_cpus} CPU"
    )
    print(f"  torch                      {torch.__version__}, CPU, fp32")
    print(
        f"  steps                      {len(rounds)} rounds of: Ray Train {max_steps} ({warmup} warmup), "
        f"then the plain loop replaying them; {args.steps} timed in each arm"
    )
    print(
        f"  niceness                   Ray Train worker {last['records'][0]['nice']}, "
        f"plain arm {plain_first['nice']}"
    )
    print()
    print("per round: median step (s), ratio, train-thread CPU ratio, and the load beside the timed steps")
    print(
        f"  {'round':<7}{'Ray Train':>10}{'plain':>10}{'ratio':>8}{'CPU ratio':>11}"
        f"{'other cores busy':>20}{'stolen':>14}{'kernel CPU':>16}{'faults / step':>18}"
    )
    ratios, cpu_ratios = [], []
    for index, r in enumerate(rounds, 1):
        ray, plain = r["ray"], r["plain"]
        ratio = med(ray["wall"]) / med(plain["wall"])
        cpu_ratio = med(ray["cpu"]) / med(plain["cpu"])
        ratios.append(ratio)
        cpu_ratios.append(cpu_ratio)
        print(
            f"  {index:<7}{med(ray['wall']):>10.3f}{med(plain['wall']):>10.3f}"
            f"{ratio:>7.2f}x{cpu_ratio:>10.2f}x"
            f"{ray['other_cores']:>10.2f} / {plain['other_cores']:<7.2f}"
            f"{ray['steal_cores']:>6.2f} / {plain['steal_cores']:<5.2f}"
            f"{100 * ray['sys_s'] / sum(ray['cpu']):>7.1f}% / "
            f"{100 * plain['sys_s'] / sum(plain['cpu']):<5.1f}%"
            f"{ray['minor_faults'] / len(ray['cpu']):>8.0f} / "
            f"{plain['minor_faults'] / len(plain['cpu']):<6.0f}"
        )
    print(
        "  (Ray Train arm / plain arm over each arm's timed steps: other cores busy and stolen by the "
        "hypervisor, in cores; the training thread's kernel share of its CPU time and its page faults)"
    )
    print()
    print(f"all rounds pooled ({len(pooled('ray', 'wall'))} timed steps per arm)")
    print(f"{'':38}{'Ray Train':>12}{'plain':>12}{'ratio':>10}")

    def line(name: str, a: float, b: float, fmt: str = ".3f") -> None:
        print(f"{name:38}{a:>12{fmt}}{b:>12{fmt}}{a / b:>9.2f}x")

    ray_wall, plain_wall = pooled("ray", "wall"), pooled("plain", "wall")
    tokens = pooled("ray", "tokens")
    line("median step (s)  [perf/step_s]", med(ray_wall), med(plain_wall))
    line("mean step (s)", statistics.fmean(ray_wall), statistics.fmean(plain_wall))
    line("median loop iteration (s)", med(pooled("ray", "iter")), med(plain_wall))
    common = max(set(tokens), key=tokens.count)
    line(
        f"fastest step, {tokens.count(common)}x{common} tokens (s)",
        min(w for w, t in zip(ray_wall, tokens, strict=True) if t == common),
        min(w for w, t in zip(plain_wall, tokens, strict=True) if t == common),
    )
    line("median train-thread CPU / step (s)", med(pooled("ray", "cpu")), med(pooled("plain", "cpu")))
    print(
        f"{'train-thread CPU / wall':38}{sum(pooled('ray', 'cpu')) / sum(pooled('ray', 'iter')):>12.2f}"
        f"{sum(pooled('plain', 'cpu')) / sum(plain_wall):>12.2f}"
    )
    print(
        f"{'min / max step (s)':38}{min(ray_wall):>6.3f}/{max(ray_wall):<5.3f}"
        f"{min(plain_wall):>6.3f}/{max(plain_wall):<5.3f}"
    )
    print()
    ray_wait = pooled("ray", "wait")
    all_records = [rec for r in rounds for rec in r["records"]]
    all_wait = sum(rec["perf/data_wait_frac"] * rec["perf/step_s"] for rec in all_records)
    all_step = sum(rec["perf/step_s"] for rec in all_records)
    print("Ray Train data wait (all rounds)")
    print(
        f"  timed steps                {100 * sum(ray_wait) / sum(ray_wall):.2f}% of step time "
        f"(median {1000 * med(ray_wait):.1f} ms, max {1000 * max(ray_wait):.1f} ms per step)"
    )
    print(f"  all steps incl. warmup     {100 * all_wait / all_step:.2f}% (step 1 waits for the first pass)")
    stalls = ", ".join(
        f"round {index} step {rec['step']} {rec['perf/data_wait_frac'] * rec['perf/step_s']:.1f} s"
        for index, r in enumerate(rounds, 1)
        for rec in r["records"]
        if rec["perf/data_wait_frac"] * rec["perf/step_s"] > 1.0
    )
    print(f"  stalls > 1 s (pass starts) {stalls or 'none'}")
    # Steady state: a pass of min_rows_per_pass rows or more, then a new Ray Data pipeline (the
    # 2nd pass start, inside warmup, is what every later pass start costs).
    min_rows = cfg.data.min_rows_per_pass
    pass_steps = math.ceil(min_rows / samples) * samples // args.batch
    restart = max(
        (rec["perf/data_wait_frac"] * rec["perf/step_s"] for r in rounds for rec in r["records"][1:warmup]),
        default=0.0,
    )
    mean_wait, mean_step = statistics.fmean(ray_wait), statistics.fmean(ray_wall)
    steady = pass_steps - 1
    amortised = (steady * mean_wait + restart) / (steady * mean_step + restart + mean_step)
    print(
        f"  amortised over a pass      {100 * amortised:.2f}% (a pass = {pass_steps} steps here, then a "
        f"pipeline restart like the slowest 2nd pass start, {restart:.1f} s)"
    )
    result = last["result"]
    print(
        f"  startup (last round)       ray.init {result['init_s']:.1f} s, fit start -> first step done "
        f"{result['first_step_s']:.1f} s, last step -> fit returns {result['after_last_step_s']:.1f} s "
        f"(checkpoint, export, teardown), fit {result['fit_s']:.1f} s"
    )
    print()
    rounds_text = ", ".join(f"{r:.2f}x" for r in ratios)
    print(
        f"step time Ray Train / plain (median):  {med(ratios):.2f}x median of {len(rounds)} rounds "
        f"({rounds_text}); pooled {med(ray_wall) / med(plain_wall):.2f}x (unpaired: moved by drift)"
    )
    print(
        f"data wait fraction (timed steps):      {100 * sum(ray_wait) / sum(ray_wall):.2f}% (target < 5%; "
        f"{100 * amortised:.2f}% with pass restarts amortised)"
    )
    print(
        f"train-thread CPU Ray Train / plain:    {med(cpu_ratios):.2f}x median round "
        f"({', '.join(f'{r:.2f}x' for r in cpu_ratios)}; less sensitive to load)"
    )


if __name__ == "__main__":
    main()
