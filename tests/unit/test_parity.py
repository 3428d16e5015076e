"""Parity profiles (sama.models.parity): the "authors" profile reproduces the authors' release, the
"sama" profile leaves every existing default alone. Expectations are computed here independently
(numpy formulas, hand arithmetic), never by calling the code under test."""

from __future__ import annotations

import dataclasses
import json
import math
import os

import numpy as np
import pytest
import yaml

torch = pytest.importorskip("torch")
pytest.importorskip("diffusers")
pytest.importorskip("transformers")

from diffusers import FlowMatchEulerDiscreteScheduler, WanTransformer3DModel  # noqa: E402

from sama import cli  # noqa: E402
from sama import config as config_lib  # noqa: E402
from sama.losses import (  # noqa: E402
    LossConfig,
    TimestepSamplerConfig,
    bell_weight,
    flow_matching_loss,
    sama_loss,
    sample_timesteps,
    semantic_loss,
    set_scheduler_sigmas,
)
from sama.models import parity  # noqa: E402
from sama.models.config import ModelConfig  # noqa: E402
from sama.models.presets import (  # noqa: E402
    build_model,
    build_semantic_encoder,
    build_transformer,
    get_preset,
    resolve_model_config,
)
from sama.models.semantic import SemanticHead, sample_anchor_indices  # noqa: E402
from sama.models.training import SamaTrainingModule, TrainingModuleConfig  # noqa: E402
from sama.models.transformer_sama import SamaTransformer3DModel  # noqa: E402
from sama.pipeline_edit import PIPELINE_FILE, PipelineConfig, SamaEditPipeline  # noqa: E402
from sama.train import recipes  # noqa: E402
from sama.train.trainer import ModelSection, TrainConfig, resolve_train_config  # noqa: E402
from sama.train.trainer import resolve_model_config as resolve_section  # noqa: E402
from tests.unit.test_models import SEM_DIM, SMALL  # noqa: E402


def _authors_tiny(num_layers: int = 1) -> ModelConfig:
    config = dataclasses.replace(get_preset("tiny"), parity="authors")
    config.transformer.num_layers = num_layers
    return config


# ----------------------------------------------------------------------------------------------
# 1. Semantic RoPE "null": zero queries and keys


def _sama_model(rope: str) -> SamaTransformer3DModel:
    torch.manual_seed(0)
    base = WanTransformer3DModel(**SMALL).eval()
    with torch.no_grad():
        for param in base.parameters():
            param.add_(torch.randn_like(param) * 0.05)
    model = SamaTransformer3DModel.from_wan(
        base, semantic_dim=SEM_DIM, semantic_hidden_dim=20, semantic_grid_size=2, semantic_rope=rope
    )
    with torch.no_grad():
        model.type_embedding.weight.normal_(0.0, 0.1)
    return model.eval()


def _self_attention_qk(model: SamaTransformer3DModel, monkeypatch) -> tuple[list, object]:
    """Run one forward and return the (query, key) every self-attention layer attended with."""
    import diffusers.models.transformers.transformer_wan as wan

    calls = []
    original = wan.dispatch_attention_fn

    def recording(query, key, value, *args, **kwargs):
        calls.append((query.detach().clone(), key.detach().clone()))
        return original(query, key, value, *args, **kwargs)

    monkeypatch.setattr(wan, "dispatch_attention_fn", recording)
    gen = torch.Generator().manual_seed(1)
    target = torch.randn(1, 4, 2, 4, 6, generator=gen)
    source = torch.randn(1, 4, 2, 4, 6, generator=gen)
    semantic = torch.randn(1, 5, SEM_DIM, generator=gen)
    text = torch.randn(1, 7, 16, generator=gen)
    with torch.no_grad():
        model(target, torch.tensor([500.0]), text, source_latents=source, semantic_tokens=semantic)
    layout = model.sequence_layout(target.shape, source.shape, 5)
    # Self-attention: the keys are the sequence itself (cross-attention's are the 7 text tokens).
    return [(q, k) for q, k in calls if k.shape[1] == layout.length], layout


