"""The Trainer's steps on the tiny model, one CPU worker, no Ray.

The training stream reads real shards written here; only ``build_pass`` (the Ray Data pipeline) is
replaced by an in-process reader that lists the same worker shards, filters and decodes the same way.
"""

from __future__ import annotations

import dataclasses
import math
import os

import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("diffusers")
pytest.importorskip("transformers")

from sama import schema, synthetic, video  # noqa: E402
from sama.models.training import SamaBatch  # noqa: E402
from sama.schema import Sample, SampleMeta, ShardConfig, ShardWriter  # noqa: E402
from sama.train import checkpoint as ckpt  # noqa: E402
from sama.train import data as data_lib  # noqa: E402
from sama.train.data import DataConfig, DataPosition, SourceConfig, TrainingRow, decode_row  # noqa: E402
from sama.train.trainer import (  # noqa: E402
    ModelSection,
    OptimConfig,
    ScalingSection,
    TrainConfig,
    Trainer,
    ValidationSection,
    lr_lambda,
    steps_due,
)

LR = 1e-3
MAX_STEPS = 10
WARMUP = 3  # int(0.3 * MAX_STEPS)


def _write(prefix: str, media: str, count: int, seed: int) -> None:
    with ShardWriter(prefix, "part", ShardConfig(max_samples=3)) as writer:
        for index in range(count):
            frames = 1 if media == "image" else 5
            scene = synthetic.random_scene(seed + index)
            edited, instruction = synthetic.make_edit(scene, "recolor", seed + index, video=media == "video")
            source = synthetic.render(scene, frames, 8.0, 32, 32)
            target = synthetic.render(edited, frames, 8.0, 32, 32)
            if media == "image":
                source_bytes, target_bytes = video.encode_image(source[0]), video.encode_image(target[0])
            else:
                source_bytes = video.encode_mp4(source, 8.0, crf=12, preset="ultrafast")
                target_bytes = video.encode_mp4(target, 8.0, crf=12, preset="ultrafast")
            meta = SampleMeta(
                key=schema.sample_key(media, seed, index),
                task="image_edit" if media == "image" else "video_edit",
                media=media,
                instruction=f"[Video edit] {instruction}",
                fps=8.0,
                num_frames=frames,
                height=32,
                width=32,
                bucket="32x32",
                source_uri=f"raw/{index}",
            )
            writer.write(Sample(meta=meta, target=target_bytes, source=source_bytes))


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    root = tmp_path_factory.mktemp("store")
    paths = {name: str(root / name) for name in ("video", "image", "val")}
    _write(paths["video"], "video", 6, seed=10)
    _write(paths["image"], "image", 6, seed=20)
    _write(paths["val"], "video", 2, seed=30)
    return paths


_DECODED: dict[str, list[dict]] = {}


class _Rows:
    def __init__(self, rows):
        self.rows = rows

    def iter_rows(self):
        return iter(self.rows)


def local_pass(source, cfg, rank, world_size, pass_index, repeats, salt):
    """build_pass without Ray: this worker's shards (or key-filtered rows), decoded, ``repeats`` times."""
    shard_list, filter_by_key = data_lib.worker_shards(source.uri, rank, world_size)
    keep = data_lib._keep_for_rank(rank, world_size) if filter_by_key else (lambda row: True)
    rows = []
    for shard in shard_list:
        if shard not in _DECODED:
            _DECODED[shard] = [(raw["__key__"], decode_row(raw)) for raw in schema.iter_members(shard)]
        rows.extend(row for key, row in _DECODED[shard] if keep({"__key__": key}))
    order = np.random.default_rng(data_lib._seed(cfg.seed, rank, source.name, pass_index, salt))
    rows = rows * repeats
    return _Rows([rows[i] for i in order.permutation(len(rows))])


@pytest.fixture(autouse=True)
def no_ray(monkeypatch):
    monkeypatch.setattr(data_lib, "build_pass", local_pass)
    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)  # Trainer.build sets the worker's thread count


