"""Dead letters: visible, replayable in order with their webhook-id, purgeable — by API and CLI."""

from __future__ import annotations

import asyncio
import json
import sys
from pathlib import Path
from typing import Any

import pytest
from aiohttp import web

from sidecar.bots.script import ScriptBot, load_rules
from sidecar.errors import Unavailable
from sidecar.models import ReplyDraft
from tests.bot_server import BotServer
from tests.conftest import Running, StartApp, eventually, message
from tests.local_server import LocalServer
from tests.procs import free_port
from tests.receiver import Receiver
from tests.test_streams import read_n, subscribe
from tests.test_webhook_delivery import SECRET_A, dead_letters, send_texts

ADMIN = "admin-secret"


async def api(s: Running, method: str, path: str, body: Any = None, token: str | None = ADMIN) -> tuple[int, Any]:
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    async with s.session.request(method, s.admin + path, json=body, headers=headers) as resp:
        return resp.status, await resp.json()


async def cli(s: Running, *args: str) -> tuple[int, str, str]:
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "sidecar", "dlq", "--admin", s.admin, "--token", ADMIN, *args,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
    )  # fmt: skip
    out, err = await asyncio.wait_for(proc.communicate(), 30)
    assert proc.returncode is not None
    return proc.returncode, out.decode(), err.decode()


async def test_the_admin_api_is_closed_without_admin_tokens_and_refuses_wrong_ones(
    start_app: StartApp, tmp_path: Path
) -> None:
    s = await start_app()
    status, body = await api(s, "GET", "/v1/dead-letters")
    assert status == 401 and "SIDECAR_ADMIN_TOKENS" in body["error"]["message"]
    s2 = await start_app(admin_tokens=(ADMIN,), store=f"sqlite:///{tmp_path}/second.db")
    assert (await api(s2, "GET", "/v1/dead-letters", token="wrong"))[0] == 401
    assert (await api(s2, "GET", "/v1/dead-letters"))[0] == 200
    # probes stay open for kubelet
    async with s2.session.get(s2.admin + "/healthz") as resp:
        assert resp.status == 200
    # The POST routes asked with GET are a wrong method, not a dead letter named "replay".
    for path in ("/v1/dead-letters/replay", "/v1/dead-letters/purge"):
        async with s2.session.get(s2.admin + path, headers={"Authorization": f"Bearer {ADMIN}"}) as resp:
            assert resp.status == 405 and resp.headers["Allow"] == "POST"
            assert (await resp.json())["error"]["code"] == "method_not_allowed"


async def test_replaying_a_conversation_redelivers_its_dead_replies_in_order_with_their_webhook_ids(
    start_app: StartApp,
) -> None:
    async with Receiver() as r:
        r.script("c1", 400, 400)  # the first two replies are refused for good
        s = await start_app(response_url=r.url, admin_tokens=(ADMIN,), webhook_secret=SECRET_A)
        await send_texts(s, "c1", ["one", "two", "three"])
        await r.wait_for(1)
        await dead_letters(s, 2)
        status, listed = await api(s, "GET", "/v1/dead-letters?kind=reply&conversationId=c1")
        assert status == 200
        letters = listed["deadLetters"]
        assert [(d["sequence"], d["error"], d["body"]["payload"]["text"]) for d in letters] == [
            (1, "HTTP 400", "one"),
            (2, "HTTP 400", "two"),
        ]
        first_ids = [x.headers["webhook-id"] for x in r.requests[:2]]
        assert [d["webhookId"] for d in letters] == first_ids
        status, one = await api(s, "GET", f"/v1/dead-letters/{letters[0]['id']}")
        assert status == 200 and one["id"] == letters[0]["id"]
        status, answer = await api(s, "POST", "/v1/dead-letters/replay", {"conversationId": "c1"})
        assert (status, answer) == (200, {"replayed": 2})
        await r.wait_for(3)
    redelivered = [x for x in r.requests[3:] if x.status == 200]
    assert [x.body["payload"]["text"] for x in redelivered] == ["one", "two"]
    assert [x.headers["webhook-id"] for x in redelivered] == first_ids
    assert (await api(s, "GET", "/v1/dead-letters"))[1] == {"deadLetters": [], "more": False}
    # The replay's mark is for deliveries that read their queue before it: none is left.
    webhook = s.app.webhook
    assert webhook is not None
    await eventually(lambda: not webhook._replayed_at, what="the replay's mark dropped")