def test_diffusers_wan_rotary_with_zero_cos_and_sin_gives_zero():
    # The rotation diffusers' Wan attention applies: x * cos + rotate(x) * sin (pairwise).
    from diffusers.models.transformers.transformer_wan import WanAttnProcessor

    attention = _sama_model("grid").blocks[0].attn1
    assert isinstance(attention.processor, WanAttnProcessor)
    hidden = torch.randn(1, 3, attention.inner_dim)
    zeros = torch.zeros(1, 3, 1, 24)
    # With cos = sin = 0 the attention output is the mean of the values (zero scores everywhere).
    out = attention(hidden, rotary_emb=(zeros, zeros))
    values = attention.to_v(hidden).mean(dim=1, keepdim=True)
    expected = attention.to_out[0](values.expand(-1, 3, -1))
    assert torch.allclose(out, expected, atol=1e-5)


def test_null_rope_zeroes_semantic_queries_and_keys_in_every_layer(monkeypatch):
    model = _sama_model("null")
    calls, layout = _self_attention_qk(model, monkeypatch)
    assert len(calls) == SMALL["num_layers"]
    for query, key in calls:
        assert torch.count_nonzero(query[:, layout.semantic]) == 0
        assert torch.count_nonzero(key[:, layout.semantic]) == 0
        assert query[:, layout.target].abs().max() > 0
        assert key[:, layout.source].abs().max() > 0


def test_null_rope_leaves_target_and_source_tokens_alone(monkeypatch):
    null_model = _sama_model("null")
    grid_model = _sama_model("grid")
    grid_model.load_state_dict(null_model.state_dict())
    null_calls, layout = _self_attention_qk(null_model, monkeypatch)
    grid_calls, _ = _self_attention_qk(grid_model, monkeypatch)
    # Same weights, same inputs: the first layer's source and target q/k do not depend on the
    # semantic tokens' rotary mode (later layers do, through attention).
    (q_null, k_null), (q_grid, k_grid) = null_calls[0], grid_calls[0]
    for part in (layout.source, layout.target):
        assert torch.equal(q_null[:, part], q_grid[:, part])
        assert torch.equal(k_null[:, part], k_grid[:, part])
    assert q_grid[:, layout.semantic].abs().max() > 0  # "grid" does rotate them


def test_null_rope_tables():
    model = _sama_model("null")
    target = torch.zeros(1, 4, 2, 4, 6)
    layout = model.sequence_layout(target.shape, target.shape, 5)
    cos, sin = model.rotary_embedding(layout, target, target)
    assert torch.count_nonzero(cos[:, layout.semantic]) == 0
    assert torch.count_nonzero(sin[:, layout.semantic]) == 0
    base_cos, base_sin = model.rope(target)
    assert torch.equal(cos[:, layout.target], base_cos) and torch.equal(sin[:, layout.target], base_sin)


# ----------------------------------------------------------------------------------------------
# 2. Anchor frame "first"


def test_first_anchor_is_frame_zero():
    assert sample_anchor_indices(49, 1, "first") == [0]
    assert sample_anchor_indices(1, 1, "first") == [0]
    assert sample_anchor_indices(5, 2, "first") == [0, 1]


def test_authors_semantic_encoder_encodes_frame_zero():
    encoder = build_semantic_encoder(_authors_tiny())
    assert encoder.anchor_sampling == "first"
    gen = torch.Generator().manual_seed(0)
    frames = torch.rand(2, 3, 5, 16, 16, generator=gen) * 2 - 1
    tokens = encoder(frames, torch.Generator().manual_seed(3))
    assert torch.allclose(tokens, encoder.encode_images(frames[:, :, 0]), atol=1e-6)


# ----------------------------------------------------------------------------------------------
# 3. Projector and head: LayerNorm eps, head init, saved with the model


def test_layernorm_eps_by_profile():
    authors = build_transformer(resolve_model_config(_authors_tiny()))
    sama = build_transformer(resolve_model_config(get_preset("tiny")))
    assert authors.semantic_projector.norm.eps == 1e-6 and authors.semantic_head.norm.eps == 1e-6
    assert sama.semantic_projector.norm.eps == 1e-5 and sama.semantic_head.norm.eps == 1e-5
    assert authors.config.semantic_layernorm_eps == 1e-6
    assert authors.config.semantic_head_init == "xavier"
    assert sama.config.semantic_head_init == "default"