def _config(shards, **changes) -> TrainConfig:
    cfg = TrainConfig(
        stage=0,
        max_steps=MAX_STEPS,
        grad_accum=1,
        seed=0,
        ema_decay=0.5,
        model=ModelSection(preset="tiny"),
        data=DataConfig(
            sources=[
                SourceConfig("videos", shards["video"], "video", 1.0),
                SourceConfig("images", shards["image"], "image", 1.0),
            ],
            val_uri=shards["val"],
            val_samples=2,
            video_batch_size=2,
            image_batch_size=3,
            shuffle_buffer=4,
        ),
        optim=OptimConfig(lr=LR, warmup_frac=0.3, grad_clip=1.0),
        scaling=ScalingSection(num_workers=1, cpus_per_worker=1.0, torch_threads=1),
        validation=ValidationSection(draws=2, render_samples=1, render_steps=2),
    )
    for key, value in changes.items():
        setattr(cfg, key, value)
    cfg.validate()
    return cfg


def _trainer(cfg: TrainConfig) -> Trainer:
    trainer = Trainer(cfg)
    trainer.build()
    return trainer


def _weights(trainer: Trainer) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in trainer.module.transformer.state_dict().items()}


def _record_lr(trainer: Trainer) -> list[float]:
    used: list[float] = []
    trainer.optimizer.register_step_pre_hook(lambda opt, args, kwargs: used.append(opt.param_groups[0]["lr"]))
    return used


def collate(rows, text_length=None):
    """sama.train.data.collate of Ray rows (what local_pass yields), through the typed records."""
    return data_lib.collate([TrainingRow.from_ray(row) for row in rows], text_length)


def _fixed_batches(trainer: Trainer, batches: list[SamaBatch]) -> None:
    it = iter(batches)

    def next_batch(step=None):
        trainer.batches.position.step = trainer.batches.position.step + 1 if step is None else step + 1
        return next(it)

    trainer.batches.next = next_batch


def test_the_trainer_imports_neither_ray_nor_mlflow():
    """A worker's trainer runs where neither is installed (the GPU tests' machine): only
    sama.train.launch imports Ray, and the tracker imports MLflow when it first tracks."""
    import subprocess
    import sys

    code = (
        "import sys, sama.train.trainer; "
        "print(sorted({m.split('.')[0] for m in sys.modules} & {'ray', 'mlflow'}))"
    )
    found = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert found.stdout.strip() == "[]"


def test_lr_lambda_and_steps_due():
    factor = lr_lambda(4)
    assert [factor(s) for s in range(6)] == [0.25, 0.5, 0.75, 1.0, 1.0, 1.0]
    assert lr_lambda(0)(0) == 1.0 and lr_lambda(0)(100) == 1.0
    # Linear decay from 1 after warmup to min_lr_frac at max_steps: steps 2..10 over 8 steps.
    linear = lr_lambda(2, 10, "linear", 0.2)
    assert [linear(s) for s in (0, 1, 2, 6, 10, 12)] == pytest.approx([0.5, 1.0, 1.0, 0.6, 0.2, 0.2])
    cosine = lr_lambda(0, 8, "cosine", 0.0)
    assert [cosine(s) for s in (0, 2, 4, 8)] == pytest.approx(
        [1.0, 0.5 + 0.5 * math.cos(math.pi / 4), 0.5, 0.0]
    )
    assert [s for s in range(1, 13) if steps_due(s, 5, 12)] == [5, 10, 12]


