"""The `http` bot: any HTTP bot, answering in the response body, later through /bot/replies, or both.

Two request formats (``SIDECAR_BOT_FORMAT``):

- ``json``: the message as ``{"userId", "messageId", "conversationId", "type", "text", "payload"}``;
  a 2xx answer may carry a JSON list of replies ``[{"type", "payload"}, ...]``.
- ``rasa``: Rasa's REST channel, ``{"sender", "message", "metadata"}``; the answer list
  is mapped to reply types as in ``rasa_replies`` (see docs/bots.md).
"""

from __future__ import annotations

import logging
import time
from typing import Any

import aiohttp
import orjson

from sidecar.bots.base import Bot, BotError, BotReply, Emit, too_many_replies
from sidecar.config import Config
from sidecar.http_client import parse_retry_after, read_at_most
from sidecar.models import JSON, StoredMessage
from sidecar.observability import Metrics

log = logging.getLogger(__name__)

_MAX_ANSWER = 1024 * 1024


class CircuitBreaker:
    """Closed → (``failures`` in a row) → open → (``cooldown``) → half-open: one trial call.

    While open, calls are not even tried: a bot that is down is not hammered
    by every pending message, and messages wait instead of burning attempts.
    """

    def __init__(self, failures: int, cooldown: float, on_change: Any = None) -> None:
        self._threshold = failures
        self._cooldown = cooldown
        self._failures = 0
        self._opened_at: float | None = None
        self._trial = False
        self._on_change = on_change

    @property
    def open(self) -> bool:
        return self._opened_at is not None

    def allow(self) -> bool:
        if self._opened_at is None:
            return True
        if time.monotonic() - self._opened_at >= self._cooldown and not self._trial:
            self._trial = True  # half-open: exactly one call finds out whether the bot is back
            return True
        return False

    def success(self) -> None:
        self._failures = 0
        self._trial = False
        if self._opened_at is not None:
            self._opened_at = None
            log.info("bot circuit breaker closed")
            self._changed()

    def failure(self) -> None:
        self._failures += 1
        if self._trial or (self._opened_at is None and self._failures >= self._threshold):
            was_open = self._opened_at is not None
            self._opened_at = time.monotonic()
            self._trial = False
            if not was_open:
                log.warning("bot circuit breaker opened", extra={"failures": self._failures})
                self._changed()

    def _changed(self) -> None:
        if self._on_change is not None:
            self._on_change(self.open)


def _excerpt(raw: bytes | None, limit: int = 200) -> str:
    """The start of a bot's error answer, for the attempt's error and its dead letter (the
    Botpress integration explains a 400 there). One line of printable text: it is logged."""
    if not raw:
        return ""
    text = "".join(c if c.isprintable() else " " for c in raw[:limit].decode("utf-8", "replace")).strip()
    return f" ({text}{'…' if len(raw) > limit else ''})" if text else ""


def rasa_request(message: StoredMessage) -> dict[str, JSON]:
    """Rasa keeps one tracker per ``sender``: the conversation, so each conversation has its own dialogue state."""
    m = message.message
    return {
        "sender": m.conversation_id,
        "message": m.text,
        "metadata": {"userId": m.user_id, "messageId": m.message_id, "conversationId": m.conversation_id,
                     "type": m.type, "payload": m.payload},
    }  # fmt: skip


def json_replies(answer: JSON) -> list[BotReply]:
    """``[{"type", "payload"}, ...]``; an empty body, null or {} mean no reply."""
    if answer is None or answer == {} or answer == "":
        return []
    if not isinstance(answer, list):
        raise BotError("the bot's answer must be a JSON list of replies", retryable=False)
    replies = []
    for i, item in enumerate(answer):
        if not isinstance(item, dict) or not isinstance(item.get("type"), str) or not item["type"]:
            raise BotError(f"reply {i} of the bot's answer needs a non-empty string type", retryable=False)
        replies.append(BotReply(type=item["type"], payload=item.get("payload")))
    return replies


def rasa_replies(answer: JSON) -> list[BotReply]:
    """Rasa's answer list → replies, each Rasa message giving text/choice, then image, file, custom."""
    if answer is None or answer == "":
        return []
    if not isinstance(answer, list):
        raise BotError("Rasa's answer must be a JSON list", retryable=False)
    replies = []
    for item in answer:
        if not isinstance(item, dict):
            raise BotError("each message of Rasa's answer must be an object", retryable=False)
        text, buttons = item.get("text"), item.get("buttons")
        if isinstance(buttons, list) and buttons:
            options = [
                {"label": b.get("title", ""), "value": b.get("payload", b.get("title", ""))}
                for b in buttons
                if isinstance(b, dict)
            ]
            replies.append(BotReply("choice", {"text": text or "", "options": options}))
        elif isinstance(text, str):
            replies.append(BotReply("text", {"text": text}))
        if "image" in item:
            replies.append(BotReply("image", {"imageUrl": item["image"]}))
        if "attachment" in item:
            attachment = item["attachment"]
            replies.append(BotReply("file", {"fileUrl": attachment} if isinstance(attachment, str) else attachment))
        if "custom" in item:
            replies.append(BotReply("custom", item["custom"]))
    return replies


