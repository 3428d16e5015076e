"""Training from precomputed latents (``sama precompute`` shards), on the tiny model, CPU, no Ray.

The rows here are made in the process: pixel rows from synthetic clips, latent rows from the same
clips through :func:`sama.precompute.encode_samples` with the same frozen encoders training uses.
"""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("diffusers")
pytest.importorskip("transformers")

from sama import schema, synthetic, video  # noqa: E402
from sama.models.presets import SamaComponents, build_model  # noqa: E402
from sama.models.training import SamaBatch, SamaTrainingModule, TrainingModuleConfig  # noqa: E402
from sama.precompute import NULL_PROMPTS, encode_samples, null_prompt_embeddings  # noqa: E402
from sama.train.data import DataConfig, SourceConfig, TrainingRow, collate  # noqa: E402
from sama.train.trainer import (  # noqa: E402
    ModelSection,
    OptimConfig,
    ScalingSection,
    TrainConfig,
    Trainer,
    ValidationSection,
    frozen_encoder_identity,
    resolve_model_config,
    step_generator,
)

SIZE = 32
TEXT_LENGTH = 32  # the tiny preset's text.max_length


@pytest.fixture(scope="module")
def components():
    torch.manual_seed(0)
    return build_model("tiny")


def _clip(seed: int, frames: int) -> np.ndarray:
    return synthetic.render(synthetic.random_scene(seed), frames, 8.0, SIZE, SIZE)


def _pixel_rows(kind: str, count: int, seed: int = 0) -> list[TrainingRow]:
    """``count`` rows of one shape: a pretext clip with a source, a text-to-video clip without, or
    an image edit."""
    media = "image" if kind == "image_edit" else "video"
    frames = 1 if media == "image" else 5
    rows = []
    for index in range(count):
        target = _clip(seed + index, frames)
        source = None if kind == "t2v" else _clip(seed + 100 + index, frames)
        prompt = f"a shape moves {index}" if kind == "t2v" else f"[Video edit] make shape {index} red"
        rows.append(
            TrainingRow(
                key=f"{kind}-{seed}-{index}",
                task=kind,
                media=media,
                instruction=prompt,
                bucket=f"{SIZE}x{SIZE}",
                target=target,
                source=source,
            )
        )
    return rows


def _latent_rows(components, rows: list[TrainingRow]) -> list[TrainingRow]:
    """The rows' latent twins, as ``sama precompute`` stores them (safetensors round trip included)."""
    targets = np.stack([row.target for row in rows])
    sources = np.stack([row.source for row in rows]) if rows[0].source is not None else None
    stored = encode_samples(components, targets, sources, [row.instruction for row in rows])
    out = []
    for row, latents in zip(rows, stored, strict=True):
        latents = schema.SampleLatents.from_bytes(latents.to_bytes())
        out.append(
            dataclasses.replace(row, target=None, source=None, latents=latents, num_frames=row.num_frames)
        )
    return out


def _null_embeddings(components) -> dict[str, torch.Tensor]:
    return dict(zip(NULL_PROMPTS, null_prompt_embeddings(components), strict=True))


def _latent_module(components, config: TrainingModuleConfig) -> SamaTrainingModule:
    """A training module over the same transformer, without any frozen encoder."""
    bare = SamaComponents(components.config, components.transformer, None, None, None)
    module = SamaTrainingModule(bare, config)
    module.set_null_embeddings(_null_embeddings(components))
    return module.train()


# ----------------------------------------------------------------------------------------------
# (a) the loss from latents is the loss from pixels


@pytest.mark.parametrize("kind", ["cube_inpaint", "t2v", "image_edit"])
def test_loss_from_latent_rows_equals_loss_from_pixel_rows(components, kind):
    """Same transformer, same generator: caption dropout substitutes the stored null embeddings and
    the anchors are drawn from the stored candidates exactly as from the frames."""
    config = TrainingModuleConfig(text_dropout_prob=0.5)
    pixel_module = SamaTrainingModule(components, config).train()
    latent_module = _latent_module(components, config)
    assert latent_module.uses_semantic and components.config.semantic.anchor_sampling == "random"
    pixel_rows = _pixel_rows(kind, 4, seed=3)
    latent_rows = _latent_rows(components, pixel_rows)
    pixel_batch, latent_batch = collate(pixel_rows), collate(latent_rows, TEXT_LENGTH)
    if kind == "t2v":
        assert pixel_batch.source is None and latent_batch.source_latents is None
    dropped_any = kept_any = False
    for seed in range(3):
        # The caption-dropout draw is the generator's first (the autoencoder takes its mode).
        draws = torch.rand((4,), generator=step_generator(seed, 0, 0, 0)).tolist()
        dropped_any |= any(d < 0.5 for d in draws)
        kept_any |= any(d >= 0.5 for d in draws)
        with torch.no_grad():
            pixel = pixel_module(pixel_batch, step_generator(seed, 0, 0, 0))
            latent = latent_module(latent_batch, step_generator(seed, 0, 0, 0))
        assert float(latent.loss) == pytest.approx(float(pixel.loss), rel=1e-5, abs=1e-7)
        assert float(latent.loss_fm) == pytest.approx(float(pixel.loss_fm), rel=1e-5, abs=1e-7)
        assert float(latent.loss_sem) == pytest.approx(float(pixel.loss_sem), rel=1e-5, abs=1e-7)
    assert dropped_any and kept_any


