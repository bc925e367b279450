"""The http bot (JSON and Rasa modes), the callback endpoint, and the botpress bot between two sidecars."""

from __future__ import annotations

import asyncio
import contextlib
import io
import itertools
from pathlib import Path
from typing import Any

import orjson
import pytest
from aiohttp import web

from sidecar.bots.base import Bot, BotReply, Emit
from sidecar.bots.http import HttpBot
from sidecar.config import ConfigError
from sidecar.convert import value_to_json
from sidecar.models import InboundMessage, StoredMessage
from sidecar.observability import Metrics
from sidecar.v1 import sidecar_pb2
from tests.bot_server import BotServer
from tests.conftest import Running, StartApp, admin_metrics, eventually, make_config, message
from tests.procs import free_port
from tests.receiver import Receiver
from tests.streaming_server import StreamingServer
from tests.test_grpc_ingress import request, wait_until
from tests.test_streams import read_n, subscribe
from tests.test_webhook_delivery import dead_letters

CALLBACK = "callback-token"


async def echo_later(body: Any) -> tuple[int, Any]:
    return 200, [{"type": "text", "payload": {"text": f"sync: {body['text']}"}}]


async def replies_of(s: Running, conversation: str, count: int) -> list[Any]:
    call = subscribe(s, conversation, after=0)
    got = await read_n(call, count)
    call.cancel()
    return got


async def callback(s: Running, body: Any, token: str | None = CALLBACK, path: str = "/bot/replies") -> Any:
    headers = {"Authorization": f"Bearer {token}", "Content-Type": "application/json"} if token else {}
    # A stream, not bytes: aiohttp warns of a large body sent as bytes.
    async with s.session.post(s.http + path, data=io.BytesIO(orjson.dumps(body)), headers=headers) as resp:
        return resp.status, await resp.json()


async def test_json_bot_gets_the_message_with_its_token_and_answers_synchronously(start_app: StartApp) -> None:
    async with BotServer(echo_later) as bot:
        s = await start_app(bot="http", bot_url=bot.url, bot_token="bot-secret")
        await s.stub.SendMessage(request(text="hi", payload={"text": "hi", "x": 1}))
        (reply,) = await replies_of(s, "c1", 1)
    headers, body = bot.requests[0]
    assert headers["Authorization"] == "Bearer bot-secret"
    assert body == {"userId": "u1", "messageId": "m1", "conversationId": "c1", "type": "text", "text": "hi",
                    "payload": {"text": "hi", "x": 1}}  # fmt: skip
    assert value_to_json(reply.payload) == {"text": "sync: hi"} and reply.in_reply_to == "m1"


async def test_an_asynchronous_bot_replies_later_through_the_callback_once_even_if_retried(
    start_app: StartApp,
) -> None:
    async def nothing_now(body: Any) -> tuple[int, Any]:
        return 200, []

    async with BotServer(nothing_now) as bot:
        s = await start_app(bot="http", bot_url=bot.url, callback_tokens=(CALLBACK,))
        await s.post(message(text="hi"))
        await bot.wait_for(1)
        later = {"type": "text", "payload": {"text": "later"}, "conversationId": "c1",
                 "botpressUserId": "bu", "botpressMessageId": "bm-1", "botpressConversationId": "bc"}  # fmt: skip
        assert (await callback(s, later))[0] == 200
        assert (await callback(s, later))[0] == 200  # a retried callback
        (reply,) = await replies_of(s, "c1", 1)
    assert await s.app.store.last_sequence("c1") == 1
    assert (reply.bot_user_id, reply.bot_message_id, reply.bot_conversation_id) == ("bu", "bm-1", "bc")
    assert value_to_json(reply.payload) == {"text": "later"}


