"""The FastAPI service: `create_app(net, info)` serves one model over HTTP, with the web page at `/`.

request -> [ObserveMiddleware: metrics, access log] -> [CORS] -> [AccessMiddleware: keys, rate limit] ->
admission (bounded queue) -> read_upload (size limit while streaming) -> decode_image + classification_transform
(+ EXIF place with a prior; worker threads) -> MicroBatcher -> infer_batch and the prior (one forward per batch,
off the event loop) -> the user's species, taxonomy, open set -> JSON.
Requests carry only image bytes and small form fields: the service reads no server-side path they name, fetches
nothing and unpickles nothing (thumbnails are of indexed photos only, by index id, when enabled). Every error is
a JSON body {"error": code, "detail": message} with a 4xx/5xx status. Answers carry a Server-Timing header
(upload, decode, infer: queueing plus the batch's forward pass).
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Mapping
from contextlib import asynccontextmanager
from importlib import resources

import anyio
import torch
from fastapi import FastAPI, Query, Request
from fastapi import Path as PathParam
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.middleware.cors import CORSMiddleware

from hierax.data.images import MAX_PIXELS
from hierax.data.metadata import CaptureContext
from hierax.errors import ImageDecodeError
from hierax.serve.access import AccessMiddleware
from hierax.serve.docs import ERRORS, UPLOAD_BODY, document_keys
from hierax.serve.fields import request_place
from hierax.serve.limits import Admission, TokenBuckets, retry_after
from hierax.serve.model import Output, ServedModel, geo_context
from hierax.serve.observe import ObserveMiddleware, ServiceMetrics
from hierax.serve.options import Addons, ServiceOptions
from hierax.serve.schemas import (
    ClassifyResponse,
    EmbedResponse,
    Health,
    ImageSize,
    ModelsResponse,
    SimilarResponse,
)
from hierax.serve.upload import ApiError, read_upload
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
    429: "rate_limited",
    503: "unavailable",
}
_DECODE_STATUS = {"empty": 400}


def _decode_error(err: ImageDecodeError) -> ApiError:
    code = "bad_image" if err.reason == "unreadable" else err.reason
    return ApiError(_DECODE_STATUS.get(err.reason, 422), code, str(err))


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


def _install_middleware(app: FastAPI, options: ServiceOptions, metrics: ServiceMetrics) -> None:
    """Outermost first: metrics and access log (every request counts), CORS (preflights are answered before any
    key is asked for, and refusals carry CORS headers so a browser app can read them), keys and rate limits."""
    if options.api_keys is not None or options.rate_limit is not None:
        buckets = None if options.rate_limit is None else TokenBuckets(options.rate_limit)
        app.add_middleware(AccessMiddleware, keys=options.api_keys, buckets=buckets)
    if options.cors_origins:
        app.add_middleware(
            CORSMiddleware,
            allow_origins=list(options.cors_origins),
            allow_methods=["GET", "POST"],
            allow_headers=["Authorization", "X-API-Key", "Content-Type"],
            expose_headers=["Retry-After", "Server-Timing"],
        )
    app.add_middleware(ObserveMiddleware, router=app.router, metrics=metrics, log_json=options.log_json)


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
    options: ServiceOptions | None = None,
    addons: Addons | None = None,
    model_spec=None,
    load_seconds: float | None = None,
) -> FastAPI:
    """A FastAPI app serving `net` (eval mode, on its device) with the classes and preprocessing of `info`.

    Endpoints: POST /v1/classify, /v1/embed, /v1/similar; GET /v1/models, /v1/thumbnails/{id}, /healthz,
    /metrics, the page at /, and the OpenAPI schema at /openapi.json (docs at /docs). `options`: keys, CORS,
    limits, logs; `addons`: prior, index, user species (checked against the model: ModelMismatchError).
    `load_seconds`: how long loading the model took, for /metrics. A backbone without a classifier is refused."""
    require_classifier(info, "serve species predictions")
    net.eval()
    options = options or ServiceOptions()
    name = name or info.network
    metrics = ServiceMetrics(name, info.network, info.num_classes)
    model = ServedModel(
        name,
        net,
        info,
        max_batch=max_batch,
        max_wait_ms=max_wait_ms,
        common_names=common_names,
        thresholds=thresholds,
        max_pixels=max_pixels,
        addons=addons,
        model_spec=model_spec,
        on_batch=metrics.record_batch,
    )
    admission = Admission(options.max_queue)
    metrics.watch(lambda: admission.depth, lambda: model.batcher.pending)
    if load_seconds is not None:
        metrics.set_load_seconds(load_seconds)
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
    app.state.metrics = metrics
    app.state.admission = admission
    _install_error_handlers(app)
    _install_middleware(app, options, metrics)
    if options.api_keys is not None:
        document_keys(app)

    # ---- one model request: admission (bounded queue), time-out, upload, decode, batch

    def busy_for() -> str:
        """Retry-After when busy: the batches ahead of a new request, at their mean duration."""
        return retry_after((admission.depth / max_batch + 1) * model.batcher.stats.mean_seconds)

    async def run_model(
        request: Request, response: Response, place: tuple | None = None
    ) -> tuple[Output, ImageSize, CaptureContext | None]:
        if not admission.try_enter():
            message = f"the server is busy ({admission.limit} requests in progress): retry in a moment"
            raise ApiError(503, "overloaded", message, {"Retry-After": busy_for()})
        stage = "upload"
        try:
            with anyio.fail_after(options.request_timeout):
                start = time.perf_counter()
                with model.batcher.expect():
                    upload = await read_upload(request, max_bytes)
                    row = None if place is None else request_place(*place, upload.fields)
                    stage, read = "decode", time.perf_counter()
                    try:
                        job, size = await anyio.to_thread.run_sync(
                            model.preprocess, upload.data, row, limiter=decode_limiter
                        )
                    except ImageDecodeError as err:
                        raise _decode_error(err) from None
                    stage, decoded = "infer", time.perf_counter()
                out = await model.batcher.submit(job)
                done = time.perf_counter()
        except TimeoutError:
            seconds = f"{options.request_timeout:g} s"
            if stage == "upload":
                raise ApiError(408, "request_timeout", f"the upload did not arrive within {seconds}") from None
            message = f"no answer within {seconds}: the server is busy, retry in a moment"
            raise ApiError(503, "timeout", message, {"Retry-After": busy_for()}) from None
        finally:
            admission.leave()
        response.headers["Server-Timing"] = ", ".join(
            f"{stage};dur={1000 * seconds:.2f}"
            for stage, seconds in (("upload", read - start), ("decode", decoded - read), ("infer", done - decoded))
        )
        return out, size, job.place

    # ---- endpoints that run the model

    @app.post(
        "/v1/classify",
        response_model=ClassifyResponse,
        responses=ERRORS,
        openapi_extra=UPLOAD_BODY,
        summary="Identify the species in one photo",
    )
    async def classify(
        request: Request,
        response: Response,
        top_k: int = Query(default_k, ge=1, le=MAX_TOP_K, description="how many classes"),
        lat: float | None = Query(None, ge=-90, le=90, description="latitude (with --geo-prior); else EXIF GPS"),
        lon: float | None = Query(None, ge=-180, le=180, description="longitude (with --geo-prior)"),
        date: str | None = Query(None, description="YYYY-MM-DD (with --geo-prior); else EXIF DateTimeOriginal"),
    ) -> ClassifyResponse:
        out, size, place = await run_model(request, response, (lat, lon, date))
        predictions, verdict, decision = model.describe(out, top_k)
        geo = None if place is None else geo_context(place, out.prior_applied)
        return ClassifyResponse(
            model=model.name, image=size, predictions=predictions, verdict=verdict, geo=geo, decision=decision
        )

    @app.post(
        "/v1/embed",
        response_model=EmbedResponse,
        responses=ERRORS,
        openapi_extra=UPLOAD_BODY,
        summary="The embedding of one photo (LayerNorm, then the spatial mean of the last stage)",
    )
    async def embed(request: Request, response: Response) -> EmbedResponse:
        if not model.has_embedding:
            raise ApiError(501, "not_supported", f"model '{model.name}' does not expose embeddings")
        out, size, _ = await run_model(request, response)
        emb = out.embedding
        return EmbedResponse(model=model.name, image=size, embedding_size=len(emb), embedding=emb.tolist())

    @app.post(
        "/v1/similar",
        response_model=SimilarResponse,
        responses=ERRORS,
        openapi_extra=UPLOAD_BODY,
        summary="The indexed photos most like one photo (with --index)",
    )
    async def similar(
        request: Request, response: Response, k: int = Query(10, ge=1, le=MAX_TOP_K, description="how many photos")
    ) -> SimilarResponse:
        index = model.addons.index
        if index is None:
            raise ApiError(501, "not_enabled", "this server has no photo index: start it with --index INDEX_DIR")
        out, size, _ = await run_model(request, response)
        matches = await anyio.to_thread.run_sync(model.similar, out.embedding, k)
        return SimilarResponse(model=model.name, image=size, index_size=len(index), matches=matches)

    # ---- the index's photos, the service itself, the page

    @app.get("/v1/thumbnails/{photo_id}", summary="A small copy of an indexed photo (with --index --thumbnails)")
    async def thumbnail(photo_id: int = PathParam(ge=0, description="the photo's id in the index")) -> Response:
        if not model.addons.thumbnails:
            raise ApiError(501, "not_enabled", "this server serves no thumbnails: start it with --thumbnails")
        count = len(model.addons.index)
        if photo_id >= count:
            raise ApiError(404, "not_found", f"no photo {photo_id}: the index holds {count} photos (0 to {count - 1})")
        try:
            data = await anyio.to_thread.run_sync(model.thumbnail, photo_id, limiter=decode_limiter)
        except (ImageDecodeError, OSError) as err:
            raise ApiError(404, "unreadable", f"indexed photo {photo_id} cannot be read now ({err})") from None
        headers = {"Cache-Control": "private, max-age=3600", "X-Content-Type-Options": "nosniff"}
        return Response(data, media_type="image/jpeg", headers=headers)

    @app.get("/v1/models", response_model=ModelsResponse, summary="The served models and their info")
    async def models() -> ModelsResponse:
        return ModelsResponse(models=[model.card()], max_upload_bytes=max_bytes, features=model.features())

    @app.get("/healthz", response_model=Health, summary="Liveness, with batching counters")
    async def healthz() -> Health:
        stats = model.batcher.stats
        return Health(
            status="ok",
            models=[model.name],
            batches=stats.batches,
            images=stats.items,
            mean_batch=stats.mean_batch,
            queue_depth=admission.depth,
        )

    @app.get("/metrics", include_in_schema=False)
    async def metrics_page() -> Response:
        return Response(metrics.render(), media_type=metrics.content_type)

    for path, (body, media) in pages.items():
        app.add_api_route(path, _page(body, media), methods=["GET"], include_in_schema=False)
    return app


def _page(body: bytes, media: str):
    async def page() -> Response:
        return Response(body, media_type=media, headers=_PAGE_HEADERS)

    return page
