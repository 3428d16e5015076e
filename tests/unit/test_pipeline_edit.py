"""Editing pipeline and ``run_edit``: any size in -> same size out, CFG, persistence, clear errors."""

from __future__ import annotations

import json
import os
import shutil

import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("diffusers")
pytest.importorskip("transformers")

from sama import quickstart, synthetic, video  # noqa: E402
from sama.models import build_model  # noqa: E402
from sama.pipeline_edit import (  # noqa: E402
    PIPELINE_FILE,
    ModelDirectoryError,
    SamaEditPipeline,
    pad_video,
)

STEPS = 3
# The tiny model's training setup (the quickstart's: 48x64 buckets, 8 fps, 9-frame clips), so
# run_edit works at that size rather than the 480p default.
TINY = quickstart.inference_config()


@pytest.fixture(scope="module")
def pipeline() -> SamaEditPipeline:
    torch.manual_seed(0)
    return SamaEditPipeline.from_components(build_model("tiny", with_semantic_encoder=False), TINY)


@pytest.fixture(scope="module")
def model_dir(pipeline, tmp_path_factory) -> str:
    directory = str(tmp_path_factory.mktemp("model"))
    pipeline.save_pretrained(directory)
    return directory


@pytest.fixture(scope="module")
def clip() -> np.ndarray:
    """30 frames of 100x60 (width x height)."""
    return synthetic.render(synthetic.random_scene(7), 30, 24.0, 60, 100)


def test_pipeline_returns_the_source_length_and_size(pipeline, clip):
    out = pipeline(clip, "make the background blue", num_inference_steps=STEPS)
    assert out.frames.shape == (30, 60, 100, 3) and out.frames.dtype == np.uint8
    # Padded internally to 33 = 4*8+1 frames (9 latent frames).
    assert out.latents.shape[2] == 9
    odd = pipeline(clip[:5, :37, :51], "make it red", num_inference_steps=1)
    assert odd.frames.shape == (5, 37, 51, 3)
    image = pipeline(clip[0], "make it red", num_inference_steps=1)
    assert image.frames.shape == (1, 60, 100, 3)


def test_num_frames_sets_the_output_length(pipeline, clip):
    """A 5-frame source restored to 9 frames (speed restoration): the output has 9 frames of the
    source's size, generated in 3 latent frames while the source keeps its 2."""
    out = pipeline(clip[:5], "restore the speed", num_inference_steps=1, num_frames=9)
    assert out.frames.shape == (9, 60, 100, 3)
    assert out.latents.shape[2] == 3
    with pytest.raises(ValueError, match="num_frames"):
        pipeline(clip[:5], "restore the speed", num_inference_steps=1, num_frames=0)


def test_pad_video_repeats_the_last_frame_and_replicates_edges():
    frames = np.arange(2 * 3 * 5 * 3, dtype=np.uint8).reshape(2, 3, 5, 3)
    padded = pad_video(frames, temporal=4, multiple_h=4, multiple_w=4)
    assert padded.shape == (5, 4, 8, 3)
    assert (padded[2:] == padded[1]).all()
    assert (padded[:, 3] == padded[:, 2]).all() and (padded[:, :, 5:] == padded[:, :, 4:5]).all()
    assert np.array_equal(padded[:2, :3, :5], frames)


def test_seed_makes_it_deterministic(pipeline, clip):
    a = pipeline(clip[:5], "make it red", num_inference_steps=2, seed=3)
    b = pipeline(clip[:5], "make it red", num_inference_steps=2, seed=3)
    c = pipeline(clip[:5], "make it red", num_inference_steps=2, seed=4)
    assert np.array_equal(a.frames, b.frames)
    assert not torch.equal(a.latents, c.latents)