class HttpBot(Bot):
    """POSTs each message to ``bot_url``; synchronous replies from the answer, asynchronous ones by callback."""

    name = "http"

    def __init__(self, config: Config, metrics: Metrics) -> None:
        self._config = config
        self._metrics = metrics
        self._session: aiohttp.ClientSession | None = None
        self.breaker = CircuitBreaker(
            config.bot_breaker_failures,
            config.bot_breaker_cooldown,
            lambda is_open: metrics.bot_breaker_open.labels(self.name).set(int(is_open)),
        )

    async def start(self) -> None:
        self._metrics.bot_breaker_open.labels(self.name).set(0)
        self._session = aiohttp.ClientSession(
            connector=aiohttp.TCPConnector(limit=self._config.bot_concurrency),
            timeout=aiohttp.ClientTimeout(total=self._config.bot_timeout),
        )

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()
            self._session = None

    def request_body(self, message: StoredMessage) -> JSON:
        return rasa_request(message) if self._config.bot_format == "rasa" else message.message.api_json()

    def replies(self, answer: JSON) -> list[BotReply]:
        return rasa_replies(answer) if self._config.bot_format == "rasa" else json_replies(answer)

    def headers(self) -> dict[str, str]:
        headers = {"Content-Type": "application/json"}
        if self._config.bot_token:
            headers["Authorization"] = f"Bearer {self._config.bot_token}"
        return headers

    async def handle(self, message: StoredMessage, emit: Emit) -> list[BotReply]:
        answer = await self.call(message)
        if isinstance(answer, list) and len(answer) > self._config.max_replies_per_message:
            raise too_many_replies(self._config.max_replies_per_message)  # before reading them all
        # replies() checks every reply before returning any, so a bad answer is refused whole.
        return self.replies(answer)

    def transient(self, status: int, raw: bytes | None) -> bool:
        """Whether an answer that is not 2xx is the bot's trouble, to retry with backoff
        (and to count against the breaker), rather than a refusal of this message."""
        return status >= 500 or status in (408, 429)

    async def call(self, message: StoredMessage, *, answer: bool = True) -> JSON:
        """One POST through the breaker; BotError says whether to retry. ``answer=False``:
        a 2xx is all that matters, whatever its body says (it is not read as replies)."""
        if not self.breaker.allow():
            raise BotError("circuit breaker open: the bot failed repeatedly", counts=False)
        # A failed call counts towards the message's attempts, the breaker's trial call
        # included: while one message is all there is, a bot down for everyone and a bot
        # failing on this message alone look the same, and the second must dead-letter.
        assert self._session is not None, "start() first"
        try:
            async with self._session.post(
                self._config.bot_url, data=orjson.dumps(self.request_body(message)), headers=self.headers(),
                allow_redirects=False,
            ) as resp:  # fmt: skip
                raw = await read_at_most(resp, _MAX_ANSWER)
                status = resp.status
                retry_after = parse_retry_after(resp.headers.get("Retry-After"), time.time())
        except TimeoutError:
            # The session's limit is bot_timeout too, and fires first (the core checks its
            # own only now and then): the core tells it as a timeout, as it would its own.
            self.breaker.failure()
            raise
        except aiohttp.ClientError as e:
            self.breaker.failure()
            raise BotError(f"cannot reach the bot ({type(e).__name__})") from None
        except BaseException:
            # Cancelled: the core's own bot timeout (when it fires before the session's),
            # or a drain. A call that hung that long failed,
            # and counts; uncounted, a hanging bot never opened the breaker, and a
            # half-open trial cancelled so left the breaker waiting for it for ever.
            self.breaker.failure()
            raise
        if self.transient(status, raw):
            self.breaker.failure()
            raise BotError(
                f"the bot answered HTTP {status}{_excerpt(raw)}",
                retry_after=retry_after if status in (429, 503) else None,
            )
        self.breaker.success()  # it answered: whatever it said, it is up
        if not 200 <= status < 300:
            raise BotError(f"the bot refused the message: HTTP {status}{_excerpt(raw)}", retryable=False)
        if not answer:
            return None
        if raw is None:
            raise BotError("the bot's answer is larger than 1 MiB", retryable=False)
        if not raw.strip():
            return None
        try:
            return orjson.loads(raw)
        except orjson.JSONDecodeError:
            raise BotError("the bot's answer is not JSON", retryable=False) from None