async def test_purge_deletes_dead_letters_and_unknown_ids_are_404(start_app: StartApp) -> None:
    async with Receiver() as r:
        r.script("c1", then=410)
        s = await start_app(response_url=r.url, admin_tokens=(ADMIN,))
        await send_texts(s, "c1", ["a", "b"])
        await dead_letters(s, 2)
    status, answer = await api(s, "POST", "/v1/dead-letters/purge", {"all": True})
    assert (status, answer) == (200, {"purged": 2})
    assert (await api(s, "GET", "/v1/dead-letters/nope"))[0] == 404
    status, body = await api(s, "POST", "/v1/dead-letters/replay", {})
    assert status == 400 and body["error"]["code"] == "invalid_argument"


async def test_a_message_the_bot_keeps_failing_is_dead_lettered_and_replayed_after_the_fix(
    start_app: StartApp, tmp_path: Path
) -> None:
    nowhere = f"http://127.0.0.1:{free_port()}/bot"  # nothing listens: every call fails
    store = f"sqlite:///{tmp_path}/kept.db"  # durable whatever SIDECAR_TEST_STORE says: a restart
    broken = await start_app(store=store, bot="http", bot_url=nowhere, bot_max_attempts=2, bot_backoff_initial=0.01)
    await broken.post(message(text="help"))
    (letter,) = await dead_letters(broken, 1)
    assert letter.kind == "message" and letter.attempts == 2 and letter.error.startswith("cannot reach the bot")
    assert letter.body["text"] == "help"
    await broken.app.drain(0.5)
    await broken.app.stop()
    fixed = await start_app(store=store, admin_tokens=(ADMIN,))  # same SQLite file, echo bot
    status, answer = await api(fixed, "POST", "/v1/dead-letters/replay", {"ids": [letter.id]})
    assert (status, answer) == (200, {"replayed": 1})

    async def replied() -> bool:
        return await fixed.app.store.last_sequence("c1") == 1

    await eventually(replied, what="the replayed message's reply")


async def test_the_cli_lists_shows_replays_and_purges(start_app: StartApp) -> None:
    async with Receiver() as r:
        r.script("c1", 400)
        r.script("c2", 400)
        s = await start_app(response_url=r.url, admin_tokens=(ADMIN,))
        await send_texts(s, "c1", ["x"])
        await send_texts(s, "c2", ["y"])
        await dead_letters(s, 2)
        code, out, err = await cli(s, "list")
        assert code == 0, err
        listed = [json.loads(line) for line in out.splitlines()]
        assert sorted(d["conversationId"] for d in listed) == ["c1", "c2"]
        code, out, _ = await cli(s, "show", listed[0]["id"])
        assert code == 0 and json.loads(out)["id"] == listed[0]["id"]
        c1 = next(d["id"] for d in listed if d["conversationId"] == "c1")
        code, out, _ = await cli(s, "replay", c1, "--kind", "message")  # it is a reply: not selected
        assert code == 0 and json.loads(out) == {"replayed": 0}
        code, out, _ = await cli(s, "replay", "--conversation", "c1")
        assert code == 0 and json.loads(out) == {"replayed": 1}
        await r.wait_for(1, conversation_id="c1")
        code, out, _ = await cli(s, "purge", "--all")
        assert code == 0 and json.loads(out) == {"purged": 1}
        code, _, err = await cli(s, "replay")
        assert code == 2 and "exactly one" in err
        code, _, err = await cli(s, "show", "missing")
        assert code == 1 and "404" in err


