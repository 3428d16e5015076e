"""Evaluation metrics (sama.eval.metrics, .lpips, .embeddings) and the source-dependence probe.

Weight-free metrics are checked against values computed by hand on tiny arrays; model-based ones
on tiny models with seeded random weights saved to temporary directories: exact properties
(identical inputs, static videos, linearity) plus golden values pinned from those weights. The
probe (sama.eval.probes) runs on models whose use of the source is known."""

from __future__ import annotations

import math
import re
import shutil

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


# --- Optical flow: direction convention, end-point error, warp error -------------------------------


def _translating_video(frames: int = 4, height: int = 32, width: int = 48) -> np.ndarray:
    """A smooth texture whose content moves right by exactly one pixel per frame."""
    yy, xx = np.mgrid[0:height, 0 : width + frames]
    texture = 128 + 60 * np.sin(xx / 3.0) + 50 * np.cos(yy / 2.5 + xx / 5.0)
    video = np.stack([texture[:, frames - t : frames - t + width] for t in range(frames)])
    return np.repeat(video[..., None], 3, axis=-1).round().astype(np.uint8)


def test_optical_flow_follows_the_documented_direction_convention():
    video = _translating_video()
    forward = metrics.optical_flow(video)
    backward = metrics.optical_flow(video, backward=True)
    assert forward.shape == backward.shape == (3, 32, 48, 2) and forward.dtype == np.float32
    interior = (slice(None), slice(6, -6), slice(6, -6))
    assert forward[interior][..., 0].mean() == pytest.approx(1.0, abs=0.05)  # moving right: dx = +1
    assert backward[interior][..., 0].mean() == pytest.approx(-1.0, abs=0.05)
    assert np.abs(forward[interior][..., 1]).mean() < 0.05
    assert metrics.optical_flow(video[:1]).shape == (0, 32, 48, 2)


def test_end_point_error_by_hand():
    zero = np.zeros((2, 4, 4, 2), dtype=np.float32)
    moved = zero.copy()
    moved[:, :2] = (3.0, 4.0)  # half the vectors are 5 px long
    assert metrics.end_point_error(zero, moved) == pytest.approx(2.5)
    assert metrics.end_point_error(moved, moved) == 0.0
    with pytest.raises(ValueError, match="differ in shape"):
        metrics.end_point_error(zero, zero[:1])


def test_warp_error_by_hand_with_exact_flows():
    columns = np.array([0, 10, 30, 60, 100, 150], dtype=np.uint8)
    static = np.broadcast_to(columns[None, None, :, None], (2, 4, 6, 3)).copy()
    left = np.zeros((1, 4, 6, 2), dtype=np.float32)
    left[..., 0] = -1.0  # sample frame t one pixel to the left; column 0 flows out and is dropped
    # |c[x-1] - c[x]| for x = 1..5: 10, 20, 30, 40, 50.
    assert metrics.warp_error(static, left) == pytest.approx(30.0)
    assert metrics.warp_error(static, np.zeros_like(left)) == 0.0
    # Content moving right by one pixel is exactly explained by dx = -1, and not by dx = +1.
    moving = static.copy()
    moving[1, :, 1:] = static[0, :, :-1]
    assert metrics.warp_error(moving, left) == 0.0
    assert metrics.warp_error(moving, -left) > 0.0
    # Channel 1 is dy: sampling one row down drops the last row; |r[y+1] - r[y]| = 50, 50, 100.
    rows = np.array([0, 50, 100, 200], dtype=np.uint8)
    horizontal = np.broadcast_to(rows[None, :, None, None], (2, 4, 6, 3)).copy()
    down = np.zeros((1, 4, 6, 2), dtype=np.float32)
    down[..., 1] = 1.0
    assert metrics.warp_error(horizontal, down) == pytest.approx(200 / 3)
    everything_out = np.full((1, 4, 6, 2), 10.0, dtype=np.float32)
    assert math.isnan(metrics.warp_error(static, everything_out))


