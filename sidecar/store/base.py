"""The store interface: messages, the per-conversation reply log, the webhook outbox, dead letters.

Every implementation passes the same contract suite (tests/test_store_contract.py).
Each method is one atomic step: when it returns, its effect is durable as far
as the implementation is durable (memory: not at all; sqlite: fsynced WAL).
The exceptions are steps whose loss to a power cut is harmless because they are
done again (a webhook outcome: one POST more under the same webhook-id; a
forget or expiry sweep: the next pass): SQLite commits those without an fsync.
"""

from __future__ import annotations

import abc
import sys
from collections.abc import Iterable, Sequence
from typing import ClassVar, TypeVar

from sidecar.models import (
    AcceptResult,
    DeadLetter,
    Delivery,
    InboundMessage,
    Reply,
    ReplyDraft,
    StoredMessage,
)

ERROR_LIMIT = 500
"""Characters of an error string a store keeps (a dead letter's, a message's or a
delivery's last error): every store the same, and bounded whatever a bot or receiver said."""


T = TypeVar("T")


def pending_within(sized: Iterable[tuple[T, int]], limit: int, max_bytes: int) -> tuple[list[T], bool]:
    """The leading items of ``(item, size)`` pairs within ``limit`` and ``max_bytes``
    together (always the first, if any and the limit allows), and whether any was left
    out; ``sized`` is read no further than one past them. pending_page's rule."""
    page: list[T] = []
    total = 0
    for item, size in sized:
        total += size
        if len(page) >= limit or (page and total > max_bytes):
            return page, True
        page.append(item)
    return page, False


def within_bytes(sized: Iterable[tuple[T, int]], max_bytes: int | None) -> list[T]:
    """replies_after's rule: pending_within without a count, or a budget when None."""
    return pending_within(sized, sys.maxsize, sys.maxsize if max_bytes is None else max_bytes)[0]


