"""Training checkpoints (safetensors + JSON round trips, resumable optimizer) and the EMA."""

from __future__ import annotations

import json
import os

import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("safetensors")

from torch import nn  # noqa: E402
from torch.distributed.checkpoint.state_dict import (  # noqa: E402
    StateDictOptions,
    get_model_state_dict,
    get_optimizer_state_dict,
    set_model_state_dict,
    set_optimizer_state_dict,
)

from sama.train import checkpoint as ckpt  # noqa: E402
from sama.train.data import DataPosition  # noqa: E402
from sama.train.ema import EMA  # noqa: E402

FULL = StateDictOptions(full_state_dict=True, cpu_offload=True)


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


def _save(directory, model, optimizer, ema: EMA, state: ckpt.TrainState | None = None) -> None:
    ckpt.save(
        str(directory),
        dict(get_model_state_dict(model, options=FULL)),
        ema.state_dict(),
        get_optimizer_state_dict(model, optimizer, options=FULL),
        state or ckpt.TrainState(step=3),
    )


# ----------------------------------------------------------------------------------------------
# Checkpoint files


def test_round_trip_of_model_ema_optimizer_and_state(tmp_path):
    model, optimizer = _trained()
    ema = EMA(model, decay=0.9)
    ema.update(model)
    position = DataPosition(step=3, passes={"video": 2, "image": 1}, batches={"video": 2}, skipped=1)
    state = ckpt.TrainState(
        step=3,
        samples_seen=24,
        scheduler={"last_epoch": 3, "_last_lr": [0.01], "base_lrs": [0.01], "lr_lambdas": [None]},
        data_position=position.to_json(),
        mlflow_run_id="abc123",
        extra={"note": "x"},
    )
    _save(tmp_path, model, optimizer, ema, state)
    loaded = ckpt.load(str(tmp_path))

    expected_model = get_model_state_dict(model, options=FULL)
    assert set(loaded.model) == set(expected_model)
    for name, value in expected_model.items():
        assert torch.equal(loaded.model[name], value), name
    # The frozen parameter and the buffer are part of the model state, but not of the EMA.
    assert "frozen" in loaded.model and "scale" in loaded.model
    assert set(loaded.ema) == {n for n, p in model.named_parameters() if p.requires_grad}
    for name, value in ema.shadow.items():
        assert loaded.ema[name].dtype == torch.float32
        assert torch.equal(loaded.ema[name], value), name

    original = get_optimizer_state_dict(model, optimizer, options=FULL)
    assert set(loaded.optimizer["state"]) == set(original["state"]) == set(ema.names)
    for name, per_param in original["state"].items():
        assert set(loaded.optimizer["state"][name]) == {"step", "exp_avg", "exp_avg_sq"}
        for key, value in per_param.items():
            assert torch.equal(loaded.optimizer["state"][name][key], value), (name, key)
    group = loaded.optimizer["param_groups"][0]
    assert group["betas"] == (0.8, 0.99) and isinstance(group["betas"], tuple)
    assert group["lr"] == 1e-2 and group["eps"] == 1e-6 and group["weight_decay"] == 0.01
    assert group["params"] == original["param_groups"][0]["params"]

    assert loaded.state.step == 3 and loaded.state.samples_seen == 24
    assert loaded.state.scheduler == state.scheduler
    assert loaded.state.mlflow_run_id == "abc123" and loaded.state.extra == {"note": "x"}
    assert DataPosition.from_json(loaded.state.data_position) == position
    with open(tmp_path / ckpt.STATE_FILE) as handle:
        on_disk = json.load(handle)
    assert on_disk["step"] == 3 and on_disk["param_groups"][0]["betas"] == [0.8, 0.99]


def test_only_safetensors_and_json_are_written(tmp_path):
    model, optimizer = _trained()
    _save(tmp_path, model, optimizer, EMA(model))
    names = sorted(os.listdir(tmp_path))
    assert names == sorted(
        [ckpt.MODEL_FILE, ckpt.EMA_FILE, ckpt.OPTIMIZER_FILE, ckpt.RNG_FILE, ckpt.STATE_FILE]
    )
    assert all(n.endswith((".safetensors", ".json")) for n in names)
    for name in names:
        head = (tmp_path / name).read_bytes()[:2]
        assert head != b"\x80\x04" and head[:1] != b"\x80", f"{name} looks like a pickle"