def test_flow_metrics_compare_the_edit_motion_to_the_source_motion():
    source = _translating_video()
    same = metrics.flow_metrics(source, source)
    assert same["flow_epe"] == 0.0 and same["flow_warp_error"] < 0.5
    frozen = np.repeat(source[:1], len(source), axis=0)
    result = metrics.flow_metrics(frozen, source)
    assert result["flow_epe"] == pytest.approx(1.0, abs=0.05)
    # Carrying a still frame along the source's one-pixel motion errs by |p(x-1) - p(x)|.
    frame = frozen[0].astype(float)
    by_hand = np.abs(frame[:, :-1] - frame[:, 1:]).mean()
    assert result["flow_warp_error"] == pytest.approx(by_hand, rel=0.05)
    # Streaming over frame pairs gives what the whole-video functions give.
    forward = metrics.end_point_error(metrics.optical_flow(source), metrics.optical_flow(frozen))
    assert result["flow_epe"] == pytest.approx(forward, rel=1e-9)
    warp = metrics.warp_error(frozen, metrics.optical_flow(source, backward=True))
    assert result["flow_warp_error"] == pytest.approx(warp, rel=1e-9)
    assert metrics.flow_metrics(source[:1], source[:1]) == {}


# --- Preservation ----------------------------------------------------------------------------------


def test_preservation_by_hand():
    source = np.full((1, 12, 16, 3), 100, dtype=np.uint8)
    reference = source.copy()
    reference[..., :8, :] = 108  # differs by exactly the threshold: still "to preserve"
    reference[..., 8:, :] = 200  # the edited region
    edited = np.full_like(source, 120)
    edited[..., 11:, :] = 0  # far from the kept columns' 7x7 windows (columns 0..7 see up to 10)
    result = metrics.preservation(edited, source, reference, threshold=8.0)
    assert result["preserve_psnr"] == pytest.approx(10 * math.log10(255**2 / 20**2))
    # Over constant windows SSIM is its luminance term alone.
    c1 = (0.01 * 255) ** 2
    assert result["preserve_ssim"] == pytest.approx((2 * 100 * 120 + c1) / (100**2 + 120**2 + c1))
    assert metrics.preservation(edited, source, reference, threshold=7.0).keys() == set()
    everywhere = metrics.preservation(edited, source, source, threshold=0.0)
    assert everywhere["preserve_psnr"] < result["preserve_psnr"]


def test_preservation_ssim_averages_the_ssim_map_over_the_mask_only():
    rng = np.random.default_rng(3)
    source = rng.integers(0, 256, size=(2, 16, 16, 3), dtype=np.uint8)
    reference = source.copy()
    reference[:, 4:9, 5:12] = 255 - reference[:, 4:9, 5:12]
    edited = np.clip(source.astype(int) + rng.integers(-30, 31, size=source.shape), 0, 255).astype(np.uint8)
    from skimage.metrics import structural_similarity

    maps = np.stack(
        [
            structural_similarity(e, s, channel_axis=-1, data_range=255, full=True)[1]
            for e, s in zip(edited, source, strict=True)
        ]
    ).mean(axis=-1)
    mask = np.abs(source.astype(int) - reference.astype(int)).max(axis=-1) <= 8
    result = metrics.preservation(edited, source, reference, threshold=8)
    assert result["preserve_ssim"] == pytest.approx(maps[mask].mean())
    assert result["preserve_ssim"] != pytest.approx(maps.mean())


def test_sample_frames_spreads_evenly_from_first_to_last():
    video = np.arange(10)[:, None, None, None] * np.ones((1, 2, 2, 3), dtype=np.uint8)
    assert metrics.sample_frames(video, 4)[:, 0, 0, 0].tolist() == [0, 3, 6, 9]
    assert metrics.sample_frames(video, None) is video
    assert metrics.sample_frames(video, 20) is video


# --- Config and suite without weights --------------------------------------------------------------