def hand_written_sampler(pipeline, frames, seed, texts, combine, stochastic: bool = False) -> torch.Tensor:
    """The sampler written out: the source encoded, seeded noise for the latents and the semantic
    tokens, shift-5 Euler steps on both; each step runs the transformer once per text embedding in
    ``texts`` and ``combine(*outputs)`` gives the (video, semantic) velocities. With ``stochastic``,
    each step instead re-noises its clean estimate to the next sigma with fresh noise from the same
    generator (the video's, then the semantic tokens'). Returns the latents."""
    from diffusers import FlowMatchEulerDiscreteScheduler

    generator = torch.Generator().manual_seed(seed)
    pixels = torch.from_numpy(frames).permute(3, 0, 1, 2)[None].float() / 127.5 - 1
    source = pipeline.vae.encode(pixels)
    latents = torch.randn(source.shape, generator=generator)
    semantic = torch.randn((1, pipeline.num_semantic_tokens, 32), generator=generator)
    video_scheduler = FlowMatchEulerDiscreteScheduler(shift=5.0)
    video_scheduler.set_timesteps(STEPS)
    sigmas = video_scheduler.sigmas
    with torch.no_grad():
        for index, t in enumerate(video_scheduler.timesteps):
            outputs = [
                pipeline.transformer(latents, t[None], text, source_latents=source, semantic_tokens=semantic)
                for text in texts
            ]
            video, sem = combine(*outputs)
            sigma, next_sigma = sigmas[index], sigmas[index + 1]
            if stochastic:
                fresh = torch.randn(latents.shape, generator=generator)
                latents = (1 - next_sigma) * (latents - sigma * video) + next_sigma * fresh
                fresh = torch.randn(semantic.shape, generator=generator)
                semantic = (1 - next_sigma) * (semantic - sigma * sem) + next_sigma * fresh
            else:
                latents = latents + (next_sigma - sigma) * video
                semantic = semantic + (next_sigma - sigma) * sem
    return latents


def test_cfg_one_is_the_conditional_branch(pipeline, clip):
    """Guidance 1 runs only the conditional branch, and equals a hand-written conditional Euler loop."""
    frames = clip[:9, :32, :32]
    batch_sizes = []
    hook = pipeline.transformer.register_forward_pre_hook(
        lambda module, args, kwargs: batch_sizes.append(kwargs["hidden_states"].shape[0]), with_kwargs=True
    )
    try:
        out = pipeline(
            frames,
            "make it red",
            num_inference_steps=STEPS,
            guidance_scale=1.0,
            seed=11,
            output_type="latent",
        )
    finally:
        hook.remove()
    assert out.frames is None and batch_sizes == [1] * STEPS

    text = pipeline.text_encoder.encode(["[Video edit] make it red"])
    latents = hand_written_sampler(pipeline, frames, 11, [text], lambda pred: (pred.sample, pred.semantic))
    assert torch.equal(out.latents, latents)


def test_stochastic_sampling_renoises_each_clean_estimate(pipeline, clip):
    """``stochastic_sampling`` re-noises every step's clean estimate with fresh seeded noise: it
    equals the hand-written loop, repeats with its seed, and differs from the Euler sampler."""
    frames = clip[:9, :32, :32]
    text = pipeline.text_encoder.encode(["[Video edit] make it red"])

    def edit(**kwargs) -> torch.Tensor:
        settings = {"num_inference_steps": STEPS, "guidance_scale": 1.0, "output_type": "latent"}
        return pipeline(frames, "make it red", **settings, **kwargs).latents

    stochastic = edit(seed=11, stochastic_sampling=True)
    latents = hand_written_sampler(
        pipeline, frames, 11, [text], lambda pred: (pred.sample, pred.semantic), stochastic=True
    )
    torch.testing.assert_close(stochastic, latents, rtol=1e-5, atol=1e-5)
    assert torch.equal(stochastic, edit(seed=11, stochastic_sampling=True))
    assert not torch.allclose(stochastic, edit(seed=11), atol=1e-3)
    # Without the argument, the pipeline's config decides (an export records it).
    pipeline.config.stochastic_sampling = True
    try:
        assert torch.equal(edit(seed=11), stochastic)
    finally:
        pipeline.config.stochastic_sampling = False


def test_cfg_is_uncond_plus_scale_times_cond_minus_uncond(pipeline, clip):
    """Guidance s != 1: each step's velocity (video and semantic tokens alike) is
    ``uncond + s * (cond - uncond)`` of the conditional and the negative-prompt branches; a
    hand-written loop of the formula, each branch run on its own, gives the pipeline's latents."""
    frames, scale = clip[:9, :32, :32], 5.0
    out = pipeline(
        frames, "make it red", num_inference_steps=STEPS, guidance_scale=scale, seed=11, output_type="latent"
    )
    prompt, negative = pipeline.build_prompts("make it red")
    cond_text = pipeline.text_encoder.encode([prompt])
    uncond_text = pipeline.text_encoder.encode([negative], allow_empty=True)

    def guided(cond, uncond):
        video = uncond.sample + scale * (cond.sample - uncond.sample)
        return video, uncond.semantic + scale * (cond.semantic - uncond.semantic)

    latents = hand_written_sampler(pipeline, frames, 11, [cond_text, uncond_text], guided)
    # The pipeline batches both branches in one forward: equal up to float rounding.
    torch.testing.assert_close(out.latents, latents, rtol=1e-4, atol=1e-5)
    unguided = pipeline(
        frames, "make it red", num_inference_steps=STEPS, guidance_scale=1.0, seed=11, output_type="latent"
    )
    assert (out.latents - unguided.latents).abs().max() > 1e-2  # the guidance term is not negligible