@pytest.mark.parametrize("via", ["init", "from_wan"])
def test_xavier_head_init_statistics(via):
    dim, semantic_dim = SMALL["num_attention_heads"] * SMALL["attention_head_dim"], 1152
    kwargs = {"semantic_dim": semantic_dim, "semantic_layernorm_eps": 1e-6, "semantic_head_init": "xavier"}
    torch.manual_seed(0)
    if via == "init":
        model = SamaTransformer3DModel(**SMALL, **kwargs)
    else:
        model = SamaTransformer3DModel.from_wan(WanTransformer3DModel(**SMALL), **kwargs)
    weight = model.semantic_head.proj.weight.detach()
    bias = model.semantic_head.proj.bias.detach()
    bound = math.sqrt(6.0 / (dim + semantic_dim))
    assert weight.abs().max() <= bound
    assert weight.abs().max() > 0.99 * bound
    assert abs(weight.std().item() - bound / math.sqrt(3.0)) < 0.02 * bound
    assert 0.8e-3 < bias.std().item() < 1.2e-3 and abs(bias.mean().item()) < 2e-4
    assert model.semantic_head.norm.eps == 1e-6 and model.semantic_projector.norm.eps == 1e-6


def test_default_head_init_draws_what_pytorch_draws():
    # The "sama" profile's head is exactly nn.LayerNorm + nn.Linear from the same RNG stream.
    torch.manual_seed(7)
    head = SemanticHead(48, 12)
    torch.manual_seed(7)
    norm, proj = torch.nn.LayerNorm(48), torch.nn.Linear(48, 12)
    assert torch.equal(head.proj.weight, proj.weight) and torch.equal(head.proj.bias, proj.bias)
    assert head.norm.eps == norm.eps == 1e-5


def test_saved_transformer_keeps_eps_and_old_configs_load_as_today(tmp_path):
    model = SamaTransformer3DModel(
        **SMALL, semantic_dim=SEM_DIM, semantic_layernorm_eps=1e-6, semantic_head_init="xavier"
    )
    model.save_pretrained(str(tmp_path / "new"))
    loaded = SamaTransformer3DModel.from_pretrained(str(tmp_path / "new"))
    assert loaded.semantic_projector.norm.eps == 1e-6 and loaded.semantic_head.norm.eps == 1e-6
    assert loaded.config.semantic_head_init == "xavier"
    for name, value in model.state_dict().items():
        assert torch.equal(loaded.state_dict()[name], value), name
    # An export written before these keys existed loads with today's behaviour.
    config_path = tmp_path / "new" / "config.json"
    data = json.loads(config_path.read_text())
    del data["semantic_layernorm_eps"], data["semantic_head_init"]
    config_path.write_text(json.dumps(data))
    old = SamaTransformer3DModel.from_pretrained(str(tmp_path / "new"))
    assert old.semantic_projector.norm.eps == 1e-5 and old.semantic_head.norm.eps == 1e-5


# ----------------------------------------------------------------------------------------------
# 4. Sampler sigma grid


def _numpy_authors_sigmas(steps: int, shift: float) -> np.ndarray:
    s = np.linspace(1.0, 0.0, steps + 1)[:-1]
    return shift * s / (1.0 + (shift - 1.0) * s)


def test_authors_sigma_grid_50_steps_shift_5():
    expected = _numpy_authors_sigmas(50, 5.0)
    assert expected[0] == 1.0 and abs(expected[-1] - 0.1 / 1.08) < 1e-12  # ~0.0926
    scheduler = FlowMatchEulerDiscreteScheduler(shift=5.0)
    set_scheduler_sigmas(scheduler, 50, "authors", 5.0)
    sigmas = scheduler.sigmas.double().numpy()
    assert len(sigmas) == 51 and sigmas[-1] == 0.0
    assert np.allclose(sigmas[:-1], expected, atol=1e-6)
    assert np.allclose(scheduler.timesteps.double().numpy(), expected * 1000, atol=1e-3)


def test_authors_sigma_grid_when_the_scheduler_has_another_shift():
    scheduler = FlowMatchEulerDiscreteScheduler(shift=3.0)
    set_scheduler_sigmas(scheduler, 10, "authors", 5.0)
    assert np.allclose(scheduler.sigmas[:-1].double().numpy(), _numpy_authors_sigmas(10, 5.0), atol=1e-6)


