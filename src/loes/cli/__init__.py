"""Command-line interface: ``loes <command> ...``.

A thin layer over the library: one module per command (``select``,
``profile``, ``demo``, ``report``, ``extract``), each with ``register(subparsers)`` and
``run(args)``, and one error policy for all of them (:mod:`loes.cli._common`):
a user mistake is one line on stderr and exit code 2. The library never
imports this package.
"""

from __future__ import annotations

import argparse
import logging
import sys
import warnings

from loes._exceptions import LOESWarning
from loes.cli import demo, extract, profile, report, select
from loes.cli._common import ArgumentParser, run_command, show_warning

__all__ = ["build_parser", "main"]

#: The command modules, in help order.
COMMANDS = (select, profile, demo, report, extract)


def build_parser() -> argparse.ArgumentParser:
    """The ``loes`` parser with every command's subparser."""
    parser = ArgumentParser(
        prog="loes",
        description="Find the layers of a pretrained model that serve your task best.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="Run 'loes <command> --help' for each command's options and an example.",
    )
    parser.add_argument(
        "-v",
        "--verbose",
        action="store_true",
        help="log progress to stderr (and the traceback of an error)",
    )
    sub = parser.add_subparsers(dest="command", metavar="<command>")
    parser.commands = {}  # name -> subparser, so that its own prog reports stray arguments
    for module in COMMANDS:
        p = module.register(sub)
        parser.commands[p.prog.split()[-1]] = p
        p.add_argument(
            "-v",
            "--verbose",
            action="store_true",
            default=argparse.SUPPRESS,
            help="log progress to stderr (and the traceback of an error)",
        )
        p.set_defaults(func=module.run)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Run ``loes`` with ``argv`` (default: ``sys.argv[1:]``); returns the exit code."""
    parser = build_parser()
    try:
        args, extra = parser.parse_known_args(argv)
        if extra:
            parser.commands.get(args.command, parser).error(
                f"unrecognized arguments: {' '.join(extra)}"
            )
    except SystemExit as e:  # --help (0) or a usage error, already reported in one line (2)
        return int(e.code or 0)
    if args.command is None:
        parser.print_help()
        sys.stderr.write(
            f"loes: error: no command given; choose one of {', '.join(parser.commands)}\n"
        )
        return 2
    logging.basicConfig(
        level=logging.INFO if args.verbose else logging.WARNING,
        stream=sys.stderr,
        format="%(levelname)s %(name)s: %(message)s",
    )
    with warnings.catch_warnings():  # one plain line per warning, not a source excerpt
        warnings.simplefilter("always", LOESWarning)
        warnings.showwarning = show_warning
        return run_command(args.command, args.func, args)


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