def test_train_steps(shards):
    trainer = _trainer(_config(shards))
    assert trainer.step == 0 and trainer.device.type == "cpu"
    assert trainer.scheduler.get_last_lr()[0] == pytest.approx(LR / WARMUP)
    initial = {n: p.detach().clone() for n, p in trainer.module.transformer.named_parameters()}
    assert all(torch.equal(trainer.ema.shadow[n], initial[n]) for n in trainer.ema.names)
    frozen = {n: p.detach().clone() for n, p in trainer.module.text_encoder.named_parameters()}
    used_lr = _record_lr(trainer)

    history = []
    for _ in range(4):
        before = {n: p.detach().clone() for n, p in trainer.module.transformer.named_parameters()}
        shadow_before = {n: t.clone() for n, t in trainer.ema.shadow.items()}
        metrics = trainer.train_step()
        history.append(metrics)
        assert {
            "train/loss",
            "train/loss_fm",
            "train/loss_sem",
            "train/lr",
            "train/grad_norm",
            "perf/step_s",
            "perf/samples_per_s",
            "perf/tokens_per_s",
            "perf/data_wait_frac",
        } <= set(metrics)
        assert "perf/mfu" not in metrics  # no peak FLOPs known on a CPU
        assert all(math.isfinite(v) for v in metrics.values())
        assert metrics["train/loss"] == pytest.approx(
            metrics["train/loss_fm"] + 0.1 * metrics["train/loss_sem"]
        )
        assert metrics["train/grad_norm"] > 0
        assert (
            metrics["perf/samples_per_s"] > 0 and metrics["perf/tokens_per_s"] > metrics["perf/samples_per_s"]
        )
        assert 0 <= metrics["perf/data_wait_frac"] < 1
        # The weights moved, and the EMA moved half way (decay 0.5) from its old value to them.
        after = dict(trainer.module.transformer.named_parameters())
        assert any(not torch.equal(before[n], after[n]) for n in trainer.ema.names)
        for name in trainer.ema.names:
            expected = 0.5 * shadow_before[name] + 0.5 * after[name].detach()
            torch.testing.assert_close(trainer.ema.shadow[name], expected, rtol=0, atol=1e-6)

    # Linear warmup over 3 steps: the k-th update uses lr * min(1, k / 3).
    assert used_lr == pytest.approx([LR / 3, 2 * LR / 3, LR, LR])
    # train/lr is the rate the step's update used.
    assert [m["train/lr"] for m in history] == pytest.approx(used_lr)
    assert trainer.step == 4 and trainer.position.step == 4
    assert sum(trainer.position.batches.values()) == 4
    # samples_seen counts every batch: 2 videos or 3 images per step.
    per_step = [m["perf/samples_per_s"] * m["perf/step_s"] for m in history]
    assert trainer.samples_seen == round(sum(per_step))
    assert trainer.samples_seen == sum(
        count * (2 if name == "videos" else 3) for name, count in trainer.position.batches.items()
    )
    # Only the transformer trains: the frozen text encoder is untouched.
    for name, value in trainer.module.text_encoder.named_parameters():
        assert torch.equal(value, frozen[name]), name
    assert not any(p.requires_grad for p in trainer.module.text_encoder.parameters())


def test_gradient_accumulation_draws_every_micro_batch_from_the_steps_source(shards):
    """grad_accum micro-batches of one optimizer step never mix images and videos; the data
    position counts optimizer steps (what a resume sets it to)."""
    trainer = _trainer(_config(shards, grad_accum=3))
    drawn: list[tuple[int, str]] = []
    original = trainer.batches.next

    def next_batch(step=None):
        batch = original(step)
        drawn.append((step, batch.source_name))
        return batch

    trainer.batches.next = next_batch
    for _ in range(3):
        trainer.train_step()
    assert [step for step, _ in drawn] == [0, 0, 0, 1, 1, 1, 2, 2, 2]
    for step in range(3):
        names = {name for s, name in drawn if s == step}
        assert names == {trainer.cfg.data.sources[trainer.batches.choose(step)].name}, (step, drawn)
    assert trainer.step == 3 and trainer.position.step == 3
    assert sum(trainer.position.batches.values()) == 9


