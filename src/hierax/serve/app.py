"""The FastAPI service: `create_app(net, info)` serves one model over HTTP, with the web page at `/`.

request -> read_image_upload (size limit while streaming) -> decode_image + classification_transform (worker
threads) -> MicroBatcher -> infer_batch (one forward per batch, off the event loop) -> taxonomy -> JSON.
Requests carry only image bytes: the service reads no server-side path they name, fetches nothing and
unpickles nothing. Every error is a JSON body {"error": code, "detail": message} with a 4xx/5xx status.
Answers carry a Server-Timing header (upload, decode, infer: queueing plus the batch's forward pass).
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Mapping
from contextlib import asynccontextmanager
from importlib import resources

import anyio
import numpy as np
import torch
from fastapi import FastAPI, Query, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from starlette.exceptions import HTTPException as StarletteHTTPException

from hierax.data.images import MAX_PIXELS, decode_image
from hierax.data.taxonomy import DEFAULT_THRESHOLDS, Taxonomy, top_k
from hierax.errors import ImageDecodeError
from hierax.inference.classification import infer_batch
from hierax.serve.batcher import MicroBatcher
from hierax.serve.schemas import (
    ClassifyResponse,
    EmbedResponse,
    ErrorBody,
    Health,
    ImageSize,
    ModelCard,
    ModelsResponse,
    Prediction,
    Verdict,
)
from hierax.serve.upload import ApiError, read_image_upload
from hierax.transforms import classification_transform
from hierax.weights.files import ModelInfo, require_classifier

logger = logging.getLogger(__name__)

MAX_TOP_K = 100
_STATIC = {
    "/": ("index.html", "text/html"),
    "/static/app.js": ("app.js", "text/javascript"),
    "/static/style.css": ("style.css", "text/css"),
}
_PAGE_HEADERS = {
    "Content-Security-Policy": "default-src 'self'; img-src 'self' blob: data:; object-src 'none'",
    "X-Content-Type-Options": "nosniff",
    "Cache-Control": "no-cache",
}
_STATUS_CODES = {
    400: "bad_request",
    404: "not_found",
    405: "method_not_allowed",
    413: "too_large",
    415: "unsupported_media_type",
    422: "bad_image",
    503: "unavailable",
}
_DECODE_STATUS = {"empty": 400}
_UPLOAD_BODY = {
    "requestBody": {
        "required": True,
        "description": "one image: a multipart form with the field `file`, or the raw image bytes",
        "content": {
            "multipart/form-data": {
                "schema": {
                    "type": "object",
                    "required": ["file"],
                    "properties": {"file": {"type": "string", "format": "binary"}},
                }
            },
            "image/*": {"schema": {"type": "string", "format": "binary"}},
            "application/octet-stream": {"schema": {"type": "string", "format": "binary"}},
        },
    }
}
_ERRORS = {
    code: {"model": ErrorBody, "description": name.replace("_", " ")}
    for code, name in (
        (400, "empty or malformed upload"),
        (413, "upload too large"),
        (415, "not an image content type"),
        (422, "not a decodable image"),
    )
}


def _decode_error(err: ImageDecodeError) -> ApiError:
    code = "bad_image" if err.reason == "unreadable" else err.reason
    return ApiError(_DECODE_STATUS.get(err.reason, 422), code, str(err))


class ServedModel:
    """One model as the service runs it: preprocessing, a micro-batcher around infer_batch, and its labels."""

    def __init__(
        self,
        name: str,
        net: torch.nn.Module,
        info: ModelInfo,
        *,
        max_batch: int = 8,
        max_wait_ms: float = 5.0,
        common_names: Mapping[int, str] | None = None,
        thresholds: Mapping[str, float] | None = None,
        max_pixels: int = MAX_PIXELS,
    ) -> None:
        self.name = name
        self.net = net
        self.info = info
        self.max_pixels = max_pixels
        self.transform = classification_transform(info.size, info.rgb_stats)
        self.has_embedding = all(hasattr(net, attr) for attr in ("embedding", "classify"))
        self.embedding_size = getattr(net, "embedding_size", None) if self.has_embedding else None
        self.taxonomy = Taxonomy(info.class_names, common_names)
        self.thresholds = dict(DEFAULT_THRESHOLDS if thresholds is None else thresholds)
        if self.taxonomy.is_taxonomic:  # build the per-rank group tables now rather than on the first request
            self.taxonomy.rollup(np.full(info.num_classes, 1.0 / info.num_classes), self.thresholds)
        self.batcher: MicroBatcher[torch.Tensor, tuple[np.ndarray, np.ndarray | None]] = MicroBatcher(
            self._forward, max_batch=max_batch, max_wait_ms=max_wait_ms, name=name
        )

    def _forward(self, items: list[torch.Tensor]) -> list[tuple[np.ndarray, np.ndarray | None]]:
        probs, emb = infer_batch(self.net, torch.stack(items), return_embedding=self.has_embedding)
        return [(probs[i], None if emb is None else emb[i]) for i in range(len(items))]

    def preprocess(self, data: bytes) -> tuple[torch.Tensor, ImageSize]:
        """Encoded bytes -> the model's normalised input and the decoded image size (runs in a worker thread)."""
        image = decode_image(data, max_pixels=self.max_pixels)
        return self.transform(image), ImageSize(width=image.shape[2], height=image.shape[1])

    def warmup(self) -> None:
        """Run one forward pass so the first request does not pay for lazy initialisation."""
        h, w = self.info.size
        self._forward([torch.zeros(3, h, w)])

    def describe(self, probs: np.ndarray, k: int) -> tuple[list[Prediction], Verdict | None]:
        """The top-k predictions with names and taxonomy, and the roll-up verdict for iNat21-named classes."""
        indices, values = top_k(probs, k)
        predictions = []
        for index, p in zip(indices[0].tolist(), values[0].tolist(), strict=True):
            taxon = self.taxonomy.taxon(index)
            label = self.taxonomy.class_names[index]
            predictions.append(
                Prediction(
                    index=index,
                    label=label,
                    probability=p,
                    scientific_name=taxon.species if taxon else label,
                    common_name=self.taxonomy.common_name(index) or None,
                    taxonomy=taxon.as_dict() if taxon else {},
                )
            )
        if not self.taxonomy.is_taxonomic:
            return predictions, None
        rollup = self.taxonomy.rollup(probs, self.thresholds)[0]
        verdict = Verdict(
            rank=rollup.rank or None,
            name=rollup.name or None,
            probability=rollup.probability,
            common_name=rollup.common_name or None,
            uncertain=rollup.rank != "species",
            thresholds=self.thresholds,
        )
        return predictions, verdict

    def card(self) -> ModelCard:
        """What GET /v1/models says about this model."""
        return ModelCard(
            name=self.name,
            network=self.info.network,
            task=self.info.task,
            num_classes=self.info.num_classes,
            size=self.info.size,
            rgb_stats=self.info.rgb_stats,
            embedding_size=self.embedding_size,
            version=self.info.version,
            max_batch=self.batcher.max_batch,
        )


