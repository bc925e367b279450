"""The store stays bounded: handled messages are forgotten after dedupe_window (a repeat of
an old message id is then a new message, with replies of its own), and replies older than
reply_max_age leave the conversation's log."""

from __future__ import annotations

from typing import Any

import grpc
import pytest

from sidecar.convert import value_to_json
from tests.bot_server import BotServer
from tests.conftest import Running, StartApp, eventually, message, metric
from tests.receiver import Receiver
from tests.test_grpc_ingress import request
from tests.test_streams import read_n, subscribe


async def forgotten(s: Running) -> float:
    return await metric(s, "sidecar_messages_forgotten_total")


async def test_a_message_repeated_after_the_window_is_handled_again_with_new_ids(start_app: StartApp) -> None:
    async with Receiver() as r:
        # A window of 2 s is swept every 0.5 s; the repeat below comes well inside it.
        s = await start_app(response_url=r.url, dedupe_window=2.0)
        first = await s.post(message(text="hi"))
        assert (await first.json())["duplicate"] is False
        assert (await (await s.post(message(text="hi"))).json())["duplicate"] is True
        await r.wait_for(1)

        await eventually(lambda: forgotten(s), what="the handled message forgotten")
        again = await s.post(message(text="hi"))
        body = await again.json()
        assert again.status == 200 and body["duplicate"] is False
        assert body["message"]["id"] == (await first.json())["message"]["id"]  # the same sidecar ids
        await r.wait_for(2)

        call = subscribe(s, after=0)
        replies = await read_n(call, 2)
        call.cancel()
    assert [x.sequence for x in replies] == [1, 2]
    # New replies, not mistaken for the first run's: a receiver deduplicating on webhook-id keeps both.
    ids = [req.body["botpressMessageId"] for req in r.requests]
    assert len(set(ids)) == 2 and {x.bot_message_id for x in replies} == set(ids)


async def test_pending_messages_are_never_forgotten(start_app: StartApp) -> None:
    async def bot(body: Any) -> tuple[int, Any]:
        return (503, None) if body["conversationId"] == "stuck" else (200, [])

    async with BotServer(bot) as b:
        s = await start_app(
            dedupe_window=0.2, bot="http", bot_url=b.url, bot_max_attempts=1000, bot_breaker_failures=1000
        )
        await s.post(message(conversation="stuck"))
        await s.post(message(conversation="fine"))
        # Once the handled message is forgotten, the pending one is older than the window too.
        await eventually(lambda: forgotten(s), what="the handled message forgotten")
        assert (await (await s.post(message(conversation="stuck"))).json())["duplicate"] is True
        assert (await (await s.post(message(conversation="fine"))).json())["duplicate"] is False


async def test_replies_older_than_reply_max_age_leave_the_log_and_the_sequence_goes_on(start_app: StartApp) -> None:
    s = await start_app(reply_max_age=0.5)
    await s.stub.SendMessage(request(conversation="expiry", message_id="m1", text="one"))
    call = subscribe(s, "expiry", after=0)
    (first,) = await read_n(call, 1)
    call.cancel()
    assert first.sequence == 1

    async def expired() -> bool:
        return await s.app.store.first_retained_sequence("expiry") == 2

    await eventually(expired, what="the reply expired")
    assert await metric(s, "sidecar_replies_expired_total") >= 1
    with pytest.raises(grpc.aio.AioRpcError) as e:
        await subscribe(s, "expiry", after=0).read()
    assert e.value.code() == grpc.StatusCode.OUT_OF_RANGE  # the cursor is older than what is kept
    live = subscribe(s, "expiry", after=1)  # the last cursor the client saw still works
    await s.stub.SendMessage(request(conversation="expiry", message_id="m2", text="two"))
    (second,) = await read_n(live, 1)
    live.cancel()
    assert second.sequence == 2 and value_to_json(second.payload) == {"text": "two"}


async def test_a_sweep_the_store_fails_is_counted_and_says_why(
    start_app: StartApp, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    s = await start_app(dedupe_window=0.4)  # swept every 0.1 s

    async def broken(*args: Any, **kwargs: Any) -> int:
        raise OSError("disk I/O error")

    monkeypatch.setattr(s.app.store, "forget_messages", broken)

    async def counted() -> bool:
        return await metric(s, 'sidecar_store_errors_total{stage="sweep"}') >= 1

    await eventually(counted, what="a failed sweep counted")
    (line, *_) = [rec for rec in caplog.records if rec.getMessage().startswith("store sweep failed")]
    assert "disk I/O error" in line.error  # type: ignore[attr-defined]
