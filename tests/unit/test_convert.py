"""``sama convert``: official SAMA / original-format Wan checkpoints -> a SAMA export, bit-exact.

The checkpoints here are written under the ORIGINAL key names with inverse tables stated literally
below (diffusers name -> Wan / DiffSynth name), not with :mod:`sama.models.convert`'s own tables, so
a wrong entry in either shows up as a failed round trip.
"""

from __future__ import annotations

import dataclasses
import json
import os
import re

import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("diffusers")
pytest.importorskip("transformers")
pytest.importorskip("safetensors")

from safetensors.torch import save_file  # noqa: E402

from sama import cli  # noqa: E402
from sama.models.config import AutoencoderConfig  # noqa: E402
from sama.models.convert import ConversionError, convert, plan_checkpoint  # noqa: E402
from sama.models.presets import build_model, build_transformer, get_preset  # noqa: E402
from sama.pipeline_edit import PIPELINE_FILE, SamaEditPipeline  # noqa: E402

# ---- inverse tables (diffusers / SAMA name -> the release's name) ------------------------------

BLOCK_TO_ORIGINAL = {
    "attn1.to_q.": "self_attn.q.",
    "attn1.to_k.": "self_attn.k.",
    "attn1.to_v.": "self_attn.v.",
    "attn1.to_out.0.": "self_attn.o.",
    "attn1.norm_q.": "self_attn.norm_q.",
    "attn1.norm_k.": "self_attn.norm_k.",
    "attn2.to_q.": "cross_attn.q.",
    "attn2.to_k.": "cross_attn.k.",
    "attn2.to_v.": "cross_attn.v.",
    "attn2.to_out.0.": "cross_attn.o.",
    "attn2.norm_q.": "cross_attn.norm_q.",
    "attn2.norm_k.": "cross_attn.norm_k.",
    "norm2.": "norm3.",
    "ffn.net.0.proj.": "ffn.0.",
    "ffn.net.2.": "ffn.2.",
}
TOP_TO_ORIGINAL = {
    "patch_embedding.": "patch_embedding.",
    "condition_embedder.text_embedder.linear_1.": "text_embedding.0.",
    "condition_embedder.text_embedder.linear_2.": "text_embedding.2.",
    "condition_embedder.time_embedder.linear_1.": "time_embedding.0.",
    "condition_embedder.time_embedder.linear_2.": "time_embedding.2.",
    "condition_embedder.time_proj.": "time_projection.1.",
    "proj_out.": "head.head.",
}
SAMA_TO_ORIGINAL = {
    "type_embedding.": "segment_embedding.",
    "semantic_projector.": "siglip_feat_mlp.",
    "semantic_head.": "semantic_head.",
}


def to_original(key: str) -> str:
    match = re.match(r"blocks\.(\d+)\.(.+)", key)
    if match:
        index, rest = match.groups()
        if rest == "scale_shift_table":
            return f"blocks.{index}.modulation"
        for new, old in BLOCK_TO_ORIGINAL.items():
            if rest.startswith(new):
                return f"blocks.{index}.{old}{rest[len(new) :]}"
        raise AssertionError(f"no original name for {key}")
    if key == "scale_shift_table":
        return "head.modulation"
    for new, old in {**TOP_TO_ORIGINAL, **SAMA_TO_ORIGINAL}.items():
        if key.startswith(new):
            return old + key[len(new) :]
    raise AssertionError(f"no original name for {key}")


def is_sama(key: str) -> bool:
    return key.startswith(tuple(SAMA_TO_ORIGINAL))


def original_state(model, *, prefix: str = "", sama: bool = True) -> dict[str, torch.Tensor]:
    return {
        prefix + to_original(k): v.detach().clone().contiguous()
        for k, v in model.state_dict().items()
        if sama or not is_sama(k)
    }


def write_checkpoint(state: dict[str, torch.Tensor], path: str, shards: int = 1, index: bool = True) -> str:
    """One .safetensors file (shards=1) or a directory of shards, with or without an index."""
    if shards == 1:
        save_file(state, path)
        return path
    os.makedirs(path)
    keys = sorted(state)
    weight_map = {}
    for shard in range(shards):
        name = f"model-{shard + 1:05d}-of-{shards:05d}.safetensors"
        part = keys[shard::shards]
        save_file({k: state[k] for k in part}, os.path.join(path, name))
        weight_map.update(dict.fromkeys(part, name))
    if index:
        with open(os.path.join(path, "model.safetensors.index.json"), "w") as handle:
            json.dump({"metadata": {}, "weight_map": weight_map}, handle)
    return path