class Store(abc.ABC):
    """Durable state of the sidecar. All methods are safe to call concurrently."""

    failed_steps_may_land: ClassVar[bool] = False
    """Whether a step that raised Unavailable may have run all the same (Redis: the
    script ran and its answer was lost). SQLite raises it only after a rollback."""

    @abc.abstractmethod
    async def open(self) -> None:
        """Connect or create files and schema. Called once before any other method."""

    @abc.abstractmethod
    async def close(self) -> None:
        """Flush and release resources. Idempotent."""

    @abc.abstractmethod
    async def ping(self) -> None:
        """Raise if the store cannot serve requests now, writes included (used by /readyz,
        every few seconds): a store that answers reads but refuses writes (a full disk,
        Redis out of memory or read-only) is not ready."""

    # --- inbound messages -------------------------------------------------

    @abc.abstractmethod
    async def accept(self, message: InboundMessage, *, now: float) -> AcceptResult:
        """Store a message durably and mark it pending for the bot.

        A repeat of (conversation_id, message_id) with the same fingerprint
        answers the original with ``duplicate=True`` and changes nothing;
        with another fingerprint it raises ``errors.Conflict``.
        """

    @abc.abstractmethod
    async def known(self, message: InboundMessage) -> AcceptResult | None:
        """What ``accept`` would answer for a message already stored (a duplicate, or
        Conflict for other content under its ids), without storing anything: None when
        it is new. For answering repeats while new work is refused."""

    async def pending_messages(self, limit: int) -> list[StoredMessage]:
        """Messages accepted but neither completed nor dead-lettered, oldest first (for
        inspection: the core loads with pending_page)."""
        return (await self.pending_page(limit, sys.maxsize))[0]

    @abc.abstractmethod
    async def pending_page(self, limit: int, max_bytes: int) -> tuple[list[StoredMessage], bool]:
        """The oldest pending messages, at most ``limit`` and about ``max_bytes`` of them as
        stored (text and payload JSON; the first whatever its size), and whether more may be
        pending beyond them: a load after a large replay reads a bounded amount, not
        max_pending_messages bodies of up to 1 MiB each."""

    @abc.abstractmethod
    async def record_attempt(self, message_id: str, error: str) -> int:
        """Count a failed bot attempt on a message; return the new attempt count."""

    @abc.abstractmethod
    async def finish_message(
        self,
        message_id: str,
        conversation_id: str,
        drafts: Sequence[ReplyDraft],
        *,
        now: float,
        outbox: bool,
        keyed: bool = True,
    ) -> list[Reply]:
        """Append a message's last replies and mark it handled, as one atomic step.

        Only a pending message finishes, and only once: for one already handled,
        dead-lettered or unknown, nothing is appended and ``[]`` is returned.
        ``keyed=False`` tells the store that no earlier run of the bot can have
        emitted replies under these drafts' dedupe keys (the message's first run
        since it was accepted): it may then skip checking and indexing them.
        """

    @abc.abstractmethod
    async def forget_messages(self, before: float, limit: int) -> int:
        """Delete up to ``limit`` handled messages received before ``before``; return how many.

        Messages still pending or dead-lettered are never forgotten. A repeat of
        a forgotten message's id is accepted as a new message, so this bounds
        how long deduplication lasts (``dedupe_window``) and the store's size.
        Losing its effect to a crash is harmless: the next call forgets again.
        """

    @abc.abstractmethod
    async def dead_letter_message(self, message_id: str, error: str, *, now: float) -> DeadLetter | None:
        """Give up on a pending message: it leaves the pending set and joins the dead
        letters. None, and nothing changes, for a message no longer pending (handled,
        or dead-lettered already: a retried step must not make a second letter);
        KeyError for an unknown one."""

    # --- reply log ----------------------------------------------------------

    @abc.abstractmethod
    async def append_replies(
        self, conversation_id: str, drafts: Sequence[ReplyDraft], *, now: float, outbox: bool
    ) -> list[Reply]:
        """Append replies with the conversation's next sequence numbers (1, 2, …, no gaps).

        A draft whose ``dedupe_key`` is already in this conversation's log is
        skipped, so the returned list holds only the replies appended now.
        Keys are remembered as long as their replies are retained, so a
        conversation's keys stay bounded by the retention like its log.
        With ``outbox`` each appended reply is also queued for webhook
        delivery, in the same transaction. Replies beyond the retention bound
        are trimmed here, never ones still queued or dead-lettered.
        """

    @abc.abstractmethod
    async def expire_replies(self, before: float, after: str, limit: int) -> tuple[int, str]:
        """Trim, in up to ``limit`` conversations, the replies created before ``before``,
        as retention trims: never from the oldest reply still owed or dead-lettered on.

        A pass visits every conversation: start with ``after=""`` and pass back the
        cursor returned until it is ``""``. Returns (replies deleted, cursor). Losing
        its effect to a crash is harmless: the next pass trims again.
        """

    @abc.abstractmethod
    async def replies_after(
        self, conversation_id: str, after: int, limit: int, max_bytes: int | None = None
    ) -> list[Reply]:
        """Replies with sequence > after, ascending, at most ``limit``, and with ``max_bytes``
        at most as much payload JSON as that between them (the first is returned whatever
        its size): a page a slow reader holds stays small however large the replies."""

    @abc.abstractmethod
    async def last_sequence(self, conversation_id: str) -> int:
        """The highest sequence appended in the conversation, 0 when none."""

    @abc.abstractmethod
    async def first_retained_sequence(self, conversation_id: str) -> int:
        """The lowest sequence still kept (last + 1 when every reply was trimmed, 1 when none)."""

    @abc.abstractmethod
    async def conversation_user(self, conversation_id: str) -> str | None:
        """The user id of the conversation's latest message, None for an unknown conversation."""

    # --- webhook outbox -----------------------------------------------------

    @abc.abstractmethod
    async def due_deliveries(self, now: float, limit: int, stepped_after: float | None = None) -> list[Delivery]:
        """For each conversation with queued replies, its lowest queued one, if due by ``now``,
        earliest first; and (given ``stepped_after``) if set for later than that: a time no
        delay reaches, so set before the clock stepped back, and due too."""

    @abc.abstractmethod
    async def queued_deliveries(self, conversation_id: str, limit: int) -> list[Delivery]:
        """The conversation's queued replies, lowest sequence first, due or not; at most ``limit``."""

    @abc.abstractmethod
    async def next_due_at(self, after: float) -> float | None:
        """The earliest ``next_attempt_at`` later than ``after`` of any conversation's
        head, None when there is none.

        Heads due by ``after`` are left out: the worker has them in hand already
        (delivering, or waiting for a slot), and one that takes long must not
        hide when the others' retries fall due."""

    @abc.abstractmethod
    async def delivery_succeeded(self, conversation_id: str, sequence: int) -> None:
        """Remove a delivered reply from the outbox."""

    @abc.abstractmethod
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
        """Record a failed attempt; the reply stays at the head until ``next_attempt_at``."""

    @abc.abstractmethod
    async def delivery_dead(
        self, conversation_id: str, sequence: int, *, attempts: int, error: str, now: float
    ) -> DeadLetter:
        """Move a reply from the outbox to the dead letters so later replies can proceed."""

    # --- dead letters ------------------------------------------------------

    @abc.abstractmethod
    async def list_dead_letters(
        self, *, kind: str | None = None, conversation_id: str | None = None, limit: int = 100, after: int = 0
    ) -> list[DeadLetter]:
        """Dead letters, oldest first, optionally of one kind or conversation; only those
        whose ``position`` is past ``after`` (the last position of a previous page)."""

    @abc.abstractmethod
    async def get_dead_letter(self, dead_letter_id: str) -> DeadLetter | None:
        """One dead letter by id."""

    @abc.abstractmethod
    async def replay_dead_letter(self, dead_letter_id: str, *, now: float) -> bool:
        """Put a dead letter back: a reply re-enters the outbox (due now, attempts reset),
        a message becomes pending again. Returns False when the id is unknown."""

    @abc.abstractmethod
    async def purge_dead_letters(self, ids: Sequence[str]) -> int:
        """Delete dead letters for good; return how many were deleted."""

    # --- for the operator -----------------------------------------------------

    @abc.abstractmethod
    async def backlog(self) -> tuple[int, int]:
        """(dead letters held, conversations with replies waiting for webhook delivery):
        what an operator watches for failures not yet resolved."""
