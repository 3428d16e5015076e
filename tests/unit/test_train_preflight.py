"""The checks `sama train` runs on its driver (sama.train.preflight), without Ray or a cluster."""

from __future__ import annotations

import json
import os

import pytest

from sama import config, storage
from sama.models.presets import get_preset
from sama.pipeline_edit import PIPELINE_FILE, PIPELINE_FORMAT, PIPELINE_FORMAT_VERSION
from sama.preflight import CheckFailed
from sama.schema import ShardConfig, ShardWriter
from sama.train import preflight
from sama.train.recipes import recipe_path
from sama.train.trainer import TrainConfig
from tests.unit.test_train_data import _sample


def _cfg(*overrides: str) -> TrainConfig:
    return config.load(TrainConfig, recipe_path("debug"), list(overrides))


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    """A prefix of video-edit shards and one of image-edit shards."""
    root = tmp_path_factory.mktemp("preflight-shards")
    for media, kind in (("video", "video_edit"), ("image", "image_edit")):
        with ShardWriter(str(root / media), "part", ShardConfig(max_samples=2)) as writer:
            for index in range(3):
                writer.write(_sample(index, kind)[0])
    return root


def test_shards_of_the_declared_media_pass(shards):
    found = preflight.check_shards(str(shards / "video"), "video", "data.sources[0].uri")
    assert found == "2 shard(s); first sample video_edit (video, schema v1)"


def test_a_source_without_shards_names_its_uri_and_how_to_fix_it(tmp_path):
    missing = str(tmp_path / "pretext" / "shards" / "video")
    with pytest.raises(CheckFailed) as caught:
        preflight.check_shards(missing, "video", "data.sources[0].uri")
    assert caught.value.found == f"no shards (*.tar) under {missing}"
    assert "data.sources[0].uri" in caught.value.fix and "sama prep-pretext" in caught.value.fix


def test_a_source_of_the_other_media_is_refused(shards):
    with pytest.raises(CheckFailed, match="holds image samples .* declares media='video'") as caught:
        preflight.check_shards(str(shards / "image"), "video", "data.sources[1].uri")
    assert "shards/video" in caught.value.fix


def test_a_shard_that_does_not_read_is_reported(tmp_path):
    (tmp_path / "part-000000.tar").write_bytes(b"not a tar at all" * 64)
    with pytest.raises(CheckFailed, match="first sample of .*part-000000.tar does not read"):
        preflight.check_shards(str(tmp_path), None, "data.val_uri")


def _export(root, preset: str = "tiny", components=("transformer", "vae")) -> str:
    """A directory with a SAMA export manifest (no weights: preflight never loads them)."""
    os.makedirs(root, exist_ok=True)
    model = get_preset(preset).to_dict()
    manifest = {
        "format": PIPELINE_FORMAT,
        "format_version": PIPELINE_FORMAT_VERSION,
        "model": model,
        "pipeline": {},
        "components": {name: {"path": name} for name in components},
    }
    for name in components:
        os.makedirs(os.path.join(root, name), exist_ok=True)
    with open(os.path.join(root, PIPELINE_FILE), "w") as handle:
        json.dump(manifest, handle)
    return str(root)


def test_init_from_export_of_the_preset_passes(tmp_path):
    export = _export(tmp_path / "export")
    assert (
        preflight.check_model(_cfg(f"model.init_from={export}"))
        == f"SAMA export of a 'tiny' model at {export}"
    )


def test_a_missing_init_from_export_is_named(tmp_path):
    missing = str(tmp_path / "runs" / "stage0" / "export")
    with pytest.raises(CheckFailed, match=f"model.init_from {missing} does not exist: not a SAMA export"):
        preflight.check_model(_cfg(f"model.init_from={missing}"))
    (tmp_path / "not-an-export").mkdir()
    with pytest.raises(CheckFailed, match=f"has no {PIPELINE_FILE}"):
        preflight.check_model(_cfg(f"model.init_from={tmp_path / 'not-an-export'}"))


def test_an_export_of_another_preset_or_missing_a_component_is_refused(tmp_path):
    export = _export(tmp_path / "export")
    with pytest.raises(CheckFailed, match="is a 'tiny' model; the recipe says model.preset='wan2.1-1.3b'"):
        preflight.check_model(_cfg(f"model.init_from={export}", "model.preset=wan2.1-1.3b"))
    os.rmdir(os.path.join(export, "vae"))
    with pytest.raises(CheckFailed, match=r"the vae directory \(vae\) is missing"):
        preflight.check_model(_cfg(f"model.init_from={export}"))


