"""The HTTP service and web page: `create_app(net, info)` for an app, `serve(model)` to load a model and run it."""

from __future__ import annotations

import logging
import os
import sys
import time
from pathlib import Path

from hierax.data.taxonomy import load_common_names
from hierax.distributed import default_device
from hierax.serve.access import KeyRing
from hierax.serve.app import create_app
from hierax.serve.batcher import MicroBatcher
from hierax.serve.limits import RateLimit
from hierax.serve.model import ServedModel
from hierax.serve.observe import access_logger
from hierax.serve.options import Addons, ServiceOptions, check_addon_flags
from hierax.weights.catalog import DEFAULT_MODEL
from hierax.weights.load import load_pretrained_model

logger = logging.getLogger(__name__)

MAX_CONNECTIONS = 256
GENERIC_STEMS = frozenset({"model"})  # hierax train and pretrain write <run folder>/model.pt


def model_display_name(model: str) -> str:
    """The name a model is served under: a registry name as given, a checkpoint path by its file stem, or by its
    folder when the stem says nothing (`runs/birds/model.pt` is "birds")."""
    path = Path(model)
    if not (path.suffix or "/" in model or "\\" in model):
        return model
    return path.parent.name if path.stem in GENERIC_STEMS and path.parent.name else path.stem


def serve(
    model: str = DEFAULT_MODEL,
    *,
    host: str = "127.0.0.1",
    port: int = 8000,
    max_batch: int = 8,
    max_wait_ms: float = 5.0,
    max_upload_mb: float = 20.0,
    top_k: int = 5,
    device: str | None = None,
    common_names: str | None = None,
    log_level: str = "info",
    name: str | None = None,
    size: tuple[int, int] | int | None = None,
    options: ServiceOptions | None = None,
    geo_prior: str | os.PathLike | None = None,
    index: str | os.PathLike | None = None,
    thumbnails: bool = False,
    extra_species: str | os.PathLike | None = None,
    only_extra: bool = False,
    unknown_threshold: float | None = None,
) -> None:
    """Load `model` (registry name or checkpoint path; at input `size` when given) and serve it with uvicorn
    until interrupted, under `name` (default: model_display_name(model)). `options`: keys, CORS, limits, logs;
    the rest name the files of the optional parts (see Addons).

    At most MAX_CONNECTIONS connections are handled at once; beyond that uvicorn answers 503."""
    import uvicorn  # imported here: the app (create_app) runs under any ASGI server

    options = options or ServiceOptions()
    check_addon_flags(extra_species, only_extra, index, thumbnails, unknown_threshold)
    start = time.perf_counter()
    net, info = load_pretrained_model(model, inference=True, device=default_device(device), new_size=size)
    names = load_common_names(common_names, info.class_names) if common_names else None
    addons = Addons.load(
        info.class_names,
        geo_prior=geo_prior,
        index=index,
        thumbnails=thumbnails,
        extra_species=extra_species,
        only_extra=only_extra,
        unknown_threshold=unknown_threshold,
    )
    app = create_app(
        net,
        info,
        name=name or model_display_name(model),
        max_batch=max_batch,
        max_wait_ms=max_wait_ms,
        max_upload_mb=max_upload_mb,
        top_k=top_k,
        common_names=names,
        options=options,
        addons=addons,
        model_spec=model,
    )
    app.state.model.warmup()
    app.state.metrics.set_load_seconds(time.perf_counter() - start)
    if options.log_json:
        _log_json_lines()
    logger.info("serving %s (%s, %d classes) on http://%s:%d", model, info.network, info.num_classes, host, port)
    for line in describe_options(options, app.state.model):
        logger.info("%s", line)
    uvicorn.run(
        app,
        host=host,
        port=port,
        log_level=log_level,
        limit_concurrency=MAX_CONNECTIONS,
        server_header=False,
        access_log=not options.log_json,
    )


def _log_json_lines() -> None:
    """Access-log lines go to stdout as they are (JSON), in place of uvicorn's access log."""
    handler = logging.StreamHandler(sys.stdout)
    handler.setFormatter(logging.Formatter("%(message)s"))
    access_logger.addHandler(handler)
    access_logger.setLevel(logging.INFO)
    access_logger.propagate = False


def describe_options(options: ServiceOptions, model: ServedModel) -> list[str]:
    """One line per optional part that is on, for the start-up log (never a key)."""
    lines = []
    if options.api_keys is not None:
        lines.append(f"API keys required ({len(options.api_keys)} accepted); /healthz and the page stay open")
    if options.cors_origins:
        lines.append(f"CORS allowed for {', '.join(options.cors_origins)}")
    if options.rate_limit is not None:
        lines.append(f"rate limit {options.rate_limit} per {'key' if options.api_keys else 'client address'}")
    if options.max_queue is not None:
        lines.append(f"at most {options.max_queue} model requests at once; the next gets 503")
    if options.request_timeout is not None:
        lines.append(f"model requests time out after {options.request_timeout:g} s")
    features = model.features()
    if features.geo_prior:
        lines.append("location prior on: /v1/classify takes lat, lon, date, else the photo's EXIF")
    if features.similar_index is not None:
        lines.append(
            f"similar photos: {features.similar_index} indexed{', thumbnails served' if features.thumbnails else ''}"
        )
    if features.extra_species:
        lines.append(f"{len(features.extra_species)} species of the user's own{' only' if features.only_extra else ''}")
    if features.unknown_threshold is not None:
        lines.append(f"best probability under {features.unknown_threshold:.3f} answers 'unknown'")
    return lines


__all__ = [
    "Addons",
    "KeyRing",
    "MicroBatcher",
    "RateLimit",
    "ServedModel",
    "ServiceOptions",
    "create_app",
    "model_display_name",
    "serve",
]
