"""The `hierax` command. Every module in this package is one subcommand: it defines `COMMAND` (its name),
`HELP` (one line), `add_arguments(parser)` and `run(args) -> int`, a thin shell over a library function."""

from __future__ import annotations

import argparse
import importlib
import logging
import pkgutil
import sys

from hierax.errors import HieraxError
from hierax.runtime import keep_freed_memory


def build_parser() -> argparse.ArgumentParser:
    """The top-level parser, with one subparser per module in `hierax.cli`."""
    parser = argparse.ArgumentParser(prog="hierax", description="Identify species in wildlife photos with HieraDet.")
    parser.add_argument("-v", "--verbose", action="store_true", help="log debug messages")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for info in sorted(pkgutil.iter_modules(__path__), key=lambda m: m.name):
        if info.name.startswith("_"):
            continue
        module = importlib.import_module(f"{__name__}.{info.name}")
        command = sub.add_parser(module.COMMAND, help=module.HELP, description=module.HELP)
        module.add_arguments(command)
        command.set_defaults(run=module.run)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Parse the command line and run one subcommand; hierax errors become a message and exit code 1."""
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO, format="%(levelname)s %(message)s")
    if not getattr(args, "run", None):
        parser.print_help()
        return 2
    keep_freed_memory()  # the command owns its process: reuse freed pages across forward passes
    try:
        return int(args.run(args) or 0)
    except HieraxError as err:
        print(f"hierax {args.command}: error: {err}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print(f"hierax {args.command}: interrupted", file=sys.stderr)
        return 130
