"""``sama edit``: edit one video file with an exported SAMA model and write an mp4.

:func:`run_edit` reads every frame of the source at its native rate (:mod:`sama.video`), runs
:class:`sama.pipeline_edit.SamaEditPipeline` and writes an H.264 mp4 at the source's frame rate
through :mod:`sama.storage` (local paths, ``file://`` or ``s3://``). The output has exactly the
source's frame count and size.

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
) -> dict[str, Any]:
    """Edit ``video_uri`` as ``instruction`` says with the model in ``model_dir``; write ``output_uri``.

    Args:
        video_uri: source video (local path, ``file://`` or ``s3://``).
        instruction: the edit, e.g. "make the red ball blue" (the ``[Video edit] `` prefix is added).
        model_dir: a local directory written by ``SamaEditPipeline.save_pretrained``.
        output_uri: where the mp4 goes.
        steps: Euler steps; cfg: text guidance scale (None: the model's own defaults, recorded in
            its export). seed: noise seed.
        odd_size: ``"error"`` or ``"crop"`` for odd-sized sources (see the module docstring).
        device: torch device; default CUDA when available, else CPU.

    Returns:
        A report: source/output URIs, frames, size, fps, steps, cfg, seed, seconds, whether the
        source was cropped. The output's fps is the source's (24 when the container states none).

    Raises:
        ValueError: empty instruction, odd-sized source (with ``odd_size="error"``), bad arguments.
        sama.video.VideoDecodeError: the source cannot be read or has no frames.
        sama.pipeline_edit.ModelDirectoryError: ``model_dir`` is missing or not a usable SAMA model.
    """
    from sama.pipeline_edit import SamaEditPipeline

    if not isinstance(instruction, str) or not instruction.strip():
        raise ValueError("the instruction is empty: say what to change, e.g. 'make the ball red'")
    if odd_size not in ("error", "crop"):
        raise ValueError(f"odd_size must be 'error' or 'crop', got {odd_size!r}")
    started = time.monotonic()
    info = video.probe(video_uri)
    if not info.has_video:
        raise video.VideoDecodeError(video_uri, "no_video_stream", "no video stream to edit")
    height, width = info.height, info.width
    cropped = bool(height % 2 or width % 2)
    if cropped and odd_size == "error":
        raise ValueError(
            f"{video_uri}: the source is {width}x{height}; an H.264 mp4 needs an even width and height, so "
            "the output could not match the source's size. Crop or pad the source to even sides, or pass "
            "odd_size='crop' to drop the last row/column."
        )
    pipeline = SamaEditPipeline.from_pretrained(
        model_dir, device=device or ("cuda" if torch.cuda.is_available() else "cpu")
    )
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
    result = pipeline(frames, instruction, num_inference_steps=steps, guidance_scale=cfg, seed=seed)
    edited = result.frames
    storage.write_bytes(output_uri, video.encode_mp4(edited, fps))
    return {
        "video": video_uri,
        "output": output_uri,
        "instruction": instruction,
        "model_dir": model_dir,
        "frames": int(edited.shape[0]),
        "height": int(edited.shape[1]),
        "width": int(edited.shape[2]),
        "fps": float(fps),
        "steps": int(steps),
        "cfg": float(cfg),
        "seed": int(seed),
        "cropped_to_even": cropped,
        "seconds": round(time.monotonic() - started, 3),
    }
