"""Webhook delivery through real sockets: exact body, order, retries, dead letters, signatures, restarts."""

from __future__ import annotations

import asyncio
import base64
import time
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from standardwebhooks.webhooks import Webhook

from sidecar.http_client import parse_retry_after
from sidecar.models import DeadLetter
from tests.conftest import Running, StartApp, admin_metrics, eventually, message, metric
from tests.procs import free_port
from tests.receiver import Receiver
from tests.streaming_server import StreamingServer
from tests.test_store_contract import draft, head_delivery

SECRET_A = "whsec_" + base64.b64encode(b"a" * 24).decode()
SECRET_B = "whsec_" + base64.b64encode(b"b" * 24).decode()


async def send_texts(s: Running, conversation: str, texts: list[str]) -> None:
    for i, text in enumerate(texts):
        resp = await s.post(message(conversation, f"{conversation}-m{i}", text))
        assert resp.status == 200


async def test_each_reply_is_one_post_with_exactly_the_six_integration_fields(start_app: StartApp) -> None:
    async with Receiver() as r:
        s = await start_app(response_url=r.url)
        await send_texts(s, "c1", ["hello"])
        (got,) = await r.wait_for(1)
    assert set(got.body) == {
        "type", "payload", "conversationId", "botpressUserId", "botpressMessageId", "botpressConversationId"
    }  # fmt: skip
    assert got.body["type"] == "text" and got.body["payload"] == {"text": "hello"}
    assert got.body["conversationId"] == "c1"
    assert got.headers["Content-Type"] == "application/json"
    assert "webhook-signature" not in got.headers and "Authorization" not in got.headers


async def test_receiver_failing_with_503_then_recovering_gets_every_reply_in_order_once(
    start_app: StartApp, caplog: pytest.LogCaptureFixture
) -> None:
    async with Receiver() as r:
        r.script("c1", 503, 503, 503)
        s = await start_app(response_url=r.url)
        texts = [f"t{i}" for i in range(6)]
        await send_texts(s, "c1", texts)
        await r.wait_for(6)
    assert [b["payload"]["text"] for b in r.delivered("c1")] == texts
    assert [x.status for x in r.requests[:3]] == [503, 503, 503]
    ids = [b["botpressMessageId"] for b in r.delivered("c1")]
    assert len(set(ids)) == 6
    # Three failed attempts within 10 s: one WARNING, not one per attempt (those are INFO).
    (warning,) = [x for x in caplog.records if x.getMessage() == "webhook attempts failing; retrying"]
    assert warning.levelname == "WARNING" and warning.error  # type: ignore[attr-defined]


async def test_a_non_retryable_4xx_dead_letters_the_reply_and_the_next_one_proceeds(start_app: StartApp) -> None:
    async with Receiver() as r:
        r.script("c1", 400)
        s = await start_app(response_url=r.url)
        await send_texts(s, "c1", ["refused", "accepted"])
        await r.wait_for(1)
    assert [b["payload"]["text"] for b in r.delivered("c1")] == ["accepted"]
    (letter,) = await s.app.store.list_dead_letters()
    assert letter.kind == "reply" and letter.sequence == 1 and letter.error == "HTTP 400" and letter.attempts == 1
    assert letter.body["payload"] == {"text": "refused"}


@pytest.mark.parametrize("status", [408, 429, 500, 502])
async def test_retryable_statuses_are_retried(start_app: StartApp, status: int) -> None:
    async with Receiver() as r:
        r.script("c1", status)
        s = await start_app(response_url=r.url)
        await send_texts(s, "c1", ["x"])
        await r.wait_for(1)
    assert [x.status for x in r.requests] == [status, 200]


async def test_exhausted_attempts_dead_letter_the_reply_with_its_last_error(start_app: StartApp) -> None:
    async with Receiver() as r:
        r.script("c1", then=503)
        s = await start_app(response_url=r.url, webhook_max_attempts=3)
        await send_texts(s, "c1", ["never"])
        await r.wait_for(3, ok=False)
        letters = await dead_letters(s, 1)
    assert letters[0].error == "HTTP 503" and letters[0].attempts == 3


