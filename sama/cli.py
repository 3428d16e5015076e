"""The ``sama`` command: one subcommand per job, each a thin call into the library or a pipeline."""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
from collections.abc import Callable, Sequence

from sama import logs
from sama.redaction import install_log_filter, redact_config, redact_text


class CommandError(Exception):
    """A user-facing failure: printed as one line, exit status 2."""


def add_override_argument(parser: argparse.ArgumentParser, example: str = "shards.max_samples=64") -> None:
    """``--set KEY=VALUE`` (repeatable), collected in ``args.overrides``."""
    parser.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help=f"override one config value, e.g. --set {example} (repeatable)",
    )


def _add_config_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--config", metavar="FILE", help="recipe file (TOML or YAML) layered over the defaults"
    )
    add_override_argument(parser)
    parser.add_argument(
        "--print-config", action="store_true", help="print the resolved configuration and exit"
    )


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="sama",
        description="Data preparation, training and editing for SAMA instruction-guided video editing.",
    )
    parser.add_argument(
        "-v", "--verbose", action="store_true", help="debug logging and all of Ray's output (sama.logs)"
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)

    p = sub.add_parser("prep-pretext", help="raw videos -> motion-alignment pretext shards (Ray Data)")
    p.add_argument("--input", required=True, help="URI prefix of raw videos (local or s3://)")
    p.add_argument("--output", required=True, help="URI prefix for shards, summary and rejects")
    p.add_argument("--overwrite", action="store_true", help="delete previous output and start over")
    _add_config_args(p)

    p = sub.add_parser("prep-pairs", help="edit manifests -> paired-edit shards (Ray Data)")
    p.add_argument("--manifest", action="append", required=True, help="manifest URI (csv/jsonl/parquet)")
    p.add_argument("--output", required=True, help="URI prefix for shards, summary and rejects")
    p.add_argument("--overwrite", action="store_true", help="delete previous output and start over")
    p.add_argument(
        "--judge",
        action="store_true",
        help="score rows without judge scores with the VLM judge (judge.base_url, judge.model; key from "
        "OPENAI_API_KEY) before the score filter (= --set judge.enabled=true)",
    )
    _add_config_args(p)

    p = sub.add_parser(
        "precompute", help="pixel shards -> latent shards of the frozen encoders' outputs (Ray Data)"
    )
    p.add_argument(
        "--input",
        action="append",
        required=True,
        help="shard prefix: a prep output, its shards/ or shards/<media> folder (repeatable)",
    )
    p.add_argument("--output", required=True, help="URI prefix for latent shards, summary and rejects")
    p.add_argument(
        "--model",
        required=True,
        metavar="PRESET_OR_EXPORT",
        help="a model preset (tiny, wan2.1-1.3b, ...) or a SAMA export whose encoders run",
    )
    p.add_argument(
        "--overwrite",
        action="store_true",
        help="delete previous output (also one made by other encoders) and start over",
    )
    _add_config_args(p)

    p = sub.add_parser(
        "eval", help="edit held-out samples or benchmark rows with a model; metrics, judge, report (Ray Data)"
    )
    p.add_argument(
        "--model", required=True, help="an export directory (local, s3://, hub id) or models:/NAME/VERSION"
    )
    p.add_argument(
        "--data",
        action="append",
        required=True,
        help="held-out shards (a prep or precompute output, pixel or latent) or a benchmark manifest "
        "(.csv/.jsonl/.json: source, instruction[, category, target]) (repeatable)",
    )
    p.add_argument("--output", required=True, help="URI prefix for results, report, shards and rejects")
    p.add_argument(
        "--judge",
        action="store_true",
        help="score every edit with the VLM judge (= --set judge.enabled=true)",
    )
    p.add_argument("--overwrite", action="store_true", help="delete previous output and start over")
    _add_config_args(p)

    p = sub.add_parser("train", help="stage-0 pre-training or stage-1 SFT on Ray Train")
    p.add_argument("--recipe", default="debug", help="recipe name (debug, pretrain, sft, ...) or file")
    p.add_argument("--resume", action="store_true", help="continue from the run's last checkpoint")
    p.add_argument(
        "--allow-config-change",
        action="store_true",
        help="with --resume: let a changed model, optimizer, data or batch size take effect (the new "
        "values win, optim.lr included); without it such a change stops the resume, naming the keys",
    )
    add_override_argument(p, "optim.lr=1e-4")
    p.add_argument("--print-config", action="store_true", help="print the resolved recipe and exit")
    p.add_argument(
        "--check",
        action="store_true",
        help="run the preflight checks (config, run, model, data, storage, tracking, cluster), print "
        "them and exit: 0 when all pass, 1 otherwise",
    )
    p.add_argument(
        "--force",
        action="store_true",
        help="start a GPU run whose memory plan (sama plan) does not fit, with a warning "
        "(= --set plan.enforce=false)",
    )

    p = sub.add_parser("plan", help="the per-GPU memory plan of a training recipe (nothing is loaded)")
    p.add_argument("--recipe", default="debug", help="recipe name (debug, pretrain, sft, ...) or file")
    add_override_argument(p, "scaling.num_workers=16")
    p.add_argument(
        "--gpu-memory",
        type=float,
        default=None,
        metavar="GIB",
        help="memory of one GPU in GiB (default: the recipe's plan.gpu_memory_gib, 80)",
    )
    p.add_argument("--json", action="store_true", help="print the plan as JSON (bytes)")
    p.add_argument(
        "--precomputed",
        action="store_true",
        help="plan as if every training source were latent shards (sama precompute): no frozen "
        "encoder on the GPUs (default: whatever the sources' latents.json files say)",
    )

    p = sub.add_parser("edit", help="edit a video with a trained model")
    p.add_argument("--video", required=True)
    p.add_argument("--instruction", required=True)
    p.add_argument("--model", required=True)
    p.add_argument(
        "--lora", metavar="ADAPTER", default=None, help="a LoRA adapter export to apply over --model"
    )
    p.add_argument("--output", required=True)
    p.add_argument("--steps", type=int, default=None, help="Euler steps (default: the model's own)")
    p.add_argument("--cfg", type=float, default=None, help="text guidance scale (default: the model's own)")
    p.add_argument(
        "--sampler",
        choices=["euler", "stochastic"],
        default=None,
        help="Euler steps, or each step's clean estimate re-noised with fresh seeded noise "
        "(default: the model's own)",
    )
    p.add_argument("--seed", type=int, default=0)
    p.add_argument(
        "--max-frames",
        type=int,
        default=None,
        help="frames per window at the training rate; longer clips are edited in consecutive windows "
        "(default: the model's own, 81 unless its export records another)",
    )
    p.add_argument(
        "--keep-bucket",
        action="store_true",
        help="write the edited clip at the training bucket size and frame rate, not the source's",
    )
    p.add_argument(
        "--dtype",
        choices=["bfloat16", "float16", "float32"],
        default=None,
        help="model precision (default: bfloat16 on CUDA, float32 on CPU)",
    )
    p.add_argument(
        "--offload",
        action="store_true",
        help="keep the text encoder and VAE in CPU memory, on the GPU only while they run",
    )
    p.add_argument(
        "--tile-vae",
        action="store_true",
        help="tiled VAE encode/decode to save GPU memory (Wan VAE; a no-op for the tiny model)",
    )

    p = sub.add_parser(
        "convert",
        help="official SAMA weights or an original-format Wan2.1 DiT -> a SAMA export",
        description="Convert a DiT checkpoint (the authors' SAMA-14B in Wan/DiffSynth key names, an "
        "original-format Wan2.1 DiT, or a diffusers-layout one; safetensors only) over a base (Wan2.1 "
        "diffusers dir or hub id, original-format Wan2.1 dir, or a SAMA export) into a SAMA export.",
    )
    p.add_argument(
        "--checkpoint", required=True, metavar="FILE_OR_DIR", help=".safetensors file or shard dir"
    )
    p.add_argument("--base", required=True, metavar="PATH_OR_ID", help="architecture, VAE, text encoder")
    p.add_argument("--output", required=True, metavar="DIR", help="the export directory to create")
    p.add_argument("--preset", default=None, help="model preset (default: inferred, e.g. wan2.1-14b)")
    p.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float32", "float16"])
    p.add_argument(
        "--parity",
        default=None,
        choices=["sama", "authors"],
        help="the export's parity profile (default: authors for the official checkpoint, else sama)",
    )
    p.add_argument(
        "--copy-frozen",
        action="store_true",
        help="copy a diffusers base's VAE and text encoder into the export instead of referencing them",
    )
    p.add_argument("--overwrite", action="store_true", help="replace a non-empty --output")

    p = sub.add_parser("inspect", help="counts and one sample of a shard prefix; export media to watch")
    p.add_argument("uri", help="shard prefix or one shard (.tar), local or s3://")
    p.add_argument("--sample", default="0", help="key or position of the sample to show (default: 0)")
    p.add_argument("--export", metavar="DIR", help="write that sample's source/target media here")
    p.add_argument("--json", action="store_true", help="print the report as JSON")

    p = sub.add_parser("quickstart", help="run the whole path locally on synthetic data")
    p.add_argument("--workdir", default="quickstart", help="where everything is written")
    p.add_argument("--overwrite", action="store_true", help="start from an empty workdir")
    return parser


