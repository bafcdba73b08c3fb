"""The ``vtprune`` command line. One subcommand per eval tool: ``bench``, ``eval``, ``flops``,
``prepare``.

To add a subcommand, write a module in ``evals/`` with ``HELP`` (one line), ``add_arguments(parser)``
and ``run_from_args(args) -> int``, and list it in :data:`SUBCOMMANDS`.
"""
from __future__ import annotations

import argparse
import importlib
from typing import Sequence

SUBCOMMANDS = {"bench": "vtprune.evals.bench", "eval": "vtprune.evals.eval_cli", "flops": "vtprune.evals.flops_cli",
               "prepare": "vtprune.evals.prepare_cli"}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="vtprune", description="vtprune: visual-token pruning and merging "
                                     "for existing vision transformers; eval tools")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for name, module_name in SUBCOMMANDS.items():
        module = importlib.import_module(module_name)
        sub = commands.add_parser(name, help=module.HELP, description=module.HELP)
        module.add_arguments(sub)
        sub.set_defaults(run=module.run_from_args)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``vtprune`` console script; returns the exit status."""
    args = build_parser().parse_args(argv)
    return args.run(args)


if __name__ == "__main__":
    raise SystemExit(main())
