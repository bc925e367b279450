"""Subscribe: replay from a cursor, live fan-out, the switch between them, slow consumers."""

from __future__ import annotations

import asyncio
import logging
from pathlib import Path
from typing import Any

import grpc
import pytest
from google.rpc import error_details_pb2
from grpc_status import rpc_status

from sidecar.bots.base import BotReply
from sidecar.delivery import stream as stream_module
from sidecar.v1 import sidecar_pb2, sidecar_pb2_grpc
from tests.conftest import Running, StartApp, eventually, metric
from tests.test_grpc_ingress import request, wait_for_sequence, wait_until


async def read_n(call: Any, n: int, timeout: float = 10.0) -> list[Any]:
    out: list[Any] = []
    async with asyncio.timeout(timeout):
        while len(out) < n:
            out.append(await call.read())
    return out


def subscribe(s: Running, conversation: str = "c1", after: int | None = None) -> Any:
    req = sidecar_pb2.SubscribeRequest(conversation_id=conversation)
    if after is not None:
        req.after_sequence = after
    return s.stub.Subscribe(req)


async def live_subscriber_after_one_reply(s: Running) -> Any:
    """A live-only Subscribe to c1, registered with the broker, after c1's first reply."""
    await s.stub.SendMessage(request(message_id="seed"))
    await wait_for_sequence(s, "c1", 1)
    call = subscribe(s)
    await wait_until(lambda: len(s.app.core.broker) == 1)
    return call


async def test_send_message_reply_arrives_on_subscribe_with_every_field(start_app: StartApp) -> None:
    s = await start_app()
    call = subscribe(s)
    await wait_until(lambda: len(s.app.core.broker) == 1)
    await s.stub.SendMessage(request(text="ping"))
    (reply,) = await read_n(call, 1)
    call.cancel()
    assert reply.conversation_id == "c1" and reply.sequence == 1 and reply.type == "text"
    assert reply.payload.struct_value.fields["text"].string_value == "ping"
    assert reply.user_id == "u1" and reply.in_reply_to == "m1"
    assert reply.bot_user_id and reply.bot_message_id and reply.bot_conversation_id
    assert reply.created_at.seconds > 0


async def test_resume_from_cursor_after_reconnect_loses_and_repeats_nothing(start_app: StartApp) -> None:
    s = await start_app()
    for i in range(5):
        await s.stub.SendMessage(request(message_id=f"m{i}", text=f"t{i}"))
    call = subscribe(s, after=0)
    first = await read_n(call, 2)
    call.cancel()
    for i in range(5, 8):
        await s.stub.SendMessage(request(message_id=f"m{i}", text=f"t{i}"))
    call = subscribe(s, after=first[-1].sequence)
    rest = await read_n(call, 6)
    call.cancel()
    seen = [r.sequence for r in first + rest]
    assert seen == list(range(1, 9))
    assert [r.payload.struct_value.fields["text"].string_value for r in first + rest] == [f"t{i}" for i in range(8)]


async def test_live_only_subscription_starts_at_the_end_of_the_log(start_app: StartApp) -> None:
    s = await start_app()
    await s.stub.SendMessage(request(message_id="old"))
    await wait_for_sequence(s, "c1", 1)
    call = subscribe(s)
    await wait_until(lambda: len(s.app.core.broker) == 1)
    await s.stub.SendMessage(request(message_id="new", text="new"))
    (reply,) = await read_n(call, 1)
    call.cancel()
    assert reply.sequence == 2


async def test_several_subscribers_of_one_conversation_each_get_every_reply(start_app: StartApp) -> None:
    s = await start_app()
    calls = [subscribe(s, after=0) for _ in range(3)]
    for i in range(10):
        await s.stub.SendMessage(request(message_id=f"m{i}"))
    results = await asyncio.gather(*(read_n(c, 10) for c in calls))
    for c in calls:
        c.cancel()
    for replies in results:
        assert [r.sequence for r in replies] == list(range(1, 11))


async def test_replies_committed_during_replay_appear_exactly_once(start_app: StartApp) -> None:
    """The replay→live switch: appends race with the log read, nothing is lost or doubled."""
    s = await start_app()
    core = s.app.core
    await s.stub.SendMessage(request(message_id="seed"))
    await wait_for_sequence(s, "c1", 1)
    total = 600  # more than two replay pages, appended while subscribers replay

    async def produce() -> None:
        for i in range(total):
            await core.add_bot_reply_batches({"c1": [BotReply(type="text", payload={"i": i}, bot_message_id=f"b{i}")]})
            if i % 7 == 0:
                await asyncio.sleep(0)

    async def consume(after: int) -> list[int]:
        stream = await core.subscribe("c1", after)
        out: list[Any] = []
        try:
            async with asyncio.timeout(20):
                async for reply in stream:
                    out.append(reply.sequence)
                    if reply.sequence == total + 1:
                        break
        finally:
            stream.close()
        return out

    producer = asyncio.create_task(produce())
    consumers = [asyncio.create_task(consume(0))]
    for _ in range(4):
        await asyncio.sleep(0)
        consumers.append(asyncio.create_task(consume(0)))
    await producer
    for result in await asyncio.gather(*consumers):
        assert result == list(range(1, total + 2))


