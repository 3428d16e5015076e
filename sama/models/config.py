"""Typed model configuration: what a recipe says about the model (no torch import here).

A :class:`ModelConfig` names every component's architecture and where its weights come from, so a
recipe file (see :mod:`sama.config`) can describe a model completely and a saved pipeline can record
exactly what it was built from. Named presets live in :mod:`sama.models.presets`.

Weights: ``ModelConfig.pretrained`` is the root of a Wan diffusers repository (a local directory or a
hub id) holding ``transformer/``, ``vae/``, ``text_encoder/`` and ``tokenizer/``; each component can
override it with its own ``pretrained``. SigLIP weights are separate (``semantic.pretrained``).
With no weights a component is built with random initialisation from the architecture fields,
which is what tests and benchmarks do; nothing is ever downloaded implicitly beyond what
``from_pretrained`` of a given id does.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, Literal

__all__ = [
    "AutoencoderConfig",
    "ModelConfig",
    "SemanticConfig",
    "TextConfig",
    "TransformerConfig",
]

# Wan2.1 VAE per-channel latent statistics (diffusers' AutoencoderKLWan defaults).
WAN21_LATENTS_MEAN = [
    -0.7571, -0.7089, -0.9113, 0.1075, -0.1745, 0.9653, -0.1517, 1.5508,
    0.4134, -0.0715, 0.5517, -0.3632, -0.1922, -0.9497, 0.2503, -0.2921,
]  # fmt: skip
WAN21_LATENTS_STD = [
    2.8184, 1.4541, 2.3275, 2.6558, 1.2196, 1.7708, 2.6052, 2.0743,
    3.2687, 2.1526, 2.8652, 1.5579, 1.6382, 1.1253, 2.8251, 1.9160,
]  # fmt: skip
# Wan2.2 (TI2V-5B) 48-channel VAE statistics, from the Wan2.2 release (Wan2_2_VAE).
WAN22_LATENTS_MEAN = [
    -0.2289, -0.0052, -0.1323, -0.2339, -0.2799, 0.0174, 0.1838, 0.1557,
    -0.1382, 0.0542, 0.2813, 0.0891, 0.1570, -0.0098, 0.0375, -0.1825,
    -0.2246, -0.1207, -0.0698, 0.5109, 0.2665, -0.2108, -0.2158, 0.2502,
    -0.2055, -0.0322, 0.1109, 0.1567, -0.0729, 0.0899, -0.2799, -0.1230,
    -0.0313, -0.1649, 0.0117, 0.0723, -0.2839, -0.2083, -0.0520, 0.3748,
    0.0152, 0.1957, 0.1433, -0.2944, 0.3573, -0.0548, -0.1681, -0.0667,
]  # fmt: skip
WAN22_LATENTS_STD = [
    0.4765, 1.0364, 0.4514, 1.1677, 0.5313, 0.4990, 0.4818, 0.5013,
    0.8158, 1.0344, 0.5894, 1.0901, 0.6885, 0.6165, 0.8454, 0.4978,
    0.5759, 0.3523, 0.7135, 0.6804, 0.5833, 1.4146, 0.8986, 0.5659,
    0.7069, 0.5338, 0.4889, 0.4917, 0.4069, 0.4999, 0.6866, 0.4093,
    0.5709, 0.6065, 0.6415, 0.4944, 0.5726, 1.2042, 0.5458, 1.6887,
    0.3971, 1.0600, 0.3943, 0.5537, 0.5444, 0.4089, 0.7468, 0.7744,
]  # fmt: skip


@dataclass
class TransformerConfig:
    """The Wan DiT architecture, as ``WanTransformer3DModel`` config keys (defaults: Wan2.1-T2V-14B).

    ``pretrained`` overrides :attr:`ModelConfig.pretrained` for the transformer (loaded from its
    ``subfolder``). The width is ``num_attention_heads * attention_head_dim``.
    """

    patch_size: tuple[int, int, int] = (1, 2, 2)
    num_attention_heads: int = 40
    attention_head_dim: int = 128
    in_channels: int = 16
    out_channels: int = 16
    text_dim: int = 4096
    freq_dim: int = 256
    ffn_dim: int = 13824
    num_layers: int = 40
    cross_attn_norm: bool = True
    qk_norm: str | None = "rms_norm_across_heads"
    eps: float = 1e-6
    rope_max_seq_len: int = 1024
    # (choice) Random init only: start every self-attention head attending to its own position
    # (see SamaTransformer3DModel.init_attention_locality); 0 leaves diffusers' init alone.
    # Weights loaded from a checkpoint are never touched.
    attention_locality_init: float = 0.0
    pretrained: str | None = None
    subfolder: str = "transformer"

    @property
    def dim(self) -> int:
        return self.num_attention_heads * self.attention_head_dim

    def wan_kwargs(self) -> dict[str, Any]:
        """Keyword arguments for ``WanTransformer3DModel(...)``."""
        return {
            "patch_size": tuple(self.patch_size),
            "num_attention_heads": self.num_attention_heads,
            "attention_head_dim": self.attention_head_dim,
            "in_channels": self.in_channels,
            "out_channels": self.out_channels,
            "text_dim": self.text_dim,
            "freq_dim": self.freq_dim,
            "ffn_dim": self.ffn_dim,
            "num_layers": self.num_layers,
            "cross_attn_norm": self.cross_attn_norm,
            "qk_norm": self.qk_norm,
            "eps": self.eps,
            "rope_max_seq_len": self.rope_max_seq_len,
        }


@dataclass
class AutoencoderConfig:
    """The video autoencoder.

    ``kind="wan"``: diffusers ``AutoencoderKLWan``; the architecture fields below are its config
    (defaults: the Wan2.1 VAE, 16 channels, 4x temporal / 8x spatial) and are used only when no
    weights are given; a checkpoint brings its own config. Latents are normalised per channel with
    the VAE config's ``latents_mean``/``latents_std``, as Wan's pipelines do.

    ``kind="space_to_depth"``: a parameter-free, exactly invertible autoencoder for CPU tests
    (:class:`sama.models.autoencoders.SpaceToDepthAutoencoder`): ``spatial_factor`` x
    ``spatial_factor`` pixel blocks and ``temporal_factor`` frames per latent frame (the first frame
    alone), so ``3 * temporal_factor * spatial_factor**2`` latent channels, normalised as
    ``(pixel - pixel_mean) / pixel_std`` (pixels in [-1, 1]).
    """

    kind: Literal["wan", "space_to_depth"] = "wan"
    pretrained: str | None = None
    subfolder: str = "vae"
    # AutoencoderKLWan architecture (used when no weights are given).
    base_dim: int = 96
    decoder_base_dim: int | None = None
    z_dim: int = 16
    dim_mult: list[int] = field(default_factory=lambda: [1, 2, 4, 4])
    num_res_blocks: int = 2
    temperal_downsample: list[bool] = field(default_factory=lambda: [False, True, True])
    is_residual: bool = False
    in_channels: int = 3
    out_channels: int = 3
    patch_size: int | None = None
    scale_factor_temporal: int = 4
    scale_factor_spatial: int = 8
    latents_mean: list[float] = field(default_factory=lambda: list(WAN21_LATENTS_MEAN))
    latents_std: list[float] = field(default_factory=lambda: list(WAN21_LATENTS_STD))
    # Draw from the posterior instead of taking its mode when encoding (a project choice: mode).
    sample_posterior: bool = False
    # space_to_depth
    spatial_factor: int = 4
    temporal_factor: int = 4
    # The pixels' mean and standard deviation (in [-1, 1]): latents of unit scale, as Wan's
    # normalised latents are, so a noise schedule tuned for Wan reaches the detail at the same
    # noise levels. The identity (0, 1) keeps latents equal to pixels.
    pixel_mean: float = 0.0
    pixel_std: float = 1.0

    def wan_kwargs(self) -> dict[str, Any]:
        """Keyword arguments for ``AutoencoderKLWan(...)``."""
        kwargs: dict[str, Any] = {
            "base_dim": self.base_dim,
            "decoder_base_dim": self.decoder_base_dim,
            "z_dim": self.z_dim,
            "dim_mult": list(self.dim_mult),
            "num_res_blocks": self.num_res_blocks,
            "temperal_downsample": list(self.temperal_downsample),
            "is_residual": self.is_residual,
            "in_channels": self.in_channels,
            "out_channels": self.out_channels,
            "patch_size": self.patch_size,
            "scale_factor_temporal": self.scale_factor_temporal,
            "scale_factor_spatial": self.scale_factor_spatial,
            "latents_mean": list(self.latents_mean),
            "latents_std": list(self.latents_std),
        }
        return kwargs

    @property
    def latent_channels(self) -> int:
        if self.kind == "space_to_depth":
            return 3 * self.temporal_factor * self.spatial_factor**2
        return self.z_dim

    @property
    def spatial_compression(self) -> int:
        return self.spatial_factor if self.kind == "space_to_depth" else self.scale_factor_spatial

    @property
    def temporal_compression(self) -> int:
        return self.temporal_factor if self.kind == "space_to_depth" else self.scale_factor_temporal


@dataclass
class TextConfig:
    """The text encoder: umT5 through transformers (``UMT5EncoderModel``).

    ``tokenizer="auto"`` loads the checkpoint's tokenizer (``AutoTokenizer``, subfolder
    ``tokenizer_subfolder``) and needs weights; ``tokenizer="byte"`` uses
    :class:`sama.models.text.ByteTokenizer` (no download) and, without weights, a randomly
    initialised encoder with the architecture fields below; ``tokenizer="word"`` likewise with
    :class:`sama.models.text.HashWordTokenizer` (one token per word, ``vocab_size`` hash buckets; the
    tiny preset). Defaults: umT5-XXL as in Wan (4096-d, 512 tokens).
    """

    tokenizer: Literal["auto", "byte", "word"] = "auto"
    pretrained: str | None = None
    subfolder: str = "text_encoder"
    tokenizer_subfolder: str = "tokenizer"
    max_length: int = 512
    # UMT5 architecture (used when no weights are given).
    d_model: int = 4096
    d_kv: int = 64
    d_ff: int = 10240
    num_layers: int = 24
    num_heads: int = 64
    vocab_size: int = 256384
    relative_attention_num_buckets: int = 32
    relative_attention_max_distance: int = 128

    @property
    def hidden_size(self) -> int:
        return self.d_model


@dataclass
class SemanticConfig:
    """Semantic Anchoring (SAMA.md): SigLIP encoder, pooling, projector, loss weight.

    ``pretrained`` is a SigLIP checkpoint (local dir or hub id, e.g.
    ``google/siglip-so400m-patch14-384``); without it the encoder is randomly initialised with the
    architecture fields (defaults: so400m-patch14-384). ``enabled=False`` builds a model without
    a semantic branch (no semantic tokens in the sequence, no L_sem).
    """

    enabled: bool = True
    pretrained: str | None = None
    subfolder: str | None = None
    # SigLIP vision architecture (used when no weights are given).
    hidden_size: int = 1152
    intermediate_size: int = 4304
    num_hidden_layers: int = 27
    num_attention_heads: int = 16
    image_size: int = 384
    patch_size: int = 14
    # Tokens: grid_size**2 local + 1 global per anchor frame.
    num_anchors: int = 1
    grid_size: int = 8
    # Anchor frames: "random" (sama), "evenly_spaced" (evaluation) or "first" (frame 0, the
    # authors' release). None follows ModelConfig.parity (see sama.models.parity).
    anchor_sampling: Literal["random", "evenly_spaced", "first"] | None = None
    # (choice) parameter-free LayerNorm on each token so targets match the unit-variance noise.
    normalize: bool = True
    projector_hidden_dim: int = 1024
    # (choice) RoPE placement of semantic tokens: "grid" (sama), "zero" (identity rotation) or
    # "null" (cos = sin = 0, the authors' release); see sama.models.transformer_sama. None follows
    # ModelConfig.parity.
    rope: Literal["grid", "zero", "null"] | None = None
    # LayerNorm eps of the projector and the head: 1e-5 (sama, PyTorch's default) or 1e-6 (the
    # authors'). None follows ModelConfig.parity.
    layernorm_eps: float | None = None
    # Initialisation of the head's Linear: "default" (sama, PyTorch's) or "xavier" (the authors':
    # xavier-uniform weight, N(0, 1e-3) bias). None follows ModelConfig.parity.
    head_init: Literal["default", "xavier"] | None = None

    @property
    def tokens_per_sample(self) -> int:
        return self.num_anchors * (self.grid_size * self.grid_size + 1)


@dataclass
class ModelConfig:
    """Everything needed to build (or rebuild) a SAMA model.

    Attributes:
        preset: the preset this configuration started from (informational; the fields rule).
        pretrained: root of a Wan diffusers repository (local dir or hub id) with
            ``transformer/``, ``vae/``, ``text_encoder/``, ``tokenizer/``; None: random init.
        torch_dtype: dtype the components are built in (``"float32"``, ``"bfloat16"``,
            ``"float16"``); mixed-precision training keeps float32 here and uses autocast.
        parity: ``"sama"`` (this project's choices) or ``"authors"`` (reproduce the authors'
            released code; set automatically for converted official checkpoints). See
            :mod:`sama.models.parity` for what each profile sets.
    """

    preset: str = "custom"
    pretrained: str | None = None
    torch_dtype: Literal["float32", "bfloat16", "float16"] = "float32"
    parity: Literal["sama", "authors"] = "sama"
    transformer: TransformerConfig = field(default_factory=TransformerConfig)
    vae: AutoencoderConfig = field(default_factory=AutoencoderConfig)
    text: TextConfig = field(default_factory=TextConfig)
    semantic: SemanticConfig = field(default_factory=SemanticConfig)

    def validate(self) -> None:
        """Raise ``ValueError`` when the components cannot work together."""
        if self.transformer.in_channels != self.vae.latent_channels:
            raise ValueError(
                f"transformer.in_channels={self.transformer.in_channels} but the autoencoder makes "
                f"{self.vae.latent_channels} latent channels"
            )
        if self.transformer.out_channels != self.transformer.in_channels:
            raise ValueError("transformer.out_channels must equal transformer.in_channels")
        if self.transformer.text_dim != self.text.hidden_size:
            raise ValueError(
                f"transformer.text_dim={self.transformer.text_dim} but the text encoder is "
                f"{self.text.hidden_size}-d"
            )
        if self.transformer.num_attention_heads * self.transformer.attention_head_dim <= 0:
            raise ValueError("transformer width must be positive")
        if self.text.max_length < 2:
            raise ValueError("text.max_length must be at least 2")
        sem = self.semantic
        if sem.enabled and (sem.num_anchors < 1 or sem.grid_size < 1):
            raise ValueError("semantic.num_anchors and semantic.grid_size must be positive")
        if self.parity not in ("sama", "authors"):
            raise ValueError(f"parity must be 'sama' or 'authors', got {self.parity!r}")
        if sem.layernorm_eps is not None and sem.layernorm_eps <= 0:
            raise ValueError("semantic.layernorm_eps must be positive")
        if self.vae.kind == "space_to_depth" and (
            self.vae.spatial_factor < 1 or self.vae.temporal_factor < 1
        ):
            raise ValueError("vae.spatial_factor and vae.temporal_factor must be positive")
        if self.vae.kind == "space_to_depth" and not self.vae.pixel_std > 0:
            raise ValueError(f"vae.pixel_std must be positive, got {self.vae.pixel_std}")

    def resolved(self) -> ModelConfig:
        """A copy with every unset parity knob filled from ``parity``'s profile
        (:func:`sama.models.parity.resolve`)."""
        from sama.models.parity import resolve

        return resolve(self, self.parity, "model")

    def component_source(self, component: Literal["transformer", "vae", "text"]) -> str | None:
        """Where ``component``'s weights come from: its own ``pretrained`` or the shared root."""
        own = getattr(self, component).pretrained
        return own if own is not None else self.pretrained

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready dict (tuples become lists); :func:`sama.config.from_dict` reads it back."""
        return dataclasses.asdict(self)
