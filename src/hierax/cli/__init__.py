"""The `hierax` command. Every module in this package is one subcommand: it defines `COMMAND` (its name),
`HELP` (one line), `add_arguments(parser)` and `run(args) -> int`, a thin shell over a library function.

Building the parser imports every subcommand module, so those modules import only light things at module level
and the library inside `run()`: `hierax --help` then starts without torch."""

from __future__ import annotations

import argparse
import importlib
import logging
import os
import pkgutil
import sys

from hierax.errors import HieraxError
from hierax.runtime import fast_page_faults

# Libraries whose INFO chatter (onnxscript alone logs about 300 lines an export) would bury hierax's own lines;
# they log at WARNING and above unless --verbose. uvicorn is left alone: `hierax serve` sets its levels itself.
QUIET_LOGGERS = (
    "faiss",
    "onnxscript",
    "onnx",
    "onnx_ir",
    "onnxruntime",
    "torch",
    "PIL",
    "urllib3",
    "httpx",
    "httpcore",
    "huggingface_hub",
    "filelock",
    "matplotlib",
    "fsspec",
    "faiss",
    "asyncio",
)
EXIT_CLOSED_STDOUT = 141  # what a Unix tool killed by SIGPIPE exits with (128 + 13)


def build_parser() -> argparse.ArgumentParser:
    """The top-level parser, with one subparser per module in `hierax.cli`."""
    parser = argparse.ArgumentParser(prog="hierax", description="Identify species in wildlife photos with HieraDet.")
    parser.add_argument("-v", "--verbose", action="store_true", help="log debug messages (other libraries' too)")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for info in sorted(pkgutil.iter_modules(__path__), key=lambda m: m.name):
        if info.name.startswith("_"):
            continue
        module = importlib.import_module(f"{__name__}.{info.name}")
        command = sub.add_parser(module.COMMAND, help=module.HELP, description=module.HELP)
        module.add_arguments(command)
        command.set_defaults(run=module.run)
    return parser


def configure_logging(verbose: bool) -> None:
    """hierax logs INFO (DEBUG with --verbose) as one-line messages; other libraries only WARNING and above
    unless --verbose."""
    logging.basicConfig(level=logging.DEBUG if verbose else logging.INFO, format="%(levelname)s %(message)s")
    if not verbose:
        for name in QUIET_LOGGERS:
            logging.getLogger(name).setLevel(logging.WARNING)


def _run_command(argv: list[str] | None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    configure_logging(args.verbose)
    if not getattr(args, "run", None):
        parser.print_help()
        return 2
    fast_page_faults()  # the command owns its process: cheap page faults for large tensors (before torch loads)
    try:
        return int(args.run(args) or 0)
    except HieraxError as err:
        print(f"hierax {args.command}: error: {err}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print(f"hierax {args.command}: interrupted", file=sys.stderr)
        return 130


def _discard_stdout() -> None:
    """Point stdout at /dev/null, so that the interpreter's last flush at exit finds no closed pipe."""
    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, sys.stdout.fileno())
    os.close(devnull)


def main(argv: list[str] | None = None) -> int:
    """Parse the command line and run one subcommand; hierax errors become a message and exit code 1. A reader
    that closes stdout early (`hierax models --json | head`) ends the command quietly, as Unix tools do."""
    try:
        try:
            return _run_command(argv)
        finally:
            sys.stdout.flush()
    except BrokenPipeError:
        _discard_stdout()
        return EXIT_CLOSED_STDOUT
