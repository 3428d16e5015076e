"""``sama edit`` of real videos: training bucket and frame rate in, windows, source size/rate/length out."""

from __future__ import annotations

import dataclasses
import json
import os
import time

import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("diffusers")
pytest.importorskip("transformers")

from sama import quickstart, synthetic, video  # noqa: E402
from sama.buckets import BucketConfig  # noqa: E402
from sama.models import build_model  # noqa: E402
from sama.pipeline_edit import (  # noqa: E402
    PIPELINE_FILE,
    PipelineConfig,
    SamaEditPipeline,
    plan_windows,
)

NTSC = 30000 / 1001  # 29.97 fps


def tiny_config(**overrides) -> PipelineConfig:
    """What the quickstart's tiny model records: 48x64 buckets (3:4, 4:3), 8 fps, 9-frame clips."""
    return dataclasses.replace(quickstart.inference_config(), **{"num_inference_steps": 8, **overrides})


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> str:
    torch.manual_seed(0)
    pipeline = SamaEditPipeline.from_components(
        build_model("tiny", with_semantic_encoder=False), tiny_config()
    )
    directory = str(tmp_path_factory.mktemp("tiny_export"))
    pipeline.save_pretrained(directory)
    return directory


@pytest.fixture(scope="module")
def real_clip(tmp_path_factory) -> str:
    """4 s of moving shapes: 120 frames of 176x144 at 29.97 fps, as an mp4."""
    frames = synthetic.render(synthetic.random_scene(5), 120, NTSC, 144, 176)
    path = tmp_path_factory.mktemp("clips") / "qcif.mp4"
    path.write_bytes(video.encode_mp4(frames, NTSC))
    return str(path)


def test_resample_indices_by_timestamp():
    # 29.97 -> 16 fps: frame j at j/16 s takes source frame round(j * 1.873125).
    down = video.resample_indices(120, NTSC, 16.0)
    assert len(down) == 64  # round(120 * 16 / 29.97) = round(64.06)
    assert down[:6].tolist() == [0, 2, 4, 6, 7, 9]  # 0, 1.87, 3.75, 5.62, 7.49, 9.37
    assert down[-1] == 118  # 63 * 1.873 = 118.007
    # Back to the source's 120 frames: frame i at i/29.97 s takes edited frame round(i * 0.53387).
    up = video.resample_indices(64, 16.0, NTSC, length=120)
    assert up[:5].tolist() == [0, 1, 1, 2, 2]  # 0, 0.53, 1.07, 1.60, 2.14
    assert up[-1] == 63  # 119 * 0.534 = 63.53 -> 64, clamped to the last frame
    # Halves round up; a higher rate repeats frames; the same rate is the identity.
    assert video.resample_indices(4, 4.0, 8.0).tolist() == [0, 1, 1, 2, 2, 3, 3, 3]
    assert video.resample_indices(10, 8.0, 8.0).tolist() == list(range(10))
    assert video.resample_indices(1, 30.0, 8.0).tolist() == [0]
    with pytest.raises(ValueError):
        video.resample_indices(0, 30.0, 8.0)


def test_plan_windows():
    assert plan_windows(32, 9) == [(0, 9), (9, 18), (18, 27), (27, 32)]
    # Equal 4k+1 windows rather than 81 frames and a lone one.
    assert plan_windows(82, 81) == [(0, 41), (41, 82)]
    assert plan_windows(64, 81) == [(0, 64)]
    # max_frames is floored to 4k+1.
    assert plan_windows(20, 10) == [(0, 9), (9, 18), (18, 20)]
    assert plan_windows(3, 1) == [(0, 1), (1, 2), (2, 3)]
    with pytest.raises(ValueError, match="max_frames"):
        plan_windows(3, 0)


def test_paste_center_crop_undoes_the_bucket_crop():
    source = np.random.default_rng(0).integers(0, 256, (2, 144, 176, 3), dtype=np.uint8)
    cropped = video.resize_center_crop(source, 48, 64)
    restored = video.paste_center_crop(cropped, source)
    assert restored.shape == source.shape
    # 176x144 covers 64x48 at scale 64/176: the crop kept rows 6..137, every column.
    assert np.array_equal(restored[:, :6], source[:, :6]) and np.array_equal(
        restored[:, 138:], source[:, 138:]
    )
    assert not np.array_equal(restored[:, 6:138], source[:, 6:138])
    # Same aspect: the whole frame is replaced.
    assert not np.array_equal(
        video.paste_center_crop(video.resize_center_crop(source, 72, 88), source), source
    )