# ---- fixtures -------------------------------------------------------------------------------------


def tiny_transformer(seed: int = 0):
    torch.manual_seed(seed)
    model = build_transformer(get_preset("tiny"), load_weights=False)
    with torch.no_grad():
        # Zero at init; a trained model's is not, so make it count.
        model.type_embedding.weight.normal_(0.0, 0.5)
    return model.eval()


@pytest.fixture(scope="module")
def source_model():
    return tiny_transformer()


@pytest.fixture(scope="module")
def base_export(tmp_path_factory) -> str:
    """A SAMA export of the tiny model (a different random transformer than the checkpoint's)."""
    torch.manual_seed(123)
    directory = str(tmp_path_factory.mktemp("base") / "export")
    SamaEditPipeline.from_components(build_model("tiny", with_semantic_encoder=False)).save_pretrained(
        directory
    )
    return directory


def forward(model, seed: int = 7):
    generator = torch.Generator().manual_seed(seed)
    latents = torch.randn(1, 48, 2, 4, 4, generator=generator)
    source = torch.randn(1, 48, 2, 4, 4, generator=generator)
    text = torch.randn(1, 8, 32, generator=generator)
    semantic = torch.randn(1, 65, 32, generator=generator)
    with torch.no_grad():
        return model(
            hidden_states=latents,
            timestep=torch.tensor([500.0]),
            encoder_hidden_states=text,
            source_latents=source,
            semantic_tokens=semantic,
        )


def as_authors(model):
    """The same weights under the authors' parity profile (null semantic RoPE, LayerNorm eps 1e-6):
    what a converted official checkpoint is (sama.models.parity)."""
    config = dataclasses.replace(get_preset("tiny"), parity="authors").resolved()
    reference = build_transformer(config, load_weights=False)
    reference.load_state_dict(model.state_dict())
    return reference.eval()


def assert_same_weights(model, reference, skip=()):
    ours, theirs = model.state_dict(), reference.state_dict()
    assert set(ours) == set(theirs)
    for key, value in theirs.items():
        if key.startswith(tuple(skip)):
            continue
        assert ours[key].dtype == value.dtype, key
        assert torch.equal(ours[key], value), key


def manifest(directory: str) -> dict:
    with open(os.path.join(directory, PIPELINE_FILE)) as handle:
        return json.load(handle)


def leftovers(parent) -> list[str]:
    return [n for n in os.listdir(parent) if ".convert-" in n or ".old-" in n]


# ---- official layout --------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("prefix", "shards", "index"),
    [("pipe.dit.", 1, False), ("", 2, True), ("dit.", 2, False)],
    ids=["pipe.dit-single", "bare-sharded-index", "dit-sharded-no-index"],
)
def test_official_checkpoint_converts_bit_exact(source_model, base_export, tmp_path, prefix, shards, index):
    name = "sama.safetensors" if shards == 1 else "sama_ckpt"
    checkpoint = write_checkpoint(
        original_state(source_model, prefix=prefix), str(tmp_path / name), shards=shards, index=index
    )
    output = str(tmp_path / "converted")
    report = convert(checkpoint, base_export, output, dtype="float32")

    assert report.parity == "authors" and report.converted_from["layout"] == "sama-official"
    assert report.converted_from["key_prefix"] == prefix and report.converted_from["files"] == shards
    assert report.converted_from["keys"] == len(source_model.state_dict())
    pipeline = SamaEditPipeline.from_pretrained(output)
    assert_same_weights(pipeline.transformer, source_model)
    assert pipeline.transformer.config.semantic_rope == "null"
    assert pipeline.transformer.semantic_head.norm.eps == 1e-6
    expected, got = forward(as_authors(source_model)), forward(pipeline.transformer.eval())
    assert torch.equal(got.sample, expected.sample)
    assert torch.equal(got.semantic, expected.semantic)
    written = manifest(output)
    assert written["model"]["parity"] == "authors" and written["model"]["preset"] == "tiny"
    assert written["pipeline"]["num_inference_steps"] == 50 and written["pipeline"]["guidance_scale"] == 5.0
    assert written["converted_from"]["base_layout"] == "sama-export"
    assert leftovers(tmp_path) == []


