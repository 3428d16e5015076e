"""Sharded training checkpoints (DCP through the Hugging Face safetensors layout, JSON scalars):
save on 2 ranks under FSDP2, restore on 1 and 2, no full gather while saving, commit marker and
manifest checks, the driver's fallback past a broken checkpoint, the resume config check; the EMA."""

from __future__ import annotations

import json
import logging
import os
import tempfile

import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("safetensors")

import torch.distributed as dist  # noqa: E402
import torch.multiprocessing as mp  # noqa: E402
from safetensors.torch import load_file, save_file  # noqa: E402
from torch import nn  # noqa: E402

from sama.train import checkpoint as ckpt  # noqa: E402
from sama.train.data import DataPosition  # noqa: E402
from sama.train.ema import EMA  # noqa: E402


class Net(nn.Module):
    """Nested names (``body.0.weight``...), a frozen parameter and a buffer."""

    def __init__(self, seed: int = 0):
        super().__init__()
        torch.manual_seed(seed)
        self.body = nn.Sequential(nn.Linear(6, 8), nn.GELU(), nn.Linear(8, 4))
        self.head = nn.Linear(4, 2)
        self.frozen = nn.Parameter(torch.randn(3), requires_grad=False)
        self.register_buffer("scale", torch.tensor([2.0]))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.body(x)) * self.scale + self.frozen.sum()


def _optimizer(model: nn.Module) -> torch.optim.AdamW:
    params = [p for p in model.parameters() if p.requires_grad]
    return torch.optim.AdamW(params, lr=1e-2, betas=(0.8, 0.99), eps=1e-6, weight_decay=0.01)


def _step(model: nn.Module, optimizer: torch.optim.Optimizer, seed: int) -> None:
    generator = torch.Generator().manual_seed(seed)
    x = torch.randn(5, 6, generator=generator)
    y = torch.randn(5, 2, generator=generator)
    loss = ((model(x) - y) ** 2).mean()
    loss.backward()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)


def _trained(steps: int = 3) -> tuple[Net, torch.optim.AdamW]:
    model = Net(seed=0)
    optimizer = _optimizer(model)
    for i in range(steps):
        _step(model, optimizer, seed=100 + i)
    return model, optimizer


# ----------------------------------------------------------------------------------------------
# Sharded save and load on the tiny transformer (FSDP2, gloo, spawned ranks)


def _tiny_sharded():
    """The tiny transformer sharded like the trainer does (FSDP2 per block, then the root), one
    frozen parameter (as under LoRA), its EMA (after sharding: DTensors) and AdamW."""
    from sama.models.presets import build_transformer, get_preset
    from sama.train.parallelize import ParallelConfig, apply_fsdp2

    torch.manual_seed(0)
    transformer = build_transformer(get_preset("tiny"), load_weights=False)
    frozen = next(name for name, _ in transformer.named_parameters() if "norm" in name or "bias" in name)
    transformer.get_parameter(frozen).requires_grad_(False)
    apply_fsdp2(transformer, ParallelConfig(strategy="fsdp2", mixed_precision="fp32"), torch.device("cpu"))
    ema = EMA(transformer, 0.5)
    optimizer = torch.optim.AdamW([p for p in transformer.parameters() if p.requires_grad], lr=1e-2)
    return transformer, ema, optimizer, frozen


def _fake_steps(transformer, optimizer, ema, steps: int) -> None:
    for step in range(steps):
        for index, param in enumerate(p for p in transformer.parameters() if p.requires_grad):
            param.grad = torch.full_like(param, 0.01 * (step + 1) + 0.001 * index)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        ema.update(transformer)


def _full_state(transformer, optimizer, ema) -> dict[str, torch.Tensor]:
    """Every trainable tensor gathered (a collective), for comparisons only."""
    from sama.train.ema import full_tensor

    model, ema_state, optim = ckpt.trainable_state(transformer, optimizer, ema)
    flat, _ = ckpt.flat_tensors(model, ema_state, optim)
    return {k: full_tensor(v).detach().clone().contiguous() for k, v in sorted(flat.items())}


def _no_gather():
    """Make every DTensor gather raise (what a full state dict or the old EMA.state_dict use)."""
    from torch.distributed.tensor import DTensor

    def refuse(*args, **kwargs):
        raise AssertionError("a full gather during save")

    DTensor.full_tensor = refuse
    DTensor.redistribute = refuse