async def test_retry_after_is_honoured_and_capped(start_app: StartApp) -> None:
    async with Receiver() as r:
        r.script("c1", then=429, retry_after="120")
        r.script("c2", then=503, retry_after="99999")
        r.script("c3", then=503, retry_after="0")  # no sooner than the first backoff step, though
        s = await start_app(response_url=r.url, webhook_retry_after_max=300, webhook_backoff_initial=60)
        before = time.time()
        for c in ("c1", "c2", "c3"):
            await send_texts(s, c, ["a"])
        await r.wait_for(3, ok=False)
        heads = {c: await head_attempted(s, c) for c in ("c1", "c2", "c3")}
    assert 119 <= heads["c1"] - before <= 121 + (time.time() - before)
    assert 299 <= heads["c2"] - before <= 301 + (time.time() - before)
    assert 59 <= heads["c3"] - before <= 61 + (time.time() - before)


async def test_the_wait_before_a_retry_counts_from_the_answer_not_from_the_attempt(start_app: StartApp) -> None:
    # A receiver slow to answer 503 "Retry-After: 2" must not be POSTed to again
    # 2 s after the attempt began (0.5 s after its answer), nor a timed-out
    # attempt retried as soon as it timed out.
    async with Receiver() as r:
        r.script("slow", then=503, retry_after="2", delay=1.5)
        s = await start_app(response_url=r.url, webhook_timeout=5, webhook_backoff_initial=1)
        before = time.time()
        await send_texts(s, "slow", ["a"])
        retry_at = await head_attempted(s, "slow")
    assert retry_at >= before + 1.5 + 2


async def test_replies_queued_before_the_clock_stepped_back_are_not_held_for_the_step(start_app: StartApp) -> None:
    # Queued at what is now an hour from now (the wall clock was set back an hour since,
    # or the sidecar restarted on a host whose clock was ahead): without care, this
    # conversation's replies, and any queued after them, would wait an hour.
    async with Receiver() as r:
        s = await start_app(response_url=r.url)
        ahead = time.time() + 3600
        await s.app.store.append_replies("c1", [draft("early", "queued an hour ahead")], now=ahead, outbox=True)
        await send_texts(s, "c1", ["queued after the step"])
        assert s.app.webhook is not None
        s.app.webhook.notify("c1")
        await r.wait_for(2, conversation_id="c1")
    assert [x["payload"]["text"] for x in r.delivered("c1")] == ["queued an hour ahead", "queued after the step"]


async def test_a_first_backoff_step_longer_than_the_other_waits_is_still_waited(start_app: StartApp) -> None:
    # Retry-After is never honoured sooner than webhook_backoff_initial: a 120 s step
    # must not be taken for a time set before the clock stepped back (and retried at once).
    async with Receiver() as r:
        r.script("c1", then=503, retry_after="1")
        s = await start_app(response_url=r.url, webhook_backoff_initial=120, webhook_backoff_max=5,
                            webhook_retry_after_max=1)  # fmt: skip
        await send_texts(s, "c1", ["a"])
        await head_attempted(s, "c1")
        await asyncio.sleep(1.0)
    assert len(r.requests) == 1


def test_retry_after_parses_seconds_and_http_dates() -> None:
    now = 1_700_000_000.0
    assert parse_retry_after("7", now) == 7.0
    assert parse_retry_after("Tue, 14 Nov 2023 22:13:40 GMT", now) == pytest.approx(20.0)
    assert parse_retry_after("soon", now) is None and parse_retry_after(None, now) is None


async def test_signed_webhooks_verify_with_every_secret_and_keep_their_id_across_retries(
    start_app: StartApp,
) -> None:
    async with Receiver() as r:
        r.script("c1", 503, 503)
        s = await start_app(response_url=r.url, webhook_secret=f"{SECRET_A} {SECRET_B}")
        await send_texts(s, "c1", ["signed"])
        await r.wait_for(1)
    ids = {x.headers["webhook-id"] for x in r.requests}
    assert len(r.requests) == 3 and len(ids) == 1
    for got in r.requests:
        verify(got, (SECRET_A, SECRET_B))


