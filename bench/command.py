"""What every ``mini-vllm bench`` subcommand shares on the command line: help that states each
option's default, output paths checked before a long run, one-line errors, and Ctrl-C as exit 130."""

from __future__ import annotations

import argparse
import functools
import os
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

from mini_vllm.transport.flags import EXIT_ERROR, EXIT_INTERRUPTED, EXIT_USAGE

Command = Callable[[argparse.Namespace], int]


def describe(value: Any) -> str:
    """A default as a user types it: flags on/off, lists space-separated."""
    if isinstance(value, bool):
        return "on" if value else "off"
    if isinstance(value, list | tuple):
        return " ".join(map(str, value))
    return str(value)


class HelpFormatter(argparse.HelpFormatter):
    """Appends "(default: X)" to an option's help, unless the help already says what its default is
    (a default of None always needs words: "none" would not say what happens)."""

    def _get_help_string(self, action: argparse.Action) -> str | None:
        text = action.help or ""
        if "default" in text or not action.option_strings or action.default in (None, argparse.SUPPRESS):
            return text
        # argparse %-formats the help: a literal % in a default must be doubled.
        return f"{text} (default: {describe(action.default).replace('%', '%%')})".lstrip()


def fail(command: str, message: str, code: int = EXIT_USAGE) -> int:
    print(f"mini-vllm bench {command}: error: {message}", file=sys.stderr)
    return code


def unwritable(path: Path, flag: str, folder: bool = False) -> str | None:
    """Why ``path`` (a file, or with ``folder`` a directory) cannot be written, or None. Checked
    before a run, so that a long run never ends on a bad path; nothing is created."""
    if folder and path.exists() and not path.is_dir():
        return f"{flag} {path} is a file: give a folder"
    if not folder and path.is_dir():
        return f"{flag} {path} is a folder: give a file name"
    existing = path if folder else path.parent
    while not existing.exists():  # ends at "." or "/" at the latest
        existing = existing.parent
    if not existing.is_dir():
        return f"{flag} {path}: {existing} is a file, not a folder: choose another path"
    if not os.access(existing, os.W_OK | os.X_OK):
        return f"{flag} {path}: {existing} is not writable: choose another path"
    return None


def write_text(command: str, path: Path, text: str) -> int | None:
    """Write ``path`` (its folder made as needed); on failure say so in one line and return the exit code."""
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
    except OSError as exc:
        return fail(command, f"cannot write {path}: {exc.strerror or exc}", EXIT_ERROR)
    return None


def interruptible(command: str) -> Callable[[Command], Command]:
    """A subcommand's function, with Ctrl-C as one line and exit 130 instead of a traceback (trio
    may deliver the KeyboardInterrupt inside an exception group)."""

    def decorate(run: Command) -> Command:
        @functools.wraps(run)
        def guarded(args: argparse.Namespace) -> int:
            try:
                return run(args)
            except KeyboardInterrupt:
                pass
            except BaseExceptionGroup as group:
                if group.subgroup(KeyboardInterrupt) is None:
                    raise
            print(f"\nmini-vllm bench {command}: interrupted", file=sys.stderr)  # a new line after the ^C
            return EXIT_INTERRUPTED

        return guarded

    return decorate
