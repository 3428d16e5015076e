"""`sama plan`: the per-GPU memory plan of a recipe (arithmetic on meta-device modules)."""

from __future__ import annotations

import json

import pytest

pytest.importorskip("torch")
pytest.importorskip("diffusers")
pytest.importorskip("transformers")

from sama import config
from sama.cli import main
from sama.preflight import CheckFailed, CheckWarning
from sama.train.plan import GIB, memory_plan, sample_tokens
from sama.train.recipes import recipe_path
from sama.train.trainer import TrainConfig


def _recipe(name: str, *overrides: str) -> TrainConfig:
    return config.load(TrainConfig, recipe_path(name), list(overrides))


def test_json_keys(capsys):
    assert main(["plan", "--recipe", "debug", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert {"recipe", "world_size", "per_gpu", "gpu_memory", "fits"} <= set(out)
    assert set(out["per_gpu"]) >= {"params", "grads", "optimizer", "ema", "encoders", "activations", "total"}
    assert out["recipe"] == "debug" and out["fits"] is True and out["gpu_memory"] == 80 * GIB
    parts = sum(v for k, v in out["per_gpu"].items() if k != "total")
    assert out["per_gpu"]["total"] == parts
    assert out["tokens_per_bucket"]


def test_tiny_parameter_counts_are_the_built_models():
    from sama.models.presets import build_model

    components = build_model("tiny")
    plan = memory_plan(_recipe("debug"))

    def count(module):
        return sum(p.numel() for p in module.parameters()) if module is not None else 0

    counts = plan.param_counts
    assert counts["transformer"] == counts["trainable"] == count(components.transformer)
    assert counts["text_encoder"] == count(components.text_encoder)
    assert counts["semantic_encoder"] == count(components.semantic_encoder)
    assert counts["vae"] == count(components.vae)
    # fp32 everywhere; DDP over 2 workers: a full copy of everything per GPU.
    n = counts["transformer"]
    assert plan.per_gpu["optimizer"] == 8 * n and plan.per_gpu["ema"] == 4 * n


def test_tokens_per_sample_are_source_semantic_target():
    from sama.models.presets import get_preset

    tokens = sample_tokens(get_preset("wan2.1-14b").resolved(), 480, 832, 49)
    assert tokens["target"] == tokens["source"] == 13 * 30 * 52
    assert tokens["semantic"] == 65
    assert tokens["total"] == 2 * 13 * 30 * 52 + 65


def test_fits_follows_the_gpu_memory():
    cfg = _recipe("debug", "scaling.use_gpu=true")
    plan = memory_plan(cfg)
    assert plan.fits
    small = memory_plan(cfg, gpu_memory_gib=plan.total / GIB * 0.99)
    assert not small.fits and small.total == plan.total
    assert memory_plan(cfg, gpu_memory_gib=plan.total / GIB).fits


def test_14b_recipes_fit_and_an_oversized_one_does_not():
    pretrain = memory_plan(_recipe("pretrain"), "pretrain")
    assert pretrain.fits and pretrain.num_frames == 49 and pretrain.world_size == 56
    assert 14.0e9 < pretrain.param_counts["transformer"] < 14.5e9
    assert 5.5e9 < pretrain.param_counts["text_encoder"] < 5.9e9  # umT5-XXL
    cp = memory_plan(_recipe("pretrain_81f_cp"), "pretrain_81f_cp")
    assert cp.fits and cp.num_frames == 81 and cp.context_parallel_size == 4
    lora = memory_plan(_recipe("sft_lora_14b"), "sft_lora_14b")
    assert lora.fits and lora.param_counts["trainable"] < 0.05 * lora.param_counts["transformer"]
    one = memory_plan(_recipe("pretrain", "scaling.num_workers=1", "parallel.activation_checkpointing=false"))
    assert not one.fits
    # Checkpointing and sharding each matter: the activations and the states shrink.
    assert one.per_gpu["activations"] > 10 * pretrain.per_gpu["activations"]
    assert one.per_gpu["optimizer"] == pytest.approx(56 * pretrain.per_gpu["optimizer"], rel=1e-6)


def test_train_refuses_a_plan_that_does_not_fit_unless_forced():
    from sama.train.preflight import check_memory_plan, run_preflight

    oversized = ["scaling.num_workers=1", "parallel.activation_checkpointing=false"]
    cfg = _recipe("pretrain", *oversized)
    with pytest.raises(CheckFailed) as failed:
        check_memory_plan(cfg)
    assert not isinstance(failed.value, CheckWarning)
    assert "does not fit" in failed.value.found and "activations" in failed.value.found  # the plan
    assert "--force" in failed.value.fix
    forced = _recipe("pretrain", *oversized, "plan.enforce=false")
    with pytest.raises(CheckWarning):
        check_memory_plan(forced)
    assert "GiB per GPU" in check_memory_plan(_recipe("pretrain"))
    # Only GPU runs are planned.
    cpu = _recipe("debug", "run.storage_uri=/nonexistent-sama-plan-test")
    names = [r.name for r in run_preflight(cpu, cluster=False, timeout_s=30)]
    assert "memory plan" not in names


def test_train_force_flag_sets_plan_enforce(capsys):
    assert main(["train", "--recipe", "debug", "--force", "--print-config"]) == 0
    assert "enforce: false" in capsys.readouterr().out


def test_precomputed_sources_take_the_frozen_encoders_off_the_plan(tmp_path, capsys):
    """Every source precomputed (a latents.json at its output root): the encoders' bytes leave the
    per-GPU plan, and the plan says how much that is; pixel sources keep them."""
    from sama import schema

    cfg = _recipe("pretrain")
    pixel = memory_plan(cfg)
    assert pixel.precomputed is False and pixel.per_gpu["encoders"] == pixel.frozen_encoders_bytes > 0
    assert "would save the frozen encoders'" in pixel.format()
    forced = memory_plan(cfg, precomputed=True)
    assert forced.per_gpu["encoders"] == 0 and forced.frozen_encoders_bytes == pixel.frozen_encoders_bytes
    assert forced.total == pixel.total - pixel.frozen_encoders_bytes
    assert forced.to_dict()["precomputed"] is True and forced.to_dict()["frozen_encoders_bytes"] > 0

    info = schema.LatentOutputInfo(encoders={}, dtype="bfloat16")
    schema.write_latent_info(str(tmp_path), info, [])
    for source in cfg.data.sources:
        source.uri = str(tmp_path / "shards" / source.media)
    detected = memory_plan(cfg)
    assert detected.precomputed and detected.total == forced.total
    assert "are not loaded on the GPUs" in detected.format()