async def test_callback_errors_have_the_error_shape(start_app: StartApp, caplog: pytest.LogCaptureFixture) -> None:
    s = await start_app(callback_tokens=(CALLBACK,), callback_secret_path="s3cr3t-path")
    unknown = {"type": "text", "payload": {}, "conversationId": "never-seen"}
    status, body = await callback(s, unknown)
    assert status == 404 and body["error"]["code"] == "not_found"
    status, body = await callback(s, {"type": "", "conversationId": "c1"})
    assert status == 400 and {d["field"] for d in body["error"]["details"]} == {"type", "payload"}
    assert (await callback(s, unknown, token=None))[0] == 401
    # Senders that cannot add a header use the secret path instead.
    await s.post(message())
    ok = {"type": "text", "payload": {"text": "x"}, "conversationId": "c1", "botpressMessageId": "z"}
    assert (await callback(s, ok, token=None, path="/bot/replies/s3cr3t-path"))[0] == 200
    assert (await callback(s, ok, token=None, path="/bot/replies/wrong"))[0] == 404
    # Each outcome counted; the refusals a misconfigured bot would repeat are also
    # logged, once per 10 s, without the path (it may hold the secret) or the body.
    metrics = await admin_metrics(s)
    for outcome, count in (("accepted", 1), ("rejected", 1), ("unauthenticated", 2), ("not_found", 1)):
        assert f'sidecar_callbacks_total{{outcome="{outcome}"}} {count:.1f}' in metrics, outcome
    (refused,) = [r for r in caplog.records if r.getMessage() == "bot callback refused"]
    assert refused.levelname == "WARNING" and "s3cr3t" not in caplog.text and "wrong" not in caplog.text


async def test_the_integrations_install_check_is_answered_200_and_appends_nothing(start_app: StartApp) -> None:
    s = await start_app(callback_tokens=(CALLBACK,), callback_secret_path="s3cr3t")
    probe = {"type": "test", "payload": "test"}
    assert await callback(s, probe) == (200, {"appended": []})
    assert await callback(s, probe, token=None, path="/bot/replies/s3cr3t") == (200, {"appended": []})
    assert (await callback(s, probe, token=None))[0] == 401


async def test_callback_is_closed_without_callback_tokens(start_app: StartApp) -> None:
    s = await start_app()
    await s.post(message())
    ok = {"type": "text", "payload": {"text": "x"}, "conversationId": "c1"}
    assert (await callback(s, ok, token="anything"))[0] == 401


async def test_a_bot_that_refuses_a_message_dead_letters_it_with_the_reason(start_app: StartApp) -> None:
    async def refuse(body: Any) -> tuple[int, Any]:
        return 422, {"error": "cannot handle\nthis", "detail": "x" * 300}

    async with BotServer(refuse) as bot:
        s = await start_app(bot="http", bot_url=bot.url)
        await s.post(message(text="bad"))
        (letter,) = await dead_letters(s, 1)
    # With the start of the bot's own explanation: one line, bounded.
    assert letter.kind == "message"
    expected = 'the bot refused the message: HTTP 422 ({"error":"cannot handle\\nthis","detail":"xx'
    assert letter.error.startswith(expected)
    assert letter.error.endswith("…)") and len(letter.error) < 260 and "\n" not in letter.error
    assert letter.body["text"] == "bad" and len(bot.requests) == 1


async def test_a_failing_bot_is_retried_and_its_replies_are_not_doubled(start_app: StartApp) -> None:
    answers = [503, 503, 200]

    async def flaky(body: Any) -> tuple[int, Any]:
        return answers.pop(0), [{"type": "text", "payload": {"text": "ok"}}, {"type": "text", "payload": {"n": 2}}]

    async with BotServer(flaky) as bot:
        s = await start_app(bot="http", bot_url=bot.url)
        await s.post(message())
        replies = await replies_of(s, "c1", 2)
    assert [r.sequence for r in replies] == [1, 2] and len(bot.requests) == 3
    # The message is marked handled just after its replies commit.
    await eventually(lambda: _no_pending(s), what="the message marked handled")


async def _no_pending(s: Running) -> bool:
    return await s.app.store.pending_messages(10) == []