def test_expected_slice_of_a_seeded_edit(pipeline, clip):
    """Golden values (as diffusers' pipeline tests pin an ``expected_slice``): the tiny model built
    from seed 0 edits this clip, seed 11, 3 steps, to these latents and frames."""
    frames = clip[:9, :32, :32]
    out = pipeline(frames, "make it red", num_inference_steps=STEPS, guidance_scale=1.0, seed=11)
    expected_latents = [-0.99027, 0.36831, -0.62273, 0.30800, -0.80356, -0.85405, -0.39999, -0.58243]
    np.testing.assert_allclose(out.latents.flatten()[:8].numpy(), expected_latents, atol=1e-4)
    expected_pixels = [36, 204, 139, 246, 255, 177, 41, 60, 145, 143, 41, 123]
    np.testing.assert_allclose(out.frames[0, 0, :4].reshape(-1).astype(int), expected_pixels, atol=1)


def test_prompts_prefix_and_negative(pipeline):
    assert pipeline.build_prompts("make it red") == ("[Video edit] make it red", "[Video edit]")
    assert pipeline.build_prompts("[Video edit] make it red")[0] == "[Video edit] make it red"
    assert pipeline.build_prompts("make it red", add_prefix=False) == ("make it red", "")


def test_save_load_round_trip(pipeline, model_dir, clip):
    assert os.path.isfile(os.path.join(model_dir, PIPELINE_FILE))
    loaded = SamaEditPipeline.from_pretrained(model_dir)
    assert loaded.model_config == pipeline.model_config
    a = pipeline(clip[:5], "make it red", num_inference_steps=2)
    b = loaded(clip[:5], "make it red", num_inference_steps=2)
    assert torch.equal(a.latents, b.latents) and np.array_equal(a.frames, b.frames)


def test_frozen_components_saved_by_reference(pipeline, clip, tmp_path):
    """copy_frozen=False records where the text encoder came from instead of copying it."""
    import dataclasses

    from sama.models.presets import build_model as build

    root = tmp_path / "wan_root"
    pipeline.text_encoder.save_pretrained(str(root))
    text = dataclasses.replace(pipeline.model_config.text, pretrained=str(root))
    config = dataclasses.replace(pipeline.model_config, text=text)
    torch.manual_seed(0)
    components = build(config, with_semantic_encoder=False)
    components.transformer.load_state_dict(pipeline.transformer.state_dict())
    by_reference = SamaEditPipeline.from_components(components)
    export = tmp_path / "export"
    by_reference.save_pretrained(str(export), copy_frozen=False)
    manifest = json.loads((export / PIPELINE_FILE).read_text())
    assert manifest["components"]["text_encoder"] == {"pretrained": str(root)}
    assert not (export / "text_encoder").exists() and (export / "vae").is_dir()
    loaded = SamaEditPipeline.from_pretrained(str(export))
    a = pipeline(clip[:5], "make it red", num_inference_steps=1)
    b = loaded(clip[:5], "make it red", num_inference_steps=1)
    assert torch.equal(a.latents, b.latents)


def test_clear_errors_for_bad_inputs(pipeline, clip):
    with pytest.raises(ValueError, match="instruction is empty"):
        pipeline(clip[:5], "   ")
    with pytest.raises(ValueError, match="no frames"):
        pipeline(np.zeros((0, 60, 100, 3), dtype=np.uint8), "make it red")
    with pytest.raises(ValueError, match="no frames"):
        pipeline([], "make it red")
    with pytest.raises(ValueError, match="uint8"):
        pipeline(clip.astype(np.float32), "make it red")