def test_anchor_frames_missing_from_the_stored_candidates_are_refused(components):
    module = _latent_module(components, TrainingModuleConfig(text_dropout_prob=0.0))
    [row] = _latent_rows(components, _pixel_rows("cube_inpaint", 1))
    batch = collate([row], TEXT_LENGTH)
    batch = dataclasses.replace(
        batch, semantic_candidates=batch.semantic_candidates[:, :1], anchor_frames=[[7]]
    )
    with pytest.raises(
        ValueError, match=r"cube_inpaint-0-0.*not among the precomputed semantic frames \[7\]"
    ):
        module.encode_batch(batch, step_generator(0, 0, 0, 0))


# ----------------------------------------------------------------------------------------------
# (e) collate


def test_collate_of_latent_rows_pads_text_and_gives_no_source_for_t2v(components):
    rows = _latent_rows(components, _pixel_rows("t2v", 2))
    lengths = [row.latents.text.shape[0] for row in rows]
    assert all(length < TEXT_LENGTH for length in lengths)
    batch = collate(rows, TEXT_LENGTH)
    assert isinstance(batch, SamaBatch) and batch.target is None and batch.source is None
    assert batch.source_latents is None
    assert tuple(batch.text_embeds.shape) == (2, TEXT_LENGTH, rows[0].latents.text.shape[1])
    for index, length in enumerate(lengths):
        assert torch.equal(batch.text_embeds[index, :length], rows[index].latents.text)
        assert not batch.text_embeds[index, length:].any()
    # Padded back, the text is the encoder's full-length output.
    full = components.text_encoder.encode([row.instruction for row in rows], allow_empty=True)
    torch.testing.assert_close(batch.text_embeds, full)
    assert batch.keys == [row.key for row in rows] and batch.tasks == ["t2v", "t2v"]
    assert batch.num_frames == [5, 5] and batch.anchor_frames == [[0, 1, 2, 3, 4]] * 2
    assert tuple(batch.semantic_candidates.shape[:2]) == (2, 5)

    edits = collate(_latent_rows(components, _pixel_rows("cube_inpaint", 2)), TEXT_LENGTH)
    assert edits.source_latents is not None and edits.source_latents.shape == edits.target_latents.shape
    with pytest.raises(ValueError, match="text_length"):
        collate(rows)


def test_ray_rows_carry_latents_as_bytes_and_no_source_as_none(components):
    rows = _latent_rows(components, _pixel_rows("t2v", 1)) + _pixel_rows("t2v", 1)
    for row in rows:
        packed = row.to_ray()
        assert all(isinstance(v, np.ndarray | str | bytes | int) for v in packed.values())
        back = TrainingRow.from_ray(packed)
        assert back.source is None and back.is_latent == row.is_latent and back.num_frames == 5
        if row.is_latent:
            assert torch.equal(back.latents.target, row.latents.target)


# ----------------------------------------------------------------------------------------------
# Trainer on precomputed sources


def _write_latent_output(root, components, identity=None) -> str:
    """A latent output's root files (latents.json, null prompts); its shard prefix."""
    info = schema.LatentOutputInfo(
        encoders=identity
        or frozen_encoder_identity(ModelSection(preset="tiny"), resolve_model_config(ModelSection())),
        dtype="float32",
        null_prompts=list(NULL_PROMPTS),
        model="tiny",
    )
    schema.write_latent_info(str(root), info, null_prompt_embeddings(components))
    return str(root / "shards" / "video")