def _cmd_inspect(args: argparse.Namespace) -> int:
    from sama import inspection

    sample: str | int = int(args.sample) if args.sample.isdigit() else args.sample
    try:
        report = inspection.inspect_shards(args.uri, sample=sample, export_dir=args.export)
    except (FileNotFoundError, KeyError) as exc:
        raise CommandError(str(exc).strip("'\"")) from None
    print(json.dumps(report.to_dict(), indent=2) if args.json else report.format())
    return 0


def _resolve(cls, args: argparse.Namespace, extra: list[str]):
    """Defaults <- --config file <- command-line flags <- --set overrides; prints it on request."""
    from sama import config

    cfg = config.load(cls, args.config, [*extra, *args.overrides])
    if args.print_config:
        print(config.dumps(cfg), end="")
    return cfg


def _cmd_prep_pretext(args: argparse.Namespace) -> int:
    from sama.prep.pretext_job import PrepPretextConfig

    cfg = _resolve(PrepPretextConfig, args, [f"input.uri={args.input}", f"output.uri={args.output}"])
    if args.print_config:
        return 0
    from pipelines import prep_pretext

    summary = prep_pretext.run(cfg, overwrite=args.overwrite)
    print(
        f"{summary.samples} clips in {summary.shards} shards from {summary.accepted}/{summary.inputs_seen} "
        f"inputs ({summary.rejected} rejected) -> {cfg.output.uri}"
    )
    return _failed_units_status(summary)


