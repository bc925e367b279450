"""The Redis store end to end: a real sidecar on redis://, restarted on the same key prefix."""

from __future__ import annotations

import asyncio
import contextlib
import os
import shutil
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any, TypeVar

import aiohttp
import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from redis.asyncio import Redis
from redis.exceptions import MasterDownError, OutOfMemoryError, ReadOnlyError, ResponseError

from sidecar.config import redact_url
from sidecar.delivery.stream import Broker, ReplyStream
from sidecar.errors import CursorExpired, StoreRefused
from sidecar.models import AcceptResult, InboundMessage
from sidecar.store import redis as redis_store
from sidecar.store.redis import RedisStore, RedisStoreError, _refused
from tests.conftest import StartApp, eventually, message, metric
from tests.procs import free_port
from tests.test_grpc_ingress import request
from tests.test_store_contract import draft, open_redis_or_skip, redis_url
from tests.test_streams import read_n, subscribe


@pytest.fixture
async def own_redis(tmp_path: Path) -> AsyncIterator[str]:
    """A redis-server of this test's own, on a free port (for what must not touch the shared
    one: stopping it, refusing writes); its URL once it listens. Without the program: a
    skip on a laptop, a failure in CI (CI=true)."""
    if shutil.which("redis-server") is None:
        if os.environ.get("CI") == "true":
            pytest.fail("redis-server is required in CI but not on PATH")
        pytest.skip("redis-server not on PATH")
    port = free_port()
    server = await asyncio.create_subprocess_exec(
        *("redis-server", "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--dir", str(tmp_path)),
        stdout=asyncio.subprocess.DEVNULL,
    )
    url = f"redis://127.0.0.1:{port}/0"
    try:
        probe = RedisStore(url, exclusive=False)
        await eventually(lambda: _opens(probe), what="redis-server listening")
        await probe.close()
        yield url
    finally:
        if server.returncode is None:
            server.kill()
            await server.wait()


@pytest.fixture
async def prefixed_url() -> AsyncIterator[str]:
    """A REDIS_URL with a fresh key prefix (skip without Redis, fail in CI); its keys are deleted after."""
    url = redis_url(f"test-{uuid.uuid4().hex}:")
    store = RedisStore(url, exclusive=False)  # beside the sidecars the tests start on this prefix
    await open_redis_or_skip(store)
    try:
        yield url
    finally:
        await store.drop()
        await store.close()


async def test_messages_and_replies_survive_a_restart_on_the_same_prefix(
    start_app: StartApp, prefixed_url: str
) -> None:
    s = await start_app(store=prefixed_url)
    call = subscribe(s, after=0)
    resp = await s.post(message(text="ping"))
    assert resp.status == 200
    assert (await resp.json())["duplicate"] is False
    (reply,) = await read_n(call, 1)
    call.cancel()
    assert reply.sequence == 1 and reply.payload.struct_value.fields["text"].string_value == "ping"
    await s.app.drain(0.5)
    await s.app.stop()

    again = await start_app(store=prefixed_url)
    resp = await again.post(message(text="ping"))
    assert resp.status == 200
    assert (await resp.json())["duplicate"] is True
    call = subscribe(again, after=0)
    (replayed,) = await read_n(call, 1)
    call.cancel()
    assert replayed.sequence == 1 and replayed.payload.struct_value.fields["text"].string_value == "ping"
    assert await again.app.store.last_sequence("c1") == 1  # the duplicate ran no bot


async def test_an_unreachable_server_is_a_clear_error_without_the_password() -> None:
    store = RedisStore("redis://:hunter2@127.0.0.1:1/0?prefix=x:")
    with pytest.raises(RedisStoreError, match=r"SIDECAR_STORE.*cannot connect") as e:
        await store.open()
    assert "hunter2" not in str(e.value) and "***" in str(e.value)
    await store.close()
    assert redact_url("redis://user:pw@h:1/2") == "redis://user:***@h:1/2"


def _inbound(message_id: str) -> InboundMessage:
    return InboundMessage("u1", message_id, "c1", "text", "hi", {"text": "hi"})


