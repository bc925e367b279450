"""The dead-letter operations behind the admin API: list, show, replay and purge.

Replay is the delicate one. Replies go back into the outbox at their own
sequence (so order and ``webhook-id`` are kept) while the webhook worker holds
their conversation; messages go back to pending and the core queues them by
their original arrival, as after a restart.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import time
from collections.abc import AsyncGenerator
from dataclasses import dataclass
from typing import Protocol

from sidecar.core import Notifier
from sidecar.errors import FailedPrecondition, FieldViolation, InvalidArgument, NotFound
from sidecar.models import DeadLetter
from sidecar.store.base import Store

log = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class Selection:
    """Which dead letters an operation applies to: by ids, one conversation, or all (of a kind)."""

    ids: tuple[str, ...] = ()
    conversation_id: str = ""
    everything: bool = False
    kind: str | None = None


class Requeue(Protocol):
    """What the core does for messages put back pending (``Core``)."""

    async def load_replayed(self) -> None: ...

    def reload_pending(self) -> None: ...


class DeadLetters:
    """Dead letters of both kinds, as the admin API sees them."""

    def __init__(self, store: Store, webhook: Notifier | None, core: Requeue) -> None:
        self._store = store
        self._webhook = webhook
        self._core = core

    async def page(
        self, *, kind: str | None = None, conversation_id: str | None = None, limit: int = 100, after: int = 0
    ) -> list[DeadLetter]:
        return await self._store.list_dead_letters(kind=kind, conversation_id=conversation_id, limit=limit, after=after)

    async def get(self, dead_letter_id: str) -> DeadLetter:
        letter = await self._store.get_dead_letter(dead_letter_id)
        if letter is None:
            raise NotFound("no dead letter has this id")
        return letter

    async def replay(self, selection: Selection) -> int:
        """Put dead letters back: replies re-enter the outbox at their sequence (so order
        and webhook-id are kept), messages go back to their conversation's lane."""
        webhook = self._webhook
        if webhook is None and selection.kind != "message" and await self._selects_replies(selection):
            # Back in the outbox, nothing would deliver them: the next start would dead-letter
            # them again, over their real last error. Refused whole, before anything moves.
            raise FailedPrecondition(
                "replies cannot be replayed without a response URL (SIDECAR_RESPONSE_URL);"
                " set one, or replay kind=message only"
            )
        replayed = 0
        messages = False  # a message letter was tried: it may be pending again, unqueued
        held: set[str] = set()
        done: set[str] = set()  # conversations whose reply letters are all back already
        now = began = time.time()
        try:
            async for letter in self._selected(selection, before=began):
                conversation_id = letter.conversation_id
                if letter.kind == "reply" and conversation_id in done:
                    continue  # read in a page before its conversation's were put back
                if letter.kind == "reply" and webhook is not None and conversation_id not in held:
                    # Held while its letters are put back: replayed one commit at a time, in
                    # the order they died, a later reply back first would be POSTed before an
                    # earlier one still on its way.
                    webhook.hold(conversation_id)
                    held.add(conversation_id)
                    if not selection.ids:
                        # Its letters of the selection all at once, then its POSTs resume:
                        # a replay of thousands of conversations holds each only that long.
                        own = Selection(conversation_id=conversation_id, kind="reply")
                        async for mine in self._selected(own, before=began):
                            replayed += await self._store.replay_dead_letter(mine.id, now=now)
                        held.discard(conversation_id)
                        done.add(conversation_id)
                        webhook.release(conversation_id)
                        continue
                messages |= letter.kind == "message"
                if await self._store.replay_dead_letter(letter.id, now=now):
                    replayed += 1
        except BaseException:
            if messages:  # the failed step may have landed (Redis): load as after a lost answer
                self._core.reload_pending()
            raise
        else:
            if messages:
                await self._core.load_replayed()
        finally:
            if webhook is not None:  # held only with one
                for conversation_id in held:
                    webhook.release(conversation_id)
        log.info("dead letters replayed", extra={"count": replayed})
        return replayed

    async def _selects_replies(self, selection: Selection) -> bool:
        async with contextlib.aclosing(self._selected(dataclasses.replace(selection, kind="reply"))) as letters:
            async for _ in letters:
                return True
        return False

    async def purge(self, selection: Selection) -> int:
        purged = 0
        async for letter in self._selected(selection):
            purged += await self._store.purge_dead_letters([letter.id])
        log.info("dead letters purged", extra={"count": purged})
        return purged

    async def _selected(self, selection: Selection, before: float | None = None) -> AsyncGenerator[DeadLetter, None]:
        """The letters of a selection, one page of the store at a time; with a selection that
        is not by ids, only those dead by ``before`` (default: now)."""
        _check(selection)
        if selection.ids:
            for dead_letter_id in selection.ids:
                letter = await self._store.get_dead_letter(dead_letter_id)
                if letter is not None and selection.kind in (None, letter.kind):
                    yield letter
            return
        # Replay and purge remove what they touch, so the first page is always the next one.
        # Only letters dead before the call began: a replayed reply that the receiver
        # refuses again is a new letter, which would otherwise be replayed again, and so
        # on for as long as the receiver refuses.
        seen: set[str] = set()
        began = time.time() if before is None else before
        while True:
            page = await self._store.list_dead_letters(
                kind=selection.kind, conversation_id=selection.conversation_id or None, limit=500
            )
            page = [d for d in page if d.id not in seen and d.dead_at <= began]
            if not page:
                return
            for letter in page:
                seen.add(letter.id)
                yield letter


def _check(selection: Selection) -> None:
    chosen = sum((bool(selection.ids), bool(selection.conversation_id), selection.everything))
    if chosen != 1:
        # More than one would be ambiguous: {"ids": [...], "all": true} must not quietly
        # act on the ids only, nor {"all": true, "conversationId": ...} on one conversation.
        raise InvalidArgument(
            "say which dead letters: ids, a conversationId, or all (exactly one of them)",
            details=(
                FieldViolation("selection", "empty" if not chosen else "more than one of ids, conversationId, all"),
            ),
        )