def verify(got: Any, secrets: tuple[str, ...]) -> None:
    """Some signature of the POST verifies with each secret, as the standardwebhooks library checks."""
    for secret in secrets:
        for sig in got.headers["webhook-signature"].split():
            headers = {**got.headers, "webhook-signature": sig}
            try:
                Webhook(secret).verify(got.raw, headers)
                break
            except Exception:  # noqa: BLE001 - try the next signature
                continue
        else:
            raise AssertionError(f"no signature verifies with {secret[:10]}…")


async def test_the_webhook_id_is_the_sidecars_own_whatever_ids_the_bot_gives(start_app: StartApp) -> None:
    """A bot's botpressMessageId goes in the body as given; the webhook-id header is the
    sidecar's: distinct per reply although the bot repeats its ids, and header-safe although
    they hold a newline or non-ASCII letters (which would fail every POST, or its signature)."""
    async with Receiver() as r:
        s = await start_app(response_url=r.url, webhook_secret=SECRET_A, callback_tokens=("cb",))
        for conversation in ("c1", "c2"):  # known conversations; the echo bot answers no image
            assert (await s.post(message(conversation, type="image", payload={"url": "x"}))).status == 200
        odd = ["same", "same", "line\nbreak", "réponse-1"]
        for n, (conversation, bot_id) in enumerate(zip(("c1", "c2", "c1", "c1"), odd, strict=True)):
            reply = {"type": "text", "payload": {"text": f"r{n}"}, "conversationId": conversation,
                     "botpressMessageId": bot_id}  # fmt: skip
            assert (await s.post(reply, token="cb", path="/bot/replies")).status == 200
        await r.wait_for(4)
    assert sorted(x.body["botpressMessageId"] for x in r.requests) == sorted(odd)
    ids = [x.headers["webhook-id"] for x in r.requests]
    assert len(set(ids)) == 4 and all(i.isascii() and i.isprintable() for i in ids)
    for got in r.requests:
        verify(got, (SECRET_A,))


async def test_static_authorization_header_is_sent(start_app: StartApp) -> None:
    async with Receiver() as r:
        s = await start_app(response_url=r.url, response_authorization="Bearer receiver-token")
        await send_texts(s, "c1", ["x"])
        (got,) = await r.wait_for(1)
    assert got.headers["Authorization"] == "Bearer receiver-token"


async def test_an_outage_of_refusals_then_errors_then_timeouts_ends_with_everything_in_order(
    start_app: StartApp,
) -> None:
    port = free_port()
    url = f"http://127.0.0.1:{port}/replies"
    s = await start_app(response_url=url, webhook_timeout=0.2, webhook_backoff_max=0.1)
    texts = [f"t{i}" for i in range(5)]
    await send_texts(s, "c1", texts)
    await head_attempted(s, "c1")  # connection refused: nothing listens yet
    r = Receiver()
    r.port = port
    r.script("c1", 503, 503, 0, 0)  # then errors, then answers slower than the timeout
    async with r:
        await r.wait_for(5)
    assert [b["payload"]["text"] for b in r.delivered("c1")] == texts
    # The last POST was answered; its success is recorded just after.
    await eventually(lambda: _outbox_empty(s, "c1"), what="an empty outbox")


async def _outbox_empty(s: Running, conversation_id: str) -> bool:
    return await head_delivery(s.app.store, conversation_id) is None


async def test_a_stuck_conversation_does_not_hold_up_the_others(start_app: StartApp) -> None:
    async with Receiver() as r:
        r.script("slow", hang=True)
        s = await start_app(response_url=r.url, webhook_timeout=30)
        await send_texts(s, "slow", ["stuck"])
        await send_texts(s, "fast", [f"f{i}" for i in range(5)])
        await r.wait_for(5, conversation_id="fast")
    assert [b["payload"]["text"] for b in r.delivered("fast")] == [f"f{i}" for i in range(5)]