@pytest.mark.parametrize(
    "bad",
    [
        "{type: text, payload: {n: 1152921504606846976}}",  # google.protobuf.Value cannot carry it exactly
        "{type: text, payload: {n: 1}}, {type: text, payload: {n: .nan}, delay: 0.01}",  # one emitted, then invalid
        "{type: text, payload: {1: one}}",  # YAML keys need not be strings; JSON's must
    ],
)
async def test_a_reply_the_protocols_cannot_carry_dead_letters_its_message_and_the_conversation_goes_on(
    start_app: StartApp, tmp_path: Path, bad: str
) -> None:
    rules = tmp_path / "bad.yaml"
    rules.write_text(
        f"rules:\n  - match: {{text: bad}}\n    replies: [{bad}]\n"
        "default:\n  replies: [{type: text, payload: {text: ok}}]\n"
    )
    good = tmp_path / "good.yaml"
    good.write_text("default:\n  replies: [{type: text, payload: {text: ok}}]\n")
    s = await start_app(bot="script", bot_script=str(good))
    # The script bot refuses such rules at start; any other bot can still give such
    # replies at run time (an HTTP bot's big integer): the core's own check is tested here.
    bot = s.app.bot
    assert isinstance(bot, ScriptBot)
    bot._rules, bot._default = load_rules(str(rules))
    assert (await s.post(message(message_id="m1", text="bad"))).status == 200
    assert (await s.post(message(message_id="m2", text="fine"))).status == 200
    (letter,) = await dead_letters(s, 1)
    assert letter.kind == "message" and letter.attempts == 1
    assert letter.error.startswith("the bot gave an invalid reply")
    # Whatever the log holds replays to a subscriber: nothing in it breaks Subscribe.
    replies = await read_n(subscribe(s, "c1", after=0), 1 + ("delay" in bad))
    assert replies[-1].payload.struct_value["text"] == "ok"


async def test_replaying_everything_while_the_receiver_still_refuses_ends(start_app: StartApp) -> None:
    """Replies refused again during a replay become new dead letters; the replay takes
    only those dead before it began, instead of chasing its own for ever."""
    async with Receiver() as r:
        r.script("c1", then=400)  # refused for good, however often
        s = await start_app(response_url=r.url, admin_tokens=(ADMIN,))
        await send_texts(s, "c1", [f"t{i}" for i in range(5)])
        await dead_letters(s, 5)
        async with asyncio.timeout(20):
            status, answer = await api(s, "POST", "/v1/dead-letters/replay", {"all": True})
        assert (status, answer) == (200, {"replayed": 5})
        await dead_letters(s, 5)  # refused again: dead again, once each


class SlowReceiver(LocalServer):
    """Refuses the text "first" once (400: dead-lettered), answers the rest after 0.1 s."""

    def __init__(self) -> None:
        super().__init__("/replies")
        self.seen: list[str] = []

    async def handle(self, request: web.Request) -> web.Response:
        text = (await request.json())["payload"]["text"]
        if text == "first" and "first(400)" not in self.seen:
            self.seen.append("first(400)")
            return web.Response(status=400)
        await asyncio.sleep(0.1)
        self.seen.append(text)
        return web.Response(status=200)


async def test_a_replayed_reply_goes_before_the_later_replies_a_delivery_holds(start_app: StartApp) -> None:
    async with SlowReceiver() as r:
        s = await start_app(response_url=r.url, admin_tokens=(ADMIN,))
        await send_texts(s, "c1", ["first"])
        await dead_letters(s, 1)
        for i in range(2, 7):
            assert (await s.post(message("c1", f"c1-n{i}", f"r{i}"))).status == 200
        await eventually(lambda: "r2" in r.seen, what="r2 delivered")  # r3..r6 in the delivery's hands
        before = len(r.seen)
        assert (await api(s, "POST", "/v1/dead-letters/replay", {"all": True}))[1] == {"replayed": 1}
        await eventually(lambda: len(r.seen) == 7, what="every reply delivered")
    # Next after the POST under way when it was replayed, before every later reply
    # (not after the page of later replies the delivery held).
    assert r.seen.index("first") <= before + 1 < 6
    assert [t for t in r.seen if t.startswith("r")] == ["r2", "r3", "r4", "r5", "r6"]