def test_real_clip_is_edited_at_the_bucket_and_restored(model_dir, real_clip, tmp_path):
    from sama.edit import run_edit

    output = str(tmp_path / "edited.mp4")
    started = time.monotonic()
    report = run_edit(real_clip, "make the ball red", model_dir, output, steps=4, cfg=5.0)
    elapsed = time.monotonic() - started
    print(f"120 frames of 176x144 at 29.97 fps edited in {elapsed:.2f}s: {json.dumps(report)}")
    info = video.probe(output)
    assert (info.num_frames, info.width, info.height) == (120, 176, 144)
    assert info.fps == pytest.approx(NTSC, rel=1e-4)
    assert video.decode_clip(output).shape == (120, 144, 176, 3)
    assert report["frames"] == 120 and (report["width"], report["height"]) == (176, 144)
    assert report["bucket"] == {"height": 48, "width": 64}
    assert (report["processed_frames"], report["processed_fps"]) == (32, 8.0)  # 4 s at 8 fps
    assert report["windows"] == 4 and report["window_frames"] == [9, 9, 9, 5]
    assert report["dtype"] == "float32" and not report["offload"] and not report["vae_tiling"]


def test_720p_clip_returns_720p(model_dir, tmp_path):
    from sama.edit import run_edit

    source = tmp_path / "hd.mp4"
    source.write_bytes(
        video.encode_mp4(synthetic.render(synthetic.random_scene(6), 9, 24.0, 720, 1280), 24.0)
    )
    output = str(tmp_path / "hd_edit.mp4")
    report = run_edit(str(source), "make it blue", model_dir, output, steps=2)
    info = video.probe(output)
    assert (info.num_frames, info.width, info.height) == (9, 1280, 720)
    assert report["bucket"] == {"height": 48, "width": 64} and report["processed_frames"] == 3
    assert report["windows"] == 1


def test_clip_longer_than_max_frames_goes_through_windows(model_dir, tmp_path):
    from sama.edit import run_edit

    source = tmp_path / "long.mp4"
    source.write_bytes(video.encode_mp4(synthetic.render(synthetic.random_scene(8), 21, 8.0, 48, 64), 8.0))
    output = str(tmp_path / "long_edit.mp4")
    report = run_edit(str(source), "make it blue", model_dir, output, steps=2, max_frames=5)
    assert report["windows"] == 5 and report["window_frames"] == [5, 5, 5, 5, 1]
    assert report["processed_frames"] == 21 and report["frames"] == 21
    assert video.decode_clip(output).shape == (21, 48, 64, 3)


def test_keep_bucket_returns_the_bucket_and_training_fps(model_dir, real_clip, tmp_path):
    from sama.edit import run_edit

    output = str(tmp_path / "bucket.mp4")
    report = run_edit(real_clip, "make it blue", model_dir, output, steps=2, keep_bucket=True)
    info = video.probe(output)
    assert (info.num_frames, info.width, info.height) == (32, 64, 48)
    assert info.fps == pytest.approx(8.0)
    assert (report["frames"], report["width"], report["height"], report["fps"]) == (32, 64, 48, 8.0)


def test_edit_video_counts_steps_over_windows_and_reuses_the_prompt(model_dir):
    pipeline = SamaEditPipeline.from_pretrained(model_dir)
    frames = synthetic.render(synthetic.random_scene(9), 12, 16.0, 30, 50)
    calls, encodes = [], []
    original = pipeline.text_encoder.encode
    pipeline.text_encoder.encode = lambda *a, **k: encodes.append(a) or original(*a, **k)
    result = pipeline.edit_video(
        frames,
        "make it red",
        16.0,
        num_inference_steps=2,
        progress=False,
        callback=lambda s, t: calls.append((s, t)),
    )
    # 12 frames at 16 fps -> 6 at 8 fps, one 6-frame window (<= 9); back to 12 frames of 50x30.
    assert result.frames.shape == (12, 30, 50, 3) and result.fps == 16.0
    assert result.windows == [(0, 6)] and result.processed_fps == 8.0
    assert calls == [(1, 2), (2, 2)]
    calls.clear()
    encodes.clear()
    result = pipeline.edit_video(
        frames,
        "make it red",
        16.0,
        max_frames=1,
        num_inference_steps=2,
        progress=False,
        callback=lambda s, t: calls.append((s, t)),
    )
    assert len(result.windows) == 6 and calls == [(i, 12) for i in range(1, 13)]
    # The prompt and negative prompt are encoded once for all six windows.
    assert len(encodes) == 2
    with pytest.raises(ValueError, match="instruction is empty"):
        pipeline.edit_video(frames, " ", 16.0)


