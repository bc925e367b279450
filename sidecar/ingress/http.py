"""HTTP front door: the Botpress Messaging API webhook format in, the core's answers and errors out."""

from __future__ import annotations

import asyncio
import hmac
import json
import logging
import time
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime

import orjson
from aiohttp import http_exceptions, web, web_protocol

from sidecar.auth import TokenChecker
from sidecar.bots.base import BotReply
from sidecar.config import Config
from sidecar.core import Core
from sidecar.errors import (
    FieldViolation,
    Internal,
    InvalidArgument,
    MethodNotAllowed,
    NotFound,
    PayloadTooLarge,
    RequestTimeout,
    SidecarError,
    Unauthenticated,
    UnsupportedMediaType,
)
from sidecar.models import INSTALL_CHECK, JSON, MAX_SAFE_INT, AcceptResult
from sidecar.observability import (
    CALLBACK_OUTCOMES,
    INGRESS_OUTCOMES,
    Metrics,
    Throttle,
    ingress_metrics,
    outcome_of,
)
from sidecar.validate import message_from_fields, reply_problems

log = logging.getLogger(__name__)

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]

_FORM_TYPES = ("application/x-www-form-urlencoded", "multipart/")

# aiohttp's own HTTP errors (404, 405, 413) are rendered in the one error shape too, with
# the codes of the errors defined for them; any other is "http_error".
_STATUS_CODES = {e.http_status: e.code for e in (NotFound, MethodNotAllowed, PayloadTooLarge)}


def json_response(body: JSON, status: int = 200, headers: dict[str, str] | None = None) -> web.Response:
    return web.Response(body=orjson.dumps(body), status=status, content_type="application/json", headers=headers)


def error_response(error: SidecarError) -> web.Response:
    headers = {}
    if error.retry_after is not None:
        headers["Retry-After"] = str(max(1, round(error.retry_after)))
    if isinstance(error, Unauthenticated):
        headers["WWW-Authenticate"] = 'Bearer realm="sidecar"'
    return json_response(error.to_json(), error.http_status, headers)


@web.middleware
async def errors_middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
    """Map core errors to their status once; never let a stack trace reach the client."""
    try:
        return await handler(request)
    except ConnectionError:
        # The client went away mid-request (its body cut short): nothing to log as an
        # error, and an answer nobody may read; aiohttp would log a traceback instead.
        return error_response(InvalidArgument("the request ended before its body"))
    except RequestTimeout as e:
        # The rest of the body may still be on its way: the connection cannot carry
        # another request, so it is closed with the answer.
        response = error_response(e)
        response.force_close()
        return response
    except SidecarError as e:
        return error_response(e)
    except web.HTTPException as e:
        if e.status < 400:
            raise
        code = _STATUS_CODES.get(e.status, "http_error")
        body = {"error": {"code": code, "message": e.reason, "details": []}}
        allow = e.headers.get("Allow")  # a 405 must say which methods are allowed
        return json_response(body, e.status, {"Allow": allow} if allow else None)
    except Exception:
        # The route's pattern, not the path: a path may carry the callback's secret.
        route = request.match_info.route.resource
        log.exception("unhandled error", extra={"route": route.canonical if route else "(none)"})
        return error_response(Internal())


async def read_json(request: web.Request, max_bytes: int, timeout: float) -> JSON:
    """The body parsed as JSON whatever the Content-Type says, except form and multipart,
    if it arrives within ``timeout`` seconds."""
    content_type = request.headers.get("Content-Type", "").lower()
    if content_type.startswith(_FORM_TYPES):
        raise UnsupportedMediaType()
    if request.content_length is not None and request.content_length > max_bytes:
        raise PayloadTooLarge(f"the body must be at most {max_bytes} bytes")
    try:
        if request.content.is_eof():  # all of it came with the headers: no wait, and no timer to arm
            raw = await request.read()
        else:
            async with asyncio.timeout(timeout):
                raw = await request.read()
    except TimeoutError:
        raise RequestTimeout(f"the request body did not arrive within {timeout:g} s") from None
    except web.HTTPRequestEntityTooLarge:
        raise PayloadTooLarge(f"the body must be at most {max_bytes} bytes") from None
    except (web_protocol.RequestPayloadError, http_exceptions.HttpProcessingError):
        # A body that cannot be read as sent: a corrupt gzip or deflate stream, a
        # broken chunk. The client's fault, so a 400 rather than an unhandled error.
        raise InvalidArgument(
            "the body could not be read", details=(FieldViolation("body", "malformed or badly encoded"),)
        ) from None
    return parse_json(raw)


