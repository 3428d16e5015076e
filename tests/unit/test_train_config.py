"""Training configuration: the recipes in configs/, validation, and how the model config is resolved."""

from __future__ import annotations

import dataclasses
import os

import pytest
import yaml

from sama import config as config_lib
from sama import storage
from sama.config import ConfigError
from sama.train import recipes
from sama.train.trainer import ModelSection, TrainConfig, resolve_model_config

FULL_SCALE = ["pretrain", "sft", "pretrain_1.3b", "sft_1.3b"]
# (stage-0 recipe, the stage-1 recipe that starts from its export)
STAGE_PAIRS = [("pretrain", "sft"), ("pretrain_1.3b", "sft_1.3b"), ("debug", "debug_sft")]


def _load(recipe: str, overrides=()) -> TrainConfig:
    return config_lib.load(TrainConfig, recipes.recipe_path(recipe), list(overrides))


def test_the_shipped_recipes_are_available():
    names = recipes.available()
    assert set(FULL_SCALE) | {"debug", "debug_sft"} <= set(names)
    assert names == sorted(names)
    for name in names:
        assert os.path.isfile(os.path.join(recipes.CONFIG_DIR, f"train_{name}.toml"))


@pytest.mark.parametrize("recipe", recipes.available())
def test_every_recipe_loads_validates_and_survives_the_trip_to_the_workers(recipe):
    cfg = _load(recipe)
    cfg.validate()
    assert cfg.stage in (0, 1)
    assert cfg.objective.semantic is True  # Semantic Anchoring in both stages
    assert cfg.objective.loss.semantic_weight == pytest.approx(0.1)  # lambda = 0.1
    # launch.run_training sends to_dict(cfg) to every Ray Train worker, which rebuilds it.
    assert config_lib.from_dict(TrainConfig, config_lib.to_dict(cfg)) == cfg
    # The resolved config logged to MLflow reads back into the same config.
    assert config_lib.from_dict(TrainConfig, yaml.safe_load(config_lib.dumps(cfg))) == cfg
    # The named preset exists; a stage-0 recipe resolves its model config without any download.
    from sama.models.presets import get_preset

    assert get_preset(cfg.model.preset).preset == cfg.model.preset
    if not cfg.model.init_from:
        model = resolve_model_config(cfg.model)
        assert model.preset == cfg.model.preset
        assert model.pretrained == cfg.model.pretrained


@pytest.mark.parametrize("recipe", FULL_SCALE)
def test_full_scale_recipes_match_the_paper(recipe):
    cfg = _load(recipe)
    workers = cfg.scaling.num_workers
    assert cfg.data.video_batch_size * cfg.grad_accum * workers == 112
    assert cfg.data.image_batch_size * cfg.grad_accum * workers == 448
    assert cfg.optim.lr == pytest.approx(2e-5)
    assert cfg.ema_decay == pytest.approx(0.9998)
    assert cfg.optim.weight_decay == pytest.approx(0.01)
    assert cfg.optim.warmup_frac == pytest.approx(0.1)
    assert cfg.parallel.mixed_precision == "bf16"
    assert cfg.scaling.use_gpu is True
    assert cfg.model.preset.startswith("wan2.1-")
    medias = {s.media for s in cfg.data.sources}
    assert medias == {"video", "image"}  # image and video batches interleaved


@pytest.mark.parametrize(("stage0", "stage1"), STAGE_PAIRS)
def test_stage_one_starts_from_the_export_of_its_stage_zero(stage0, stage1):
    from sama.train.trainer import EXPORT_DIR, run_uri

    pre, sft = _load(stage0), _load(stage1)
    assert (pre.stage, sft.stage) == (0, 1)
    assert sft.model.init_from == storage.join(run_uri(pre), EXPORT_DIR)
    assert sft.model.preset == pre.model.preset
    assert sft.run.name != pre.run.name
    # Stage 0 trains on raw-video pretext clips (motion alignment); stage 1 on paired edits only.
    assert any("pretext" in s.uri and s.media == "video" for s in pre.data.sources)
    assert not any("pretext" in s.uri for s in sft.data.sources)


def test_debug_recipe_is_two_cpu_workers_with_the_tiny_model():
    cfg = _load("debug")
    assert cfg.scaling.num_workers == 2
    assert cfg.scaling.use_gpu is False
    assert cfg.model.preset == "tiny"
    assert cfg.model.pretrained is None and cfg.model.init_from is None
    assert cfg.parallel.mixed_precision == "fp32"
    model = resolve_model_config(cfg.model)
    assert model.preset == "tiny" and model.transformer.num_layers == 2


