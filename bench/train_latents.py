"""Benchmark: training steps from precomputed latents (``sama precompute``) vs from pixel shards.

The same samples, two arms, the tiny preset on CPU at the quickstart's settings (9-frame clips in a
48x64 bucket): synthetic edit pairs are written as real shard members (H.264 mp4) and decoded as
training decodes them (:func:`sama.train.data.decode_row`); their latents are made with
:func:`sama.precompute.encode_samples` by the same frozen encoders. Each arm is a
:class:`sama.train.trainer.Trainer` built with ``rows=`` (no Ray), timed over ``--steps`` optimizer
steps after ``--warmup`` untimed ones:

* pixels: the trainer builds the frozen encoders and runs them every step (VAE, umT5, SigLIP);
* latents: the source is a latent output (``latents.json``), so the trainer builds no encoder.

Also timed: the decode cost of one row, i.e. what a Ray Data CPU task spends per sample before
training sees it (mp4 decode for pixels; safetensors parse for latents), and the member bytes.

    python bench/train_latents.py [--samples 8] [--steps 10] [--threads 2]
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

import numpy as np  # noqa: E402
import torch  # noqa: E402

from sama import schema, synthetic, video  # noqa: E402
from sama.train.data import DataConfig, SourceConfig, TrainingRow, decode_row  # noqa: E402
from sama.train.trainer import (  # noqa: E402
    ModelSection,
    OptimConfig,
    ScalingSection,
    TrainConfig,
    Trainer,
    ValidationSection,
    frozen_encoder_identity,
    resolve_model_config,
)

# The quickstart's clips (sama/quickstart.py): 9 frames at 8 fps in a 48x64 bucket.
HEIGHT, WIDTH, FRAMES, FPS = 48, 64, 9, 8.0


def pixel_members(count: int) -> list[dict[str, bytes]]:
    """``count`` synthetic video edit pairs as shard members (json, src.mp4, tgt.mp4)."""
    members = []
    for index in range(count):
        scene = synthetic.random_scene(index)
        edited, instruction = synthetic.make_edit(scene, "recolor", index, video=True)
        source = synthetic.render(scene, FRAMES, FPS, HEIGHT, WIDTH)
        target = synthetic.render(edited, FRAMES, FPS, HEIGHT, WIDTH)
        meta = schema.SampleMeta(
            key=schema.sample_key("bench-latents", index),
            task="video_edit",
            media="video",
            instruction=f"[Video edit] {instruction}",
            fps=FPS,
            num_frames=FRAMES,
            height=HEIGHT,
            width=WIDTH,
            bucket=f"{HEIGHT}x{WIDTH}",
            source_uri=f"synthetic/{index}",
        )
        sample = schema.Sample(
            meta=meta,
            target=video.encode_mp4(target, FPS, crf=18, preset="ultrafast"),
            source=video.encode_mp4(source, FPS, crf=18, preset="ultrafast"),
        )
        members.append({"__key__": sample.key, **sample.members()})
    return members


def per_row_ms(members: list[dict], repeats: int = 3) -> float:
    """Median milliseconds decode_row + TrainingRow.from_ray take per row (both ends of Ray)."""
    times = []
    for _ in range(repeats):
        for raw in members:
            started = time.perf_counter()
            TrainingRow.from_ray(decode_row(raw))
            times.append(time.perf_counter() - started)
    return 1000 * statistics.median(times)


def config(uri: str, args: argparse.Namespace) -> TrainConfig:
    cfg = TrainConfig(
        max_steps=args.warmup + args.steps,
        ema_decay=0.99,
        model=ModelSection(preset="tiny"),
        data=DataConfig(
            sources=[SourceConfig("pairs", uri, "video")], video_batch_size=args.batch, shuffle_buffer=1
        ),
        optim=OptimConfig(lr=1e-4),
        scaling=ScalingSection(torch_threads=args.threads),
        validation=ValidationSection(render_samples=0),
    )
    cfg.validate()
    return cfg


def time_arm(cfg: TrainConfig, rows: list[TrainingRow], args: argparse.Namespace) -> dict[str, float]:
    trainer = Trainer(cfg)
    started = time.perf_counter()
    trainer.build(rows={"pairs": rows})
    build_s = time.perf_counter() - started
    for _ in range(args.warmup):
        trainer.train_step()
    steps = [trainer.train_step()["perf/step_s"] for _ in range(args.steps)]
    encoders = [
        n for n in ("vae", "text_encoder", "semantic_encoder") if getattr(trainer.components, n) is not None
    ]
    for stream in trainer.streams:
        stream.close()
    return {"build_s": build_s, "step_s": statistics.median(steps), "encoders": len(encoders)}


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--samples", type=int, default=8)
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    from sama.models.presets import build_model
    from sama.precompute import NULL_PROMPTS, encode_samples, null_prompt_embeddings

    members = pixel_members(args.samples)
    pixel_rows = [TrainingRow.from_ray(decode_row(raw)) for raw in members]
    components = build_model(resolve_model_config(ModelSection(preset="tiny")))
    latent_members = []
    for raw, row in zip(members, pixel_rows, strict=True):
        [latents] = encode_samples(components, row.target[None], row.source[None], [row.instruction])
        meta = schema.SampleMeta.from_json(raw["json"], where=row.key)
        sample = schema.LatentSample(meta=meta, latents=latents)
        latent_members.append({"__key__": row.key, **sample.members()})
    latent_rows = [TrainingRow.from_ray(decode_row(raw)) for raw in latent_members]

    with tempfile.TemporaryDirectory() as root:
        info = schema.LatentOutputInfo(
            encoders=frozen_encoder_identity(ModelSection(preset="tiny"), components.config),
            dtype="float32",
            null_prompts=list(NULL_PROMPTS),
            model="tiny",
        )
        schema.write_latent_info(root, info, null_prompt_embeddings(components))
        latent_uri = os.path.join(root, "shards", "video")
        pixel_uri = os.path.join(root, "pixels", "video")  # no latents.json: a media source
        pixel = time_arm(config(pixel_uri, args), pixel_rows, args)
        latent = time_arm(config(latent_uri, args), latent_rows, args)

    decode_pixel, decode_latent = per_row_ms(members), per_row_ms(latent_members)
    bytes_pixel = np.mean([len(raw["src.mp4"]) + len(raw["tgt.mp4"]) for raw in members])
    bytes_latent = np.mean([len(raw[schema.LATENTS]) for raw in latent_members])
    print(
        f"tiny preset, CPU ({args.threads} thread(s)), {args.samples} video edit pairs of "
        f"{FRAMES}x{HEIGHT}x{WIDTH}, batch {args.batch}, median of {args.steps} steps after {args.warmup}"
    )
    print(f"{'':28}{'pixels':>12}{'latents':>12}{'pixels/latents':>16}")
    rows = [
        ("train step (ms)", 1000 * pixel["step_s"], 1000 * latent["step_s"]),
        ("decode per row (ms)", decode_pixel, decode_latent),
        ("member bytes per row", bytes_pixel, bytes_latent),
        ("Trainer.build (s)", pixel["build_s"], latent["build_s"]),
        ("frozen encoders built", pixel["encoders"], latent["encoders"]),
    ]
    for name, a, b in rows:
        ratio = f"{a / b:16.2f}" if b else f"{'-':>16}"
        print(f"{name:28}{a:12.2f}{b:12.2f}{ratio}")


if __name__ == "__main__":
    main()
