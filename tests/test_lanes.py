"""Lanes under pressure: a backlog after a restart, a replay larger than the queue, a bot
timing out while what it emitted commits. Real stores, real sockets."""

from __future__ import annotations

import asyncio
import contextlib
import socket
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from sidecar.app import App
from sidecar.bots.base import Bot, BotError, BotReply, Emit
from sidecar.config import ConfigError
from sidecar.errors import Unavailable
from sidecar.models import AcceptResult, InboundMessage, StoredMessage, queued_size
from sidecar.store.sqlite import SqliteStore
from sidecar.validate import message_from_fields
from tests.bot_server import BotServer
from tests.conftest import Running, StartApp, admin_metrics, eventually, make_config, message, metric
from tests.receiver import Receiver
from tests.test_store_redis import prefixed_url  # noqa: F401 - a fixture
from tests.test_streams import read_n, subscribe
from tests.test_webhook_delivery import dead_letters

ADMIN = "admin-token"


def slow_rules(tmp_path: Path, delay: float) -> str:
    rules = tmp_path / "slow.yaml"
    rules.write_text(
        f"rules:\n  - match: {{}}\n    replies: [{{type: text, payload: {{text: '{{text}}'}}, delay: {delay}}}]\n"
    )
    return str(rules)


async def stored_before_a_restart(tmp_path: Path, count: int) -> Path:
    """A SQLite file holding ``count`` messages of c1 accepted and never handled (m1, m2, …)."""
    path = tmp_path / "sidecar.db"
    store = SqliteStore(str(path))
    await store.open()
    for i in range(1, count + 1):
        await store.accept(InboundMessage("u", f"m{i}", "c1", "text", f"m{i}", {"text": f"m{i}"}), now=1.0)
    await store.close()
    return path


def lose_answers(monkeypatch: pytest.MonkeyPatch, store: Any, method: str, times: int) -> list[int]:
    """The store runs the step, then the answer is lost ``times`` times, as a Redis
    connection dropping on the way back does: the step landed but the caller hears 503."""
    real = getattr(store, method)
    left = [1] * times

    async def answer_lost(*args: Any, **kwargs: Any) -> Any:
        result = await real(*args, **kwargs)
        if left:
            left.pop()
            raise Unavailable("the store is unreachable; try again")
        return result

    monkeypatch.setattr(store, method, answer_lost)
    return left


async def test_a_backlog_after_a_restart_runs_in_order_and_new_messages_wait_their_turn(
    start_app: StartApp, tmp_path: Path
) -> None:
    path = await stored_before_a_restart(tmp_path, 5)
    s = await start_app(
        store=f"sqlite:///{path}", max_pending_messages=2, bot="script", bot_script=slow_rules(tmp_path, 0.1)
    )
    # Two of five are loaded; the store holds three more: a newer message must not overtake them.
    early = await s.post(message("c1", "m6", "m6"))
    assert early.status == 429 and early.headers["Retry-After"] == "1"
    assert await metric(s, "sidecar_pending_backlog") == 1.0  # why the 429s: it says so

    await _newest_taken_once_loaded_then_all_in_order(s, 6)
    assert await metric(s, "sidecar_pending_backlog") == 0.0


async def _newest_taken_once_loaded_then_all_in_order(s: Running, newest: int) -> None:
    """m<newest> is taken once the backlog before it is loaded; then every reply of c1
    arrives in the order of m1..m<newest>, and nothing is left pending."""

    async def taken() -> bool:
        return (await s.post(message("c1", f"m{newest}", f"m{newest}"))).status == 200

    await eventually(taken, what=f"the backlog loaded, so that m{newest} is taken")
    replies = await read_n(subscribe(s, "c1", after=0), newest)
    assert [r.in_reply_to for r in replies] == [f"m{i}" for i in range(1, newest + 1)]
    assert s.app.core.pending == 0 and not await s.app.store.pending_messages(10)


async def test_the_queue_is_bounded_by_bytes_too_at_ingress_and_when_loading(
    start_app: StartApp, tmp_path: Path
) -> None:
    """max_pending_bytes: large messages waiting for the bot fill the queue before its count
    does. New ones get 429; a load (a restart's) takes what fits and leaves the rest as a
    backlog, run in order as the queue drains."""
    path = await stored_before_a_restart(tmp_path, 4)
    s = await start_app(
        store=f"sqlite:///{path}", max_pending_bytes=1, bot="script", bot_script=slow_rules(tmp_path, 0.1)
    )
    assert s.app.core.pending == 1  # one of four loaded: it alone is over the budget
    assert (await s.post(message("c1", "m5", "m5"))).status == 429
    assert await metric(s, "sidecar_pending_backlog") == 1.0

    await _newest_taken_once_loaded_then_all_in_order(s, 5)