def parse_json(raw: bytes) -> JSON:
    """Strict JSON or InvalidArgument: the only way a body becomes data."""
    try:
        # orjson is strict (UTF-8, no NaN/Infinity, no lone surrogates, depth limit)
        value = orjson.loads(raw)
    except orjson.JSONDecodeError:
        raise InvalidArgument(
            "the body is not valid JSON (UTF-8), or holds a number beyond a double's range",
            details=(FieldViolation("body", "invalid JSON"),),
        ) from None
    # Duplicate keys: the last one wins, as in JavaScript's JSON.parse, which the hosted
    # integration uses (SPEC section 2: what it accepts is not refused here); orjson
    # and json both read them so. orjson reads an integer beyond 64 bits as a float,
    # losing digits: when a float is integral and past 2^53 the exact parser decides
    # what the client wrote, so that payload_problem refuses an integer it cannot
    # carry exactly.
    if _has_big_integer(value):
        try:
            value = json.loads(raw)
        except RecursionError:
            raise InvalidArgument(
                "the body is nested too deeply", details=(FieldViolation("body", "nested too deeply"),)
            ) from None
    return value


def _has_big_integer(value: JSON) -> bool:
    """Whether a parsed value holds an integral float past 2^53 (iterative: depth is not
    checked yet)."""
    stack = [value]
    while stack:
        item = stack.pop()
        if isinstance(item, dict):
            stack.extend(item.values())
        elif isinstance(item, list):
            stack.extend(item)
        elif type(item) is float and abs(item) > MAX_SAFE_INT and item.is_integer():
            return True
    return False


