"""In-process store: the reference implementation of the contract, for tests and demos (nothing survives exit)."""

from __future__ import annotations

import heapq
import uuid
from collections.abc import Sequence
from dataclasses import dataclass, field, replace

import orjson

from sidecar.errors import Conflict
from sidecar.models import (
    AcceptResult,
    DeadLetter,
    Delivery,
    InboundMessage,
    Reply,
    ReplyDraft,
    StoredMessage,
    message_of_key,
    sidecar_id,
)
from sidecar.store.base import ERROR_LIMIT, Store, pending_within, within_bytes


@dataclass(slots=True)
class _Conversation:
    replies: dict[int, Reply] = field(default_factory=dict)
    keys: dict[str, int] = field(default_factory=dict)
    """Dedupe key -> sequence of the retained replies (trimmed with them, like SQLite's)."""
    key_at: dict[int, str] = field(default_factory=dict)
    last: int = 0
    first_retained: int = 1
    user_id: str = ""
    outbox: dict[int, Delivery] = field(default_factory=dict)
    pinned: set[int] = field(default_factory=set)
    """Sequences referenced by dead letters: never trimmed, so they can be replayed."""


class MemoryStore(Store):
    """Dicts guarded by the event loop: every method runs without awaiting, so each is atomic."""

    def __init__(self, retention: int = 10000) -> None:
        self._retention = retention
        self._messages: dict[str, StoredMessage] = {}
        self._state: dict[str, str] = {}
        self._order: dict[str, int] = {}
        self._arrivals = 0
        self._conversations: dict[str, _Conversation] = {}
        self._positions = 0  # dead letters created so far: each one's position
        self._dead: dict[str, DeadLetter] = {}
        self._open = False

    async def open(self) -> None:
        self._open = True

    async def close(self) -> None:
        self._open = False

    async def ping(self) -> None:
        if not self._open:
            raise RuntimeError("store is closed")

    def _conv(self, conversation_id: str) -> _Conversation:
        conv = self._conversations.get(conversation_id)
        if conv is None:
            conv = self._conversations[conversation_id] = _Conversation()
        return conv

    # --- inbound messages ---

    async def accept(self, message: InboundMessage, *, now: float) -> AcceptResult:
        if (known := await self.known(message)) is not None:
            return known
        key = sidecar_id("message", message.conversation_id, message.message_id)
        stored = StoredMessage(id=key, message=message, fingerprint=message.fingerprint(), received_at=now)
        self._messages[key] = stored
        self._state[key] = "pending"
        self._arrivals += 1
        self._order[key] = self._arrivals
        self._conv(message.conversation_id).user_id = message.user_id
        return AcceptResult(stored, duplicate=False)

    async def known(self, message: InboundMessage) -> AcceptResult | None:
        existing = self._messages.get(sidecar_id("message", message.conversation_id, message.message_id))
        if existing is None:
            return None
        if existing.fingerprint != message.fingerprint():
            raise Conflict()
        return AcceptResult(existing, duplicate=True, pending=self._state.get(existing.id) == "pending")

    async def pending_page(self, limit: int, max_bytes: int) -> tuple[list[StoredMessage], bool]:
        pending = [k for k, s in self._state.items() if s == "pending"]
        pending.sort(key=self._order.__getitem__)
        messages = (self._messages[k] for k in pending)
        return pending_within(
            ((m, len(m.message.text) + len(orjson.dumps(m.message.payload))) for m in messages), limit, max_bytes
        )

    async def record_attempt(self, message_id: str, error: str) -> int:
        error = error[:ERROR_LIMIT]
        stored = self._messages.get(message_id)
        if stored is None:
            return 0  # as SQLite and Redis answer for an unknown message
        self._messages[message_id] = stored = replace(stored, attempts=stored.attempts + 1)
        return stored.attempts

    async def finish_message(
        self,
        message_id: str,
        conversation_id: str,
        drafts: Sequence[ReplyDraft],
        *,
        now: float,
        outbox: bool,
        keyed: bool = True,
    ) -> list[Reply]:  # keys are always checked here: a dict lookup
        if self._state.get(message_id) != "pending":
            return []
        # Done before the append trims, as in the other stores: its emitted replies are held no more.
        self._state[message_id] = "done"
        return await self.append_replies(conversation_id, drafts, now=now, outbox=outbox) if drafts else []

    async def forget_messages(self, before: float, limit: int) -> int:
        if limit <= 0:
            return 0
        # The dicts keep acceptance order, and acceptance times only grow (a clock
        # stepped back merely delays forgetting), so the walk stops at the first young one.
        doomed: list[str] = []
        for key, stored in self._messages.items():
            if stored.received_at >= before or len(doomed) >= limit:
                break
            if self._state[key] == "done":
                doomed.append(key)
        for key in doomed:
            del self._messages[key], self._state[key], self._order[key]
        return len(doomed)

    async def dead_letter_message(self, message_id: str, error: str, *, now: float) -> DeadLetter | None:
        error = error[:ERROR_LIMIT]
        stored = self._messages[message_id]
        if self._state[message_id] != "pending":
            return None
        self._state[message_id] = "dead"
        m = stored.message
        letter = DeadLetter(
            id=str(uuid.uuid4()),
            kind="message",
            conversation_id=m.conversation_id,
            sequence=0,
            body=m.api_json(),
            error=error,
            attempts=stored.attempts,
            dead_at=now,
            extra={"message_id": message_id},
            position=self._next_position(),
        )
        self._dead[letter.id] = letter
        return letter

    # --- reply log ---

    async def append_replies(
        self, conversation_id: str, drafts: Sequence[ReplyDraft], *, now: float, outbox: bool
    ) -> list[Reply]:
        conv = self._conv(conversation_id)
        appended = []
        for d in drafts:
            if d.dedupe_key in conv.keys:
                continue
            conv.last += 1
            reply = Reply(
                conversation_id=conversation_id,
                sequence=conv.last,
                type=d.type,
                payload=d.payload,
                bot_user_id=d.bot_user_id,
                bot_message_id=d.bot_message_id,
                bot_conversation_id=d.bot_conversation_id,
                user_id=d.user_id,
                in_reply_to=d.in_reply_to,
                created_at=now,
            )
            conv.replies[reply.sequence] = reply
            conv.keys[d.dedupe_key] = reply.sequence
            conv.key_at[reply.sequence] = d.dedupe_key
            if outbox:
                conv.outbox[reply.sequence] = Delivery(reply, 0, None, now)
            appended.append(reply)
        if appended:  # like the other stores: a step that added nothing changes nothing
            self._trim(conv)
        return appended

    def _trim(self, conv: _Conversation, before: float | None = None) -> int:
        horizon = conv.last - self._retention
        trimmed = 0
        while conv.first_retained <= conv.last:
            seq = conv.first_retained
            if seq > horizon:  # within retention: only age can take it
                reply = conv.replies.get(seq)
                if before is None or reply is None or reply.created_at >= before:
                    break
            if seq in conv.outbox or seq in conv.pinned:
                break  # keep everything from the oldest reply still owed: the log stays contiguous
            if self._state.get(message_of_key(conv.key_at.get(seq, ""))) in ("pending", "dead"):
                break  # a reply its message's next run (a retry, a replay) must find by its key
            conv.replies.pop(seq, None)
            conv.keys.pop(conv.key_at.pop(seq, ""), None)
            conv.first_retained += 1
            trimmed += 1
        return trimmed

    async def expire_replies(self, before: float, after: str, limit: int) -> tuple[int, str]:
        if limit <= 0:
            return 0, ""
        # The next page only: sorting every conversation on each page made a pass quadratic.
        ids = heapq.nsmallest(limit, (c for c in self._conversations if c > after))
        deleted = sum(self._trim(self._conversations[c], before) for c in ids)
        return deleted, ids[-1] if len(ids) == limit else ""

    async def replies_after(
        self, conversation_id: str, after: int, limit: int, max_bytes: int | None = None
    ) -> list[Reply]:
        conv = self._conversations.get(conversation_id)
        if conv is None:
            return []
        start = max(after + 1, conv.first_retained)
        page = (conv.replies[s] for s in range(start, min(conv.last, start + limit - 1) + 1) if s in conv.replies)
        return within_bytes(((r, len(orjson.dumps(r.payload)) if max_bytes else 0) for r in page), max_bytes)

    async def last_sequence(self, conversation_id: str) -> int:
        conv = self._conversations.get(conversation_id)
        return conv.last if conv else 0

    async def first_retained_sequence(self, conversation_id: str) -> int:
        conv = self._conversations.get(conversation_id)
        return conv.first_retained if conv else 1

    async def conversation_user(self, conversation_id: str) -> str | None:
        conv = self._conversations.get(conversation_id)
        return conv.user_id if conv and conv.user_id else None

    # --- webhook outbox ---

    def _head(self, conv: _Conversation) -> Delivery | None:
        return conv.outbox[min(conv.outbox)] if conv.outbox else None

    async def due_deliveries(self, now: float, limit: int, stepped_after: float | None = None) -> list[Delivery]:
        heads = [
            h
            for c in self._conversations.values()
            if (h := self._head(c))
            and (h.next_attempt_at <= now or (stepped_after is not None and h.next_attempt_at > stepped_after))
        ]
        heads.sort(key=lambda d: d.next_attempt_at)
        return heads[: max(limit, 0)]

    async def queued_deliveries(self, conversation_id: str, limit: int) -> list[Delivery]:
        conv = self._conversations.get(conversation_id)
        if conv is None:
            return []
        return [conv.outbox[seq] for seq in sorted(conv.outbox)[: max(limit, 0)]]

    async def next_due_at(self, after: float) -> float | None:
        times = [h.next_attempt_at for c in self._conversations.values() if (h := self._head(c))]
        times = [t for t in times if t > after]
        return min(times) if times else None

    async def delivery_succeeded(self, conversation_id: str, sequence: int) -> None:
        conv = self._conv(conversation_id)
        conv.outbox.pop(sequence, None)
        self._trim(conv)

    async def delivery_failed(
        self,
        conversation_id: str,
        sequence: int,
        *,
        attempts: int,
        first_attempt_at: float,
        next_attempt_at: float,
        error: str,
    ) -> None:
        error = error[:ERROR_LIMIT]
        conv = self._conv(conversation_id)
        current = conv.outbox.get(sequence)
        if current is not None:
            conv.outbox[sequence] = Delivery(current.reply, attempts, first_attempt_at, next_attempt_at, error)

    async def delivery_dead(
        self, conversation_id: str, sequence: int, *, attempts: int, error: str, now: float
    ) -> DeadLetter:
        error = error[:ERROR_LIMIT]
        conv = self._conv(conversation_id)
        delivery = conv.outbox.pop(sequence)
        conv.pinned.add(sequence)
        reply = delivery.reply
        letter = DeadLetter(
            id=str(uuid.uuid4()),
            kind="reply",
            conversation_id=conversation_id,
            sequence=sequence,
            body=reply.webhook_body(),
            error=error,
            attempts=attempts,
            dead_at=now,
            extra={"webhook_id": reply.webhook_id},
            position=self._next_position(),
        )
        self._dead[letter.id] = letter
        return letter

    # --- dead letters ---

    async def list_dead_letters(
        self, *, kind: str | None = None, conversation_id: str | None = None, limit: int = 100, after: int = 0
    ) -> list[DeadLetter]:
        # Creation order, as SQLite and Redis keep it: the dict's own order.
        letters = [
            d
            for d in self._dead.values()
            if d.position > after
            and (kind is None or d.kind == kind)
            and (conversation_id is None or d.conversation_id == conversation_id)
        ]
        return letters[: max(limit, 0)]

    async def get_dead_letter(self, dead_letter_id: str) -> DeadLetter | None:
        return self._dead.get(dead_letter_id)

    async def replay_dead_letter(self, dead_letter_id: str, *, now: float) -> bool:
        letter = self._dead.pop(dead_letter_id, None)
        if letter is None:
            return False
        if letter.kind == "reply":
            conv = self._conv(letter.conversation_id)
            conv.pinned.discard(letter.sequence)
            conv.outbox[letter.sequence] = Delivery(conv.replies[letter.sequence], 0, None, now)
        else:
            key = str(letter.extra["message_id"])
            if self._state.get(key) != "dead":
                return False  # a stale letter: the message was replayed and handled since
            self._state[key] = "pending"
            self._messages[key] = replace(self._messages[key], attempts=0)
        return True

    def _next_position(self) -> int:
        self._positions += 1
        return self._positions

    async def backlog(self) -> tuple[int, int]:
        return len(self._dead), sum(1 for conv in self._conversations.values() if conv.outbox)

    async def purge_dead_letters(self, ids: Sequence[str]) -> int:
        removed = 0
        for i in ids:
            letter = self._dead.pop(i, None)
            if letter is not None:
                removed += 1
                if letter.kind == "reply":
                    self._conv(letter.conversation_id).pinned.discard(letter.sequence)
                elif self._state.get(key := str(letter.extra["message_id"])) == "dead":
                    self._state[key] = "done"  # given up for good: handled, so the dedupe window forgets it
        return removed
