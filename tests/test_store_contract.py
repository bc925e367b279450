"""One contract, every store: the same tests run against memory, SQLite and Redis."""

from __future__ import annotations

import asyncio
import os
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path

import pytest

from sidecar.errors import Conflict
from sidecar.models import Delivery, InboundMessage, ReplyDraft, reply_key
from sidecar.store.base import ERROR_LIMIT, Store
from sidecar.store.memory import MemoryStore
from sidecar.store.redis import RedisStore, RedisStoreError
from sidecar.store.sqlite import SqliteStore

Factory = Callable[..., Awaitable[Store]]

REDIS_URL = os.environ.get("REDIS_URL", "redis://127.0.0.1:6379/15")


def redis_url(prefix: str) -> str:
    """REDIS_URL with a key prefix of its own, so tests never see each other's keys."""
    return f"{REDIS_URL}{'&' if '?' in REDIS_URL else '?'}prefix={prefix}"


async def open_redis_or_skip(store: RedisStore) -> None:
    """Open a Redis store; no server is a skip on a laptop and a failure in CI (CI=true)."""
    try:
        await store.open()
    except RedisStoreError as e:
        if os.environ.get("CI") == "true":
            pytest.fail(f"Redis is required in CI (REDIS_URL={REDIS_URL}) but unreachable: {e}")
        pytest.skip(f"no Redis at REDIS_URL ({e})")