def test_lower_is_better_lists_exactly_the_error_metrics():
    lower = {"mse", "copy_mse", "lpips", "flow_epe", "flow_warp_error"}
    assert lower == metrics.LOWER_IS_BETTER
    assert lower < set(metrics.METRIC_NAMES)


@pytest.mark.parametrize(
    ("field", "value", "message"),
    [
        ("preservation_threshold", -1.0, "preservation_threshold"),
        ("preservation_threshold", 300.0, "preservation_threshold"),
        ("frames", 1, "metrics.frames"),
        ("clip", "  ", "metrics.clip"),
        ("lpips", 3, "metrics.lpips"),
    ],
)
def test_metrics_config_rejects_bad_values(field, value, message):
    config = metrics.MetricsConfig(**{field: value})
    with pytest.raises(ValueError, match=message):
        config.validate()


def _clip_pair(frames: int = 3, height: int = 32, width: int = 40, seed: int = 0):
    rng = np.random.default_rng(seed)
    reference = rng.integers(0, 256, size=(frames, height, width, 3), dtype=np.uint8)
    edited = np.clip(reference.astype(int) + rng.integers(-20, 21, size=reference.shape), 0, 255)
    return edited.astype(np.uint8), reference


def test_suite_without_weights_notes_what_it_skips_and_computes_the_rest():
    suite = metrics.MetricSuite(metrics.MetricsConfig(flow=False))
    assert suite.notes == {
        "clip_score": "no metrics.clip configured",
        "clip_temporal": "no metrics.clip configured",
        "dino_temporal": "no metrics.dinov2 configured",
        "lpips": "no metrics.lpips configured",
        "flow_epe": "metrics.flow is off",
        "flow_warp_error": "metrics.flow is off",
    }
    assert suite.names == (
        "mse", "psnr", "ssim", "copy_mse", "copy_psnr", "copy_ssim", "preserve_psnr", "preserve_ssim",
    )  # fmt: skip
    edited, reference = _clip_pair()
    source = reference.copy()
    source[:, :, :8] = 0
    result = suite.compute(edited, source, reference, instruction="make it red")
    assert set(result) == set(suite.names)
    assert result["mse"] == pytest.approx(metrics.mse(edited, reference))
    assert result["copy_ssim"] == pytest.approx(metrics.ssim(source, reference))
    assert result["preserve_psnr"] == pytest.approx(
        metrics.preservation(edited, source, reference, 8.0)["preserve_psnr"]
    )
    assert all(isinstance(v, float) and math.isfinite(v) for v in result.values())


def test_suite_skips_what_the_shapes_rule_out_and_refuses_a_mismatched_reference():
    suite = metrics.MetricSuite(metrics.MetricsConfig())
    assert set(suite.names) >= {"flow_epe", "flow_warp_error"}
    edited, reference = _clip_pair(frames=4)
    full = suite.compute(edited, reference, reference)
    assert {"flow_epe", "flow_warp_error", "copy_mse", "preserve_psnr"} <= set(full)
    assert full["copy_psnr"] == metrics.PSNR_CAP_DB  # source == reference: infinite, recorded at the cap
    # A speed-task source is shorter than its edit: no copy, flow or preservation metrics.
    assert set(suite.compute(edited, reference[:2], reference)) == {"mse", "psnr", "ssim"}
    assert set(suite.compute(edited, reference)) == {"flow_epe", "flow_warp_error"}
    assert suite.compute(edited[:1], reference[:1]) == {}
    assert suite.compute(edited, reference=edited)["psnr"] == metrics.PSNR_CAP_DB
    with pytest.raises(ValueError, match=r"\(2, 32, 40, 3\).*\(4, 32, 40, 3\)"):
        suite.compute(edited, reference=reference[:2])
    with pytest.raises(ValueError, match="uint8"):
        suite.compute(edited.astype(np.float32))


# --- Model-based metrics: tiny random models saved to disk -----------------------------------------

