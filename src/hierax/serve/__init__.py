"""The HTTP service and web page: `create_app(net, info)` for an app, `serve(model)` to load a model and run it."""

from __future__ import annotations

import logging
from pathlib import Path

from hierax.distributed import default_device
from hierax.serve.app import ServedModel, create_app
from hierax.serve.batcher import MicroBatcher
from hierax.weights.catalog import DEFAULT_MODEL

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
) -> None:
    """Load `model` (registry name or checkpoint path; at input `size` when given) and serve it with uvicorn
    until interrupted, under `name` (default: model_display_name(model)).

    At most MAX_CONNECTIONS connections are handled at once; beyond that uvicorn answers 503."""
    import uvicorn

    from hierax.data.taxonomy import load_common_names
    from hierax.weights.load import load_pretrained_model

    net, info = load_pretrained_model(model, inference=True, device=default_device(device), new_size=size)
    names = load_common_names(common_names, info.class_names) if common_names else None
    app = create_app(
        net,
        info,
        name=name or model_display_name(model),
        max_batch=max_batch,
        max_wait_ms=max_wait_ms,
        max_upload_mb=max_upload_mb,
        top_k=top_k,
        common_names=names,
    )
    app.state.model.warmup()
    logger.info("serving %s (%s, %d classes) on http://%s:%d", model, info.network, info.num_classes, host, port)
    uvicorn.run(app, host=host, port=port, log_level=log_level, limit_concurrency=MAX_CONNECTIONS, server_header=False)


__all__ = ["MicroBatcher", "ServedModel", "create_app", "model_display_name", "serve"]
