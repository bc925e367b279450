"""The core: every operation implemented once, used by both the HTTP and the gRPC front doors."""

from __future__ import annotations

import asyncio
import collections
import contextlib
import logging
import time
import uuid
from collections.abc import Coroutine, Mapping, Sequence
from typing import Any, Protocol

from sidecar.backoff import full_jitter
from sidecar.bots.base import Bot, BotError, BotReply, too_many_replies
from sidecar.config import Config
from sidecar.deadlines import Deadlines
from sidecar.delivery.stream import Broker, ReplyStream, draining_error
from sidecar.errors import (
    NotFound,
    Overloaded,
    StoreRefused,
    Unavailable,
)
from sidecar.models import (
    AcceptResult,
    InboundMessage,
    Reply,
    ReplyDraft,
    StoredMessage,
    entity_id,
    queued_size,
    reply_key,
    sidecar_id,
)
from sidecar.observability import Metrics, describe_error
from sidecar.store.base import Store
from sidecar.validate import reply_problems

log = logging.getLogger(__name__)

# Later than any delivery's next attempt: "due by now" for every queued reply.
_EVER = 1e18

# Messages forgotten, or conversations visited, per store step (~2 ms of SQLite on the
# loop): other work interleaves with a sweep.
_SWEEP_PAGE = 200
_LATER = 1 << 62  # a position after any in a pending-messages read


class Notifier(Protocol):
    """The webhook worker as the core sees it: told when replies were queued."""

    def notify(self, conversation_id: str) -> None: ...

    def hold(self, conversation_id: str) -> None: ...

    def release(self, conversation_id: str) -> None: ...