def test_unknown_recipe_lists_the_available_ones():
    with pytest.raises(ConfigError, match="unknown recipe 'no-such-recipe'") as info:
        recipes.recipe_path("no-such-recipe")
    for name in recipes.available():
        assert name in str(info.value)


def test_a_recipe_may_be_a_file(tmp_path):
    path = tmp_path / "mine.toml"
    path.write_text('stage = 0\nmax_steps = 7\n[[data.sources]]\nname = "a"\nuri = "x"\n')
    assert recipes.recipe_path(str(path)) == str(path)
    cfg = config_lib.load(TrainConfig, recipes.recipe_path(str(path)))
    assert cfg.max_steps == 7 and cfg.data.sources[0].media == "video"


def test_stage_one_without_init_from_fails_validation():
    with pytest.raises(ConfigError, match="model.init_from"):
        _load("sft", ["model.init_from=none"])
    with pytest.raises(ConfigError, match="model.init_from"):
        _load("debug", ["stage=1"])
    assert _load("debug", ["stage=1", "model.init_from=/some/export"]).stage == 1


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("stage=2", "stage must be 0"),
        ("grad_accum=0", ">= 1"),
        ("max_steps=0", ">= 1"),
        ("ema_decay=1.0", "ema_decay"),
        ("scaling.num_workers=0", "num_workers"),
        ("optim.lr=0", "optim.lr"),
        ("optim.warmup_frac=1.0", "warmup_frac"),
        ("data.video_batch_size=0", "batch_size"),
        ("data.sources=[]", "at least one source"),
        ('data.sources=[{"name": "a", "uri": "x"}, {"name": "a", "uri": "y"}]', "unique"),
        ('data.sources=[{"name": "a", "uri": "x", "weight": 0}]', "weight must be positive"),
        ('data.sources=[{"name": "a", "uri": ""}]', "uri is empty"),
        ("objective.text_dropout_prob=1.5", "text_dropout_prob"),
    ],
)
def test_invalid_settings_are_config_errors(override, message):
    with pytest.raises(ConfigError, match=message):
        _load("debug", [override])


@pytest.mark.parametrize("override", ["checkpoint.every_steps=0", "validation.every_steps=0"])
def test_zero_intervals_are_config_errors(override):
    with pytest.raises(ConfigError, match="every_steps"):
        _load("debug", [override])


def test_unknown_key_is_named():
    with pytest.raises(ConfigError, match=r"optim\.learning_rate"):
        _load("debug", ["optim.learning_rate=1"])


# ----------------------------------------------------------------------------------------------
# resolve_model_config


@pytest.mark.parametrize(
    "overrides",
    [{"transformer.num_layers": 1}, {"transformer": {"num_layers": 1}}],
)
def test_model_overrides_apply_to_the_preset(overrides):
    model = resolve_model_config(ModelSection(preset="tiny", overrides=overrides))
    assert model.transformer.num_layers == 1
    assert model.transformer.num_attention_heads == 3  # the rest of the preset is kept


def test_model_overrides_from_a_recipe_override():
    cfg = _load(
        "debug", ['model.overrides={"transformer.num_layers": 1, "transformer.patch_size": [1, 2, 2]}']
    )
    model = resolve_model_config(cfg.model)
    assert model.transformer.num_layers == 1
    assert tuple(model.transformer.patch_size) == (1, 2, 2)


def test_model_pretrained_is_recorded_without_loading():
    model = resolve_model_config(ModelSection(preset="wan2.1-1.3b", pretrained="/weights/wan"))
    assert model.pretrained == "/weights/wan"
    assert model.transformer.num_layers == 30 and model.transformer.num_attention_heads == 12


def test_bad_model_overrides_are_errors():
    with pytest.raises(ConfigError, match="transformer.no_such_field"):
        resolve_model_config(ModelSection(preset="tiny", overrides={"transformer.no_such_field": 1}))
    # A well-typed override that breaks the model (the tiny autoencoder makes 48 channels).
    with pytest.raises(ValueError, match="in_channels"):
        resolve_model_config(
            ModelSection(
                preset="tiny", overrides={"transformer.in_channels": 16, "transformer.out_channels": 16}
            )
        )
    with pytest.raises(ValueError, match="unknown model preset"):
        resolve_model_config(ModelSection(preset="huge"))


@pytest.fixture(scope="module")
def tiny_export(tmp_path_factory):
    """A SAMA export of a one-layer tiny model (what stage 0 leaves for stage 1)."""
    torch = pytest.importorskip("torch")
    from sama.models.presets import build_model, get_preset
    from sama.pipeline_edit import SamaEditPipeline

    model_config = get_preset("tiny")
    model_config.transformer.num_layers = 1
    torch.manual_seed(0)
    directory = str(tmp_path_factory.mktemp("export"))
    SamaEditPipeline.from_components(build_model(model_config)).save_pretrained(directory)
    return directory