async def test_replies_queued_for_a_webhook_are_dead_lettered_when_it_is_no_longer_configured(
    start_app: StartApp, tmp_path: Path
) -> None:
    store = f"sqlite:///{tmp_path}/kept.db"
    async with Receiver() as r:
        r.script("c1", then=503)
        r.script("c2", then=503)
        s = await start_app(store=store, response_url=r.url, webhook_max_attempts=1000)
        await send_texts(s, "c1", ["a", "b"])
        await send_texts(s, "c2", ["c"])
        await r.wait_for(2, ok=False)
        await s.app.drain(1.0)
        await s.app.stop()
    s = await start_app(store=store, admin_tokens=(ADMIN,))  # the response URL removed
    letters = (await api(s, "GET", "/v1/dead-letters?kind=reply"))[1]["deadLetters"]
    assert sorted((d["conversationId"], d["sequence"]) for d in letters) == [("c1", 1), ("c1", 2), ("c2", 1)]
    assert all("no response URL" in d["error"] for d in letters)
    assert await s.app.store.due_deliveries(1e18, 10) == []


async def test_replies_cannot_be_replayed_without_a_response_url(start_app: StartApp) -> None:
    """Nothing would deliver them: refused (409 failed_precondition), the letters untouched."""
    s = await start_app(admin_tokens=(ADMIN,))
    await s.post(message(type="image", payload={"url": "x"}))
    (reply,) = await s.app.store.append_replies("c1", [ReplyDraft("text", {"text": "a"}, "k")], now=1.0, outbox=True)
    letter = await s.app.store.delivery_dead("c1", reply.sequence, attempts=3, error="HTTP 410", now=2.0)
    for body in ({"all": True}, {"ids": [letter.id]}, {"conversationId": "c1"}):
        status, answer = await api(s, "POST", "/v1/dead-letters/replay", body)
        assert status == 409 and answer["error"]["code"] == "failed_precondition", body
        assert "SIDECAR_RESPONSE_URL" in answer["error"]["message"]
    assert await api(s, "POST", "/v1/dead-letters/replay", {"all": True, "kind": "message"}) == (200, {"replayed": 0})
    status, answer = await api(s, "POST", "/v1/dead-letters/replay", {})  # no selection: a 400 first
    assert status == 400 and answer["error"]["code"] == "invalid_argument"
    # Ambiguous or mistyped selections are refused, naming what is wrong, before anything moves.
    ambiguous: list[tuple[dict[str, Any], str]] = [
        ({"ids": [letter.id], "all": True}, "selection"),
        ({"all": True, "conversationId": "c1"}, "selection"),
        ({"all": "yes"}, "all"),
        ({"conversationId": 7}, "conversationId"),
        ({"all": True, "kind": "replies"}, "kind"),
    ]
    for body, field in ambiguous:
        for action in ("replay", "purge"):
            status, answer = await api(s, "POST", f"/v1/dead-letters/{action}", body)
            assert status == 400 and [d["field"] for d in answer["error"]["details"]] == [field], (action, body)
    (kept,) = await s.app.store.list_dead_letters()
    assert (kept.id, kept.error, kept.attempts) == (letter.id, "HTTP 410", 3)


async def test_the_list_says_when_there_are_more_and_refuses_a_limit_out_of_range(start_app: StartApp) -> None:
    s = await start_app(admin_tokens=(ADMIN,))
    await s.post(message(type="image", payload={"url": "x"}))
    for n in range(3):
        (reply,) = await s.app.store.append_replies("c1", [ReplyDraft("t", {"n": n}, f"k{n}")], now=1.0, outbox=True)
        await s.app.store.delivery_dead("c1", reply.sequence, attempts=1, error="HTTP 410", now=2.0)
    status, answer = await api(s, "GET", "/v1/dead-letters?limit=2")
    assert status == 200 and len(answer["deadLetters"]) == 2 and answer["more"] is True
    assert (await api(s, "GET", "/v1/dead-letters?limit=3"))[1]["more"] is False
    for bad in ("0", "-3", "1001", "x", "1e3"):
        status, answer = await api(s, "GET", f"/v1/dead-letters?limit={bad}")
        assert status == 400 and answer["error"]["details"][0]["field"] == "limit", bad
    code, out, err = await cli(s, "list", "--limit", "2")
    assert code == 0 and len(out.splitlines()) == 2 and "there are more" in err
    # Page by page with the cursor each page gives: every letter once, in order.
    status, first = await api(s, "GET", "/v1/dead-letters?limit=2")
    status, second = await api(s, "GET", f"/v1/dead-letters?limit=2&after={first['next']}")
    assert status == 200 and second["more"] is False and "next" not in second
    ids = [d["id"] for d in first["deadLetters"] + second["deadLetters"]]
    assert ids == [d.id for d in await s.app.store.list_dead_letters()] and len(ids) == 3
    code, out, err = await cli(s, "list", "--limit", "2", "--after", first["next"])
    assert code == 0 and [json.loads(line)["id"] for line in out.splitlines()] == ids[2:] and err == ""
    assert (await api(s, "GET", "/v1/dead-letters?after=x"))[0] == 400


