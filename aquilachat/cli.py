"""The ``aquilachat`` command line: one subcommand per module in :mod:`aquilachat.commands`.

Each command module defines ``register(subparsers)``, which adds its parser and sets
``func(args) -> int``. Errors that the user caused (:class:`~aquilachat.errors.AquilaChatError`,
missing files) are printed as one line on stderr with exit status 1, never as a traceback.
"""

from __future__ import annotations

import argparse
import importlib
import sys

from . import __version__
from .errors import AquilaChatError

#: Command modules, in the order ``aquilachat --help`` lists them.
COMMAND_MODULES = [
    "aquilachat.commands.chat",
    "aquilachat.commands.generate",
    "aquilachat.commands.serve",
    "aquilachat.commands.train",
    "aquilachat.commands.tokenizer",
    "aquilachat.commands.eval",
    "aquilachat.commands.convert",
    "aquilachat.commands.quantize",
]


def build_parser() -> argparse.ArgumentParser:
    """The top-level parser with every available subcommand."""
    parser = argparse.ArgumentParser(
        prog="aquilachat",
        description="Run, serve, fine-tune, train tokenizers for and evaluate AquilaChat-family models.")
    parser.add_argument("--version", action="version", version=f"aquilachat {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name in COMMAND_MODULES:
        try:
            module = importlib.import_module(name)
        except ModuleNotFoundError as exc:
            if exc.name == name:  # command not part of this build
                continue
            raise
        module.register(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``aquilachat`` console script; returns the exit status."""
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    try:
        return int(args.func(args) or 0)
    except AquilaChatError as exc:
        print(f"aquilachat {args.command}: error: {exc}", file=sys.stderr)
        return 1
    except (FileNotFoundError, PermissionError, IsADirectoryError) as exc:
        print(f"aquilachat {args.command}: error: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("", file=sys.stderr)
        return 130


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