async def test_scripts_called_together_share_one_pipeline_and_keep_their_own_answers(
    prefixed_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    store = RedisStore(prefixed_url)
    await store.open()
    pipelines: list[int] = []
    execute = store._execute

    async def counting(calls: list[Any]) -> list[Any]:
        pipelines.append(len(calls))
        return await execute(calls)

    monkeypatch.setattr(store, "_execute", counting)
    try:
        first, unknown, second = await asyncio.gather(
            store.accept(_inbound("m1"), now=1.0),
            store.dead_letter_message("no-such-message", "boom", now=1.0),
            store.accept(_inbound("m2"), now=1.0),
            return_exceptions=True,
        )
        # One pipeline carried all three (a second one only re-runs scripts that
        # another test's SCRIPT FLUSH made the server forget).
        assert pipelines[0] == 3
        assert isinstance(first, AcceptResult) and first.stored.message.message_id == "m1"
        assert isinstance(second, AcceptResult) and second.stored.message.message_id == "m2"
        assert isinstance(unknown, KeyError)  # one script's error is its caller's alone
        assert [m.message.message_id for m in await store.pending_messages(10)] == ["m1", "m2"]
    finally:
        await store.close()


async def test_scripts_flushed_from_the_server_are_loaded_again(prefixed_url: str) -> None:
    store = RedisStore(prefixed_url)
    await store.open()
    try:
        await store.accept(_inbound("m1"), now=1.0)
        # As after a restart of a Redis without persistence. Server-wide, but every
        # store (this test's and any other) loads again what the server forgot.
        await store._redis().script_flush()
        again, new = await asyncio.gather(store.accept(_inbound("m1"), now=2.0), store.accept(_inbound("m2"), now=2.0))
        assert again.duplicate and not new.duplicate
    finally:
        await store.close()


async def test_a_server_that_goes_away_fails_every_waiting_caller(own_redis: str) -> None:
    store = RedisStore(own_redis)
    await store.open()
    await store.accept(_inbound("m1"), now=1.0)
    await _shutdown(store)
    async with asyncio.timeout(10):  # none of them may wait forever
        results = await asyncio.gather(
            *(store.accept(_inbound(f"m{i}"), now=2.0) for i in range(2, 5)), return_exceptions=True
        )
    assert all(isinstance(r, Exception) for r in results)
    await store.close()


async def _shutdown(store: RedisStore) -> None:
    """Stop the server the store is on (SHUTDOWN NOSAVE: it answers by going away)."""
    with contextlib.suppress(Exception):
        await store._redis().shutdown(nosave=True)


async def test_close_answers_every_script_already_called(prefixed_url: str) -> None:
    store = RedisStore(prefixed_url)
    await store.open()
    calls = [asyncio.ensure_future(store.accept(_inbound(f"m{i}"), now=1.0)) for i in range(600)]
    await asyncio.sleep(0)  # called, not yet answered: more than one pipeline's worth
    await store.close()
    assert all(c.done() and not c.cancelled() and c.exception() is None for c in calls)


async def test_drop_takes_a_prefix_with_glob_characters_literally() -> None:
    tag = uuid.uuid4().hex
    ours, lookalike = f"t{tag}[*]?:", f"t{tag}x?:"
    store = RedisStore(redis_url(ours), exclusive=False)
    await open_redis_or_skip(store)
    client = store._redis()
    try:
        await client.set(ours + "a", 1)
        await client.set(lookalike + "a", 2)  # would match an unescaped "t<tag>[*]?:*"
        assert await store.drop() == 1
        assert await client.exists(ours + "a") == 0 and await client.get(lookalike + "a") == "2"
    finally:
        await client.delete(lookalike + "a")
        await store.close()


async def test_a_store_step_that_fails_mid_message_is_retried_and_the_conversation_goes_on(
    start_app: StartApp, prefixed_url: str, tmp_path: Path
) -> None:
    rules = tmp_path / "two.yaml"
    rules.write_text(
        "rules:\n  - match: {}\n    replies: [{type: text, payload: {text: first}},"
        " {type: text, payload: {text: second}, delay: 0.5}]\n"
    )
    admin = RedisStore(prefixed_url, exclusive=False)
    await admin.open()
    try:
        before = {c["id"] for c in await admin._redis().client_list()}
        s = await start_app(store=prefixed_url, bot="script", bot_script=str(rules))
        name = admin.client_name  # the sidecar's store has the same prefix, so the same name
        assert (await s.post(message(message_id="m1"))).status == 200

        async def first_reply_stored() -> bool:
            return await s.app.store.last_sequence("c1") == 1

        await eventually(first_reply_stored, what="the first reply")
        # While the bot waits before its second reply, cut every connection of the sidecar's
        # store: named for this prefix (nobody else's) and opened after it started (not this
        # test's own). The step that stores "second" and marks m1 handled fails.
        for client in await admin._redis().client_list():
            if client["name"] == name and client["id"] not in before:
                await admin._redis().client_kill_filter(_id=client["id"])

        async def failure_seen() -> bool:
            # At least one: a retry may meet another pooled connection killed above.
            return await metric(s, 'sidecar_store_errors_total{stage="message"}') >= 1

        await eventually(failure_seen, what="the failed store step")

        async def taken() -> bool:
            # As a client does on 503: another pooled connection killed above may still
            # be handed out once, and answers "the store is unreachable; try again".
            return (await s.post(message(message_id="m2"))).status == 200

        await eventually(taken, what="m2 accepted")
        replies = await read_n(subscribe(s, "c1", after=0), 4)
    finally:
        await admin.close()
    assert [(r.sequence, r.payload.struct_value["text"], r.in_reply_to) for r in replies] == [
        (1, "first", "m1"), (2, "second", "m1"), (3, "first", "m2"), (4, "second", "m2")
    ]  # fmt: skip
    assert s.app.core.pending == 0


async def test_a_second_store_on_the_same_prefix_is_refused_and_a_lapsed_lease_is_waited_out(
    prefixed_url: str,
) -> None:
    first = RedisStore(prefixed_url, lease_seconds=0.6)
    await first.open()
    try:
        await asyncio.sleep(0.8)  # past the lease: only renewals keep it
        second = RedisStore(prefixed_url, lease_seconds=0.6)
        with pytest.raises(RedisStoreError, match="in use by another sidecar") as refused:
            await second.open()
        assert "pid " in str(refused.value)
    finally:
        await first.close()
    # Closed: the lease is released at once. Left behind by a sidecar that died: it
    # expires, and the next one waits it out instead of failing.
    again = RedisStore(prefixed_url, lease_seconds=0.6)
    await again.open()
    lease = again._lease_task
    assert lease is not None
    lease.cancel()  # dies without releasing: no renewals, and close() will not delete it
    again._lease_task = None
    await again.close()
    after_crash = RedisStore(prefixed_url, lease_seconds=0.6)
    await after_crash.open()
    await after_crash.close()


async def test_a_sidecar_whose_lease_was_taken_is_fenced_until_it_is_free_again(
    start_app: StartApp, prefixed_url: str
) -> None:
    """A stalled or partitioned sidecar can lose its lease to another that starts meanwhile.
    Its store steps must then be refused (503, not ready), not run beside the new owner's
    on the same messages and outbox; once the other lets go, it takes the lease back."""
    s = await start_app(store=prefixed_url)
    assert (await s.post(message(message_id="m1"))).status == 200
    await eventually(lambda: s.app.core.pending == 0, what="m1 handled")
    admin = RedisStore(prefixed_url, exclusive=False)
    await admin.open()
    try:
        owner = admin.prefix + "owner"
        # What a second sidecar does once the first one's lease has lapsed: take it.
        await admin._redis().set(owner, "pid 1 on another-host (taken)")
        refused = await s.post(message(message_id="m2"))
        assert refused.status == 503 and (await refused.json())["error"]["code"] == "unavailable"
        ready = await s.session.get(f"http://127.0.0.1:{s.app.admin_port}/readyz")
        assert ready.status == 503
        assert await admin.pending_messages(10) == []  # nothing was written under the other's lease
        assert await admin.last_sequence("c1") == 1
        await admin._redis().delete(owner)  # the other sidecar stopped

        async def taken_back() -> bool:
            return (await s.post(message(message_id="m2"))).status == 200

        await eventually(taken_back, what="the lease taken back and m2 accepted")
        await eventually(lambda: s.app.core.pending == 0, what="m2 handled")
        assert await admin.last_sequence("c1") == 2
        mine = s.app.store._owner  # type: ignore[attr-defined]

        async def lease_renewed() -> bool:
            return bool(await admin._redis().get(owner) == mine)

        await eventually(lease_renewed, 10, "the lease taken again at the next renewal")
    finally:
        await admin.close()


async def test_forgetting_thousands_at_once_is_one_whole_step(prefixed_url: str) -> None:
    # Lua cannot unpack ~8,000 values: a forget that deleted first and then failed there
    # left the `handled` index pointing at deleted messages.
    store = RedisStore(prefixed_url, exclusive=False)
    await store.open()
    try:
        count = 9000
        accepted = await asyncio.gather(
            *(store.accept(InboundMessage("u", f"m{i}", "c", "text", "", {}), now=1.0) for i in range(count))
        )
        await asyncio.gather(*(store.finish_message(a.stored.id, "c", [], now=2.0, outbox=False) for a in accepted))
        assert await store.forget_messages(before=100.0, limit=10_000) == count
        assert await store.forget_messages(before=100.0, limit=10_000) == 0
        assert await store.pending_messages(10) == []
        assert not (await store.accept(InboundMessage("u", "m0", "c", "text", "", {}), now=3.0)).duplicate
    finally:
        await store.close()


async def test_an_unreachable_redis_is_unavailable_on_every_front_door(
    start_app: StartApp, own_redis: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """503 / UNAVAILABLE ("try again"), never UNKNOWN with redis-py's words, for writes and
    for the reads a Subscribe makes; and gRPC health turns NOT_SERVING, as /readyz does."""
    monkeypatch.setattr("sidecar.app.HEALTH_INTERVAL", 0.1)
    s = await start_app(store=own_redis)
    assert (await s.post(message())).status == 200
    await _shutdown(s.app.store)  # type: ignore[arg-type]
    for after in (None, 0):
        with pytest.raises(grpc.aio.AioRpcError) as e:
            await read_n(subscribe(s, after=after), 1)
        assert e.value.code() == grpc.StatusCode.UNAVAILABLE, e.value.details()
        assert "redis" not in (e.value.details() or "").lower()
    with pytest.raises(grpc.aio.AioRpcError) as e:
        await s.stub.SendMessage(request(message_id="m2"))
    assert e.value.code() == grpc.StatusCode.UNAVAILABLE
    assert (await s.post(message(message_id="m3"))).status == 503
    health = health_pb2_grpc.HealthStub(s.channel)

    async def not_serving() -> bool:
        answer = await health.Check(health_pb2.HealthCheckRequest(service=""))
        return bool(answer.status == health_pb2.HealthCheckResponse.NOT_SERVING)

    await eventually(not_serving, what="gRPC health NOT_SERVING")  # with nobody asking /readyz


async def test_a_redis_that_refuses_writes_is_unavailable_and_not_ready_until_it_takes_them(
    start_app: StartApp, own_redis: str, caplog: pytest.LogCaptureFixture
) -> None:
    """Out of memory (noeviction) stands for every "cannot write now" refusal (READONLY
    after a failover, MISCONF after a failed save): 503 / UNAVAILABLE, not 500 with a
    traceback; /readyz not ready; one ERROR line, not one per request."""
    s = await start_app(store=own_redis)
    assert (await s.post(message())).status == 200
    admin = RedisStore(own_redis, exclusive=False)
    await admin.open()
    try:
        await admin._redis().config_set("maxmemory", 1)
        statuses = [(await s.post(message(message_id=f"new{i}"))).status for i in range(5)]
        # 503 "try again" each time: a refused step never ran, so the core does not go
        # looking for it (a reload would answer the next message 429 meanwhile).
        assert statuses == [503] * 5
        assert await metric(s, "sidecar_pending_backlog") == 0.0
        with pytest.raises(grpc.aio.AioRpcError) as e:
            await s.stub.SendMessage(request(message_id="g1"))
        assert e.value.code() == grpc.StatusCode.UNAVAILABLE

        async def readyz() -> tuple[int, str]:
            async with aiohttp.ClientSession() as session, session.get(s.admin + "/readyz") as r:
                return r.status, (await r.json())["details"]["store"]

        # The store is checked at most once a second: the next check sees it.
        assert await eventually(lambda: _when(readyz(), (503, "unavailable")), what="not ready")
        refusals = [r for r in caplog.records if r.getMessage() == "redis store refuses writes"]
        assert len(refusals) == 1 and refusals[0].levelname == "ERROR"
        assert not [r for r in caplog.records if r.exc_info]
        await admin._redis().config_set("maxmemory", 0)
        assert await eventually(lambda: _when(readyz(), (200, "ok")), what="ready again")
        assert (await s.post(message(message_id="after"))).status == 200
    finally:
        await admin.close()


T = TypeVar("T")


async def _when(answer: Awaitable[T], expected: T) -> bool:
    return await answer == expected


async def _opens(store: RedisStore) -> bool:
    try:
        await store.open()
    except RedisStoreError:
        return False
    return True


@pytest.mark.parametrize(
    ("error", "refused"),
    [
        (OutOfMemoryError("command not allowed when used memory > 'maxmemory'"), True),
        (ReadOnlyError("You can't write against a read only replica."), True),
        (MasterDownError("Link with MASTER is down and replica-serve-stale-data is set to 'no'."), True),
        (ResponseError("MISCONF Redis is configured to save RDB snapshots, but cannot persist on disk"), True),
        (ResponseError("BUSY Redis is busy running a script."), True),
        (ResponseError("NOREPLICAS Not enough good replicas to write."), True),
        (ResponseError("NOTOWNER lease held by another sidecar"), False),  # the fence: its own mapping
        (ResponseError("ERR Error running script"), False),  # a bug, not a refusal: 500
    ],
)
def test_what_counts_as_a_server_refusing_writes(error: Exception, refused: bool) -> None:
    """redis-py strips the code of the refusals it has classes for; the rest keep it."""
    assert _refused(error) is refused


async def test_dead_letters_of_an_older_sidecar_are_indexed_by_kind_at_open(prefixed_url: str) -> None:
    """Listing by kind reads a per-kind index (a scan past the other kind's letters took
    280 ms at 40,000 of them, Redis blocked meanwhile); letters an older sidecar made,
    before that index, are put into it once, at open."""
    store = RedisStore(prefixed_url)
    await store.open()
    accepted = await store.accept(_inbound("m1"), now=1.0)
    await store.dead_letter_message(accepted.stored.id, "the bot said no", now=2.0)
    await store.close()
    client = RedisStore(prefixed_url, exclusive=False)
    await client.open()
    try:  # as an older sidecar left it: no kind index
        await client._redis().delete(client._key("letters:kind:message"))
        again = RedisStore(prefixed_url)
        await again.open()
        try:
            (letter,) = await again.list_dead_letters(kind="message")
            assert letter.extra["message_id"] == accepted.stored.id
            assert await again.list_dead_letters(kind="reply") == []
            assert await client._redis().zcard(client._key("letters:kind:message")) == 1
        finally:
            await again.close()
    finally:
        await client.close()


async def test_a_page_read_in_chunks_ends_at_a_trim_between_them_and_the_stream_says_so(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """replies_after with a byte budget reads the log a few rows at a time; a conversation
    appended to and trimmed between two reads left a page 1..16, 31..70, and a subscriber
    skipped 17..30 without a word (SQLite reads a page in one snapshot)."""
    read = redis_store._reached
    for reader in ("store", "stream"):
        store = RedisStore(redis_url(f"test-gap-{uuid.uuid4().hex}:"), retention=40)
        await store.open()
        try:
            await store.append_replies("c", [draft(f"a{i}") for i in range(40)], now=1.0, outbox=False)
            stream = await ReplyStream.open(store, Broker(1000), "c", 0) if reader == "stream" else None
            trimmed = False

            async def a_trim_after_the_next_read(pending: Awaitable[T], store: RedisStore = store) -> T:
                nonlocal trimmed
                out = await read(pending)
                if not trimmed:  # another lane appends 30 meanwhile: 1..30 are trimmed
                    trimmed = True
                    await store.append_replies("c", [draft(f"b{i}") for i in range(30)], now=2.0, outbox=False)
                return out

            monkeypatch.setattr(redis_store, "_reached", a_trim_after_the_next_read)
            if stream is None:
                page = await store.replies_after("c", 0, 256, 1 << 20)
                assert [r.sequence for r in page] == list(range(1, 17))  # up to the trim, gapless
            else:
                seen = []
                with pytest.raises(CursorExpired):  # OUT_OF_RANGE: the client knows
                    async for reply in stream:
                        seen.append(reply.sequence)
                assert seen == list(range(1, 17))
                stream.close()
        finally:
            monkeypatch.setattr(redis_store, "_reached", read)
            await store.drop()
            await store.close()


async def test_a_redis_user_confined_to_its_prefix_can_run_a_sidecar(own_redis: str) -> None:
    """The way to share one server between sidecars: a user per prefix (ACL ~prefix*). The
    fence's token was passed among the scripts' KEYS, which such a user may not name: the
    store opened, then every step failed with a 500."""
    admin = Redis.from_url(own_redis)
    try:
        await admin.acl_setuser("tenant", enabled=True, passwords=["+pw"], keys=["t1:*"], commands=["+@all"])
    finally:
        await admin.aclose()
    url = own_redis.replace("redis://", "redis://tenant:pw@") + "?prefix=t1:"
    store = RedisStore(url)
    await store.open()
    try:
        first = await store.accept(InboundMessage("u", "m1", "c1", "text", "hi", {"text": "hi"}), now=1.0)
        assert not first.duplicate and [m.id for m in await store.pending_messages(10)] == [first.stored.id]
    finally:
        await store.close()


async def test_redis_cluster_is_refused_at_open_with_a_reason(tmp_path: Path) -> None:
    """The scripts reach keys they do not declare, which a cluster refuses across slots: the
    store opened and every step failed. Now the start fails, saying why."""
    if shutil.which("redis-server") is None:
        pytest.skip("redis-server not on PATH")  # own_redis fails in CI without it
    port = free_port()
    while port > 55_000:  # its cluster bus listens on port + 10,000
        port = free_port()
    server = await asyncio.create_subprocess_exec(
        *("redis-server", "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--dir", str(tmp_path)),
        *("--cluster-enabled", "yes", "--cluster-config-file", str(tmp_path / "nodes.conf")),
        stdout=asyncio.subprocess.DEVNULL,
    )
    try:
        url = f"redis://127.0.0.1:{port}/0"

        async def refused() -> str:
            try:
                await RedisStore(url).open()
            except RedisStoreError as e:
                return str(e)
            return ""

        reason = await eventually(lambda: _refusal(refused), what="an answer from the cluster node")
        assert "Redis Cluster is not supported" in reason
    finally:
        server.kill()
        await server.wait()


async def _refusal(attempt: Callable[[], Awaitable[str]]) -> str | None:
    reason = await attempt()
    return reason if "cannot connect" not in reason else None


async def test_a_direct_read_while_another_script_runs_too_long_is_a_refusal_not_a_500(own_redis: str) -> None:
    """BUSY (someone's script past the server's busy threshold) was mapped for scripts but
    not for direct reads: known, replies_after and last_sequence raised it raw (500)."""
    admin = Redis.from_url(own_redis)
    await admin.config_set("busy-reply-threshold", 100)
    store = RedisStore(own_redis)
    await store.open()
    hog = Redis.from_url(own_redis)
    busy = asyncio.ensure_future(hog.eval("local t = redis.call('TIME') while true do end", 0))
    try:
        await asyncio.sleep(0.3)  # past the threshold: the server answers others BUSY
        with pytest.raises(StoreRefused):
            await store.last_sequence("c1")
        with pytest.raises(StoreRefused):
            await store.known(_inbound("m1"))
    finally:
        with contextlib.suppress(Exception):
            await admin.script_kill()
        with contextlib.suppress(Exception):
            await busy
        await hog.aclose()
        await admin.aclose()
        await store.close()
