"""The ``mini-vllm`` command. It sits above both the server side (``serve``, ``generate`` in
``transport.commands``) and the benchmarks (``bench ...`` in ``bench``), which share their flags
through ``transport.flags``; nothing imports this module back.

To add a subcommand, write ``add_X(subparsers)`` that sets ``func`` and list it in ``SUBCOMMANDS``.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable, Sequence
from typing import Any

import mini_vllm
from mini_vllm.bench import add_bench
from mini_vllm.transport.commands import add_generate, add_serve
from mini_vllm.transport.flags import EXIT_USAGE

SUBCOMMANDS: tuple[Callable[[Any], None], ...] = (add_serve, add_generate, add_bench)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="mini-vllm", description="A small vLLM: serve and run LLMs.")
    parser.add_argument("--version", action="version", version=f"mini-vllm {mini_vllm.__version__}")
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND")
    for add in SUBCOMMANDS:
        add(subparsers)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    # What the user typed, for the benchmarks' records (``main`` may be called with its own argv).
    args.argv = list(sys.argv[1:] if argv is None else argv)
    if args.command is None:
        parser.print_help()
        return EXIT_USAGE
    return int(args.func(args))


if __name__ == "__main__":
    sys.exit(main())