def test_offload_tiling_and_dtype_flags_on_cpu(model_dir, tmp_path, capsys):
    """The GPU options are accepted on CPU: offload to "cpu" moves nothing, the tiny autoencoder
    has nothing to tile, float32 is the CPU default."""
    from sama.cli import main

    source = tmp_path / "small.mp4"
    source.write_bytes(video.encode_mp4(synthetic.render(synthetic.random_scene(3), 10, 8.0, 48, 64), 8.0))
    output = str(tmp_path / "flags.mp4")
    argv = ["edit", "--video", str(source), "--instruction", "make it red", "--model", model_dir]
    argv += ["--output", output, "--steps", "1", "--max-frames", "5", "--keep-bucket", "--offload"]
    argv += ["--tile-vae", "--dtype", "float32"]
    assert main(argv) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["offload"] and not report["vae_tiling"] and report["dtype"] == "float32"
    assert report["keep_bucket"] and report["windows"] == 2 and report["frames"] == 10
    pipeline = SamaEditPipeline.from_pretrained(model_dir).enable_model_cpu_offload("cpu")
    assert pipeline.enable_vae_tiling() is False
    frames = synthetic.render(synthetic.random_scene(3), 5, 8.0, 48, 64)
    assert pipeline.edit_video(frames, "make it red", 8.0, num_inference_steps=1).frames.shape == (
        5,
        48,
        64,
        3,
    )


def test_bfloat16_runs_on_cpu(model_dir):
    """A bf16 model computes in bf16 although diffusers keeps some Wan modules in float32."""
    pipeline = SamaEditPipeline.from_pretrained(model_dir, torch_dtype=torch.bfloat16)
    assert pipeline.dtype == torch.bfloat16
    frames = synthetic.render(synthetic.random_scene(4), 5, 8.0, 48, 64)
    assert pipeline.edit_video(frames, "make it red", 8.0, num_inference_steps=1).frames.shape == (
        5,
        48,
        64,
        3,
    )


def test_export_records_the_training_setup_and_old_exports_load(model_dir, tmp_path):
    import shutil

    manifest = json.loads(open(os.path.join(model_dir, PIPELINE_FILE)).read())
    assert manifest["pipeline"]["fps"] == 8.0 and manifest["pipeline"]["max_frames"] == 9
    assert manifest["pipeline"]["buckets"]["base_height"] == 48
    loaded = SamaEditPipeline.from_pretrained(model_dir).config
    expected = tiny_config()
    assert (loaded.buckets, loaded.fps, loaded.max_frames) == (expected.buckets, 8.0, 9)
    old = tmp_path / "old_export"
    shutil.copytree(model_dir, old)
    for key in ("buckets", "fps", "max_frames"):
        del manifest["pipeline"][key]
    (old / PIPELINE_FILE).write_text(json.dumps(manifest))
    config = SamaEditPipeline.from_pretrained(str(old)).config
    assert (config.buckets, config.fps, config.max_frames) == (BucketConfig(), 16.0, 81)
    assert config.num_inference_steps == 8


def test_trainer_recipes_record_the_quickstart_setup():
    from sama import config
    from sama.quickstart import INFERENCE_SETTINGS
    from sama.train.recipes import recipe_path
    from sama.train.trainer import TrainConfig

    for recipe in ("debug", "debug_sft"):
        for overrides in ([], INFERENCE_SETTINGS):
            inference = config.load(TrainConfig, recipe_path(recipe), overrides).inference
            assert (inference.fps, inference.max_frames) == (8.0, 9)
            assert inference.buckets.nearest(144, 176).name == "48x64"
    inference = config.load(TrainConfig, recipe_path("pretrain"), []).inference
    assert (inference.fps, inference.max_frames, inference.buckets.base_height) == (16.0, 81, 480)