torch = pytest.importorskip("torch")

# Computed once from the seeded weights below; a change means the metric's math changed.
LPIPS_GOLDEN = 0.0031063503120094538
CLIP_EMBEDDING_GOLDEN = [-0.24195413, -0.57769608, -0.02635001, -0.01710422]
CLIP_SCORE_GOLDEN = 15.173456149729171
CLIP_TEMPORAL_GOLDEN = 0.9996009629472942
DINO_EMBEDDING_GOLDEN = [0.10115319, -0.05955108, 0.05172554, -0.13556303]
DINO_TEMPORAL_GOLDEN = 0.998364810430474


def _fill_seeded(module, seed: int, std: float = 0.2) -> None:
    """Every parameter drawn from numpy's seeded generator (stable across torch/transformers
    versions, unlike their initialisers), so the golden values below stay put."""
    rng = np.random.default_rng(seed)
    with torch.no_grad():
        for _, param in sorted(module.named_parameters()):
            param.copy_(torch.from_numpy(rng.normal(0.0, std, size=tuple(param.shape))))


@pytest.fixture(scope="module")
def lpips_file(tmp_path_factory) -> str:
    from sama.eval.lpips import LPIPS

    model = LPIPS()
    _fill_seeded(model, seed=0, std=0.1)
    with torch.no_grad():  # the published heads are non-negative, so distances are too
        for head in model.heads:
            head.model[1].weight.abs_()
    path = str(tmp_path_factory.mktemp("lpips") / "lpips_alex.pth")
    model.save(path)
    return path


@pytest.fixture(scope="module")
def clip_dir(tmp_path_factory) -> str:
    from transformers import CLIPConfig, CLIPImageProcessorPil, CLIPModel, CLIPTokenizer

    vocab = {"<|startoftext|>": 0, "<|endoftext|>": 1}
    for suffix in ("", "</w>"):
        for letter in "abcdefghijklmnopqrstuvwxyz":
            vocab[letter + suffix] = len(vocab)
    config = CLIPConfig(
        text_config={
            "vocab_size": len(vocab), "hidden_size": 16, "intermediate_size": 32, "num_hidden_layers": 1,
            "num_attention_heads": 2, "max_position_embeddings": 16, "bos_token_id": 0, "eos_token_id": 1,
            "pad_token_id": 1,
        },
        vision_config={
            "hidden_size": 16, "intermediate_size": 32, "num_hidden_layers": 1, "num_attention_heads": 2,
            "image_size": 32, "patch_size": 8,
        },
        projection_dim=8,
    )  # fmt: skip
    model = CLIPModel(config)
    _fill_seeded(model, seed=1)
    directory = str(tmp_path_factory.mktemp("clip"))
    model.save_pretrained(directory)
    CLIPTokenizer(vocab=vocab, merges=[]).save_pretrained(directory)
    CLIPImageProcessorPil(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32}).save_pretrained(
        directory
    )
    return directory


@pytest.fixture(scope="module")
def dino_dir(tmp_path_factory) -> str:
    from transformers import BitImageProcessorPil, Dinov2Config, Dinov2Model

    config = Dinov2Config(
        hidden_size=16,
        num_hidden_layers=1,
        num_attention_heads=2,
        intermediate_size=32,
        image_size=32,
        patch_size=8,
    )
    model = Dinov2Model(config)
    _fill_seeded(model, seed=2)
    directory = str(tmp_path_factory.mktemp("dinov2"))
    model.save_pretrained(directory)
    BitImageProcessorPil(
        size={"shortest_edge": 32},
        crop_size={"height": 32, "width": 32},
        image_mean=[0.485, 0.456, 0.406],
        image_std=[0.229, 0.224, 0.225],
    ).save_pretrained(directory)
    return directory


