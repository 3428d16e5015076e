"""Inference: source video + instruction -> edited video, with a trained SAMA model.

:class:`SamaEditPipeline` follows diffusers' pipeline style (components as attributes, a
``__call__``, ``save_pretrained``/``from_pretrained``) with the authors' inference defaults
(SAMA.md, code): flow-match Euler with shift 5, 50 steps, classifier-free guidance 5 on the text
only (the source latents are in both branches), the ``[Video edit] `` prompt prefix with the bare
``[Video edit]`` as negative prompt, and a fixed seed.

Semantic tokens, when the model has a semantic branch, start from Gaussian noise, are stepped
with the same sigmas as the video latents (a second scheduler instance, since diffusers'
schedulers count their own steps) and are discarded; no SigLIP is needed. Guidance is applied to
their velocity too, so the pair follows one guided ODE.

``__call__`` edits a clip as given: any length and size works (the clip is padded to
``k * temporal + 1`` frames, repeating the last frame, and to a multiple of ``vae spatial factor x
patch size`` by edge replication, and the output is cropped back to exactly the input's frame
count and size), but the cost grows with the square of the tokens and the model only knows its
training sizes. :meth:`SamaEditPipeline.edit_video` (what ``sama edit`` runs) edits a real video at
the model's training bucket and frame rate, in windows of at most ``max_frames`` frames, and
restores the source's size, rate and length; the export records those settings
(:class:`PipelineConfig` ``buckets``, ``fps``, ``max_frames``).

A saved pipeline directory::

    sama_pipeline.json    format, model config (preset + every component), pipeline defaults
    transformer/          SamaTransformer3DModel (diffusers save_pretrained), incl. projector + head
    vae/                  AutoencoderKLWan or the space-to-depth config
    text_encoder/         UMT5EncoderModel
    tokenizer/            the tokenizer (transformers or byte-level)
    scheduler/            FlowMatchEulerDiscreteScheduler config

Frozen components can be stored by reference instead (``copy_frozen=False``): the json then names
their checkpoint (``pretrained`` + ``subfolder``) and loading fetches them from there.
"""

from __future__ import annotations

import contextlib
import copy
import json
import os
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any, Literal

import numpy as np
import torch

from sama.buckets import Bucket, BucketConfig, ceil_4k_plus_1, floor_4k_plus_1
from sama.config import ConfigError, from_dict
from sama.losses import randn, set_scheduler_sigmas
from sama.models.autoencoders import LatentAutoencoder, build_autoencoder, load_autoencoder
from sama.models.config import ModelConfig
from sama.models.parity import profile_value, resolve
from sama.models.presets import SamaComponents, encoder_identity, torch_dtype_of
from sama.models.text import TextEncoder, build_text_encoder, clean_prompt
from sama.models.training import EDIT_NEGATIVE_PROMPT, EDIT_PROMPT_PREFIX
from sama.models.transformer_sama import SamaTransformer3DModel
from sama.redaction import redact_config

__all__ = [
    "PIPELINE_FILE",
    "ModelDirectoryError",
    "PipelineConfig",
    "SamaEditOutput",
    "SamaEditPipeline",
    "SamaExport",
    "SamaVideoEdit",
    "pad_video",
    "parse_manifest",
    "plan_windows",
]

PIPELINE_FILE = "sama_pipeline.json"
PIPELINE_FORMAT = "sama-edit-pipeline"
PIPELINE_FORMAT_VERSION = 1


class ModelDirectoryError(ValueError):
    """A model directory is missing, not a SAMA pipeline, or inconsistent; names the path and why."""

    def __init__(self, path: str, reason: str):
        super().__init__(f"{path}: {reason}")
        self.path = path
        self.reason = reason


@dataclass
class PipelineConfig:
    """Inference defaults (SAMA.md "Inference defaults (code)"); ``__call__`` arguments override them.

    Attributes:
        num_inference_steps: Euler steps.
        guidance_scale: text CFG scale; 1 disables the unconditional branch.
        flow_shift: the scheduler's time shift.
        prompt_prefix: prepended to instructions when ``add_prefix``.
        add_prefix: prepend ``prompt_prefix`` (the authors' edit prompts all carry it).
        negative_prompt: the unconditional prompt; None means the bare prefix when the prefix is
            used and the empty prompt otherwise.
        semantic: run the semantic branch (noise -> discarded) when the model has one.
        buckets: the aspect-ratio buckets the model was trained at; :meth:`SamaEditPipeline.edit_video`
            resizes and center-crops a source to the nearest one. Default: SAMA's 480p buckets
            (area 480x832), which is also what an export without this field gets.
        fps: the frame rate of the training clips (Wan2.1's 16 by default); ``edit_video`` edits at
            this rate (or the source's, when lower).
        max_frames: the longest window ``edit_video`` edits in one pass (81 = SAMA's longest clips);
            longer clips are edited in consecutive windows.
        stochastic_sampling: at every step, re-noise the step's clean estimate to the next sigma
            with fresh noise (diffusers' ``FlowMatchEulerDiscreteScheduler(stochastic_sampling=True)``)
            instead of taking an Euler step along the velocity. A model whose trajectory drifts from
            the noisy clips it was trained on sees such clips again at every step.
        sigma_grid: the sampler's sigmas: ``"diffusers"`` (the scheduler's ``set_timesteps``) or
            ``"authors"`` (``shift(linspace(1, 0, steps + 1)[:-1])`` with ``flow_shift``, as the
            authors' release; see :func:`sama.losses.set_scheduler_sigmas`). None follows the model
            config's parity (:mod:`sama.models.parity`); the pipeline resolves it.
    """

    num_inference_steps: int = 50
    guidance_scale: float = 5.0
    flow_shift: float = 5.0
    prompt_prefix: str = EDIT_PROMPT_PREFIX
    add_prefix: bool = True
    negative_prompt: str | None = None
    semantic: bool = True
    buckets: BucketConfig = field(default_factory=BucketConfig)
    fps: float = 16.0
    max_frames: int = 81
    sigma_grid: Literal["diffusers", "authors"] | None = None
    stochastic_sampling: bool = False

    def validate(self) -> None:
        """Raise ``ValueError`` for settings no edit can run with."""
        if self.num_inference_steps < 1:
            raise ValueError(f"inference.num_inference_steps must be >= 1, got {self.num_inference_steps}")
        if not self.fps > 0:
            raise ValueError(f"inference.fps must be positive, got {self.fps}")
        if self.max_frames < 1:
            raise ValueError(f"inference.max_frames must be >= 1, got {self.max_frames}")
        self.buckets.validate()


