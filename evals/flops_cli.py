"""``vtprune flops``: the analytic cost of a model under a token schedule or a policy, in both conventions.

    vtprune flops --config llava-1.5-7b --schedule 576x2,288x30     # FastV K=2 R=0.5
    vtprune flops --config vit-b-16 --policy tome:r=16
    vtprune flops --config vit_base_patch16_224 --policy pitome:ratio=0.9 --per-layer
    vtprune flops --list

Prints the token schedule per layer and site, then one table with the ``paper`` and the ``full``
convention side by side (every number with its unit; what each convention counts under the table).
No model is built beyond timm's meta device, and no weights are loaded.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any, Sequence

HELP = "analytic MACs/FLOPs of a model config under a token schedule or policy, paper and full conventions"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", help="a shipped config (see --list: llava-1.5-7b, vit-b-16, ...) or a timm "
                                         "model name (vit_base_patch16_224)")
    parser.add_argument("--schedule", metavar="TOKENS",
                        help="tokens entering each layer of the language model (each vision block for a vision-only "
                             "model), comma-separated: N, NxK (N tokens for K layers) or A:M (attention at A, "
                             "MLP at M tokens); e.g. 576x2,288x30")
    parser.add_argument("--vision-schedule", metavar="TOKENS", help="the same for the vision tower of a VLM")
    parser.add_argument("--policy", action="append", default=[], metavar="SPEC",
                        help="a policy spec (tome:r=16, pitome:ratio=0.9); its own rules give the schedule of its "
                             "site and its matching the overhead. Repeat for policies at different sites")
    parser.add_argument("--visual-tokens", type=int, default=None,
                        help="visual tokens entering the language model (default: the config's nominal count)")
    parser.add_argument("--prompt-tokens", type=int, default=None,
                        help="text prompt tokens counted by the full convention (default 64)")
    parser.add_argument("--decode-steps", type=int, default=None,
                        help="decode steps added to the full convention's total (default 0; the per-token decode "
                             "cost is always shown)")
    parser.add_argument("--set", action="append", default=[], metavar="SWITCH=VALUE",
                        help="override a switch in both conventions, e.g. mlp_tokens=in, causal_halving=true")
    parser.add_argument("--convention", choices=("both", "paper", "full"), default="both")
    parser.add_argument("--per-layer", action="store_true", help="also one cost row per layer")
    parser.add_argument("--json", metavar="PATH", default=None, help="also write the costs as JSON")
    parser.add_argument("--list", action="store_true", help="list the shipped configs and registered policies")


def _switches(items: Sequence[str]) -> dict[str, Any]:
    from vtprune.policy import parse_value

    switches = {}
    for item in items:
        key, eq, value = item.partition("=")
        if not eq or not key.strip():
            raise ValueError(f"--set expects SWITCH=VALUE, got {item!r}")
        switches[key.strip()] = parse_value(value)
    return switches


def _run_length(pairs: Sequence[tuple[int, int]]) -> str:
    runs: list[list[Any]] = []
    for attention, mlp in pairs:
        label = str(attention) if attention == mlp else f"{attention}:{mlp}"
        if runs and runs[-1][0] == label:
            runs[-1][1] += 1
        else:
            runs.append([label, 1])
    return ",".join(label if count == 1 else f"{label}x{count}" for label, count in runs)


def format_schedule(cost: Any) -> list[str]:
    """The token schedule of a cost, one line per site: per layer, then in the compact ``--schedule`` form."""
    lines = []
    for site, pairs in cost.schedule.items():
        what = (f"{len(pairs)} layers, visual tokens entering each" if site == "llm"
                else f"{len(pairs)} blocks, tokens entering each (-> after a merge inside it)")
        per_layer = " ".join(str(a) if a == m else f"{a}->{m}" for a, m in pairs)
        lines.append(f"  {site}, {what}: {per_layer}")
        lines.append(f"    as --schedule: {_run_length(pairs)}")
    return lines


def run_from_args(args: argparse.Namespace) -> int:
    from vtprune import Policy, flops, policies

    if args.list:
        print("Shipped configs:")
        for name, title in flops.configs().items():
            print(f"  {name}: {title}")
        print("Any timm VisionTransformer name (timm.list_models('vit_*')) is accepted too.")
        analytic = [name for name, cls in policies().items() if cls.token_schedule is not Policy.token_schedule]
        handed = [name for name, cls in policies().items() if cls.handed_on is not Policy.handed_on]
        print("Policies with an analytic token schedule (--policy): " + ", ".join(analytic))
        print("Policies whose visual tokens for a VLM's language model are fixed (--policy on a LLaVA config): "
              + ", ".join(handed))
        return 0
    try:
        if not args.config:
            raise ValueError(f"--config is required; shipped configs: {', '.join(flops.configs())} "
                             "(or a timm model name)")
        switches = _switches(args.set)
        schedule: Any = None
        if args.schedule or args.vision_schedule:
            arch = flops.architecture(args.config)
            schedule = {}
            if args.schedule:
                schedule[arch.primary_site] = args.schedule
            if args.vision_schedule:
                schedule["vision"] = args.vision_schedule
        full_switches = dict(switches)
        for key, value in (("prompt_tokens", args.prompt_tokens), ("decode_steps", args.decode_steps)):
            if value is not None:
                full_switches[key] = value
        common = dict(schedule=schedule, policy=args.policy or None, visual_tokens=args.visual_tokens)
        costs = []
        if args.convention in ("both", "paper"):
            costs.append(flops.estimate(args.config, convention="paper", **common, **switches))
        if args.convention in ("both", "full"):
            costs.append(flops.estimate(args.config, convention="full", **common, **full_switches))
    except (ValueError, TypeError, NotImplementedError) as error:
        message = " ".join(str(error).split())
        print(f"vtprune flops: {message}", file=sys.stderr)
        return 2
    arch = flops.architecture(args.config)
    first = costs[0]
    print(f"{arch.name}: {arch.title}" if arch.title else arch.name)
    print(f"Policies: {', '.join(first.policies) if first.policies else 'none'}")
    print("Token schedule:")
    for line in format_schedule(first):
        print(line)
    print()
    print(flops.table(*costs, per_layer=args.per_layer))
    if args.json:
        Path(args.json).write_text(json.dumps([cost.to_dict() for cost in costs], indent=2) + "\n")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m vtprune.evals.flops_cli", description=HELP)
    add_arguments(parser)
    return run_from_args(parser.parse_args(argv))


if __name__ == "__main__":
    raise SystemExit(main())