async def test_a_bot_outage_opens_the_breaker_and_delays_messages_instead_of_losing_them(
    start_app: StartApp,
) -> None:
    port = free_port()
    url = f"http://127.0.0.1:{port}/bot"
    s = await start_app(bot="http", bot_url=url, bot_breaker_failures=2, bot_breaker_cooldown=0.3,
                        bot_max_attempts=3)  # fmt: skip
    for i in range(3):
        await s.post(message(f"c{i}", f"m{i}"))
    bot_ = s.app.bot
    await eventually(lambda: bot_.breaker.open, what="an open breaker")  # type: ignore[attr-defined]
    metrics = await admin_metrics(s)
    assert 'sidecar_bot_breaker_open{bot="http"} 1.0' in metrics
    server = BotServer(echo_later)
    server.port = port
    async with server:
        for i in range(3):
            (reply,) = await replies_of(s, f"c{i}", 1)
            assert value_to_json(reply.payload) == {"text": "sync: hello"}
    assert await s.app.store.list_dead_letters() == []
    assert 'sidecar_bot_breaker_open{bot="http"} 0.0' in await admin_metrics(s)


async def test_calls_cut_by_the_sidecars_own_timeout_count_against_the_breaker(tmp_path: Path) -> None:
    """The core's bot timeout may fire before the session's own (aiohttp rounds a deadline
    past 5 s up to a whole second): such a cancelled call is a failure too. Otherwise a
    hanging bot never opens the breaker, and a half-open trial cut so jams it shut."""

    async def hang(body: Any) -> tuple[int, Any]:
        await asyncio.sleep(30)
        return 200, []

    stored = StoredMessage("id", InboundMessage("u", "m1", "c1", "text", "hi", {"text": "hi"}), "f", 1.0)
    async with BotServer(hang) as server:
        config = make_config(tmp_path, bot="http", bot_url=server.url, bot_timeout=30.0, bot_breaker_failures=2,
                             bot_breaker_cooldown=0.2)  # fmt: skip
        bot = HttpBot(config, Metrics())
        await bot.start()
        try:
            for _ in range(2):
                with pytest.raises(TimeoutError):
                    async with asyncio.timeout(0.1):  # as the core's, before the session's
                        await bot.call(stored)
            assert bot.breaker.open
            await asyncio.sleep(0.25)  # the cool-down: one trial call goes through, and hangs
            with pytest.raises(TimeoutError):
                async with asyncio.timeout(0.1):
                    await bot.call(stored)
            assert bot.breaker.open and not bot.breaker.allow()  # re-opened by the cut trial
            await asyncio.sleep(0.25)
            assert bot.breaker.allow()  # not jammed: the next trial is let through
        finally:
            await bot.close()


async def test_rasa_mode_speaks_the_rest_channel_and_maps_every_answer_kind(start_app: StartApp) -> None:
    async def rasa(body: Any) -> tuple[int, Any]:
        sender = body["sender"]
        return 200, [
            {"recipient_id": sender, "text": "Hello!"},
            {"recipient_id": sender, "text": "Pick one", "buttons": [{"title": "Yes", "payload": "/affirm"}]},
            {"recipient_id": sender, "image": "https://example.com/cat.png"},
            {"recipient_id": sender, "attachment": "https://example.com/menu.pdf"},
            {"recipient_id": sender, "custom": {"kind": "card", "id": 7}},
        ]

    async with BotServer(rasa, path="/webhooks/rest/webhook") as bot:
        s = await start_app(bot="http", bot_url=bot.url, bot_format="rasa")
        await s.post(message(text="hi there"))
        replies = await replies_of(s, "c1", 5)
    _, body = bot.requests[0]
    assert body["sender"] == "c1" and body["message"] == "hi there"
    assert body["metadata"]["userId"] == "u1" and body["metadata"]["messageId"] == "m1"
    assert [(r.type, value_to_json(r.payload)) for r in replies] == [
        ("text", {"text": "Hello!"}),
        ("choice", {"text": "Pick one", "options": [{"label": "Yes", "value": "/affirm"}]}),
        ("image", {"imageUrl": "https://example.com/cat.png"}),
        ("file", {"fileUrl": "https://example.com/menu.pdf"}),
        ("custom", {"kind": "card", "id": 7}),
    ]