def test_temporal_consistency_by_hand():
    from sama.eval.embeddings import temporal_consistency

    assert temporal_consistency(np.array([[1.0, 0.0], [2.0, 0.0], [0.0, 3.0]])) == pytest.approx(0.5)
    assert temporal_consistency(np.array([[1.0, 1.0], [-1.0, -1.0]])) == pytest.approx(-1.0)
    with pytest.raises(ValueError, match="T >= 2"):
        temporal_consistency(np.ones((1, 4)))


def test_lpips_is_zero_for_identical_frames_and_pinned_on_seeded_weights(lpips_file):
    from sama.eval.lpips import LPIPS

    model = LPIPS.from_file(lpips_file)
    edited, reference = _clip_pair(frames=3)
    assert model.video_distance(reference, reference) == 0.0
    distance = model.video_distance(edited, reference)
    assert distance == pytest.approx(LPIPS_GOLDEN, rel=1e-4)
    assert model.video_distance(reference, edited) == pytest.approx(distance, rel=1e-6)
    assert model.video_distance(np.roll(edited, 5, axis=2), reference) > distance
    # The mean over frames does not depend on how frames are batched.
    assert model.video_distance(edited, reference, batch_size=1) == pytest.approx(distance, rel=1e-6)
    # The heads are linear: doubling them doubles the distance.
    with torch.no_grad():
        for head in model.heads:
            head.model[1].weight.mul_(2.0)
    assert model.video_distance(edited, reference) == pytest.approx(2 * distance, rel=1e-5)
    with pytest.raises(ValueError, match="at least 31x31"):
        model.video_distance(edited[:, :30], reference[:, :30])


def test_lpips_loads_the_published_parts_and_the_lpips_package_layout(lpips_file, tmp_path):
    from sama.eval.lpips import LPIPS, WeightsError, load_lpips

    state = torch.load(lpips_file, weights_only=True)
    backbone = {k: v for k, v in state.items() if k.startswith("features.")}
    # torchvision's file also holds the classifier, which LPIPS ignores.
    backbone["classifier.1.weight"] = torch.zeros(4, 4)
    torch.save(backbone, tmp_path / "alexnet-owt-7be5be79.pth")
    torch.save({k: v for k, v in state.items() if k.startswith("lin")}, tmp_path / "alex.pth")
    # The lpips package keeps torchvision's indices inside its five slices: net.slice2.3.weight, ...
    slice_of = {"0": 1, "3": 2, "6": 3, "8": 4, "10": 5}
    package = {}
    for key, value in state.items():
        if key.startswith("features."):
            _, index, name = key.split(".")
            key = f"net.slice{slice_of[index]}.{index}.{name}"
        package[key] = value
    package["scaling_layer.shift"] = torch.zeros(1, 3, 1, 1)
    torch.save(package, tmp_path / "package.pth")
    edited, reference = _clip_pair(frames=2)
    for model in (
        LPIPS.from_parts(tmp_path / "alexnet-owt-7be5be79.pth", tmp_path / "alex.pth"),
        LPIPS.from_file(tmp_path / "package.pth"),
        load_lpips(str(tmp_path)),  # a directory with the two published files
    ):
        assert model.video_distance(edited, reference) == pytest.approx(
            LPIPS.from_file(lpips_file).video_distance(edited, reference), rel=1e-6
        )
    torch.save(backbone, tmp_path / "backbone_only.pth")
    with pytest.raises(WeightsError, match=r"backbone_only\.pth.*lin0\.model\.1\.weight"):
        LPIPS.from_file(tmp_path / "backbone_only.pth")
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(WeightsError, match="neither lpips_alex.pth"):
        load_lpips(str(empty))


def _changing_scene(frames: int = 3, height: int = 40, width: int = 48) -> np.ndarray:
    """Frames with large-scale content that changes from frame to frame (stripes turning, colours
    shifting): what tiny random vision models can tell apart, unlike pixel noise."""
    yy, xx = np.mgrid[0:height, 0:width]
    video = []
    for t in range(frames):
        angle = 0.9 * t
        red = 128 + 100 * np.sin((xx * np.cos(angle) + yy * np.sin(angle)) / 6.0)
        green = 128 + 100 * np.cos(yy / (4.0 + t))
        blue = np.full_like(red, 40 + 60 * t)
        video.append(np.stack([red, green, blue], axis=-1))
    return np.clip(np.stack(video), 0, 255).astype(np.uint8)