def _wan_dir(root, **changes) -> str:
    """A Wan diffusers layout with the config.json files (no weights) the tiny preset loads: the
    transformer's (the tiny architecture, with ``changes``) and the text encoder's."""
    model = get_preset("tiny")
    kwargs = {**model.transformer.wan_kwargs(), **changes}
    kwargs["patch_size"] = list(kwargs["patch_size"])
    for component, content in (("transformer", kwargs), ("text_encoder", {})):
        os.makedirs(os.path.join(root, component), exist_ok=True)
        with open(os.path.join(root, component, "config.json"), "w") as handle:
            json.dump(content, handle)
    return str(root)


def test_pretrained_weights_must_match_the_preset(tmp_path):
    good = _wan_dir(tmp_path / "good")
    found = preflight.check_model(_cfg(f"model.pretrained={good}"))
    assert found == f"'tiny' preset (2 layers, width 192): transformer from {good}, text from {good}"
    bad = _wan_dir(tmp_path / "bad", num_layers=30)
    with pytest.raises(CheckFailed, match="num_layers: config 2 vs checkpoint 30"):
        preflight.check_model(_cfg(f"model.pretrained={bad}"))
    with pytest.raises(CheckFailed, match="has no transformer/config.json"):
        preflight.check_model(_cfg(f"model.pretrained={tmp_path}"))
    with pytest.raises(CheckFailed, match="neither a local directory nor a hub id"):
        preflight.check_model(_cfg(f"model.pretrained={tmp_path / 'nowhere'}"))


def test_an_existing_run_needs_resume_and_resume_needs_a_checkpoint(tmp_path):
    cfg = _cfg(f"run.storage_uri={tmp_path}", "run.name=r1")
    assert preflight.check_run(cfg, resume=False) == f"new run 'r1' in {tmp_path}/r1"
    with pytest.raises(CheckFailed, match="has no checkpoint") as caught:
        preflight.check_run(cfg, resume=True)
    assert "drop --resume" in caught.value.fix
    snapshot = {"latest_checkpoint_result": {"checkpoint_dir_name": "checkpoint_2026"}}
    storage.write_text(f"{tmp_path}/r1/checkpoint_manager_snapshot.json", json.dumps(snapshot))
    with pytest.raises(CheckFailed, match="already has checkpoints") as caught:
        preflight.check_run(cfg, resume=False)
    assert caught.value.fix.startswith("pass --resume")
    # Registered but never committed (no state.json): no usable checkpoint.
    with pytest.raises(CheckFailed, match="no usable checkpoint.*checkpoint_2026.*no state.json"):
        preflight.check_run(cfg, resume=True)
    _write_checkpoint(f"{tmp_path}/r1/checkpoint_2026", cfg)
    assert preflight.check_run(cfg, resume=True) == "resuming 'r1' from checkpoint_2026"


def _write_checkpoint(directory: str, cfg: TrainConfig) -> None:
    import torch

    from sama.train import checkpoint as ckpt
    from sama.train.ema import EMA
    from sama.train.trainer import resolve_train_config

    model = torch.nn.Linear(2, 2)
    optimizer = torch.optim.AdamW(model.parameters())
    text = config.dumps(resolve_train_config(cfg))
    ckpt.save_trainable(directory, model, optimizer, EMA(model), ckpt.TrainState(step=1), config_text=text)


def test_a_resume_that_changes_the_optimizer_fails_unless_allowed(tmp_path):
    cfg = _cfg(f"run.storage_uri={tmp_path}", "run.name=r2")
    _write_checkpoint(f"{tmp_path}/r2/checkpoint_1", cfg)
    snapshot = {"latest_checkpoint_result": {"checkpoint_dir_name": "checkpoint_1"}}
    storage.write_text(f"{tmp_path}/r2/checkpoint_manager_snapshot.json", json.dumps(snapshot))
    # Workers, cadences and max_steps may change.
    same = _cfg(f"run.storage_uri={tmp_path}", "run.name=r2", "scaling.num_workers=1", "max_steps=999")
    assert preflight.check_run(same, resume=True) == "resuming 'r2' from checkpoint_1"
    changed = _cfg(f"run.storage_uri={tmp_path}", "run.name=r2", "optim.lr=0.5", "data.video_batch_size=7")
    with pytest.raises(CheckFailed, match="optim.lr: 0.002 -> 0.5") as caught:
        preflight.check_run(changed, resume=True)
    assert "data.video_batch_size: 2 -> 7" in caught.value.found
    assert "--allow-config-change" in caught.value.fix
    found = preflight.check_run(changed, resume=True, allow_config_change=True)
    assert found == "resuming 'r2' from checkpoint_1, with changed data.video_batch_size, optim.lr"


def test_an_invalid_config_is_a_failed_check():
    cfg = _cfg()
    cfg.stage = 1  # as a config built in code, not loaded (loading validates already)
    with pytest.raises(CheckFailed, match="set model.init_from"):
        preflight.check_config(cfg)
    cfg = _cfg()
    cfg.model.preset = "wan9"
    with pytest.raises(CheckFailed, match="wan9"):
        preflight.check_config(cfg)
    assert preflight.check_config(_cfg()).startswith("stage 0, 360 steps, 2 source(s) (image, video)")


