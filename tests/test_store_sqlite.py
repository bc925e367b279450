"""SQLite specifics: everything survives a reopen, WAL is on, concurrent writes share commits."""

from __future__ import annotations

import asyncio
import logging
import sqlite3
import threading
from pathlib import Path
from typing import Any

import grpc
import pytest

from sidecar.config import ConfigError
from sidecar.store import sqlite as sqlite_store
from sidecar.store.sqlite import SqliteStore
from tests.conftest import StartApp, message
from tests.test_grpc_ingress import request
from tests.test_store_contract import draft, head_delivery, msg


async def test_reopening_the_file_keeps_messages_replies_sequences_outbox_and_dead_letters(tmp_path: Path) -> None:
    path = str(tmp_path / "nested" / "dir" / "s.db")
    store = SqliteStore(path)
    await store.open()
    pending = (await store.accept(msg(message_id="m1"), now=1.0)).stored
    done = (await store.accept(msg(message_id="m2"), now=2.0)).stored
    await store.finish_message(done.id, "c1", [], now=1.0, outbox=False)
    await store.append_replies("c1", [draft("a"), draft("b"), draft("c")], now=3.0, outbox=True)
    await store.delivery_succeeded("c1", 1)
    await store.delivery_failed("c1", 2, attempts=2, first_attempt_at=4.0, next_attempt_at=9.0, error="HTTP 503")
    letter = await store.delivery_dead("c1", 2, attempts=3, error="HTTP 410", now=5.0)
    await store.close()

    again = SqliteStore(path)
    await again.open()
    try:
        assert [m.id for m in await again.pending_messages(10)] == [pending.id]
        assert (await again.accept(msg(message_id="m2"), now=9.0)).duplicate
        assert await again.last_sequence("c1") == 3
        head = await head_delivery(again, "c1")
        assert head is not None and head.reply.sequence == 3
        assert [d.id for d in await again.list_dead_letters()] == [letter.id]
        (appended,) = await again.append_replies("c1", [draft("d")], now=6.0, outbox=False)
        assert appended.sequence == 4
        assert [r.sequence for r in await again.replies_after("c1", 0, 10)] == [1, 2, 3, 4]
    finally:
        await again.close()


async def test_the_database_runs_in_wal_mode_with_a_schema_version(tmp_path: Path) -> None:
    path = tmp_path / "s.db"
    store = SqliteStore(str(path))
    await store.open()
    await store.close()
    with sqlite3.connect(path) as conn:
        assert conn.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
        assert conn.execute("PRAGMA user_version").fetchone()[0] >= 1


async def test_concurrent_accepts_share_commits(tmp_path: Path) -> None:
    store = SqliteStore(str(tmp_path / "s.db"), sync="full")
    await store.open()
    try:
        before = store.commits
        results = await asyncio.gather(*(store.accept(msg(message_id=f"m{i}"), now=1.0) for i in range(300)))
        assert all(not r.duplicate for r in results)
        assert store.commits - before < 300
        assert len(await store.pending_messages(1000)) == 300
    finally:
        await store.close()