async def test_two_chained_sidecars_speak_both_sides_of_the_messaging_api(start_app: StartApp) -> None:
    """A (botpress bot) → B's /webhook; B (echo) → A's /bot/replies; a subscriber on A sees B's replies."""
    a_http = free_port()
    async with Receiver() as a_webhook:
        b = await start_app(
            auth_tokens=("pat-of-b",),
            response_url=f"http://127.0.0.1:{a_http}/bot/replies",
            response_authorization=f"Bearer {CALLBACK}",
            store="memory://",
        )
        a = await start_app(
            http_addr=f"127.0.0.1:{a_http}",
            bot="botpress",
            bot_url=b.http + "/webhook",
            bot_token="pat-of-b",
            callback_tokens=(CALLBACK,),
            response_url=a_webhook.url,
        )
        call = subscribe(a, "conv-42")
        await wait_until(lambda: len(a.app.core.broker) == 1)
        await a.stub.SendMessage(request("conv-42", "msg-1", "ping across"))
        (reply,) = await read_n(call, 1)
        call.cancel()
        (posted,) = await a_webhook.wait_for(1)
    assert value_to_json(reply.payload) == {"text": "ping across"}
    # B's ids, as the Botpress integration would send its own, are kept on A's reply.
    b_reply = (await b.app.store.replies_after("conv-42", 0, 10))[0]
    assert (reply.bot_user_id, reply.bot_message_id, reply.bot_conversation_id) == (
        b_reply.bot_user_id, b_reply.bot_message_id, b_reply.bot_conversation_id
    )  # fmt: skip
    assert posted.body["botpressMessageId"] == b_reply.bot_message_id
    assert await b.app.store.conversation_user("conv-42") == "u1"


async def test_an_answer_written_in_several_parts_is_read_whole(start_app: StartApp) -> None:
    answer = orjson.dumps([{"type": "text", "payload": {"text": "x" * 50_000}}])
    async with StreamingServer([answer[:1000], answer[1000:]], pause=0.3) as bot:
        s = await start_app(bot="http", bot_url=bot.url)
        await s.post(message(text="hi"))
        (reply,) = await replies_of(s, "c1", 1)
    assert value_to_json(reply.payload) == {"text": "x" * 50_000}


async def test_an_answer_over_1_mib_dead_letters_the_message_without_reading_it_all(start_app: StartApp) -> None:
    async with StreamingServer([b"[" + b" " * 65536] * 64) as bot:  # 4 MiB, no Content-Length
        s = await start_app(bot="http", bot_url=bot.url)
        await s.post(message(text="hi"))
        (letter,) = await dead_letters(s, 1)
    assert letter.error == "the bot's answer is larger than 1 MiB"