def test_checkpoint_then_restore_in_a_fresh_trainer(shards, tmp_path):
    cfg = _config(shards)
    trainer = _trainer(cfg)
    for _ in range(2):
        trainer.train_step()
    trainer.mlflow_run_id = "run-123"
    trainer.save_checkpoint(str(tmp_path))
    assert sorted(os.listdir(tmp_path)) == sorted(
        [ckpt.TENSORS_DIR, ckpt.rng_file(0), ckpt.CONFIG_FILE, ckpt.STATE_FILE]
    )

    fresh = _trainer(cfg)
    fresh.restore(None)  # nothing to restore: unchanged
    assert fresh.step == 0
    fresh.restore(str(tmp_path))
    assert fresh.step == 2 and fresh.samples_seen == trainer.samples_seen
    assert fresh.mlflow_run_id == "run-123"
    for name, value in _weights(trainer).items():
        assert torch.equal(_weights(fresh)[name], value), name
    for name in trainer.ema.names:
        assert torch.equal(fresh.ema.shadow[name], trainer.ema.shadow[name]), name
    original, restored = trainer.optimizer.state_dict(), fresh.optimizer.state_dict()
    # torch's set_optimizer_state_dict hands betas back as a list, whatever it is given.
    normalise = [dict(g, betas=tuple(g["betas"])) for g in restored["param_groups"]]
    assert original["param_groups"] == normalise
    for index, per_param in original["state"].items():
        for key, value in per_param.items():
            assert torch.equal(restored["state"][index][key], value), (index, key)
    assert fresh.scheduler.state_dict() == trainer.scheduler.state_dict()
    assert fresh.scheduler.get_last_lr() == trainer.scheduler.get_last_lr()
    assert fresh.position.step == 2
    # Every field: the passes, the batches drawn from them, their repeats (no salt).
    assert fresh.position == trainer.position and fresh.position.salt == 0
    assert fresh.batches.position is fresh.position
    # The resumed stream replays each source's interrupted pass: its next batches are the trainer's.
    for step in (2, 3, 4):
        assert fresh.batches.next(step).keys == trainer.batches.next(step).keys, step

    # From here both take the same step on the same batch, and stay identical.
    rows = local_pass(cfg.data.sources[0], cfg.data, 0, 1, 0, 1, 0).rows[:2]
    batch = dataclasses.replace(collate(rows), source_name="videos")
    _fixed_batches(trainer, [batch])
    _fixed_batches(fresh, [batch])
    a, b = trainer.train_step(), fresh.train_step()
    for key in ("train/loss", "train/loss_fm", "train/loss_sem", "train/grad_norm", "train/lr"):
        assert a[key] == b[key], key
    for name, value in _weights(trainer).items():
        assert torch.equal(_weights(fresh)[name], value), name
    for name in trainer.ema.names:
        assert torch.equal(fresh.ema.shadow[name], trainer.ema.shadow[name]), name


def test_validate_is_deterministic(shards):
    trainer = _trainer(_config(shards))
    assert len(trainer.val_rows) == 2
    first = trainer.validate()
    assert set(first) == {"val/loss", "val/loss_fm", "val/loss_sem"}
    assert first["val/loss"] == pytest.approx(first["val/loss_fm"] + 0.1 * first["val/loss_sem"])
    assert trainer.validate() == first
    assert trainer.module.training  # back in training mode
    trainer.train_step()
    after = trainer.validate()
    assert after != first
    assert trainer.validate() == after

    cfg = _config(shards)
    cfg.data.val_uri = None
    assert _trainer(cfg).validate() == {}


def test_export_holds_the_ema_weights_and_starts_stage_one(shards, tmp_path):
    from sama.pipeline_edit import SamaEditPipeline

    trainer = _trainer(_config(shards))
    for _ in range(2):
        trainer.train_step()
    export_dir = str(tmp_path / "export")
    trainer.export(export_dir)
    pipeline = SamaEditPipeline.from_pretrained(export_dir)
    exported = pipeline.transformer.state_dict()
    raw = _weights(trainer)
    assert set(exported) == set(raw)
    for name in trainer.ema.names:
        assert torch.equal(exported[name], trainer.ema.shadow[name]), name
    assert any(not torch.equal(exported[n], raw[n]) for n in trainer.ema.names)  # EMA, not the raw weights
    assert pipeline.model_config == trainer.model_config
    # The trainer keeps working after the export (its encoders are back on its device).
    trainer.train_step()

    stage1 = _config(shards, stage=1, model=ModelSection(preset="wan2.1-14b", init_from=export_dir))
    follower = _trainer(stage1)
    assert follower.model_config.preset == "tiny"
    for name, value in follower.module.transformer.state_dict().items():
        assert torch.equal(value, exported[name]), name
    for name in follower.ema.names:
        assert torch.equal(follower.ema.shadow[name], exported[name]), name
    # The exported text encoder is the one stage 1 uses: same embeddings for the same prompt.
    prompt = ["[Video edit] make it red"]
    assert torch.equal(
        follower.module.text_encoder.encode(prompt), trainer.module.text_encoder.encode(prompt)
    )
    assert follower.train_step()["train/loss"] > 0