async def test_slow_subscriber_is_cut_off_with_resource_exhausted_and_can_resume(start_app: StartApp) -> None:
    s = await start_app(stream_queue_size=4)
    core = s.app.core
    await s.stub.SendMessage(request(message_id="seed"))
    await wait_for_sequence(s, "c1", 1)
    stream = await core.subscribe("c1", None)  # never read: its buffer fills up
    fast = subscribe(s)
    await wait_until(lambda: len(core.broker) == 2)
    fast_seen = []
    for i in range(20):  # lockstep with the reader that keeps up
        await core.add_bot_reply_batches({"c1": [BotReply(type="text", payload={"i": i}, bot_message_id=f"b{i}")]})
        fast_seen += [r.sequence for r in await read_n(fast, 1)]
    fast.cancel()
    assert fast_seen == list(range(2, 22))
    assert stream.close_reason is not None
    with pytest.raises(Exception) as e:
        await stream.__anext__()
    assert getattr(e.value, "grpc_status", None) == grpc.StatusCode.RESOURCE_EXHAUSTED
    stream.close()
    resumed = subscribe(s, after=1)
    assert [r.sequence for r in await read_n(resumed, 20)] == list(range(2, 22))
    resumed.cancel()


async def test_a_subscriber_is_cut_off_by_the_bytes_it_leaves_unread_too(
    start_app: StartApp, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A count alone let one stalled stream pin stream_queue_size replies of up to 4 MiB."""
    monkeypatch.setattr(stream_module, "BUFFER_BYTES", 100_000)
    s = await start_app(stream_queue_size=1000)
    core = s.app.core
    await s.stub.SendMessage(request(message_id="seed"))
    await wait_for_sequence(s, "c1", 1)
    stream = await core.subscribe("c1", None)  # never read
    big = {"t": "x" * 30_000}
    for i in range(3):
        await core.add_bot_reply_batches({"c1": [BotReply(type="text", payload=big, bot_message_id=f"b{i}")]})
    assert stream.close_reason is None  # 90 KB held: within the bound
    await core.add_bot_reply_batches({"c1": [BotReply(type="text", payload=big, bot_message_id="b3")]})
    assert stream.close_reason is not None and core.broker.cutoffs == 1
    stream.close()
    alone = await core.subscribe("c1", None)  # one reply larger than the bound passes an empty buffer
    await core.add_bot_reply_batches({"c1": [BotReply(type="text", payload={"t": "y" * 200_000}, bot_message_id="b4")]})
    assert alone.close_reason is None and (await alone.__anext__()).sequence == 6
    alone.close()


async def test_one_batch_over_the_bytes_left_goes_to_a_prompt_subscriber_through_the_log(
    start_app: StartApp, monkeypatch: pytest.MonkeyPatch
) -> None:
    """As a batch over the count left: offered as its last reply, the rest read from the
    log, not a cut-off of a subscriber that was waiting with an empty buffer."""
    monkeypatch.setattr(stream_module, "BUFFER_BYTES", 100_000)
    s = await start_app(stream_queue_size=1000)
    core = s.app.core
    await s.stub.SendMessage(request(message_id="seed"))
    await wait_for_sequence(s, "c1", 1)
    stream = await core.subscribe("c1", None)
    reader = asyncio.create_task(stream.__anext__())  # waiting: its buffer is empty
    await asyncio.sleep(0.05)
    big = {"t": "x" * 30_000}
    batch = [BotReply(type="text", payload=big, bot_message_id=f"b{i}") for i in range(5)]  # 150 KB
    await core.add_bot_reply_batches({"c1": batch})
    assert core.broker.cutoffs == 0
    seen = [(await reader).sequence] + [(await stream.__anext__()).sequence for _ in range(4)]
    assert seen == [2, 3, 4, 5, 6]
    stream.close()


async def test_grpc_client_that_stops_reading_is_cut_off(start_app: StartApp) -> None:
    """Flow control blocks the server's writes; the broker's cut-off still ends the stream."""
    s = await start_app(stream_queue_size=8)
    core = s.app.core
    call = await live_subscriber_after_one_reply(s)
    big = "x" * 60_000  # a few replies exhaust the HTTP/2 window
    for i in range(200):
        await core.add_bot_reply_batches({"c1": [BotReply(type="text", payload={"t": big}, bot_message_id=f"b{i}")]})
        if core.broker.cutoffs:
            break
    await wait_until(lambda: len(core.broker) == 0)
    codes = []
    with pytest.raises(grpc.aio.AioRpcError) as e:
        async with asyncio.timeout(10):
            while True:
                await call.read()
    codes.append(e.value.code())
    assert codes == [grpc.StatusCode.RESOURCE_EXHAUSTED]
    # With RetryInfo, as clients are told to expect of a RESOURCE_EXHAUSTED they may retry.
    status = rpc_status.from_call(e.value)
    assert status is not None and any(d.Is(error_details_pb2.RetryInfo.DESCRIPTOR) for d in status.details)


async def test_a_burst_of_thousands_of_subscribers_all_get_their_stream(start_app: StartApp) -> None:
    """A fleet reconnecting at once: grpc core's default backlog would CANCEL calls past 1000."""
    s = await start_app()
    count = 3000
    channels = [
        # A subchannel pool of its own per channel: one connection each, 1000 streams apiece.
        grpc.aio.insecure_channel(f"127.0.0.1:{s.app.grpc_port}", options=[("grpc.use_local_subchannel_pool", 1)])
        for _ in range(count // 1000)
    ]
    try:
        calls = [
            sidecar_pb2_grpc.MessagingServiceStub(channels[i % len(channels)]).Subscribe(
                sidecar_pb2.SubscribeRequest(conversation_id=f"burst{i}")
            )
            for i in range(count)
        ]
        results = await asyncio.gather(*(c.wait_for_connection() for c in calls), return_exceptions=True)
        failures = [r for r in results if isinstance(r, BaseException)]
        assert not failures, f"{len(failures)} of {count} failed, first: {failures[0]!r}"
        await eventually(lambda: len(s.app.core.broker) == count, what=f"{count} subscriptions")
        for c in calls:
            c.cancel()
    finally:
        for channel in channels:
            await channel.close()


async def test_gauges_report_open_streams_and_pending_messages_when_scraped(
    start_app: StartApp, tmp_path: Path
) -> None:
    rules = tmp_path / "slow.yaml"
    rules.write_text("rules:\n  - match: {}\n    replies: [{type: text, payload: {text: slow}, delay: 20}]\n")
    s = await start_app(bot="script", bot_script=str(rules))
    calls = [subscribe(s, conversation=f"g{i}") for i in range(3)]
    await wait_until(lambda: s.app.core.streams == 3)
    assert await metric(s, "sidecar_active_streams") == 3
    calls[0].cancel()
    await wait_until(lambda: s.app.core.streams == 2)
    assert await metric(s, "sidecar_active_streams") == 2
    for i in range(2):  # the bot takes 30 s per message: both stay pending
        await s.stub.SendMessage(request(message_id=f"m{i}", conversation_id=f"p{i}"))
    assert await metric(s, "sidecar_pending_messages") == 2
    for call in calls[1:]:
        call.cancel()


async def test_a_burst_larger_than_the_queue_reaches_a_prompt_subscriber_whole(start_app: StartApp) -> None:
    """One bot answer of 40 replies against a buffer of 8: the subscriber reads them from
    the log instead of being cut off for a lag it never had."""
    s = await start_app(stream_queue_size=8)
    core = s.app.core
    call = await live_subscriber_after_one_reply(s)
    burst = [BotReply(type="text", payload={"i": i}, bot_message_id=f"b{i}") for i in range(40)]
    await core.add_bot_reply_batches({"c1": burst})
    assert [r.sequence for r in await read_n(call, 40)] == list(range(2, 42))
    after = [BotReply(type="text", payload={"i": i}, bot_message_id=f"a{i}") for i in range(3)]
    await core.add_bot_reply_batches({"c1": after})  # and live again after it
    assert [r.sequence for r in await read_n(call, 3)] == [42, 43, 44]
    call.cancel()
    assert core.broker.cutoffs == 0


async def test_every_stream_names_its_starting_cursor_in_its_headers(start_app: StartApp) -> None:
    """A live-only subscriber cut off before its first reply can still resume exactly."""
    s = await start_app()
    await s.stub.SendMessage(request(message_id="seed"))
    await wait_for_sequence(s, "c1", 1)
    for after, expected in ((None, "1"), (0, "0"), (1, "1")):
        call = subscribe(s, after=after)
        assert dict(await call.initial_metadata())["sidecar-after-sequence"] == expected
        call.cancel()


async def test_a_stream_whose_next_replies_were_all_trimmed_ends_out_of_range_at_once(start_app: StartApp) -> None:
    s = await start_app()
    core = s.app.core
    await s.stub.SendMessage(request(message_id="seed", type="image"))  # known conversation, no echo
    await core.add_bot_reply_batches({"c1": [BotReply(type="text", payload={"i": i}) for i in range(3)]})
    stream = await core.subscribe("c1", 0)  # a cursor valid when it opened
    await s.app.store.expire_replies(float("inf"), "", 1000)  # then the log is emptied
    with pytest.raises(Exception) as e:
        async with asyncio.timeout(5):  # not "until the next reply arrives"
            await stream.__anext__()
    assert getattr(e.value, "grpc_status", None) == grpc.StatusCode.OUT_OF_RANGE
    stream.close()


async def test_a_burst_of_sends_past_max_streams_is_not_cancelled_by_grpc(start_app: StartApp) -> None:
    s = await start_app(max_streams=10)
    results = await asyncio.gather(
        *(s.stub.SendMessage(request(f"c{i % 7}", f"m{i}")) for i in range(300)), return_exceptions=True
    )
    assert [r for r in results if isinstance(r, BaseException)] == []


async def test_a_client_leaving_mid_replay_is_not_logged_as_an_error(
    start_app: StartApp, caplog: pytest.LogCaptureFixture
) -> None:
    s = await start_app()
    core = s.app.core
    await s.stub.SendMessage(request(message_id="seed", type="image"))  # known conversation, no echo
    big = "x" * 20_000
    await core.add_bot_reply_batches({"c1": [BotReply(type="text", payload={"t": big}) for _ in range(100)]})
    # No BDP probing: the window stays small, so the server is blocked in a write
    # (not between two) when the client cancels.
    async with grpc.aio.insecure_channel(f"127.0.0.1:{s.app.grpc_port}", options=[("grpc.http2.bdp_probe", 0)]) as ch:
        stub = sidecar_pb2_grpc.MessagingServiceStub(ch)
        for _ in range(3):
            call = stub.Subscribe(sidecar_pb2.SubscribeRequest(conversation_id="c1", after_sequence=0))
            await call.read()
            await asyncio.sleep(0.3)
            call.cancel()
            await asyncio.sleep(0.3)
    await wait_until(lambda: len(core.broker) == 0)
    await asyncio.sleep(0.2)
    assert not [r for r in caplog.records if r.levelno >= logging.ERROR]


async def test_concurrent_opens_cannot_overshoot_the_stream_limit(
    start_app: StartApp, monkeypatch: pytest.MonkeyPatch
) -> None:
    s = await start_app(max_streams=3)
    core = s.app.core
    real = s.app.store.last_sequence

    async def slow(conversation_id: str) -> int:  # as a networked store's read
        await asyncio.sleep(0.05)
        return await real(conversation_id)

    monkeypatch.setattr(s.app.store, "last_sequence", slow)
    results = await asyncio.gather(*(core.subscribe(f"c{i}", None) for i in range(6)), return_exceptions=True)
    opened = [r for r in results if not isinstance(r, BaseException)]
    assert len(opened) == 3 and core.streams == 3
    assert await metric(s, "sidecar_streams_refused_total") == 3.0
    for stream in opened:
        stream.close()
    assert core.streams == 0


async def test_replay_reads_large_replies_in_small_pages(start_app: StartApp, monkeypatch: pytest.MonkeyPatch) -> None:
    """A page read from the log waits in memory until the client has read it: a client
    that stopped reading must not pin 256 large replies (~50 MiB at 200 kB each)."""
    s = await start_app()
    await s.stub.SendMessage(request(message_id="seed"))
    await wait_for_sequence(s, "c1", 1)
    text = "x" * 300_000
    for i in range(12):
        await s.app.core.add_bot_reply_batches(
            {"c1": [BotReply(type="text", payload={"t": text}, bot_message_id=f"b{i}")]}
        )
    pages: list[int] = []
    read = s.app.store.replies_after

    async def counted(*args: Any) -> Any:
        page = await read(*args)
        pages.append(sum(len(r.payload.get("t", "")) for r in page))
        return page

    monkeypatch.setattr(s.app.store, "replies_after", counted)
    call = subscribe(s, after=0)
    got = await read_n(call, 13)
    call.cancel()
    assert [r.sequence for r in got] == list(range(1, 14))
    assert pages and max(pages) <= 1024 * 1024, pages  # three of these replies to a page, not all twelve
