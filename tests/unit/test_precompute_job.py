"""Unit tests of the precompute job's stages (sama.prep.precompute_job), no Ray: pixel shards in,
latent shards out, every input accounted for, rejects with reasons, byte-identical reruns and the
encoder-identity refusal."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from sama import schema, storage, synthetic, video
from sama.buckets import Bucket
from sama.precompute import NULL_PROMPTS, encode_samples
from sama.prep import ledger
from sama.prep.precompute_job import (
    LatentOutputMismatch,
    PrecomputeConfig,
    ShardUnit,
    input_shards,
    list_shard_units,
    load_encoders,
    model_config_of,
    process_unit,
    write_output_info,
)
from sama.prep.pretext_job import PrepPretextConfig, make_clip_sample
from tests.unit.test_prep_unit import _accounted_once

BUCKET = Bucket(48, 64)
FRAMES = 9
FPS = 8.0


def pretext_cfg() -> PrepPretextConfig:
    cfg = PrepPretextConfig()
    cfg.clips.num_frames = FRAMES
    cfg.clips.fps = FPS
    cfg.encode.preset = "ultrafast"
    return cfg


def pixel_samples(count: int, seed: int = 0) -> list[schema.Sample]:
    """Pretext samples as prep-pretext writes them (derived sources, every task of the mix)."""
    cfg = pretext_cfg()
    samples = []
    for i in range(count):
        scene = synthetic.random_scene(seed + i)
        frames = synthetic.render(scene, FRAMES, FPS, BUCKET.height, BUCKET.width)
        uri = f"/raw/video_{seed + i:04d}.mp4"
        samples.append(make_clip_sample(frames, uri, 0, 0.0, synthetic.caption(scene), BUCKET, cfg))
    return samples


def edit_sample(key_seed: int) -> schema.Sample:
    """A paired-edit sample with a stored source member."""
    scene = synthetic.random_scene(100 + key_seed)
    frames = synthetic.render(scene, FRAMES, FPS, BUCKET.height, BUCKET.width)
    meta = schema.SampleMeta(
        key=schema.sample_key("edit", key_seed), task="video_edit", media="video",
        instruction="[Video edit] make it red", fps=FPS, num_frames=FRAMES, height=BUCKET.height,
        width=BUCKET.width, bucket=BUCKET.name, source_uri=f"/raw/edit_{key_seed}.mp4",
    )  # fmt: skip
    target = video.encode_mp4(frames[:, :, ::-1].copy(), FPS, preset="ultrafast")
    source = video.encode_mp4(frames, FPS, preset="ultrafast")
    return schema.Sample(meta=meta, target=target, source=source)


def write_shard(root: str, stem: str, samples: list) -> str:
    with schema.ShardWriter(root, stem, schema.ShardConfig(max_samples=1000)) as writer:
        for sample in samples:
            writer.write(sample)
    return writer.shards[0].uri


def corrupt(sample: schema.Sample) -> schema.Sample:
    return schema.Sample(
        meta=sample.meta, target=b"\x00\x00\x00\x18ftypmp42 not a video", source=sample.source
    )


@pytest.fixture(scope="module")
def encoders():
    cfg = PrecomputeConfig()
    return load_encoders(cfg.model, model_config_of(cfg.model))


def job_cfg(output: str, *inputs: str, **changes) -> PrecomputeConfig:
    cfg = PrecomputeConfig(inputs=list(inputs))
    cfg.output.uri = output
    cfg.batch_size = 3
    cfg.shards.max_samples = 4
    for name, value in changes.items():
        setattr(cfg, name, value)
    cfg.validate()
    return cfg


def read_latents(output: str) -> dict[str, schema.LatentSample]:
    got = list(schema.iter_samples(ledger.shards_uri(output)))
    assert all(isinstance(s, schema.LatentSample) for s in got)
    return {s.key: s for s in got}


def test_unit_encodes_every_sample_as_training_would(tmp_path, encoders):
    pixels = [*pixel_samples(5), edit_sample(1), edit_sample(2)]
    shard = write_shard(str(tmp_path / "in" / "shards" / "video" / BUCKET.name), "u", pixels)
    out = str(tmp_path / "out")
    cfg = job_cfg(out, str(tmp_path / "in"))
    (unit,), skipped = list_shard_units(cfg, set())
    assert skipped == 0 and unit.shard == shard

    result = process_unit(unit, cfg, encoders)
    assert _accounted_once(result) and not result.rejects
    assert sorted(result.inputs) == sorted(f"{shard}#{s.key}" for s in pixels)
    assert result.samples == len(pixels) and result.sources == [shard]
    assert all(p["path"].startswith(f"shards/video/{BUCKET.name}/{unit.unit_id}-") for p in result.shards)
    assert ledger.read_markers(out)[0].unit_id == unit.unit_id

    latents = read_latents(out)
    assert set(latents) == {s.key for s in pixels}
    for pixel in pixels:
        got = latents[pixel.key]
        assert got.meta == pixel.meta  # the metadata passes through unchanged
        target, source = pixel.decode_pair()
        want = encode_samples(
            encoders, target[None], None if source is None else source[None], [pixel.meta.instruction]
        )[0]
        torch.testing.assert_close(got.latents.target, want.target, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(got.latents.text, want.text, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(got.latents.semantic, want.semantic, atol=1e-5, rtol=1e-5)
        assert got.latents.anchor_frames == want.anchor_frames
        if source is None:
            assert got.latents.source is None
        else:
            torch.testing.assert_close(got.latents.source, want.source, atol=1e-5, rtol=1e-5)


def test_bad_samples_are_rejected_with_a_reason_and_the_rest_kept(tmp_path, encoders):
    good = pixel_samples(4, seed=20)
    bad_media = corrupt(pixel_samples(1, seed=40)[0])
    latent = schema.LatentSample(
        meta=pixel_samples(1, seed=41)[0].meta,
        latents=schema.SampleLatents(target=torch.zeros(48, 3, 24, 32), text=torch.zeros(2, 32)),
    )
    shard = write_shard(str(tmp_path / "in"), "mixed", [good[0], bad_media, good[1], latent, *good[2:]])
    # A sample whose metadata is not the schema's, appended as raw members.
    import io
    import tarfile

    broken = str(tmp_path / "in" / "broken-000000.tar")
    with tarfile.open(broken, "w") as tar:
        for name, data in (("abc.json", b"{not json"), ("abc.tgt.mp4", good[0].target)):
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    out = str(tmp_path / "out")
    cfg = job_cfg(out, str(tmp_path / "in"))
    units, _ = list_shard_units(cfg, set())
    assert [u.shard for u in units] == sorted([shard, broken])
    results = [process_unit(u, cfg, encoders) for u in units]
    reasons = {r.input: r.reason for result in results for r in result.rejects}
    media_reason = reasons.pop(f"{shard}#{bad_media.key}")
    assert media_reason in video.ERROR_KINDS  # the decoder's kind (e.g. not_video, truncated)
    assert reasons == {f"{shard}#{latent.key}": "latent_input", f"{broken}#abc": "schema"}
    assert all(_accounted_once(r) for r in results)
    for result in results:
        for rej in result.rejects:
            assert rej.input in rej.detail
    assert set(read_latents(out)) == {s.key for s in good}


def test_an_unreadable_shard_is_a_rejected_source(tmp_path, encoders):
    good = pixel_samples(2, seed=60)
    shard = write_shard(str(tmp_path / "in"), "cut", good)
    data = storage.read_bytes(shard)
    storage.write_bytes(shard, data[: len(data) // 2 + 100])  # cut mid-member
    out = str(tmp_path / "out")
    cfg = job_cfg(out, shard)
    (unit,), _ = list_shard_units(cfg, set())
    result = process_unit(unit, cfg, encoders)
    assert _accounted_once(result)
    assert [r.reason for r in result.rejects] == ["bad_tar"]
    assert result.rejects[0].input == shard


def test_rerun_writes_the_same_bytes(tmp_path, encoders):
    shard = write_shard(str(tmp_path / "in"), "s", [*pixel_samples(6, seed=80), edit_sample(3)])
    outputs = []
    for name in ("a", "b"):
        out = str(tmp_path / name)
        cfg = job_cfg(out, shard)
        (unit,), _ = list_shard_units(cfg, set())
        process_unit(unit, cfg, encoders)
        outputs.append(out)
    a, b = (sorted(schema.list_shards(ledger.shards_uri(o))) for o in outputs)
    assert [ledger.shard_path(u) for u in a] == [ledger.shard_path(u) for u in b]
    assert all(storage.read_bytes(x) == storage.read_bytes(y) for x, y in zip(a, b, strict=True))


def test_done_shards_are_skipped_and_only_committed_input_shards_are_read(tmp_path):
    # An input that is a job output: a shard no marker lists (a killed run's) is not an input.
    root = str(tmp_path / "prep")
    kept = write_shard(storage.join(root, "shards", "video", BUCKET.name), "unit1", pixel_samples(1))
    orphan = write_shard(storage.join(root, "shards", "video", BUCKET.name), "unit2", pixel_samples(1, 5))
    result = ledger.UnitResult(unit_id="unit1", shards=[{"path": ledger.shard_path(kept), "samples": 1}])
    ledger.write_marker(root, result)
    for prefix in (root, storage.join(root, "shards"), storage.join(root, "shards", "video")):
        assert input_shards(prefix) == [kept]
    assert orphan not in input_shards(root)
    assert input_shards(storage.join(root, "shards", "image")) == []
    cfg = job_cfg(str(tmp_path / "out"), root, storage.join(root, "shards"))
    units, skipped = list_shard_units(cfg, set())
    assert [u.shard for u in units] == [kept] and skipped == 0
    assert list_shard_units(cfg, {kept}) == ([], 1)
    assert ShardUnit.from_json(units[0].to_json()) == units[0]


def test_latent_info_is_written_and_other_encoders_are_refused(tmp_path):
    out = str(tmp_path / "out")
    cfg = job_cfg(out, str(tmp_path / "in"))
    model_config = model_config_of(cfg.model)
    info = write_output_info(cfg, model_config, overwrite=False)
    assert schema.read_latent_info(out) == info
    assert info.dtype == "float32" and info.null_prompts == list(NULL_PROMPTS) and info.model == "tiny"
    assert set(info.encoders) == {"vae", "text_encoder", "semantic_encoder"}
    nulls = schema.read_null_embeddings(out)
    assert list(nulls) == list(NULL_PROMPTS) and nulls[""].ndim == 2
    before = storage.read_bytes(storage.join(out, schema.NULL_PROMPTS_FILE))

    # The same encoders: accepted as is (nothing rewritten).
    write_output_info(cfg, model_config, overwrite=False)
    assert storage.read_bytes(storage.join(out, schema.NULL_PROMPTS_FILE)) == before

    # Another dtype, or other encoders: refused, naming what differs; --overwrite replaces it.
    other = job_cfg(out, str(tmp_path / "in"), dtype="bfloat16")
    with pytest.raises(LatentOutputMismatch, match="dtype.*float32.*bfloat16"):
        write_output_info(other, model_config, overwrite=False)
    changed = job_cfg(out, str(tmp_path / "in"))
    changed.model.overrides = {"text.num_layers": 1}
    with pytest.raises(LatentOutputMismatch, match="text_encoder"):
        write_output_info(changed, model_config_of(changed.model), overwrite=False)
    assert schema.read_latent_info(out) == info
    replaced = write_output_info(other, model_config, overwrite=True)
    assert schema.read_latent_info(out) == replaced and replaced.dtype == "bfloat16"


def test_a_non_latent_job_output_is_refused_as_output(tmp_path):
    out = str(tmp_path / "prep")
    ledger.write_marker(out, ledger.UnitResult(unit_id="u"))
    cfg = job_cfg(out, str(tmp_path / "in"))
    with pytest.raises(LatentOutputMismatch, match="not a latent output"):
        write_output_info(cfg, model_config_of(cfg.model), overwrite=False)


def test_batches_group_equal_shapes_and_storage_dtype(tmp_path, encoders):
    # Speed samples have shorter sources than the others: they may not share a batch; bfloat16
    # storage applies to every tensor.
    pixels = pixel_samples(8, seed=200)
    assert len({(s.meta.task, s.meta.source_num_frames) for s in pixels}) > 1
    shard = write_shard(str(tmp_path / "in"), "s", pixels)
    out = str(tmp_path / "out")
    cfg = job_cfg(out, shard, dtype="bfloat16", batch_size=8)
    (unit,), _ = list_shard_units(cfg, set())
    result = process_unit(unit, cfg, encoders)
    assert result.samples == 8 and not result.rejects
    for sample in read_latents(out).values():
        assert sample.latents.target.dtype == torch.bfloat16
        assert sample.latents.text.dtype == torch.bfloat16
        expected = sample.meta.source_num_frames
        if expected is None:
            assert sample.latents.source is None
        else:
            assert sample.latents.source.shape[1] == (expected - 1) // 4 + 1
    summary_keys = json.dumps(sorted(read_latents(out)))
    assert summary_keys == json.dumps(sorted(s.key for s in pixels))
    assert np.all([r.samples for r in ledger.read_markers(out)])


def test_encoders_of_an_export_are_the_exports_own(tmp_path):
    """`--model EXPORT` loads the export's autoencoder and text encoder (not the transformer): the
    same text embeddings and latents as the model that was exported."""
    from sama.models.presets import build_model
    from sama.pipeline_edit import SamaEditPipeline
    from sama.train.trainer import ModelSection

    components = build_model("tiny")
    SamaEditPipeline.from_components(components).save_pretrained(str(tmp_path / "export"))
    section = ModelSection(init_from=str(tmp_path / "export"))
    loaded = load_encoders(section, model_config_of(section))
    assert loaded.transformer is None
    prompts = ["[Video edit] make it red", ""]
    expected = components.text_encoder.encode(prompts, allow_empty=True)
    assert torch.equal(loaded.text_encoder.encode(prompts, allow_empty=True), expected)
    frames = torch.rand(1, 3, 5, 16, 16) * 2 - 1
    assert torch.equal(loaded.vae.encode(frames), components.vae.encode(frames))