async def test_the_store_thread_reports_errors_to_the_loop_and_ends_on_close(tmp_path: Path) -> None:
    store = SqliteStore(str(tmp_path / "s.db"), sync="full")
    await store.open()
    try:
        worker = store._thread
        assert worker is not None
        with pytest.raises(ZeroDivisionError):
            await worker.call(lambda: 1 // 0)
        assert await worker.call(lambda: 42) == 42  # the thread lives on after an error
        assert not (await store.accept(msg(), now=1.0)).duplicate
    finally:
        await store.close()
    assert not [t for t in threading.enumerate() if t.name == "sqlite-store"]


async def test_a_conflict_in_a_batch_does_not_undo_the_other_operations(tmp_path: Path) -> None:
    store = SqliteStore(str(tmp_path / "s.db"))
    await store.open()
    try:
        await store.accept(msg(message_id="x", text="one"), now=1.0)
        results = await asyncio.gather(
            store.accept(msg(message_id="a"), now=1.0),
            store.accept(msg(message_id="x", text="two"), now=1.0),
            store.accept(msg(message_id="b"), now=1.0),
            return_exceptions=True,
        )
        assert [type(r).__name__ for r in results] == ["AcceptResult", "Conflict", "AcceptResult"]
        assert {m.message.message_id for m in await store.pending_messages(10)} == {"x", "a", "b"}
    finally:
        await store.close()


async def test_expiry_deletes_in_short_steps_and_the_next_passes_go_on(tmp_path: Path) -> None:
    store = SqliteStore(str(tmp_path / "s.db"))
    await store.open()
    try:
        await store.append_replies("big", [draft(f"k{i}") for i in range(1200)], now=1.0, outbox=False)
        await store.append_replies("small", [draft("a")], now=1.0, outbox=False)
        # One step deletes at most 500 replies: the conversation is trimmed over three passes.
        passes = []
        for _ in range(3):
            deleted, cursor = 0, ""
            while True:
                n, cursor = await store.expire_replies(5.0, cursor, 200)
                deleted += n
                if not cursor:
                    break
            passes.append(deleted)
        assert passes == [501, 500, 200]
        assert await store.first_retained_sequence("big") == 1201 and await store.replies_after("small", 0, 5) == []
    finally:
        await store.close()


async def test_a_schema_1_database_is_upgraded_in_place(tmp_path: Path) -> None:
    path = str(tmp_path / "s.db")
    store = SqliteStore(path)
    await store.open()
    await store.append_replies("c1", [draft("k1")], now=1.0, outbox=False)
    await store.close()
    # What schema 1 had: every reply's key in a full unique index.
    conn = sqlite3.connect(path)
    conn.executescript(
        "DROP INDEX replies_keyed; CREATE UNIQUE INDEX replies_dedupe ON replies(conversation_id, dedupe_key);"
        " PRAGMA user_version=1;"
    )
    conn.close()

    again = SqliteStore(path)
    await again.open()
    try:
        assert await again.append_replies("c1", [draft("k1")], now=2.0, outbox=False) == []  # keys still hold
        stored = (await again.accept(msg(), now=3.0)).stored
        await again.finish_message(stored.id, "c1", [draft(""), draft("")], now=4.0, outbox=False)
        assert [r.sequence for r in await again.replies_after("c1", 0, 10)] == [1, 2, 3]
    finally:
        await again.close()
    conn = sqlite3.connect(path)
    indexes = {row[0] for row in conn.execute("SELECT name FROM sqlite_master WHERE type = 'index'")}
    assert conn.execute("PRAGMA user_version").fetchone()[0] == 2
    conn.close()
    assert "replies_keyed" in indexes and "replies_dedupe" not in indexes


async def test_a_second_store_on_the_same_file_is_refused_until_the_first_closes(tmp_path: Path) -> None:
    first = SqliteStore(str(tmp_path / "s.db"))
    await first.open()
    second = SqliteStore(str(tmp_path / "s.db"))
    with pytest.raises(ConfigError, match="in use by another sidecar"):
        await second.open()
    reader = SqliteStore(str(tmp_path / "s.db"), exclusive=False)  # inspection beside it is fine
    await reader.open()
    await reader.close()
    await first.close()
    await second.open()
    await second.close()


async def test_a_store_that_cannot_write_now_is_unavailable_to_its_callers(
    start_app: StartApp, caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    """A full disk (or an I/O error) is "try again" for a client, 503 / UNAVAILABLE, not an
    internal error with a traceback per request; the store logs it once per 10 s, not per batch."""
    s = await start_app(store=f"sqlite:///{tmp_path}/s.db")
    store = s.app.store

    def full(c: sqlite3.Connection) -> None:
        raise sqlite3.OperationalError("database or disk is full")

    async def accept(message: Any, *, now: float) -> Any:
        return await store._run(full)  # type: ignore[attr-defined]

    monkeypatch.setattr(store, "accept", accept)
    resp = await s.post(message())
    assert resp.status == 503 and (await resp.json())["error"]["code"] == "unavailable"
    with pytest.raises(grpc.aio.AioRpcError) as e:
        await s.stub.SendMessage(request(message_id="m2"))
    assert e.value.code() == grpc.StatusCode.UNAVAILABLE
    errors = [r for r in caplog.records if r.levelno >= logging.ERROR]
    assert [r.getMessage() for r in errors] == ["sqlite operations failed"] and not any(r.exc_info for r in errors)
    # A bug is still a bug: other SQLite errors reach the caller as they are.
    with pytest.raises(sqlite3.IntegrityError):
        await store._run(lambda c: (_ for _ in ()).throw(sqlite3.IntegrityError("constraint")))  # type: ignore[attr-defined]


async def test_a_readiness_probe_in_the_batch_of_a_failing_write_does_not_clear_the_failure(
    tmp_path: Path,
) -> None:
    """The probe's own success must not hide a write that failed beside it: the next
    probe is then padded (RECOVERY_PROBE_BYTES), so that readiness comes back only once
    a message's worth of writing gets through again."""
    store = SqliteStore(str(tmp_path / "s.db"))
    await store.open()
    try:

        def full(c: sqlite3.Connection) -> None:
            raise sqlite3.OperationalError("database or disk is full")

        failing = store._run(full)
        results = await asyncio.gather(failing, store.ping(), return_exceptions=True)
        assert isinstance(results[0], Exception) and results[1] is None  # the same batch, isolated
        assert store._write_failed
        await store.ping()  # padded, and through: ready again
        assert not store._write_failed
    finally:
        await store.close()


def wal_size(path: Path) -> int:
    return Path(f"{path}-wal").stat().st_size


async def test_the_wal_file_is_cut_back_after_a_checkpoint(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Without journal_size_limit the WAL file keeps the largest size a burst gave it, for good."""
    monkeypatch.setattr(sqlite_store, "_WAL_SIZE_LIMIT", 64 * 1024)
    path = tmp_path / "s.db"
    store = SqliteStore(str(path))
    await store.open()
    try:
        for i in range(60):  # ~12 MB, past the automatic checkpoint at 1,000 pages (4 MB)
            await store.accept(msg("c1", f"m{i}", "x" * 100_000), now=1.0)
        with sqlite3.connect(path) as other:  # a checkpoint of everything, by another connection
            other.execute("PRAGMA wal_checkpoint(PASSIVE)")
        await store.accept(msg("c1", "after"), now=1.0)  # the writer starts the WAL over: cut back now
        assert wal_size(path) <= 64 * 1024 + 8 * 4096
    finally:
        await store.close()