def test_diffusers_layout_checkpoint_is_accepted(source_model, base_export, tmp_path):
    state = {k: v.detach().clone().contiguous() for k, v in source_model.state_dict().items()}
    checkpoint = write_checkpoint(state, str(tmp_path / "diffusers.safetensors"))
    report = convert(checkpoint, base_export, str(tmp_path / "out"), dtype="float32")
    assert report.converted_from["layout"] == "diffusers" and report.parity == "sama"
    assert_same_weights(SamaEditPipeline.from_pretrained(str(tmp_path / "out")).transformer, source_model)


def test_dtype_casts_the_transformer(source_model, base_export, tmp_path):
    checkpoint = write_checkpoint(original_state(source_model), str(tmp_path / "sama.safetensors"))
    convert(checkpoint, base_export, str(tmp_path / "out"), dtype="bfloat16")
    assert manifest(str(tmp_path / "out"))["model"]["torch_dtype"] == "bfloat16"
    pipeline = SamaEditPipeline.from_pretrained(str(tmp_path / "out"))
    reference = source_model.state_dict()["blocks.0.attn1.to_q.weight"].to(torch.bfloat16)
    assert torch.equal(pipeline.transformer.state_dict()["blocks.0.attn1.to_q.weight"], reference)


# ---- plain original-format Wan ---------------------------------------------------------------------


def test_plain_wan_checkpoint_gets_from_wan_initialisation(source_model, base_export, tmp_path):
    checkpoint = write_checkpoint(original_state(source_model, sama=False), str(tmp_path / "wan.safetensors"))
    report = convert(checkpoint, base_export, str(tmp_path / "out"), dtype="float32")
    assert report.converted_from["layout"] == "wan-original" and report.parity == "sama"
    assert report.converted_from["sama_keys"] == 0
    model = SamaEditPipeline.from_pretrained(str(tmp_path / "out")).transformer
    assert_same_weights(model, source_model, skip=tuple(SAMA_TO_ORIGINAL))
    assert torch.count_nonzero(model.type_embedding.weight) == 0
    # Default-initialised (reset_parameters) projector and head, as from_wan leaves them.
    for norm in (model.semantic_projector.norm, model.semantic_head.norm):
        assert torch.equal(norm.weight, torch.ones_like(norm.weight))
        assert torch.count_nonzero(norm.bias) == 0
    bound = 1 / 32**0.5  # kaiming-uniform bound of nn.Linear with fan_in 32
    assert model.semantic_projector.fc1.weight.abs().max() <= bound
    assert model.semantic_projector.fc1.weight.std() > 0
    assert manifest(str(tmp_path / "out"))["model"]["parity"] == "sama"


def test_parity_flag_overrides_the_default(source_model, base_export, tmp_path):
    checkpoint = write_checkpoint(original_state(source_model, sama=False), str(tmp_path / "wan.safetensors"))
    convert(checkpoint, base_export, str(tmp_path / "out"), dtype="float32", parity="authors")
    assert manifest(str(tmp_path / "out"))["model"]["parity"] == "authors"


# ---- refusals -----------------------------------------------------------------------------------------


def _broken(source_model, problem: str) -> dict[str, torch.Tensor]:
    state = original_state(source_model, prefix="pipe.dit.")
    if problem in ("unmapped", "all"):
        state["pipe.dit.blocks.0.norm2.weight"] = torch.ones(192)  # Wan's norm2 has no weight
        state["pipe.dit.vace_blocks.0.weight"] = torch.ones(3)
    if problem in ("missing", "all"):
        del state["pipe.dit.blocks.1.ffn.0.bias"]
    if problem in ("shape", "all"):
        state["pipe.dit.head.modulation"] = torch.zeros(1, 3, 192)
    if problem == "partial-sama":
        for key in [k for k in state if "siglip_feat_mlp" in k]:
            del state[key]
    return state


@pytest.mark.parametrize(
    ("problem", "named"),
    [
        ("unmapped", ["unmapped key", "pipe.dit.blocks.0.norm2.weight", "pipe.dit.vace_blocks.0.weight"]),
        ("missing", ["missing parameter", "blocks.1.ffn.net.0.proj.bias"]),
        (
            "shape",
            ["shape mismatch", "pipe.dit.head.modulation: checkpoint [1, 3, 192] vs model [1, 2, 192]"],
        ),
        ("all", ["unmapped key", "missing parameter", "shape mismatch"]),
        (
            "partial-sama",
            ["missing parameter", "semantic_projector.fc1.weight", "semantic_projector.norm.bias"],
        ),
    ],
)
def test_a_checkpoint_that_does_not_fit_writes_nothing(source_model, base_export, tmp_path, problem, named):
    checkpoint = write_checkpoint(_broken(source_model, problem), str(tmp_path / "bad.safetensors"))
    output = tmp_path / "out"
    with pytest.raises(ConversionError) as caught:
        convert(checkpoint, base_export, str(output), dtype="float32")
    message = str(caught.value)
    assert checkpoint in message
    for text in named:
        assert text in message, message
    assert not output.exists()
    assert leftovers(tmp_path) == []


