"""`hierax serve`: the HTTP API and web page for one model."""

from __future__ import annotations

import argparse

from hierax.errors import HieraxError
from hierax.sizes import add_size_option, size_from
from hierax.weights.catalog import DEFAULT_MODEL

COMMAND = "serve"
HELP = "serve a model over HTTP: POST /v1/classify, /v1/embed, and a web page at /"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Flags of `hierax serve`."""
    parser.add_argument(
        "--model", default=DEFAULT_MODEL, help="registry name or checkpoint path (default: %(default)s)"
    )
    parser.add_argument(
        "--name",
        help="the name /v1/models and answers give the model (default: the registry name or the file stem; for a "
        "model.pt, its run folder)",
    )
    add_size_option(parser, "input size (default: the model's)")
    parser.add_argument("--host", default="127.0.0.1", help="address to listen on (default: %(default)s)")
    parser.add_argument("--port", type=int, default=8000, help="port to listen on (default: %(default)s)")
    parser.add_argument("--max-batch", type=int, default=8, help="most images per forward pass (default: %(default)s)")
    parser.add_argument(
        "--max-wait-ms",
        type=float,
        default=5.0,
        help="how long a batch waits to fill after its first image (default: %(default)s)",
    )
    parser.add_argument(
        "--max-upload-mb", type=float, default=20.0, help="largest accepted upload in MiB (default: %(default)s)"
    )
    parser.add_argument(
        "--top-k", type=int, default=5, help="predictions per answer unless a request asks (default: %(default)s)"
    )
    parser.add_argument("--device", default=None, help="torch device (default: cuda when available, else cpu)")
    parser.add_argument(
        "--common-names", default=None, help="JSON of class index -> common name, or an iNat21 annotation file"
    )


def run(args: argparse.Namespace) -> int:
    """Serve until interrupted."""
    if args.max_batch < 1:
        raise HieraxError(f"--max-batch must be at least 1, got {args.max_batch}")
    size = size_from(args.size)
    # imported here: keeps hierax --help fast
    from hierax.serve import serve

    serve(
        args.model,
        host=args.host,
        port=args.port,
        max_batch=args.max_batch,
        max_wait_ms=args.max_wait_ms,
        max_upload_mb=args.max_upload_mb,
        top_k=args.top_k,
        device=args.device,
        common_names=args.common_names,
        log_level="debug" if args.verbose else "info",
        name=args.name,
        size=size,
    )
    return 0