def test_init_from_reads_the_model_config_of_the_export(tiny_export):
    # The preset named in the recipe is not what decides: the export's own config is.
    model = resolve_model_config(ModelSection(preset="wan2.1-14b", init_from=tiny_export))
    assert model.preset == "tiny"
    assert model.transformer.num_layers == 1
    assert model.transformer.num_attention_heads * model.transformer.attention_head_dim == 192
    # Overrides still apply on top of the export's config.
    again = resolve_model_config(
        ModelSection(init_from=tiny_export, overrides={"semantic.num_anchors": 2, "torch_dtype": "float32"})
    )
    assert again.semantic.num_anchors == 2 and again.transformer.num_layers == 1


def test_init_from_a_directory_that_is_no_export(tmp_path):
    from sama.pipeline_edit import ModelDirectoryError

    with pytest.raises(
        ModelDirectoryError, match="model.init_from .*: not a SAMA model directory: sama_pipeline.json"
    ):
        resolve_model_config(ModelSection(init_from=str(tmp_path)))


def test_stage_one_recipe_with_a_local_export(tiny_export):
    cfg = _load("debug_sft", [f"model.init_from={tiny_export}"])
    model = resolve_model_config(cfg.model)
    assert model.transformer.num_layers == 1
    assert dataclasses.asdict(model)["preset"] == "tiny"


def test_components_from_export_hold_the_exports_weights_whatever_the_tokenizer(tiny_export, tmp_path):
    torch = pytest.importorskip("torch")
    import json
    import shutil

    from sama.pipeline_edit import PIPELINE_FILE, SamaEditPipeline
    from sama.train.trainer import components_from_export, without_weight_sources

    # A Wan preset's export names the "auto" tokenizer: nothing can be built from the config alone
    # (no weights), so the components must come from the export's own directories.
    export = str(tmp_path / "export")
    shutil.copytree(tiny_export, export)
    manifest_path = f"{export}/{PIPELINE_FILE}"
    with open(manifest_path) as handle:
        manifest = json.load(handle)
    manifest["model"]["text"]["tokenizer"] = "auto"
    with open(manifest_path, "w") as handle:
        json.dump(manifest, handle)
    model_config = without_weight_sources(resolve_model_config(ModelSection(init_from=export)))
    components = components_from_export(export, model_config)
    reference = SamaEditPipeline.from_pretrained(tiny_export)
    got = components.transformer.state_dict()
    for key, value in reference.transformer.state_dict().items():
        assert torch.equal(got[key], value), key
    assert not any(p.is_meta for p in components.transformer.parameters())
    assert (
        components.text_encoder.encode(["make it red"]).shape
        == reference.text_encoder.encode(["make it red"]).shape
    )
    assert components.semantic_encoder is not None
    # An override that changes the architecture does not fit the export: named, not half-loaded.
    wider = ModelSection(init_from=export, overrides={"transformer.ffn_dim": 512})
    with pytest.raises(ValueError, match="ffn_dim"):
        components_from_export(export, without_weight_sources(resolve_model_config(wider)))


def test_init_from_in_bf16_keeps_wans_float32_modules(tiny_export):
    """A bf16 start from an export is what ``from_pretrained(torch_dtype=bf16)`` would give: the
    modules Wan keeps in float32 (norms, time embedder, modulation tables) stay float32, the rest
    is bf16, and no diffusers warning about casting them is logged."""
    import dataclasses
    import logging

    import torch

    from sama.train.trainer import components_from_export

    model_config = dataclasses.replace(
        resolve_model_config(ModelSection(preset="tiny", init_from=tiny_export)), torch_dtype="bfloat16"
    )
    records: list[logging.LogRecord] = []
    handler = logging.Handler()
    handler.emit = records.append
    diffusers_logger = logging.getLogger("diffusers")
    diffusers_logger.addHandler(handler)
    try:
        components = components_from_export(tiny_export, model_config, with_encoders=False)
    finally:
        diffusers_logger.removeHandler(handler)
    transformer = components.transformer
    dtypes = {name: p.dtype for name, p in transformer.named_parameters()}
    kept = transformer._keep_in_fp32_modules
    assert kept, "the transformer declares no float32 modules"
    in_kept = [n for n in dtypes if any(part in kept for part in n.split("."))]
    assert in_kept and all(dtypes[n] == torch.float32 for n in in_kept), {n: dtypes[n] for n in in_kept}
    assert any(dtype == torch.bfloat16 for dtype in dtypes.values())
    assert not [r for r in records if "should be kept in float32" in r.getMessage()]