def parse_manifest(text: str, where: str) -> tuple[dict, ModelConfig | None, PipelineConfig]:
    """An export's ``sama_pipeline.json`` text -> (manifest, model config, pipeline defaults).

    Raises:
        ModelDirectoryError: naming ``where`` (the export), when the text is not a manifest of
            this format version or its configuration is invalid.
    """
    try:
        manifest = json.loads(text)
    except json.JSONDecodeError as exc:
        raise ModelDirectoryError(where, f"{PIPELINE_FILE} is unreadable: {exc}") from exc
    if not isinstance(manifest, dict) or manifest.get("format") != PIPELINE_FORMAT:
        raise ModelDirectoryError(where, f"{PIPELINE_FILE} is not a {PIPELINE_FORMAT} manifest")
    if manifest.get("format_version") != PIPELINE_FORMAT_VERSION:
        raise ModelDirectoryError(
            where,
            f"{PIPELINE_FILE} has format_version {manifest.get('format_version')!r}; this code reads "
            f"version {PIPELINE_FORMAT_VERSION}",
        )
    try:
        model_config = from_dict(ModelConfig, manifest["model"]) if manifest.get("model") else None
        pipeline_config = from_dict(PipelineConfig, manifest.get("pipeline") or {})
    except (ConfigError, KeyError) as exc:
        raise ModelDirectoryError(where, f"{PIPELINE_FILE} has an invalid configuration: {exc}") from exc
    return manifest, model_config, pipeline_config


@dataclass
class SamaEditOutput:
    """Pipeline output: ``frames`` ``(T, H, W, 3)`` uint8 (None for ``output_type="latent"``) and
    the final padded ``latents`` ``(1, C, T', H', W')``."""

    frames: np.ndarray | None
    latents: torch.Tensor


@dataclass
class SamaVideoEdit:
    """What :meth:`SamaEditPipeline.edit_video` returns.

    Attributes:
        frames: ``(T, H, W, 3)`` uint8, the source's count and size (the bucket's and the
            processed count with ``keep_bucket``).
        fps: the frames' rate (the source's; the processing rate with ``keep_bucket``).
        bucket: the training bucket the source was cropped to.
        processed_frames / processed_fps: the clip the model edited, at the bucket size.
        windows: ``[start, stop)`` frame ranges of the processed clip, one model run each.
        seconds: wall time of the edit.
    """

    frames: np.ndarray
    fps: float
    bucket: Bucket
    processed_frames: int
    processed_fps: float
    windows: list[tuple[int, int]]
    seconds: float