def test_stage_one_needs_only_the_export(shards, tmp_path):
    import json

    from sama.models.presets import build_model
    from sama.pipeline_edit import SamaEditPipeline

    export_dir = tmp_path / "export"
    SamaEditPipeline.from_components(build_model("tiny")).save_pretrained(str(export_dir))
    # As written by a stage 0 that started from Wan weights which are no longer there.
    gone = tmp_path / "wan-weights-gone"
    gone.mkdir()
    manifest = json.loads((export_dir / "sama_pipeline.json").read_text())
    manifest["model"]["pretrained"] = str(gone)
    (export_dir / "sama_pipeline.json").write_text(json.dumps(manifest))
    SamaEditPipeline.from_pretrained(str(export_dir))  # the export itself is complete

    follower = _trainer(_config(shards, stage=1, model=ModelSection(init_from=str(export_dir))))
    assert follower.model_config.preset == "tiny"


def test_render_edits_writes_source_edit_target_strips(shards):
    trainer = _trainer(_config(shards))
    rendered = trainer.render_edits()
    assert len(rendered) == 1
    key, data = rendered[0]
    assert key == trainer.render_rows[0].key
    frames = video.decode_video_bytes(data)
    assert frames.shape == (5, 32, 96, 3)
    assert trainer.module.training


def test_render_edits_restores_a_speed_sample_to_its_target_length(shards):
    """A speed sample's source is shorter than its target: the edit is made at the target's length
    and the strip shows the source stretched over the same span (frame i at source frame
    round(i * (3 - 1) / (5 - 1)))."""
    trainer = _trainer(_config(shards))
    row = trainer.render_rows[0]
    row = dataclasses.replace(row, source=row.source[::2])  # 3 of 5 frames, as the speed task writes
    trainer.render_rows = [row]
    [(_, data)] = trainer.render_edits()
    frames = video.decode_video_bytes(data)
    assert frames.shape == (5, 32, 96, 3)
    shown_source = frames[:, :, :32].astype(int)
    expected_source = row.source[[0, 0, 1, 2, 2]].astype(int)  # np.round: 0, 0.5->0, 1, 1.5->2, 2
    assert np.abs(shown_source - expected_source).mean() < 12
    shown_target = frames[:, :, 64:].astype(int)
    assert np.abs(shown_target - row.target.astype(int)).mean() < 12


def test_evaluate_edits_measures_held_out_edits_per_task(shards):
    """validation.eval_every: the first eval_samples editable held-out samples are edited with the
    current weights and measured; the means come back overall and per task."""
    from sama.eval.metrics import MetricsConfig, MetricSuite

    cfg = _config(shards)
    cfg.validation.eval_every, cfg.validation.eval_samples = 5, 2
    trainer = _trainer(cfg)
    assert len(trainer.eval_rows) == 2 and trainer.render_rows == trainer.eval_rows[:1]
    metrics = trainer.evaluate_edits()
    assert trainer.module.training
    tasks = {row.task for row in trainer.eval_rows}
    for name in ("psnr", "ssim", "mse", "flow_epe"):
        assert name in {key.split("/")[-1] for key in metrics}
        assert f"eval/{name}" in metrics
        for task in tasks:
            assert f"eval/{task}/{name}" in metrics
    # The overall figure is the mean of what the suite measures on each edit.
    suite = MetricSuite(MetricsConfig(), device="cpu")
    edits = list(trainer._edit_held_out(trainer.eval_rows, "render"))
    measured = [suite.compute(e, source=s, reference=t) for _, s, e, t in edits]
    assert metrics["eval/psnr"] == pytest.approx(np.mean([m["psnr"] for m in measured]))
    # Off by default: nothing is edited for evaluation.
    assert _trainer(_config(shards)).eval_rows == []


