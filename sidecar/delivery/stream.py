"""Live fan-out of replies to subscribers, merged with replay from the log without gap or repeat."""

from __future__ import annotations

import asyncio
import collections
from collections.abc import AsyncIterator, Callable, Iterator, Sequence

import orjson

from sidecar.errors import CursorExpired, SidecarError, SlowConsumer, Unavailable
from sidecar.models import Reply
from sidecar.store.base import Store

_PAGE = 256
# A page read from the log waits in memory while the client reads it: with replies of
# up to 4 MiB, 256 of them could pin hundreds of MiB per stream of a client that stopped
# reading. At most this much payload JSON per page (always one reply, whatever its size).
_PAGE_BYTES = 1024 * 1024
# Live replies a subscriber has not read yet, at most this much payload JSON (and
# stream_queue_size of them): past it the subscriber is cut off as too slow, like a
# full buffer. With replies of up to 4 MiB, a count alone let one stalled stream pin
# gigabytes. A single reply larger than this still passes into an empty buffer.
BUFFER_BYTES = 16 * 1024 * 1024


class Subscription:
    """One subscriber's bounded buffer of live replies.

    A deque plus an event rather than an asyncio.Queue: publish must never
    block the publisher, and an overflow has to reach the consumer even
    while it is stuck writing to a slow client (``on_cut_off``). A callback,
    not a second Event and a task waiting on it: idle streams are the
    sidecar's largest population, and every object per stream counts.
    """

    __slots__ = ("_waiter", "buffer", "closed", "conversation_id", "held", "limit", "on_cut_off", "stale")

    def __init__(self, conversation_id: str, limit: int) -> None:
        self.conversation_id = conversation_id
        self.limit = limit
        # Created with the first live reply, and a bare future rather than an
        # Event (which holds a deque of its own): an empty deque costs ~600 B,
        # a quarter of what an idle stream adds in Python objects.
        self.buffer: collections.deque[tuple[Reply, int]] | None = None
        """Live replies not read yet, each with its payload's size as JSON (``held`` in all)."""
        self.held = 0
        self._waiter: asyncio.Future[None] | None = None
        self.closed: SidecarError | None = None
        """Why the subscriber must end (it fell behind, or the sidecar drains); None while open."""
        self.on_cut_off: Callable[[], None] | None = None
        self.stale = False
        """The log may hold replies never offered here: read it before the buffer."""

    def offer(self, reply: Reply, size: int) -> bool:
        """Buffer a live reply (``size``: its payload as JSON); False (and cut off) when the
        buffer is full, by count or by bytes."""
        if self.closed is not None:
            return True
        buffer = self.buffer
        if buffer is None:
            buffer = self.buffer = collections.deque()
        elif len(buffer) >= self.limit or (buffer and self.held + size > BUFFER_BYTES):
            self.close(SlowConsumer())
            return False
        buffer.append((reply, size))
        self.held += size
        self._wake()
        return True

    def resync(self) -> None:
        self.stale = True
        self._wake()

    def close(self, reason: SidecarError) -> None:
        if self.closed is None:
            self.closed = reason
            self.buffer, self.held = None, 0  # what it held is in the log: a resume reads it there
            self._wake()
            if self.on_cut_off is not None:
                self.on_cut_off()

    async def wait(self) -> None:
        """Until a live reply is buffered or the subscription is closed (returns at once if so)."""
        if self.buffer or self.closed is not None or self.stale:
            return
        self._waiter = asyncio.get_running_loop().create_future()
        try:
            await self._waiter
        finally:
            self._waiter = None

    def _wake(self) -> None:
        waiter = self._waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)


class Broker:
    """Per-conversation subscriber sets; publish is synchronous and never waits."""

    def __init__(self, queue_size: int) -> None:
        self._queue_size = queue_size
        self._subs: dict[str, set[Subscription]] = {}
        self.cutoffs = 0

    def __len__(self) -> int:
        return sum(len(s) for s in self._subs.values())

    def register(self, conversation_id: str) -> Subscription:
        sub = Subscription(conversation_id, self._queue_size)
        self._subs.setdefault(conversation_id, set()).add(sub)
        return sub

    def unregister(self, sub: Subscription) -> None:
        subs = self._subs.get(sub.conversation_id)
        if subs is not None:
            subs.discard(sub)
            if not subs:
                del self._subs[sub.conversation_id]

    def publish(self, conversation_id: str, replies: Sequence[Reply]) -> None:
        """Offer committed replies, in sequence order, to the conversation's subscribers.

        A batch larger than the room left in a subscriber's buffer, by count or by bytes
        (a bot answering one message with a thousand replies) is offered as its last
        reply alone: the gap makes the stream read the others from the log, where they
        already are.
        Only a buffer already full, a subscriber that stopped reading, cuts it off.
        """
        subs = self._subs.get(conversation_id)
        if not subs or not replies:
            return
        # Each reply's size once, whatever the number of subscribers.
        sized = [(reply, len(orjson.dumps(reply.payload))) for reply in replies]
        total = sum(size for _, size in sized)
        last = sized[-1:]
        for sub in subs:
            room = sub.limit - (len(sub.buffer) if sub.buffer is not None else 0)
            fits = len(sized) <= room and sub.held + total <= BUFFER_BYTES
            for reply, size in sized if fits else last:
                if not sub.offer(reply, size):
                    self.cutoffs += 1
                    break

    def resync(self, conversation_id: str) -> None:
        """Replies of the conversation may be committed without having been offered (a
        store that lost its answer to an append that landed): its streams read the log."""
        for sub in self._subs.get(conversation_id, ()):
            sub.resync()

    def close_all(self, reason: SidecarError) -> None:
        for subs in self._subs.values():
            for sub in subs:
                sub.close(reason)


