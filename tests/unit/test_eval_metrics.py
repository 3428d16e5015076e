"""Reference metrics (sama.eval.metrics) against hand-computed values, and the source-dependence
probe (sama.eval.probes) on models whose use of the source is known."""

from __future__ import annotations

import math

import numpy as np
import pytest

from sama.eval import metrics


def test_mse_and_psnr_by_hand():
    a = np.zeros((1, 8, 8, 3), dtype=np.uint8)
    b = a.copy()
    b[0, 0, 0, 0] = 16  # one value off by 16: MSE = 256 / 192
    assert metrics.mse(a, b) == pytest.approx(256 / 192)
    assert metrics.psnr(a, b) == pytest.approx(10 * math.log10(255**2 / (256 / 192)))
    assert metrics.psnr(a, a) == math.inf
    full = np.full_like(a, 255)
    assert metrics.psnr(a, full) == pytest.approx(0.0)


def test_ssim_is_one_for_identical_and_lower_for_noisy_frames():
    rng = np.random.default_rng(0)
    ramp = np.linspace(40, 200, 16)
    frames = np.broadcast_to((ramp[:, None] + ramp[None, :])[None, :, :, None] / 2, (2, 16, 16, 3))
    frames = frames.astype(np.uint8)
    assert metrics.ssim(frames, frames) == pytest.approx(1.0)
    noisy = np.clip(frames.astype(int) + rng.integers(-40, 41, size=frames.shape), 0, 255).astype(np.uint8)
    assert 0.0 < metrics.ssim(noisy, frames) < 0.95
    # A constant offset keeps the structure and contrast terms at 1: only luminance drops.
    flat = np.full((1, 16, 16, 3), 100, dtype=np.uint8)
    c1 = (0.01 * 255) ** 2
    expected = (2 * 100 * 120 + c1) / (100**2 + 120**2 + c1)
    assert metrics.ssim(flat, flat + 20) == pytest.approx(expected, rel=1e-6)


def test_compare_to_copy_puts_the_edit_beside_the_source():
    target = np.zeros((1, 8, 8, 3), dtype=np.uint8)
    source = target.copy()
    source[:, :4] = 40
    edited = target.copy()
    edited[:, :4] = 10
    result = metrics.compare_to_copy(edited, source, target)
    assert result["mse"] == pytest.approx(50.0) and result["copy_mse"] == pytest.approx(800.0)
    assert result["psnr"] > result["copy_psnr"]


def test_metrics_refuse_mismatched_or_tiny_videos():
    with pytest.raises(ValueError, match="differ in shape"):
        metrics.mse(np.zeros((1, 8, 8, 3)), np.zeros((2, 8, 8, 3)))
    with pytest.raises(ValueError, match="at least 7x7"):
        metrics.ssim(np.zeros((1, 4, 4, 3), dtype=np.uint8), np.zeros((1, 4, 4, 3), dtype=np.uint8))


class _CopyingTransformer:
    """Predicts, at any noise level, exactly the velocity whose clean estimate is its source."""

    config = type("Config", (), {"semantic_dim": 4, "patch_size": (1, 2, 2)})()

    def __call__(self, hidden_states, timestep, encoder_hidden_states, source_latents, semantic_tokens):

        from sama.losses import NUM_TRAIN_TIMESTEPS

        sigma = (timestep / NUM_TRAIN_TIMESTEPS).reshape(-1, 1, 1, 1, 1)
        # Wan convention u = noise - clean, with x_t = (1 - sigma) * clean + sigma * noise.
        noise = (hidden_states - (1 - sigma) * source_latents) / sigma
        return type("Out", (), {"sample": noise - source_latents, "semantic": None})()

    def parameters(self):
        import torch

        yield torch.zeros(1)


def test_source_dependence_tells_a_copying_model_from_one_ignoring_its_source():
    torch = pytest.importorskip("torch")
    from sama import synthetic
    from sama.eval.probes import source_dependence
    from sama.models.autoencoders import SpaceToDepthAutoencoder
    from sama.pipeline_edit import SamaEditPipeline

    class _Pipeline:
        device, dtype, num_semantic_tokens = torch.device("cpu"), torch.float32, 0
        encode_frames = SamaEditPipeline.encode_frames
        _on_device = SamaEditPipeline._on_device
        _offload_device = None
        vae = SpaceToDepthAutoencoder(2, 4)
        transformer = _CopyingTransformer()
        text_encoder = type(
            "Text", (), {"encode": staticmethod(lambda prompts, **kw: torch.zeros(1, 4, 8))}
        )()

        @staticmethod
        def build_prompts(instruction):
            return instruction, ""

    clip = synthetic.render(synthetic.random_scene(3), 5, 8.0, 32, 48)
    [probe] = source_dependence(_Pipeline(), [(clip, clip, "copy it")], times=(0.3,))
    assert probe.true_source == pytest.approx(0.0, abs=1e-10)
    assert probe.shifted_source > 0.01 and probe.ratio == pytest.approx(0.0, abs=1e-8)
    # Any length and size, padded as the pipeline pads its source (4 frames -> 5, 30 rows -> 32).
    [probe] = source_dependence(_Pipeline(), [(clip[:4, :30], clip[:4, :30], "copy it")], times=(0.3,))
    assert probe.true_source == pytest.approx(0.0, abs=1e-10) and probe.shifted_source > 0.01

    class _Ignoring(_CopyingTransformer):
        def __call__(self, hidden_states, timestep, encoder_hidden_states, source_latents, semantic_tokens):
            return super().__call__(
                hidden_states, timestep, encoder_hidden_states, torch.zeros_like(source_latents), None
            )

    _Pipeline.transformer = _Ignoring()
    [probe] = source_dependence(_Pipeline(), [(clip, clip, "copy it")], times=(0.3,))
    assert probe.ratio == pytest.approx(1.0)
