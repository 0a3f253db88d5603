"""``GET /metrics``: Prometheus text format, with the ``prometheus-client`` library.

- ``eslmatch_requests_total{route, method, status}``: requests answered;
- ``eslmatch_request_seconds{route}``: latency histogram (from the first byte read to the
  last byte sent);
- ``eslmatch_errors_total{route}``: answers with status >= 500;
- ``eslmatch_items``: live items in the gallery (read when scraped).

``route`` is the route's template (``/image/{item_id:path}``), ``other`` for unknown paths, so
the number of series stays bounded whatever clients send.
"""

from __future__ import annotations

import time
from collections.abc import Callable

from starlette.types import ASGIApp, Message, Receive, Scope, Send

try:
    from prometheus_client import CONTENT_TYPE_LATEST as CONTENT_TYPE
    from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
except ImportError:  # pragma: no cover - a dependency of the serve extra
    CollectorRegistry = None  # type: ignore[assignment, misc]

BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.075, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)


class Metrics:
    """The server's metrics in a registry of its own (``items``: how to count the gallery)."""

    def __init__(self, items: Callable[[], float]) -> None:
        if CollectorRegistry is None:
            from ..errors import EslmatchError

            raise EslmatchError("eslmatch serve needs prometheus-client: pip install 'eslmatch[serve]'")
        self.registry = CollectorRegistry()
        self.requests = Counter(
            "eslmatch_requests", "Requests answered", ["route", "method", "status"], registry=self.registry
        )
        self.latency = Histogram(
            "eslmatch_request_seconds", "Request latency", ["route"], buckets=BUCKETS, registry=self.registry
        )
        self.errors = Counter("eslmatch_errors", "Answers with status >= 500", ["route"], registry=self.registry)
        gauge = Gauge("eslmatch_items", "Live items in the gallery", registry=self.registry)
        gauge.set_function(items)

    def render(self) -> tuple[bytes, str]:
        return generate_latest(self.registry), CONTENT_TYPE


class MetricsMiddleware:
    """Counts every HTTP request by route template and status, and times it."""

    def __init__(self, app: ASGIApp, metrics: Metrics) -> None:
        self.app = app
        self.metrics = metrics

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        start = time.perf_counter()
        status = [500]

        async def sending(message: Message) -> None:
            if message["type"] == "http.response.start":
                status[0] = int(message["status"])
            await send(message)

        try:
            await self.app(scope, receive, sending)
        finally:
            route = getattr(scope.get("route"), "path", None) or "other"
            self.metrics.requests.labels(route, scope.get("method", ""), str(status[0])).inc()
            self.metrics.latency.labels(route).observe(time.perf_counter() - start)
            if status[0] >= 500:
                self.metrics.errors.labels(route).inc()