class ReplyStream:
    """Replies of one conversation with sequence > cursor: first from the log, then live.

    The subscription is registered *before* the log is read, so a reply
    committed during the replay is either in the log read or in the live
    buffer (or both: duplicates are dropped by sequence). A live reply that
    arrives ahead of the next expected sequence triggers a refill from the
    log, so concurrent appenders can never open a gap.
    """

    __slots__ = ("_broker", "_checked", "_closed", "_on_close", "_refill", "_replayed", "_store", "_sub", "last")

    def __init__(
        self,
        store: Store,
        broker: Broker,
        sub: Subscription,
        after: int,
        on_close: Callable[[ReplyStream], None] | None = None,
    ) -> None:
        self._store = store
        self._on_close = on_close
        self._closed = False
        self._broker = broker
        self._sub = sub
        self.last = after
        """The sequence of the last reply yielded (the client's cursor)."""
        self._replayed: Iterator[Reply] | None = None
        """The rest of the last page read from the log."""
        self._refill = True
        self._checked = False  # True: the first empty page needs no look at what is retained

    @classmethod
    async def open(
        cls,
        store: Store,
        broker: Broker,
        conversation_id: str,
        after: int | None,
        on_close: Callable[[ReplyStream], None] | None = None,
    ) -> ReplyStream:
        sub = broker.register(conversation_id)
        live_only = after is None
        try:
            last = await store.last_sequence(conversation_id)
            if after is None:
                after = last
            elif after > last:
                raise CursorExpired(f"the cursor {after} is ahead of the conversation's last reply {last}")
            elif after + 1 < await store.first_retained_sequence(conversation_id):
                raise CursorExpired()
        except BaseException:
            broker.unregister(sub)
            raise
        stream = cls(store, broker, sub, after, on_close)
        # Live only, the cursor is the log's end: a first empty page is "caught up", and
        # nothing after it can have been trimmed yet. Spares a read per live Subscribe.
        stream._checked = live_only
        return stream

    def on_cut_off(self, callback: Callable[[], None] | None) -> None:
        """Call ``callback`` (once) when the stream is closed from outside: the consumer fell
        behind or the sidecar drains. For a consumer that may be blocked on something else."""
        self._sub.on_cut_off = callback

    @property
    def close_reason(self) -> SidecarError | None:
        return self._sub.closed

    def close(self) -> None:
        """Stop receiving live replies. Idempotent."""
        if self._closed:
            return
        self._closed = True
        self._broker.unregister(self._sub)
        if self._on_close is not None:
            self._on_close(self)

    def __aiter__(self) -> AsyncIterator[Reply]:
        return self

    async def __anext__(self) -> Reply:
        sub = self._sub
        while True:
            if sub.closed is not None:
                raise sub.closed
            if sub.stale:
                sub.stale = False
                self._refill = True
            if self._replayed is not None:
                reply = next(self._replayed, None)
                if reply is not None:
                    if reply.sequence != self.last + 1:  # a page is gapless, or the log was trimmed
                        raise CursorExpired("replies after the cursor were trimmed while the stream was behind")
                    return self._take(reply)
                self._replayed = None
            if self._refill:
                page = await self._store.replies_after(sub.conversation_id, self.last, _PAGE, _PAGE_BYTES)
                if page and page[0].sequence != self.last + 1:
                    raise CursorExpired("replies after the cursor were trimmed while the stream was behind")
                checked, self._checked = self._checked, False
                if (
                    not page
                    and not checked
                    and self.last + 1 < await self._store.first_retained_sequence(sub.conversation_id)
                ):
                    # Every reply after the cursor was trimmed: say so now, not when
                    # (if ever) the next live reply arrives and shows the gap.
                    raise CursorExpired("replies after the cursor were trimmed while the stream was behind")
                self._replayed = iter(page)
                # A page cut short by its byte budget looks like the log's end: only an
                # empty page says the stream has caught up.
                self._refill = bool(page)
                continue
            buffer = sub.buffer
            while buffer:
                reply, size = buffer.popleft()
                sub.held -= size
                if reply.sequence <= self.last:
                    continue
                if reply.sequence == self.last + 1:
                    return self._take(reply)
                self._refill = True  # a gap: the missing replies are in the log
                break
            if self._refill:
                continue
            await sub.wait()

    def _take(self, reply: Reply) -> Reply:
        self.last = reply.sequence
        return reply


def draining_error() -> Unavailable:
    return Unavailable("the sidecar is shutting down; reconnect with your last sequence")