async def test_large_messages_fill_the_queue_by_bytes_before_its_count(start_app: StartApp, tmp_path: Path) -> None:
    s = await start_app(max_pending_bytes=25_000, bot="script", bot_script=slow_rules(tmp_path, 20))
    big = {"text": "x" * 10_000}
    statuses = [(await s.post(message("c1", f"m{i}", "t", payload=big))).status for i in range(4)]
    assert statuses == [200, 200, 200, 429]  # the third goes over: each is checked before it is added
    assert s.app.core.pending == 3 and await metric(s, "sidecar_pending_bytes") > 30_000
    small = await s.post(message("c2", "s1", "t"))
    assert small.status == 429 and small.headers["Retry-After"] == "1"
    again = await s.post(message("c1", "m0", "t", payload=big))
    assert again.status == 200 and (await again.json())["duplicate"] is True


class _GatedBot(Bot):
    """Records the messages it is given, and holds those named in ``hold`` (all when None)
    until ``gate`` is set; ``fail_once``: that message fails for good the first time."""

    name = "gated"

    def __init__(self, hold: set[str] | None = None, fail_once: str = "") -> None:
        self.calls: list[str] = []
        self.gate = asyncio.Event()
        self._hold = hold
        self._fail_once = fail_once

    async def handle(self, message: StoredMessage, emit: Emit) -> list[BotReply]:
        mid = message.message.message_id
        self.calls.append(mid)
        if mid == self._fail_once and self.calls.count(mid) == 1:
            raise BotError("not now", retryable=False)
        if self._hold is None or mid in self._hold:
            await self.gate.wait()
        return [BotReply(type="text", payload={"text": mid})]