def test_clip_embeddings_score_and_temporal_consistency(clip_dir):
    from sama.eval.embeddings import ClipEmbedder, temporal_consistency

    clip = ClipEmbedder.load(clip_dir, batch_size=2)
    assert not clip.model.training
    video = _changing_scene()
    embeddings = clip.image_embeddings(video)
    assert embeddings.shape == (3, 8)
    assert torch.allclose(embeddings.norm(dim=-1), torch.ones(3))
    assert embeddings[0, :4].tolist() == pytest.approx(CLIP_EMBEDDING_GOLDEN, abs=1e-5)
    static = np.repeat(video[:1], 3, axis=0)
    assert temporal_consistency(clip.image_embeddings(static)) == pytest.approx(1.0, abs=1e-6)
    assert temporal_consistency(embeddings) == pytest.approx(CLIP_TEMPORAL_GOLDEN, abs=1e-6)
    # max(100 * cos, 0), mean over frames, by hand from the embeddings.
    for text, golden in (("make it red", CLIP_SCORE_GOLDEN), ("turn the sky blue", 0.0)):
        cosines = embeddings.numpy() @ clip.text_embedding(text).numpy()
        score = clip.clip_score(video, text)
        assert score == pytest.approx(np.maximum(100 * cosines, 0).mean(), rel=1e-5, abs=1e-9)
        assert score == pytest.approx(golden, rel=1e-4)
    assert (embeddings.numpy() @ clip.text_embedding("turn the sky blue").numpy()).max() < 0  # clamped to 0


def test_dino_embeddings_are_cls_tokens_and_pinned(dino_dir):
    from sama.eval.embeddings import DinoEmbedder, temporal_consistency

    dino = DinoEmbedder.load(dino_dir)
    video = _changing_scene()
    embeddings = dino.image_embeddings(video)
    assert embeddings.shape == (3, 16)
    pixels = dino.image_processor(images=list(video), return_tensors="pt")["pixel_values"]
    with torch.no_grad():
        cls = dino.model(pixel_values=pixels).last_hidden_state[:, 0]
    assert torch.allclose(embeddings, torch.nn.functional.normalize(cls, dim=-1), atol=1e-6)
    assert embeddings[0, :4].tolist() == pytest.approx(DINO_EMBEDDING_GOLDEN, abs=1e-5)
    static = np.repeat(video[:1], 4, axis=0)
    assert temporal_consistency(dino.image_embeddings(static)) == pytest.approx(1.0, abs=1e-6)
    assert temporal_consistency(embeddings) == pytest.approx(DINO_TEMPORAL_GOLDEN, abs=1e-6)


def test_weights_that_do_not_fit_are_refused_naming_the_path(clip_dir, dino_dir, tmp_path):
    from sama.eval.embeddings import ClipEmbedder, DinoEmbedder, WeightsError

    with pytest.raises(WeightsError, match=rf"{re.escape(dino_dir)}.*'dinov2' checkpoint, expected 'clip'"):
        ClipEmbedder.load(dino_dir)
    with pytest.raises(WeightsError, match=re.escape(str(tmp_path / "missing"))):
        DinoEmbedder.load(str(tmp_path / "missing"))
    # Without tokenizer files transformers would build an empty tokenizer and carry on.
    no_tokenizer = tmp_path / "clip_without_tokenizer"
    shutil.copytree(clip_dir, no_tokenizer, ignore=shutil.ignore_patterns("tokenizer*"))
    with pytest.raises(WeightsError, match="tokenizer cannot encode plain words"):
        ClipEmbedder.load(str(no_tokenizer))
    with pytest.raises(WeightsError, match="no such file or directory"):
        metrics.MetricSuite(metrics.MetricsConfig(lpips=str(tmp_path / "missing.pth")))