async def test_retries_of_other_conversations_fall_due_while_one_delivery_hangs(start_app: StartApp) -> None:
    # Nothing else wakes the worker here: the retries are due only by the clock, while
    # the hanging delivery is the outbox's earliest head for the whole test.
    async with Receiver() as r:
        r.script("slow", hang=True)
        r.script("backoff", 503, 503)
        r.script("told", 503, retry_after="1")
        s = await start_app(
            response_url=r.url, webhook_timeout=60, webhook_backoff_initial=0.05, webhook_backoff_max=0.2
        )
        await send_texts(s, "slow", ["stuck"])
        await send_texts(s, "backoff", ["b0"])
        await send_texts(s, "told", ["t0"])
        await r.wait_for(1, conversation_id="backoff")
        await r.wait_for(1, conversation_id="told")
        assert not r.delivered("slow")
    assert [x.status for x in r.requests if x.body["conversationId"] == "backoff"] == [503, 503, 200]
    assert [x.status for x in r.requests if x.body["conversationId"] == "told"] == [503, 200]


async def test_replies_queued_while_the_receiver_is_down_arrive_in_order_after_a_restart(
    start_app: StartApp, tmp_path: Path
) -> None:
    port = free_port()  # nothing listens here yet: connection refused
    url = f"http://127.0.0.1:{port}/replies"
    store = f"sqlite:///{tmp_path}/kept.db"  # durable whatever SIDECAR_TEST_STORE says: a restart
    s = await start_app(store=store, response_url=url, webhook_backoff_initial=0.2, webhook_backoff_max=0.5)
    await send_texts(s, "c1", [f"t{i}" for i in range(4)])
    await head_attempted(s, "c1")
    await s.app.drain(0.5)
    await s.app.stop()
    r = Receiver()
    r.port = port
    async with r:
        await start_app(store=store, response_url=url)
        await r.wait_for(4)
    assert [b["payload"]["text"] for b in r.delivered("c1")] == [f"t{i}" for i in range(4)]


async def test_response_url_check_is_reported_in_readyz(start_app: StartApp, tmp_path: Path) -> None:
    async with Receiver() as r:
        s = await start_app(response_url=r.url, check_response_url=True)
        (probe,) = await r.wait_for(1)
        assert probe.body == {"type": "test", "payload": "test"}
        async with aiohttp.ClientSession() as session, session.get(s.admin + "/readyz") as resp:
            assert (await resp.json())["details"]["response_url"] == "ok"
    async with Receiver() as r:  # signed like a reply when secrets are set: a receiver may verify everything
        await start_app(
            response_url=r.url, check_response_url=True, webhook_secret=SECRET_A, store=f"sqlite:///{tmp_path}/3.db"
        )
        (probe,) = await r.wait_for(1)
        verify(probe, (SECRET_A,))
    down = await start_app(
        response_url=f"http://127.0.0.1:{free_port()}/x", check_response_url=True, store=f"sqlite:///{tmp_path}/2.db"
    )
    async with aiohttp.ClientSession() as session, session.get(down.admin + "/readyz") as resp:
        assert resp.status == 200  # reported, never refused
        assert (await resp.json())["details"]["response_url"] == "unreachable"


# --- helpers ---------------------------------------------------------------------


async def dead_letters(s: Running, count: int) -> list[DeadLetter]:
    async def probe() -> list[DeadLetter] | None:
        letters = await s.app.store.list_dead_letters()
        return letters if len(letters) >= count else None

    result: list[DeadLetter] = await eventually(probe, what=f"{count} dead letters")
    return result


async def head_attempted(s: Running, conversation: str) -> float:
    """The next attempt time of the conversation's head once a failed attempt is recorded."""

    async def probe() -> float | None:
        head = await head_delivery(s.app.store, conversation)
        return head.next_attempt_at if head is not None and head.attempts >= 1 else None

    when: float = await eventually(probe, what="a failed attempt")
    return when