async def test_a_failure_behind_the_secret_path_is_logged_without_the_secret(
    start_app: StartApp, caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    s = await start_app(callback_secret_path="s3cr3t-path")
    await s.post(message())

    async def broken(*args: Any) -> Any:
        raise RuntimeError("the store broke")

    monkeypatch.setattr(s.app.core, "add_bot_reply_batches", broken)
    ok = {"type": "text", "payload": {"text": "x"}, "conversationId": "c1"}
    status, body = await callback(s, ok, token=None, path="/bot/replies/s3cr3t-path")
    assert status == 500 and body["error"]["code"] == "internal"
    logged = [r for r in caplog.records if r.getMessage() == "unhandled error"]
    assert logged and logged[0].__dict__["route"] == "/bot/replies/{secret}"
    assert "s3cr3t" not in caplog.text


async def test_a_callback_naming_an_unknown_conversation_is_refused_whole(start_app: StartApp) -> None:
    s = await start_app(callback_tokens=(CALLBACK,))
    await s.post(message(type="image", payload={"url": "x"}))  # c1 is known; no echo of an image
    body = [
        {"type": "text", "payload": {"text": "late A"}, "conversationId": "c1"},
        {"type": "text", "payload": {"text": "late B"}, "conversationId": "nope"},
    ]
    for _ in range(2):  # and its retry
        status, answer = await callback(s, body)
        assert status == 404 and answer["error"]["code"] == "not_found"
    assert await s.app.store.last_sequence("c1") == 0  # nothing of it stored


async def test_callbacks_are_taken_while_draining(start_app: StartApp) -> None:
    """They answer messages already in flight; the integration does not send them again."""
    s = await start_app(callback_tokens=(CALLBACK,))
    await s.post(message(type="image", payload={"url": "x"}))
    drain = asyncio.create_task(s.app.drain(5.0))
    await eventually(lambda: not s.app.core.ready, what="draining")
    assert (await s.post(message(message_id="m2"))).status == 503  # new work is refused
    status, answer = await callback(s, {"type": "text", "payload": {"text": "late"}, "conversationId": "c1"})
    assert (status, answer) == (200, {"appended": [{"conversationId": "c1", "sequence": 1}]})
    await drain


async def test_a_bot_outage_is_waited_out_with_the_breaker_and_a_poison_message_still_dies(
    start_app: StartApp,
) -> None:
    """While the breaker is open messages wait without using up attempts; each trial call
    counts, because with one message in flight an outage and a bot failing on that message
    alone look the same, and the second must end in a dead letter, not in a stuck lane."""
    calls: list[str] = []
    down = True

    async def bot(body: Any) -> tuple[int, Any]:
        calls.append(body["text"])
        if body["text"] == "poison" or down:
            return 503, {"error": "no"}
        return 200, [{"type": "text", "payload": {"text": "back"}}]

    async with BotServer(bot) as server:
        s = await start_app(
            bot="http", bot_url=server.url, bot_breaker_failures=2, bot_breaker_cooldown=0.2, bot_max_attempts=4
        )
        await s.post(message("c1", "m1", "hello"))
        await eventually(lambda: len(calls) >= 3, what="the breaker open, a trial failed")
        down = False  # back within (4 - 2) cooldowns: the message was delayed, not lost
        (reply,) = await replies_of(s, "c1", 1)
        assert value_to_json(reply.payload) == {"text": "back"}
        await s.post(message("c2", "m2", "poison"))
        (letter,) = await dead_letters(s, 1)
    assert letter.conversation_id == "c2" and letter.attempts == 4


async def test_a_bot_that_says_429_is_waited_for_as_it_asks(start_app: StartApp) -> None:
    calls: list[float] = []

    async def bot(body: Any) -> web.Response | tuple[int, Any]:
        calls.append(asyncio.get_running_loop().time())
        if len(calls) <= 3:
            return web.Response(status=429, text="slow down", headers={"Retry-After": "1"})
        return 200, [{"type": "text", "payload": {"text": "ok"}}]

    async with BotServer(bot) as server:
        s = await start_app(
            bot="http", bot_url=server.url, bot_max_attempts=5, bot_breaker_failures=100, bot_backoff_max=0.5
        )
        await s.post(message())
        (reply,) = await replies_of(s, "c1", 1)
    assert value_to_json(reply.payload) == {"text": "ok"}
    gaps = [b - a for a, b in itertools.pairwise(calls)]
    assert all(gap >= 0.45 for gap in gaps[:3]), gaps  # Retry-After 1, within bot_backoff_max 0.5


async def test_a_message_waiting_out_its_backoff_leaves_the_bot_to_other_conversations(
    start_app: StartApp,
) -> None:
    """One lane at a time calls the bot (bot_concurrency=1); c1 keeps failing and waits
    a second between attempts: c2 and c3 must not wait for c1 to be dead-lettered."""
    seen: list[str] = []

    async def bot(body: Any) -> tuple[int, Any]:
        seen.append(body["conversationId"])
        if body["conversationId"] == "c1":
            return 500, {"error": "poison"}
        return 200, [{"type": "text", "payload": {"text": "ok"}}]

    async with BotServer(bot) as server:
        s = await start_app(
            bot="http", bot_url=server.url, bot_concurrency=1, bot_max_attempts=4,
            bot_backoff_initial=1.0, bot_backoff_max=1.0, bot_breaker_failures=100,
        )  # fmt: skip
        for conversation in ("c1", "c2", "c3"):
            await s.post(message(conversation))
        # c1 still retrying when c2 and c3 are done: they did not wait for its dead letter.
        await eventually(lambda: {"c2", "c3"} <= set(seen) and seen.count("c1") < 4, what="c2 and c3 first")


async def test_the_botpress_integration_answering_a_large_or_odd_body_has_taken_the_message(
    start_app: StartApp,
) -> None:
    """It answers with the objects it created (the message echoed back): any 2xx is a yes."""
    answers = [
        web.Response(status=200, body=b'{"message":{"payload":"' + b"a" * (1024 * 1024) + b'"}}'),
        web.Response(status=200, text="OK", content_type="text/plain"),
    ]

    async def integration(body: Any) -> web.Response:
        return answers.pop(0)

    async with BotServer(integration) as server:
        s = await start_app(bot="botpress", bot_url=server.url, bot_token="pat")
        await s.post(message(message_id="m1"))
        await s.post(message(message_id="m2"))
        await eventually(lambda: s.app.core.pending == 0, what="both messages handled")
        assert await s.app.store.list_dead_letters() == []


async def test_a_reply_too_large_for_grpc_subscribers_is_refused_wherever_it_comes_from(start_app: StartApp) -> None:
    # 500,000 zeros: a 1 MB JSON body, but 5.5 MB as a google.protobuf.Value, past gRPC's
    # 4 MiB default receive limit: stored, it would stop every standard subscriber at it.
    zeros = {"n": [0] * 500_000}

    async def answer_big(body: Any) -> tuple[int, Any]:
        return 200, [{"type": "data", "payload": zeros}]

    async with BotServer(answer_big) as bot:
        s = await start_app(bot="http", bot_url=bot.url, callback_tokens=(CALLBACK,))
        await s.post(message(text="hi"))
        (letter,) = await dead_letters(s, 1)
    assert letter.kind == "message" and "payload is 5,500,0" in letter.error and "4 MiB" in letter.error
    status, body = await callback(s, {"type": "data", "payload": zeros, "conversationId": "c1"})
    assert status == 400 and [d["field"] for d in body["error"]["details"]] == ["payload"]
    # Large but within the limit (its exact size decides, not the quick bound): taken,
    # and streamed to a standard client, default limits and all.
    text = {"text": "é" * 500_000}  # 1 MB of UTF-8 in a 1 MB body
    assert (await callback(s, {"type": "text", "payload": text, "conversationId": "c1"}))[0] == 200
    call = s.stub.Subscribe(sidecar_pb2.SubscribeRequest(conversation_id="c1", after_sequence=0))
    reply = await call.read()
    assert value_to_json(reply.payload) == text
    call.cancel()
    assert await s.app.store.last_sequence("c1") == 1


async def test_a_bot_that_hangs_past_bot_timeout_is_counted_and_reported_as_a_timeout(start_app: StartApp) -> None:
    async def hang(body: Any) -> tuple[int, Any]:
        await asyncio.sleep(30)
        return 200, []

    async with BotServer(hang) as bot:
        s = await start_app(bot="http", bot_url=bot.url, bot_timeout=0.3, bot_max_attempts=1)
        await s.post(message(text="hi"))
        (letter,) = await dead_letters(s, 1)
        metrics = await admin_metrics(s)
    assert letter.error == "timeout after 0.3s"
    assert 'sidecar_bot_calls_total{bot="http",outcome="timeout"} 1.0' in metrics


async def test_the_botpress_integrations_catch_all_400_is_retried_and_other_400s_are_final(
    start_app: StartApp,
) -> None:
    """Its handler answers 400 "Unknown Error! ..." whenever its own Botpress API call fails
    (a failure of a moment too): retried. A 400 that names a problem stays final."""
    answers = [
        web.Response(status=400, text="Unknown Error! Please contact the Botpress Team"),
        web.Response(status=400, text="Unknown Error! Please contact the Botpress Team"),
        web.Response(status=200, text="{}", content_type="application/json"),
        web.Response(status=400, text="Invalid payload: text is required"),
    ]

    async def integration(body: Any) -> web.Response:
        return answers.pop(0)

    async with BotServer(integration) as server:
        s = await start_app(bot="botpress", bot_url=server.url, bot_token="pat")
        await s.post(message(message_id="m1"))
        await eventually(lambda: len(server.requests) == 3 and s.app.core.pending == 0, what="m1 taken at last")
        assert await s.app.store.list_dead_letters() == []
        await s.post(message(message_id="m2"))
        (letter,) = await dead_letters(s, 1)
    assert letter.body["messageId"] == "m2" and "HTTP 400 (Invalid payload" in letter.error
    assert len(server.requests) == 4


async def test_more_replies_than_max_replies_per_message_dead_letter_the_message_or_refuse_the_callback(
    start_app: StartApp,
) -> None:
    """One answer's replies are stored in one step (one loop turn; on Redis one script other
    clients wait behind): 80,000 from one 1-MiB answer blocked the loop for a second."""

    async def many(body: Any) -> tuple[int, Any]:
        count = int(body["text"])
        return 200, [{"type": "text", "payload": {"text": str(i)}} for i in range(count)]

    async with BotServer(many) as bot:
        s = await start_app(bot="http", bot_url=bot.url, max_replies_per_message=5, callback_tokens=(CALLBACK,))
        await s.post(message(message_id="m1", text="5"))
        assert len(await replies_of(s, "c1", 5)) == 5
        await s.post(message(message_id="m2", text="6"))
        (letter,) = await dead_letters(s, 1)
    assert letter.body["messageId"] == "m2"
    assert letter.error == "the bot gave more than 5 replies to one message (max_replies_per_message)"
    assert len(bot.requests) == 2  # not retried: the same bot gives the same answer
    status, body = await callback(s, [{"type": "text", "payload": {"text": "x"}, "conversationId": "c1"}] * 6)
    assert status == 400 and body["error"]["details"] == [{"field": "body", "reason": "over 5 items"}]
    status, _ = await callback(s, [{"type": "text", "payload": {"text": "x"}, "conversationId": "c1"}] * 5)
    assert status == 200


class _EmitsTooManySwallowingErrors(Bot):
    """A bot with a catch-all around emit: the limit must hold all the same."""

    name = "swallows"

    async def handle(self, message: StoredMessage, emit: Emit) -> list[BotReply]:
        for i in range(8):
            with contextlib.suppress(Exception):
                await emit(BotReply(type="text", payload={"text": str(i)}))
        return []


async def test_emitting_more_than_the_limit_dead_letters_even_if_the_bot_swallows_the_error(
    start_app: StartApp, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    s = await start_app(max_replies_per_message=5)
    monkeypatch.setattr(s.app.core, "_bot", _EmitsTooManySwallowingErrors())
    await s.post(message(message_id="m1"))
    (letter,) = await dead_letters(s, 1)
    assert "more than 5 replies" in letter.error
    assert await s.app.store.last_sequence("c1") == 5  # those emitted within the limit stay
    rules = tmp_path / "many.yaml"
    rules.write_text("rules:\n  - match: {}\n    replies: [" + ", ".join(["{type: text, payload: {}}"] * 6) + "]\n")
    with pytest.raises(ConfigError, match="6 replies, over max_replies_per_message"):
        await start_app(bot="script", bot_script=str(rules), max_replies_per_message=5, store="memory://")


async def test_the_catch_all_answering_a_breakers_trial_keeps_the_breaker_working(start_app: StartApp) -> None:
    """Counted like a 5xx: a trial it answers reopens the breaker, and a later trial goes
    out (uncounted, it left the breaker waiting for a verdict for ever)."""
    answers = [
        web.Response(status=500, text="down"),  # opens the breaker (bot_breaker_failures=1)
        web.Response(status=400, text="Unknown Error! Please contact the Botpress Team"),  # the trial
    ]

    async def integration(body: Any) -> web.Response:
        return answers.pop(0) if answers else web.Response(status=200, text="{}", content_type="application/json")

    async with BotServer(integration) as server:
        s = await start_app(
            bot="botpress", bot_url=server.url, bot_token="pat", bot_breaker_failures=1, bot_breaker_cooldown=0.2
        )
        await s.post(message(message_id="m1"))
        await eventually(lambda: len(server.requests) == 3 and s.app.core.pending == 0, what="m1 taken at last")
