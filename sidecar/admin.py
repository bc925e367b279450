"""Admin listener: /healthz, /readyz and /metrics without a token; state-changing routes need one."""

from __future__ import annotations

from collections.abc import Awaitable, Callable

from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from sidecar.auth import TokenChecker
from sidecar.dead_letters import DeadLetters, Selection
from sidecar.errors import FieldViolation, InvalidArgument, Unauthenticated
from sidecar.ingress.http import errors_middleware, json_response, read_json
from sidecar.models import JSON, DeadLetter
from sidecar.observability import Metrics

Readiness = Callable[[], Awaitable[tuple[bool, dict[str, JSON]]]]


def dead_letter_json(d: DeadLetter) -> dict[str, JSON]:
    return {
        "id": d.id,
        "kind": d.kind,
        "conversationId": d.conversation_id,
        "sequence": d.sequence,
        "body": d.body,
        "error": d.error,
        "attempts": d.attempts,
        "deadAt": d.dead_at,
        **({"webhookId": d.extra["webhook_id"]} if "webhook_id" in d.extra else {}),
    }


class AdminApp:
    """Probes and metrics (open, for kubelet), and the dead-letter API (admin token required).

    With no admin token configured the API is closed: it can read message
    contents and change what gets delivered.
    """

    def __init__(
        self, metrics: Metrics, readiness: Readiness, letters: DeadLetters, tokens: TokenChecker, body_timeout: float
    ) -> None:
        self._body_timeout = body_timeout
        self._metrics = metrics
        self._readiness = readiness
        self._letters = letters
        self._tokens = tokens

    def app(self) -> web.Application:
        app = web.Application(middlewares=[errors_middleware], client_max_size=64 * 1024)
        app.router.add_get("/healthz", self.healthz)
        app.router.add_get("/readyz", self.readyz)
        app.router.add_get("/metrics", self.metrics)
        app.router.add_get("/v1/dead-letters", self.list_dead_letters)
        app.router.add_get("/v1/dead-letters/{id}", self.get_dead_letter)
        app.router.add_post("/v1/dead-letters/replay", self.replay)
        app.router.add_post("/v1/dead-letters/purge", self.purge)
        return app

    def _authorize(self, request: web.Request) -> None:
        if not self._tokens.enabled:
            raise Unauthenticated("the admin API is disabled: set SIDECAR_ADMIN_TOKENS")
        if not self._tokens.check(request.headers.get("Authorization")):
            raise Unauthenticated()

    async def list_dead_letters(self, request: web.Request) -> web.Response:
        self._authorize(request)
        query = request.query
        kind = query.get("kind") or None
        if kind not in (None, "reply", "message"):
            raise InvalidArgument("kind must be reply or message", details=(FieldViolation("kind", "unknown"),))
        raw = query.get("limit", "100")
        if not (raw.isascii() and raw.isdigit() and 1 <= int(raw) <= 1000):
            raise InvalidArgument(
                "limit must be a whole number from 1 to 1000", details=(FieldViolation("limit", "out of range"),)
            )
        limit = int(raw)
        after = query.get("after", "0")
        if not (after.isascii() and after.isdigit() and len(after) <= 18):
            raise InvalidArgument(
                "after must be the next value of a previous page", details=(FieldViolation("after", "not a position"),)
            )
        # One more than asked says whether there are more ("more"), oldest first; "next"
        # is the cursor that continues after this page.
        letters = await self._letters.page(
            kind=kind, conversation_id=query.get("conversationId") or None, limit=limit + 1, after=int(after)
        )
        page = letters[:limit]
        answer: dict[str, JSON] = {"deadLetters": [dead_letter_json(d) for d in page], "more": len(letters) > limit}
        if len(letters) > limit:
            answer["next"] = str(page[-1].position)
        return json_response(answer)

    async def get_dead_letter(self, request: web.Request) -> web.Response:
        if request.match_info["id"] in {"replay", "purge"}:  # the POST routes, asked with GET
            raise web.HTTPMethodNotAllowed(request.method, ["POST"])
        self._authorize(request)
        return json_response(dead_letter_json(await self._letters.get(request.match_info["id"])))

    async def replay(self, request: web.Request) -> web.Response:
        self._authorize(request)
        return json_response({"replayed": await self._letters.replay(await self._selection(request))})

    async def purge(self, request: web.Request) -> web.Response:
        self._authorize(request)
        return json_response({"purged": await self._letters.purge(await self._selection(request))})

    async def _selection(self, request: web.Request) -> Selection:
        """``{"ids": [...]}``, ``{"conversationId": "..."}`` or ``{"all": true}``, optionally with ``kind``."""
        body = await read_json(request, 64 * 1024, self._body_timeout)
        if not isinstance(body, dict):
            raise InvalidArgument("the body must be a JSON object", details=(FieldViolation("body", "not an object"),))
        ids = body.get("ids", [])
        if not isinstance(ids, list) or not all(isinstance(i, str) for i in ids):
            raise InvalidArgument("ids must be a list of strings", details=(FieldViolation("ids", "wrong type"),))
        conversation_id = body.get("conversationId", "")
        everything = body.get("all", False)
        kind = body.get("kind")
        bad = [
            FieldViolation(name, reason)
            for name, ok, reason in (
                ("conversationId", isinstance(conversation_id, str), "must be a string"),
                ("all", isinstance(everything, bool), "must be true or false"),
                ("kind", kind in (None, "reply", "message"), "must be reply or message"),
            )
            if not ok
        ]
        if bad:
            raise InvalidArgument("the selection has invalid fields", details=tuple(bad))
        return Selection(ids=tuple(ids), conversation_id=conversation_id, everything=everything, kind=kind)

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