CPU_NODE = {"CPU": 2.0, "memory": 16 * 2**30}
GPU_NODE = {"CPU": 64.0, "GPU": 8.0, "memory": 512 * 2**30, "accelerator_type:H100": 1.0}


def test_a_gpu_recipe_on_a_cpu_cluster_fails_naming_the_gpus():
    cfg = _cfg("scaling.use_gpu=true", "scaling.num_workers=8", "scaling.cpus_per_worker=8")
    with pytest.raises(CheckFailed) as caught:
        preflight.cluster_verdict(cfg, [CPU_NODE], None)
    assert "each worker needs 1 GPU and the cluster has 0 GPUs" in caught.value.found
    assert "no node has that much (largest: CPU 2)" in caught.value.found
    assert "scaling.use_gpu=false" in caught.value.fix


def test_nodes_and_autoscaler_node_types_decide_what_can_be_placed():
    cfg = _cfg("scaling.use_gpu=true", "scaling.num_workers=16", "scaling.cpus_per_worker=8")
    # Two GPU nodes hold 16 workers (8 GPUs and 64 CPUs each).
    assert "can place them" in preflight.cluster_verdict(cfg, [GPU_NODE, GPU_NODE, CPU_NODE], None)
    with pytest.raises(CheckFailed, match="no autoscaler node types reported"):
        preflight.cluster_verdict(cfg, [GPU_NODE, CPU_NODE], None)
    # An autoscaler that may add up to two GPU nodes: the run waits for them.
    found = preflight.cluster_verdict(cfg, [CPU_NODE], [("gpu", GPU_NODE, 2)])
    assert "the nodes hold 0 now, the autoscaler can add the rest" in found
    with pytest.raises(CheckFailed, match=r"node types: gpu x1"):
        preflight.cluster_verdict(cfg, [CPU_NODE], [("gpu", GPU_NODE, 1)])
    assert "autoscaler can add" in preflight.cluster_verdict(cfg, [CPU_NODE], [("gpu", GPU_NODE, -1)])


def test_an_accelerator_type_no_node_has_is_named():
    cfg = _cfg("scaling.use_gpu=true", "scaling.accelerator_type=H200", "scaling.num_workers=1")
    with pytest.raises(CheckFailed, match="no node has accelerator type 'H200'"):
        preflight.cluster_verdict(cfg, [GPU_NODE], None)
    h100 = _cfg("scaling.use_gpu=true", "scaling.accelerator_type=H100", "scaling.num_workers=8")
    assert "can place them" in preflight.cluster_verdict(h100, [GPU_NODE], None)


def test_memory_per_worker_is_placed_per_node():
    cfg = _cfg("scaling.num_workers=2", "scaling.cpus_per_worker=1", "scaling.memory_per_worker_gb=12")
    with pytest.raises(CheckFailed, match=r"2 worker\(s\) x \{CPU 1, memory 12.0 GiB\}"):
        preflight.cluster_verdict(cfg, [CPU_NODE], None)
    assert "can place them" in preflight.cluster_verdict(cfg, [CPU_NODE, CPU_NODE], None)


def test_check_precomputed_compares_the_latents_encoders_with_the_runs(tmp_path):
    """A latent source made by the run's encoders passes, one made by others fails naming the
    source and the differing field; media shards are not concerned."""
    from sama import schema
    from sama.train.trainer import frozen_encoder_identity, resolve_model_config

    cfg = config.load(TrainConfig, recipe_path("debug"), [])
    key = "data.sources[0].uri"
    assert preflight.check_precomputed(cfg, "clips", str(tmp_path / "media" / "shards" / "video"), key) == ""
    identity = frozen_encoder_identity(cfg.model, resolve_model_config(cfg.model))
    schema.write_latent_info(
        str(tmp_path / "good"), schema.LatentOutputInfo(encoders=identity, dtype="bfloat16"), []
    )
    found = preflight.check_precomputed(cfg, "clips", str(tmp_path / "good" / "shards" / "video"), key)
    assert "precomputed (bfloat16) by this run's encoders" in found
    other = {**identity, "text_encoder": {**identity["text_encoder"], "weights": "someone/else"}}
    schema.write_latent_info(
        str(tmp_path / "bad"), schema.LatentOutputInfo(encoders=other, dtype="float32"), []
    )
    with pytest.raises(CheckFailed, match=r"'clips'.*text_encoder: weights 'someone/else'"):
        preflight.check_precomputed(cfg, "clips", str(tmp_path / "bad" / "shards" / "video"), key)