def test_plan_reads_headers_and_names_the_layout(source_model, tmp_path):
    checkpoint = write_checkpoint(
        original_state(source_model, prefix="dit."), str(tmp_path / "s.safetensors")
    )
    plan = plan_checkpoint(checkpoint)
    assert (plan.layout, plan.prefix, plan.width, plan.num_layers) == ("sama-official", "dit.", 192, 2)
    assert plan.sources["blocks.0.norm2.weight"][1] == "dit.blocks.0.norm3.weight"
    assert plan.sources["scale_shift_table"][1] == "dit.head.modulation"


def test_pickles_are_refused(base_export, tmp_path):
    path = tmp_path / "sama.pth"
    torch.save({"a": torch.zeros(1)}, path)
    with pytest.raises(ConversionError, match="only safetensors"):
        convert(str(path), base_export, str(tmp_path / "out"))


# ---- original-format base ----------------------------------------------------------------------------

VAE_RESNET_TO_ORIGINAL = {
    "norm1.": "residual.0.",
    "conv1.": "residual.2.",
    "norm2.": "residual.3.",
    "conv2.": "residual.6.",
    "conv_shortcut.": "shortcut.",
}
VAE_TOP_TO_ORIGINAL = {
    "quant_conv.": "conv1.",
    "post_quant_conv.": "conv2.",
    "encoder.conv_in.": "encoder.conv1.",
    "decoder.conv_in.": "decoder.conv1.",
    "encoder.norm_out.": "encoder.head.0.",
    "encoder.conv_out.": "encoder.head.2.",
    "decoder.norm_out.": "decoder.head.0.",
    "decoder.conv_out.": "decoder.head.2.",
}


def vae_to_original(vae) -> dict[str, torch.Tensor]:
    """Wan's VAE names: flat encoder/decoder lists, as Wan's Encoder3d/Decoder3d build them."""
    config = vae.config
    # Wan's Decoder3d appends, per level, num_res_blocks + 1 residual blocks, then a resample
    # except after the last level: position in that flat list of each diffusers module.
    flat: dict[str, int] = {}
    position = 0
    for level in range(len(config.dim_mult)):
        for resnet in range(config.num_res_blocks + 1):
            flat[f"decoder.up_blocks.{level}.resnets.{resnet}."] = position
            position += 1
        if level != len(config.dim_mult) - 1:
            flat[f"decoder.up_blocks.{level}.upsamplers.0."] = position
            position += 1

    def rename(key: str) -> str:
        for new, old in VAE_TOP_TO_ORIGINAL.items():
            if key.startswith(new):
                return old + key[len(new) :]
        for part in ("encoder", "decoder"):
            mid = f"{part}.mid_block."
            if key.startswith(mid + "attentions.0."):
                return f"{part}.middle.1." + key[len(mid + "attentions.0.") :]
            for index, slot in ((0, 0), (1, 2)):
                head = f"{mid}resnets.{index}."
                if key.startswith(head):
                    return f"{part}.middle.{slot}." + resnet_name(key[len(head) :])
        match = re.match(r"encoder\.down_blocks\.(\d+)\.(.+)", key)
        if match:
            rest = match.group(2)
            inner = rest if rest.startswith(("resample.", "time_conv.")) else resnet_name(rest)
            return f"encoder.downsamples.{match.group(1)}.{inner}"
        for head, index in flat.items():
            if key.startswith(head):
                rest = key[len(head) :]
                inner = rest if "upsamplers" in head else resnet_name(rest)
                return f"decoder.upsamples.{index}.{inner}"
        raise AssertionError(f"no original VAE name for {key}")

    def resnet_name(rest: str) -> str:
        for new, old in VAE_RESNET_TO_ORIGINAL.items():
            if rest.startswith(new):
                return old + rest[len(new) :]
        raise AssertionError(rest)

    return {rename(k): v.detach().clone() for k, v in vae.state_dict().items()}