def _config(sources, **changes) -> TrainConfig:
    cfg = TrainConfig(
        max_steps=4,
        ema_decay=0.5,
        model=ModelSection(preset="tiny"),
        data=DataConfig(sources=sources, video_batch_size=2, image_batch_size=2, shuffle_buffer=1),
        optim=OptimConfig(lr=1e-3, warmup_frac=0.0),
        scaling=ScalingSection(torch_threads=1),
        validation=ValidationSection(draws=1, render_samples=0, render_steps=2),
    )
    for key, value in changes.items():
        setattr(cfg, key, value)
    cfg.validate()
    return cfg


@pytest.fixture
def restore_threads():
    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)


def test_all_latent_training_builds_no_frozen_encoder(components, tmp_path, restore_threads):
    uri = _write_latent_output(tmp_path / "latents", components)
    rows = _latent_rows(components, _pixel_rows("cube_inpaint", 4))
    trainer = Trainer(_config([SourceConfig("clips", uri, "video")]))
    trainer.build(rows={"clips": rows})
    assert trainer.precomputed and set(trainer.latent_sources) == {"clips"}
    seen = []
    original = trainer.module.compute_loss

    def compute_loss(encoded, generator=None):
        parts = trainer.components
        seen.append((parts.vae, parts.text_encoder, parts.semantic_encoder, trainer.module.vae))
        return original(encoded, generator)

    trainer.module.compute_loss = compute_loss
    losses = [trainer.train_step()["train/loss"] for _ in range(3)]
    assert all(np.isfinite(losses)) and len(seen) == 3
    assert all(item is None for step in seen for item in step)
    assert trainer.frozen_loaded == {}
    # The null prompts came from the latent output, not from a text encoder.
    assert set(trainer.module._null_embeds) == set(NULL_PROMPTS)

    # The export loads the autoencoder and text encoder (rank 0, CPU) and records their identity.
    from sama.pipeline_edit import SamaEditPipeline

    export_dir = str(tmp_path / "export")
    trainer.export(export_dir)
    assert trainer.frozen_loaded == {"vae": "export", "text_encoder": "export"}
    assert trainer.components.vae is None and trainer.module.text_encoder is None
    pipeline = SamaEditPipeline.from_pretrained(export_dir)
    prompt = ["[Video edit] make it red"]
    assert torch.equal(pipeline.text_encoder.encode(prompt), components.text_encoder.encode(prompt))
    import json
    import os

    with open(os.path.join(export_dir, "sama_pipeline.json")) as handle:
        assert json.load(handle)["encoders"] == trainer.encoder_identity


def test_pixel_validation_of_a_latent_run_loads_the_encoders_it_needs(components, tmp_path, restore_threads):
    uri = _write_latent_output(tmp_path / "latents", components)
    val = tmp_path / "val"
    with schema.ShardWriter(str(val), "val") as writer:
        for row in _pixel_rows("image_edit", 2, seed=9):
            meta = schema.SampleMeta(
                key=schema.sample_key(row.key),
                task=row.task,
                media="image",
                instruction=row.instruction,
                fps=8.0,
                num_frames=1,
                height=SIZE,
                width=SIZE,
                bucket=row.bucket,
                source_uri="raw",
            )
            writer.write(
                schema.Sample(meta, video.encode_image(row.target[0]), video.encode_image(row.source[0]))
            )
    cfg = _config([SourceConfig("clips", uri, "video")])
    cfg.data.val_uri, cfg.data.val_samples = str(val), 2
    trainer = Trainer(cfg)
    trainer.build(rows={"clips": _latent_rows(components, _pixel_rows("cube_inpaint", 2))})
    first = trainer.validate()
    assert set(first) == {"val/loss", "val/loss_fm", "val/loss_sem"}
    assert trainer.frozen_loaded == {
        "vae": "validation",
        "text_encoder": "validation",
        "semantic_encoder": "validation",
    }
    assert trainer.module.vae is None  # lent for the encoding only
    assert trainer.validate() == first


def test_latents_made_by_other_encoders_are_refused(components, tmp_path, restore_threads):
    identity = frozen_encoder_identity(ModelSection(preset="tiny"), resolve_model_config(ModelSection()))
    identity["vae"] = {**identity["vae"], "weights": "someone/else"}
    uri = _write_latent_output(tmp_path / "latents", components, identity)
    trainer = Trainer(_config([SourceConfig("clips", uri, "video")]))
    rows = _latent_rows(components, _pixel_rows("cube_inpaint", 2))
    with pytest.raises(ValueError, match=r"'clips'.*latents.*vae: weights 'someone/else'.*sama precompute"):
        trainer.build(rows={"clips": rows})


