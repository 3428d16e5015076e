"""Benchmark one SAMA training step: forward + backward (+ AdamW) time, tokens/s, FLOP/s and MFU.

Two uses:

* ``python bench/model_step.py`` (CPU is fine): the ``tiny`` preset on a synthetic 17-frame 64x64
  edit pair, through the real frozen encoders (space-to-depth autoencoder, tiny umT5, tiny SigLIP).
* ``python bench/model_step.py --preset wan2.1-1.3b`` on a CUDA GPU: Wan2.1-1.3B with *random*
  weights (nothing is downloaded) at 480p x 49 frames, i.e. latents 16 x 13 x 60 x 104, so
  13*30*52 = 20280 target tokens + 20280 source tokens + 65 semantic tokens = 40625 tokens. The
  frozen encoders are skipped: random latents, umT5-sized text embeddings (512 x 4096) and
  SigLIP-sized anchor tokens (65 x 1152) stand in for them. Weights are fp32 with bf16 autocast (as
  in training), attention is PyTorch SDPA restricted to the flash kernel (falling back to the other
  fused kernels if flash is unavailable; ``--sdpa fused`` also allows cuDNN and memory-efficient
  attention, which PyTorch may pick when faster), and activation checkpointing is on by default for
  every preset but ``tiny`` (without it 1.3B at 480p x 49 with source tokens does not fit in 80 GB).

FLOPs and the peak come from :mod:`sama.train.flops`, the same model and table as the trainer's
``perf/mfu`` (``--peak-tflops`` overrides the peak).

Prints a table of numbers; exits non-zero (with the error) when anything fails.
"""

from __future__ import annotations

import argparse
import contextlib
import math
import os
import sys
import time
import traceback

sys.path.insert(0, os.path.abspath(os.path.join(os.path.dirname(__file__), "..")))

import torch

from sama.models.config import ModelConfig
from sama.train.flops import get_peak_flops, step_flops


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--preset", default="tiny", help="tiny, wan2.1-1.3b, wan2.1-14b, wan2.2-5b")
    parser.add_argument(
        "--frames", type=int, default=None, help="video frames (default 17 tiny, 49 otherwise)"
    )
    parser.add_argument("--height", type=int, default=None, help="pixels (default 64 tiny, 480 otherwise)")
    parser.add_argument("--width", type=int, default=None, help="pixels (default 64 tiny, 832 otherwise)")
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--no-source", action="store_true", help="text-to-video samples (no source tokens)")
    parser.add_argument("--no-semantic", action="store_true", help="turn Semantic Anchoring off")
    parser.add_argument("--device", default=None, help="cuda or cpu (default: cuda when available)")
    parser.add_argument(
        "--dtype",
        choices=("auto", "bf16", "fp32"),
        default="auto",
        help="autocast dtype (auto: bf16 on CUDA)",
    )
    parser.add_argument(
        "--gradient-checkpointing",
        choices=("auto", "on", "off"),
        default="auto",
        help="auto: on except for tiny",
    )
    parser.add_argument(
        "--sdpa", choices=("flash", "fused", "any"), default="flash", help="SDPA kernels allowed on CUDA"
    )
    parser.add_argument("--no-optimizer", action="store_true", help="time forward + backward only")
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--steps", type=int, default=5, help="timed steps")
    parser.add_argument("--peak-tflops", type=float, default=None, help="override the device's bf16 peak")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    return parser.parse_args(argv)


def sdpa_context(mode: str, device: torch.device):
    """Restrict SDPA to the chosen kernels on CUDA (no-op on CPU)."""
    if device.type != "cuda" or mode == "any":
        return contextlib.nullcontext()
    from torch.nn.attention import SDPBackend, sdpa_kernel

    if mode == "flash":
        return sdpa_kernel([SDPBackend.FLASH_ATTENTION])
    return sdpa_kernel(
        [SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.CUDNN_ATTENTION]
    )


def peak_tflops(device: torch.device, override: float | None) -> tuple[float | None, str]:
    """The peak in TFLOP/s (:func:`sama.train.flops.get_peak_flops`) and where it came from."""
    peak = get_peak_flops(device, None if override is None else override * 1e12)
    if override is not None:
        source = "given"
    else:
        source = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    return (None if peak is None else peak / 1e12), source


