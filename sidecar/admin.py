"""Admin listener: /healthz, /readyz and /metrics without a token; state-changing routes need one."""

from __future__ import annotations

from collections.abc import Awaitable, Callable

from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from sidecar.ingress.http import errors_middleware, json_response
from sidecar.models import JSON
from sidecar.observability import Metrics

Readiness = Callable[[], Awaitable[tuple[bool, dict[str, JSON]]]]


class AdminApp:
    """Probes and metrics; further admin routes (dead letters) attach to ``app()``."""

    def __init__(self, metrics: Metrics, readiness: Readiness) -> None:
        self._metrics = metrics
        self._readiness = readiness

    def app(self) -> web.Application:
        app = web.Application(middlewares=[errors_middleware], client_max_size=64 * 1024)
        app.router.add_get("/healthz", self.healthz)
        app.router.add_get("/readyz", self.readyz)
        app.router.add_get("/metrics", self.metrics)
        return app

    async def healthz(self, request: web.Request) -> web.Response:
        """Alive: the event loop answers. Says nothing about dependencies, on purpose:
        a store outage must fail readiness, not get the pod restarted."""
        return json_response({"status": "ok"})

    async def readyz(self, request: web.Request) -> web.Response:
        ready, details = await self._readiness()
        return json_response({"status": "ok" if ready else "unavailable", "details": details}, 200 if ready else 503)

    async def metrics(self, request: web.Request) -> web.Response:
        body = generate_latest(self._metrics.registry)
        return web.Response(body=body, headers={"Content-Type": CONTENT_TYPE_LATEST})
