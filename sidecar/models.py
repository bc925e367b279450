"""The core's data: inbound messages, stored messages, replies and deliveries."""

from __future__ import annotations

import functools
import hashlib
import uuid
from dataclasses import dataclass, field
from typing import Any, TypeAlias

import orjson

JSON: TypeAlias = Any
"""Any JSON value: None, bool, int, float, str, list or dict with str keys."""

# Sidecar-side ids (the "botpress*" ids of SPEC §3) are UUIDv5 of the client's
# ids, so every replica derives the same ids without coordination and a
# duplicate answers with the ids of the original.
_NAMESPACE = uuid.UUID("6f3a1c3e-5b0e-4c39-9a8e-2f1d7c0b5a11")


_NAMESPACE_BYTES = _NAMESPACE.bytes

# google.protobuf.Value carries numbers as doubles: larger integers would not
# round-trip exactly between the HTTP and gRPC forms of one message.
MAX_SAFE_INT = 2**53

# The body the hosted Messaging API integration POSTs to a Response Endpoint URL when it
# is installed, expecting 200: the sidecar sends it at start and answers it on callbacks.
INSTALL_CHECK = {"type": "test", "payload": "test"}


def sidecar_id(kind: str, *parts: str) -> str:
    """A stable id for a user, conversation, message or reply: ``str(uuid5(namespace, name))``.

    Computed without building UUID objects, which costs several times the
    hash on the per-message path; tests check it equals ``uuid.uuid5``.
    """
    name = "\x1f".join((kind, *parts)).encode()
    raw = bytearray(hashlib.sha1(_NAMESPACE_BYTES + name, usedforsecurity=False).digest()[:16])
    raw[6] = (raw[6] & 0x0F) | 0x50  # version 5
    raw[8] = (raw[8] & 0x3F) | 0x80  # RFC 4122 variant
    h = raw.hex()
    return f"{h[:8]}-{h[8:12]}-{h[12:16]}-{h[16:20]}-{h[20:]}"


def reply_key(message_id: str, received_at: float, index: int) -> str:
    """The dedupe key of a message's ``index``-th reply: the same on every run of the bot
    for this message, and new when the same message id is accepted again after
    ``dedupe_window`` forgot it (so its replies are appended, with new webhook-ids).

    It starts with the message's own id and "@": stores read that back (message_of_key)
    to keep the replies of a message still pending or dead-lettered, whose next run
    must find them by their keys however old they are."""
    return f"{message_id}@{received_at:.6f}/{index}"


def message_of_key(key: str) -> str:
    """The id of the message a reply key was made for; "" for other keys (callbacks')."""
    message_id, at, _ = key.partition("@")
    return message_id if at and not message_id.startswith("callback/") else ""


@functools.lru_cache(maxsize=16384)
def entity_id(kind: str, key: str) -> str:
    """``sidecar_id`` of a user or a conversation, memoized: every message of a
    conversation asks for the same two, three times on its way through."""
    return sidecar_id(kind, key)


def queued_size(message: InboundMessage) -> int:
    """The memory a message waiting for the bot is reckoned to take (max_pending_bytes):
    its fields as JSON (UTF-8), plus 72 bytes for each value and key its payload holds
    (an object apiece, with its slot: what makes a parsed payload of tiny values ~24
    times its JSON). On the safe side: measured with tracemalloc, within about twice the
    real size for payloads of tiny values, and close to it for long strings."""
    m = message
    body = orjson.dumps((m.user_id, m.message_id, m.conversation_id, m.type, m.text, m.payload))
    return len(body) + 72 * _values(m.payload)


def _values(payload: JSON) -> int:
    """How many values and keys a payload holds (depth is bounded by validation). Plain
    loops, no generators: most payloads are a flat object, walked in one step."""
    count, stack = 1, [payload]
    while stack:
        value = stack.pop()
        if type(value) is dict:
            count += 2 * len(value)
            for child in value.values():
                if type(child) is dict or type(child) is list:
                    stack.append(child)
        elif type(value) is list:
            count += len(value)
            for child in value:
                if type(child) is dict or type(child) is list:
                    stack.append(child)
    return count


def canonical_json(value: JSON) -> bytes:
    """JSON with sorted keys: equal values give equal bytes."""
    return orjson.dumps(value, option=orjson.OPT_SORT_KEYS)