def test_clear_errors_for_bad_model_directories(model_dir, tmp_path):
    missing = tmp_path / "nope"
    with pytest.raises(ModelDirectoryError, match="does not exist") as info:
        SamaEditPipeline.from_pretrained(str(missing))
    assert str(missing) in str(info.value)

    raw = tmp_path / "raw_wan"
    (raw / "transformer").mkdir(parents=True)
    with pytest.raises(ModelDirectoryError, match="sama_pipeline.json is missing.*raw Wan checkpoint"):
        SamaEditPipeline.from_pretrained(str(raw))

    newer = tmp_path / "newer"
    shutil.copytree(model_dir, newer)
    manifest = json.loads((newer / PIPELINE_FILE).read_text())
    manifest["format_version"] = 99
    (newer / PIPELINE_FILE).write_text(json.dumps(manifest))
    with pytest.raises(ModelDirectoryError, match="format_version 99"):
        SamaEditPipeline.from_pretrained(str(newer))

    # An autoencoder that does not fit the transformer (4x spatial -> 192 channels, not 48).
    mismatched = tmp_path / "mismatched"
    shutil.copytree(model_dir, mismatched)
    from sama.models.autoencoders import SpaceToDepthAutoencoder

    shutil.rmtree(mismatched / "vae")
    SpaceToDepthAutoencoder(spatial_factor=4).save_pretrained(str(mismatched / "vae"))
    with pytest.raises(ModelDirectoryError, match="incompatible components.*48 latent channels.*192") as info:
        SamaEditPipeline.from_pretrained(str(mismatched))
    assert str(mismatched) in str(info.value)

    no_transformer = tmp_path / "no_transformer"
    shutil.copytree(model_dir, no_transformer)
    shutil.rmtree(no_transformer / "transformer")
    with pytest.raises(ModelDirectoryError, match="transformer directory is missing"):
        SamaEditPipeline.from_pretrained(str(no_transformer))


def test_run_edit_writes_an_mp4_of_the_source_size(model_dir, clip, tmp_path):
    from sama.edit import run_edit

    source = tmp_path / "source.mp4"
    source.write_bytes(video.encode_mp4(clip, 24.0))
    output = tmp_path / "out" / "edited.mp4"
    report = run_edit(
        str(source), "make the background blue", model_dir, str(output), steps=2, cfg=5.0, seed=1
    )
    info = video.probe(str(output))
    assert (info.num_frames, info.width, info.height) == (30, 100, 60)
    assert info.fps == pytest.approx(24.0)
    assert video.decode_clip(str(output)).shape == (30, 60, 100, 3)
    assert report["frames"] == 30 and (report["width"], report["height"]) == (100, 60)
    assert report["output"] == str(output) and not report["cropped_to_even"]
    # 100x60 is cut to the 4:3 bucket 64x48, 30 frames at 24 fps to 10 at 8 fps, in two windows.
    assert report["bucket"] == {"height": 48, "width": 64} and report["processed_frames"] == 10
    assert report["windows"] == 2


def test_run_edit_defaults_to_the_exports_inference_settings(pipeline, clip, tmp_path):
    """Without --steps/--cfg/--sampler an edit uses the steps, guidance and sampler recorded in the
    export; the flags override them."""
    import dataclasses

    from sama.edit import run_edit

    directory = str(tmp_path / "model")
    saved = SamaEditPipeline(
        pipeline.transformer,
        pipeline.vae,
        pipeline.text_encoder,
        model_config=pipeline.model_config,
        config=dataclasses.replace(TINY, num_inference_steps=2, guidance_scale=1.0, stochastic_sampling=True),
    )
    saved.save_pretrained(directory)
    source = tmp_path / "source.mp4"
    source.write_bytes(video.encode_mp4(clip[:5], 24.0))
    report = run_edit(str(source), "make it red", directory, str(tmp_path / "a.mp4"))
    assert (report["steps"], report["cfg"], report["sampler"]) == (2, 1.0, "stochastic")
    report = run_edit(
        str(source), "make it red", directory, str(tmp_path / "b.mp4"), steps=1, cfg=3.0, sampler="euler"
    )
    assert (report["steps"], report["cfg"], report["sampler"]) == (1, 3.0, "euler")
    # The sampler reaches the pipeline: the same seed, the other sampler, another edit.
    run_edit(str(source), "make it red", directory, str(tmp_path / "c.mp4"), sampler="euler")
    a, c = (video.decode_clip(str(tmp_path / name)) for name in ("a.mp4", "c.mp4"))
    assert not np.array_equal(a, c)
    with pytest.raises(ValueError, match="sampler must be one of"):
        run_edit(str(source), "make it red", directory, str(tmp_path / "d.mp4"), sampler="ddim")


def test_run_edit_clear_errors(model_dir, clip, tmp_path):
    from sama.edit import run_edit

    source = tmp_path / "source.mp4"
    source.write_bytes(video.encode_mp4(clip[:5], 24.0))
    out = str(tmp_path / "out.mp4")
    with pytest.raises(ValueError, match="instruction is empty"):
        run_edit(str(source), "", model_dir, out)
    empty = tmp_path / "empty.mp4"
    empty.write_bytes(b"")
    with pytest.raises(video.VideoDecodeError, match="empty"):
        run_edit(str(empty), "make it red", model_dir, out)
    with pytest.raises(ModelDirectoryError, match="does not exist"):
        run_edit(str(source), "make it red", str(tmp_path / "no_model"), out)
    assert not os.path.exists(out)