UMT5_BLOCK_TO_ORIGINAL = {
    "layer.0.layer_norm.": "norm1.",
    "layer.0.SelfAttention.q.": "attn.q.",
    "layer.0.SelfAttention.k.": "attn.k.",
    "layer.0.SelfAttention.v.": "attn.v.",
    "layer.0.SelfAttention.o.": "attn.o.",
    "layer.0.SelfAttention.relative_attention_bias.": "pos_embedding.embedding.",
    "layer.1.layer_norm.": "norm2.",
    "layer.1.DenseReluDense.wi_0.": "ffn.gate.0.",
    "layer.1.DenseReluDense.wi_1.": "ffn.fc1.",
    "layer.1.DenseReluDense.wo.": "ffn.fc2.",
}


def umt5_to_original(model) -> dict[str, torch.Tensor]:
    out = {}
    for key, value in model.state_dict().items():
        if key == "encoder.embed_tokens.weight":
            continue  # tied to shared.weight
        if key == "shared.weight":
            out["token_embedding.weight"] = value.detach().clone()
        elif key == "encoder.final_layer_norm.weight":
            out["norm.weight"] = value.detach().clone()
        else:
            index, rest = re.match(r"encoder\.block\.(\d+)\.(.+)", key).groups()
            old = next(o + rest[len(n) :] for n, o in UMT5_BLOCK_TO_ORIGINAL.items() if rest.startswith(n))
            out[f"blocks.{index}.{old}"] = value.detach().clone()
    return out


def tiny_wan_config():
    """The tiny preset with a (tiny) Wan VAE: 16 latent channels, one resnet per level."""
    config = get_preset("tiny")
    config = dataclasses.replace(
        config,
        preset="tiny-wanvae",
        vae=AutoencoderConfig(kind="wan", base_dim=8, z_dim=16, num_res_blocks=1),
        transformer=dataclasses.replace(config.transformer, in_channels=16, out_channels=16),
    )
    config.validate()
    return config


def test_original_format_base_converts_vae_and_text_encoder(tmp_path):
    config = tiny_wan_config()
    torch.manual_seed(3)
    components = build_model(config, with_semantic_encoder=False)
    vae, text = components.vae.vae, components.text_encoder.model
    with torch.no_grad():
        for parameter in vae.parameters():  # RMS-norm gammas start at one: make every tensor distinct
            parameter.add_(torch.randn_like(parameter) * 0.01)
    base = tmp_path / "Wan2.1-T2V-tiny"
    (base / "google" / "umt5-xxl").mkdir(parents=True)
    torch.save(vae_to_original(vae), base / "Wan2.1_VAE.pth")
    torch.save(umt5_to_original(text), base / "models_t5_umt5-xxl-enc-bf16.pth")
    transformer_config = config.transformer
    (base / "config.json").write_text(
        json.dumps(
            {
                "_class_name": "WanModel",
                "dim": transformer_config.dim,
                "ffn_dim": transformer_config.ffn_dim,
                "freq_dim": transformer_config.freq_dim,
                "in_dim": 16,
                "out_dim": 16,
                "num_heads": transformer_config.num_attention_heads,
                "num_layers": transformer_config.num_layers,
                "eps": 1e-6,
                "text_len": config.text.max_length,
                "text_dim": transformer_config.text_dim,
                "model_type": "t2v",
            }
        )
    )
    model = components.transformer
    checkpoint = write_checkpoint(
        original_state(model, prefix="pipe.dit."), str(tmp_path / "sama.safetensors")
    )
    output = str(tmp_path / "out")
    report = convert(checkpoint, str(base), output, model_config=config, dtype="float32")
    assert report.converted_from["base_layout"] == "wan-original"
    assert report.converted_from["frozen_components"] == "converted"

    pipeline = SamaEditPipeline.from_pretrained(output)
    assert_same_weights(pipeline.vae.vae, vae)
    assert_same_weights(pipeline.text_encoder.model, text)
    frames = torch.rand(1, 3, 5, 16, 16, generator=torch.Generator().manual_seed(0)) * 2 - 1
    assert torch.equal(pipeline.vae.encode(frames), components.vae.encode(frames))
    latents = components.vae.encode(frames)
    assert torch.equal(pipeline.vae.decode(latents), components.vae.decode(latents))
    prompts = ["make it red", "add a hat"]
    assert torch.equal(pipeline.text_encoder.encode(prompts), components.text_encoder.encode(prompts))
    assert_same_weights(pipeline.transformer, model)


