"""Command-line interface: ``loes <command> ...``.

A thin layer over the library. Each command lives in the module that owns its
feature and registers itself through a ``register(subparsers)`` function, so
this file only lists them.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import sys
import warnings
from typing import List, Optional

#: Modules that provide a ``register(subparsers)`` function, in help order.
COMMAND_MODULES = [
    "loes.hf._cli",
    "loes.metrics._cli",
    "loes.transfer._cli",
]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="loes",
        description="Find the layers of a pretrained model that serve your task best.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="Run 'loes <command> --help' for each command's options and an example.",
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="log progress to stderr")
    sub = parser.add_subparsers(dest="command", metavar="<command>")
    for name in COMMAND_MODULES:
        importlib.import_module(name).register(sub)
    return parser


def main(argv: Optional[List[str]] = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return 2
    logging.basicConfig(
        level=logging.INFO if args.verbose else logging.WARNING,
        stream=sys.stderr,
        format="%(levelname)s %(name)s: %(message)s",
    )
    from loes._exceptions import LOESWarning

    with warnings.catch_warnings():  # one plain line per warning, not a source excerpt
        warnings.simplefilter("always", LOESWarning)
        warnings.showwarning = _show_warning
        return int(args.func(args) or 0)


def _show_warning(message, category, filename, lineno, file=None, line=None) -> None:
    (file or sys.stderr).write(f"loes: {category.__name__}: {message}\n")


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