def _worker(rank: int, world: int, store: str, directory: str, mode: str) -> None:
    dist.init_process_group("gloo", store=dist.FileStore(store, world), rank=rank, world_size=world)
    try:
        from torch.distributed.tensor import DTensor

        transformer, ema, optimizer, frozen = _tiny_sharded()
        if mode == "save":
            _fake_steps(transformer, optimizer, ema, 2)
            expected = _full_state(transformer, optimizer, ema)
            if rank == 0:
                save_file(expected, os.path.join(directory, "..", "expected.safetensors"))
            gather, redistribute = DTensor.full_tensor, DTensor.redistribute
            _no_gather()
            try:
                # What the old code did (a full state dict) fails under the patch...
                from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

                with pytest.raises(AssertionError, match="full gather"):
                    get_model_state_dict(transformer, options=StateDictOptions(full_state_dict=True))
                # ... while the sharded save needs none.
                state = ckpt.TrainState(step=2, samples_seen=8, mlflow_run_id="run-1")
                ckpt.save_trainable(directory, transformer, optimizer, ema, state, config_text="seed: 0\n")
            finally:
                DTensor.full_tensor, DTensor.redistribute = gather, redistribute
            dist.barrier()
        # Load into a fresh model, optimizer and EMA of this world size, then compare.
        fresh, fresh_ema, fresh_optimizer, _ = _tiny_sharded()
        loaded = ckpt.load_trainable(directory, fresh, fresh_optimizer, fresh_ema)
        assert loaded.state.step == 2 and loaded.state.mlflow_run_id == "run-1"
        assert loaded.state.world_size == 2 and loaded.rng
        got = _full_state(fresh, fresh_optimizer, fresh_ema)
        expected = load_file(os.path.join(directory, "..", "expected.safetensors"))
        assert sorted(got) == sorted(expected)
        for key, value in expected.items():
            assert torch.equal(got[key], value), key
        # Only what trains is saved: the frozen parameter is in neither the model nor the EMA.
        assert f"model/{frozen}" not in got and f"ema/{frozen}" not in got
        # The next update continues identically (moments and step counters restored).
        _fake_steps(fresh, fresh_optimizer, fresh_ema, 1)
        step = [s["step"] for s in fresh_optimizer.state_dict()["state"].values()]
        assert all(float(s) == 3.0 for s in step)
    finally:
        dist.destroy_process_group()


def _spawn(world: int, directory: str, mode: str) -> None:
    store = tempfile.mktemp(prefix="sama-store-")
    mp.spawn(_worker, args=(world, store, directory, mode), nprocs=world, join=True)


@pytest.fixture(scope="module")
def sharded_checkpoint(tmp_path_factory):
    """Written by 2 ranks (each its own shards, no gather), read back by the same 2."""
    directory = str(tmp_path_factory.mktemp("sharded") / "checkpoint")
    os.makedirs(directory)
    _spawn(2, directory, "save")
    return directory


def test_two_ranks_save_their_shards_without_a_gather_and_restore_on_two(sharded_checkpoint):
    names = sorted(
        os.path.relpath(os.path.join(root, n), sharded_checkpoint)
        for root, _, files in os.walk(sharded_checkpoint)
        for n in files
    )
    assert names == [
        ckpt.CONFIG_FILE,
        "rng-00000.safetensors",
        "rng-00001.safetensors",
        ckpt.STATE_FILE,
        "tensors/shard-00001-model-00001-of-00001.safetensors",
        "tensors/shard-00002-model-00001-of-00001.safetensors",
    ]
    for name in names:
        head = open(os.path.join(sharded_checkpoint, name), "rb").read(2)
        assert head[:1] != b"\x80", f"{name} looks like a pickle"
    state = ckpt.verify(sharded_checkpoint)
    assert set(state.files) == set(names) - {ckpt.STATE_FILE}
    assert state.config_digest == ckpt.config_digest("seed: 0\n")
    # Each rank wrote only its shards: the two files together hold each tensor once.
    shard = load_file(os.path.join(sharded_checkpoint, names[-1]))
    expected = load_file(os.path.join(sharded_checkpoint, "..", "expected.safetensors"))
    key = next(k for k in expected if k.startswith("model/") and expected[k].dim() == 2)
    assert 0 < shard[key].numel() < expected[key].numel()


def test_a_checkpoint_of_two_ranks_restores_on_one(sharded_checkpoint):
    _spawn(1, sharded_checkpoint, "load")