def test_mixed_pixel_and_latent_sources_train(components, tmp_path, restore_threads):
    uri = _write_latent_output(tmp_path / "latents", components)
    cfg = _config(
        [
            SourceConfig("clips", uri, "video"),
            SourceConfig("images", str(tmp_path / "no-such-shards"), "image"),
        ]
    )
    trainer = Trainer(cfg)
    trainer.build(
        rows={
            "clips": _latent_rows(components, _pixel_rows("cube_inpaint", 4)),
            "images": _pixel_rows("image_edit", 4),
        }
    )
    assert not trainer.precomputed
    assert trainer.frozen_loaded == dict.fromkeys(("vae", "text_encoder", "semantic_encoder"), "training")
    sources = set()
    for step in range(4):
        sources.add(trainer.batches.cfg.sources[trainer.batches.choose(step)].name)
        assert np.isfinite(trainer.train_step()["train/loss"])
    assert sources == {"clips", "images"}

    # Rows must match what the source's uri is.
    wrong = Trainer(cfg)
    with pytest.raises(ValueError, match="'images': its rows are latent samples"):
        wrong.build(rows={"clips": [], "images": _latent_rows(components, _pixel_rows("image_edit", 1))})


def test_a_latent_source_is_read_from_its_shards_without_ray(components, tmp_path):
    """A SourceStream over latent shards reads them in its own thread (no Ray Data): the two
    workers' streams split the samples between them, each pass yields every sample of the worker's
    part once, and the same seed gives the same order."""
    from sama.train.data import DataPosition, SourceStream

    uri = _write_latent_output(tmp_path / "latents", components)
    rows = _latent_rows(components, _pixel_rows("cube_inpaint", 6)) + _latent_rows(
        components, _pixel_rows("t2v", 6, seed=1)
    )
    for index in range(3):  # three shards of four samples
        with schema.ShardWriter(uri, f"unit{index}") as writer:
            for row in rows[4 * index : 4 * index + 4]:
                meta = schema.SampleMeta(
                    key=row.key, task=row.task, media="video", instruction=row.instruction or "a clip",
                    fps=8.0, num_frames=row.num_frames, height=48, width=64, bucket=row.bucket or "48x64",
                    source_uri="mem",
                )  # fmt: skip
                writer.write(schema.LatentSample(meta=meta, latents=row.latents))
    cfg = DataConfig(sources=[SourceConfig("clips", uri, "video")], video_batch_size=1, shuffle_buffer=4)

    def one_pass(rank: int) -> list[str]:
        stream = SourceStream(cfg.sources[0], cfg, DataPosition(), rank=rank, world_size=2)
        return [row.key for row in stream._pass_rows(0)]

    first, second = one_pass(0), one_pass(1)
    assert sorted(first + second) == sorted(row.key for row in rows)
    assert not set(first) & set(second) and first == one_pass(0)
    stream = SourceStream(cfg.sources[0], cfg, DataPosition(), rank=0, world_size=2)
    batch = collate(stream.next_batch(), text_length=32)
    stream.close()
    assert batch.target_latents is not None and batch.target is None and batch.keys[0] in first


def test_a_latent_run_from_an_export_loads_the_exports_encoders_when_needed(
    components, tmp_path, restore_threads
):
    """model.init_from + every source precomputed: no encoder at build; a render's text encoder and
    autoencoder, loaded when first needed, are the export's own."""
    from sama.pipeline_edit import SamaEditPipeline

    SamaEditPipeline.from_components(components).save_pretrained(str(tmp_path / "export"))
    uri = _write_latent_output(tmp_path / "latents", components)
    rows = _latent_rows(components, _pixel_rows("cube_inpaint", 4))
    model = ModelSection(preset="tiny", init_from=str(tmp_path / "export"))
    trainer = Trainer(_config([SourceConfig("clips", uri, "video")], model=model))
    trainer.build(rows={"clips": rows})
    assert trainer.precomputed and trainer.components.text_encoder is None and trainer.components.vae is None
    text = trainer.frozen("text_encoder", "render")
    prompts = ["[Video edit] make it red"]
    assert torch.equal(text.encode(prompts), components.text_encoder.encode(prompts))
    frames = torch.rand(1, 3, 5, 16, 16) * 2 - 1
    assert torch.equal(trainer.frozen("vae", "render").encode(frames), components.vae.encode(frames))
    assert trainer.frozen_loaded == {"text_encoder": "render", "vae": "render"}