def test_suite_with_every_model_computes_every_metric(clip_dir, dino_dir, lpips_file):
    config = metrics.MetricsConfig(clip=clip_dir, dinov2=dino_dir, lpips=lpips_file, frames=3, device="cpu")
    # metrics.device wins over the caller's default device.
    suite = metrics.MetricSuite(config, device="cuda:7")
    assert suite.device == "cpu" and suite.lpips.shift.device.type == "cpu"
    assert suite.notes == {} and suite.names == metrics.METRIC_NAMES
    edited, reference = _clip_pair(frames=5)
    source = reference.copy()
    source[:, :, :10] = 30
    result = suite.compute(edited, source, reference, instruction="make it red")
    assert set(result) == set(metrics.METRIC_NAMES)
    sampled = metrics.sample_frames(edited, 3)
    assert result["clip_score"] == pytest.approx(suite.clip.clip_score(sampled, "make it red"), rel=1e-6)
    assert result["lpips"] == pytest.approx(
        suite.lpips.video_distance(sampled, metrics.sample_frames(reference, 3)), rel=1e-6
    )
    assert "clip_score" not in suite.compute(edited, instruction="  ")
    assert set(suite.compute(edited[:1], instruction="x")) == {"clip_score"}


# --- Source-dependence probe ----------------------------------------------------------------------


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


class _IgnoringTransformer(_CopyingTransformer):
    """Predicts as if its source were all zeros: the output ignores the source it is given."""

    def __call__(self, hidden_states, timestep, encoder_hidden_states, source_latents, semantic_tokens):
        import torch

        return super().__call__(
            hidden_states, timestep, encoder_hidden_states, torch.zeros_like(source_latents), None
        )


class _TextReadingTransformer(_CopyingTransformer):
    """Returns its source brightened by the mean of its prompt embedding: the output depends on
    the instruction, evenly over the frame."""

    def __call__(self, hidden_states, timestep, encoder_hidden_states, source_latents, semantic_tokens):
        return super().__call__(
            hidden_states, timestep, None, source_latents + encoder_hidden_states.mean(), None
        )


def _probe_pipeline(transformer, embed=lambda prompts: 0.0):
    """A stand-in pipeline for the probes: space-to-depth latents, a constant prompt embedding
    (``embed(prompts)``, zero by default)."""
    torch = pytest.importorskip("torch")
    from sama.models.autoencoders import SpaceToDepthAutoencoder
    from sama.pipeline_edit import SamaEditPipeline

    class _Pipeline:
        device, dtype, num_semantic_tokens = torch.device("cpu"), torch.float32, 0
        encode_frames = SamaEditPipeline.encode_frames
        _on_device = SamaEditPipeline._on_device
        _offload_device = None
        vae = SpaceToDepthAutoencoder(2, 4)
        text_encoder = type(
            "Text", (), {"encode": staticmethod(lambda prompts, **kw: torch.full((1, 4, 8), embed(prompts)))}
        )()

        @staticmethod
        def build_prompts(instruction):
            return instruction, ""

    _Pipeline.transformer = transformer
    return _Pipeline()


def _recolor_pair() -> tuple[np.ndarray, np.ndarray, str]:
    """A synthetic recolor pair for the probes: source, target (5 frames, 32x48), instruction."""
    from sama import synthetic

    scene = synthetic.random_scene(3)
    edited, instruction = synthetic.make_edit(scene, "recolor", 5)
    return synthetic.render(scene, 5, 8.0, 32, 48), synthetic.render(edited, 5, 8.0, 32, 48), instruction