def test_a_truncated_shard_or_a_missing_marker_is_detected(sharded_checkpoint, tmp_path):
    import shutil

    broken = str(tmp_path / "broken")
    shutil.copytree(sharded_checkpoint, broken)
    shard = os.path.join(broken, "tensors", "shard-00002-model-00001-of-00001.safetensors")
    with open(shard, "r+b") as handle:
        handle.truncate(os.path.getsize(shard) // 2)
    with pytest.raises(ckpt.CheckpointError, match="shard-00002.*truncated"):
        ckpt.verify(broken)
    os.remove(shard)
    with pytest.raises(ckpt.CheckpointError, match="shard-00002.* is missing"):
        ckpt.verify(broken)
    os.remove(os.path.join(broken, ckpt.STATE_FILE))
    with pytest.raises(ckpt.CheckpointError, match="not committed"):
        ckpt.verify(broken)
    # load refuses before reading a tensor.
    model, optimizer = _trained(steps=1)
    with pytest.raises(ckpt.CheckpointError, match="not committed"):
        ckpt.load_trainable(broken, model, optimizer, EMA(model))


def test_each_logical_rank_resumes_its_own_data_position():
    """state.json holds every logical data-parallel rank's position: the run keeps its logical
    ranks, each replaying its own, on any number of data-parallel ranks; from a checkpoint with
    rank 0's alone (before exact replay) every source starts a new pass salted by the step."""
    from types import SimpleNamespace

    from sama.train.trainer import Trainer

    positions = [
        DataPosition(step=6, passes={"v": 2}, batches={"v": 5}, pass_batches={"v": 1}, repeats={"v": 3}),
        DataPosition(step=6, passes={"v": 1}, batches={"v": 5}, pass_batches={"v": 5}, repeats={"v": 1}),
    ]
    state = ckpt.TrainState(
        step=6, data_position=positions[0].to_json(), data_positions=[p.to_json() for p in positions]
    )
    for dp_size in (1, 2):
        restored = Trainer._restored_positions(SimpleNamespace(dp_size=dp_size), state)
        assert restored == (2, positions)
    salted = DataPosition(step=6, passes={"v": 2}, batches={"v": 5}, salt=6)
    old = ckpt.TrainState(
        step=6, data_position=json.dumps({"step": 6, "passes": {"v": 2}, "batches": {"v": 5}})
    )
    assert Trainer._restored_positions(SimpleNamespace(dp_size=2), old) == (2, [salted])
    assert Trainer._restored_positions(SimpleNamespace(dp_size=2), ckpt.TrainState(step=6)) == (
        2,
        [DataPosition(step=6, salt=6)],
    )


def test_without_a_process_group_one_process_saves_and_loads(tmp_path):
    model, optimizer = _trained(steps=3)
    ema = EMA(model, decay=0.9)
    ema.update(model)
    position = DataPosition(step=3, passes={"video": 2}, batches={"video": 2}, skipped=1)
    state = ckpt.TrainState(step=3, samples_seen=24, data_position=position.to_json())
    ckpt.save_trainable(str(tmp_path), model, optimizer, ema, state)
    with open(tmp_path / ckpt.STATE_FILE) as handle:
        on_disk = json.load(handle)
    assert on_disk["step"] == 3 and on_disk["param_groups"][0]["betas"] == [0.8, 0.99]

    fresh = Net(seed=7)
    fresh_optimizer = _optimizer(fresh)
    fresh_ema = EMA(fresh, decay=0.9)
    loaded = ckpt.load_trainable(str(tmp_path), fresh, fresh_optimizer, fresh_ema)
    assert loaded.state.step == 3 and loaded.state.samples_seen == 24
    assert DataPosition.from_json(loaded.state.data_position) == position
    assert torch.equal(fresh.frozen, Net(seed=7).frozen)  # frozen: not in the checkpoint
    with torch.no_grad():  # frozen weights come from the model's own source
        fresh.frozen.copy_(model.frozen)
    for name in ema.names:
        assert torch.equal(fresh_ema.shadow[name], ema.shadow[name]), name
    for seed in (200, 201):
        _step(model, optimizer, seed)
        _step(fresh, fresh_optimizer, seed)
    for name, param in model.named_parameters():
        if param.requires_grad:
            assert torch.equal(param, fresh.get_parameter(name)), name


def test_rng_state_round_trip(tmp_path):
    model, optimizer = _trained()
    torch.manual_seed(1234)
    ckpt.save_trainable(str(tmp_path), model, optimizer, EMA(model), ckpt.TrainState())
    expected = torch.rand(8)
    torch.manual_seed(999)
    model, optimizer = _trained()
    loaded = ckpt.load_trainable(str(tmp_path), model, optimizer, EMA(model))
    assert loaded.rng["torch"].dtype == torch.uint8
    ckpt.set_rng_state(loaded.rng)
    assert torch.equal(torch.rand(8), expected)


# ----------------------------------------------------------------------------------------------
# The driver: fallback past a broken checkpoint, and the resume config check


def _run_with_checkpoints(tmp_path, count: int):
    from sama.train.launch import SNAPSHOT_FILE, run_uri
    from sama.train.trainer import TrainConfig

    cfg = TrainConfig()
    cfg.run.storage_uri, cfg.run.name = str(tmp_path), "r"
    names = [f"checkpoint_{i}" for i in range(count)]
    for step, name in enumerate(names, start=1):
        model, optimizer = _trained(steps=1)
        ckpt.save_trainable(
            os.path.join(run_uri(cfg), name), model, optimizer, EMA(model), ckpt.TrainState(step)
        )
    results = [{"checkpoint_dir_name": n, "metrics": {}} for n in names]
    snapshot = {
        "checkpoint_results": results,
        "checkpoint_report_indices": list(range(count)),
        "latest_checkpoint_result": results[-1],
    }
    with open(os.path.join(run_uri(cfg), SNAPSHOT_FILE), "w") as handle:
        json.dump(snapshot, handle)
    return cfg, [os.path.join(run_uri(cfg), n) for n in names]


def test_a_broken_latest_checkpoint_falls_back_to_the_previous_with_a_warning(tmp_path, caplog):
    from sama.train.launch import usable_checkpoint

    cfg, paths = _run_with_checkpoints(tmp_path, 3)
    assert usable_checkpoint(cfg) == paths[-1]
    shard = os.path.join(paths[-1], "tensors", "shard-00001-model-00001-of-00001.safetensors")
    with open(shard, "r+b") as handle:
        handle.truncate(100)
    os.remove(os.path.join(paths[-2], ckpt.STATE_FILE))
    with caplog.at_level(logging.WARNING, logger="sama.train.launch"):
        assert usable_checkpoint(cfg) == paths[0]
    warnings = [r.getMessage() for r in caplog.records]
    assert any("checkpoint_2" in w and "truncated" in w for w in warnings), warnings
    assert any("checkpoint_1" in w and "no state.json" in w for w in warnings), warnings
    os.remove(os.path.join(paths[0], ckpt.STATE_FILE))
    with pytest.raises(ckpt.CheckpointError, match="no usable checkpoint"):
        usable_checkpoint(cfg)


def test_a_resume_names_the_locked_keys_it_changes_and_no_secret():
    import dataclasses

    from sama.train.launch import config_changes
    from sama.train.trainer import TrainConfig

    old = TrainConfig()
    old.data.sources = [{"name": "a", "uri": "s3://bucket/a?X-Amz-Credential=SECRET"}]
    new = dataclasses.replace(old)
    new.optim = dataclasses.replace(old.optim, lr=old.optim.lr * 2)
    new.data = dataclasses.replace(old.data, sources=[{"name": "a", "uri": "s3://bucket/b?token=SECRET2"}])
    # Free to change: workers, parallelism, cadences, max_steps, tracking.
    new.scaling = dataclasses.replace(old.scaling, num_workers=4)
    new.checkpoint = dataclasses.replace(old.checkpoint, every_steps=7)
    new.max_steps = old.max_steps + 10
    new.tracking = dataclasses.replace(old.tracking, uri="http://user:pw@host")
    changes = config_changes(old, new)
    assert [c.split(":")[0] for c in changes] == ["data.sources", "optim.lr"]
    assert f"{old.optim.lr} -> {old.optim.lr * 2}" in changes[1]
    assert "SECRET" not in " ".join(changes) and "pw" not in " ".join(changes)
    assert config_changes(old, dataclasses.replace(old, max_steps=5, log_every=3)) == []


# ----------------------------------------------------------------------------------------------
# EMA


def test_ema_tracks_only_trainable_parameters_in_fp32():
    model = Net().to(torch.bfloat16)
    ema = EMA(model, decay=0.9)
    assert set(ema.names) == {"body.0.weight", "body.0.bias", "body.2.weight", "body.2.bias"} | {
        "head.weight",
        "head.bias",
    }
    assert "frozen" not in ema.shadow and "scale" not in ema.shadow
    assert all(t.dtype == torch.float32 for t in ema.shadow.values())
    # The shadow is a copy, not a view of the parameters.
    before = model.head.weight.detach().float().clone()
    with torch.no_grad():
        model.head.weight.add_(1.0)
    assert torch.equal(ema.shadow["head.weight"], before)


@pytest.mark.parametrize("decay", [0.0, 0.5, 0.75, 0.9998])
def test_ema_update_is_decay_times_old_plus_rest_times_new(decay):
    model = Net()
    ema = EMA(model, decay=decay)
    with torch.no_grad():
        # Dyadic values: d * old + (1 - d) * new is exact in fp32 for d = 0, 0.5, 0.75.
        model.head.weight.fill_(4.0)
        model.head.bias.fill_(-2.0)
        ema.shadow["head.weight"].fill_(0.0)
        ema.shadow["head.bias"].fill_(2.0)
    old = {k: v.clone() for k, v in ema.shadow.items()}
    ema.update(model)
    params = dict(model.named_parameters())
    for name in ema.names:
        expected = decay * old[name].double() + (1 - decay) * params[name].detach().double()
        torch.testing.assert_close(ema.shadow[name].double(), expected, rtol=0, atol=1e-6)
    if decay in (0.0, 0.5, 0.75):
        assert torch.equal(ema.shadow["head.weight"], torch.full_like(old["head.weight"], 4.0 * (1 - decay)))
        assert torch.equal(
            ema.shadow["head.bias"], torch.full_like(old["head.bias"], 2.0 * decay - 2.0 * (1 - decay))
        )
    # The frozen parameter is left alone.
    assert "frozen" not in ema.shadow


def test_ema_after_many_updates_converges_geometrically():
    model = Net()
    ema = EMA(model, decay=0.5)
    start = ema.shadow["head.bias"].clone()
    with torch.no_grad():
        model.head.bias.copy_(start + 1.0)
    for _ in range(3):
        ema.update(model)
    # After n updates towards a fixed target: old + (1 - d^n) * (target - old).
    torch.testing.assert_close(ema.shadow["head.bias"], start + (1 - 0.5**3), rtol=0, atol=1e-6)


def test_ema_rejects_bad_decay():
    for decay in (1.0, -0.1, 1.5):
        with pytest.raises(ValueError, match="decay"):
            EMA(Net(), decay=decay)


def test_ema_state_dict_round_trip_and_copy_to():
    model = Net(seed=0)
    ema = EMA(model, decay=0.5)
    other = Net(seed=1)
    ema.update(other)  # shadow = average of the two models' weights
    state = ema.state_dict()
    assert set(state) == set(ema.names)
    assert all(v.device.type == "cpu" and v.dtype == torch.float32 for v in state.values())
    # state_dict returns copies: mutating them leaves the shadow alone.
    state["head.bias"] = state["head.bias"].clone()

    restored = EMA(Net(seed=2), decay=0.5)
    restored.load_state_dict(state)
    for name in ema.names:
        assert torch.equal(restored.shadow[name], ema.shadow[name]), name

    target = Net(seed=3).to(torch.bfloat16)
    frozen_before = target.frozen.clone()
    restored.copy_to(target)
    for name, param in target.named_parameters():
        if name in ema.shadow:
            assert param.dtype == torch.bfloat16
            assert torch.equal(param, ema.shadow[name].to(torch.bfloat16)), name
    assert torch.equal(target.frozen, frozen_before)
    expected = (
        dict(model.named_parameters())["head.weight"] + dict(other.named_parameters())["head.weight"]
    ) / 2
    torch.testing.assert_close(ema.shadow["head.weight"], expected.detach(), rtol=0, atol=1e-6)


def test_ema_load_state_dict_names_a_missing_parameter():
    ema = EMA(Net())
    state = ema.state_dict()
    del state["body.2.bias"]
    with pytest.raises(KeyError, match="body.2.bias"):
        ema.load_state_dict(state)


def test_a_state_written_by_an_earlier_version_still_reads(tmp_path):
    """Checkpoints before this version carried an always-empty ``extra`` field: still readable."""
    state = {"step": 7, "samples_seen": 56, "world_size": 2, "extra": {}, "format": ckpt.FORMAT}
    (tmp_path / ckpt.STATE_FILE).write_text(json.dumps(state))
    read = ckpt.read_state(str(tmp_path))
    assert (read.step, read.samples_seen, read.world_size) == (7, 56, 2)