def test_euler_steps_follow_the_authors_sigmas_to_zero():
    steps = 50
    expected = np.append(_numpy_authors_sigmas(steps, 5.0), 0.0)
    scheduler = FlowMatchEulerDiscreteScheduler(shift=5.0)
    set_scheduler_sigmas(scheduler, steps, "authors", 5.0)
    gen = torch.Generator().manual_seed(0)
    clean, noise = torch.randn(2, 8, generator=gen), torch.randn(2, 8, generator=gen)
    x = noise.clone()
    for index, timestep in enumerate(scheduler.timesteps):
        # The exact velocity dx/dsigma = noise - clean keeps x on the straight path.
        x = scheduler.step(noise - clean, timestep, x, return_dict=False)[0]
        sigma = expected[index + 1]
        assert torch.allclose(x, (1 - sigma) * clean + sigma * noise, atol=1e-5)
    assert torch.allclose(x, clean, atol=1e-5)


def test_diffusers_grid_is_the_scheduler_default():
    ours, theirs = FlowMatchEulerDiscreteScheduler(shift=5.0), FlowMatchEulerDiscreteScheduler(shift=5.0)
    set_scheduler_sigmas(ours, 12, "diffusers", 5.0)
    theirs.set_timesteps(12)
    assert torch.equal(ours.sigmas, theirs.sigmas)


def test_pipeline_sigma_grid_follows_the_model_parity_and_round_trips(tmp_path):
    torch.manual_seed(0)
    components = build_model(_authors_tiny())
    pipeline = SamaEditPipeline.from_components(components)
    assert pipeline.config.sigma_grid == "authors"
    scheduler = pipeline._fresh_scheduler()
    pipeline._set_timesteps(scheduler, 50, "cpu")
    assert np.allclose(scheduler.sigmas[:-1].double().numpy(), _numpy_authors_sigmas(50, 5.0), atol=1e-6)
    # Explicit wins; a sama model keeps the diffusers grid.
    explicit = SamaEditPipeline.from_components(components, PipelineConfig(sigma_grid="diffusers"))
    assert explicit.config.sigma_grid == "diffusers"
    # The export records concrete values and reloads identically.
    pipeline.save_pretrained(str(tmp_path))
    manifest = json.loads((tmp_path / PIPELINE_FILE).read_text())
    assert manifest["pipeline"]["sigma_grid"] == "authors"
    assert manifest["model"]["parity"] == "authors"
    assert manifest["model"]["semantic"]["rope"] == "null"
    assert manifest["model"]["semantic"]["layernorm_eps"] == 1e-6
    loaded = SamaEditPipeline.from_pretrained(str(tmp_path))
    assert loaded.config == pipeline.config and loaded.model_config == pipeline.model_config
    assert loaded.transformer.semantic_head.norm.eps == 1e-6
    assert loaded.transformer.config.semantic_rope == "null"


def test_pipeline_without_parity_keeps_the_diffusers_grid():
    assert parity.resolve(PipelineConfig(), "sama", "inference").sigma_grid == "diffusers"
    assert parity.resolve(PipelineConfig(), None, "inference").sigma_grid == "diffusers"


# ----------------------------------------------------------------------------------------------
# 5. Training timesteps: shifted grid and bell weighting


def _numpy_bell(shift: float) -> tuple[np.ndarray, np.ndarray]:
    sigmas = _numpy_authors_sigmas(1000, shift)
    x = sigmas * 1000
    y = np.exp(-2 * ((x - 500) / 1000) ** 2)
    shifted = y - y.min()
    return sigmas, shifted * (1000 / shifted.sum())


def test_bell_weights_match_diffsynth():
    sigmas, expected = _numpy_bell(5.0)
    weights = bell_weight(torch.from_numpy(1.0 - sigmas), 5.0).double().numpy()
    assert np.allclose(weights, expected, rtol=1e-5, atol=1e-6)
    assert abs(weights.sum() - 1000.0) < 1e-2
    # The pure-noise end (x = 1000) is the minimum: weight 0; the clean end is small but positive.
    assert weights[0] == pytest.approx(0.0, abs=1e-6)
    # At the clean end x ~ 4.98: (exp(-2 (x - 500)^2 / 1000^2) - exp(-0.5)) * 1000 / sum, small.
    assert 0 < weights[-1] < 0.05
    assert abs(sigmas[np.argmax(weights)] - 0.5) < 2e-3  # the peak is at x = 500


def test_shifted_grid_draws_only_grid_values():
    grid = 1.0 - _numpy_authors_sigmas(1000, 5.0)
    t = sample_timesteps(
        20000, TimestepSamplerConfig(kind="shifted_grid", shift=5.0), torch.Generator().manual_seed(0)
    )
    distance = np.abs(t.double().numpy()[:, None] - grid[None, :]).min(axis=1)
    assert distance.max() < 1e-6
    assert len(np.unique(t.numpy())) > 950  # uniform over the 1000 grid points
    assert t.dtype == torch.float32