@pytest.mark.parametrize(
    "headers", [{"Retry-After": "²"}, {"Retry-After": "٣"}, {}], ids=["superscript-two", "arabic-three", "plain"]
)
async def test_a_receiver_answer_is_read_within_a_limit_and_odd_headers_change_nothing(
    start_app: StartApp, headers: dict[str, str]
) -> None:
    # 200 with a 4 MiB body, or with a Retry-After of digits that are not ASCII: delivered once.
    async with StreamingServer([b" " * 65536] * 64, headers=headers) as receiver:
        s = await start_app(response_url=receiver.url)
        await send_texts(s, "c1", ["one"])

        async def delivered() -> bool:
            return await _outbox_empty(s, "c1") and await s.app.store.last_sequence("c1") == 1

        await eventually(delivered, what="the reply recorded as delivered")
        await asyncio.sleep(0.3)  # time for a wrong retry to show
    assert receiver.posts == 1
    assert parse_retry_after(headers.get("Retry-After"), 0.0) is None


async def test_the_backlog_gauges_show_what_is_owed_and_what_died(
    start_app: StartApp, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr("sidecar.app.HEALTH_INTERVAL", 0.05)
    async with Receiver() as r:
        r.script("c1", then=503)  # down for c1: its reply waits
        r.script("c2", 410)  # refused for good: dead
        s = await start_app(response_url=r.url, webhook_max_attempts=1000)
        await send_texts(s, "c1", ["a"])
        await send_texts(s, "c2", ["b"])

        async def gauges() -> bool:
            text = await admin_metrics(s)
            return "sidecar_dead_letters_held 1.0" in text and "sidecar_webhook_backlog_conversations 1.0" in text

        await eventually(gauges, what="one dead letter held, one conversation owed")


async def test_a_drain_that_runs_out_of_time_says_what_it_left(
    start_app: StartApp, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """Nothing is lost (a message stays pending, a reply stays queued), but the operator
    hears that drain_timeout ran out, and with how much left."""
    rules = tmp_path / "slow.yaml"
    rules.write_text(
        "rules:\n  - match: {text: slow}\n    replies: [{type: text, payload: {text: late}, delay: 60}]\n"
        "  - match: {}\n    replies: [{type: text, payload: {text: now}}]\n"
    )
    async with Receiver() as r:
        r.script("hung", hang=True)
        s = await start_app(
            response_url=r.url, webhook_timeout=30, bot="script", bot_script=str(rules), bot_timeout=120
        )
        await send_texts(s, "hung", ["stuck"])
        webhook = s.app.webhook
        assert webhook is not None
        await eventually(lambda: "hung" in webhook._in_flight, what="the hanging delivery in flight")
        await send_texts(s, "c1", ["slow"])
        await s.app.drain(0.2)
    lines = {rec.getMessage(): rec for rec in caplog.records if "drain timeout reached" in rec.getMessage()}
    core = lines["drain timeout reached: bot calls cut short, messages left pending for the next start"]
    assert core.levelname == "WARNING" and core.pending == 1  # type: ignore[attr-defined]
    hook = lines["drain timeout reached: webhook deliveries cut short, their replies stay queued"]
    assert hook.levelname == "WARNING" and hook.conversations == 1  # type: ignore[attr-defined]
    # A drain that finishes in time says nothing of the kind, though messages stay queued.
    caplog.clear()
    await s.app.stop()
    assert not [rec for rec in caplog.records if "drain timeout reached" in rec.getMessage()]


async def test_an_outbox_the_scheduler_cannot_read_is_counted_and_logged_without_a_flood(
    start_app: StartApp, caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    async with Receiver() as r:
        s = await start_app(response_url=r.url)

        async def broken(*args: Any, **kwargs: Any) -> Any:
            raise OSError("disk I/O error")

        monkeypatch.setattr(s.app.store, "due_deliveries", broken)
        await send_texts(s, "c1", ["hello"])

        async def counted() -> bool:
            return await metric(s, 'sidecar_store_errors_total{stage="delivery"}') >= 2

        await eventually(counted, what="two failed outbox reads counted")  # the scheduler retries each second
        monkeypatch.undo()
        await r.wait_for(1, conversation_id="c1")  # once it can read again, the reply goes out
    lines = [rec for rec in caplog.records if rec.getMessage().startswith("webhook scheduler cannot read")]
    assert len(lines) == 1 and lines[0].levelname == "ERROR" and not lines[0].exc_info