def _failed_units_status(summary) -> int:
    """Exit status of a data job: 1 when units failed (printed, with how to retry them)."""
    if not summary.failed_units:
        return 0
    print(
        f"{summary.failed_units} unit(s) failed for reasons outside their inputs (storage, disk); "
        f"their inputs are neither accepted nor rejected. Run the same command again to retry them.",
        file=sys.stderr,
    )
    for failure in summary.failures[:10]:
        print(redact_text(f"  unit {failure.unit_id}: {failure.error}"), file=sys.stderr)
    return 1


def _cmd_prep_pairs(args: argparse.Namespace) -> int:
    from sama.prep.pairs_job import PrepPairsConfig

    manifests = json.dumps(args.manifest)
    flags = [f"input.manifests={manifests}", f"output.uri={args.output}"]
    cfg = _resolve(PrepPairsConfig, args, [*flags, *(["judge.enabled=true"] if args.judge else [])])
    if args.print_config:
        return 0
    from pipelines import prep_pairs

    summary = prep_pairs.run(cfg, overwrite=args.overwrite)
    print(
        f"{summary.samples} pairs in {summary.shards} shards from {summary.accepted}/{summary.inputs_seen} "
        f"rows ({summary.rejected} rejected, {summary.duplicates} duplicates) -> {cfg.output.uri}"
    )
    return _failed_units_status(summary)


