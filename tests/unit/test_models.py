"""SAMA model components: sequence assembly, type ids, RoPE, Wan equivalence, save/load, encoders, presets."""

from __future__ import annotations

import dataclasses
import zlib

import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("diffusers")
pytest.importorskip("transformers")

from diffusers import WanTransformer3DModel  # noqa: E402

from sama.models import build_model, get_preset  # noqa: E402
from sama.models.autoencoders import SpaceToDepthAutoencoder, load_autoencoder  # noqa: E402
from sama.models.config import ModelConfig  # noqa: E402
from sama.models.presets import build_transformer  # noqa: E402
from sama.models.semantic import pool_patch_tokens, sample_anchor_indices  # noqa: E402
from sama.models.text import ByteTokenizer, HashWordTokenizer, build_text_encoder  # noqa: E402
from sama.models.transformer_sama import (  # noqa: E402
    TOKEN_TYPE_SEMANTIC,
    TOKEN_TYPE_SOURCE,
    TOKEN_TYPE_TARGET,
    SamaTransformer3DModel,
)

# A deliberately small Wan config: head_dim 24 gives RoPE splits t=8, h=8, w=8.
SMALL = {
    "patch_size": (1, 2, 2),
    "num_attention_heads": 2,
    "attention_head_dim": 24,
    "in_channels": 4,
    "out_channels": 4,
    "text_dim": 16,
    "freq_dim": 16,
    "ffn_dim": 32,
    "num_layers": 2,
}
SEM_DIM = 12


def _perturbed_base(seed: int = 0) -> WanTransformer3DModel:
    """A random Wan model with every parameter non-trivial (diffusers zero-inits some)."""
    torch.manual_seed(seed)
    base = WanTransformer3DModel(**SMALL).eval()
    with torch.no_grad():
        for param in base.parameters():
            param.add_(torch.randn_like(param) * 0.05)
    return base


def _sama(seed: int = 0, **kwargs) -> SamaTransformer3DModel:
    model = SamaTransformer3DModel.from_wan(
        _perturbed_base(seed), semantic_dim=SEM_DIM, semantic_hidden_dim=20, semantic_grid_size=2, **kwargs
    )
    return model.eval()


def _inputs(batch=2, frames=3, height=8, width=6, seed=1):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, 4, frames, height, width, generator=gen)
    timestep = torch.tensor([900.0, 150.0][:batch])
    text = torch.randn(batch, 7, 16, generator=gen)
    return x, timestep, text


class _RotaryProbe:
    """Captures the rotary embedding handed to the first self-attention."""

    def __init__(self, model: SamaTransformer3DModel):
        self.rotary = None
        self.handle = model.blocks[0].attn1.register_forward_pre_hook(self._hook)

    def _hook(self, module, args):
        self.rotary = args[3]

    def close(self):
        self.handle.remove()


# ------------------------------------------------------------------------------------------
# Sequence assembly


