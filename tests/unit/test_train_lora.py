"""LoRA through peft: a tiny LoRA SFT from a tiny export trains only the adapters and SAMA's
modules, and exports merged and as an adapter that `sama edit --lora` applies."""

from __future__ import annotations

import json
import os

import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("diffusers")
pytest.importorskip("peft")

from sama import quickstart, synthetic  # noqa: E402
from sama.models.lora import MANIFEST_FILE, LoraSection, is_sama_module  # noqa: E402
from sama.train.trainer import ModelSection  # noqa: E402
from tests.unit.test_trainer_steps import _config, _trainer, no_ray, shards  # noqa: E402, F401


@pytest.fixture(scope="module")
def base_export(tmp_path_factory):
    from sama.models.presets import build_model
    from sama.pipeline_edit import SamaEditPipeline

    torch.manual_seed(0)
    directory = str(tmp_path_factory.mktemp("base") / "export")
    # The quickstart's small buckets, so `sama edit` below edits at 48x64 rather than 480p.
    pipeline = SamaEditPipeline.from_components(build_model("tiny"), quickstart.inference_config())
    pipeline.save_pretrained(directory)
    return directory


def test_lora_sft_trains_adapters_only_and_exports(shards, base_export, tmp_path):  # noqa: F811
    from sama.pipeline_edit import SamaEditPipeline

    lora = LoraSection(rank=4, alpha=8.0)
    cfg = _config(
        shards,
        stage=1,
        max_steps=3,
        model=ModelSection(init_from=base_export, lora=lora, lora_export="adapter"),
    )
    trainer = _trainer(cfg)
    transformer = trainer.module.transformer
    trainable = {n for n, p in transformer.named_parameters() if p.requires_grad}
    assert trainable and all(".lora_" in n or is_sama_module(n) for n in trainable)
    assert any(n.startswith("blocks.0.ffn.net.2.lora_A") for n in trainable)
    assert any(n.startswith("semantic_head.") for n in trainable)
    assert set(trainer.ema.names) == trainable
    assert {id(p) for p in trainer.params} == {
        id(p) for n, p in transformer.named_parameters() if n in trainable
    }
    frozen = {n: p.detach().clone() for n, p in transformer.named_parameters() if n not in trainable}
    lora_b = {n: p.detach().clone() for n, p in transformer.named_parameters() if ".lora_B." in n}
    for _ in range(3):
        trainer.train_step()
    for name, value in transformer.named_parameters():
        if name in frozen:
            assert torch.equal(value, frozen[name]), name
    assert any(not torch.equal(dict(transformer.named_parameters())[n], v) for n, v in lora_b.items())

    adapter_dir = str(tmp_path / "adapter")
    trainer.export(adapter_dir)
    manifest = json.loads(open(os.path.join(adapter_dir, MANIFEST_FILE)).read())
    assert manifest["base"] == base_export and manifest["rank"] == 4
    assert os.path.isfile(os.path.join(adapter_dir, "adapter_model.safetensors"))
    assert os.path.isfile(os.path.join(adapter_dir, "adapter_config.json"))
    trainer.cfg.model.lora_export = "merged"
    merged_dir = str(tmp_path / "merged")
    trainer.export(merged_dir)
    merged = SamaEditPipeline.from_pretrained(merged_dir)
    assert not any(".lora_" in k or "base_layer" in k for k in merged.transformer.state_dict())

    # The base + the adapter is the merged export; both differ from the base.
    applied = SamaEditPipeline.from_pretrained(base_export)
    applied.load_lora(adapter_dir)
    base = SamaEditPipeline.from_pretrained(base_export).transformer.state_dict()
    merged_state = merged.transformer.state_dict()
    assert set(applied.transformer.state_dict()) == set(merged_state)
    for key, value in applied.transformer.state_dict().items():
        torch.testing.assert_close(value, merged_state[key], rtol=1e-5, atol=1e-6, msg=key)
    assert any(not torch.equal(base[k], merged_state[k]) for k in base if ".attn1.to_q." in k)

    # Edits (latents, at the source's own 32x32: run_edit would resize to a 480p bucket).
    frames = synthetic.render(synthetic.random_scene(3), 5, 8.0, 32, 32)
    pipelines = {
        "base": SamaEditPipeline.from_pretrained(base_export),
        "lora": applied,
        "merged": merged,
    }
    edits = {
        name: pipe(
            frames, "make it red", num_inference_steps=2, guidance_scale=1.0, seed=0, output_type="latent"
        ).latents
        for name, pipe in pipelines.items()
    }
    assert not torch.allclose(edits["lora"], edits["base"])
    torch.testing.assert_close(edits["lora"], edits["merged"], rtol=1e-4, atol=1e-5)

    # `sama edit --model BASE --lora ADAPTER` edits a video file differently from the base alone.
    from sama import video
    from sama.cli import main

    source = str(tmp_path / "source.mp4")
    with open(source, "wb") as handle:
        handle.write(video.encode_mp4(synthetic.render(synthetic.random_scene(4), 9, 8.0, 48, 64), 8.0))
    common = ["edit", "--video", source, "--instruction", "make it red", "--model", base_export]
    common += ["--steps", "2", "--cfg", "1"]
    assert main([*common, "--output", str(tmp_path / "base.mp4")]) == 0
    assert main([*common, "--lora", adapter_dir, "--output", str(tmp_path / "lora.mp4")]) == 0
    base_frames = video.decode_clip(str(tmp_path / "base.mp4"))
    lora_frames = video.decode_clip(str(tmp_path / "lora.mp4"))
    assert base_frames.shape == lora_frames.shape == (9, 48, 64, 3)
    assert np.abs(base_frames.astype(int) - lora_frames.astype(int)).mean() > 0.5


def test_lora_section_validates():
    with pytest.raises(ValueError, match="rank"):
        LoraSection(rank=-1).validate()
    with pytest.raises(ValueError, match="dropout"):
        LoraSection(rank=2, dropout=1.5).validate()
    from sama.models.lora import apply_lora
    from sama.models.presets import build_model

    with pytest.raises(ValueError, match="not found|match no linear"):
        apply_lora(build_model("tiny").transformer, LoraSection(rank=2, target_modules=["nothing_here"]))