def _cmd_precompute(args: argparse.Namespace) -> int:
    from sama.models.presets import PRESETS
    from sama.prep.precompute_job import PrecomputeConfig

    model = f"model.preset={args.model}" if args.model in PRESETS else f"model.init_from={args.model}"
    flags = [f"inputs={json.dumps(args.input)}", f"output.uri={args.output}", model]
    cfg = _resolve(PrecomputeConfig, args, flags)
    if args.print_config:
        return 0
    from pipelines import precompute

    summary = precompute.run(cfg, overwrite=args.overwrite)
    print(
        f"{summary.samples} clips encoded in {summary.shards} shards from {summary.accepted}/"
        f"{summary.inputs_seen} samples ({summary.rejected} rejected) -> {cfg.output.uri}"
    )
    return _failed_units_status(summary)


def _cmd_eval(args: argparse.Namespace) -> int:
    from sama.eval.job import EvalConfig

    flags = [f"model={args.model}", f"data={json.dumps(args.data)}", f"output.uri={args.output}"]
    cfg = _resolve(EvalConfig, args, [*flags, *(["judge.enabled=true"] if args.judge else [])])
    if args.print_config:
        return 0
    from pipelines import eval as eval_pipeline

    result = eval_pipeline.run(cfg, overwrite=args.overwrite)
    print(format_eval(result))
    return _failed_units_status(result["job"])


def format_eval(result: dict) -> str:
    """What ``sama eval`` prints: counts, the main metrics overall and per task, where things are."""
    overall = result.get("overall", {}).get("means", {})
    lines = [
        f"{result['counts']['samples']} sample(s) evaluated ({result.get('rejected', 0)} rejected "
        f"{result.get('rejected_per_reason', {})}); report: {result['report']}"
    ]
    shown = [name for name in ("psnr", "copy_psnr", "ssim", "clip_score", "judge_if") if name in overall]
    if shown:
        lines.append("  overall: " + ", ".join(f"{name} {overall[name]:.3f}" for name in shown))
    for task, group in sorted(result.get("per_task", {}).items()):
        means = group.get("means", {})
        values = ", ".join(f"{name} {means[name]:.3f}" for name in shown if name in means)
        lines.append(f"  {task} ({group.get('count', 0)}): {values}")
    if result.get("mlflow_run_id"):
        lines.append(f"  MLflow run {result['mlflow_run_id']}")
    return "\n".join(lines)


def _cmd_train(args: argparse.Namespace) -> int:
    from sama import config
    from sama.train.recipes import recipe_path
    from sama.train.trainer import TrainConfig, resolve_train_config

    forced = ["plan.enforce=false"] if args.force else []
    cfg = config.load(TrainConfig, recipe_path(args.recipe), [*args.overrides, *forced])
    # Parity knobs (sama.models.parity) made concrete: what is printed is what trains.
    cfg = resolve_train_config(cfg, strict=False)
    if args.print_config:
        print(config.dumps(cfg), end="")
        return 0
    from sama.preflight import PreflightError, failures, format_report
    from sama.train.preflight import WHAT, run_preflight

    if args.check:
        results = run_preflight(cfg, resume=args.resume, allow_config_change=args.allow_config_change)
        print(format_report(WHAT, results))
        return 1 if failures(results) else 0
    from sama.train.launch import ResourcesUnavailable, TrainingError, run_training

    try:
        info = run_training(cfg, resume=args.resume, allow_config_change=args.allow_config_change)
    except PreflightError as exc:
        print(redact_text(format_report(WHAT, exc.results)), file=sys.stderr)
        return 1
    except TrainingError as exc:
        # The first failing rank's traceback, once: every rank raising the same error would
        # otherwise print it once per worker.
        print(redact_text(exc.traceback), file=sys.stderr)
        print(redact_text(f"sama train: error: {exc}"), file=sys.stderr)
        return 1
    except ResourcesUnavailable as exc:
        print(redact_text(f"sama train: error: {exc}"), file=sys.stderr)
        return 1
    print(json.dumps(redact_config(info), indent=2))
    return 0


