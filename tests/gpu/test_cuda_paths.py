"""CUDA paths of the trainer, driven through :class:`sama.train.trainer.Trainer` as a Ray Train
worker drives it (without Ray or MLflow): FSDP2 sharding, bf16 mixed precision, activation
checkpointing, EMA over sharded parameters, the optimizer's state in a sharded checkpoint, a
restore into a second trainer, and the export. Skipped without CUDA."""

from __future__ import annotations

import os
import socket

import numpy as np
import pytest
import torch

pytestmark = pytest.mark.gpu

STEPS = 6
FRAMES, HEIGHT, WIDTH = 9, 48, 64


@pytest.fixture
def process_group():
    """A one-rank NCCL process group, as Ray Train's TorchConfig makes for a GPU worker."""
    import torch.distributed as dist

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    os.environ.update({"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port)})
    dist.init_process_group("nccl", rank=0, world_size=1)
    try:
        yield
    finally:
        dist.destroy_process_group()


def _rows(count: int) -> list[dict]:
    """Video edit pairs as the training stream yields them (decoded rows, held in memory)."""
    from sama import synthetic

    rows = []
    for index in range(count):
        scene = synthetic.random_scene(100 + index)
        edited, instruction = synthetic.make_edit(scene, "recolor", 100 + index, video=True)
        rows.append(
            {
                "key": f"video-{index}",
                "task": "recolor",
                "media": "video",
                "instruction": f"[Video edit] {instruction}",
                "bucket": f"{HEIGHT}x{WIDTH}",
                "target": synthetic.render(edited, FRAMES, 8.0, HEIGHT, WIDTH),
                "source": synthetic.render(scene, FRAMES, 8.0, HEIGHT, WIDTH),
                "error": "",
            }
        )
    return rows


def _trainer(tmp_path, rows: list[dict]):
    from sama.train.data import DataConfig, SourceConfig
    from sama.train.parallelize import ParallelConfig
    from sama.train.trainer import (
        ModelSection,
        OptimConfig,
        RunSection,
        ScalingSection,
        TrainConfig,
        Trainer,
    )

    cfg = TrainConfig(
        max_steps=100,
        ema_decay=0.9,
        model=ModelSection(preset="tiny"),
        # The rows come from memory; the source's uri is never read (no latents.json there).
        data=DataConfig(
            sources=[SourceConfig("videos", str(tmp_path / "no-shards"), "video", 1.0)],
            video_batch_size=2,
            shuffle_buffer=4,
        ),
        optim=OptimConfig(lr=1e-3, warmup_frac=0.0),
        parallel=ParallelConfig(strategy="fsdp2", mixed_precision="bf16", activation_checkpointing=True),
        scaling=ScalingSection(use_gpu=True),
        run=RunSection(name="gpu", storage_uri=str(tmp_path / "runs")),
    )
    cfg.validate()
    trainer = Trainer(cfg)
    trainer.build({"videos": rows})
    return trainer


def _full(tensor: torch.Tensor) -> torch.Tensor:
    """A copy of a (possibly sharded) tensor whole, on the CPU (on one rank, a full tensor may be
    the parameter's own storage, which the next step changes)."""
    return (tensor.full_tensor() if hasattr(tensor, "full_tensor") else tensor).detach().to("cpu", copy=True)


def _optimizer_state(trainer) -> dict[str, dict[str, torch.Tensor]]:
    """AdamW's per-parameter state by parameter name, each tensor whole on the CPU."""
    names = {id(p): name for name, p in trainer.module.transformer.named_parameters()}
    return {
        names[id(param)]: {key: _full(value) for key, value in trainer.optimizer.state[param].items()}
        for param in trainer.params
        if param in trainer.optimizer.state
    }


def _weights(trainer) -> dict[str, torch.Tensor]:
    return {name: _full(p) for name, p in trainer.module.transformer.named_parameters() if p.requires_grad}


def test_fsdp2_bf16_trainer_steps_checkpoint_restore_and_export(process_group, tmp_path):
    from safetensors import safe_open

    from sama.pipeline_edit import SamaEditPipeline
    from sama.train import checkpoint as ckpt
    from sama.train.parallelize import compute_dtype

    rows = _rows(4)
    trainer = _trainer(tmp_path, rows)
    assert trainer.device.type == "cuda"
    transformer = trainer.module.transformer
    assert all(hasattr(p, "full_tensor") for p in trainer.params)  # sharded (DTensor)
    assert transformer.is_gradient_checkpointing
    assert compute_dtype(trainer.cfg.parallel, trainer.device) == torch.bfloat16
    assert all(hasattr(t, "full_tensor") for t in trainer.ema.state_dict().values())  # the shadow too

    losses = []
    for _ in range(STEPS):
        metrics = trainer.train_step()
        assert all(np.isfinite(v) for v in metrics.values()), metrics
        losses.append(metrics["train/loss"])
    assert trainer.step == STEPS
    assert min(losses[-3:]) < losses[0], losses

    # The optimizer's state is real: AdamW's moments of every trainable parameter, of its shape,
    # not all zero, counted over every step.
    shapes = {name: p.shape for name, p in transformer.named_parameters() if p.requires_grad}
    state = _optimizer_state(trainer)
    assert set(state) == set(shapes)
    for name, per_param in state.items():
        for key in ("exp_avg", "exp_avg_sq"):
            assert per_param[key].shape == shapes[name], (name, key)
            assert per_param[key].abs().sum() > 0, (name, key)
        assert float(per_param["step"]) == STEPS, name

    directory = str(tmp_path / "checkpoint")
    trainer.save_checkpoint(directory)
    saved = ckpt.verify(directory)
    assert saved.step == STEPS and saved.world_size == 1
    # ... and so is what the checkpoint holds: one rank owns every shard.
    weights = _weights(trainer)
    stored = {}
    for name in saved.files:
        if name.endswith(".safetensors") and name.startswith(ckpt.TENSORS_DIR + "/"):
            with safe_open(os.path.join(directory, name), "pt") as handle:
                # safe_open's handle has keys() but is not iterable.
                stored.update({key: handle.get_tensor(key) for key in handle.keys()})  # noqa: SIM118
    for name, per_param in state.items():
        for key in ("exp_avg", "exp_avg_sq", "step"):
            assert torch.equal(stored[f"{ckpt.OPTIM_PREFIX}{name}/{key}"], per_param[key]), (name, key)
        assert torch.equal(stored[f"{ckpt.MODEL_PREFIX}{name}"], weights[name]), name

    fresh = _trainer(tmp_path, rows)
    fresh.restore(directory)
    assert fresh.step == STEPS and fresh.samples_seen == trainer.samples_seen
    restored = _optimizer_state(fresh)
    assert set(restored) == set(state)
    for name, per_param in state.items():
        for key, value in per_param.items():
            assert torch.equal(restored[name][key], value), (name, key)
    fresh_weights = _weights(fresh)
    for name, value in weights.items():
        assert torch.equal(fresh_weights[name], value), name
    for name, value in trainer.ema.state_dict().items():
        assert torch.equal(_full(fresh.ema.state_dict()[name]), _full(value)), name
    assert fresh.scheduler.get_last_lr() == trainer.scheduler.get_last_lr()

    # The same next steps: the restored stream replays the same samples, the noise is the step's,
    # and the updates use the restored moments (the second step's loss sees the first's update).
    for _ in range(2):
        a, b = trainer.train_step(), fresh.train_step()
        assert b["train/loss"] == pytest.approx(a["train/loss"], rel=1e-5, abs=1e-6)
    # Not bitwise on a GPU (backward kernels may add in any order): the two trainers' weights are
    # a sliver of the steps' update apart, where moments not restored would put them about one
    # update apart.
    after, fresh_after = _weights(trainer), _weights(fresh)
    update = torch.cat([(after[name] - weights[name]).flatten() for name in after]).norm()
    apart = torch.cat([(fresh_after[name] - after[name]).flatten() for name in after]).norm()
    assert update > 0 and apart <= 1e-2 * update, (float(apart), float(update))

    export = str(tmp_path / "export")
    trainer.export(export)
    pipeline = SamaEditPipeline.from_pretrained(export)
    exported = pipeline.transformer.state_dict()
    for name, value in trainer.ema.state_dict().items():
        assert torch.equal(exported[name], _full(value).to(exported[name].dtype)), name
    source, instruction = rows[0]["source"], rows[0]["instruction"]
    edited = pipeline.to(trainer.device)(source, instruction, num_inference_steps=2, add_prefix=False, seed=0)
    assert edited.frames.shape == rows[0]["target"].shape
    print(
        f"losses {[round(v, 4) for v in losses]}, "
        f"peak memory {torch.cuda.max_memory_allocated() / 2**20:.0f} MiB"
    )
