"""``comfy-tetriserve``: one console script, one subcommand per job.

Each subcommand lives in its own module with ``add_arguments(parser)`` and ``run(args) -> int``;
modules are imported only when their subcommand runs, so ``--help`` stays fast and the planner's
commands never import torch.
"""
from __future__ import annotations

import argparse
import importlib
import logging
import sys
from collections.abc import Sequence

from . import __version__

#: name -> (module, one-line help)
COMMANDS: dict[str, tuple[str, str]] = {
    "serve": ("comfy_tetriserve.service.serve_cmd", "run the scheduler service (one per GPU box)"),
    "demo": ("comfy_tetriserve.demo.command", "CPU demo: tiny models, 4 workers, a mixed workload under two policies"),
    "bench": ("comfy_tetriserve.sim.bench", "simulate the paper's evaluation and print SAR tables, plots and JSON"),
    "profile": ("comfy_tetriserve.worker.profile", "measure per-step times on this machine's devices"),
    "selfcheck": ("comfy_tetriserve.worker.selfcheck", "prove sequence-parallel steps equal single-device steps"),
    "reliability": ("comfy_tetriserve.reliability.command",
                    "fault, soak and hostile-input drills against a real service (CPU workers, tiny models)"),
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="comfy-tetriserve",
        description="Deadline-aware step-level sequence-parallel serving of diffusion transformers.",
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    parser.add_argument("-v", "--verbose", action="count", default=0, help="more logging (-vv for debug)")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name, (module, help_text) in COMMANDS.items():
        sub.add_parser(name, help=help_text, description=help_text, add_help=False)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser()
    # Parse the global part first; the chosen subcommand's module adds its own flags.
    args, rest = parser.parse_known_args(argv)
    if not args.command:
        parser.print_help()
        return 2
    logging.basicConfig(
        level=logging.WARNING - 10 * min(args.verbose, 2) if args.verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    module_name, help_text = COMMANDS[args.command]
    module = importlib.import_module(module_name)
    sub = argparse.ArgumentParser(prog=f"comfy-tetriserve {args.command}", description=help_text)
    module.add_arguments(sub)
    sub_args = sub.parse_args(rest)
    return int(module.run(sub_args) or 0)


if __name__ == "__main__":
    raise SystemExit(main())