def test_mfu_counts_the_flops_of_the_one_flop_model(shards):
    """perf/mfu = the step's FLOPs by sama.train.flops (what bench/model_step.py reports) over
    step time and peak; with a known peak, each micro-batch's FLOPs are its layout's."""
    from sama.train.flops import step_flops

    trainer = _trainer(_config(shards))
    trainer.peak = 1e12  # as on a GPU the peak table knows
    seen = []
    original = trainer.forward_backward_step

    def recording(batch, micro, logical_rank=None):
        parts = original(batch, micro, logical_rank)
        seen.append((batch, parts))
        return parts

    trainer.forward_backward_step = recording
    metrics = trainer.train_step()
    transformer = trainer.module.transformer
    expected = 0.0
    for batch, parts in seen:
        encoded = trainer.module.encode_batch(batch, torch.Generator().manual_seed(0))
        layout = transformer.sequence_layout(
            encoded.target_latents.shape,
            None if encoded.source_latents is None else encoded.source_latents.shape,
            0 if encoded.semantic_tokens is None else encoded.semantic_tokens.shape[1],
        )
        per_sample = step_flops(
            transformer,
            layout.num_source,
            layout.num_semantic,
            layout.num_target,
            encoded.text_embeds.shape[1],
        )["total"]
        assert parts["flops"] == pytest.approx(per_sample * len(batch))
        expected += parts["flops"]
    assert metrics["perf/mfu"] == pytest.approx(expected / metrics["perf/step_s"] / 1e12, rel=1e-9)


def test_grad_accum_averages_micro_batches(shards):
    cfg = _config(shards, grad_accum=2)
    cfg.optim.grad_clip = 0.0  # no clipping: the captured gradient is the accumulated one
    trainer = _trainer(cfg)
    module = trainer.module
    params = trainer.params
    video_rows = local_pass(cfg.data.sources[0], cfg.data, 0, 1, 0, 1, 0).rows
    batches = [collate(video_rows[0:2]), collate(video_rows[2:4])]
    assert batches[0].keys != batches[1].keys

    # Reference, computed directly on the module: per micro-batch loss and gradient.
    losses, grads = [], []
    for micro, batch in enumerate(batches):
        generator = trainer._generator(0, 0, micro)
        encoded = module.encode_batch(batch, generator)
        out = module.compute_loss(encoded, generator)
        losses.append(float(out.loss.detach()))
        grads.append(torch.autograd.grad(out.loss, params))
    assert losses[0] != losses[1]

    captured = {}

    def capture(optimizer, args, kwargs):
        captured["grads"] = [p.grad.detach().clone() for p in params]

    trainer.optimizer.register_step_pre_hook(capture)
    _fixed_batches(trainer, batches)
    metrics = trainer.train_step()

    assert metrics["train/loss"] == pytest.approx(np.mean(losses), rel=1e-5)
    for got, first, second in zip(captured["grads"], *grads, strict=True):
        torch.testing.assert_close(got, (first + second) / 2, rtol=1e-4, atol=1e-7)
    total_norm = torch.linalg.vector_norm(
        torch.stack([torch.linalg.vector_norm(g) for g in captured["grads"]])
    )
    assert metrics["train/grad_norm"] == pytest.approx(float(total_norm), rel=1e-5)
    assert trainer.step == 1 and trainer.samples_seen == 4
    assert all(p.grad is None for p in params)  # zeroed for the next step


def test_a_step_on_given_batches_is_the_step_that_draws_them(shards):
    """train_step(batches) replays a known step: on the micro-batches given, with the step's own
    noise and timesteps, it computes what the step that draws the same batches from the streams
    does (losses, gradient norm, weights, EMA, counts), and leaves the streams where they are."""
    cfg = _config(shards, grad_accum=2)
    drawing, replaying = _trainer(cfg), _trainer(cfg)
    initial = _weights(drawing)
    drawn: list[list[SamaBatch]] = []
    original = drawing.batches.next

    def next_batch(step=None):
        batch = original(step)
        drawn[-1].append(batch)
        return batch

    drawing.batches.next = next_batch
    for _ in range(2):
        drawn.append([])
        expected = drawing.train_step()
        got = replaying.train_step([drawn[-1]])
        for key in ("train/loss", "train/loss_fm", "train/loss_sem", "train/grad_norm", "train/lr"):
            assert got[key] == expected[key], key
    assert [len(micro) for micro in drawn] == [2, 2]
    trained = _weights(drawing)
    assert any(not torch.equal(trained[name], initial[name]) for name in trained)
    for name, value in trained.items():
        assert torch.equal(_weights(replaying)[name], value), name
    for name in drawing.ema.names:
        assert torch.equal(replaying.ema.shadow[name], drawing.ema.shadow[name]), name
    assert (replaying.step, replaying.samples_seen) == (drawing.step, drawing.samples_seen)
    assert replaying.position.step == 0 and sum(replaying.position.batches.values()) == 0
    # A step is grad_accum micro-batches for each logical rank this rank plays.
    with pytest.raises(ValueError, match=r"2 micro-batch\(es\) \(grad_accum\) for each of the 1 logical"):
        replaying.train_step([drawn[0][:1]])