def test_sequence_shapes_and_outputs():
    model = _sama()
    x, t, text = _inputs()
    source = torch.randn(2, 4, 3, 8, 6)
    semantic = torch.randn(2, 2 * 5, SEM_DIM)  # 2 anchors x (2*2 + 1)
    sequence, layout = model.embed_tokens(x, source, semantic)
    per_frame = (8 // 2) * (6 // 2)
    assert layout.num_source == 3 * per_frame and layout.num_target == 3 * per_frame
    assert layout.num_semantic == 10
    assert sequence.shape == (2, 2 * 3 * per_frame + 10, 48)
    with torch.no_grad():
        out = model(x, t, text, source_latents=source, semantic_tokens=semantic)
    assert out.sample.shape == x.shape
    assert out.semantic.shape == (2, 10, SEM_DIM)


@pytest.mark.parametrize(
    ("target_frames", "source_frames", "with_semantic"),
    [(3, None, False), (3, 2, True), (1, 1, True), (1, None, True), (5, 3, False)],
)
def test_sequence_variants(target_frames, source_frames, with_semantic):
    """No source (text-to-video), a shorter source (speed), images (1 frame), semantic on/off."""
    model = _sama()
    x, t, text = _inputs(frames=target_frames)
    source = torch.randn(2, 4, source_frames, 8, 6) if source_frames else None
    semantic = torch.randn(2, 5, SEM_DIM) if with_semantic else None
    with torch.no_grad():
        out = model(x, t, text, source_latents=source, semantic_tokens=semantic)
    assert out.sample.shape == x.shape
    assert (out.semantic is not None) == with_semantic
    _, layout = model.embed_tokens(x, source, semantic)
    assert layout.num_source == (source_frames or 0) * 12
    assert layout.target.stop == layout.length


def test_type_id_of_every_position():
    model = _sama()
    x, _, _ = _inputs()
    source = torch.randn(2, 4, 2, 8, 6)
    semantic = torch.randn(2, 5, SEM_DIM)
    _, layout = model.embed_tokens(x, source, semantic)
    ids = layout.type_ids()
    assert ids.tolist() == [TOKEN_TYPE_SOURCE] * 24 + [TOKEN_TYPE_SEMANTIC] * 5 + [TOKEN_TYPE_TARGET] * 36
    # The embedding added at each position is the row of its type.
    with torch.no_grad():
        plain, _ = model.embed_tokens(x, source, semantic)
        model.type_embedding.weight.copy_(torch.arange(3.0)[:, None].expand(3, 48) + 1.0)
        typed, _ = model.embed_tokens(x, source, semantic)
    added = (typed - plain)[0, :, 0]
    assert torch.allclose(added, ids.float() + 1.0, atol=1e-5)


def test_type_embedding_starts_at_zero():
    model = _sama()
    assert torch.equal(model.type_embedding.weight, torch.zeros(3, 48))


def test_wrong_semantic_token_count_is_refused():
    model = _sama()
    x, t, text = _inputs()
    with pytest.raises(ValueError, match="whole number of anchor frames"):
        model(x, t, text, semantic_tokens=torch.randn(2, 4, SEM_DIM))


# ------------------------------------------------------------------------------------------
# RoPE


def test_source_rope_equals_target_rope():
    model = _sama()
    x, t, text = _inputs()
    source = torch.randn(2, 4, 3, 8, 6)
    semantic = torch.randn(2, 5, SEM_DIM)
    probe = _RotaryProbe(model)
    with torch.no_grad():
        model(x, t, text, source_latents=source, semantic_tokens=semantic)
    probe.close()
    cos, sin = probe.rotary
    _, layout = model.embed_tokens(x, source, semantic)
    assert cos.shape[1] == layout.length
    assert torch.equal(cos[:, layout.source], cos[:, layout.target])
    assert torch.equal(sin[:, layout.source], sin[:, layout.target])
    # And the target's are Wan's own.
    base_cos, base_sin = model.rope(x)
    assert torch.equal(cos[:, layout.target], base_cos) and torch.equal(sin[:, layout.target], base_sin)


def test_shorter_source_uses_its_own_grid_from_zero():
    model = _sama()
    x, t, text = _inputs(frames=5)
    source = torch.randn(2, 4, 3, 8, 6)
    probe = _RotaryProbe(model)
    with torch.no_grad():
        model(x, t, text, source_latents=source)
    probe.close()
    cos, sin = probe.rotary
    _, layout = model.embed_tokens(x, source)
    # Source frame k has the rotation of target frame k.
    target_first = slice(layout.target.start, layout.target.start + layout.num_source)
    assert torch.equal(cos[:, layout.source], cos[:, target_first])
    assert torch.equal(sin[:, layout.source], sin[:, target_first])


def test_semantic_rope_grid_positions_do_not_collide():
    model = _sama()
    x, t, text = _inputs()
    semantic = torch.randn(2, 10, SEM_DIM)  # two anchors
    probe = _RotaryProbe(model)
    with torch.no_grad():
        model(x, t, text, semantic_tokens=semantic)
    probe.close()
    cos, sin = probe.rotary
    _, layout = model.embed_tokens(x, None, semantic)
    rows = torch.cat([cos[0, :, 0], sin[0, :, 0]], dim=1)
    semantic_rows = rows[layout.semantic]
    video_rows = rows[layout.target]
    # Every semantic token has its own rotation, distinct from every video token's.
    assert torch.cdist(semantic_rows, semantic_rows).add(torch.eye(10) * 10).min() > 1e-3
    assert torch.cdist(semantic_rows, video_rows).min() > 1e-3
    # Temporal channels: anchor k sits at t = -(k + 1).
    positions = model._semantic_positions(layout, torch.device("cpu"))
    assert positions[:5, 0].tolist() == [-1.0] * 5 and positions[5:, 0].tolist() == [-2.0] * 5
    expected_cos, _ = model._rope_at(positions)
    assert torch.allclose(cos[:, layout.semantic], expected_cos)
    # Integer positions reproduce Wan's own table, so the fractional ones use the same frequencies.
    grid = torch.tensor([[0.0, 1.0, 2.0], [2.0, 3.0, 1.0]], dtype=torch.float64)
    table_cos, _ = model.rope(torch.zeros(1, 4, 3, 8, 6))
    at_cos, _ = model._rope_at(grid)
    index = [0 * 12 + 1 * 3 + 2, 2 * 12 + 3 * 3 + 1]
    assert torch.allclose(at_cos[0, :, 0], table_cos[0, index, 0], atol=1e-12)


def test_semantic_rope_zero_is_identity():
    model = _sama(semantic_rope="zero")
    x, t, text = _inputs()
    probe = _RotaryProbe(model)
    with torch.no_grad():
        model(x, t, text, semantic_tokens=torch.randn(2, 5, SEM_DIM))
    probe.close()
    cos, sin = probe.rotary
    assert torch.equal(cos[:, :5], torch.ones_like(cos[:, :5]))
    assert torch.equal(sin[:, :5], torch.zeros_like(sin[:, :5]))


# ------------------------------------------------------------------------------------------
# Wan equivalence and persistence


def test_step0_matches_base_wan_without_source_and_semantic():
    base = _perturbed_base(3)
    x, t, text = _inputs()
    with torch.no_grad():
        expected = base(x, t, text).sample
    model = SamaTransformer3DModel.from_wan(base, semantic_dim=SEM_DIM, semantic_grid_size=2).eval()
    with torch.no_grad():
        got = model(x, t, text).sample
    assert torch.equal(got, expected)


def _own_position_share(model: SamaTransformer3DModel, latents: torch.Tensor) -> list[float]:
    """Per head of the first self-attention: the share of target queries whose highest-scoring key
    (among [source | target], source = a copy of the target) sits at the query's own position."""
    scores = {}

    def capture(module, args):
        hidden, rotary = args[0], args[3]
        query = module.norm_q(module.to_q(hidden)).unflatten(2, (module.heads, -1))
        key = module.norm_k(module.to_k(hidden)).unflatten(2, (module.heads, -1))
        cos, sin = rotary

        def rotate(v):  # diffusers' Wan rotary: pairs of adjacent elements
            x1, x2 = v.unflatten(-1, (-1, 2)).unbind(-1)
            out = torch.empty_like(v)
            out[..., 0::2] = x1 * cos[..., 0::2] - x2 * sin[..., 1::2]
            out[..., 1::2] = x1 * sin[..., 1::2] + x2 * cos[..., 0::2]
            return out

        scores["qk"] = torch.einsum("bqhd,bkhd->bhqk", rotate(query), rotate(key))

    handle = model.blocks[0].attn1.register_forward_pre_hook(capture)
    gen = torch.Generator().manual_seed(1)
    text = torch.randn(1, 32, int(model.config.text_dim), generator=gen)
    with torch.no_grad():
        model(latents, torch.tensor([500.0]), text, source_latents=latents.clone())
    handle.remove()
    qk = scores["qk"][0]
    tokens = qk.shape[-1] // 2
    best = qk[:, tokens:].argmax(dim=-1) % tokens
    return [float((best[h] == torch.arange(tokens)).float().mean()) for h in range(qk.shape[0])]


def test_attention_locality_init_makes_heads_start_at_their_own_position():
    """The tiny preset's random model: with the locality init about half of every head's target
    queries score their own position (in the source or the target) highest; without it about 1 in
    the 288 positions, i.e. chance."""
    config = get_preset("tiny")
    assert config.transformer.attention_locality_init == 2.0
    latents = 0.3 * torch.randn(1, 48, 3, 24, 32, generator=torch.Generator().manual_seed(0))
    torch.manual_seed(0)
    local = build_model(config, with_vae=False, with_text_encoder=False, with_semantic_encoder=False)
    shares = _own_position_share(local.transformer.eval(), latents)
    assert all(share > 0.4 for share in shares), shares
    config.transformer.attention_locality_init = 0.0
    torch.manual_seed(0)
    plain = build_model(config, with_vae=False, with_text_encoder=False, with_semantic_encoder=False)
    shares = _own_position_share(plain.transformer.eval(), latents)
    assert all(share < 0.02 for share in shares), shares


def test_attention_locality_init_leaves_loaded_weights_alone(tmp_path):
    """Weights come from a checkpoint as they are: the init applies to random models only."""
    base = _perturbed_base(5)
    base.save_pretrained(str(tmp_path / "transformer"))
    config = dataclasses.replace(get_preset("tiny"), pretrained=str(tmp_path))
    config.transformer = dataclasses.replace(
        config.transformer,
        **{k: v for k, v in SMALL.items() if k != "patch_size"},
        attention_locality_init=2.0,
    )
    loaded = build_transformer(config)
    for name, value in base.state_dict().items():
        assert torch.equal(loaded.state_dict()[name], value), name


def test_build_model_loads_wan_checkpoint_and_matches_it(tmp_path):
    """build_model(pretrained=dir) reads transformer/ of a Wan diffusers repo; step 0 == base."""
    config = get_preset("tiny")
    base = WanTransformer3DModel(**config.transformer.wan_kwargs()).eval()
    with torch.no_grad():
        for param in base.parameters():
            param.add_(torch.randn_like(param) * 0.05)
    base.save_pretrained(tmp_path / "transformer")
    components = build_model(
        config, pretrained=str(tmp_path), with_vae=False, with_text_encoder=False, with_semantic_encoder=False
    )
    model = components.transformer.eval()
    x = torch.randn(1, 48, 2, 4, 4)
    t = torch.tensor([321.0])
    text = torch.randn(1, 5, 32)
    reference = WanTransformer3DModel.from_pretrained(tmp_path / "transformer").eval()
    with torch.no_grad():
        assert torch.equal(model(x, t, text).sample, reference(x, t, text).sample)
    # A checkpoint of another architecture is refused with the differing keys named.
    wrong = dataclasses.replace(config, transformer=dataclasses.replace(config.transformer, ffn_dim=64))
    with pytest.raises(ValueError, match="ffn_dim"):
        build_model(
            wrong,
            pretrained=str(tmp_path),
            with_vae=False,
            with_text_encoder=False,
            with_semantic_encoder=False,
        )


def test_save_load_round_trip_is_identical(tmp_path):
    model = _sama()
    with torch.no_grad():
        model.type_embedding.weight.normal_()
    model.save_pretrained(tmp_path)
    loaded = SamaTransformer3DModel.from_pretrained(tmp_path).eval()
    assert loaded.config.semantic_dim == SEM_DIM and loaded.config.semantic_grid_size == 2
    x, t, text = _inputs()
    source = torch.randn(2, 4, 2, 8, 6)
    semantic = torch.randn(2, 5, SEM_DIM)
    with torch.no_grad():
        a = model(x, t, text, source_latents=source, semantic_tokens=semantic)
        b = loaded(x, t, text, source_latents=source, semantic_tokens=semantic)
    assert torch.equal(a.sample, b.sample) and torch.equal(a.semantic, b.semantic)


def test_model_without_semantic_branch():
    model = SamaTransformer3DModel.from_wan(_perturbed_base(), semantic_dim=None).eval()
    assert model.semantic_projector is None and model.semantic_head is None
    x, t, text = _inputs()
    with pytest.raises(ValueError, match="no semantic branch"):
        model(x, t, text, semantic_tokens=torch.randn(2, 65, 8))


def test_gradient_checkpointing_gives_the_same_gradients():
    x, t, text = _inputs()
    semantic = torch.randn(2, 5, SEM_DIM)
    grads = []
    for checkpointing in (False, True):
        model = _sama().train()
        if checkpointing:
            model.enable_gradient_checkpointing()
        out = model(x, t, text, source_latents=x, semantic_tokens=semantic)
        (out.sample.square().mean() + out.semantic.square().mean()).backward()
        grads.append(model.blocks[0].attn1.to_q.weight.grad.clone())
    assert torch.allclose(grads[0], grads[1], atol=1e-6)


# ------------------------------------------------------------------------------------------
# Autoencoders, text, semantic encoder


def test_space_to_depth_is_exactly_invertible(tmp_path):
    ae = SpaceToDepthAutoencoder(spatial_factor=4, temporal_factor=4)
    frames = torch.rand(2, 3, 9, 16, 24) * 2 - 1
    latents = ae.encode(frames)
    assert latents.shape == (2, 192, 3, 4, 6) == (2, *ae.latent_shape(9, 16, 24))
    assert torch.equal(ae.decode(latents), frames)
    image = frames[:, :, :1]
    assert torch.equal(ae.decode(ae.encode(image)), image)
    with pytest.raises(ValueError, match="4k\\+1"):
        ae.encode(frames[:, :, :8])
    with pytest.raises(ValueError, match="multiples of 4"):
        ae.encode(frames[..., :15, :])
    ae.save_pretrained(str(tmp_path))
    again = load_autoencoder(str(tmp_path))
    assert isinstance(again, SpaceToDepthAutoencoder) and again.latent_channels == 192


def test_space_to_depth_normalises_its_latents_and_keeps_that_in_its_export(tmp_path):
    from sama.models.autoencoders import build_autoencoder
    from sama.models.config import AutoencoderConfig

    config = AutoencoderConfig(
        kind="space_to_depth", spatial_factor=2, temporal_factor=4, pixel_mean=-0.25, pixel_std=0.5
    )
    ae = build_autoencoder(config)
    frames = torch.tensor([-1.0, -0.25, 0.25, 1.0]).repeat(1, 3, 5, 4, 1)
    latents = ae.encode(frames)
    # (pixel - mean) / std, then back: -1 -> -1.5, -0.25 -> 0, 0.25 -> 1, 1 -> 2.5.
    assert sorted(latents.unique().tolist()) == [-1.5, 0.0, 1.0, 2.5]
    assert torch.equal(ae.decode(latents), frames)
    raw = SpaceToDepthAutoencoder(2, 4).encode(frames)
    assert torch.equal(latents, (raw + 0.25) / 0.5)
    ae.save_pretrained(str(tmp_path))
    again = load_autoencoder(str(tmp_path))
    assert (again.pixel_mean, again.pixel_std) == (-0.25, 0.5)
    assert torch.equal(again.encode(frames), latents)
    # An export from before the normalisation holds raw pixels.
    (tmp_path / "space_to_depth.json").write_text(
        '{"kind": "space_to_depth", "spatial_factor": 2, "temporal_factor": 4}'
    )
    assert torch.equal(load_autoencoder(str(tmp_path)).encode(frames), raw)
    with pytest.raises(ValueError, match="pixel_std must be positive"):
        SpaceToDepthAutoencoder(2, 4, pixel_std=0.0)


def test_wan_vae_wrapper_normalises_latents():
    from diffusers import AutoencoderKLWan

    from sama.models.autoencoders import WanAutoencoder

    torch.manual_seed(0)
    vae = AutoencoderKLWan(
        base_dim=8,
        z_dim=4,
        dim_mult=[1, 1, 1, 1],
        num_res_blocks=1,
        latents_mean=[0.5, -0.5, 1.0, 0.0],
        latents_std=[2.0, 1.0, 0.5, 4.0],
    )
    ae = WanAutoencoder(vae)
    frames = torch.rand(1, 3, 5, 16, 16) * 2 - 1
    latents = ae.encode(frames)
    assert latents.shape == (1, 4, 2, 2, 2)
    raw = vae.encode(frames).latent_dist.mode()
    mean = torch.tensor([0.5, -0.5, 1.0, 0.0]).view(1, 4, 1, 1, 1)
    std = torch.tensor([2.0, 1.0, 0.5, 4.0]).view(1, 4, 1, 1, 1)
    assert torch.allclose(latents, (raw - mean) / std, atol=1e-6)
    decoded = ae.decode(latents)
    assert decoded.shape == frames.shape
    assert torch.allclose(decoded, vae.decode(raw).sample.clamp(-1, 1), atol=1e-5)


def test_byte_tokenizer():
    tok = ByteTokenizer(max_length=8)
    out = tok(["ab", "abcdefghijk"])
    assert out["input_ids"][0].tolist() == [97 + 3, 98 + 3, 1, 0, 0, 0, 0, 0]
    assert out["attention_mask"][0].tolist() == [1, 1, 1, 0, 0, 0, 0, 0]
    assert out["input_ids"][1, -1].item() == ByteTokenizer.eos_token_id
    assert out["attention_mask"][1].sum().item() == 8
    assert tok.decode(out["input_ids"][1].tolist()) == "abcdefg"


def test_hash_word_tokenizer():
    tok = HashWordTokenizer(max_length=6, vocab_size=1000)
    out = tok(["Make it RED.", "one two three four five six seven"])
    red, make = tok.token_id("red"), tok.token_id("make")
    # One id per word or punctuation mark, case-insensitive: crc32 of the lowercased token.
    assert red == 3 + zlib.crc32(b"red") % 997 and tok.token_id("RED") == red
    assert out["input_ids"][0].tolist() == [make, tok.token_id("it"), red, tok.token_id("."), 1, 0]
    assert out["attention_mask"][0].tolist() == [1, 1, 1, 1, 1, 0]
    # Truncated to max_length - 1 words, then eos.
    assert out["input_ids"][1].tolist()[-1] == HashWordTokenizer.eos_token_id
    words = ["one", "two", "three", "four", "five"]
    assert out["input_ids"][1].tolist()[:5] == [tok.token_id(w) for w in words]
    assert all(3 <= i < 1000 for i in out["input_ids"][:, :4].flatten().tolist())


def test_word_and_byte_text_encoders_round_trip(tmp_path):
    """A random encoder with either vocabulary-free tokenizer saves and loads to the same embeddings."""
    from sama.models.config import TextConfig
    from sama.models.text import TextEncoder

    for kind in ("word", "byte"):
        config = TextConfig(
            tokenizer=kind, max_length=16, d_model=8, d_kv=4, d_ff=16, num_layers=1, num_heads=2,
            vocab_size=500, relative_attention_num_buckets=4, relative_attention_max_distance=8,
        )  # fmt: skip
        torch.manual_seed(0)
        encoder = build_text_encoder(config)
        encoder.save_pretrained(str(tmp_path / kind))
        loaded = TextEncoder.from_pretrained(str(tmp_path / kind), max_length=16)
        assert type(loaded.tokenizer) is type(encoder.tokenizer)
        prompt = ["[Video edit] Turn the red square cyan."]
        assert torch.equal(loaded.encode(prompt), encoder.encode(prompt))


def test_text_encoder_zero_pads_and_refuses_empty_prompts():
    torch.manual_seed(0)
    components = build_model("tiny", with_vae=False, with_semantic_encoder=False)
    text = components.text_encoder
    embeds = text.encode(["make it red", "a much longer instruction that fills more tokens"])
    assert embeds.shape == (2, 32, 32)
    assert torch.count_nonzero(embeds[0, 4:]) == 0  # 3 words + eos, then zeros
    assert torch.count_nonzero(embeds[0, :4]) > 0
    with pytest.raises(ValueError, match="empty"):
        text.encode(["   "])
    assert text.encode([""], allow_empty=True).shape == (1, 32, 32)


def test_pooling_local_grid_and_global_mean():
    patches = torch.arange(16.0).reshape(1, 16, 1).expand(1, 16, 2).contiguous()  # 4x4 grid
    pooled = pool_patch_tokens(patches, grid_size=2)
    assert pooled.shape == (1, 5, 2)
    grid = torch.arange(16.0).reshape(4, 4)
    expected_local = [grid[:2, :2].mean(), grid[:2, 2:].mean(), grid[2:, :2].mean(), grid[2:, 2:].mean()]
    assert pooled[0, :4, 0].tolist() == [float(v) for v in expected_local]
    assert pooled[0, 4, 0].item() == grid.mean().item()


def test_anchor_sampling():
    gen = torch.Generator().manual_seed(0)
    picks = {tuple(sample_anchor_indices(17, 1, "random", gen)) for _ in range(200)}
    assert len(picks) > 10 and all(0 <= p[0] < 17 for p in picks)
    assert sample_anchor_indices(17, 2, "evenly_spaced") == [4, 12]
    assert sample_anchor_indices(1, 1, "random", gen) == [0]  # an image is its own anchor
    assert sample_anchor_indices(1, 3, "random", gen) == [0, 0, 0]


def test_semantic_encoder_tokens():
    torch.manual_seed(0)
    components = build_model("tiny", with_vae=False, with_text_encoder=False)
    encoder = components.semantic_encoder
    frames = torch.rand(2, 3, 5, 48, 80) * 2 - 1
    tokens = encoder(frames, torch.Generator().manual_seed(0))
    assert tokens.shape == (2, 65, 32)
    # Normalised per token: zero mean, unit variance over channels.
    assert torch.allclose(tokens.mean(-1), torch.zeros(2, 65), atol=1e-5)
    assert not any(p.requires_grad for p in encoder.parameters())


# ------------------------------------------------------------------------------------------
# Presets


def test_wan_presets_are_the_published_architectures():
    from accelerate import init_empty_weights

    expected = {
        "wan2.1-1.3b": (1536, 12, 8960, 30, 16),
        "wan2.1-14b": (5120, 40, 13824, 40, 16),
        "wan2.2-5b": (3072, 24, 14336, 30, 48),
    }
    for name, (dim, heads, ffn, layers, channels) in expected.items():
        config = get_preset(name)
        tc = config.transformer
        assert (tc.dim, tc.num_attention_heads, tc.ffn_dim, tc.num_layers, tc.in_channels) == (
            dim,
            heads,
            ffn,
            layers,
            channels,
        )
        assert tc.text_dim == 4096 and tuple(tc.patch_size) == (1, 2, 2)
        assert config.vae.latent_channels == channels
    with init_empty_weights():
        model = SamaTransformer3DModel(
            **get_preset("wan2.1-1.3b").transformer.wan_kwargs(), semantic_dim=1152
        )
    params = sum(p.numel() for p in model.parameters())
    assert 1.3e9 < params < 1.5e9
    vae = get_preset("wan2.2-5b").vae
    assert (vae.z_dim, vae.is_residual, vae.patch_size, vae.scale_factor_spatial) == (48, True, 2, 16)
    assert (vae.base_dim, vae.decoder_base_dim, vae.temperal_downsample) == (160, 256, [False, True, True])
    assert len(vae.latents_mean) == len(vae.latents_std) == 48


def test_model_config_round_trips_through_the_recipe_loader():
    from sama.config import from_dict

    config = get_preset("wan2.2-5b")
    again = from_dict(ModelConfig, config.to_dict())
    assert again == config or again.to_dict() == config.to_dict()
    with pytest.raises(ValueError, match="unknown model preset"):
        get_preset("wan9")
    broken = dataclasses.replace(config, transformer=dataclasses.replace(config.transformer, in_channels=16))
    with pytest.raises(ValueError, match="latent channels"):
        broken.validate()


def test_expected_slice_of_the_tiny_transformer():
    """Golden values (diffusers' ``expected_slice``): the tiny preset's transformer built from seed
    0, on seeded inputs, predicts these first velocities; a change to the architecture, its init
    or its sequence assembly shows here."""
    from sama.models.presets import build_transformer, get_preset

    torch.manual_seed(0)
    transformer = build_transformer(get_preset("tiny"))
    generator = torch.Generator().manual_seed(0)
    channels = transformer.config.in_channels
    target = torch.randn((1, channels, 3, 4, 4), generator=generator)
    source = torch.randn((1, channels, 3, 4, 4), generator=generator)
    text = torch.randn((1, 8, transformer.config.text_dim), generator=generator)
    with torch.no_grad():
        out = transformer(
            hidden_states=target,
            timestep=torch.tensor([500.0]),
            encoder_hidden_states=text,
            source_latents=source,
        )
    expected = [-1.10144, -0.42369, 0.11050, -0.17700, 0.79050, 0.55125, 0.73468, -0.71595]
    assert out.sample.shape == target.shape
    torch.testing.assert_close(out.sample.flatten()[:8], torch.tensor(expected), atol=1e-4, rtol=0)


def test_a_bf16_random_init_keeps_wans_float32_modules():
    """A reduced-precision preset built at random has the dtypes from_pretrained(torch_dtype=bf16)
    gives: float32 for every parameter whose name names a module Wan keeps in float32."""
    import dataclasses

    import torch

    from sama.models.presets import build_transformer, get_preset

    transformer = build_transformer(dataclasses.replace(get_preset("tiny"), torch_dtype="bfloat16"))
    keep = set(transformer._keep_in_fp32_modules)
    dtypes = {name: p.dtype for name, p in transformer.named_parameters()}
    kept = {n: d for n, d in dtypes.items() if keep.intersection(n.split("."))}
    assert "scale_shift_table" in kept and all(d == torch.float32 for d in kept.values()), kept
    assert all(d == torch.bfloat16 for n, d in dtypes.items() if n not in kept)
