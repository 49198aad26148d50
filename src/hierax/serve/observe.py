"""What an operator sees: Prometheus metrics at /metrics and, with `log_json`, one JSON access-log line per request.

Metrics (prometheus-client, one registry per app):
    hierax_requests_total{endpoint,method,status}   answered requests; endpoint is the route template
    hierax_request_duration_seconds{endpoint}       latency histogram, from the first byte in to the last out
    hierax_batch_size                               images per micro-batch (histogram)
    hierax_batch_duration_seconds                   seconds per micro-batch (histogram)
    hierax_queue_depth                              model requests inside the service now
    hierax_batch_queue                              images waiting for a forward pass now
    hierax_model_load_seconds{model}                how long loading the model took
    hierax_model_info{model,network,classes}        1, with the served model as labels

Access-log lines (logger `hierax.serve.access`) hold time, method, path (without the query string), endpoint,
status, duration, client address, key label, user agent and byte counts: never keys, query strings or bodies.
"""

from __future__ import annotations

import datetime
import json
import logging
import time
from collections.abc import Callable

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from starlette.datastructures import Headers
from starlette.routing import Match, Router
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from hierax.serve.access import KEY_SCOPE

access_logger = logging.getLogger("hierax.serve.access")

LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256)
OTHER = "other"
MAX_AGENT = 200


class ServiceMetrics:
    """The service's Prometheus metrics in their own registry (see the module docstring)."""

    content_type = CONTENT_TYPE_LATEST

    def __init__(self, model: str, network: str, classes: int) -> None:
        self.registry = registry = CollectorRegistry()
        self.requests = Counter(
            "hierax_requests", "HTTP requests answered", ["endpoint", "method", "status"], registry=registry
        )
        self.latency = Histogram(
            "hierax_request_duration_seconds",
            "request latency, first byte in to last byte out",
            ["endpoint"],
            buckets=LATENCY_BUCKETS,
            registry=registry,
        )
        self.batch_size = Histogram(
            "hierax_batch_size", "images per micro-batch", buckets=BATCH_BUCKETS, registry=registry
        )
        self.batch_seconds = Histogram(
            "hierax_batch_duration_seconds", "seconds per micro-batch", buckets=LATENCY_BUCKETS, registry=registry
        )
        self.queue_depth = Gauge("hierax_queue_depth", "model requests inside the service", registry=registry)
        self.batch_queue = Gauge("hierax_batch_queue", "images waiting for a forward pass", registry=registry)
        self.model_load = Gauge(
            "hierax_model_load_seconds", "seconds it took to load the model", ["model"], registry=registry
        )
        info = Gauge("hierax_model_info", "the served model", ["model", "network", "classes"], registry=registry)
        info.labels(model, network, str(classes)).set(1)
        self.model = model

    def watch(self, queue_depth: Callable[[], float], batch_queue: Callable[[], float]) -> None:
        """Read the two gauges from these functions at each scrape."""
        self.queue_depth.set_function(queue_depth)
        self.batch_queue.set_function(batch_queue)

    def record_batch(self, size: int, seconds: float) -> None:
        self.batch_size.observe(size)
        self.batch_seconds.observe(seconds)

    def set_load_seconds(self, seconds: float) -> None:
        self.model_load.labels(self.model).set(seconds)

    def render(self) -> bytes:
        """The text exposition format of every metric."""
        return generate_latest(self.registry)


def endpoint_of(router: Router, scope: Scope) -> str:
    """The route template a request goes to (a method mismatch counts as the route), else "other": labels stay
    few whatever paths clients send."""
    partial = None
    for route in router.routes:
        match, _ = route.matches(scope)
        if match is Match.FULL:
            return getattr(route, "path", OTHER)
        if match is Match.PARTIAL and partial is None:
            partial = getattr(route, "path", OTHER)
    return partial or OTHER


class ObserveMiddleware:
    """Counts and times every HTTP request into `metrics` and, when `log_json`, writes its access-log line."""

    def __init__(self, app: ASGIApp, router: Router, metrics: ServiceMetrics, log_json: bool = False) -> None:
        self.app = app
        self.router = router
        self.metrics = metrics
        self.log_json = log_json

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        start = time.perf_counter()
        endpoint = endpoint_of(self.router, scope)
        status, sent = 500, 0

        async def observe(message: Message) -> None:
            nonlocal status, sent
            if message["type"] == "http.response.start":
                status = int(message["status"])
            elif message["type"] == "http.response.body":
                sent += len(message.get("body", b""))
            await send(message)

        try:
            await self.app(scope, receive, observe)
        finally:
            seconds = time.perf_counter() - start
            self.metrics.requests.labels(endpoint, scope["method"], str(status)).inc()
            self.metrics.latency.labels(endpoint).observe(seconds)
            if self.log_json:
                access_logger.info(access_line(scope, endpoint, status, seconds, sent))


def access_line(scope: Scope, endpoint: str, status: int, seconds: float, sent: int) -> str:
    """One request as a JSON line (see the module docstring for what it holds and what it never holds)."""
    headers = Headers(scope=scope)
    client = scope.get("client")
    received = headers.get("content-length")
    return json.dumps(
        {
            "time": datetime.datetime.now(datetime.UTC).isoformat(timespec="milliseconds"),
            "method": scope["method"],
            "path": scope["path"],
            "endpoint": endpoint,
            "status": status,
            "duration_ms": round(1000 * seconds, 2),
            "client": client[0] if client else None,
            "key": scope.get(KEY_SCOPE),
            "bytes_in": int(received) if received and received.isdigit() else None,
            "bytes_out": sent,
            "user_agent": headers.get("user-agent", "")[:MAX_AGENT] or None,
        },
        separators=(",", ":"),
    )