def test_original_base_that_does_not_match_the_preset_is_refused(source_model, tmp_path):
    base = tmp_path / "Wan2.1-T2V-14B"
    base.mkdir()
    (base / "config.json").write_text(
        json.dumps(
            {
                "dim": 5120,
                "ffn_dim": 13824,
                "freq_dim": 256,
                "in_dim": 16,
                "out_dim": 16,
                "num_heads": 40,
                "num_layers": 40,
                "eps": 1e-6,
                "text_len": 512,
                "model_type": "t2v",
            }
        )
    )
    checkpoint = write_checkpoint(original_state(source_model), str(tmp_path / "sama.safetensors"))
    with pytest.raises(ConversionError, match="does not match the 'tiny' config"):
        convert(checkpoint, str(base), str(tmp_path / "out"), preset="tiny")
    assert not (tmp_path / "out").exists()


# ---- CLI ------------------------------------------------------------------------------------------------


def test_cli_convert_then_edit(source_model, base_export, tmp_path, capsys):
    checkpoint = write_checkpoint(
        original_state(source_model, prefix="pipe.dit."), str(tmp_path / "s.safetensors")
    )
    output = str(tmp_path / "sama-tiny")
    args = ["convert", "--checkpoint", checkpoint, "--base", base_export, "--output", output]
    assert cli.main([*args, "--dtype", "float32"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["parity"] == "authors" and report["converted_from"]["layout"] == "sama-official"

    pipeline = SamaEditPipeline.from_pretrained(output)
    frames = np.random.default_rng(0).integers(0, 256, size=(5, 16, 16, 3), dtype=np.uint8)
    edited = pipeline(frames, "make it red", num_inference_steps=2)
    assert edited.frames.shape == (5, 16, 16, 3)

    # An existing export is not replaced unless asked.
    assert cli.main([*args, "--dtype", "float32"]) == 1
    assert "sama convert: error:" in capsys.readouterr().err
    assert cli.main([*args, "--dtype", "float32", "--overwrite"]) == 0
    assert leftovers(tmp_path) == []


def test_cli_bad_input_exits_1_with_the_reason(base_export, tmp_path, capsys):
    missing = str(tmp_path / "nope.safetensors")
    code = cli.main(
        ["convert", "--checkpoint", missing, "--base", base_export, "--output", str(tmp_path / "o")]
    )
    assert code == 1
    err = capsys.readouterr().err
    assert err.startswith("sama convert: error:") and missing in err and "does not exist" in err
    assert not (tmp_path / "o").exists()


@pytest.mark.parametrize("copy_frozen", [False, True], ids=["reference", "copy"])
def test_diffusers_base_is_referenced_or_copied(tmp_path, copy_frozen):
    config = tiny_wan_config()
    torch.manual_seed(5)
    components = build_model(config, with_semantic_encoder=False)
    base = tmp_path / "Wan2.1-T2V-tiny-Diffusers"
    components.vae.save_pretrained(str(base / "vae"))
    components.text_encoder.save_pretrained(str(base), "text_encoder", "tokenizer")
    (base / "transformer").mkdir()
    (base / "transformer" / "config.json").write_text(json.dumps(config.transformer.wan_kwargs()))
    model = components.transformer
    checkpoint = write_checkpoint(original_state(model, sama=False), str(tmp_path / "wan.safetensors"))
    output = str(tmp_path / "out")
    report = convert(
        checkpoint, str(base), output, model_config=config, dtype="float32", copy_frozen=copy_frozen
    )
    assert report.converted_from["frozen_components"] == ("copied" if copy_frozen else "referenced")
    entries = manifest(output)["components"]
    if copy_frozen:
        assert entries["vae"] == {"path": "vae"} and os.path.isdir(os.path.join(output, "text_encoder"))
    else:
        assert entries["vae"]["pretrained"] == str(base) and not os.path.exists(os.path.join(output, "vae"))
    pipeline = SamaEditPipeline.from_pretrained(output)
    assert_same_weights(pipeline.vae.vae, components.vae.vae)
    assert_same_weights(pipeline.text_encoder.model, components.text_encoder.model)
    assert_same_weights(pipeline.transformer, model, skip=tuple(SAMA_TO_ORIGINAL))


def test_cli_unknown_preset_exits_1(source_model, base_export, tmp_path, capsys):
    checkpoint = write_checkpoint(original_state(source_model), str(tmp_path / "s.safetensors"))
    args = ["convert", "--checkpoint", checkpoint, "--base", base_export, "--output", str(tmp_path / "o")]
    assert cli.main([*args, "--preset", "nope"]) == 1
    assert "unknown model preset 'nope'" in capsys.readouterr().err
    assert not (tmp_path / "o").exists() and leftovers(tmp_path) == []