def plan_windows(num_frames: int, max_frames: int) -> list[tuple[int, int]]:
    """Consecutive ``[start, stop)`` windows covering ``num_frames`` frames, none longer than
    ``max_frames`` floored to 4k+1.

    The fewest windows that fit, of equal length rounded up to 4k+1 (what the VAE takes without
    padding), so e.g. 82 frames at ``max_frames=81`` are two windows of 41, not 81 and a lone
    frame; only the last window may be shorter.
    """
    if num_frames < 1:
        raise ValueError(f"cannot plan windows over {num_frames} frames")
    if max_frames < 1:
        raise ValueError(f"max_frames must be at least 1, got {max_frames}")
    limit = floor_4k_plus_1(max_frames)
    count = -(-num_frames // limit)
    size = min(limit, ceil_4k_plus_1(-(-num_frames // count)))
    return [(start, min(start + size, num_frames)) for start in range(0, num_frames, size)]


def _as_frames(video: Any) -> np.ndarray:
    """Normalise the accepted inputs to a ``(T, H, W, 3)`` uint8 array."""
    if isinstance(video, torch.Tensor):
        video = video.detach().cpu().numpy()
    elif isinstance(video, Sequence) and not isinstance(video, str | bytes):
        if len(video) == 0:
            raise ValueError("the source video has no frames")
        video = np.stack([np.asarray(frame) for frame in video])
    if not isinstance(video, np.ndarray):
        raise TypeError(
            f"video must be a (T, H, W, 3) uint8 array or a list of frames, got {type(video).__name__}"
        )
    if video.ndim == 3:
        video = video[None]
    if video.ndim != 4 or video.shape[-1] != 3:
        raise ValueError(
            f"video must be shaped (T, H, W, 3) RGB (or (H, W, 3) for an image), got {video.shape}"
        )
    if video.dtype != np.uint8:
        raise ValueError(f"video must be uint8, got {video.dtype}")
    if video.shape[0] == 0:
        raise ValueError("the source video has no frames")
    if video.shape[1] == 0 or video.shape[2] == 0:
        raise ValueError(f"the source video has empty frames of size {video.shape[1]}x{video.shape[2]}")
    return video


def pad_video(frames: np.ndarray, temporal: int, multiple_h: int, multiple_w: int) -> np.ndarray:
    """Pad ``(T, H, W, 3)`` frames to ``k * temporal + 1`` frames and sizes multiple of the given values.

    The last frame is repeated and the borders are edge-replicated (no new content is invented).
    """
    num_frames, height, width, _ = frames.shape
    target_frames = -(-(num_frames - 1) // temporal) * temporal + 1
    target_h = -(-height // multiple_h) * multiple_h
    target_w = -(-width // multiple_w) * multiple_w
    pads = ((0, target_frames - num_frames), (0, target_h - height), (0, target_w - width), (0, 0))
    if not any(p[1] for p in pads):
        return frames
    return np.pad(frames, pads, mode="edge")


def _to_uint8(frames: torch.Tensor) -> np.ndarray:
    """``(3, T, H, W)`` floats in ``[-1, 1]`` -> ``(T, H, W, 3)`` uint8."""
    scaled = ((frames.float().clamp(-1.0, 1.0) + 1.0) * 127.5).round()
    return scaled.permute(1, 2, 3, 0).to(torch.uint8).cpu().numpy()


def decode_latents(vae, latents: torch.Tensor) -> np.ndarray:
    """Stored ``(C, T, H, W)`` latents (a precomputed sample's) -> ``(T', H', W', 3)`` uint8 frames
    through ``vae``, on the device its parameters are on (a parameter-free autoencoder: the CPU)."""
    param = next(iter(vae.parameters()), None)
    device = param.device if param is not None else torch.device("cpu")
    with torch.no_grad():
        return _to_uint8(vae.decode(latents[None].float().to(device))[0])


class SamaEditPipeline:
    """Instruction-guided video editing with a SAMA model (see the module docstring).

    Args:
        transformer: the trained :class:`SamaTransformer3DModel`.
        vae: the autoencoder it was trained with.
        text_encoder: the text encoder (+ tokenizer) it was trained with.
        scheduler: a ``FlowMatchEulerDiscreteScheduler``; default one with ``config.flow_shift``.
        model_config: the :class:`ModelConfig` the model was built from (recorded on save).
        config: inference defaults.
    """

    def __init__(
        self,
        transformer: SamaTransformer3DModel,
        vae: LatentAutoencoder,
        text_encoder: TextEncoder,
        scheduler: Any = None,
        model_config: ModelConfig | None = None,
        config: PipelineConfig | None = None,
    ):
        from diffusers import FlowMatchEulerDiscreteScheduler

        self.transformer = transformer
        self.vae = vae
        self.text_encoder = text_encoder
        self.config = resolve(config or PipelineConfig(), getattr(model_config, "parity", None), "inference")
        self.scheduler = scheduler or FlowMatchEulerDiscreteScheduler(shift=self.config.flow_shift)
        # Parity knobs resolved, so the export's manifest records concrete values.
        self.model_config = model_config.resolved() if model_config is not None else None
        # Set by enable_model_cpu_offload: the device the text encoder and autoencoder visit.
        self._offload_device: torch.device | None = None
        # A prompt -> embeddings cache, alive only during edit_video (its windows share one prompt).
        self._text_cache: dict[tuple, torch.Tensor] | None = None
        # What the frozen encoders are (sama.models.presets.encoder_identity), recorded on save:
        # an export's own model config no longer names the checkpoints its encoders came from.
        # None: derived from model_config when saved.
        self.encoder_identity: dict[str, Any] | None = None
        check_compatible(transformer, vae, text_encoder, "<pipeline>")

    @classmethod
    def from_components(
        cls, components: SamaComponents, config: PipelineConfig | None = None
    ) -> SamaEditPipeline:
        """A pipeline over :func:`sama.models.build_model`'s components (needs the vae and text encoder)."""
        if components.vae is None or components.text_encoder is None:
            raise ValueError(
                "the pipeline needs the autoencoder and the text encoder (build them with build_model)"
            )
        return cls(
            components.transformer, components.vae, components.text_encoder, None, components.config, config
        )

    # ----------------------------------------------------------------------------------------

    @property
    def device(self) -> torch.device:
        return next(self.transformer.parameters()).device

    @property
    def dtype(self) -> torch.dtype:
        """The dtype the transformer computes in (its inputs are cast to it)."""
        # Not the first parameter's: diffusers keeps a few Wan modules (scale_shift_table, the
        # time embedder) in float32 in a bf16 model, and the first parameter is one of them.
        return self.transformer.patch_embedding.weight.dtype

    def to(self, device: torch.device | str) -> SamaEditPipeline:
        """Move every model to ``device`` (ending any CPU offload); returns self."""
        self._offload_device = None
        for module in (self.transformer, self.vae, self.text_encoder):
            module.to(device)
        return self

    def enable_model_cpu_offload(self, device: torch.device | str) -> SamaEditPipeline:
        """Run the transformer on ``device`` and keep the text encoder and autoencoder in CPU memory,
        moving each to ``device`` only while it encodes or decodes; returns self.

        Frees their GPU memory (umT5-XXL alone is about 11 GB in bf16) for the transformer's
        activations, at the cost of a host-to-device copy per use. With ``device="cpu"`` nothing
        moves. :meth:`to` ends it.
        """
        self._offload_device = torch.device(device)
        self.transformer.to(self._offload_device)
        self.text_encoder.to("cpu")
        self.vae.to("cpu")
        return self

    def enable_vae_tiling(self) -> bool:
        """Decode and encode in spatial tiles (diffusers' ``AutoencoderKLWan.enable_tiling``) to
        bound the autoencoder's memory at large sizes. Returns whether tiling is on: the tiny
        space-to-depth autoencoder is a per-pixel rearrangement with no activations to bound, so
        there it does nothing and returns False."""
        from sama.models.autoencoders import WanAutoencoder

        if isinstance(self.vae, WanAutoencoder):
            self.vae.vae.enable_tiling()
            return True
        return False

    @contextlib.contextmanager
    def _on_device(self, module: torch.nn.Module) -> Iterator[None]:
        """Under CPU offload, ``module`` on the offload device for the block, then back on the CPU."""
        if self._offload_device is None or self._offload_device.type == "cpu":
            yield
            return
        module.to(self._offload_device)
        try:
            yield
        finally:
            module.to("cpu")
            if self._offload_device.type == "cuda":
                torch.cuda.empty_cache()

    def _encode_prompts(
        self, prompt: str, negative: str, do_cfg: bool, device: torch.device, dtype: torch.dtype
    ) -> torch.Tensor:
        """Text embeddings ``[prompt]`` or, with CFG, ``[prompt, negative]`` (one batched forward)."""
        key = (prompt, negative if do_cfg else None, str(device), dtype)
        if self._text_cache is not None and key in self._text_cache:
            return self._text_cache[key]
        with self._on_device(self.text_encoder):
            text = self.text_encoder.encode([prompt], device=device, dtype=dtype)
            if do_cfg:
                negative_text = self.text_encoder.encode(
                    [negative], allow_empty=True, device=device, dtype=dtype
                )
                text = torch.cat([text, negative_text])
        if self._text_cache is not None:
            self._text_cache[key] = text
        return text

    @property
    def num_semantic_tokens(self) -> int:
        """Semantic tokens the sampler carries (0 when the branch is off or absent)."""
        if not self.config.semantic or self.transformer.semantic_projector is None:
            return 0
        anchors = self.model_config.semantic.num_anchors if self.model_config is not None else 1
        return anchors * self.transformer.semantic_tokens_per_anchor

    def build_prompts(
        self, instruction: str, add_prefix: bool | None = None, negative_prompt: str | None = None
    ) -> tuple[str, str]:
        """``(prompt, negative_prompt)`` for ``instruction``.

        Raises:
            ValueError: the instruction is empty or whitespace.
        """
        if not isinstance(instruction, str) or not clean_prompt(instruction):
            raise ValueError("the instruction is empty: say what to change, e.g. 'make the ball red'")
        use_prefix = self.config.add_prefix if add_prefix is None else add_prefix
        text = clean_prompt(instruction)
        prefix = self.config.prompt_prefix
        prompt = text if not use_prefix or text.startswith(prefix.strip()) else prefix + text
        if negative_prompt is None:
            negative_prompt = self.config.negative_prompt
        if negative_prompt is None:
            negative_prompt = EDIT_NEGATIVE_PROMPT if prompt.startswith(prefix.strip()) else ""
        return prompt, negative_prompt

    @torch.no_grad()
    def __call__(
        self,
        video: np.ndarray | torch.Tensor | Sequence[np.ndarray],
        instruction: str,
        *,
        num_inference_steps: int | None = None,
        guidance_scale: float | None = None,
        negative_prompt: str | None = None,
        add_prefix: bool | None = None,
        seed: int | None = 0,
        generator: torch.Generator | None = None,
        output_type: Literal["np", "latent"] = "np",
        callback: Callable[[int, int], None] | None = None,
        num_frames: int | None = None,
        stochastic_sampling: bool | None = None,
    ) -> SamaEditOutput:
        """Edit ``video`` as ``instruction`` says.

        Args:
            video: ``(T, H, W, 3)`` uint8 frames (a list of ``(H, W, 3)`` frames, or one
                ``(H, W, 3)`` image, also work). Any T >= 1 and any size.
            instruction: the edit, without the ``[Video edit] `` prefix (added when ``add_prefix``).
            num_inference_steps / guidance_scale / negative_prompt / add_prefix: override the
                pipeline's :class:`PipelineConfig`.
            seed: seeds a CPU generator for the initial noise (ignored when ``generator`` is given).
            generator: the noise generator.
            output_type: ``"np"`` decodes frames; ``"latent"`` stops at the latents.
            callback: called as ``callback(step, total)`` after every step.
            num_frames: frames of the output (default: the source's). A task can ask for another
                length than its source's: restoring a 2x sped-up clip to normal speed doubles it.
            stochastic_sampling: override :attr:`PipelineConfig.stochastic_sampling`; the fresh
                noise of every step comes from ``generator`` too.

        Returns:
            :class:`SamaEditOutput` with the input's size and ``num_frames`` frames (default: the
            input's frame count).
        """
        frames = _as_frames(video)
        prompt, negative = self.build_prompts(instruction, add_prefix, negative_prompt)
        steps = int(num_inference_steps or self.config.num_inference_steps)
        if steps < 1:
            raise ValueError(f"num_inference_steps must be at least 1, got {steps}")
        scale = float(self.config.guidance_scale if guidance_scale is None else guidance_scale)
        do_cfg = scale != 1.0
        if generator is None:
            generator = torch.Generator("cpu").manual_seed(int(seed or 0))

        device, dtype = self.device, self.dtype
        source_frames, height, width, _ = frames.shape
        num_frames = source_frames if num_frames is None else int(num_frames)
        if num_frames < 1:
            raise ValueError(f"num_frames must be at least 1, got {num_frames}")
        source = self.encode_frames(frames).to(dtype)
        temporal = self.vae.temporal_compression
        # The output's latent frames: num_frames padded to k * temporal + 1, as the source was.
        target_shape = (*source.shape[:2], -(-(num_frames - 1) // temporal) + 1, *source.shape[3:])

        text = self._encode_prompts(prompt, negative, do_cfg, device, dtype)

        latents = randn(target_shape, generator, device)
        num_semantic = self.num_semantic_tokens
        semantic = None
        if num_semantic:
            semantic_dim = int(self.transformer.config.semantic_dim)
            semantic = randn((1, num_semantic, semantic_dim), generator, device)

        stochastic = self.config.stochastic_sampling if stochastic_sampling is None else stochastic_sampling
        scheduler = self._fresh_scheduler(stochastic=bool(stochastic))
        self._set_timesteps(scheduler, steps, device)
        semantic_scheduler = copy.deepcopy(scheduler)
        total = len(scheduler.timesteps)
        for index, timestep in enumerate(scheduler.timesteps):
            branches = 2 if do_cfg else 1
            out = self.transformer(
                hidden_states=latents.to(dtype).repeat(branches, 1, 1, 1, 1),
                timestep=timestep.expand(branches).to(device),
                encoder_hidden_states=text,
                source_latents=source.repeat(branches, 1, 1, 1, 1),
                semantic_tokens=semantic.to(dtype).repeat(branches, 1, 1) if semantic is not None else None,
            )
            # float32 so the scheduler (which returns the model output's dtype) keeps fp32 latents.
            velocity = _guide(out.sample.float(), scale, do_cfg)
            latents = scheduler.step(velocity, timestep, latents, generator=generator, return_dict=False)[0]
            if semantic is not None:
                semantic_velocity = _guide(out.semantic.float(), scale, do_cfg)
                semantic = semantic_scheduler.step(
                    semantic_velocity, timestep, semantic, generator=generator, return_dict=False
                )[0]
            if callback is not None:
                callback(index + 1, total)

        if output_type == "latent":
            return SamaEditOutput(frames=None, latents=latents)
        if output_type != "np":
            raise ValueError(f"output_type must be 'np' or 'latent', got {output_type!r}")
        with self._on_device(self.vae):
            decoded = self.vae.decode(latents.float())[0, :, :num_frames, :height, :width]
        return SamaEditOutput(frames=_to_uint8(decoded), latents=latents)

    @torch.no_grad()
    def edit_video(
        self,
        video: np.ndarray | torch.Tensor | Sequence[np.ndarray],
        instruction: str,
        fps: float,
        *,
        max_frames: int | None = None,
        keep_bucket: bool = False,
        num_inference_steps: int | None = None,
        guidance_scale: float | None = None,
        negative_prompt: str | None = None,
        add_prefix: bool | None = None,
        seed: int | None = 0,
        progress: bool | None = None,
        callback: Callable[[int, int], None] | None = None,
        stochastic_sampling: bool | None = None,
    ) -> SamaVideoEdit:
        """Edit a real video at the size, rate and length the model was trained at, then restore it.

        1. Size: the source is resized and center-cropped (:func:`sama.video.resize_center_crop`,
           as the prep jobs cut clips) to the bucket of ``config.buckets`` nearest its aspect ratio.
        2. Rate: it is resampled by timestamp (:func:`sama.video.resample_indices`, nearest frame)
           to ``config.fps``, or kept at its own rate when that is lower (as prep-pairs never raises
           a clip's rate: repeated frames would only cost tokens).
        3. Length: clips longer than ``max_frames`` (default ``config.max_frames``, floored to 4k+1)
           are edited in consecutive windows (:func:`plan_windows`), each conditioned on its own
           source frames only, with the same seed, so every window starts from the same noise.
           Windows do not overlap and are not blended: the edit may change between the last frame
           of one window and the first of the next (a seam). An overlap cross-faded across windows
           would trade that jump for ghosting where two windows disagree and cost extra windows,
           so it is not done; with one window per clip (up to ``max_frames`` frames at the
           training rate, about 5 s at 81 frames and 16 fps) there is no seam.
        4. Restore (unless ``keep_bucket``): every source frame takes the edited frame nearest in
           time, and the edited frames are scaled back onto the region of the source the crop kept
           (:func:`sama.video.paste_center_crop`); the margins the crop dropped, which the model
           never saw, keep the source's pixels.

        Args:
            video: ``(T, H, W, 3)`` uint8 frames (or a list of frames, or one image).
            instruction: the edit (see :meth:`__call__`).
            fps: the source's frame rate.
            max_frames: frames per window (default ``config.max_frames``).
            keep_bucket: return the edited bucket-size frames at the processing rate instead.
            num_inference_steps / guidance_scale / negative_prompt / add_prefix / seed /
                stochastic_sampling: as for :meth:`__call__`, applied to every window.
            progress: show a tqdm bar over windows x steps (default: when stderr is a terminal).
            callback: ``callback(step, total)`` after every step, counted over all windows.

        Returns:
            :class:`SamaVideoEdit`: the frames (the source's count, size and rate, or the bucket's
            with ``keep_bucket``) and what was processed.
        """
        from tqdm.auto import tqdm

        from sama import video as media

        started = time.monotonic()
        frames = _as_frames(video)
        fps = float(fps)
        if not fps > 0:
            raise ValueError(f"fps must be positive, got {fps}")
        self.build_prompts(instruction, add_prefix, negative_prompt)  # an empty instruction fails here
        steps = int(num_inference_steps or self.config.num_inference_steps)
        num_source, height, width, _ = frames.shape
        bucket = self.config.buckets.nearest(height, width)
        work_fps = min(fps, float(self.config.fps))
        kept = media.resample_indices(num_source, fps, work_fps)
        work = media.resize_center_crop(frames[kept], bucket.height, bucket.width)
        windows = plan_windows(len(work), int(max_frames or self.config.max_frames))
        total = len(windows) * steps
        show = sys.stderr.isatty() if progress is None else progress
        bar = tqdm(total=total, desc="sama edit", unit="step", disable=not show)
        edited = []
        self._text_cache = {}
        try:
            for number, (start, stop) in enumerate(windows):
                bar.set_postfix_str(f"window {number + 1}/{len(windows)}")
                done = number * steps

                def on_step(step: int, _total: int, done: int = done) -> None:
                    bar.update(1)
                    if callback is not None:
                        callback(done + step, total)

                out = self(
                    work[start:stop],
                    instruction,
                    num_inference_steps=steps,
                    guidance_scale=guidance_scale,
                    negative_prompt=negative_prompt,
                    add_prefix=add_prefix,
                    seed=seed,
                    callback=on_step,
                    stochastic_sampling=stochastic_sampling,
                )
                assert out.frames is not None
                edited.append(out.frames)
        finally:
            self._text_cache = None
            bar.close()
        result = np.concatenate(edited)
        out_fps = work_fps
        if not keep_bucket:
            back = media.resample_indices(len(result), work_fps, fps, length=num_source)
            result = media.paste_center_crop(result[back], frames)
            out_fps = fps
        return SamaVideoEdit(
            frames=result,
            fps=out_fps,
            bucket=bucket,
            processed_frames=len(work),
            processed_fps=work_fps,
            windows=windows,
            seconds=time.monotonic() - started,
        )

    def encode_frames(self, frames: np.ndarray) -> torch.Tensor:
        """``(T, H, W, 3)`` uint8 frames -> ``(1, C, T', H', W')`` float32 latents, the video first
        padded as :func:`pad_video` does to a size the autoencoder and the patch grid accept."""
        _, p_h, p_w = self.transformer.config.patch_size
        spatial = self.vae.spatial_compression
        padded = pad_video(frames, self.vae.temporal_compression, spatial * p_h, spatial * p_w)
        pixels = torch.from_numpy(np.ascontiguousarray(padded)).to(self.device)
        pixels = pixels.permute(3, 0, 1, 2).unsqueeze(0).float().div(127.5).sub(1.0)
        with self._on_device(self.vae):
            return self.vae.encode(pixels).float()

    def _fresh_scheduler(self, stochastic: bool = False):
        # A new instance per call: schedulers keep a step counter, and a pipeline may be shared.
        if stochastic and "stochastic_sampling" not in self.scheduler.config:
            raise ValueError(
                f"stochastic_sampling needs a scheduler that has it (FlowMatchEulerDiscreteScheduler); "
                f"this pipeline's is {type(self.scheduler).__name__}"
            )
        has_option = "stochastic_sampling" in self.scheduler.config
        overrides = {"stochastic_sampling": stochastic} if has_option else {}
        return type(self.scheduler).from_config(self.scheduler.config, **overrides)

    def _set_timesteps(self, scheduler: Any, steps: int, device: torch.device | str | None) -> None:
        """The sampler's sigmas for ``steps`` steps, as ``config.sigma_grid`` says."""
        parity = getattr(self.model_config, "parity", None)
        grid = self.config.sigma_grid or profile_value(parity, "inference", "sigma_grid")
        set_scheduler_sigmas(scheduler, steps, grid, self.config.flow_shift, device)

    # ----------------------------------------------------------------------------------------
    # Persistence

    def load_lora(self, adapter_dir: str, *, merge: bool = True) -> dict[str, Any]:
        """Apply a LoRA adapter export (``model.lora_export = "adapter"``, see
        :mod:`sama.models.lora`) to this pipeline's transformer, in place: its SAMA modules replace
        the transformer's and its adapters are folded into the weights (``merge=False`` keeps them
        as peft layers). Returns the adapter's manifest (``base`` names the export it was trained
        over).

        Raises:
            ModelDirectoryError: ``adapter_dir`` is not an adapter export, or does not fit the model.
        """
        from sama.models.lora import load_adapter

        path = os.fspath(adapter_dir)
        if not os.path.isdir(path):
            raise ModelDirectoryError(path, "LoRA adapter directory does not exist")
        try:
            return load_adapter(self.transformer, path, merge=merge)
        except (OSError, ValueError, KeyError, RuntimeError) as exc:
            raise ModelDirectoryError(path, f"cannot apply the LoRA adapter: {exc}") from exc

    def save_pretrained(self, directory: str, *, copy_frozen: bool = True) -> None:
        """Write the whole pipeline to a local ``directory`` (see the module docstring).

        With ``copy_frozen=False`` the autoencoder and text encoder are recorded by reference when
        they came from a checkpoint (their ``pretrained`` source), which saves copying e.g. umT5-XXL
        into every export; models built from scratch are always copied.
        """
        os.makedirs(directory, exist_ok=True)
        self.transformer.save_pretrained(os.path.join(directory, "transformer"))
        self.scheduler.save_pretrained(os.path.join(directory, "scheduler"))
        components: dict[str, Any] = {
            "transformer": {"path": "transformer"},
            "scheduler": {"path": "scheduler"},
        }
        config = self.model_config
        vae_ref = config.component_source("vae") if config is not None and not copy_frozen else None
        text_ref = config.component_source("text") if config is not None and not copy_frozen else None
        if vae_ref is not None and config is not None:
            components["vae"] = {"pretrained": vae_ref, "subfolder": config.vae.subfolder}
        else:
            self.vae.save_pretrained(os.path.join(directory, "vae"))
            components["vae"] = {"path": "vae"}
        if text_ref is not None and config is not None:
            components["text_encoder"] = {"pretrained": text_ref}
        else:
            self.text_encoder.save_pretrained(directory, "text_encoder", "tokenizer")
            components["text_encoder"] = {"path": "text_encoder", "tokenizer": "tokenizer"}
        manifest = {
            "format": PIPELINE_FORMAT,
            "format_version": PIPELINE_FORMAT_VERSION,
            "model": config.to_dict() if config is not None else None,
            "pipeline": asdict(self.config),
            "text_max_length": self.text_encoder.max_length,
            "components": components,
            "encoders": self.encoder_identity or (encoder_identity(config) if config is not None else None),
        }
        tmp = os.path.join(directory, PIPELINE_FILE + ".tmp")
        with open(tmp, "w") as handle:
            # No credential of a weight source (a URI's userinfo, a signed query) outlives the run.
            json.dump(redact_config(manifest), handle, indent=2)
        # Written last and atomically: a directory with the manifest is a complete export.
        os.replace(tmp, os.path.join(directory, PIPELINE_FILE))

    @classmethod
    def from_pretrained(
        cls,
        directory: str,
        *,
        device: torch.device | str | None = None,
        torch_dtype: torch.dtype | None = None,
    ) -> SamaEditPipeline:
        """Load a pipeline written by :meth:`save_pretrained` (read by :class:`SamaExport`).

        Raises:
            ModelDirectoryError: the directory is missing, is not a SAMA pipeline export, or holds
                components that are missing, unreadable or do not fit together.
        """
        export = SamaExport.read(directory)
        model_config = export.model_config
        dtype = torch_dtype or (torch_dtype_of(model_config) if model_config is not None else None)
        transformer = export.load_transformer(dtype)
        vae = export.load_vae(dtype)
        text_encoder = export.load_text_encoder(dtype)
        scheduler = export.load_scheduler()
        check_compatible(transformer, vae, text_encoder, export.where)
        pipeline = cls(transformer, vae, text_encoder, scheduler, model_config, export.pipeline_config)
        pipeline.encoder_identity = export.encoders
        if device is not None:
            pipeline.to(device)
        return pipeline


@dataclass
class SamaExport:
    """A SAMA export (what :meth:`SamaEditPipeline.save_pretrained` writes), its manifest read.

    The one reader of the format: :meth:`SamaEditPipeline.from_pretrained`, training's
    ``model.init_from`` and ``sama precompute`` load an export's components through it, each only
    the ones it needs. :meth:`read` reads the manifest alone; the weights of a remote export are
    fetched once, when a component is first loaded (:attr:`path`).

    Attributes:
        uri: where the export is (a local directory, ``file://`` or ``s3://``).
        manifest: its parsed ``sama_pipeline.json``.
        model_config: the model configuration it records (None when it records none).
        pipeline_config: its inference defaults.
    """

    uri: str
    manifest: dict
    model_config: ModelConfig | None
    pipeline_config: PipelineConfig
    _local: str | None = field(default=None, repr=False)

    @classmethod
    def read(cls, uri: str | os.PathLike) -> SamaExport:
        """The export at ``uri``, from its manifest alone (no weights read).

        Raises:
            ModelDirectoryError: ``uri`` does not exist, is a file, holds no manifest (a raw Wan
                checkpoint is named as such), or its manifest is unreadable or of another format.
        """
        from sama import storage

        text = os.fspath(uri)
        where = storage.redact(text)
        manifest_uri = storage.join(text, PIPELINE_FILE)
        if not storage.exists(manifest_uri):
            local = storage.local_path(text)
            if not storage.exists(text):
                raise ModelDirectoryError(where, "model directory does not exist")
            if local is not None and not os.path.isdir(local):
                raise ModelDirectoryError(where, "is a file, not a model directory")
            hint = (
                " (it looks like a raw Wan checkpoint: build a model from it with "
                "sama.models.build_model(preset, pretrained=...) and export it)"
                if storage.exists(storage.join(text, "transformer"))
                else ""
            )
            raise ModelDirectoryError(where, f"not a SAMA model directory: {PIPELINE_FILE} is missing{hint}")
        try:
            manifest_text = storage.read_text(manifest_uri)
        except OSError as exc:
            raise ModelDirectoryError(where, f"{PIPELINE_FILE} is unreadable: {exc}") from exc
        return cls(text, *parse_manifest(manifest_text, where))

    @property
    def where(self) -> str:
        """The export's location, fit for a message (credentials redacted)."""
        from sama import storage

        return storage.redact(self.uri)

    @property
    def path(self) -> str:
        """The export as a local directory: a remote one is fetched on first use
        (:func:`sama.storage.localize_dir`, cached across processes)."""
        from sama import storage

        if self._local is None:
            self._local = storage.localize_dir(self.uri)
        return self._local

    @property
    def encoders(self) -> dict[str, Any] | None:
        """The identity of the frozen encoders it was exported with (None in older exports)."""
        return self.manifest.get("encoders") or None

    def _load(self, name: str, loader: Callable[[dict], Any]) -> Any:
        """``loader(entry)`` of component ``name``'s manifest entry, its failures as
        :class:`ModelDirectoryError` naming the component and where it is."""
        entry = (self.manifest.get("components") or {}).get(name)
        if not isinstance(entry, dict):
            raise ModelDirectoryError(self.where, f"{PIPELINE_FILE} does not describe the {name}")
        local = entry.get("path")
        if local is not None and not os.path.isdir(os.path.join(self.path, local)):
            raise ModelDirectoryError(os.path.join(self.where, local), f"the {name} directory is missing")
        try:
            return loader(entry)
        except ModelDirectoryError:
            raise
        except (OSError, ValueError, KeyError, TypeError, RuntimeError) as exc:
            where = (
                os.path.join(self.where, local) if local is not None else entry.get("pretrained", self.where)
            )
            raise ModelDirectoryError(where, f"cannot load the {name}: {exc}") from exc

    def load_transformer(self, dtype: torch.dtype | None = None) -> SamaTransformer3DModel:
        """The exported transformer (the EMA weights of the run that wrote it)."""
        return self._load(
            "transformer",
            lambda entry: SamaTransformer3DModel.from_pretrained(
                os.path.join(self.path, entry["path"]), torch_dtype=dtype
            ),
        )

    def load_vae(
        self, dtype: torch.dtype | None = None, model_config: ModelConfig | None = None
    ) -> LatentAutoencoder:
        """The autoencoder: the export's own copy, or the checkpoint it references.
        ``model_config`` stands in for the manifest's when that records none."""
        config = self.model_config or model_config

        def load(entry: dict) -> LatentAutoencoder:
            if "path" in entry:
                sample = config.vae.sample_posterior if config is not None else False
                vae_dir = os.path.join(self.path, entry["path"])
                if os.path.isfile(os.path.join(vae_dir, "config.json")):
                    return load_autoencoder(vae_dir, torch_dtype=dtype, sample_posterior=sample)
                return load_autoencoder(vae_dir)
            if config is None:
                raise ValueError("a referenced autoencoder needs the model config in the manifest")
            return build_autoencoder(config.vae, entry["pretrained"], dtype or torch.float32)

        return self._load("vae", load)

    def load_text_encoder(
        self, dtype: torch.dtype | None = None, model_config: ModelConfig | None = None
    ) -> TextEncoder:
        """The text encoder and its tokenizer: the export's own copy, or the checkpoint it
        references. ``model_config`` stands in for the manifest's when that records none."""
        config = self.model_config or model_config

        def load(entry: dict) -> TextEncoder:
            max_length = int(
                self.manifest.get("text_max_length") or (config.text.max_length if config else 512)
            )
            if "path" in entry:
                return TextEncoder.from_pretrained(
                    self.path,
                    max_length=max_length,
                    subfolder=entry["path"],
                    tokenizer_subfolder=entry.get("tokenizer", "tokenizer"),
                    torch_dtype=dtype,
                )
            if config is None:
                raise ValueError("a referenced text encoder needs the model config in the manifest")
            return build_text_encoder(config.text, entry["pretrained"], dtype or torch.float32)

        return self._load("text_encoder", load)

    def load_scheduler(self) -> Any:
        """The flow-match Euler scheduler the export was saved with."""
        from diffusers import FlowMatchEulerDiscreteScheduler

        return self._load(
            "scheduler",
            lambda entry: FlowMatchEulerDiscreteScheduler.from_pretrained(
                os.path.join(self.path, entry["path"])
            ),
        )


def _guide(prediction: torch.Tensor, scale: float, do_cfg: bool) -> torch.Tensor:
    """Text CFG on a ``[cond, uncond]`` batch: ``uncond + scale * (cond - uncond)``."""
    if not do_cfg:
        return prediction
    cond, uncond = prediction.float().chunk(2)
    return uncond + scale * (cond - uncond)


def check_compatible(
    transformer: SamaTransformer3DModel, vae: LatentAutoencoder, text_encoder: TextEncoder, path: str
) -> None:
    """Raise :class:`ModelDirectoryError` (naming ``path``) when the transformer does not take the
    autoencoder's latent channels or the text encoder's width."""
    problems = []
    if int(transformer.config.in_channels) != vae.latent_channels:
        problems.append(
            f"the transformer takes {transformer.config.in_channels} latent channels but the autoencoder "
            f"makes {vae.latent_channels}"
        )
    if int(transformer.config.text_dim) != text_encoder.hidden_size:
        problems.append(
            f"the transformer reads {transformer.config.text_dim}-d text but the text encoder is "
            f"{text_encoder.hidden_size}-d"
        )
    if problems:
        raise ModelDirectoryError(path, "incompatible components: " + "; ".join(problems))