async def test_a_replayed_message_keeps_its_place_though_the_queue_is_full_by_bytes(
    start_app: StartApp, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Replayed, m0 is older than m1 and m2 in its lane: over the byte bound or not, it runs
    before m2 (as after a restart), not once the queue has room (after m2)."""
    size = queued_size(message_from_fields(message("c1", "m1"), max_id_length=256, max_payload_depth=32))
    s = await start_app(admin_tokens=("admin",), max_pending_bytes=2 * size)
    bot = _GatedBot(hold={"m1"}, fail_once="m0")
    monkeypatch.setattr(s.app.core, "_bot", bot)
    assert (await s.post(message("c1", "m0"))).status == 200
    await dead_letters(s, 1)
    assert (await s.post(message("c1", "m1"))).status == 200
    await eventually(lambda: bot.calls[-1:] == ["m1"], what="m1 running")
    assert (await s.post(message("c1", "m2"))).status == 200
    assert (await s.post(message("c1", "m3"))).status == 429  # full by bytes: m1 and m2
    async with s.session.post(
        s.admin + "/v1/dead-letters/replay", json={"all": True}, headers={"Authorization": "Bearer admin"}
    ) as resp:
        assert await resp.json() == {"replayed": 1}
    bot.gate.set()
    await eventually(lambda: len(bot.calls) == 4, what="all run")
    assert bot.calls == ["m0", "m1", "m0", "m2"]


async def test_the_byte_bound_counts_every_field_type_included(start_app: StartApp, tmp_path: Path) -> None:
    s = await start_app(max_pending_bytes=100_000, bot="script", bot_script=slow_rules(tmp_path, 20))
    statuses = [(await s.post(message("c1", f"m{i}", "t", type="x" * 60_000))).status for i in range(3)]
    assert statuses == [200, 200, 429]


async def _m1_held_at_the_bot(start_app: StartApp, monkeypatch: pytest.MonkeyPatch) -> tuple[Running, _GatedBot]:
    """A sidecar (memory store) whose bot holds m1 of c1 until ``bot.gate`` is set."""
    s = await start_app(store="memory://")
    bot = _GatedBot()
    monkeypatch.setattr(s.app.core, "_bot", bot)
    assert (await s.post(message("c1", "m1"))).status == 200
    await eventually(lambda: bot.calls == ["m1"], what="m1 at the bot")
    return s, bot


async def test_a_load_whose_read_predates_a_lanes_last_step_does_not_run_that_message_again(
    start_app: StartApp, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A store that answers over the network (Redis) can answer a read of the pending
    messages with one a lane finishes before the answer arrives: it is not queued again."""
    s, bot = await _m1_held_at_the_bot(start_app, monkeypatch)
    answered, deliver = asyncio.Event(), asyncio.Event()
    read = s.app.store.pending_page

    async def slow_read(limit: int, max_bytes: int) -> tuple[list[StoredMessage], bool]:
        pending = await read(limit, max_bytes)  # m1, still pending
        answered.set()
        await deliver.wait()  # the answer on its way while m1 finishes
        return pending

    monkeypatch.setattr(s.app.store, "pending_page", slow_read)
    load = asyncio.create_task(s.app.core.load_replayed())
    await answered.wait()
    bot.gate.set()
    await eventually(lambda: s.app.core.pending == 0, what="m1 handled")
    deliver.set()
    await load
    await asyncio.sleep(0.05)
    assert bot.calls == ["m1"] and s.app.core.pending == 0


async def test_two_loads_at_once_each_keep_track_of_what_lanes_finish(
    start_app: StartApp, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A replay's load can overlap another load (a refill, a second replay): each keeps its
    own record of what lanes finish while it reads, whichever read is answered first."""
    s, bot = await _m1_held_at_the_bot(start_app, monkeypatch)
    core = s.app.core
    read = s.app.store.pending_page
    answers: list[asyncio.Event] = []

    async def slow_read(limit: int, max_bytes: int) -> tuple[list[StoredMessage], bool]:
        pending = await read(limit, max_bytes)  # m1, still pending
        answers.append(answer := asyncio.Event())
        await answer.wait()
        return pending

    monkeypatch.setattr(s.app.store, "pending_page", slow_read)
    first = asyncio.create_task(core.load_replayed())
    await eventually(lambda: len(answers) == 1, what="the first load reading")
    second = asyncio.create_task(core.load_replayed())
    await eventually(lambda: len(answers) == 2, what="the second load reading")
    answers[1].set()  # the second is answered first
    await second
    bot.gate.set()
    await eventually(lambda: core.pending == 0, what="m1 handled")
    answers[0].set()
    await first
    await asyncio.sleep(0.05)
    assert bot.calls == ["m1"] and core.pending == 0 and not core._backlog
    assert core._loads == []


async def test_a_duplicates_answer_older_than_the_lanes_last_step_does_not_run_the_message_again(
    start_app: StartApp, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A retry of a message at the bot, answered "duplicate, pending" by a store whose
    answers can arrive out of order (Redis, a pool of connections), after the lane has
    finished it: loaded from the store, not queued from the answer."""
    s, bot = await _m1_held_at_the_bot(start_app, monkeypatch)
    core = s.app.core
    accept = s.app.store.accept
    answered, deliver = asyncio.Event(), asyncio.Event()

    async def slow_accept(m: InboundMessage, *, now: float) -> AcceptResult:
        result = await accept(m, now=now)  # a duplicate, still pending
        answered.set()
        await deliver.wait()  # the answer on its way while the lane finishes m1
        return result

    monkeypatch.setattr(s.app.store, "accept", slow_accept)
    retry = asyncio.create_task(s.post(message("c1", "m1")))
    await answered.wait()
    bot.gate.set()
    await eventually(lambda: core.pending == 0, what="m1 handled")
    deliver.set()
    assert (await retry).status == 200
    await eventually(lambda: not core._backlog, what="the load done")
    await asyncio.sleep(0.05)
    assert bot.calls == ["m1"] and core.pending == 0


async def test_a_load_reads_a_bounded_page_however_many_large_messages_wait(
    start_app: StartApp, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A load read max_pending_messages + 1 bodies whatever the byte bound (on Redis, 1,500
    messages of 1 MB timed out in one answer, so the backlog never loaded): it reads about
    twice the bound now, and the rest as the queue drains, in order."""
    path = tmp_path / "sidecar.db"
    store = SqliteStore(str(path))
    await store.open()
    for i in range(40):
        await store.accept(InboundMessage("u", f"m{i:02}", "c1", "text", "t", {"text": "x" * 100_000}), now=1.0)
    await store.close()
    reads: list[int] = []
    real = SqliteStore.pending_page

    async def counted(self: SqliteStore, limit: int, max_bytes: int) -> tuple[list[StoredMessage], bool]:
        page = await real(self, limit, max_bytes)
        reads.append(len(page[0]))
        return page

    monkeypatch.setattr(SqliteStore, "pending_page", counted)
    s = await start_app(
        store=f"sqlite:///{path}", max_pending_bytes=250_000, bot="script", bot_script=slow_rules(tmp_path, 0.01)
    )
    replies = await read_n(subscribe(s, "c1", after=0), 40)
    assert [r.in_reply_to for r in replies] == [f"m{i:02}" for i in range(40)]
    assert max(reads) <= 6, reads  # 500 KB of 100-KB messages, and the first past it never
    await eventually(lambda: not s.app.core._backlog, what="the backlog loaded")


async def test_replaying_more_dead_messages_than_the_queue_holds_runs_them_all(start_app: StartApp) -> None:
    accepting = False

    async def bot(body: Any) -> tuple[int, Any]:
        return (200, [{"type": "text", "payload": {"text": "ok"}}]) if accepting else (422, {"error": "no"})

    async with BotServer(bot) as server:
        s = await start_app(bot="http", bot_url=server.url, max_pending_messages=2, admin_tokens=(ADMIN,))
        for i, conversation in enumerate(("a", "b", "c", "d", "e")):
            assert (await s.post(message(conversation, "m"))).status == 200
            await dead_letters(s, i + 1)  # one at a time: the queue holds two
        accepting = True
        async with (
            aiohttp.ClientSession() as session,
            session.post(
                s.admin + "/v1/dead-letters/replay", json={"all": True}, headers={"Authorization": f"Bearer {ADMIN}"}
            ) as resp,
        ):
            assert await resp.json() == {"replayed": 5}

        async def all_answered() -> bool:
            return all([await s.app.store.last_sequence(c) == 1 for c in ("a", "b", "c", "d", "e")])

        await eventually(all_answered, what="every replayed message answered")
    assert not await s.app.store.pending_messages(10) and s.app.core.pending == 0


class EmitsThenHangs(Bot):
    """Emits "early" at once, then waits past any bot timeout, every time."""

    name = "emits-then-hangs"

    async def handle(self, message: StoredMessage, emit: Emit) -> list[BotReply]:
        await emit(BotReply(type="text", payload={"text": "early"}))
        await asyncio.sleep(5)
        return [BotReply(type="text", payload={"text": "never"})]


async def test_a_reply_emitted_before_the_bot_times_out_still_goes_live(
    start_app: StartApp, monkeypatch: pytest.MonkeyPatch
) -> None:
    async with Receiver() as r:
        s = await start_app(bot_timeout=0.1, bot_max_attempts=2, response_url=r.url)
        monkeypatch.setattr(s.app.core, "_bot", EmitsThenHangs())  # no real bot can be set up to time out
        original = s.app.store.append_replies

        async def slow_commit(*args: Any, **kwargs: Any) -> Any:
            stored = await original(*args, **kwargs)
            await asyncio.sleep(0.3)  # a slow fsync: the bot's timeout fires while the append is in flight
            return stored

        s.app.store.append_replies = slow_commit  # type: ignore[method-assign]
        live = subscribe(s, "c1")  # live only: it sees the reply only if it is published
        await live.wait_for_connection()
        await asyncio.sleep(0.2)
        assert (await s.post(message("c1", "m1"))).status == 200
        (reply,) = await read_n(live, 1)
        live.cancel()
        await r.wait_for(1, conversation_id="c1")
    assert reply.payload.struct_value["text"] == "early"
    assert [b["payload"]["text"] for b in r.delivered("c1")] == ["early"]


@pytest.mark.parametrize("store", ["sqlite", "memory", "redis"])
async def test_a_send_cancelled_mid_accept_still_gets_its_message_handled(
    start_app: StartApp,
    store: str,
    prefixed_url: str,  # noqa: F811 - the fixture imported above
) -> None:
    """A gRPC deadline cancels the handler while the store commits the message: it must
    not sit stored and unqueued (a retry would answer 200 duplicate) until a restart."""
    urls = {"memory": "memory://", "redis": prefixed_url}
    s = await start_app(**({"store": urls[store]} if store in urls else {}))
    core = s.app.core
    if store == "memory":  # its accept never suspends: make it, after storing, as a networked one would
        real = s.app.store.accept

        async def stored_then_waits(message: InboundMessage, *, now: float) -> Any:
            result = await real(message, now=now)
            await asyncio.sleep(0.05)
            return result

        s.app.store.accept = stored_then_waits  # type: ignore[method-assign]
    inbound = InboundMessage("u", "m1", "c1", "text", "hello", {"text": "hello"})
    task = asyncio.create_task(core.send(inbound))
    await asyncio.sleep(0)  # inside the store's accept, waiting for its commit
    task.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await task

    async def answered() -> bool:
        return await s.app.store.last_sequence("c1") == 1

    await eventually(answered, what="the echo reply of the cancelled send")
    again = await core.send(inbound)  # the client's retry
    assert again.duplicate and not again.pending
    await asyncio.sleep(0.2)
    assert await s.app.store.last_sequence("c1") == 1 and core.pending == 0  # handled once


async def test_a_backlog_load_that_fails_is_tried_again_even_with_nothing_left_to_finish(
    start_app: StartApp, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = await stored_before_a_restart(tmp_path, 5)
    s = await start_app(
        store=f"sqlite:///{path}", max_pending_messages=2, bot_backoff_initial=0.05,
        bot="script", bot_script=slow_rules(tmp_path, 0.2),
    )  # fmt: skip
    # While the two loaded messages are with the bot, the store starts failing the next
    # two loads: the one asked as the last of them finishes, and the first retry.
    real = s.app.store.pending_page
    failures = [RuntimeError("store outage"), RuntimeError("store outage")]

    async def flaky(limit: int, max_bytes: int) -> Any:
        if failures:
            raise failures.pop()
        return await real(limit, max_bytes)

    monkeypatch.setattr(s.app.store, "pending_page", flaky)

    async def taken() -> bool:
        return (await s.post(message("c1", "m6", "m6"))).status == 200

    await eventually(taken, what="the backlog loaded after the outage, so that m6 is taken")
    replies = await read_n(subscribe(s, "c1", after=0), 6)
    assert [r.in_reply_to for r in replies] == [f"m{i}" for i in range(1, 7)]
    assert not failures and s.app.core.pending == 0


async def test_replies_a_store_stored_but_answered_as_failed_still_go_live(
    start_app: StartApp, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Redis may run an append and lose its answer: the caller hears Unavailable, but the
    replies are in the log and the outbox. Subscribers and the webhook worker are told to
    look, rather than wait for the conversation's next reply (which may never come)."""
    async with Receiver() as r:
        s = await start_app(response_url=r.url, callback_tokens=("cb",))
        assert (await s.post(message("c1", "m1", "hi"))).status == 200
        await r.wait_for(1)
        stream = subscribe(s, "c1")
        await eventually(lambda: len(s.app.core.broker) == 1, what="subscribed")
        real = s.app.store.append_replies

        async def answer_lost(*args: Any, **kwargs: Any) -> Any:
            await real(*args, **kwargs)
            raise Unavailable("the store is unreachable; try again")

        monkeypatch.setattr(s.app.store, "append_replies", answer_lost)
        reply = {"type": "text", "payload": {"text": "late"}, "conversationId": "c1", "botpressMessageId": "b1"}
        assert (await s.post(reply, token="cb", path="/bot/replies")).status == 503
        got = await read_n(stream, 1, timeout=3)  # at once, not at some later reply
        assert [(g.sequence, g.bot_message_id) for g in got] == [(2, "b1")]
        await r.wait_for(2)
    assert [x["payload"] for x in r.delivered("c1")] == [{"text": "hi"}, {"text": "late"}]


async def test_a_finish_that_landed_but_was_answered_as_failed_does_not_run_the_bot_again(
    start_app: StartApp, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Redis may run the step that marks a message handled and lose the answer. The lane's
    retry asks the store first: handled, so the bot (and its side effects) is not run again."""
    s = await start_app(bot_backoff_initial=0.01, bot_backoff_max=0.02)
    lost = lose_answers(monkeypatch, s.app.store, "finish_message", 1)
    assert (await s.post(message("c1", "m1", "once"))).status == 200
    await eventually(lambda: s.app.core.pending == 0 and not lost, what="the message off the lane")
    await asyncio.sleep(0.1)
    metrics = await admin_metrics(s)
    assert 'sidecar_bot_calls_total{bot="echo",outcome="ok"} 1.0' in metrics  # not 2
    assert await s.app.store.last_sequence("c1") == 1


async def test_a_store_failing_under_a_bots_emit_is_a_store_failure_not_a_bot_attempt(
    start_app: StartApp, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A reply the bot emits early is stored at once; when that store step fails, the bot
    did nothing wrong. Three blips with two bot attempts allowed must not dead-letter the
    message: the lane retries it as a store failure, and each reply is stored once."""
    rules = tmp_path / "two.yaml"
    rules.write_text(
        "rules:\n  - match: {}\n    replies: [{type: text, payload: {text: first}},"
        " {type: text, payload: {text: second}, delay: 0.05}]\n"
    )
    s = await start_app(
        bot="script", bot_script=str(rules), bot_max_attempts=2, bot_backoff_initial=0.01, bot_backoff_max=0.02
    )
    real = s.app.store.append_replies
    blips = [1, 2, 3]

    async def blipping(*args: Any, **kwargs: Any) -> Any:
        if blips:
            blips.pop()
            raise Unavailable("the store is unreachable; try again")
        return await real(*args, **kwargs)

    monkeypatch.setattr(s.app.store, "append_replies", blipping)
    assert (await s.post(message("c1", "m1", "hi"))).status == 200
    replies = await read_n(subscribe(s, "c1", after=0), 2)
    assert [(r.sequence, r.payload.struct_value["text"]) for r in replies] == [(1, "first"), (2, "second")]
    await eventually(lambda: s.app.core.pending == 0, what="the message off the lane")
    metrics = await admin_metrics(s)
    assert 'sidecar_store_errors_total{stage="message"} 3.0' in metrics
    assert 'sidecar_bot_calls_total{bot="script",outcome="error"}' not in metrics
    assert await s.app.store.list_dead_letters() == []


async def test_a_failed_start_stops_the_lanes_it_began_before_closing_the_store(tmp_path: Path) -> None:
    """The store opens and recovered messages start running before the ports are bound:
    when a bind fails, stop() must end those lanes first, not leave them running against
    a closed store. The message stays pending for the next start."""
    path = await stored_before_a_restart(tmp_path, 1)
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        config = make_config(
            tmp_path, store=f"sqlite:///{path}", bot="script", bot_script=slow_rules(tmp_path, 5.0),
            http_addr=f"127.0.0.1:{taken.getsockname()[1]}",
        )  # fmt: skip
        app = App(config)
        with pytest.raises(ConfigError, match="cannot listen"):
            await app.start()
        assert app.core.pending == 1  # m1 is running in its lane, waiting in the bot
        await app.stop()
    assert all(task.done() for task in asyncio.all_tasks() if task is not asyncio.current_task())
    store = SqliteStore(str(path))
    await store.open()
    try:
        assert [s.message.message_id for s in await store.pending_messages(10)] == ["m1"]
    finally:
        await store.close()


async def test_an_accept_whose_answer_was_lost_is_handled_though_the_client_gives_up(
    start_app: StartApp,
    prefixed_url: str,  # noqa: F811 - the fixture imported above
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    s = await start_app(store=prefixed_url)
    lose_answers(monkeypatch, s.app.store, "accept", 1)
    assert (await s.post(message("c1", "m1", "lost"))).status == 503  # and the client never retries

    async def handled() -> bool:
        return await s.app.store.last_sequence("c1") == 1

    await eventually(handled, what="m1 handled without a restart")
    assert (await s.post(message("c1", "m2", "next"))).status == 200
    replies = await read_n(subscribe(s, "c1", after=0), 2)
    assert [r.in_reply_to for r in replies] == ["m1", "m2"]


async def test_a_retry_answered_as_a_duplicate_while_the_queue_is_full_still_gets_handled(
    start_app: StartApp,
    prefixed_url: str,  # noqa: F811 - the fixture imported above
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Found by a kill -9 / lost-answer soak: the client's retry of a message whose
    accept answer was lost met a full queue, was told "200 duplicate", and the message
    was never queued until a restart."""
    s = await start_app(store=prefixed_url, max_pending_messages=2, bot="script", bot_script=slow_rules(tmp_path, 2))
    assert (await s.post(message("c1", "m1", "m1"))).status == 200  # holds a lane for 2 s
    left = lose_answers(monkeypatch, s.app.store, "accept", 1)
    assert (await s.post(message("c2", "m2", "m2"))).status == 503
    assert not left

    async def accepted(conversation: str, message_id: str) -> bool:
        return (await s.post(message(conversation, message_id, message_id))).status == 200

    await eventually(lambda: accepted("c3", "m3"), what="m3 accepted")  # the queue is full now
    retry = await s.post(message("c2", "m2", "m2"))
    assert retry.status == 200 and (await retry.json())["duplicate"] is True

    async def all_handled() -> bool:
        return [await s.app.store.last_sequence(c) for c in ("c1", "c2", "c3")] == [1, 1, 1]

    await eventually(all_handled, 15, "m1, m2 and m3 handled without a restart")


async def test_an_outage_that_fails_every_accept_keeps_one_reload_waiting_not_one_per_request(
    start_app: StartApp, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """On a store whose failed steps may land, each failed accept asks for a reload of
    pending messages. During an outage those asks must join one waiting retry, not
    start a retry chain (a task and an ERROR per backoff step) per request."""
    s = await start_app(bot_backoff_initial=0.2, bot_backoff_max=0.2)
    store = s.app.store
    monkeypatch.setattr(store, "failed_steps_may_land", True)
    down = [True]
    real_accept, real_pending = store.accept, store.pending_page

    async def accept(*args: Any, **kwargs: Any) -> Any:
        if down:
            raise Unavailable("the store is unreachable; try again")
        return await real_accept(*args, **kwargs)

    async def pending_page(*args: Any, **kwargs: Any) -> Any:
        if down:
            await asyncio.sleep(0.05)  # a real store takes a while to fail: asks arrive meanwhile
            raise Unavailable("the store is unreachable; try again")
        return await real_pending(*args, **kwargs)

    monkeypatch.setattr(store, "accept", accept)
    monkeypatch.setattr(store, "pending_page", pending_page)
    for _ in range(5):  # bursts of concurrent sends, each past the backlog check before any fails
        answers = await asyncio.gather(*(s.post(message(f"c{i}", f"m{i}", "x")) for i in range(40)))
        assert {a.status for a in answers} <= {503, 429}
        await asyncio.sleep(0.02)
    caplog.clear()
    await asyncio.sleep(1.0)  # one retry waiting, full jitter up to 0.2 s: about ten attempts
    failed_loads = [r for r in caplog.records if r.getMessage() == "loading pending messages failed; will retry"]
    assert len(failed_loads) <= 25  # not ten per request that asked
    assert len(s.app.core._tasks) <= 3  # the sweep, and at most one reload waiting
    down.clear()

    async def taken() -> bool:
        return (await s.post(message("c1", "after", "x"))).status == 200

    await eventually(taken, what="a message accepted once the store is back")


async def test_a_reload_asked_for_during_a_load_is_not_cleared_by_that_load(
    start_app: StartApp, monkeypatch: pytest.MonkeyPatch
) -> None:
    """An accept whose answer may be lost asks for a reload while another load (a dead
    letter's replay) is reading: that read may predate the message, so it must not clear
    the backlog the ask set, or the reload it scheduled finds nothing to do."""
    s = await start_app()
    core, store = s.app.core, s.app.store
    real = store.pending_page
    asked = False

    async def racing(limit: int, max_bytes: int) -> Any:
        nonlocal asked
        result = await real(limit, max_bytes)
        if not asked:
            asked = True
            core._reload()  # as Core.send does after an accept failed on Redis
        return result

    monkeypatch.setattr(store, "pending_page", racing)
    await core._load_pending()
    assert core._backlog  # kept for the reload's own load
    await eventually(lambda: not core._backlog, what="the reload's load done")


async def test_a_drain_that_ends_in_time_warns_of_nothing(
    start_app: StartApp, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """Lanes stop after the message they run; the queued rest stays for the next start.
    That is a drain doing its job, not a timeout."""
    s = await start_app(bot="script", bot_script=slow_rules(tmp_path, 0.2))
    for i in range(6):
        assert (await s.post(message("c1", f"m{i}", f"t{i}"))).status == 200
    await s.app.drain(20)
    assert s.app.core.pending > 0  # left for the next start
    assert not [r for r in caplog.records if "drain timeout reached" in r.getMessage()]