class Core:
    """Accepts messages, runs the bot once per message, appends replies, serves streams.

    Messages of one conversation go to the bot one at a time, in order of
    acceptance (a "lane" per conversation); different conversations run
    concurrently up to ``bot_concurrency``.

    A store step that raised may have landed all the same (Redis can run a script
    and lose the answer; a cancelled caller leaves the step to finish). Hence: a
    cancelled accept is accepted again (``_accept_abandoned``) and a duplicate still
    pending is queued (``_queue_accepted``); a failed append or finish makes
    subscribers and the webhook re-read the store (``_resync``); and a lane asks the
    store before running the bot again (``_still_pending``). Replies carry keys so
    a re-run appends nothing twice.
    """

    def __init__(self, config: Config, store: Store, bot: Bot, metrics: Metrics, webhook: Notifier | None) -> None:
        self._config = config
        self._store = store
        self._bot = bot
        self._metrics = metrics
        self._webhook = webhook
        self.broker = Broker(config.stream_queue_size)
        self._lanes: dict[str, collections.deque[StoredMessage]] = {}
        # Ids in some lane (a reload must not enqueue them twice), with their queued_size.
        self._queued: dict[str, int] = {}
        self._pending_bytes = 0  # of the messages in _queued: bounded by max_pending_bytes
        # Accepted by this process and not yet handed to the bot: no earlier run of the bot
        # can have emitted replies for them, so their returned replies need no key check.
        self._first_runs: set[str] = set()
        self._tasks: set[asyncio.Task[None]] = set()
        self._bot_slots = asyncio.Semaphore(config.bot_concurrency)
        self._deadlines = Deadlines(config.bot_timeout)  # each bot call's bot_timeout
        self._pending = 0
        self._backlog = False  # more pending messages in the store than were loaded
        self._reloading = False
        # One set per load in progress: the ids lanes finished while its read was on its way.
        self._loads: list[set[str]] = []
        self._refill_scheduled = False  # one load waits to run: asks meanwhile join it
        self._reload_asks = 0  # a load that began before the latest ask may have missed it
        self._load_failures = 0
        self._started = False
        self._draining = False
        self._stopping = asyncio.Event()
        self._streams = 0
        # Metric children resolved once: labels() costs a lock and a dict walk per call.
        self._bot_ok = metrics.bot_calls.labels(bot.name, "ok")
        self._bot_ok_latency = metrics.bot_latency.labels(bot.name)
        self._replies_by_bot = metrics.replies.labels("bot")
        # Read when scraped, not set on every change: no lock taken twice per message.
        metrics.pending_messages.set_function(lambda: self._pending)
        metrics.pending_bytes.set_function(lambda: self._pending_bytes)
        metrics.active_streams.set_function(lambda: self._streams)
        metrics.pending_backlog.set_function(lambda: int(self._backlog))

    # --- lifecycle ----------------------------------------------------------

    @property
    def ready(self) -> bool:
        return self._started and not self._draining

    @property
    def pending(self) -> int:
        return self._pending

    @property
    def streams(self) -> int:
        return self._streams

    async def start(self) -> None:
        """Resume every message accepted before a restart but not yet handled."""
        self._deadlines.start()  # before the first lane: its bot call is limited too
        recovered = await self._load_pending()
        if recovered:
            log.info("resuming messages accepted before the restart", extra={"count": recovered})
        if self._webhook is None:
            await self._dead_letter_orphaned_outbox()
        task = asyncio.create_task(self._sweep())
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        self._started = True

    async def _dead_letter_orphaned_outbox(self) -> None:
        """Replies an earlier run queued for its webhook, when this one has no response URL:
        dead-lettered, so they are visible and replayable (once a URL is set again) instead
        of waiting unseen, and no longer keep retention from trimming their conversation."""
        orphaned = 0
        while heads := await self._store.due_deliveries(_EVER, 256):
            for head in heads:
                reply = head.reply
                await self._store.delivery_dead(
                    reply.conversation_id, reply.sequence, attempts=head.attempts,
                    error="no response URL was configured when the sidecar started", now=time.time(),
                )  # fmt: skip
                orphaned += 1
        if orphaned:
            self._metrics.dead_letters.labels("reply").inc(orphaned)
            log.warning(
                "replies queued for a webhook, now without a response URL, were dead-lettered",
                extra={"count": orphaned},
            )

    async def drain(self, timeout: float) -> None:
        """Refuse new work, end streams, let bot calls in flight finish (up to timeout).

        Messages not handled by then stay pending in the store for the next start.
        """
        self._draining = True
        self.broker.close_all(draining_error())
        self._stopping.set()
        still: set[asyncio.Task[None]] = set()
        if self._tasks:
            _, still = await asyncio.wait(list(self._tasks), timeout=timeout)
            for task in still:
                task.cancel()
            await asyncio.gather(*still, return_exceptions=True)
        if still and timeout > 0:
            # Nothing is lost (the messages stay pending in the store), but an operator
            # should know the grace period ran out: a slow bot, or a short drain_timeout.
            log.warning(
                "drain timeout reached: bot calls cut short, messages left pending for the next start",
                extra={"pending": self._pending, "drain_timeout": timeout},
            )
        elif self._pending and timeout > 0:
            log.info("drained; messages left pending for the next start", extra={"pending": self._pending})
        await self._deadlines.stop()  # after the lanes: their bot calls kept their limit to the end

    # --- send ---------------------------------------------------------------

    async def send(self, message: InboundMessage) -> AcceptResult:
        """Store a message durably (or recognise a duplicate); the bot runs later."""
        if self._draining or not self._started:
            raise Unavailable()
        if self._full() or self._backlog:
            # With a backlog the store holds pending messages not loaded yet: a new one
            # would run before older ones of its conversation, so it waits its turn too.
            # A repeat of a stored message adds no work: it gets its answer (a client
            # retrying after a lost 200 should not be told to back off).
            known = await self._store.known(message)
            if known is not None:
                if known.pending and known.stored.id not in self._queued:
                    self._reload()  # stored, but its first accept's answer was lost
                return known
            raise Overloaded(retry_after=1.0)
        now = time.time()
        try:
            result = await self._store.accept(message, now=now)
        except Unavailable as e:
            # The store may have stored it all the same (Redis ran the script and the
            # answer was lost): the client may retry or give up, and either way the
            # message must not wait unqueued until a restart. A refusal never ran.
            if self._store.failed_steps_may_land and not isinstance(e, StoreRefused):
                self._reload()
            raise
        except asyncio.CancelledError:
            # The caller gave up (a gRPC deadline), but the store finishes what it has
            # started: the message may be stored now with nobody left to queue it.
            # Accepting it again, behind the first in the store's order, tells.
            if not self._stopping.is_set():  # stopping: it stays pending for the next start
                self._spawn(self._accept_abandoned(message, now))
            raise
        self._queue_accepted(result)
        return result

    def _full(self) -> bool:
        """The queue holds as many messages, or as many bytes, as it may: new ones wait (429)."""
        c = self._config
        return self._pending >= c.max_pending_messages or self._pending_bytes >= c.max_pending_bytes

    def _queue_accepted(self, result: AcceptResult) -> None:
        if self._backlog:
            return  # pending in the store: the backlog loads it in order, after older ones
        if not result.duplicate:
            self._first_runs.add(result.stored.id)
            self._enqueue(result.stored)
        elif result.pending and result.stored.id not in self._queued:
            # Stored but maybe never queued: its first accept's caller was cancelled, or
            # lost the answer (Redis). Loaded from the store, not queued from this answer:
            # a lane may have finished it since the store gave it (answers over a network
            # can arrive out of order), and the load skips what lanes finish meanwhile.
            self._reload()

    def _reload(self) -> None:
        """The store may hold pending messages this process never queued: load them, in
        arrival order, before taking new ones (which get 429 meanwhile), as after a restart."""
        self._backlog = True
        self._reload_asks += 1
        if not self._refill_scheduled:
            self._refill_scheduled = True
            self._spawn(self._refill_later(0.0))  # loads now if the queue is at most half full

    async def _accept_abandoned(self, message: InboundMessage, now: float) -> None:
        try:
            self._queue_accepted(await self._store.accept(message, now=now))
        except Exception as e:  # noqa: BLE001 - the client was not told 200; its retry decides
            log.warning("re-checking a cancelled accept failed", extra={"error": describe_error(e)})

    def _spawn(self, coro: Coroutine[Any, Any, None]) -> None:
        task = asyncio.create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    def _enqueue(self, stored: StoredMessage, order: Mapping[str, int] | None = None) -> None:
        """Queue a message on its conversation's lane: at the end, or, given the store's
        ``order`` (positions in a pending-messages read), before the queued messages that
        came after it. That way a message loaded late (a replayed dead letter, an accept
        whose answer was lost) runs where a restart would run it, not behind newer ones.
        Never before the lane's head: it may be running."""
        if stored.id in self._queued:
            return
        size = self._queued[stored.id] = queued_size(stored.message)
        self._pending_bytes += size
        self._pending += 1
        lane = self._lanes.get(stored.conversation_id)
        if lane is None:
            lane = self._lanes[stored.conversation_id] = collections.deque()
            self._spawn(self._run_lane(stored.conversation_id, lane))
        if order is not None and len(lane) > 1:
            mine = order[stored.id]
            # A message not in the read came after it (or after its limit): later than any in it.
            if order.get(lane[-1].id, _LATER) > mine:  # else the common case: loaded in order, appended
                lane.insert(next(i for i in range(1, len(lane)) if order.get(lane[i].id, _LATER) > mine), stored)
                return
        lane.append(stored)

    async def _load_pending(self) -> int:
        """Queue the oldest pending messages, up to ``max_pending_messages``; note whether
        the store holds more (a backlog: loaded, in order, as the queue drains)."""
        limit = self._config.max_pending_messages
        asks = self._reload_asks
        finished: set[str] = set()
        self._loads.append(finished)
        try:
            # At most twice the queue's bound as stored: room for what is queued already
            # (the read starts at the oldest pending message) and as much again to load.
            pending, more = await self._store.pending_page(limit, 2 * self._config.max_pending_bytes)
        finally:
            # By identity: list.remove compares by value, and two loads' sets are often equal.
            self._loads = [load for load in self._loads if load is not finished]
        order = {stored.id: i for i, stored in enumerate(pending)}
        loaded, left = 0, False
        for stored in pending:
            if stored.id in finished:
                # Handled or dead-lettered since the store answered the read (Redis answers
                # over the network, so the answer can predate a lane's last step): queued
                # again, it would go to the bot a second time.
                continue
            if self._pending_bytes >= self._config.max_pending_bytes and stored.id not in self._queued:
                lane = self._lanes.get(stored.conversation_id)
                # Left in the store, a backlog loaded as the queue drains (and so are the
                # later ones of its conversation, newer still), unless its lane holds a
                # newer message (a replayed letter is older than those queued after it):
                # that one must not run first, so this one is queued over the byte bound.
                if lane is None or order.get(lane[-1].id, _LATER) < order[stored.id]:
                    left = True
                    continue
            self._enqueue(stored, order)
            loaded += 1
        # A reload asked for during the read (an accept whose answer may be lost) may
        # concern a message this read predates: the backlog stays, for that reload's load.
        self._backlog = left or more or self._reload_asks != asks
        return loaded

    async def _refill(self) -> None:
        """Load more of the backlog once the queue is half empty (one load at a time)."""
        c = self._config
        if self._reloading or self._stopping.is_set():
            return
        if self._pending > c.max_pending_messages // 2 or self._pending_bytes > c.max_pending_bytes // 2:
            return
        self._reloading = True
        asks = self._reload_asks
        try:
            await self._load_pending()
            self._load_failures = 0
        except Exception as e:  # noqa: BLE001 - tried again after a pause
            self._load_failed(e)
        finally:
            self._reloading = False
        if self._reload_asks != asks:  # asked again while this load read: it may predate that
            self._reload()

    def _load_failed(self, error: Exception) -> None:
        """Try the load again after a pause: the lanes ask only as messages finish, and
        when none is left to finish nobody would ask again (with a backlog, every new
        message meanwhile is answered 429)."""
        self._backlog = True  # whatever the store holds, it is not all queued
        self._load_failures += 1
        self._metrics.store_errors.labels("message").inc()
        log.error("loading pending messages failed; will retry", extra={"error": describe_error(error)})
        if not self._refill_scheduled:  # one retry at a time, however many asked during an outage
            self._refill_scheduled = True
            delay = full_jitter(self._load_failures, self._config.bot_backoff_initial, self._config.bot_backoff_max)
            self._spawn(self._refill_later(delay))

    async def _refill_later(self, delay: float) -> None:
        """The one scheduled load (_refill_scheduled): after ``delay``, unless stopping."""
        if delay > 0:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._stopping.wait(), delay)
        self._refill_scheduled = False
        if self._backlog:
            await self._refill()

    async def _run_lane(self, conversation_id: str, lane: collections.deque[StoredMessage]) -> None:
        failures = 0
        try:
            while lane and not self._stopping.is_set():
                try:
                    if not await self._handle(lane[0]):
                        break  # stopping: it stays pending (and counted) for the next start
                except Exception as e:  # noqa: BLE001 - a store step failed; bot failures are handled inside
                    # The message is still pending in the store (its step did not commit):
                    # try it again after a pause, in order, rather than let the lane die
                    # and strand this conversation until a restart.
                    failures += 1
                    self._resync(conversation_id)
                    self._metrics.store_errors.labels("message").inc()
                    log.error(
                        "handling a message failed in the store; will retry",
                        extra={**_ids(lane[0]), "attempt": failures, "error": describe_error(e)},
                    )
                    delay = full_jitter(failures, self._config.bot_backoff_initial, self._config.bot_backoff_max)
                    with contextlib.suppress(TimeoutError):
                        await asyncio.wait_for(self._stopping.wait(), delay)
                    if await self._still_pending(lane[0]):
                        continue
                    # The failed step had landed (Redis ran it and lost the answer): the
                    # message is handled or dead-lettered, so it is done here as if the step
                    # had answered. Running the bot again would only repeat its side effects.
                failures = 0
                done = lane.popleft().id
                self._pending_bytes -= self._queued.pop(done)
                self._pending -= 1
                for finished in self._loads:
                    finished.add(done)
                if self._backlog:
                    await self._refill()
        finally:
            # No await between the loop's last check and this: a message enqueued
            # meanwhile would find the lane and never run.
            if self._lanes.get(conversation_id) is lane and not lane:
                del self._lanes[conversation_id]

    async def _still_pending(self, stored: StoredMessage) -> bool:
        """Whether the store still holds the message as pending; True when it cannot say
        (the retry that follows will tell)."""
        try:
            known = await self._store.known(stored.message)
        except Exception:  # noqa: BLE001 - the store is still failing: retry as before
            return True
        return known is not None and known.pending

    async def _handle(self, stored: StoredMessage) -> bool:
        """Run the bot until it succeeds or fails for good (True), or the sidecar stops
        first (False: the message stays pending)."""
        attempts = stored.attempts
        bot = self._bot.name
        # Only the very first run skips the key check: a retry may follow a run that
        # emitted replies under the keys this one returns them with.
        keyed = stored.id not in self._first_runs
        self._first_runs.discard(stored.id)
        while not self._stopping.is_set():
            emitted = 0
            store_failure: Exception | None = None
            too_many: BotError | None = None  # raised into the bot by emit: it may swallow it
            this_run_keyed, keyed = keyed, True

            async def emit(reply: BotReply) -> None:
                nonlocal emitted, store_failure, too_many
                if emitted >= self._config.max_replies_per_message:
                    too_many = too_many_replies(self._config.max_replies_per_message)
                    raise too_many
                if emitted == 0:
                    self._metrics.end_to_end.observe(max(0.0, time.time() - stored.received_at))
                draft = self._draft(stored, self._checked(reply), _reply_key(stored, emitted))
                emitted += 1
                try:
                    await self._append(stored.conversation_id, [draft], source="bot")
                except Exception as e:
                    # Remembered, whatever the bot makes of it: the store failed, not the
                    # bot, so the attempt must not count towards dead-lettering.
                    store_failure = e
                    raise

            counts, retry_after = True, None
            try:
                # A slot only for the call itself: a message waiting out its backoff must
                # not keep other conversations from the bot (bot_concurrency such messages
                # would stall every conversation for as long as their retries last).
                async with self._bot_slots:
                    if self._stopping.is_set():
                        return False  # still pending in the store: the next start runs it
                    started = time.perf_counter()
                    # Not wait_for (a task per message) nor asyncio.timeout (a timer per message).
                    with self._deadlines.limit():
                        returned = await self._bot.handle(stored, emit)
                if too_many is not None or emitted + len(returned) > self._config.max_replies_per_message:
                    raise too_many or too_many_replies(self._config.max_replies_per_message)
                returned = [self._checked(r) for r in returned]
            except BotError as e:
                error, outcome, retry, counts, retry_after = str(e), "error", e.retryable, e.counts, e.retry_after
            except TimeoutError:
                error, outcome, retry = f"timeout after {self._config.bot_timeout:g}s", "timeout", True
            except asyncio.CancelledError:
                raise
            except Exception as e:
                if store_failure is None:
                    log.exception("bot raised", extra=_ids(stored))
                error, outcome, retry = f"bot raised {type(e).__name__}", "error", True
            else:
                if store_failure is None:
                    await self._finish(stored, returned, emitted, started, keyed=this_run_keyed)
                    return True
            if too_many is not None and store_failure is None:  # whatever the bot did after it
                error, outcome, retry, counts = str(too_many), "error", False, True
            if store_failure is not None:
                # However the bot took it (raised, wrapped, or swallowed it and went on):
                # the lane retries the message as a store failure, keyed, uncounted.
                raise store_failure
            if not counts:
                self._metrics.bot_calls.labels(bot, "not_tried").inc()
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._stopping.wait(), self._retry_delay(max(attempts, 1), retry_after))
                continue
            self._metrics.bot_calls.labels(bot, outcome if retry else "rejected").inc()
            self._metrics.bot_latency.labels(bot).observe(time.perf_counter() - started)
            attempts = await self._store.record_attempt(stored.id, error)
            log.warning("bot attempt failed", extra={**_ids(stored), "attempt": attempts, "error": error})
            if not retry or attempts >= self._config.bot_max_attempts:
                if await self._store.dead_letter_message(stored.id, error, now=time.time()) is not None:
                    self._metrics.dead_letters.labels("message").inc()
                    log.error("message dead-lettered", extra={**_ids(stored), "attempts": attempts, "error": error})
                return True
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._stopping.wait(), self._retry_delay(attempts, retry_after))
        return False

    def _retry_delay(self, attempts: int, retry_after: float | None) -> float:
        """Full-jitter backoff, but not sooner than the bot asked (Retry-After), within
        bot_backoff_max."""
        c = self._config
        delay = full_jitter(attempts, c.bot_backoff_initial, c.bot_backoff_max)
        return delay if retry_after is None else max(delay, min(retry_after, c.bot_backoff_max))

    async def _finish(
        self, stored: StoredMessage, returned: Sequence[BotReply], emitted: int, started: float, *, keyed: bool
    ) -> None:
        """The bot succeeded: its returned replies and "handled" in one store step (one
        commit instead of two, and no window in which a crash re-runs the bot although
        its replies are stored)."""
        self._bot_ok.inc()
        self._bot_ok_latency.observe(time.perf_counter() - started)
        if returned and emitted == 0:
            self._metrics.end_to_end.observe(max(0.0, time.time() - stored.received_at))
        drafts = [self._draft(stored, r, _reply_key(stored, emitted + i)) for i, r in enumerate(returned)]
        replies = await self._store.finish_message(
            stored.id,
            stored.conversation_id,
            drafts,
            now=time.time(),
            outbox=self._webhook is not None,
            keyed=keyed,
        )
        self._published(stored.conversation_id, replies, source="bot")

    def _checked(self, reply: BotReply) -> BotReply:
        """A bot's reply if the log can hold it and both protocols carry it exactly,
        else a BotError: a payload google.protobuf.Value cannot hold would break
        every Subscribe that replays it. Retrying the same bot cannot help."""
        bad = reply_problems(
            reply.type,
            reply.payload,
            {"bot_message_id": reply.bot_message_id, "bot_user_id": reply.bot_user_id,
             "bot_conversation_id": reply.bot_conversation_id},
            max_id_length=self._config.max_id_length,
            max_payload_depth=self._config.max_payload_depth,
        )  # fmt: skip
        if bad:
            problems = "; ".join(f"{v.field} {v.reason}" for v in bad)
            raise BotError(f"the bot gave an invalid reply: {problems}", retryable=False)
        return reply

    def _draft(self, stored: StoredMessage, reply: BotReply, dedupe_key: str) -> ReplyDraft:
        m = stored.message
        return ReplyDraft(
            type=reply.type,
            payload=reply.payload,
            dedupe_key=dedupe_key,
            user_id=m.user_id,
            in_reply_to=m.message_id,
            bot_user_id=reply.bot_user_id or stored.user_sidecar_id,
            bot_message_id=reply.bot_message_id or sidecar_id("reply", m.conversation_id, dedupe_key),
            bot_conversation_id=reply.bot_conversation_id or stored.conversation_sidecar_id,
        )

    async def _append(self, conversation_id: str, drafts: Sequence[ReplyDraft], *, source: str) -> list[Reply]:
        # Shielded, and published from the append's own completion: when the caller is
        # cancelled mid-commit (the bot's timeout fires while an emitted reply is being
        # fsync'd), the commit still lands, and what it stored must still reach
        # subscribers and the webhook worker. A re-run finds it by its dedupe key and
        # would not publish it again.
        append = asyncio.ensure_future(
            self._store.append_replies(conversation_id, drafts, now=time.time(), outbox=self._webhook is not None)
        )

        def committed(done: asyncio.Future[list[Reply]]) -> None:
            if not done.cancelled() and done.exception() is None:
                self._published(conversation_id, done.result(), source=source)
            else:
                self._resync(conversation_id)

        append.add_done_callback(committed)
        return await asyncio.shield(append)

    def _resync(self, conversation_id: str) -> None:
        """A store step failed, but may have landed all the same (Redis ran the script and
        the answer was lost): what it stored must not wait for the next reply to be seen.
        Subscribers read the log, the webhook worker reads the outbox."""
        self.broker.resync(conversation_id)
        if self._webhook is not None:
            self._webhook.notify(conversation_id)

    def _published(self, conversation_id: str, replies: Sequence[Reply], *, source: str) -> None:
        """Committed replies go live: to subscribers now, to the webhook worker's queue."""
        self.broker.publish(conversation_id, replies)
        if replies:
            (self._replies_by_bot if source == "bot" else self._metrics.replies.labels(source)).inc(len(replies))
            if self._webhook is not None:
                self._webhook.notify(conversation_id)

    async def _sweep(self) -> None:
        """Keep the store bounded: forget handled messages older than ``dedupe_window``
        (a repeat of one's id is then a new message), and trim replies older than
        ``reply_max_age`` in a pass over every conversation, about every 1 % of that age."""
        c = self._config
        interval = min(60.0, max(0.05, min(c.dedupe_window, c.reply_max_age) / 4))
        next_pass = 0.0
        while not self._stopping.is_set():
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._stopping.wait(), interval)
            try:
                await self._forget_messages()
                if time.time() >= next_pass:
                    next_pass = time.time() + c.reply_max_age / 100
                    await self._expire_replies()
            except Exception as e:  # noqa: BLE001 - a store hiccup: the next sweep tries again
                self._metrics.store_errors.labels("sweep").inc()
                log.warning("store sweep failed; the next sweep tries again", extra={"error": describe_error(e)})

    async def _forget_messages(self) -> None:
        before = time.time() - self._config.dedupe_window
        while not self._stopping.is_set():
            forgotten = await self._store.forget_messages(before, _SWEEP_PAGE)
            self._metrics.messages_forgotten.inc(forgotten)
            if forgotten < _SWEEP_PAGE:
                return

    async def _expire_replies(self) -> None:
        before, cursor = time.time() - self._config.reply_max_age, ""
        while not self._stopping.is_set():
            expired, cursor = await self._store.expire_replies(before, cursor, _SWEEP_PAGE)
            self._metrics.replies_expired.inc(expired)
            if not cursor:
                return

    # --- dead letters put back (sidecar/dead_letters.py) ----------------------

    async def load_replayed(self) -> None:
        """Dead-lettered messages are pending again: queue them as a start would, the
        oldest first and the rest as a backlog if they are more than the queue holds
        (they would otherwise stay pending unseen)."""
        try:
            await self._load_pending()
        except Exception as e:  # noqa: BLE001 - the letters are replayed: loading them is ours to retry
            self._load_failed(e)

    def reload_pending(self) -> None:
        """A replay of messages failed part-way: its steps may have landed (Redis), so load
        the store's pending messages as after a lost answer."""
        self._reload()

    # --- replies from asynchronous bots ---------------------------------------

    async def add_bot_reply_batches(self, batches: Mapping[str, Sequence[BotReply]]) -> list[Reply]:
        """Append replies a bot POSTed to the callback endpoint, per conversation.

        Every conversation is looked up before anything is appended: a body naming one
        unknown conversation is refused whole, not after storing the others' replies
        (which a retry of the same body would then store again). A reply carrying a
        bot message id is keyed by it, so a retried callback does not add it twice.
        Taken while draining too: these answer messages already in flight, and a bot
        (the Botpress integration) may not send them again.
        """
        users: dict[str, str] = {}
        for conversation_id in batches:
            user_id = await self._store.conversation_user(conversation_id)
            if user_id is None:
                raise NotFound("no message was ever received in this conversation")
            users[conversation_id] = user_id
        appended: list[Reply] = []
        for conversation_id, replies in batches.items():
            user_id = users[conversation_id]
            drafts = []
            for reply in replies:
                key = f"callback/{reply.bot_message_id or uuid.uuid4()}"
                drafts.append(
                    ReplyDraft(
                        type=reply.type,
                        payload=reply.payload,
                        dedupe_key=key,
                        user_id=user_id,
                        bot_user_id=reply.bot_user_id or entity_id("user", user_id),
                        bot_message_id=reply.bot_message_id or sidecar_id("reply", conversation_id, key),
                        bot_conversation_id=reply.bot_conversation_id or entity_id("conversation", conversation_id),
                    )
                )
            appended += await self._append(conversation_id, drafts, source="callback")
        return appended

    # --- subscribe ------------------------------------------------------------

    async def subscribe(self, conversation_id: str, after: int | None) -> ReplyStream:
        """Open a stream of the conversation's replies after ``after`` (None: live only).

        The caller must ``close()`` the stream. Raises CursorExpired when the
        cursor is older than what is retained, Overloaded at the stream limit.
        """
        if self._draining or not self._started:
            raise Unavailable()
        if self._streams >= self._config.max_streams:
            self._metrics.streams_refused.inc()
            raise Overloaded("too many open streams", retry_after=1.0)
        self._streams += 1  # counted before the store reads: opens meanwhile see this one
        try:
            return await ReplyStream.open(self._store, self.broker, conversation_id, after, self._stream_closed)
        except BaseException:
            self._streams -= 1
            raise

    def _stream_closed(self, stream: ReplyStream) -> None:
        self._streams -= 1
        if stream.close_reason is not None and not self._draining:
            self._metrics.stream_cutoffs.inc()


def _reply_key(stored: StoredMessage, index: int) -> str:
    return reply_key(stored.id, stored.received_at, index)


def _ids(stored: StoredMessage) -> dict[str, str]:
    return {"conversation_id": stored.conversation_id, "message_id": stored.message.message_id}