def test_weighted_flow_matching_loss_is_a_per_sample_weighted_mean():
    pred = torch.tensor([[1.0, 2.0], [0.0, 0.0]])
    target = torch.tensor([[0.0, 0.0], [1.0, 3.0]])
    weight = torch.tensor([0.5, 2.0])
    # Sample 0: (1 + 4) / 2 = 2.5; sample 1: (1 + 9) / 2 = 5; weighted mean (1.25 + 10) / 2.
    assert flow_matching_loss(pred, target, weight).item() == pytest.approx(5.625)
    assert flow_matching_loss(pred, target).item() == pytest.approx(3.75)


# ----------------------------------------------------------------------------------------------
# 6. Semantic loss space


def test_velocity_space_semantic_loss_by_hand():
    pred = torch.tensor([[[0.5, -1.0]], [[2.0, 0.0]]])
    clean = torch.tensor([[[1.0, 1.0]], [[0.0, 2.0]]])
    noise = torch.tensor([[[0.0, 2.0]], [[1.0, -1.0]]])
    t = torch.tensor([0.25, 0.75])
    noisy = t[:, None, None] * clean + (1 - t[:, None, None]) * noise
    # Targets clean - noise: [1, -1], [-1, 3]; |pred - target|: [0.5, 0], [3, 3] -> mean 6.5 / 4.
    velocity = semantic_loss(pred, noisy, clean, t, space="velocity", noise=noise)
    assert velocity.item() == pytest.approx(1.625)
    # Clean space, by hand: s_t + (1 - t) v_hat vs s.
    clean_est = noisy + (1 - t[:, None, None]) * pred
    expected_clean = (clean_est - clean).abs().mean().item()
    assert semantic_loss(pred, noisy, clean, t).item() == pytest.approx(expected_clean)
    total = sama_loss(
        torch.zeros(2, 3),
        torch.ones(2, 3),
        t,
        semantic_velocity_pred=pred,
        semantic_noisy=noisy,
        semantic_clean=clean,
        semantic_noise=noise,
        semantic_space="velocity",
        semantic_weight=0.1,
    )
    assert total.loss.item() == pytest.approx(1.0 + 0.1 * 1.625)


def test_training_module_uses_the_model_parity():
    torch.manual_seed(0)
    components = build_model(_authors_tiny(), with_vae=False, with_text_encoder=False)
    module = SamaTrainingModule(components, TrainingModuleConfig(text_dropout_prob=0.0))
    loss = module.config.loss
    assert (loss.timesteps.kind, loss.timesteps.shift) == ("shifted_grid", 5.0)
    assert (loss.timestep_weighting, loss.semantic_space) == ("bell", "velocity")
    # An explicit knob wins over the profile.
    explicit = TrainingModuleConfig(loss=LossConfig(semantic_space="clean"))
    assert SamaTrainingModule(components, explicit).config.loss.semantic_space == "clean"


# ----------------------------------------------------------------------------------------------
# Profile resolution

TODAY_SEMANTIC = {"rope": "grid", "anchor_sampling": "random", "layernorm_eps": 1e-5, "head_init": "default"}
TODAY_TIMESTEPS = {
    "kind": "logit_normal",
    "logit_mean": 0.0,
    "logit_std": 1.0,
    "shift": 1.0,
    "t_min": 0.0,
    "t_max": 1.0,
}


def test_sama_profile_keeps_todays_defaults():
    model = resolve_model_config("tiny")
    assert model.parity == "sama"
    for key, value in TODAY_SEMANTIC.items():
        assert getattr(model.semantic, key) == value, key
    cfg = resolve_train_config(TrainConfig())
    assert dataclasses.asdict(cfg.objective.loss.timesteps) == TODAY_TIMESTEPS
    assert cfg.objective.loss.semantic_weight == 0.1
    assert cfg.objective.loss.timestep_weighting == "none"
    assert cfg.objective.loss.semantic_space == "clean"
    assert cfg.inference.sigma_grid == "diffusers"
    assert cfg.model.parity == "sama"
    # Everything but the new knobs is what the unresolved config says.
    plain = config_lib.flatten(TrainConfig())
    resolved = config_lib.flatten(cfg)
    changed = {k for k in plain if plain[k] != resolved[k]}
    assert changed == {
        "model.parity",
        "objective.loss.timesteps.kind",
        "objective.loss.timesteps.shift",
        "objective.loss.timestep_weighting",
        "objective.loss.semantic_space",
        "inference.sigma_grid",
    }


