"""The outbox worker: POSTs replies to the response URL, in order per conversation, until acknowledged."""

from __future__ import annotations

import asyncio
import collections
import contextlib
import functools
import logging
import time
import uuid
from datetime import UTC, datetime

import aiohttp
import orjson
from standardwebhooks.webhooks import Webhook

from sidecar.backoff import full_jitter
from sidecar.config import Config
from sidecar.http_client import parse_retry_after, read_at_most
from sidecar.models import INSTALL_CHECK, Delivery
from sidecar.observability import Metrics, Throttle, describe_error
from sidecar.store.base import Store

log = logging.getLogger(__name__)

_BATCH = 256
_PAGE = 32
"""Queued replies of one conversation read at once: one read per page instead of per reply."""
_RETRYABLE = {408, 429}
_MAX_ANSWER = 64 * 1024
"""Bytes of a receiver's answer read at most: only its status and headers matter."""
_COALESCE = 0.02
"""Seconds the scheduler waits at least before a pass due to the clock (not to a wake-up)."""
_STORE_PAUSE = 1.0
"""Seconds a conversation waits after a store step of its delivery failed."""
_POLL = 5.0
"""The longest the scheduler sleeps without reading the outbox."""


class Outcome:
    """What one attempt tells the worker to do next."""

    __slots__ = ("error", "kind", "retry_after")
    KINDS = ("ok", "retry", "rejected", "error", "timeout")

    def __init__(self, kind: str, error: str = "", retry_after: float | None = None) -> None:
        self.kind = kind  # one of KINDS
        self.error = error
        self.retry_after = retry_after


