"""``sama edit``: edit one video file with an exported SAMA model and write an mp4.

:func:`run_edit` reads every frame of the source at its native rate (:mod:`sama.video`), edits it
with :meth:`sama.pipeline_edit.SamaEditPipeline.edit_video` (at the training bucket and frame rate
the export records, in windows of at most ``max_frames`` frames) and writes an H.264 mp4 through
:mod:`sama.storage` (local paths, ``file://`` or ``s3://``). The output has exactly the source's
frame count, size and frame rate; with ``keep_bucket`` it is the edited bucket-size clip at the
processing rate instead.

Odd sizes: H.264 in yuv420p (what :func:`sama.video.encode_mp4` writes, for compatibility with
every player) cannot store an odd width or height. Since the output must match the source's size,
an odd-sized source is refused before any work is done (``odd_size="error"``, the default); with
``odd_size="crop"`` the last row/column is dropped from the source first and the report says so.
"""

from __future__ import annotations

import logging
import time
from typing import Any, Literal

import torch

from sama import storage, video

__all__ = ["run_edit"]

log = logging.getLogger(__name__)


def run_edit(
    video_uri: str,
    instruction: str,
    model_dir: str,
    output_uri: str,
    steps: int | None = None,
    cfg: float | None = None,
    seed: int = 0,
    *,
    odd_size: Literal["error", "crop"] = "error",
    device: str | None = None,
    max_frames: int | None = None,
    keep_bucket: bool = False,
    dtype: str | None = None,
    offload: bool = False,
    tile_vae: bool = False,
    progress: bool | None = None,
    lora: str | None = None,
    sampler: Literal["euler", "stochastic"] | None = None,
) -> dict[str, Any]:
    """Edit ``video_uri`` as ``instruction`` says with the model in ``model_dir``; write ``output_uri``.

    Args:
        video_uri: source video (local path, ``file://`` or ``s3://``).
        instruction: the edit, e.g. "make the red ball blue" (the ``[Video edit] `` prefix is added).
        model_dir: a directory written by ``SamaEditPipeline.save_pretrained``: a local path,
            ``file://``, ``s3://`` or a hub id (fetched once, see :func:`sama.storage.localize_dir`).
        output_uri: where the mp4 goes.
        steps: Euler steps; cfg: text guidance scale (None: the model's own defaults, recorded in
            its export). seed: noise seed.
        odd_size: ``"error"`` or ``"crop"`` for odd-sized sources (see the module docstring).
        device: torch device; default CUDA when available, else CPU.
        max_frames: frames per window (default: the export's ``max_frames``, 81 unless recorded).
        keep_bucket: write the edited bucket-size clip at the processing rate, not the source's
            size and rate.
        dtype: ``"bfloat16"``, ``"float16"`` or ``"float32"`` for every model; default bfloat16 on
            CUDA and float32 on CPU.
        offload: keep the text encoder and autoencoder in CPU memory and move each to the device
            only while it runs (the transformer stays on the device).
        tile_vae: tiled VAE encode/decode (a Wan VAE only; the tiny autoencoder has nothing to tile
            and the report says ``vae_tiling: false``).
        progress: a progress bar over windows and steps (default: when stderr is a terminal).
        lora: a LoRA adapter export (local path, ``file://`` or ``s3://``) applied over
            ``model_dir`` (see ``SamaEditPipeline.load_lora``).
        sampler: ``"euler"`` (Euler steps along the predicted velocity) or ``"stochastic"`` (each
            step's clean estimate re-noised with fresh seeded noise, see
            ``PipelineConfig.stochastic_sampling``); default: the export's own.

    Returns:
        A report: source/output URIs, the output's frames, size and fps, the bucket, the processed
        clip's frames and fps, the windows, steps, cfg, sampler, seed, dtype, offload, vae_tiling,
        seconds, whether the source was cropped. The source's fps is taken as 24 when the container
        states none.

    Raises:
        ValueError: empty instruction, odd-sized source (with ``odd_size="error"``), bad arguments.
        sama.video.VideoDecodeError: the source cannot be read or has no frames.
        sama.pipeline_edit.ModelDirectoryError: ``model_dir`` is missing or not a usable SAMA model.
        sama.storage.StorageError: a remote ``model_dir`` cannot be fetched.
    """
    from sama.pipeline_edit import SamaEditPipeline

    if not isinstance(instruction, str) or not instruction.strip():
        raise ValueError("the instruction is empty: say what to change, e.g. 'make the ball red'")
    if odd_size not in ("error", "crop"):
        raise ValueError(f"odd_size must be 'error' or 'crop', got {odd_size!r}")
    if max_frames is not None and max_frames < 1:
        raise ValueError(f"max_frames must be at least 1, got {max_frames}")
    if sampler not in (None, *SAMPLERS):
        raise ValueError(f"sampler must be one of {SAMPLERS}, got {sampler!r}")
    started = time.monotonic()
    info = video.probe(video_uri)
    if not info.has_video:
        raise video.VideoDecodeError(video_uri, "no_video_stream", "no video stream to edit")
    height, width = info.height, info.width
    # A bucket-size output is always even-sized: only a source-size output needs even sides.
    cropped = bool(height % 2 or width % 2) and not keep_bucket
    if cropped and odd_size == "error":
        raise ValueError(
            f"{video_uri}: the source is {width}x{height}; an H.264 mp4 needs an even width and height, so "
            "the output could not match the source's size. Crop or pad the source to even sides, or pass "
            "odd_size='crop' to drop the last row/column."
        )
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    torch_dtype = _torch_dtype(dtype, device)
    pipeline = SamaEditPipeline.from_pretrained(
        storage.localize_dir(model_dir), device=None if offload else device, torch_dtype=torch_dtype
    )
    if lora is not None:
        pipeline.load_lora(storage.localize_dir(lora))
    if offload:
        pipeline.enable_model_cpu_offload(device)
    tiled = pipeline.enable_vae_tiling() if tile_vae else False
    frames = video.decode_clip(video_uri)
    if cropped:
        frames = frames[:, : frames.shape[1] // 2 * 2, : frames.shape[2] // 2 * 2]
    fps = info.fps if info.fps > 0 else 24.0
    log.info(
        "editing %s: %d frames %dx%d at %.3f fps",
        video_uri,
        len(frames),
        frames.shape[2],
        frames.shape[1],
        fps,
    )
    steps = int(steps or pipeline.config.num_inference_steps)
    cfg = float(pipeline.config.guidance_scale if cfg is None else cfg)
    stochastic = pipeline.config.stochastic_sampling if sampler is None else sampler == "stochastic"
    result = pipeline.edit_video(
        frames,
        instruction,
        fps,
        max_frames=max_frames,
        keep_bucket=keep_bucket,
        num_inference_steps=steps,
        guidance_scale=cfg,
        seed=seed,
        progress=progress,
        stochastic_sampling=stochastic,
    )
    edited = result.frames
    storage.write_bytes(output_uri, video.encode_mp4(edited, result.fps))
    return {
        "video": video_uri,
        "output": output_uri,
        "instruction": instruction,
        "model_dir": model_dir,
        "lora": lora,
        "frames": int(edited.shape[0]),
        "height": int(edited.shape[1]),
        "width": int(edited.shape[2]),
        "fps": float(result.fps),
        "source_frames": int(len(frames)),
        "source_fps": float(fps),
        "bucket": {"height": result.bucket.height, "width": result.bucket.width},
        "processed_frames": int(result.processed_frames),
        "processed_fps": float(result.processed_fps),
        "windows": len(result.windows),
        "window_frames": [stop - start for start, stop in result.windows],
        "keep_bucket": bool(keep_bucket),
        "steps": int(steps),
        "cfg": float(cfg),
        "sampler": "stochastic" if stochastic else "euler",
        "seed": int(seed),
        "dtype": str(torch_dtype).removeprefix("torch."),
        "offload": bool(offload),
        "vae_tiling": bool(tiled),
        "cropped_to_even": cropped,
        "edit_seconds": round(result.seconds, 3),
        "seconds": round(time.monotonic() - started, 3),
    }


SAMPLERS = ("euler", "stochastic")
DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}


def _torch_dtype(name: str | None, device: str) -> torch.dtype:
    """``name`` as a torch dtype; None: bfloat16 on CUDA (what Wan runs in), float32 elsewhere
    (CPUs run bf16 matmuls slowly or not at all)."""
    if name is None:
        return torch.bfloat16 if torch.device(device).type == "cuda" else torch.float32
    if name not in DTYPES:
        raise ValueError(f"dtype must be one of {', '.join(DTYPES)}, got {name!r}")
    return DTYPES[name]