def _iso(ts: float) -> str:
    return datetime.fromtimestamp(ts, UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


def accepted_body(result: AcceptResult) -> dict[str, JSON]:
    """The 200 answer: the sidecar's fields plus integration-style message/user/conversation objects."""
    stored = result.stored
    m = stored.message
    created = _iso(stored.received_at)
    user_id, conversation_id = stored.user_sidecar_id, stored.conversation_sidecar_id
    return {
        "messageId": m.message_id,
        "conversationId": m.conversation_id,
        "duplicate": result.duplicate,
        "message": {
            "id": stored.id,
            "type": m.type,
            "payload": m.payload,
            "direction": "incoming",
            "userId": user_id,
            "conversationId": conversation_id,
            "createdAt": created,
            "tags": {"id": m.message_id},
        },
        "user": {"id": user_id, "tags": {"id": m.user_id}},
        "conversation": {"id": conversation_id, "tags": {"id": m.conversation_id}},
    }


class HttpIngress:
    """Routes and handlers of the HTTP listener; every decision is the core's."""

    def __init__(
        self,
        config: Config,
        core: Core,
        metrics: Metrics,
        tokens: TokenChecker,
        callback_tokens: TokenChecker,
    ) -> None:
        self._config = config
        self._core = core
        self._tokens = tokens
        self._callback_tokens = callback_tokens
        self._outcomes, self._latency = ingress_metrics(metrics, "http")
        self._callbacks = {outcome: metrics.callbacks.labels(outcome) for outcome in CALLBACK_OUTCOMES}
        self._refusals = Throttle()

    def app(self) -> web.Application:
        # Our own limit check gives the 413 its error shape; aiohttp's is the backstop.
        app = web.Application(middlewares=[errors_middleware], client_max_size=self._config.max_body_bytes)
        app.router.add_post(self._config.webhook_path, self.webhook)
        app.router.add_post("/bot/replies", self.bot_replies)
        if self._config.callback_secret_path:
            # A pattern, checked in constant time by the handler: a literal route would
            # be found by a dict lookup, and would show the secret as the route's name.
            app.router.add_post("/bot/replies/{secret}", self.bot_replies_by_secret)
        return app

    async def webhook(self, request: web.Request) -> web.Response:
        started = time.perf_counter()
        outcome = "rejected"
        try:
            if not self._tokens.check(request.headers.get("Authorization")):
                raise Unauthenticated()
            body = await read_json(request, self._config.max_body_bytes, self._config.http_body_timeout)
            if not isinstance(body, dict):
                raise InvalidArgument(
                    "the body must be a JSON object", details=(FieldViolation("body", "not an object"),)
                )
            message = message_from_fields(
                body, max_id_length=self._config.max_id_length, max_payload_depth=self._config.max_payload_depth
            )
            result = await self._core.send(message)
            outcome = "duplicate" if result.duplicate else "accepted"
            return json_response(accepted_body(result))
        except BaseException as e:
            outcome = outcome_of(e, INGRESS_OUTCOMES)
            raise
        finally:
            self._outcomes[outcome].inc()
            self._latency.observe(time.perf_counter() - started)

    async def bot_replies(self, request: web.Request) -> web.Response:
        """Replies from an asynchronous bot, in the integration's outbound format (SPEC §3)."""
        if not self._callback_tokens.enabled or not self._callback_tokens.check(request.headers.get("Authorization")):
            self._callback_refused("unauthenticated", "no valid callback token")
            raise Unauthenticated()
        return await self._counted(self._accept_bot_replies(request))

    async def bot_replies_by_secret(self, request: web.Request) -> web.Response:
        """The same, for senders that cannot add a header: the secret path is the credential."""
        given = request.match_info["secret"].encode()
        if not hmac.compare_digest(given, self._config.callback_secret_path.encode()):
            self._callback_refused("unauthenticated", "a callback path with the wrong secret")
            raise web.HTTPNotFound()  # as if the route did not exist
        return await self._counted(self._accept_bot_replies(request))

    async def _counted(self, handling: Awaitable[web.Response]) -> web.Response:
        """A callback's outcome in sidecar_callbacks_total; refusals a misconfigured bot
        would repeat for ever (unknown conversation) also in the log, throttled."""
        try:
            response = await handling
        except BaseException as e:
            if isinstance(e, NotFound):
                self._callback_refused("not_found", "replies for a conversation this sidecar never saw")
            else:
                self._callbacks[outcome_of(e, CALLBACK_OUTCOMES)].inc()
            raise
        self._callbacks["accepted"].inc()
        return response

    def _callback_refused(self, outcome: str, why: str) -> None:
        self._callbacks[outcome].inc()
        if refusals := self._refusals.due():
            # Nothing of the request: its path may hold the secret, its body the user's text.
            log.warning("bot callback refused", extra={"why": why, "refusals": refusals})

    async def _accept_bot_replies(self, request: web.Request) -> web.Response:
        body = await read_json(request, self._config.max_body_bytes, self._config.http_body_timeout)
        if body == INSTALL_CHECK:
            # The Messaging API integration probes its Response Endpoint URL with
            # this body when installed and expects 200: answer it, append nothing.
            return json_response({"appended": []})
        items = body if isinstance(body, list) else [body]
        if not items:
            raise InvalidArgument("no reply in the body", details=(FieldViolation("body", "empty list"),))
        if len(items) > (limit := self._config.max_replies_per_message):
            raise InvalidArgument(
                f"more than {limit} replies in one request", details=(FieldViolation("body", f"over {limit} items"),)
            )
        by_conversation: dict[str, list[BotReply]] = {}
        for index, item in enumerate(items):
            conversation_id, reply = self._bot_reply(item, f"[{index}]" if isinstance(body, list) else "")
            by_conversation.setdefault(conversation_id, []).append(reply)
        appended = await self._core.add_bot_reply_batches(by_conversation)
        return json_response(
            {"appended": [{"conversationId": r.conversation_id, "sequence": r.sequence} for r in appended]}
        )

    def _bot_reply(self, item: JSON, prefix: str) -> tuple[str, BotReply]:
        if not isinstance(item, dict):
            raise InvalidArgument(
                "each reply must be a JSON object", details=(FieldViolation(prefix or "body", "not an object"),)
            )
        limit = self._config.max_id_length
        ids = {name: item.get(name, "") for name in ("botpressUserId", "botpressMessageId", "botpressConversationId")}
        bad = reply_problems(
            item.get("type"), item.get("payload"), ids, max_id_length=limit,
            max_payload_depth=self._config.max_payload_depth,
        )  # fmt: skip
        conversation_id = item.get("conversationId")
        if not isinstance(conversation_id, str) or not conversation_id or len(conversation_id) > limit:
            bad.append(FieldViolation("conversationId", f"must be a non-empty string of at most {limit} characters"))
        if "payload" not in item:  # absent reads as None, which payload_problem accepts
            bad.append(FieldViolation("payload", "is required"))
        bad = [FieldViolation(prefix + v.field, v.reason) for v in bad]
        if bad:
            raise InvalidArgument("the reply has invalid fields", details=tuple(bad))
        reply = BotReply(
            type=item["type"],
            payload=item["payload"],
            bot_message_id=item.get("botpressMessageId", ""),
            bot_user_id=item.get("botpressUserId", ""),
            bot_conversation_id=item.get("botpressConversationId", ""),
        )
        return item["conversationId"], reply