def _cmd_plan(args: argparse.Namespace) -> int:
    from sama import config
    from sama.train.plan import memory_plan
    from sama.train.recipes import recipe_path
    from sama.train.trainer import TrainConfig

    cfg = config.load(TrainConfig, recipe_path(args.recipe), args.overrides)
    try:
        plan = memory_plan(cfg, args.recipe, args.gpu_memory, precomputed=True if args.precomputed else None)
    except (ValueError, KeyError) as exc:
        raise CommandError(str(exc).strip("'\"")) from None
    print(json.dumps(plan.to_dict(), indent=2) if args.json else plan.format())
    return 0


def _cmd_edit(args: argparse.Namespace) -> int:
    from sama.edit import run_edit

    try:
        report = run_edit(
            args.video,
            args.instruction,
            args.model,
            args.output,
            steps=args.steps,
            cfg=args.cfg,
            seed=args.seed,
            max_frames=args.max_frames,
            keep_bucket=args.keep_bucket,
            dtype=args.dtype,
            offload=args.offload,
            tile_vae=args.tile_vae,
            lora=args.lora,
            sampler=args.sampler,
        )
    except ValueError as exc:  # VideoDecodeError and ModelDirectoryError are ValueErrors too
        raise CommandError(str(exc)) from None
    print(json.dumps(report, indent=2))
    return 0


def _cmd_convert(args: argparse.Namespace) -> int:
    from sama.models.convert import convert

    try:
        report = convert(
            args.checkpoint,
            args.base,
            args.output,
            preset=args.preset,
            dtype=args.dtype,
            parity=args.parity,
            overwrite=args.overwrite,
            copy_frozen=args.copy_frozen,
        )
    except (ValueError, OSError) as exc:  # ConversionError, ModelDirectoryError, unknown preset
        print(redact_text(f"sama convert: error: {exc}"), file=sys.stderr)
        return 1
    print(json.dumps(dataclasses.asdict(report), indent=2))
    return 0


def _cmd_quickstart(args: argparse.Namespace) -> int:
    from sama import quickstart

    return quickstart.run(args.workdir, overwrite=args.overwrite)


HANDLERS: dict[str, Callable[[argparse.Namespace], int]] = {
    "prep-pretext": _cmd_prep_pretext,
    "prep-pairs": _cmd_prep_pairs,
    "precompute": _cmd_precompute,
    "eval": _cmd_eval,
    "train": _cmd_train,
    "plan": _cmd_plan,
    "edit": _cmd_edit,
    "inspect": _cmd_inspect,
    "convert": _cmd_convert,
    "quickstart": _cmd_quickstart,
}


def _lookup(command: str) -> Callable[[argparse.Namespace], int]:
    return HANDLERS[command]


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    # Logging, and what Ray prints: sama.logs (all of it with --verbose).
    logs.configure(args.verbose)
    # Log lines (and their tracebacks) never carry credentials, whichever module logs them.
    install_log_filter()
    from sama.config import ConfigError
    from sama.preflight import PreflightError
    from sama.storage import StorageError

    try:
        return _lookup(args.command)(args)
    except (CommandError, ConfigError, StorageError, PreflightError) as exc:
        print(redact_text(f"sama {args.command}: error: {exc}"), file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