class GatedReceiver(LocalServer):
    """Refuses "first" once (400); holds "block" until released; answers the rest at once."""

    def __init__(self) -> None:
        super().__init__("/replies")
        self.seen: list[str] = []
        self.gate = asyncio.Event()

    async def handle(self, request: web.Request) -> web.Response:
        text = (await request.json())["payload"]["text"]
        if text == "first" and "first(400)" not in self.seen:
            self.seen.append("first(400)")
            return web.Response(status=400)
        if text == "block":
            await self.gate.wait()
        self.seen.append(text)
        return web.Response(status=200)


async def test_a_replay_while_a_delivery_waits_for_a_slot_still_goes_first(start_app: StartApp) -> None:
    async with GatedReceiver() as r:
        s = await start_app(response_url=r.url, admin_tokens=(ADMIN,), webhook_concurrency=1)
        await send_texts(s, "c1", ["first"])
        await dead_letters(s, 1)
        await send_texts(s, "c2", ["block"])  # takes the only slot, and keeps it
        await asyncio.sleep(0.2)
        assert (await s.post(message("c1", "c1-n2", "r2"))).status == 200  # its delivery waits for the slot
        await asyncio.sleep(0.2)
        assert (await api(s, "POST", "/v1/dead-letters/replay", {"all": True}))[1] == {"replayed": 1}
        r.gate.set()
        await eventually(lambda: len(r.seen) == 4, what="every reply delivered")
    assert r.seen == ["first(400)", "block", "first", "r2"]