def test_loaded_optimizer_gives_identical_next_updates(tmp_path):
    model, optimizer = _trained(steps=3)
    ema = EMA(model)
    _save(tmp_path, model, optimizer, ema)
    loaded = ckpt.load(str(tmp_path))

    fresh = Net(seed=7)  # other initial weights, no optimizer state
    fresh_optimizer = _optimizer(fresh)
    assert not torch.equal(fresh.head.weight, model.head.weight)
    set_model_state_dict(fresh, loaded.model, options=StateDictOptions(full_state_dict=True))
    set_optimizer_state_dict(
        fresh, fresh_optimizer, loaded.optimizer, options=StateDictOptions(full_state_dict=True)
    )
    for seed in (200, 201):
        _step(model, optimizer, seed)
        _step(fresh, fresh_optimizer, seed)
    for (name, a), (_, b) in zip(model.named_parameters(), fresh.named_parameters(), strict=True):
        assert torch.equal(a, b), name
    steps = [float(s["step"]) for s in fresh_optimizer.state_dict()["state"].values()]
    assert steps == [5.0] * len(steps)


def test_without_the_optimizer_state_the_next_update_differs(tmp_path):
    # The counter-check: the identical updates above come from the restored moments.
    model, optimizer = _trained(steps=3)
    fresh = Net(seed=7)
    fresh.load_state_dict(model.state_dict())
    fresh_optimizer = _optimizer(fresh)
    _step(model, optimizer, 200)
    _step(fresh, fresh_optimizer, 200)
    assert not torch.equal(model.head.weight, fresh.head.weight)


def test_rng_state_round_trip(tmp_path):
    model, optimizer = _trained()
    torch.manual_seed(1234)
    _save(tmp_path, model, optimizer, EMA(model))
    expected = torch.rand(8)
    torch.manual_seed(999)
    loaded = ckpt.load(str(tmp_path))
    assert loaded.rng["torch"].dtype == torch.uint8
    ckpt.set_rng_state(loaded.rng)
    assert torch.equal(torch.rand(8), expected)


@pytest.mark.parametrize("missing", [ckpt.MODEL_FILE, ckpt.EMA_FILE, ckpt.OPTIMIZER_FILE, ckpt.STATE_FILE])
def test_incomplete_checkpoint_names_what_is_missing(tmp_path, missing):
    model, optimizer = _trained(steps=1)
    _save(tmp_path, model, optimizer, EMA(model))
    os.remove(tmp_path / missing)
    with pytest.raises(FileNotFoundError, match="incomplete") as info:
        ckpt.load(str(tmp_path))
    assert missing in str(info.value)
    others = {ckpt.MODEL_FILE, ckpt.EMA_FILE, ckpt.OPTIMIZER_FILE, ckpt.STATE_FILE} - {missing}
    assert not any(other in str(info.value) for other in others)


def test_empty_directory_lists_every_required_file(tmp_path):
    with pytest.raises(FileNotFoundError) as info:
        ckpt.load(str(tmp_path))
    for name in (ckpt.MODEL_FILE, ckpt.EMA_FILE, ckpt.OPTIMIZER_FILE, ckpt.STATE_FILE):
        assert name in str(info.value)


def test_missing_rng_file_is_tolerated(tmp_path):
    model, optimizer = _trained(steps=1)
    _save(tmp_path, model, optimizer, EMA(model))
    os.remove(tmp_path / ckpt.RNG_FILE)
    assert ckpt.load(str(tmp_path)).rng == {}


def test_optimizer_flattening_round_trip():
    state = {
        "state": {
            "a.b.weight": {"step": torch.tensor(3.0), "exp_avg": torch.ones(2), "note": 5},
            "c": {"momentum_buffer": None},
        },
        "param_groups": [{"lr": 0.1, "params": ["a.b.weight", "c"]}],
    }
    tensors, scalars, groups = ckpt.flatten_optimizer_state(state)
    assert set(tensors) == {"a.b.weight/step", "a.b.weight/exp_avg"}
    assert scalars == {"a.b.weight/note": 5, "c/momentum_buffer": None}
    back = ckpt.unflatten_optimizer_state(tensors, scalars, groups)
    assert back["param_groups"] == state["param_groups"]
    assert back["state"]["c"] == {"momentum_buffer": None}
    assert back["state"]["a.b.weight"]["note"] == 5
    assert torch.equal(back["state"]["a.b.weight"]["exp_avg"], torch.ones(2))


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
