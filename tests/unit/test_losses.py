"""Flow matching + semantic loss: conventions, decomposition on a hand-computed case, timestep samplers."""

from __future__ import annotations

import pytest

torch = pytest.importorskip("torch")

from sama.losses import (  # noqa: E402
    LossConfig,
    TimestepSamplerConfig,
    add_noise,
    clean_estimate,
    model_timestep,
    sama_loss,
    sample_timesteps,
    shift_time,
    velocity_from_model_output,
    velocity_target,
)


def test_conventions_recover_the_clean_sample():
    gen = torch.Generator().manual_seed(0)
    clean = torch.randn(3, 4, 5, generator=gen)
    noise = torch.randn(3, 4, 5, generator=gen)
    t = torch.tensor([0.0, 0.3, 1.0])
    noisy = add_noise(clean, noise, t)
    assert torch.equal(noisy[0], noise[0]) and torch.equal(noisy[2], clean[2])
    v = velocity_target(clean, noise)
    assert torch.allclose(clean_estimate(noisy, v, t), clean, atol=1e-6)
    # diffusers / Wan: sigma = 1 - t, timestep = sigma * 1000, output u = noise - clean = -v.
    assert torch.allclose(model_timestep(t), torch.tensor([1000.0, 700.0, 0.0]))
    assert torch.equal(velocity_from_model_output(noise - clean), clean - noise)


def test_scheduler_step_with_wan_output_moves_towards_the_clean_sample():
    """One Euler step of diffusers' scheduler on u = noise - clean lands on the interpolant."""
    from diffusers import FlowMatchEulerDiscreteScheduler

    scheduler = FlowMatchEulerDiscreteScheduler(shift=1.0)
    scheduler.set_timesteps(4)
    clean, noise = torch.ones(1, 2), torch.zeros(1, 2)
    sigma0, sigma1 = scheduler.sigmas[0].item(), scheduler.sigmas[1].item()
    x = add_noise(clean, noise, torch.tensor([1 - sigma0]))
    stepped = scheduler.step(noise - clean, scheduler.timesteps[0], x).prev_sample
    assert torch.allclose(stepped, add_noise(clean, noise, torch.tensor([1 - sigma1])), atol=1e-6)


def test_loss_decomposition_hand_computed():
    # Target: v_hat - v = [1, -1, 2, 0] -> MSE = (1 + 1 + 4 + 0) / 4 = 1.5
    v_pred = torch.tensor([[1.0, 1.0, 3.0, 0.0]])
    v_true = torch.tensor([[0.0, 2.0, 1.0, 0.0]])
    t = torch.tensor([0.75])
    # Semantic: s_hat = s_t + 0.25 * v_hat_s = [1 + 0.25*4, 2 + 0.25*(-8)] = [2, 0]; s = [1, 1]
    # L1 = (|2 - 1| + |0 - 1|) / 2 = 1.0
    s_pred = torch.tensor([[[4.0, -8.0]]])
    s_noisy = torch.tensor([[[1.0, 2.0]]])
    s_clean = torch.tensor([[[1.0, 1.0]]])
    out = sama_loss(
        v_pred, v_true, t, semantic_velocity_pred=s_pred, semantic_noisy=s_noisy, semantic_clean=s_clean
    )
    assert out.loss_fm.item() == pytest.approx(1.5)
    assert out.loss_sem.item() == pytest.approx(1.0)
    assert out.loss.item() == pytest.approx(1.5 + 0.1 * 1.0)
    assert torch.equal(out.loss, out.loss_fm + 0.1 * out.loss_sem)
    assert out.to_dict() == pytest.approx({"loss": 1.6, "loss_fm": 1.5, "loss_sem": 1.0})
    weighted = sama_loss(
        v_pred,
        v_true,
        t,
        semantic_velocity_pred=s_pred,
        semantic_noisy=s_noisy,
        semantic_clean=s_clean,
        semantic_weight=0.5,
    )
    assert weighted.loss.item() == pytest.approx(2.0)


def test_loss_without_semantic_branch():
    out = sama_loss(torch.ones(2, 3), torch.zeros(2, 3), torch.tensor([0.5, 0.5]))
    assert out.loss_sem is None and torch.equal(out.loss, out.loss_fm)
    assert set(out.to_dict()) == {"loss", "loss_fm"}
    with pytest.raises(ValueError, match="semantic loss needs"):
        sama_loss(
            torch.ones(1, 2), torch.zeros(1, 2), torch.tensor([0.5]), semantic_noisy=torch.ones(1, 1, 2)
        )


def test_timestep_samplers():
    gen = torch.Generator().manual_seed(0)
    uniform = sample_timesteps(20000, TimestepSamplerConfig(kind="uniform"), gen)
    assert uniform.shape == (20000,) and uniform.min() >= 0.0 and uniform.max() <= 1.0
    assert uniform.mean().item() == pytest.approx(0.5, abs=0.01)
    logit = sample_timesteps(20000, TimestepSamplerConfig(kind="logit_normal", logit_mean=1.0), gen)
    assert logit.median().item() == pytest.approx(torch.sigmoid(torch.tensor(1.0)).item(), abs=0.01)
    shifted = sample_timesteps(20000, TimestepSamplerConfig(kind="uniform", shift=5.0), gen)
    # shift 5 moves samples towards noise: sigma' = 5s / (1 + 4s); median sigma 0.5 -> 5/6.
    assert (1 - shifted).median().item() == pytest.approx(5 / 6, abs=0.01)
    clamped = sample_timesteps(1000, TimestepSamplerConfig(kind="uniform", t_min=0.2, t_max=0.3), gen)
    assert clamped.min() >= 0.2 and clamped.max() <= 0.3


def test_shift_matches_the_scheduler():
    from diffusers import FlowMatchEulerDiscreteScheduler

    scheduler = FlowMatchEulerDiscreteScheduler(shift=5.0)
    # diffusers spaces the unshifted sigmas linearly between its (already shifted) extremes.
    unshifted = torch.linspace(scheduler.sigma_max, scheduler.sigma_min, 10, dtype=torch.float64)
    scheduler.set_timesteps(10)
    ours = 1 - shift_time(1 - unshifted, 5.0)
    assert torch.allclose(ours.float(), scheduler.sigmas[:-1], atol=1e-5)


def test_config_validation():
    with pytest.raises(ValueError, match="kind"):
        LossConfig(timesteps=TimestepSamplerConfig(kind="cosine")).validate()  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="semantic_weight"):
        LossConfig(semantic_weight=-1.0).validate()
    LossConfig().validate()