async def test_replies_that_died_out_of_order_are_replayed_in_sequence_order(
    start_app: StartApp, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Reply 1 died again after a first replay, so its letter is newer than reply 2's:
    replayed one commit at a time in the order they died, 2 used to be POSTed before 1."""
    async with Receiver() as r:
        r.script("c1", 400, 400, 400)
        s = await start_app(response_url=r.url, admin_tokens=(ADMIN,))
        await send_texts(s, "c1", ["one", "two"])
        first, _ = await dead_letters(s, 2)
        assert (await api(s, "POST", "/v1/dead-letters/replay", {"ids": [first.id]}))[0] == 200
        await r.wait_for(3, ok=False)  # reply 1 refused again: a new letter, after reply 2's
        await dead_letters(s, 2)
        # The worker wakes between the two letters' commits (as anything else queued
        # meanwhile would make it), with time to start a POST if it may.
        store, webhook = s.app.store, s.app.webhook
        assert webhook is not None
        real = store.replay_dead_letter

        async def then_wake(dead_letter_id: str, *, now: float) -> bool:
            done = await real(dead_letter_id, now=now)
            webhook.notify("c1")
            await asyncio.sleep(0.2)
            return done

        monkeypatch.setattr(store, "replay_dead_letter", then_wake)
        assert (await api(s, "POST", "/v1/dead-letters/replay", {"conversationId": "c1"})) == (200, {"replayed": 2})
        await r.wait_for(2)
    assert [x["payload"]["text"] for x in r.delivered("c1")] == ["one", "two"]


async def test_a_replayed_message_runs_before_newer_ones_still_waiting_in_its_conversation(
    start_app: StartApp,
) -> None:
    """Where a restart would run it: by arrival, not behind messages that came after it."""
    gate, calls = asyncio.Event(), []

    async def handler(body: Any) -> tuple[int, Any]:
        calls.append(body["text"])
        if body["text"] == "bad" and calls.count("bad") == 1:
            return 400, None  # refused: dead-lettered at once
        if body["text"] == "slow":
            await gate.wait()
        return 200, []

    async with BotServer(handler) as bot:
        s = await start_app(bot="http", bot_url=bot.url, admin_tokens=(ADMIN,), bot_max_attempts=1)
        await s.post(message("c1", "m1", "bad"))
        (letter,) = await dead_letters(s, 1)
        await s.post(message("c1", "m2", "slow"))
        await s.post(message("c1", "m3", "after"))
        await eventually(lambda: calls == ["bad", "slow"], what="m2 running, m3 waiting")
        assert (await api(s, "POST", "/v1/dead-letters/replay", {"ids": [letter.id]}))[0] == 200
        gate.set()
        await eventually(lambda: len(calls) == 4, what="every message run")
    assert calls == ["bad", "slow", "bad", "after"]


async def test_a_replay_whose_answer_was_lost_still_runs_the_message(
    start_app: StartApp, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The store put the letter back but the answer was lost (Redis can): the operator's
    retry finds no letter, so the core itself must load what may now be pending."""
    runs = []

    async def handler(body: Any) -> tuple[int, Any]:
        runs.append(body["text"])
        return (400, None) if len(runs) == 1 else (200, [])

    async with BotServer(handler) as bot:
        s = await start_app(bot="http", bot_url=bot.url, admin_tokens=(ADMIN,), bot_max_attempts=1)
        await s.post(message("c1", "m1", "hi"))
        (letter,) = await dead_letters(s, 1)
        store = s.app.store
        real = store.replay_dead_letter

        async def lost(dead_letter_id: str, *, now: float) -> bool:
            await real(dead_letter_id, now=now)
            raise Unavailable("the store is unreachable; try again")

        monkeypatch.setattr(store, "replay_dead_letter", lost)
        assert (await api(s, "POST", "/v1/dead-letters/replay", {"ids": [letter.id]}))[0] == 503
        monkeypatch.undo()
        await eventually(lambda: runs == ["hi", "hi"], what="the replayed message run")


async def test_a_replay_of_all_holds_each_conversation_only_while_its_own_letters_go_back(
    start_app: StartApp, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A replay of tens of thousands of letters must not stop every conversation it
    touches from being delivered until the very last letter is back."""
    async with Receiver() as r:
        for c in ("c1", "c2", "c3"):
            r.script(c, 400, 400)
        s = await start_app(response_url=r.url, admin_tokens=(ADMIN,))
        order = [("c2", "one"), ("c1", "one"), ("c3", "one"), ("c3", "two"), ("c1", "two"), ("c2", "two")]
        for i, (c, text) in enumerate(order):
            assert (await s.post(message(c, f"{c}-{text}", text))).status == 200
            await dead_letters(s, i + 1)  # in this order: letters of different conversations interleave
        store, webhook = s.app.store, s.app.webhook
        assert webhook is not None
        real = store.replay_dead_letter
        seen: list[tuple[str, list[str]]] = []  # (the letter's conversation, conversations held then)

        async def recorded(dead_letter_id: str, *, now: float) -> bool:
            letter = await store.get_dead_letter(dead_letter_id)
            assert letter is not None
            seen.append((letter.conversation_id, sorted(webhook._held)))
            return await real(dead_letter_id, now=now)

        monkeypatch.setattr(store, "replay_dead_letter", recorded)
        assert (await api(s, "POST", "/v1/dead-letters/replay", {"all": True})) == (200, {"replayed": 6})
        await r.wait_for(6)
    assert all(held == [conversation] for conversation, held in seen), seen
    assert [c for c, _ in seen][::2] == [c for c, _ in seen][1::2]  # a conversation's two letters together
    for c in ("c1", "c2", "c3"):
        assert [x["payload"]["text"] for x in r.delivered(c)] == ["one", "two"]
