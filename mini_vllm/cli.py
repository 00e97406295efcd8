"""The ``mini-vllm`` command. It sits above both the server side (``serve``, ``generate`` in
``transport.commands``) and the benchmarks (``bench ...`` in ``bench``), which share their flags
through ``transport.flags``; nothing imports this module back.

To add a subcommand, write ``add_X(subparsers)`` that sets ``func`` and list it in ``SUBCOMMANDS``.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable, Sequence
from typing import Any, NoReturn

import mini_vllm
from mini_vllm.bench import add_bench
from mini_vllm.transport.commands import add_generate, add_serve
from mini_vllm.transport.flags import EXIT_INTERRUPTED, EXIT_USAGE, is_interrupt

SUBCOMMANDS: tuple[Callable[[Any], None], ...] = (add_serve, add_generate, add_bench)


class _Parser(argparse.ArgumentParser):
    """argparse, with a usage error as one line naming the flag and where the help is, instead of
    the whole usage synopsis (serve's is a dozen lines) above it. Subparsers inherit the class."""

    def error(self, message: str) -> NoReturn:
        self.exit(EXIT_USAGE, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="mini-vllm", description="A small vLLM: serve and run LLMs.")
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
    try:
        return int(args.func(args))
    except BaseException as exc:  # Ctrl-C that a subcommand did not handle itself: no traceback
        if not is_interrupt(exc):
            raise
        print(f"\nmini-vllm {args.command}: interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED


if __name__ == "__main__":
    sys.exit(main())
