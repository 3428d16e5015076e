"""The one FLOP model (sama.train.flops): its formula on the tiny preset, pinned, and what the
trainer's perf/mfu divides."""

from __future__ import annotations

import pytest
import torch

from sama.models.presets import build_transformer, get_preset
from sama.train.flops import PEAK_BF16_FLOPS, get_peak_flops, step_flops


@pytest.fixture(scope="module")
def tiny():
    torch.manual_seed(0)
    return build_transformer(get_preset("tiny"))


def test_attention_flops_follow_the_formula(tiny):
    config = tiny.config
    layers, width = config.num_layers, config.num_attention_heads * config.attention_head_dim
    source, semantic, target, text = 48, 5, 48, 16
    seq = source + semantic + target
    flops = step_flops(tiny, source, semantic, target, text)
    assert flops["seq"] == seq
    assert flops["attention"] == 12 * layers * width * seq * seq + 12 * layers * width * seq * text
    assert flops["total"] == flops["dense"] + flops["attention"]
    # Dense FLOPs grow linearly with the tokens each part sees: one more target token adds the
    # per-token blocks, the patch embedding and the output projection, forward and backward.
    more = step_flops(tiny, source, semantic, target + 1, text)
    patch = sum(m.weight.numel() for m in tiny.patch_embedding.modules() if hasattr(m, "weight"))
    out = tiny.proj_out.weight.numel()
    assert more["dense"] - flops["dense"] == 6 * (flops["params_per_token"] + patch + out)


def test_tiny_step_flops_are_pinned(tiny):
    """A golden value: a change to the FLOP model (or to the tiny preset) must be deliberate."""
    flops = step_flops(tiny, 48, 5, 48, 16)
    assert flops["total"] == pytest.approx(EXPECTED_TINY_TOTAL, rel=1e-12)


def test_peak_flops_by_device_name(monkeypatch):
    assert get_peak_flops(torch.device("cpu")) is None
    assert get_peak_flops(torch.device("cpu"), override=5e12) == 5e12
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "NVIDIA H200")
    assert get_peak_flops(torch.device("cuda", 0)) == PEAK_BF16_FLOPS["H200"] == 989e12
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "NVIDIA A100-SXM4-80GB")
    assert get_peak_flops(torch.device("cuda", 0)) == 312e12
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "Some GPU")
    assert get_peak_flops(torch.device("cuda", 0)) is None


EXPECTED_TINY_TOTAL = 551_993_856.0