def build_inputs(args, config: ModelConfig, device: torch.device):
    """(components, batch): the tiny preset encodes real frames; others use random stand-ins."""
    import numpy as np

    from sama.models import build_model
    from sama.models.training import SamaBatch

    tiny = config.preset == "tiny"
    frames = args.frames or (17 if tiny else 49)
    height = args.height or (64 if tiny else 480)
    width = args.width or (64 if tiny else 832)
    if tiny:
        from sama import synthetic

        components = build_model(config)
        scene = synthetic.random_scene(0)
        edited, instruction = synthetic.make_edit(scene, "recolor", 0)
        target = np.stack([synthetic.render(edited, frames, 24.0, height, width)] * args.batch)
        source = np.stack([synthetic.render(scene, frames, 24.0, height, width)] * args.batch)
        batch = SamaBatch(
            prompts=[f"[Video edit] {instruction}"] * args.batch,
            target=target,
            source=None if args.no_source else source,
        )
        return components.to(device), batch, (frames, height, width)
    components = build_model(config, with_vae=False, with_text_encoder=False, with_semantic_encoder=False)
    components.to(device)
    t_comp, s_comp = config.vae.temporal_compression, config.vae.spatial_compression
    if (frames - 1) % t_comp or height % s_comp or width % s_comp:
        raise ValueError(
            f"{frames}x{height}x{width} is not a {t_comp}k+1 clip with sides multiple of {s_comp}"
        )
    latent = (
        args.batch,
        config.vae.latent_channels,
        (frames - 1) // t_comp + 1,
        height // s_comp,
        width // s_comp,
    )
    gen = torch.Generator(device="cpu").manual_seed(0)
    batch = SamaBatch(
        prompts=["[Video edit] benchmark"] * args.batch,
        target_latents=torch.randn(latent, generator=gen).to(device),
        source_latents=None if args.no_source else torch.randn(latent, generator=gen).to(device),
        text_embeds=torch.randn(
            (args.batch, config.text.max_length, config.text.hidden_size), generator=gen
        ).to(device),
        semantic_tokens=None
        if args.no_semantic
        else torch.randn(
            (args.batch, config.semantic.tokens_per_sample, config.semantic.hidden_size), generator=gen
        ).to(device),
    )
    return components, batch, (frames, height, width)


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def run(args: argparse.Namespace) -> int:
    from sama.losses import LossConfig, TimestepSamplerConfig
    from sama.models.presets import get_preset
    from sama.models.training import SamaTrainingModule, TrainingModuleConfig

    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if device.type == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("--device cuda but no CUDA device is available")
    config = get_preset(args.preset)
    if args.no_semantic:
        config.semantic.enabled = False
    use_bf16 = args.dtype == "bf16" or (args.dtype == "auto" and device.type == "cuda")
    checkpointing = args.gradient_checkpointing == "on" or (
        args.gradient_checkpointing == "auto" and config.preset != "tiny"
    )
    torch.manual_seed(0)
    started = time.perf_counter()
    components, batch, (frames, height, width) = build_inputs(args, config, device)
    build_s = time.perf_counter() - started
    objective = TrainingModuleConfig(
        loss=LossConfig(timesteps=TimestepSamplerConfig(kind="logit_normal")), text_dropout_prob=0.0
    )
    module = SamaTrainingModule(components, objective).train()
    transformer = module.transformer
    if checkpointing:
        transformer.enable_gradient_checkpointing()
    optimizer = None
    if not args.no_optimizer:
        fused = device.type == "cuda"
        optimizer = torch.optim.AdamW(module.trainable_parameters(), lr=1e-5, weight_decay=0.01, fused=fused)
    generator = torch.Generator(device=device).manual_seed(0)

    sync(device)
    started = time.perf_counter()
    encoded = module.encode_batch(batch, generator)
    sync(device)
    encode_s = time.perf_counter() - started

    source = encoded.source_latents
    layout = transformer.sequence_layout(
        encoded.target_latents.shape,
        source.shape if source is not None else None,
        encoded.semantic_tokens.shape[1] if encoded.semantic_tokens is not None else 0,
    )
    text_len = encoded.text_embeds.shape[1]
    flops = step_flops(transformer, layout.num_source, layout.num_semantic, layout.num_target, text_len)

    autocast = (
        torch.autocast(device_type=device.type, dtype=torch.bfloat16)
        if use_bf16
        else contextlib.nullcontext()
    )
    sdpa_mode = args.sdpa

    def one_step() -> tuple[float, float, float]:
        sync(device)
        t0 = time.perf_counter()
        # The SDPA restriction must cover the backward too: activation checkpointing recomputes
        # the forward there, and a different kernel would save differently shaped tensors.
        with sdpa_context(sdpa_mode, device):
            with autocast:
                out = module.compute_loss(encoded, generator)
            out.loss.backward()
        sync(device)
        t1 = time.perf_counter()
        if optimizer is None:
            for param in module.trainable_parameters():
                param.grad = None
            return t1 - t0, 0.0, float(out.loss.detach())
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        sync(device)
        return t1 - t0, time.perf_counter() - t1, float(out.loss.detach())

    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    for index in range(max(args.warmup, 1)):
        try:
            one_step()
        except RuntimeError as exc:
            if index == 0 and sdpa_mode == "flash" and "kernel" in str(exc).lower():
                print(f"note: the flash SDPA kernel is unavailable here ({exc}); using the fused kernels")
                sdpa_mode = "fused"
                one_step()
            else:
                raise
    fwd_bwd, opt, losses = [], [], []
    for _ in range(args.steps):
        a, b, loss = one_step()
        fwd_bwd.append(a)
        opt.append(b)
        losses.append(loss)
    if not all(math.isfinite(x) for x in losses):
        raise RuntimeError(f"non-finite loss during the benchmark: {losses}")

    fwd_bwd_s = sorted(fwd_bwd)[len(fwd_bwd) // 2]
    opt_s = sorted(opt)[len(opt) // 2]
    step_s = fwd_bwd_s + opt_s
    seq = int(flops["seq"])
    peak, device_name = peak_tflops(device, args.peak_tflops)
    achieved = flops["total"] * args.batch / step_s / 1e12
    n_params = sum(p.numel() for p in module.trainable_parameters())

    rows = [
        ("preset", config.preset),
        ("device", device_name if device.type == "cuda" else f"cpu ({torch.get_num_threads()} threads)"),
        ("torch", torch.__version__),
        ("precision", "bf16 autocast, fp32 weights" if use_bf16 else "fp32"),
        ("attention", f"SDPA ({sdpa_mode})" if device.type == "cuda" else "SDPA (cpu)"),
        ("activation checkpointing", "on" if checkpointing else "off"),
        ("optimizer", "AdamW" if optimizer is not None else "none (forward + backward only)"),
        ("trainable parameters", f"{n_params / 1e6:.2f} M"),
        ("clip", f"{args.batch} x {frames} frames x {height}x{width}"),
        ("latent (target)", "x".join(str(v) for v in encoded.target_latents.shape)),
        (
            "tokens per sample",
            f"{seq} = {layout.num_source} source + {layout.num_semantic} semantic "
            f"+ {layout.num_target} target",
        ),
        ("text tokens", str(text_len)),
        ("build (s)", f"{build_s:.2f}"),
        ("encode batch, frozen encoders (s)", f"{encode_s:.4f}"),
        ("forward+backward per step (s)", f"{fwd_bwd_s:.4f}"),
        ("forward+backward per sample (s)", f"{fwd_bwd_s / args.batch:.4f}"),
        ("optimizer step (s)", f"{opt_s:.4f}"),
        ("step (s)", f"{step_s:.4f}"),
        ("tokens/s (all tokens)", f"{seq * args.batch / step_s:,.0f}"),
        ("tokens/s (target tokens)", f"{layout.num_target * args.batch / step_s:,.0f}"),
        (
            "model TFLOP per sample-step",
            f"{flops['total'] / 1e12:.3f} (dense {flops['dense'] / 1e12:.3f}, "
            f"attention {flops['attention'] / 1e12:.3f})",
        ),
        ("achieved TFLOP/s", f"{achieved:.2f}"),
        ("peak bf16 TFLOP/s", f"{peak:.0f}" if peak else "n/a"),
        ("MFU", f"{100 * achieved / peak:.1f}%" if peak else "n/a (no known peak; pass --peak-tflops)"),
        ("loss (first, last timed)", f"{losses[0]:.4f}, {losses[-1]:.4f}"),
    ]
    if device.type == "cuda":
        rows.append(("peak GPU memory (GiB)", f"{torch.cuda.max_memory_allocated(device) / 2**30:.2f}"))
    width_col = max(len(k) for k, _ in rows)
    print("SAMA training step benchmark")
    for key, value in rows:
        print(f"  {key:<{width_col}}  {value}")
    print(
        "  FLOPs: F = 6*(N_tok*S + N_txt*S_txt) + 12*L*d*S^2 + 12*L*d*S*S_txt per sample "
        f"(N_tok = {flops['params_per_token'] / 1e6:.1f} M block params/token, S = {seq}, S_txt = {text_len})"
    )
    return 0


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        return run(args)
    except torch.cuda.OutOfMemoryError as exc:
        print(
            f"error: out of GPU memory ({exc}); try --gradient-checkpointing on or a smaller clip",
            file=sys.stderr,
        )
        return 2
    except Exception:
        traceback.print_exc()
        return 1


if __name__ == "__main__":
    sys.exit(main())
