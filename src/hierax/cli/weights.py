"""`hierax weights list|download|import|path|register|remove`: the weights cache and the user registry.

The offline route: `hierax weights download NAME` on a connected machine (into $HIERAX_HOME/weights, sha256
checked), copy the file over, then `hierax weights import FILE` on the air-gapped one (sha256 checked against the
registry, copied into the cache under the registry's file name). `register` makes a file or URL of one's own
known by name to every later command (in $HIERAX_HOME/registry.json)."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from hierax.errors import HieraxError
from hierax.sizes import add_size_option, size_from
from hierax.weights.paths import registry_path

COMMAND = "weights"
HELP = "download, import, locate and register model weights (the cache and the user registry)"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    actions = parser.add_subparsers(dest="action", metavar="ACTION", required=True)
    listing = actions.add_parser("list", help="every registered name, whether its file is cached, and where")
    listing.add_argument("--json", action="store_true", help="print JSON")

    download = actions.add_parser("download", help="download registered weights into the cache (sha256 checked)")
    download.add_argument("names", nargs="+", metavar="NAME", help="registered names (see `hierax models`)")
    download.add_argument("--quiet", action="store_true", help="no progress bar")

    imported = actions.add_parser(
        "import", help="copy a downloaded file into the cache under its registry name (sha256 checked)"
    )
    imported.add_argument("file", type=Path, help="the file, e.g. copied from a connected machine")
    imported.add_argument("--name", help="the registry name it is a copy of (default: found by its sha256)")

    where = actions.add_parser("path", help="where a name's file is (or would be) on this machine")
    where.add_argument("name", help="registered name")

    register = actions.add_parser("register", help="make a file or URL of your own known by name to every command")
    register.add_argument("name", help="the name to give it")
    source = register.add_mutually_exclusive_group(required=True)
    source.add_argument("--path", type=Path, help="a model file (.pt, .safetensors, .onnx, .ts, .pt2)")
    source.add_argument("--url", help="where to download it from (needs --network and --size)")
    register.add_argument("--network", help="its network (default with --path: what the file records)")
    add_size_option(register, "its input size (default with --path: what the file records)")
    register.add_argument("--sha256", help="checksum to verify downloads with (--url)")
    register.add_argument("--num-classes", type=int, help="number of classes, 0 for a backbone (--url)")
    register.add_argument("--description", default="", help="one line shown by `hierax models`")
    register.add_argument("--alias", action="append", default=[], help="another name for it (repeatable)")

    remove = actions.add_parser("remove", help="remove a name from the user registry (its file stays)")
    remove.add_argument("name", help="a name registered with `hierax weights register`")


def _list(args: argparse.Namespace) -> int:
    from hierax.weights.describe import models_table  # imported here: keeps hierax --help fast

    rows = models_table()["weights"]
    if args.json:
        print(json.dumps(rows, indent=1))
        return 0
    for row in rows:
        print(f"{row['name']:<40} {'cached' if row['cached'] else 'not cached':<11} {row['path']}")
    return 0


def _download(args: argparse.Namespace) -> int:
    # imported here: keeps hierax --help fast
    from hierax.weights.cache import is_cached
    from hierax.weights.catalog import resolve
    from hierax.weights.download import fetch

    entries = [resolve(name) for name in args.names]  # every name checked before the first download
    for entry in entries:
        if is_cached(entry):
            print(f"{entry.name}: already cached at {fetch(entry)}")
            continue
        print(f"{entry.name}: saved {fetch(entry, progress=not args.quiet)}")
    return 0


def _import(args: argparse.Namespace) -> int:
    from hierax.weights.cache import import_file  # imported here: keeps hierax --help fast

    entry, path = import_file(args.file, args.name)
    print(f"{entry.name}: imported {args.file} as {path}")
    return 0


def _path(args: argparse.Namespace) -> int:
    # imported here: keeps hierax --help fast
    from hierax.weights.cache import cached_path
    from hierax.weights.catalog import resolve

    print(cached_path(resolve(args.name)))
    return 0


def _register(args: argparse.Namespace) -> int:
    size = size_from(args.size)
    if args.path is not None:
        if args.sha256 or args.num_classes is not None:
            raise HieraxError("--sha256 and --num-classes go with --url; with --path they are read from the file")
        from hierax.weights.load import register_file  # imported here: keeps hierax --help fast

        entry = register_file(
            args.name,
            args.path,
            network=args.network,
            resolution=size,
            description=args.description,
            aliases=tuple(args.alias),
        )
    else:
        if not args.network or size is None:
            raise HieraxError("--url needs --network and --size (the file is not here to read them from)")
        from hierax.weights.catalog import register_weights  # imported here: keeps hierax --help fast

        entry = register_weights(
            args.name,
            network=args.network,
            resolution=size,
            url=args.url,
            sha256=args.sha256,
            num_classes=args.num_classes,
            description=args.description,
            aliases=tuple(args.alias),
            persist=True,
        )
    print(f"registered '{entry.name}' ({entry.network}, {entry.path or entry.url}) in {registry_path()}")
    return 0


def _remove(args: argparse.Namespace) -> int:
    from hierax.weights.catalog import unregister_weights  # imported here: keeps hierax --help fast

    entry = unregister_weights(args.name, persist=True)
    print(f"removed '{entry.name}' from {registry_path()}")
    return 0


_ACTIONS = {
    "list": _list,
    "download": _download,
    "import": _import,
    "path": _path,
    "register": _register,
    "remove": _remove,
}


def run(args: argparse.Namespace) -> int:
    return _ACTIONS[args.action](args)
