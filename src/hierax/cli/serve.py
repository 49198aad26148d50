"""`hierax serve`: the HTTP API and web page for one model."""

from __future__ import annotations

import argparse

from hierax.cli._options import add_open_set_arguments
from hierax.errors import HieraxError
from hierax.sizes import add_size_option, size_from
from hierax.weights.catalog import DEFAULT_MODEL

COMMAND = "serve"
HELP = "serve a model over HTTP: POST /v1/classify, /v1/embed, /v1/similar, and a web page at /"


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
    parser.add_argument("--max-batch", type=int, default=8, help="most images per micro-batch (default: %(default)s)")
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
    _add_network_arguments(parser.add_argument_group("on an open network (all off by default)"))
    _add_addon_arguments(parser.add_argument_group("what the answers add (all off by default)"))
    add_open_set_arguments(parser)


def _add_network_arguments(group: argparse._ArgumentGroup) -> None:
    group.add_argument(
        "--api-keys",
        metavar="FILE",
        help="require an API key (Authorization: Bearer KEY or X-API-Key: KEY): one key, or sha256:<hex> of one, "
        "per line, optionally followed by a label for logs; /healthz and the page stay open",
    )
    group.add_argument(
        "--cors-origin",
        action="append",
        default=[],
        metavar="ORIGIN",
        help="a browser origin (https://host[:port]) allowed to call the API; repeatable",
    )
    group.add_argument(
        "--rate-limit", metavar="N/min", help="requests that run the model, per key (else per client address)"
    )
    group.add_argument(
        "--max-queue",
        type=int,
        metavar="N",
        help="most model requests in the service at once; the next gets 503 with Retry-After",
    )
    group.add_argument(
        "--request-timeout",
        type=float,
        metavar="SECONDS",
        help="a model request that takes longer (upload included) gets 408 (upload) or 503",
    )
    group.add_argument(
        "--log-json", action="store_true", help="one JSON access-log line per request on stdout (never keys or bodies)"
    )


def _add_addon_arguments(group: argparse._ArgumentGroup) -> None:
    group.add_argument(
        "--geo-prior",
        metavar="PRIOR",
        help="a location/date prior (hierax geoprior fit): /v1/classify takes lat, lon, date, else the photo's EXIF",
    )
    group.add_argument(
        "--index", metavar="INDEX_DIR", help="a similar-photo index made with this model (hierax index): /v1/similar"
    )
    group.add_argument(
        "--thumbnails",
        action="store_true",
        help="serve small re-encoded copies of indexed photos, by index id only (with --index)",
    )


def _service_options(args: argparse.Namespace):
    """The ServiceOptions of the network flags (reads the keys file)."""
    from hierax.serve import KeyRing, RateLimit, ServiceOptions

    return ServiceOptions(
        api_keys=KeyRing.load(args.api_keys) if args.api_keys else None,
        cors_origins=tuple(args.cors_origin),
        rate_limit=RateLimit.parse(args.rate_limit) if args.rate_limit else None,
        max_queue=args.max_queue,
        request_timeout=args.request_timeout,
        log_json=args.log_json,
    )


def run(args: argparse.Namespace) -> int:
    """Serve until interrupted."""
    if args.max_batch < 1:
        raise HieraxError(f"--max-batch must be at least 1, got {args.max_batch}")
    size = size_from(args.size)
    # imported here: keeps hierax --help fast
    from hierax.serve import serve

    options = _service_options(args)

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
        options=options,
        geo_prior=args.geo_prior,
        index=args.index,
        thumbnails=args.thumbnails,
        extra_species=args.extra_species,
        only_extra=args.only_extra,
        unknown_threshold=args.unknown_threshold,
    )
    return 0