def test_unset_knobs_follow_the_profile_and_explicit_ones_win():
    config = dataclasses.replace(get_preset("tiny"), parity="authors")
    config.semantic.rope = "grid"
    resolved = resolve_model_config(config)
    assert resolved.semantic.rope == "grid"  # explicit
    assert resolved.semantic.anchor_sampling == "first"
    assert resolved.semantic.layernorm_eps == 1e-6 and resolved.semantic.head_init == "xavier"
    assert resolve_model_config(resolved) == resolved  # resolving twice is resolving once


def _debug(overrides=()):
    return config_lib.load(TrainConfig, recipes.recipe_path("debug"), list(overrides))


def test_authors_training_config_fills_only_unset_knobs():
    cfg = resolve_train_config(_debug(["model.parity=authors", "objective.loss.semantic_space=clean"]))
    loss = cfg.objective.loss
    # The debug recipe sets timesteps.kind/shift explicitly: they stay.
    assert (loss.timesteps.kind, loss.timesteps.shift) == ("logit_normal", 3.0)
    assert loss.timestep_weighting == "bell"
    assert loss.semantic_space == "clean"  # explicit
    assert cfg.inference.sigma_grid == "authors"
    assert cfg.inference.num_inference_steps == 10  # the recipe's
    model = resolve_section(cfg.model)
    assert model.parity == "authors" and model.semantic.rope == "null"
    # Without a recipe, every objective knob is the authors'.
    bare = resolve_train_config(TrainConfig(model=ModelSection(parity="authors")))
    assert (bare.objective.loss.timesteps.kind, bare.objective.loss.timesteps.shift) == ("shifted_grid", 5.0)
    assert resolve_train_config(bare) == bare
    # The same profile through a model override.
    via_override = resolve_train_config(TrainConfig(model=ModelSection(overrides={"parity": "authors"})))
    assert via_override.objective.loss.semantic_space == "velocity"


def test_sama_profile_keeps_the_debug_recipe():
    cfg = resolve_train_config(_debug())
    assert (cfg.objective.loss.timesteps.kind, cfg.objective.loss.timesteps.shift) == ("logit_normal", 3.0)
    assert cfg.objective.loss.timestep_weighting == "none" and cfg.inference.sigma_grid == "diffusers"


def test_init_from_an_authors_export_takes_its_parity(tmp_path):
    torch.manual_seed(0)
    SamaEditPipeline.from_components(build_model(_authors_tiny())).save_pretrained(str(tmp_path))
    cfg = resolve_train_config(TrainConfig(stage=1, model=ModelSection(init_from=str(tmp_path))))
    assert cfg.model.parity == "authors" and cfg.inference.sigma_grid == "authors"
    # Not readable: --print-config leaves it to the trainer; strict resolution raises.
    missing = TrainConfig(stage=1, model=ModelSection(init_from=os.path.join(tmp_path, "nope")))
    assert resolve_train_config(missing, strict=False) == missing
    with pytest.raises(Exception):  # noqa: B017
        resolve_train_config(missing)


def test_print_config_shows_the_resolved_values(capsys):
    assert cli.main(["train", "--recipe", "debug", "--set", "model.parity=authors", "--print-config"]) == 0
    printed = yaml.safe_load(capsys.readouterr().out)
    assert printed["model"]["parity"] == "authors"
    assert printed["objective"]["loss"]["timestep_weighting"] == "bell"
    assert printed["objective"]["loss"]["semantic_space"] == "velocity"
    assert printed["objective"]["loss"]["timesteps"]["kind"] == "logit_normal"  # the recipe's
    assert printed["inference"]["sigma_grid"] == "authors"


def test_profile_table_covers_both_profiles_alike():
    sama, authors = parity.PROFILES["sama"], parity.PROFILES["authors"]
    assert {s: set(v) for s, v in sama.items()} == {s: set(v) for s, v in authors.items()}
    with pytest.raises(ValueError, match="parity"):
        parity.resolve(PipelineConfig(), "nope", "inference")