class _RecordingTracker:
    """A tracker that records what it is handed (the last one made is ``last``)."""

    last: _RecordingTracker | None = None
    created_run = True
    tracking_uri = "http://tracking.test"
    run_id = "run-1"

    def __init__(self, cfg, enabled, default_local_dir=None):
        self.cfg, self.enabled, self.calls = cfg, enabled, []
        _RecordingTracker.last = self

    def start(self, run_name, run_id=None, tags=None, resumed_from=None):
        self.calls.append(("start", run_name, run_id, resumed_from))
        return self.run_id

    def log_params(self, params):
        self.calls.append(("params", params["max_steps"]))

    def log_text(self, text, artifact_file):
        self.calls.append(("text", artifact_file))

    def log_metrics(self, metrics, step):
        self.calls.append(("metrics", step, dict(metrics)))

    def log_video(self, data, artifact_file):
        self.calls.append(("video", artifact_file))

    def log_model(self, export_dir, stage):
        self.calls.append(("model", os.path.isfile(os.path.join(export_dir, "sama_pipeline.json"))))
        return {"model_uri": "models:/m/1"}

    def end(self, status="FINISHED"):
        self.calls.append(("end", status))


def test_train_runs_the_steps_with_their_schedules_then_exports_and_publishes(shards, tmp_path, monkeypatch):
    """Trainer.train, without Ray: validation at step 0, each metric averaged over the steps since
    the last log (log_every), validation and renders (validation.every_steps), checkpoints handed
    to ``report`` (checkpoint.every_steps), every schedule at the last step too; then the export
    is published (run_info.json) and the run ends FINISHED."""
    import json

    import sama.tracking
    from sama.train.trainer import EXPORT_DIR, RUN_INFO_FILE, RunSection, run_uri

    monkeypatch.setattr(sama.tracking, "Tracker", _RecordingTracker)
    cfg = _config(shards, max_steps=5, log_every=2, run=RunSection(name="loop", storage_uri=str(tmp_path)))
    cfg.validation.every_steps, cfg.checkpoint.every_steps = 3, 2
    trainer = _trainer(cfg)
    steps: list[dict[str, float]] = []
    original = trainer.train_step
    trainer.train_step = lambda: steps.append(original()) or steps[-1]
    reports = []

    def report(metrics, directory):
        reports.append((dict(metrics), sorted(os.listdir(directory))))

    trainer.train(tracking_uri="http://driver.test", report=report)

    tracker = _RecordingTracker.last
    assert tracker.cfg.uri == "http://driver.test" and tracker.enabled
    calls = tracker.calls
    assert calls[:3] == [("start", "loop", None, None), ("params", 5), ("text", "config.yaml")]
    assert calls[-2:] == [("model", True), ("end", "FINISHED")]
    logged = [(c[1], sorted({k.split("/")[0] for k in c[2]})) for c in calls if c[0] == "metrics"]
    assert logged == [(0, ["val"]), (2, ["perf", "train"]), (3, ["val"]), (4, ["perf", "train"]),
                      (5, ["perf", "train"]), (5, ["val"])]  # fmt: skip
    windows = [c[2] for c in calls if c[0] == "metrics" and "train/loss" in c[2]]
    for window, members in zip(windows, ([0, 1], [2, 3], [4]), strict=True):
        for key in ("train/loss", "perf/step_s"):
            assert window[key] == pytest.approx(np.mean([steps[i][key] for i in members])), key
    assert [c[1] for c in calls if c[0] == "video"] == [
        f"samples/step_{step:07d}/{trainer.render_rows[0].key}.mp4" for step in (3, 5)
    ]
    assert [m["step"] for m, _ in reports] == [2, 4, 5]
    assert reports[0][0] == {"step": 2, "train/loss": steps[1]["train/loss"]}
    assert {"val/loss", "val/loss_fm"} <= set(reports[2][0])
    assert all(ckpt.STATE_FILE in files for _, files in reports)
    info = json.loads((tmp_path / "loop" / RUN_INFO_FILE).read_text())
    assert info["steps"] == 5 and info["samples_seen"] == trainer.samples_seen
    assert info["mlflow_run_id"] == "run-1" and info["mlflow_model_uri"] == "models:/m/1"
    assert info["export_uri"] == os.path.join(run_uri(cfg), EXPORT_DIR)
    assert os.path.isfile(os.path.join(info["export_uri"], "sama_pipeline.json"))


