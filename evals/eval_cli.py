"""``vtprune eval``: accuracy and cost of every policy side by side (see :mod:`vtprune.evals.runner`)."""
from __future__ import annotations

import argparse
import dataclasses
import sys
from pathlib import Path
from typing import Any

HELP = ("evaluate policies side by side: accuracy, fidelity, tokens, FLOPs and latency vs the unpruned model; "
        "with no --model/--task/--data/--config: the vtprune-mini laboratory (offline, minutes)")
LAB_OUT = "vtprune-mini-eval"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", metavar="YAML", default=None,
                        help="a YAML file with the same keys as the flags (flags given here override it)")
    parser.add_argument("--model", help="library:name, e.g. timm:vit_base_patch16_224")
    parser.add_argument("--task", help="task name (classification)")
    parser.add_argument("--data", help="dataset path (classification: an ImageNet-style folder)")
    parser.add_argument("--policies", nargs="*", metavar="SPEC", help="policy specs, e.g. tome:r=16 pitome:ratio=0.9; "
                        "'+' composes policies of different sites; the unpruned model always runs")
    parser.add_argument("--out", help="output directory (results.jsonl, summary.json/csv, report.md); rerun to resume")
    parser.add_argument("--limit", type=int, default=None, help="first N samples only")
    parser.add_argument("--batch-size", type=int, default=None)
    parser.add_argument("--device", default=None)
    parser.add_argument("--dtype", choices=("float32", "bfloat16", "float16"), default=None)
    parser.add_argument("--weights", choices=("pretrained", "random"), default=None,
                        help="random: build the model with random weights (smoke tests; no weight download, though hf: models "
                             "still read their config and processor)")
    parser.add_argument("--seed", type=int, default=None)
    parser.add_argument("--no-baselines", dest="baselines", action="store_false", default=None,
                        help="do not add the random and pooling baselines at each VLM policy's budget")
    parser.add_argument("--quiet", action="store_true", help="no progress bar")
    parser.add_argument("--full", action="store_true",
                        help="the vtprune-mini laboratory on all 600 of mini-llava's questions (the default run "
                             "asks the first 150); only without --model/--task/--data/--config")


def is_lab(args: argparse.Namespace) -> bool:
    """No model, task, data or config: the vtprune-mini laboratory (:mod:`vtprune.evals.mini.lab`)."""
    return not any((args.config, args.model, args.task, args.data))


def run_lab_from_args(args: argparse.Namespace) -> int:
    from .mini.lab import run_lab

    ignored = [flag for flag, value in (("--policies", args.policies), ("--limit", args.limit),
                                        ("--batch-size", args.batch_size), ("--dtype", args.dtype),
                                        ("--seed", args.seed), ("--no-baselines", args.baselines))
               if value is not None]
    if ignored:
        raise ValueError(f"{', '.join(ignored)} apply to a run of one model (--model, --task, --data); the "
                         "vtprune-mini laboratory (no --model) accepts --out, --full, --device, --weights and --quiet")
    out = Path(args.out or LAB_OUT)
    run_lab(out, full=args.full, weights=args.weights or "pretrained", device=args.device or "cpu",
            progress=not args.quiet)
    print((out / "report.md").read_text())
    return 0


def config_from_args(args: argparse.Namespace):
    from .runner import EvalConfig

    values: dict[str, Any] = {}
    if args.config:
        import yaml

        loaded = yaml.safe_load(Path(args.config).read_text()) or {}
        known = {field.name for field in dataclasses.fields(EvalConfig)}
        unknown = sorted(set(loaded) - known)
        if unknown:
            raise ValueError(f"unknown keys {unknown} in {args.config}; known: {sorted(known)}")
        values.update(loaded)
    for key in ("model", "task", "data", "policies", "out", "limit", "batch_size", "device", "dtype", "weights",
                "seed", "baselines"):
        value = getattr(args, key)
        if value is not None:
            values[key] = value
    missing = [key for key in ("model", "task", "data", "out") if not values.get(key)]
    if missing:
        raise ValueError(f"missing {', '.join('--' + key for key in missing)} (or their keys in --config)")
    values["policies"] = tuple(values.get("policies") or ())
    return EvalConfig(**values)


def run_from_args(args: argparse.Namespace) -> int:
    from .results import IncompatibleRunError
    from .runner import run

    try:
        if is_lab(args):
            return run_lab_from_args(args)
        if args.full:
            raise ValueError("--full applies to the vtprune-mini laboratory (vtprune eval with no --model, --task, "
                             "--data or --config); for one model, --limit chooses the samples")
        config = config_from_args(args)
        summary = run(config, progress=not args.quiet)
    except (ValueError, FileNotFoundError, IncompatibleRunError) as error:
        print(f"vtprune eval: {' '.join(str(error).split())}", file=sys.stderr)
        return 2
    print((Path(config.out) / "report.md").read_text())
    return 0 if summary["results"] else 1