class WebhookDelivery:
    """Delivers the outbox. Per conversation only the lowest queued reply is attempted,
    so replies arrive in order; conversations proceed concurrently, bounded.

    Every decision is written to the store before the next step, so a
    restart resumes exactly here: nothing is lost, and a reply acknowledged
    by the receiver but not yet marked may be POSTed again with the same
    ``webhook-id`` (at-least-once, deduplicable).
    """

    def __init__(self, config: Config, store: Store, metrics: Metrics) -> None:
        self._config = config
        self._store = store
        self._metrics = metrics
        self._signers = [Webhook(secret) for secret in config.webhook_secret.split()]
        self._session: aiohttp.ClientSession | None = None
        self._wake = asyncio.Event()
        self._in_flight: dict[str, asyncio.Task[None]] = {}
        # Replays put a dead reply back below replies a delivery may hold already. Each
        # replay takes the next epoch; a conversation's queue read at an earlier epoch
        # than its last replay is read again before its next POST.
        self._epoch = 0
        self._replayed_at: dict[str, int] = {}
        self._held: collections.Counter[str] = collections.Counter()  # conversations being replayed
        self._slots = asyncio.Semaphore(config.webhook_concurrency)
        self._scheduler: asyncio.Task[None] | None = None
        self._draining = False
        self._read_errors = Throttle()  # an outbox that cannot be read fails every second
        # The longest wait this worker sets (a backoff step or a receiver's Retry-After),
        # with a minute to spare: a head set for later than now plus this was set before
        # the wall clock stepped back.
        self._longest_wait = (
            max(config.webhook_backoff_initial, config.webhook_backoff_max, config.webhook_retry_after_max) + 60.0
        )
        self._failing_log = Throttle()
        # Resolved once: labels() takes a lock and walks a dict on every call.
        self._attempts = {kind: metrics.webhook_attempts.labels(kind) for kind in Outcome.KINDS}

    # --- lifecycle ------------------------------------------------------------

    async def start(self) -> None:
        connector = aiohttp.TCPConnector(limit=self._config.webhook_concurrency, enable_cleanup_closed=True)
        self._session = aiohttp.ClientSession(
            connector=connector,
            json_serialize=lambda v: orjson.dumps(v).decode(),
            timeout=aiohttp.ClientTimeout(total=self._config.webhook_timeout),
        )
        self._scheduler = asyncio.create_task(self._schedule(), name="webhook-scheduler")

    def notify(self, conversation_id: str) -> None:
        """New replies were queued; cheap enough to call on every append."""
        self._wake.set()

    def hold(self, conversation_id: str) -> None:
        """Start no POST for the conversation until ``release``: its dead replies are being
        put back into the outbox, one commit at a time and not in sequence order."""
        self._held[conversation_id] += 1

    def release(self, conversation_id: str) -> None:
        """The replay is over: replies went back into the outbox below replies queued
        after them, so a delivery that read its queue before re-reads it before its
        next POST, and the lowest sequence goes first."""
        self._held[conversation_id] -= 1
        if self._held[conversation_id] <= 0:
            del self._held[conversation_id]
        self._epoch += 1
        self._replayed_at[conversation_id] = self._epoch
        self._wake.set()

    def _stale(self, conversation_id: str, read_at: int) -> bool:
        return self._replayed_at.get(conversation_id, 0) > read_at

    async def drain(self, timeout: float) -> None:
        """Start nothing new; attempts in flight may finish within timeout, the rest stay queued."""
        self._draining = True
        if self._scheduler is not None:
            self._scheduler.cancel()
        tasks = list(self._in_flight.values())
        if tasks:
            _, still = await asyncio.wait(tasks, timeout=timeout)
            for task in still:
                task.cancel()
            await asyncio.gather(*still, return_exceptions=True)
            if still:  # their replies stay queued: POSTed again (same webhook-id) at the next start
                log.warning(
                    "drain timeout reached: webhook deliveries cut short, their replies stay queued",
                    extra={"conversations": len(still), "drain_timeout": timeout},
                )

    async def stop(self) -> None:
        self._draining = True
        tasks = [t for t in (self._scheduler, *self._in_flight.values()) if t is not None]
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        if self._session is not None:
            await self._session.close()
            self._session = None

    # --- scheduling -------------------------------------------------------------

    async def _schedule(self) -> None:
        while not self._draining:
            self._wake.clear()
            try:
                now = time.time()
                read_at = self._epoch  # before the read: a replay after it is seen as newer
                if self._replayed_at:
                    # An entry matters only to a task that read its queue before the replay:
                    # one in flight. Tasks this pass starts read after every entry so far.
                    self._replayed_at = {c: e for c, e in self._replayed_at.items() if c in self._in_flight}
                due = await self._store.due_deliveries(now, _BATCH, stepped_after=now + self._longest_wait)
                for delivery in due:
                    conversation_id = delivery.reply.conversation_id
                    if conversation_id not in self._in_flight and conversation_id not in self._held:
                        task = asyncio.create_task(self._run_conversation(delivery, read_at))
                        self._in_flight[conversation_id] = task
                        task.add_done_callback(functools.partial(self._finished, conversation_id))
                # Every head due by now has a task (or, past _BATCH of them, gets one when
                # a task ends and wakes this loop): sleep until the next head falls due.
                # Not "the earliest head": that is one in flight, and a delivery that
                # hangs would keep every other conversation's retry waiting behind it.
                next_due = await self._store.next_due_at(after=now)
            except Exception as e:  # noqa: BLE001 - a store hiccup: read again in a second
                self._metrics.store_errors.labels("delivery").inc()
                if self._read_errors.due():
                    log.error("webhook scheduler cannot read the outbox; retrying", extra={"error": describe_error(e)})
                next_due = time.time() + 1.0
            # Heads falling due within _COALESCE of each other are picked up by one pass:
            # after an outage, retries come due one by one, and a pass (two outbox
            # reads) for each would cost more than a few milliseconds of delay.
            # At most _POLL, whatever is due: a reply queued by a store step whose answer
            # was lost (so nobody called notify) is picked up then, not never.
            delay = _POLL if next_due is None else min(_POLL, max(_COALESCE, next_due - time.time()))
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wake.wait(), delay)

    def _due(self, next_attempt_at: float) -> bool:
        """Due now, or set further ahead than any wait this worker sets: the wall clock
        stepped back since (by an hour, say), and waiting that out would stall the
        conversation for as long for nothing."""
        now = time.time()
        return next_attempt_at <= now or next_attempt_at > now + self._longest_wait

    def _finished(self, conversation_id: str, task: asyncio.Task[None]) -> None:
        # Only its own entry: a successor may already run for this conversation.
        if self._in_flight.get(conversation_id) is task:
            del self._in_flight[conversation_id]

    async def _run_conversation(self, head: Delivery, read_at: int) -> None:
        """Deliver one conversation's queued replies in order while they are due.

        This task is the only one delivering the conversation (``_in_flight``),
        so the queued replies read as a page stay what the store holds until
        this task itself records their outcome.
        """
        conversation_id = head.reply.conversation_id
        queue = collections.deque([head])
        try:
            while queue and not self._draining:
                delivery = queue[0]
                if not self._due(delivery.next_attempt_at):
                    break
                async with self._slots:
                    # Checked with the slot in hand, right before the POST: a replay
                    # while this task waited for a slot is seen too.
                    if conversation_id in self._held:
                        break  # the replay's release wakes the scheduler, which starts over
                    if self._stale(conversation_id, read_at):
                        read_at = self._epoch
                        queue = collections.deque(await self._store.queued_deliveries(conversation_id, _PAGE))
                        continue
                    delivered = await self._attempt(delivery)
                if not delivered:
                    break
                queue.popleft()
                if not queue:
                    read_at = self._epoch
                    queue.extend(await self._store.queued_deliveries(conversation_id, _PAGE))
        except Exception as e:  # noqa: BLE001 - the outbox still holds the reply: pause, then start over
            # Paused while still in flight, so the scheduler does not restart this
            # conversation at once and POST the same reply in a tight loop.
            self._metrics.store_errors.labels("delivery").inc()
            log.error(
                "a webhook delivery step failed in the store; will retry",
                extra={"conversation_id": conversation_id, "error": describe_error(e)},
            )
            await asyncio.sleep(_STORE_PAUSE)
        finally:
            # Leave the in-flight set before waking the scheduler: it runs before this
            # task's done callbacks, and would otherwise see the conversation as busy,
            # skip its due head and sleep with nothing left to wake it.
            if self._in_flight.get(conversation_id) is asyncio.current_task():
                del self._in_flight[conversation_id]
            self._wake.set()  # the scheduler re-reads the outbox for this conversation's next step

    # --- one attempt ---------------------------------------------------------------

    async def _attempt(self, delivery: Delivery) -> bool:
        """POST one reply and record the result; True when it left the outbox (delivered or dead)."""
        reply = delivery.reply
        first = delivery.first_attempt_at or time.time()
        attempts = delivery.attempts + 1
        outcome = await self._post(delivery)
        # Waits count from the answer: a receiver that took 9 s to answer "Retry-After: 5"
        # asked for 5 s from then, and a timed-out attempt still owes its backoff.
        now = time.time()
        self._attempts[outcome.kind].inc()
        if outcome.kind == "ok":
            await self._store.delivery_succeeded(reply.conversation_id, reply.sequence)
            return True
        give_up = (
            outcome.kind == "rejected"
            or attempts >= self._config.webhook_max_attempts
            or now - first >= self._config.webhook_max_age
        )
        if give_up:
            await self._store.delivery_dead(
                reply.conversation_id, reply.sequence, attempts=attempts, error=outcome.error, now=now
            )
            self._metrics.dead_letters.labels("reply").inc()
            log.error(  # like a dead-lettered message: an operator has to replay or purge it
                "reply dead-lettered",
                extra={"conversation_id": reply.conversation_id, "sequence": reply.sequence,
                       "attempts": attempts, "error": outcome.error},
            )  # fmt: skip
            return True
        delay = full_jitter(attempts, self._config.webhook_backoff_initial, self._config.webhook_backoff_max)
        if outcome.retry_after is not None:
            # The receiver's word, capped; but never sooner than our first backoff step:
            # "Retry-After: 0" on every answer would otherwise be a retry loop as fast as
            # the receiver answers, until the attempts run out.
            delay = max(
                self._config.webhook_backoff_initial, min(outcome.retry_after, self._config.webhook_retry_after_max)
            )
        await self._store.delivery_failed(
            reply.conversation_id, reply.sequence,
            attempts=attempts, first_attempt_at=first, next_attempt_at=now + delay, error=outcome.error,
        )  # fmt: skip
        if failures := self._failing_log.due():
            # Each retry is an INFO line; a receiver that is down deserves a WARNING before
            # its replies start to be dead-lettered: one per 10 s while attempts fail.
            log.warning("webhook attempts failing; retrying", extra={"error": outcome.error, "failures": failures})
        log.info(
            "webhook attempt failed; will retry",
            extra={"conversation_id": reply.conversation_id, "sequence": reply.sequence,
                   "attempt": attempts, "error": outcome.error, "retry_in": round(delay, 3)},
        )  # fmt: skip
        return False

    def headers(self, msg_id: str, body: bytes) -> dict[str, str]:
        """Content type, the static Authorization, and the Standard Webhooks signature
        of ``body`` under ``msg_id`` when secrets are set."""
        headers = {"Content-Type": "application/json"}
        if self._config.response_authorization:
            headers["Authorization"] = self._config.response_authorization
        if self._signers:
            now = datetime.now(UTC)
            text = body.decode()
            headers["webhook-id"] = msg_id
            headers["webhook-timestamp"] = str(int(now.timestamp()))
            headers["webhook-signature"] = " ".join(s.sign(msg_id, now, text) for s in self._signers)
        return headers

    async def _post(self, delivery: Delivery) -> Outcome:
        assert self._session is not None
        body = orjson.dumps(delivery.reply.webhook_body())
        started = time.perf_counter()
        try:
            async with self._session.post(
                self._config.response_url, data=body,
                # A reply's webhook-id is the same for every retry and replay: receivers deduplicate on it.
                headers=self.headers(delivery.reply.webhook_id, body),
                allow_redirects=False,
            ) as resp:  # fmt: skip
                await read_at_most(resp, _MAX_ANSWER)
                status = resp.status
                retry_after = parse_retry_after(resp.headers.get("Retry-After"), time.time())
        except TimeoutError:
            return Outcome("timeout", f"timeout after {self._config.webhook_timeout:g}s")
        except aiohttp.ClientConnectorCertificateError:
            return Outcome("error", "the TLS certificate was not accepted")
        except aiohttp.ClientSSLError:
            return Outcome("error", "the TLS handshake failed")
        except aiohttp.ClientConnectorError:
            return Outcome("error", "connection refused or unreachable")
        except aiohttp.ClientError as e:
            return Outcome("error", f"connection error ({type(e).__name__})")
        except Exception as e:  # noqa: BLE001 - whatever else the client raises is this attempt's failure
            return Outcome("error", f"the request failed ({type(e).__name__})")
        finally:
            self._metrics.webhook_latency.observe(time.perf_counter() - started)
        if 200 <= status < 300:
            return Outcome("ok")
        if status in _RETRYABLE or status >= 500:
            return Outcome("retry", f"HTTP {status}", retry_after)
        return Outcome("rejected", f"HTTP {status}")

    async def check_response_url(self) -> str:
        """The hosted integration's install check: POST {"type":"test","payload":"test"}, expect 200."""
        assert self._session is not None
        body = orjson.dumps(INSTALL_CHECK)
        try:
            async with self._session.post(
                self._config.response_url,
                data=body,
                # Signed like a reply (a receiver may verify every request), under an id of its own.
                headers=self.headers(f"check-{uuid.uuid4()}", body),
                timeout=aiohttp.ClientTimeout(total=self._config.webhook_timeout),
                allow_redirects=False,
            ) as resp:
                await read_at_most(resp, _MAX_ANSWER)
                return "ok" if resp.status == 200 else f"answered HTTP {resp.status}"
        except TimeoutError:
            return "timed out"
        except aiohttp.ClientError:
            return "unreachable"
        except Exception as e:  # noqa: BLE001 - reported, never fatal (SPEC section 3)
            return f"failed ({type(e).__name__})"