def test_logical_ranks_on_one_process_average_the_ranks_they_play(shards, tmp_path):
    """A process playing 2 logical data-parallel ranks (a 2-worker run resumed on 1) computes the
    mean loss and gradient of the two, each on its own part of every source with its own noise,
    which is what 2 workers' gradient averaging gives; its checkpoint keeps both positions."""
    from sama.train.trainer import step_generator

    cfg = _config(shards, grad_accum=2)
    cfg.optim.grad_clip = 0.0  # no clipping: the captured gradient is the accumulated one
    trainer = _trainer(cfg)
    trainer.set_logical_ranks(2)
    assert trainer.logical == [0, 1] and trainer.logical_ranks == 2 and len(trainer.streams) == 2
    module, params = trainer.module, trainer.params

    # Reference: each logical rank alone, as worker j of 2 would compute it.
    losses, grads, keys, samples = [], [], [], 0
    for rank in (0, 1):
        stream = data_lib.MixedBatchIterator(cfg.data, None, rank, 2)
        for micro in range(cfg.grad_accum):
            batch = stream.next(0)
            keys.append(batch.keys)
            samples += len(batch.keys)
            generator = step_generator(cfg.seed, rank, 0, micro)
            encoded = module.encode_batch(batch, generator)
            out = module.compute_loss(encoded, generator)
            losses.append(float(out.loss.detach()))
            grads.append(torch.autograd.grad(out.loss, params))
        stream.close()
    first, second = {k for ks in keys[:2] for k in ks}, {k for ks in keys[2:] for k in ks}
    assert not first & second  # the logical ranks' data are disjoint

    captured = {}

    def capture(optimizer, args, kwargs):
        captured["grads"] = [p.grad.detach().clone() for p in params]

    trainer.optimizer.register_step_pre_hook(capture)
    metrics = trainer.train_step()
    assert metrics["train/loss"] == pytest.approx(np.mean(losses), rel=1e-5)
    for got, *per_micro in zip(captured["grads"], *grads, strict=True):
        torch.testing.assert_close(got, sum(per_micro) / len(per_micro), rtol=1e-4, atol=1e-7)
    assert trainer.samples_seen == samples
    assert [s.position.step for s in trainer.streams] == [1, 1]

    # The checkpoint holds both logical ranks' positions; a restore plays both again, exactly.
    trainer.save_checkpoint(str(tmp_path))
    assert len(ckpt.read_state(str(tmp_path)).data_positions) == 2
    fresh = _trainer(cfg)
    assert fresh.logical == [0] and fresh.logical_ranks == 1
    fresh.restore(str(tmp_path))
    assert fresh.logical == [0, 1] and fresh.step == 1
    assert [s.position for s in fresh.streams] == [s.position for s in trainer.streams]
    assert fresh.train_step()["train/loss"] == trainer.train_step()["train/loss"]

    # Logical ranks are shared evenly by the data-parallel ranks, or the resume stops.
    two = Trainer(cfg, rank=1, world_size=2)
    with pytest.raises(ValueError, match=r"3 logical data-parallel rank\(s\), which 2 data-parallel"):
        two.set_logical_ranks(3)
    # A checkpoint whose logical ranks this run cannot share evenly still restores: its model state
    # exactly, its data from fresh passes salted by the step (one logical rank per worker).
    uneven = ckpt.TrainState(step=7, data_positions=[DataPosition(step=7).to_json()] * 3)
    logical, positions = two._restored_positions(uneven)
    assert logical == 2 and len(positions) == 1 and positions[0].salt == 7