def test_kept_precision_scores_the_estimate_on_kept_pixels_beside_its_noisy_input():
    pytest.importorskip("torch")
    from sama.eval.probes import kept_precision

    source, target, _ = _recolor_pair()
    times = (0.0, 0.5, 0.9)
    # A model that returns its source: exact on every kept pixel, whatever the noise.
    copying = kept_precision(_probe_pipeline(_CopyingTransformer()), [(source, target, "recolor")], times)
    assert [p.t for p in copying] == list(times)
    assert all(p.estimate_psnr == float("inf") for p in copying)
    # The noisy input itself gets closer to the target as t grows (less noise).
    noisy = [p.noisy_psnr for p in copying]
    assert noisy[0] < noisy[1] < noisy[2] < 60

    ignoring = kept_precision(_probe_pipeline(_IgnoringTransformer()), [(source, target, "recolor")], times)
    assert all(p.estimate_psnr < 20 for p in ignoring)
    # The same noise: the noisy input scores the same whichever model is probed.
    assert [p.noisy_psnr for p in ignoring] == pytest.approx(noisy)
    # A pair with no kept pixel (a frame against its negative) is skipped: NaN, not a score.
    [empty] = kept_precision(_probe_pipeline(_CopyingTransformer()), [(source, 255 - source, "x")], (0.5,))
    assert np.isnan(empty.estimate_psnr) and np.isnan(empty.noisy_psnr)


def test_instruction_dependence_measures_how_far_another_instruction_moves_the_estimate():
    pytest.importorskip("torch")
    from sama.eval.probes import instruction_dependence

    source, target, instruction = _recolor_pair()
    pairs = [(source, target, instruction, "Remove everything.")]
    times = (0.0, 0.5)
    # A model that ignores its text makes the same estimate whatever it is told.
    ignoring = instruction_dependence(
        _probe_pipeline(_CopyingTransformer(), lambda p: len(p[0]) / 100), pairs, times
    )
    assert [(p.t, p.edited, p.kept) for p in ignoring] == [(0.0, 0.0, 0.0), (0.5, 0.0, 0.0)]
    # One whose output shifts with the prompt's embedding moves every pixel by that shift (decoded
    # and clipped: the two prompts' lengths differ by 18 characters -> 0.18 -> about 23 levels).
    reading = _probe_pipeline(_TextReadingTransformer(), lambda p: len(p[0]) / 100)
    moved = instruction_dependence(reading, pairs, times)
    assert [p.t for p in moved] == list(times)
    assert all(5 < p.edited < 30 and 5 < p.kept < 30 for p in moved)
    # The same instruction twice: no move; a pair whose edit changes nothing has no edited pixels.
    [same] = instruction_dependence(reading, [(source, target, instruction, instruction)], (0.0,))
    assert (same.edited, same.kept) == (0.0, 0.0)
    [unchanged] = instruction_dependence(reading, [(source, source, "a", "bb")], (0.0,))
    assert np.isnan(unchanged.edited) and unchanged.kept > 0


def test_source_dependence_tells_a_copying_model_from_one_ignoring_its_source():
    pytest.importorskip("torch")
    from sama import synthetic
    from sama.eval.probes import source_dependence

    copying = _probe_pipeline(_CopyingTransformer())
    clip = synthetic.render(synthetic.random_scene(3), 5, 8.0, 32, 48)
    [probe] = source_dependence(copying, [(clip, clip, "copy it")], times=(0.3,))
    assert probe.true_source == pytest.approx(0.0, abs=1e-10)
    assert probe.shifted_source > 0.01 and probe.ratio == pytest.approx(0.0, abs=1e-8)
    # Any length and size, padded as the pipeline pads its source (4 frames -> 5, 30 rows -> 32).
    [probe] = source_dependence(copying, [(clip[:4, :30], clip[:4, :30], "copy it")], times=(0.3,))
    assert probe.true_source == pytest.approx(0.0, abs=1e-10) and probe.shifted_source > 0.01

    [probe] = source_dependence(
        _probe_pipeline(_IgnoringTransformer()), [(clip, clip, "copy it")], times=(0.3,)
    )
    assert probe.ratio == pytest.approx(1.0)