@pytest.fixture(params=["memory", "sqlite", "redis"])
async def make_store(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[Factory]:
    opened: list[Store] = []

    async def make(retention: int = 10000) -> Store:
        if request.param == "memory":
            store: Store = MemoryStore(retention=retention)
        elif request.param == "sqlite":
            store = SqliteStore(str(tmp_path / f"s{len(opened)}.db"), sync="normal", retention=retention)
        else:
            store = RedisStore(redis_url(f"test-{uuid.uuid4().hex}:"), retention=retention)
            await open_redis_or_skip(store)
            opened.append(store)
            return store
        await store.open()
        opened.append(store)
        return store

    yield make
    for store in opened:
        if isinstance(store, RedisStore):
            # A test may have closed it (close is idempotent): reopen to clean up its keys.
            await store.open()
            await store.drop()
        await store.close()


@pytest.fixture
async def store(make_store: Factory) -> Store:
    return await make_store()


def msg(conversation: str = "c1", message_id: str = "m1", text: str = "hi", user: str = "u1") -> InboundMessage:
    return InboundMessage.normalized(
        user_id=user, message_id=message_id, conversation_id=conversation, type="text", text=text, payload=None
    )


async def head_delivery(store: Store, conversation_id: str) -> Delivery | None:
    """The conversation's lowest queued reply, due or not; None when its outbox is empty."""
    queued = await store.queued_deliveries(conversation_id, 1)
    return queued[0] if queued else None


def draft(key: str, text: str = "r") -> ReplyDraft:
    return ReplyDraft(type="text", payload={"text": text}, dedupe_key=key, user_id="u1", bot_message_id=f"bm-{key}")


async def test_accept_stores_a_pending_message_and_recognises_a_duplicate(store: Store) -> None:
    first = await store.accept(msg(), now=1.0)
    assert not first.duplicate
    again = await store.accept(msg(), now=2.0)
    assert again.duplicate and again.stored.id == first.stored.id and again.stored.received_at == 1.0
    assert [m.id for m in await store.pending_messages(10)] == [first.stored.id]
    assert again.pending and (await store.known(msg())).pending  # type: ignore[union-attr]
    await store.finish_message(first.stored.id, "c1", [], now=3.0, outbox=False)
    done = await store.accept(msg(), now=4.0)
    assert done.duplicate and not done.pending and not (await store.known(msg())).pending  # type: ignore[union-attr]


async def test_same_message_id_with_other_content_is_a_conflict(store: Store) -> None:
    await store.accept(msg(text="one"), now=1.0)
    with pytest.raises(Conflict):
        await store.accept(msg(text="two"), now=1.0)


async def test_same_message_id_in_another_conversation_is_another_message(store: Store) -> None:
    a = await store.accept(msg("c1"), now=1.0)
    b = await store.accept(msg("c2"), now=1.0)
    assert not b.duplicate and a.stored.id != b.stored.id


async def test_pending_messages_come_in_arrival_order_and_leave_when_completed(store: Store) -> None:
    ids = [(await store.accept(msg(message_id=f"m{i}"), now=10.0 - i)).stored.id for i in range(5)]
    assert [m.id for m in await store.pending_messages(3)] == ids[:3]
    await store.finish_message(ids[1], "c1", [], now=1.0, outbox=False)
    assert [m.id for m in await store.pending_messages(10)] == [ids[0], *ids[2:]]


async def test_attempts_are_counted_and_a_dead_message_can_be_replayed(store: Store) -> None:
    stored = (await store.accept(msg(), now=1.0)).stored
    assert await store.record_attempt(stored.id, "boom") == 1
    assert await store.record_attempt(stored.id, "boom") == 2
    letter = await store.dead_letter_message(stored.id, "gave up", now=5.0)
    assert letter is not None
    assert letter.kind == "message" and letter.attempts == 2 and letter.body["messageId"] == "m1"
    assert await store.pending_messages(10) == []
    assert await store.replay_dead_letter(letter.id, now=6.0)
    (again,) = await store.pending_messages(10)
    assert again.id == stored.id and again.attempts == 0
    assert await store.get_dead_letter(letter.id) is None


async def test_sequences_start_at_one_and_have_no_gaps(store: Store) -> None:
    replies = await store.append_replies("c1", [draft("a"), draft("b")], now=1.0, outbox=False)
    assert [r.sequence for r in replies] == [1, 2]
    more = await store.append_replies("c1", [draft("c")], now=2.0, outbox=False)
    assert [r.sequence for r in more] == [3]
    assert await store.last_sequence("c1") == 3
    assert await store.last_sequence("other") == 0
    other = await store.append_replies("c2", [draft("a")], now=1.0, outbox=False)
    assert [r.sequence for r in other] == [1]


async def test_concurrent_appends_to_one_conversation_stay_gapless(store: Store) -> None:
    results = await asyncio.gather(
        *(store.append_replies("c1", [draft(f"k{i}")], now=1.0, outbox=True) for i in range(200))
    )
    sequences = sorted(r.sequence for batch in results for r in batch)
    assert sequences == list(range(1, 201))
    assert [r.sequence for r in await store.replies_after("c1", 0, 1000)] == list(range(1, 201))


async def test_a_known_dedupe_key_is_not_appended_twice(store: Store) -> None:
    await store.append_replies("c1", [draft("a")], now=1.0, outbox=True)
    again = await store.append_replies("c1", [draft("a"), draft("b")], now=2.0, outbox=True)
    assert [(r.sequence, r.payload) for r in again] == [(2, {"text": "r"})]
    assert [d.reply.sequence for d in [await head_delivery(store, "c1")] if d] == [1]


async def test_replies_after_pages_in_order_with_every_field(store: Store) -> None:
    d = ReplyDraft("card", {"x": [1, 2.5, None]}, "k", "u1", "m1", "bu", "bm", "bc")
    await store.append_replies("c1", [d, draft("b")], now=7.0, outbox=False)
    (r,) = await store.replies_after("c1", 0, 1)
    assert (r.conversation_id, r.sequence, r.type, r.payload) == ("c1", 1, "card", {"x": [1, 2.5, None]})
    assert (r.user_id, r.in_reply_to, r.bot_user_id, r.bot_message_id, r.bot_conversation_id) == (
        "u1", "m1", "bu", "bm", "bc"
    )  # fmt: skip
    assert r.created_at == 7.0
    assert [x.sequence for x in await store.replies_after("c1", 1, 10)] == [2]


async def test_replies_after_stops_at_a_byte_budget_but_returns_at_least_one(store: Store) -> None:
    # A page waits in memory while a slow client reads it: large replies make small pages.
    big = [draft(f"k{i}", "x" * 300_000) for i in range(6)]
    await store.append_replies("c1", big, now=1.0, outbox=False)
    assert [r.sequence for r in await store.replies_after("c1", 0, 256, 1_000_000)] == [1, 2, 3]
    assert [r.sequence for r in await store.replies_after("c1", 3, 256, 1_000_000)] == [4, 5, 6]
    assert [r.sequence for r in await store.replies_after("c1", 0, 256, 1000)] == [1]  # one, however large
    assert [r.sequence for r in await store.replies_after("c1", 0, 2, 1_000_000)] == [1, 2]  # and the count
    assert len(await store.replies_after("c1", 0, 256)) == 6  # no budget: the count alone
    await store.append_replies("c2", [draft(f"s{i}") for i in range(100)], now=1.0, outbox=False)
    small = await store.replies_after("c2", 0, 256, 1_000_000)  # many small ones: all of them, in order
    assert [r.sequence for r in small] == list(range(1, 101))


async def test_replies_a_pending_or_dead_message_emitted_are_kept_for_its_next_run(make_store: Factory) -> None:
    """A message's next run (a retry, a replay of its dead letter) finds the replies it
    emitted by their keys: trimmed first, they would be appended again, with new ids."""
    store = await make_store(retention=2)
    stored = (await store.accept(msg(), now=1.0)).stored
    early = ReplyDraft("text", {"text": "working on it"}, reply_key(stored.id, stored.received_at, 0), "u1", "m1")
    await store.append_replies("c1", [early], now=1.0, outbox=False)  # sequence 1, emitted early
    await store.append_replies("c1", [draft(f"k{i}") for i in range(4)], now=1.0, outbox=False)
    assert await store.first_retained_sequence("c1") == 1  # kept while the message is pending
    assert await store.expire_replies(before=10.0, after="", limit=10) == (0, "")
    await store.dead_letter_message(stored.id, "the bot failed", now=2.0)
    await store.append_replies("c1", [draft("k4")], now=2.0, outbox=False)
    assert await store.first_retained_sequence("c1") == 1  # and while it is dead-lettered
    (letter,) = await store.list_dead_letters()
    assert await store.replay_dead_letter(letter.id, now=3.0)  # pending again: its run finds the key
    again = await store.finish_message(stored.id, "c1", [early], now=3.0, outbox=False, keyed=True)
    assert again == []  # not appended twice
    await store.append_replies("c1", [draft("k5")], now=4.0, outbox=False)
    assert await store.first_retained_sequence("c1") == 7 - 2 + 1  # handled: trimmed as any other


async def test_a_held_reply_far_into_the_range_still_stops_the_trim(make_store: Factory) -> None:
    store = await make_store(retention=2)
    callbacks = [draft(f"callback/{i}") for i in range(150)]  # keyed, but no message holds them
    await store.append_replies("c1", callbacks, now=1.0, outbox=False)
    stored = (await store.accept(msg(), now=1.0)).stored
    held = ReplyDraft("text", {"text": "working"}, reply_key(stored.id, stored.received_at, 0), "u1", "m1")
    await store.append_replies("c1", [held], now=1.0, outbox=False)  # sequence 151
    await store.append_replies("c1", [draft(f"k{i}") for i in range(3)], now=1.0, outbox=False)
    assert await store.first_retained_sequence("c1") == 151


async def test_finishing_a_message_lets_its_emitted_replies_go_at_once(make_store: Factory) -> None:
    """The stores agree: a message finishes before its step trims, so what it emitted is
    trimmed by that very step when retention says so."""
    store = await make_store(retention=1)
    stored = (await store.accept(msg(), now=1.0)).stored
    early = ReplyDraft("text", {"text": "working"}, reply_key(stored.id, stored.received_at, 0), "u1", "m1")
    await store.append_replies("c1", [early], now=1.0, outbox=False)
    await store.finish_message(stored.id, "c1", [draft("answer")], now=2.0, outbox=False, keyed=False)
    assert await store.first_retained_sequence("c1") == 2


async def test_retention_trims_old_replies_but_never_undelivered_or_dead_ones(make_store: Factory) -> None:
    store = await make_store(retention=3)
    await store.append_replies("c1", [draft(f"k{i}") for i in range(5)], now=1.0, outbox=False)
    assert await store.first_retained_sequence("c1") == 3
    assert [r.sequence for r in await store.replies_after("c1", 0, 10)] == [3, 4, 5]
    # With an outbox: sequence 6 stays queued, so nothing from 6 on may be trimmed.
    await store.append_replies("c2", [draft("a")], now=1.0, outbox=True)
    await store.append_replies("c2", [draft(f"k{i}") for i in range(6)], now=1.0, outbox=False)
    assert await store.first_retained_sequence("c2") == 1
    await store.delivery_dead("c2", 1, attempts=3, error="HTTP 400", now=2.0)
    await store.append_replies("c2", [draft("z")], now=3.0, outbox=False)
    assert await store.first_retained_sequence("c2") == 1  # pinned by the dead letter
    (letter,) = await store.list_dead_letters()
    await store.purge_dead_letters([letter.id])
    await store.append_replies("c2", [draft("y")], now=3.0, outbox=False)
    assert await store.first_retained_sequence("c2") == 9 - 3 + 1


async def test_dedupe_keys_are_remembered_while_their_replies_are_retained(make_store: Factory) -> None:
    store = await make_store(retention=2)
    await store.append_replies("c1", [draft("k1"), draft("k2"), draft("k3")], now=1.0, outbox=False)
    assert await store.append_replies("c1", [draft("k2"), draft("k3")], now=2.0, outbox=False) == []
    # k1's reply was trimmed, and its key with it (keys stay bounded like the log): it is new again.
    assert [r.sequence for r in await store.append_replies("c1", [draft("k1")], now=3.0, outbox=False)] == [4]


async def test_a_purge_that_unpins_replies_leaves_trimming_to_the_next_append(make_store: Factory) -> None:
    """The same in every store: purging a dead reply neither trims at once nor forgets keys."""
    store = await make_store(retention=1)
    await store.append_replies("c", [draft("k1")], now=1.0, outbox=True)
    await store.delivery_dead("c", 1, attempts=1, error="HTTP 400", now=2.0)
    for key in ("k2", "k3"):
        (reply,) = await store.append_replies("c", [draft(key)], now=3.0, outbox=True)
        await store.delivery_succeeded("c", reply.sequence)
    (letter,) = await store.list_dead_letters()
    assert await store.purge_dead_letters([letter.id]) == 1
    assert await store.first_retained_sequence("c") == 1
    assert await store.append_replies("c", [draft("k1")], now=4.0, outbox=False) == []  # a retried callback
    assert await store.first_retained_sequence("c") == 1  # an append that added nothing trimmed nothing
    assert await store.append_replies("c", [draft("k2")], now=4.0, outbox=False) == []  # k2 is still known
    await store.append_replies("c", [draft("k4")], now=5.0, outbox=False)
    assert await store.first_retained_sequence("c") == 4  # the next append trims to retention


async def test_finishing_without_replies_trims_nothing_and_with_replies_trims_to_retention(make_store: Factory) -> None:
    """The same in every store: only a finish that brings replies trims, like an append."""
    store = await make_store(retention=1)
    await store.append_replies("c1", [draft("k1")], now=1.0, outbox=True)
    await store.delivery_dead("c1", 1, attempts=1, error="HTTP 400", now=2.0)
    (reply,) = await store.append_replies("c1", [draft("k2")], now=3.0, outbox=True)
    await store.delivery_succeeded("c1", reply.sequence)
    (letter,) = await store.list_dead_letters()
    await store.purge_dead_letters([letter.id])  # sequence 1 is no longer pinned
    quiet = await store.accept(msg(message_id="m1"), now=4.0)
    assert await store.finish_message(quiet.stored.id, "c1", [], now=4.0, outbox=True) == []
    assert await store.first_retained_sequence("c1") == 1
    talking = await store.accept(msg(message_id="m2"), now=5.0)
    await store.finish_message(talking.stored.id, "c1", [draft("m2/0")], now=5.0, outbox=False)
    assert await store.first_retained_sequence("c1") == 3


async def test_dead_letters_are_listed_page_by_page_from_a_position(store: Store) -> None:
    await store.append_replies("c1", [draft(f"k{i}") for i in range(5)], now=1.0, outbox=True)
    for sequence in range(1, 6):
        await store.delivery_dead("c1", sequence, attempts=1, error="HTTP 410", now=2.0)
    first = await store.list_dead_letters(limit=2)
    assert [d.sequence for d in first] == [1, 2] and first[0].position < first[1].position
    rest = await store.list_dead_letters(limit=10, after=first[-1].position)
    assert [d.sequence for d in rest] == [3, 4, 5]
    await store.purge_dead_letters([rest[0].id])  # gone between pages: the cursor still holds
    assert [d.sequence for d in await store.list_dead_letters(limit=10, after=first[-1].position)] == [4, 5]
    assert await store.list_dead_letters(limit=10, after=rest[-1].position) == []


async def test_the_backlog_counts_dead_letters_and_conversations_owed(store: Store) -> None:
    assert await store.backlog() == (0, 0)
    await store.append_replies("c1", [draft("a"), draft("b")], now=1.0, outbox=True)
    await store.append_replies("c2", [draft("a")], now=1.0, outbox=True)
    assert await store.backlog() == (0, 2)  # conversations, not replies
    await store.delivery_dead("c2", 1, attempts=3, error="HTTP 410", now=2.0)
    assert await store.backlog() == (1, 1)
    await store.delivery_succeeded("c1", 1)
    await store.delivery_succeeded("c1", 2)
    assert await store.backlog() == (1, 0)


async def test_unknown_conversation_has_nothing_trimmed_and_no_user(store: Store) -> None:
    assert await store.first_retained_sequence("nope") == 1
    assert await store.conversation_user("nope") is None
    await store.accept(msg(user="alice"), now=1.0)
    await store.accept(msg(message_id="m2", user="bob"), now=1.0)
    assert await store.conversation_user("c1") == "bob"


async def test_heads_set_beyond_any_wait_count_as_due_when_asked(store: Store) -> None:
    """A head set for an hour from now was set before the wall clock stepped back an hour."""
    await store.append_replies("c1", [draft("a")], now=1.0, outbox=True)
    await store.append_replies("c2", [draft("a")], now=3600.0, outbox=True)
    await store.append_replies("c3", [draft("a")], now=60.0, outbox=True)
    assert [d.reply.conversation_id for d in await store.due_deliveries(now=5.0, limit=10)] == ["c1"]
    due = await store.due_deliveries(now=5.0, limit=10, stepped_after=1000.0)
    assert [d.reply.conversation_id for d in due] == ["c1", "c2"]  # c3 is only a minute ahead: a wait
    assert [d.reply.conversation_id for d in await store.due_deliveries(5.0, 1, stepped_after=1000.0)] == ["c1"]


async def test_outbox_offers_each_conversations_lowest_reply_when_due(store: Store) -> None:
    await store.append_replies("c1", [draft("a"), draft("b")], now=1.0, outbox=True)
    await store.append_replies("c2", [draft("a")], now=2.0, outbox=True)
    due = await store.due_deliveries(now=5.0, limit=10)
    assert [(d.reply.conversation_id, d.reply.sequence) for d in due] == [("c1", 1), ("c2", 1)]
    assert await store.next_due_at(after=0.0) == 1.0
    assert await store.next_due_at(after=1.0) == 2.0  # heads due by `after` are in hand already
    assert await store.next_due_at(after=2.0) is None
    await store.delivery_failed("c1", 1, attempts=1, first_attempt_at=5.0, next_attempt_at=9.0, error="HTTP 503")
    due = await store.due_deliveries(now=6.0, limit=10)
    assert [(d.reply.conversation_id, d.reply.sequence) for d in due] == [("c2", 1)]  # c1/2 waits behind c1/1
    head = await head_delivery(store, "c1")
    assert head is not None and (head.attempts, head.first_attempt_at, head.next_attempt_at, head.last_error) == (
        1, 5.0, 9.0, "HTTP 503"
    )  # fmt: skip
    assert await store.next_due_at(after=0.0) == 2.0
    assert await store.next_due_at(after=6.0) == 9.0
    await store.delivery_succeeded("c2", 1)
    assert await store.next_due_at(after=0.0) == 9.0
    assert await store.next_due_at(after=9.5) is None
    assert await head_delivery(store, "c2") is None
    await store.delivery_succeeded("c1", 1)
    head = await head_delivery(store, "c1")
    assert head is not None and head.reply.sequence == 2 and head.attempts == 0


async def test_queued_deliveries_page_through_a_conversation_in_order(store: Store) -> None:
    await store.append_replies("c1", [draft(f"k{i}", f"r{i}") for i in range(5)], now=1.0, outbox=True)
    await store.append_replies("c2", [draft("other")], now=1.0, outbox=True)
    page = await store.queued_deliveries("c1", 3)
    assert [d.reply.sequence for d in page] == [1, 2, 3]
    assert [d.reply.payload for d in page] == [{"text": f"r{i}"} for i in range(3)]
    await store.delivery_failed("c1", 1, attempts=1, first_attempt_at=2.0, next_attempt_at=3.0, error="HTTP 503")
    await store.delivery_succeeded("c1", 2)
    page = await store.queued_deliveries("c1", 10)
    assert [(d.reply.sequence, d.attempts) for d in page] == [(1, 1), (3, 0), (4, 0), (5, 0)]
    assert await store.queued_deliveries("nobody", 10) == []


async def test_dead_reply_lets_the_next_proceed_and_replay_puts_it_first_again(store: Store) -> None:
    await store.append_replies("c1", [draft("a"), draft("b")], now=1.0, outbox=True)
    letter = await store.delivery_dead("c1", 1, attempts=4, error="HTTP 400", now=3.0)
    assert (
        letter.kind == "reply"
        and letter.sequence == 1
        and letter.extra["webhook_id"] == (await store.replies_after("c1", 0, 1))[0].webhook_id
    )
    assert letter.body["conversationId"] == "c1" and set(letter.body) == {
        "type", "payload", "conversationId", "botpressUserId", "botpressMessageId", "botpressConversationId"
    }  # fmt: skip
    head = await head_delivery(store, "c1")
    assert head is not None and head.reply.sequence == 2
    assert [d.id for d in await store.list_dead_letters(kind="reply", conversation_id="c1")] == [letter.id]
    assert await store.list_dead_letters(kind="message") == []
    assert await store.replay_dead_letter(letter.id, now=4.0)
    head = await head_delivery(store, "c1")
    assert head is not None and head.reply.sequence == 1 and head.attempts == 0
    assert await store.replay_dead_letter(letter.id, now=4.0) is False


async def test_purge_removes_dead_letters_for_good(store: Store) -> None:
    await store.append_replies("c1", [draft("a"), draft("b")], now=1.0, outbox=True)
    a = await store.delivery_dead("c1", 1, attempts=1, error="x", now=2.0)
    b = await store.delivery_dead("c1", 2, attempts=1, error="y", now=3.0)
    assert [d.id for d in await store.list_dead_letters()] == [a.id, b.id]
    assert await store.purge_dead_letters([a.id, "unknown"]) == 1
    assert [d.id for d in await store.list_dead_letters()] == [b.id]
    got = await store.get_dead_letter(b.id)
    assert got is not None and got.error == "y"


async def test_ping_answers_while_open_and_close_is_idempotent(store: Store) -> None:
    await store.ping()
    await store.close()
    await store.close()


async def test_finish_message_appends_the_last_replies_and_marks_the_message_handled(store: Store) -> None:
    accepted = await store.accept(msg(message_id="m1"), now=1.0)
    await store.append_replies("c1", [draft("m1/0", "early")], now=1.0, outbox=True)
    replies = await store.finish_message(
        accepted.stored.id, "c1", [draft("m1/1", "last"), draft("m1/2", "after")], now=2.0, outbox=True
    )
    assert [(r.sequence, r.payload["text"]) for r in replies] == [(2, "last"), (3, "after")]
    assert await store.pending_messages(10) == []
    # A re-run after a crash repeats the keys: nothing is appended twice.
    assert await store.finish_message(accepted.stored.id, "c1", [draft("m1/1", "last")], now=3.0, outbox=True) == []
    assert [r.sequence for r in await store.replies_after("c1", 0, 10)] == [1, 2, 3]


async def test_finish_message_without_replies_only_marks_it_handled(store: Store) -> None:
    accepted = await store.accept(msg(message_id="m1"), now=1.0)
    assert await store.finish_message(accepted.stored.id, "c1", [], now=2.0, outbox=True) == []
    assert await store.pending_messages(10) == []
    assert await store.last_sequence("c1") == 0


async def test_forget_deletes_only_handled_messages_accepted_before_the_cut(store: Store) -> None:
    old_done = (await store.accept(msg(message_id="old-done", text="a"), now=10.0)).stored
    old_pending = (await store.accept(msg(message_id="old-pending"), now=11.0)).stored
    old_dead = (await store.accept(msg(message_id="old-dead"), now=12.0)).stored
    young_done = (await store.accept(msg(message_id="young-done"), now=30.0)).stored
    await store.finish_message(old_done.id, "c1", [draft("k0")], now=13.0, outbox=False)
    await store.finish_message(young_done.id, "c1", [], now=1.0, outbox=False)
    await store.dead_letter_message(old_dead.id, "gave up", now=14.0)

    assert await store.forget_messages(before=20.0, limit=100) == 1
    assert await store.forget_messages(before=20.0, limit=100) == 0
    # Forgotten: the same ids are a new message, pending again, even with other content.
    again = await store.accept(msg(message_id="old-done", text="b"), now=40.0)
    assert not again.duplicate and again.stored.id == old_done.id and again.stored.received_at == 40.0
    assert [m.id for m in await store.pending_messages(10)] == [old_pending.id, old_done.id]
    # Kept: pending, dead-lettered (still replayable) and young messages; the reply log is untouched.
    assert (await store.accept(msg(message_id="old-pending"), now=41.0)).duplicate
    assert (await store.accept(msg(message_id="young-done"), now=41.0)).duplicate
    (letter,) = await store.list_dead_letters()
    assert await store.replay_dead_letter(letter.id, now=42.0)
    assert old_dead.id in [m.id for m in await store.pending_messages(10)]
    assert [r.sequence for r in await store.replies_after("c1", 0, 10)] == [1]


async def test_forget_takes_at_most_limit_oldest_first(store: Store) -> None:
    ids = []
    for i in range(5):
        stored = (await store.accept(msg(message_id=f"m{i}"), now=float(i))).stored
        await store.finish_message(stored.id, "c1", [], now=1.0, outbox=False)
        ids.append(stored.id)
    assert await store.forget_messages(before=100.0, limit=2) == 2
    assert [(await store.accept(msg(message_id=f"m{i}"), now=200.0)).duplicate for i in range(5)] == [
        False, False, True, True, True,
    ]  # fmt: skip
    assert await store.forget_messages(before=100.0, limit=10) == 3


async def test_a_purged_dead_message_is_forgotten_like_a_handled_one(store: Store) -> None:
    stored = (await store.accept(msg(), now=1.0)).stored
    letter = await store.dead_letter_message(stored.id, "gave up", now=2.0)
    assert letter is not None
    assert await store.forget_messages(before=10.0, limit=10) == 0  # dead-lettered: kept
    assert await store.purge_dead_letters([letter.id]) == 1
    assert (await store.accept(msg(), now=3.0)).duplicate  # still remembered until the window passes
    assert await store.forget_messages(before=10.0, limit=10) == 1
    assert not (await store.accept(msg(), now=11.0)).duplicate


async def expire_all(store: Store, before: float, page: int = 1) -> int:
    """One whole pass of expire_replies, a page at a time."""
    deleted, cursor = 0, ""
    while True:
        n, cursor = await store.expire_replies(before, cursor, page)
        deleted += n
        if not cursor:
            return deleted


async def test_expire_trims_old_replies_in_every_conversation_but_never_owed_or_dead_ones(store: Store) -> None:
    await store.append_replies("c1", [draft("a"), draft("b"), draft("c")], now=1.0, outbox=False)
    await store.append_replies("c1", [draft("d"), draft("e")], now=10.0, outbox=False)
    await store.append_replies("c2", [draft("a"), draft("b")], now=1.0, outbox=False)
    await store.append_replies("c3", [draft("a")], now=1.0, outbox=False)
    await store.append_replies("c3", [draft("b"), draft("c")], now=1.0, outbox=True)  # 2 and 3 owed
    await store.append_replies("c4", [draft("a")], now=1.0, outbox=True)
    await store.delivery_dead("c4", 1, attempts=1, error="HTTP 400", now=2.0)

    assert await expire_all(store, before=5.0) == 3 + 2 + 1
    assert [r.sequence for r in await store.replies_after("c1", 0, 10)] == [4, 5]
    assert await store.first_retained_sequence("c1") == 4
    assert await store.replies_after("c2", 0, 10) == [] and await store.first_retained_sequence("c2") == 3
    assert [r.sequence for r in await store.replies_after("c3", 0, 10)] == [2, 3]  # from the owed one on
    assert [r.sequence for r in await store.replies_after("c4", 0, 10)] == [1]  # dead-lettered
    # The conversation keeps its sequence; the trimmed replies' dedupe keys went with them.
    assert await store.last_sequence("c2") == 2
    assert [r.sequence for r in await store.append_replies("c2", [draft("a")], now=20.0, outbox=False)] == [3]
    # Once delivered, the owed replies age out at the next pass.
    await store.delivery_succeeded("c3", 2)
    await store.delivery_succeeded("c3", 3)
    assert await expire_all(store, before=5.0, page=100) == 2
    assert await store.replies_after("c3", 0, 10) == []
    assert await expire_all(store, before=5.0) == 0


async def test_only_a_pending_message_finishes_and_only_once(store: Store) -> None:
    a = (await store.accept(msg(message_id="m1"), now=1.0)).stored
    assert [r.sequence for r in await store.finish_message(a.id, "c1", [draft("x1")], now=2.0, outbox=False)] == [1]
    assert await store.finish_message(a.id, "c1", [draft("x2")], now=3.0, outbox=False) == []  # other replies too
    b = (await store.accept(msg(message_id="m2"), now=1.0)).stored
    await store.dead_letter_message(b.id, "gave up", now=2.0)
    assert await store.finish_message(b.id, "c1", [draft("x3")], now=3.0, outbox=False) == []
    assert await store.finish_message("unknown", "c1", [draft("x4")], now=3.0, outbox=False) == []
    assert await store.last_sequence("c1") == 1
    assert [m.id for m in await store.pending_messages(10)] == []


async def test_finishing_checks_keys_unless_told_this_is_the_first_run(store: Store) -> None:
    # A run emitted reply 0 and failed; the retry returns it instead: it must not appear twice.
    a = (await store.accept(msg(message_id="m1"), now=1.0)).stored
    await store.append_replies("c1", [draft("m1/0", "early")], now=2.0, outbox=False)
    done = await store.finish_message(a.id, "c1", [draft("m1/0", "early"), draft("m1/1", "late")], now=3.0,
                                      outbox=False)  # fmt: skip
    assert [(r.sequence, r.payload["text"]) for r in done] == [(2, "late")]
    b = (await store.accept(msg(message_id="m2"), now=1.0)).stored
    first = await store.finish_message(b.id, "c1", [draft("m2/0")], now=3.0, outbox=False, keyed=False)
    assert [r.sequence for r in first] == [3]


async def test_a_message_is_dead_lettered_once_and_a_stale_letter_replays_nothing(store: Store) -> None:
    a = (await store.accept(msg(message_id="m1"), now=1.0)).stored
    letter = await store.dead_letter_message(a.id, "gave up", now=2.0)
    assert letter is not None
    assert await store.dead_letter_message(a.id, "again", now=3.0) is None  # a retried step: no second letter
    assert [d.id for d in await store.list_dead_letters()] == [letter.id]
    done = (await store.accept(msg(message_id="m2"), now=1.0)).stored
    await store.finish_message(done.id, "c1", [], now=2.0, outbox=False)
    assert await store.dead_letter_message(done.id, "late", now=3.0) is None
    with pytest.raises(KeyError):
        await store.dead_letter_message("unknown", "x", now=3.0)


async def test_dead_and_replayed_messages_are_never_forgotten(store: Store) -> None:
    a = (await store.accept(msg(message_id="m1"), now=1.0)).stored
    await store.dead_letter_message(a.id, "gave up", now=2.0)
    b = (await store.accept(msg(message_id="m2"), now=1.0)).stored
    letter = await store.dead_letter_message(b.id, "gave up", now=2.0)
    assert letter is not None and await store.replay_dead_letter(letter.id, now=3.0)
    assert await store.forget_messages(before=100.0, limit=10) == 0
    assert [m.id for m in await store.pending_messages(10)] == [b.id]
    assert (await store.accept(msg(message_id="m1"), now=5.0)).duplicate  # still known


async def test_limits_of_zero_or_less_ask_for_nothing(store: Store) -> None:
    a = (await store.accept(msg(message_id="m1"), now=1.0)).stored
    await store.finish_message(a.id, "c1", [draft("x")], now=1.0, outbox=False)
    await store.accept(msg(message_id="m2"), now=1.0)
    assert await store.pending_messages(0) == [] and await store.pending_messages(-1) == []
    assert await store.forget_messages(before=100.0, limit=-1) == 0
    assert await store.expire_replies(before=100.0, after="", limit=0) == (0, "")
    assert await store.last_sequence("c1") == 1
    await store.append_replies("c2", [draft("y1"), draft("y2")], now=1.0, outbox=True)
    await store.delivery_dead("c2", 1, attempts=1, error="HTTP 400", now=2.0)
    await store.append_replies("c3", [draft("z")], now=1.0, outbox=True)
    for limit in (0, -1):
        assert await store.replies_after("c1", 0, limit) == []
        assert await store.queued_deliveries("c3", limit) == []
        assert await store.due_deliveries(100.0, limit) == []
        assert await store.list_dead_letters(limit=limit) == []


async def test_a_reply_no_longer_owed_cannot_be_dead_lettered(store: Store) -> None:
    await store.append_replies("c1", [draft("a")], now=1.0, outbox=True)
    await store.delivery_succeeded("c1", 1)
    with pytest.raises(KeyError):
        await store.delivery_dead("c1", 1, attempts=1, error="late", now=2.0)
    assert await store.list_dead_letters() == []


async def test_expiry_stops_at_the_first_young_reply_even_if_the_clock_stepped_back(store: Store) -> None:
    await store.append_replies("c1", [draft("a")], now=1.0, outbox=False)
    await store.append_replies("c1", [draft("b")], now=50.0, outbox=False)
    await store.append_replies("c1", [draft("c")], now=2.0, outbox=False)  # the clock went back
    cursor, expired = "", 0
    while True:
        n, cursor = await store.expire_replies(before=10.0, after=cursor, limit=100)
        expired += n
        if not cursor:
            break
    assert expired == 1
    assert [r.sequence for r in await store.replies_after("c1", 0, 10)] == [2, 3]


async def test_dead_letters_are_listed_in_the_order_they_were_made(store: Store) -> None:
    for conversation in ("c2", "c1", "c3"):
        stored = (await store.accept(msg(conversation=conversation), now=1.0)).stored
        await store.dead_letter_message(stored.id, "gave up", now=5.0)  # same time for all
    assert [d.conversation_id for d in await store.list_dead_letters()] == ["c2", "c1", "c3"]


async def test_known_answers_like_accept_for_a_stored_message_and_stores_nothing(store: Store) -> None:
    assert await store.known(msg(message_id="m1")) is None
    assert await store.pending_messages(10) == []
    first = (await store.accept(msg(message_id="m1"), now=1.0)).stored
    known = await store.known(msg(message_id="m1"))
    assert known is not None and known.duplicate and known.stored.id == first.id
    with pytest.raises(Conflict):
        await store.known(msg(message_id="m1", text="other"))


async def test_every_store_keeps_the_same_bounded_error_text(make_store: Factory) -> None:
    store = await make_store()
    long = "x" * (ERROR_LIMIT + 100)
    accepted = await store.accept(InboundMessage("u", "m1", "c1", "text", "", {}), now=1.0)
    await store.record_attempt(accepted.stored.id, long)
    letter = await store.dead_letter_message(accepted.stored.id, long, now=2.0)
    assert letter is not None and len(letter.error) == ERROR_LIMIT
    (listed,) = await store.list_dead_letters()
    assert len(listed.error) == ERROR_LIMIT


async def test_a_pending_page_stops_at_its_count_or_its_bytes_and_says_whether_more_wait(store: Store) -> None:
    """What a load reads (Core._load_pending): a bounded amount, oldest first, and whether
    the store holds more (the backlog must not be forgotten)."""
    assert await store.pending_page(10, 1 << 20) == ([], False)
    for i in range(4):
        await store.accept(msg(message_id=f"m{i}", text="x" * 1000), now=1.0 + i)
    ids = [m.message.message_id for m in (await store.pending_page(10, 1 << 20))[0]]
    assert ids == ["m0", "m1", "m2", "m3"] and (await store.pending_page(10, 1 << 20))[1] is False
    by_count, more = await store.pending_page(3, 1 << 20)
    assert [m.message.message_id for m in by_count] == ["m0", "m1", "m2"] and more
    by_bytes, more = await store.pending_page(10, 4500)  # each is ~2 KB stored (text and payload)
    assert [m.message.message_id for m in by_bytes] == ["m0", "m1"] and more
    first, more = await store.pending_page(10, 1)  # the first whatever its size
    assert [m.message.message_id for m in first] == ["m0"] and more