def _error_response(status: int, code: str, message: str, headers: Mapping[str, str] | None = None) -> JSONResponse:
    return JSONResponse({"error": code, "detail": message}, status_code=status, headers=dict(headers or {}))


def _install_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        code = getattr(exc, "code", None) or _STATUS_CODES.get(exc.status_code, "error")
        return _error_response(exc.status_code, code, str(exc.detail), exc.headers)

    @app.exception_handler(RequestValidationError)
    async def invalid_request(request: Request, exc: RequestValidationError) -> JSONResponse:
        problems = "; ".join(f"{'.'.join(str(p) for p in e['loc'])}: {e['msg']}" for e in exc.errors())
        return _error_response(422, "invalid_request", problems)

    @app.exception_handler(Exception)
    async def internal_error(request: Request, exc: Exception) -> JSONResponse:
        logger.error("request %s %s failed", request.method, request.url.path, exc_info=exc)
        return _error_response(500, "internal", "internal server error; the details are in the server log")


def create_app(
    net: torch.nn.Module,
    info: ModelInfo,
    *,
    name: str | None = None,
    max_batch: int = 8,
    max_wait_ms: float = 5.0,
    max_upload_mb: float = 20.0,
    top_k: int = 5,
    common_names: Mapping[int, str] | None = None,
    thresholds: Mapping[str, float] | None = None,
    max_pixels: int = MAX_PIXELS,
    decode_threads: int | None = None,
) -> FastAPI:
    """A FastAPI app serving `net` (eval mode, on its device) with the classes and preprocessing of `info`.

    Endpoints: POST /v1/classify, POST /v1/embed, GET /v1/models, GET /healthz, the page at /, and the
    OpenAPI schema at /openapi.json (docs at /docs). A backbone without a classifier is refused (HieraxError)."""
    require_classifier(info, "serve species predictions")
    net.eval()
    model = ServedModel(
        name or info.network,
        net,
        info,
        max_batch=max_batch,
        max_wait_ms=max_wait_ms,
        common_names=common_names,
        thresholds=thresholds,
        max_pixels=max_pixels,
    )
    max_bytes = int(max_upload_mb * 2**20)
    default_k = top_k
    decode_limiter = anyio.CapacityLimiter(decode_threads or min(4, os.cpu_count() or 1))
    pages = {
        path: (resources.files("hierax.serve").joinpath("static", file).read_bytes(), media)
        for path, (file, media) in _STATIC.items()
    }

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        yield
        await model.batcher.aclose()

    app = FastAPI(
        title="hierax",
        summary="Identify species in wildlife photos with HieraDet.",
        version=info.version,
        lifespan=lifespan,
    )
    app.state.model = model
    _install_error_handlers(app)

    async def run_model(request: Request, response: Response) -> tuple[np.ndarray, np.ndarray | None, ImageSize]:
        start = time.perf_counter()
        with model.batcher.expect():
            data = await read_image_upload(request, max_bytes)
            read = time.perf_counter()
            try:
                x, size = await anyio.to_thread.run_sync(model.preprocess, data, limiter=decode_limiter)
            except ImageDecodeError as err:
                raise _decode_error(err) from None
            decoded = time.perf_counter()
        probs, emb = await model.batcher.submit(x)
        done = time.perf_counter()
        response.headers["Server-Timing"] = ", ".join(
            f"{stage};dur={1000 * seconds:.2f}"
            for stage, seconds in (("upload", read - start), ("decode", decoded - read), ("infer", done - decoded))
        )
        return probs, emb, size

    @app.post(
        "/v1/classify",
        response_model=ClassifyResponse,
        responses=_ERRORS,
        openapi_extra=_UPLOAD_BODY,
        summary="Identify the species in one photo",
    )
    async def classify(
        request: Request,
        response: Response,
        top_k: int = Query(default_k, ge=1, le=MAX_TOP_K, description="how many classes"),
    ) -> ClassifyResponse:
        probs, _, size = await run_model(request, response)
        predictions, verdict = model.describe(probs, top_k)
        return ClassifyResponse(model=model.name, image=size, predictions=predictions, verdict=verdict)

    @app.post(
        "/v1/embed",
        response_model=EmbedResponse,
        responses=_ERRORS,
        openapi_extra=_UPLOAD_BODY,
        summary="The embedding of one photo (LayerNorm, then the spatial mean of the last stage)",
    )
    async def embed(request: Request, response: Response) -> EmbedResponse:
        if not model.has_embedding:
            raise ApiError(501, "not_supported", f"model '{model.name}' does not expose embeddings")
        _, emb, size = await run_model(request, response)
        return EmbedResponse(model=model.name, image=size, embedding_size=len(emb), embedding=emb.tolist())

    @app.get("/v1/models", response_model=ModelsResponse, summary="The served models and their info")
    async def models() -> ModelsResponse:
        return ModelsResponse(models=[model.card()], max_upload_bytes=max_bytes)

    @app.get("/healthz", response_model=Health, summary="Liveness, with batching counters")
    async def healthz() -> Health:
        stats = model.batcher.stats
        return Health(
            status="ok", models=[model.name], batches=stats.batches, images=stats.items, mean_batch=stats.mean_batch
        )

    for path, (body, media) in pages.items():
        app.add_api_route(path, _page(body, media), methods=["GET"], include_in_schema=False)
    return app


def _page(body: bytes, media: str):
    async def page() -> Response:
        return Response(body, media_type=media, headers=_PAGE_HEADERS)

    return page