@dataclass(frozen=True, slots=True)
class InboundMessage:
    """A user message as a client sent it, after normalization (SPEC §2)."""

    user_id: str
    message_id: str
    conversation_id: str
    type: str
    text: str
    payload: JSON

    @staticmethod
    def normalized(
        *, user_id: str, message_id: str, conversation_id: str, type: str, text: str, payload: JSON
    ) -> InboundMessage:
        """Apply the hosted integration's leniency: a missing payload becomes
        ``{"text": text}``, and an object payload without a ``text`` gets it. As
        there (``!payload.text`` in JavaScript), a null or empty ``text`` counts as
        none; any other value is the client's and is kept."""
        if payload is None:
            payload = {"text": text}
        elif isinstance(payload, dict) and payload.get("text") in (None, ""):
            payload = {**payload, "text": text}
        return InboundMessage(user_id, message_id, conversation_id, type, text, payload)

    def api_json(self) -> dict[str, JSON]:
        """The message in the Messaging API's field names (SPEC §2): what bots and dead letters see."""
        return {
            "userId": self.user_id,
            "messageId": self.message_id,
            "conversationId": self.conversation_id,
            "type": self.type,
            "text": self.text,
            "payload": self.payload,
        }

    def fingerprint(self) -> str:
        """What "same content" means for deduplication: every field but the ids."""
        body = canonical_json([self.user_id, self.type, self.text, self.payload])
        return hashlib.sha256(body).hexdigest()


@dataclass(frozen=True, slots=True)
class StoredMessage:
    """An accepted message as the store keeps it until the bot has handled it."""

    id: str
    """The sidecar's own message id (``sidecar_id("message", conv, messageId)``)."""
    message: InboundMessage
    fingerprint: str
    received_at: float
    attempts: int = 0
    """Bot attempts made so far; survives restarts."""

    @property
    def conversation_id(self) -> str:
        return self.message.conversation_id

    @property
    def user_sidecar_id(self) -> str:
        return entity_id("user", self.message.user_id)

    @property
    def conversation_sidecar_id(self) -> str:
        return entity_id("conversation", self.message.conversation_id)


@dataclass(frozen=True, slots=True)
class AcceptResult:
    """The store's answer to accept(): the stored message and whether it was a repeat."""

    stored: StoredMessage
    duplicate: bool
    pending: bool = True
    """Still waiting for the bot (always, for a new message): a repeat of one that was
    stored but never queued (its first caller cancelled mid-accept) is queued then."""


@dataclass(frozen=True, slots=True)
class ReplyDraft:
    """What a bot produces: a reply before it has a sequence number.

    ``dedupe_key`` makes appending idempotent: a bot re-run after a crash
    produces the same keys, so replies already in the log are not added twice.
    """

    type: str
    payload: JSON
    dedupe_key: str
    user_id: str = ""
    in_reply_to: str = ""
    bot_user_id: str = ""
    bot_message_id: str = ""
    bot_conversation_id: str = ""


@dataclass(frozen=True, slots=True)
class Reply:
    """A bot reply in a conversation's log, numbered 1, 2, 3… without gaps."""

    conversation_id: str
    sequence: int
    type: str
    payload: JSON
    bot_user_id: str
    bot_message_id: str
    bot_conversation_id: str
    user_id: str
    in_reply_to: str
    created_at: float

    @property
    def webhook_id(self) -> str:
        """The ``webhook-id`` of this reply's POSTs: the same on every retry and replay,
        and the sidecar's own, unlike ``bot_message_id``, which a bot may set to anything
        (a repeat across conversations, a character a header cannot carry)."""
        return sidecar_id("webhook", self.conversation_id, str(self.sequence), f"{self.created_at:.6f}")

    def webhook_body(self) -> dict[str, JSON]:
        """The six-field body the Messaging API integration POSTs (SPEC §3)."""
        return {
            "type": self.type,
            "payload": self.payload,
            "conversationId": self.conversation_id,
            "botpressUserId": self.bot_user_id,
            "botpressMessageId": self.bot_message_id,
            "botpressConversationId": self.bot_conversation_id,
        }


@dataclass(frozen=True, slots=True)
class Delivery:
    """The head of a conversation's webhook outbox: the next reply owed."""

    reply: Reply
    attempts: int
    first_attempt_at: float | None
    next_attempt_at: float
    last_error: str = ""


@dataclass(frozen=True, slots=True)
class DeadLetter:
    """A reply (kind "reply") or message (kind "message") given up on, with why."""

    id: str
    kind: str
    conversation_id: str
    sequence: int
    """The reply's sequence; 0 for a message."""
    body: dict[str, JSON]
    error: str
    attempts: int
    dead_at: float
    extra: dict[str, JSON] = field(default_factory=dict)
    position: int = 0
    """Its place in creation order, as listed (a listing's cursor); 0 when not read from a list."""
