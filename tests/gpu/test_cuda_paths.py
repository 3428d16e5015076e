"""CUDA paths of the trainer: FSDP2 sharding, bf16 mixed precision, activation checkpointing,
EMA over sharded parameters, sharded checkpoints and export. Skipped without CUDA."""

from __future__ import annotations

import os
import socket

import pytest
import torch

pytestmark = pytest.mark.gpu


@pytest.fixture
def process_group():
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


def test_fsdp2_bf16_steps_checkpoint_and_export(process_group, tmp_path):
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    from sama.models.presets import build_model, build_transformer
    from sama.models.training import SamaBatch, SamaTrainingModule
    from sama.train import checkpoint
    from sama.train.ema import EMA
    from sama.train.parallelize import ParallelConfig, compute_dtype, parallelize

    device = torch.device("cuda", 0)
    torch.manual_seed(0)
    components = build_model("tiny").to(device)
    module = SamaTrainingModule(components)
    cfg = ParallelConfig(strategy="fsdp2", activation_checkpointing=True, mixed_precision="bf16")
    model = parallelize(module, cfg, device, world_size=1)
    assert any(hasattr(p, "full_tensor") for p in module.transformer.parameters())  # sharded (DTensor)
    assert compute_dtype(cfg, device) == torch.bfloat16
    ema = EMA(module.transformer, 0.9)
    params = [p for p in module.transformer.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=1e-3)
    frames = torch.randint(0, 255, (2, 9, 48, 64, 3), dtype=torch.uint8)
    batch = SamaBatch(prompts=["[Video edit] make it red"] * 2, target=frames, source=frames.clone())
    losses = []
    for step in range(8):
        generator = torch.Generator().manual_seed(step)
        with torch.no_grad():
            encoded = module.encode_batch(batch, generator)
        with torch.autocast("cuda", dtype=torch.bfloat16):
            out = model(encoded, generator)
        out.loss.backward()
        norm = torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        ema.update(module.transformer)
        losses.append(float(out.loss.detach()))
        assert torch.isfinite(
            torch.as_tensor(float(norm.full_tensor() if hasattr(norm, "full_tensor") else norm))
        )
    assert all(torch.isfinite(torch.tensor(losses)))
    assert min(losses[-3:]) < losses[0]

    options = StateDictOptions(full_state_dict=True, cpu_offload=True)
    weights = dict(get_model_state_dict(module.transformer, options=options))
    ema_state = {k: v.full_tensor().cpu() for k, v in ema.state_dict().items()}
    assert set(ema_state) <= set(weights)
    assert all(hasattr(t, "full_tensor") for t in ema.state_dict().values())  # the shadow stays sharded
    checkpoint.save_trainable(
        str(tmp_path / "ckpt"), module.transformer, optimizer, ema, checkpoint.TrainState(step=8)
    )
    restored = EMA(module.transformer, 0.9)
    checkpoint.load_trainable(str(tmp_path / "ckpt"), module.transformer, optimizer, restored)
    assert all(torch.equal(restored.shadow[k].full_tensor().cpu(), ema_state[k]) for k in ema_state)

    exported = build_transformer(components.config, load_weights=False)
    exported.load_state_dict({**weights, **ema_state})
    name = next(iter(ema_state))
    assert torch.equal(dict(exported.named_parameters())[name].detach().cpu(), ema_state[name])
    print(
        f"losses {[round(v, 4) for v in losses]}, "
        f"peak memory {torch.cuda.max_memory_allocated() / 2**20:.0f} MiB"
    )
