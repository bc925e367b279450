"""SQLite store: WAL and group commit; statements on the loop, the fsync on a thread; durable steps wait for it."""

from __future__ import annotations

import asyncio
import fcntl
import logging
import math
import os
import queue
import socket
import sqlite3
import threading
import time
import uuid
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, TypeVar

import orjson

from sidecar.config import ConfigError
from sidecar.errors import Conflict, Unavailable
from sidecar.models import (
    AcceptResult,
    DeadLetter,
    Delivery,
    InboundMessage,
    Reply,
    ReplyDraft,
    StoredMessage,
    sidecar_id,
)
from sidecar.observability import Throttle
from sidecar.store.base import ERROR_LIMIT, Store, pending_within, within_bytes

log = logging.getLogger(__name__)

T = TypeVar("T")
Op = Callable[[sqlite3.Connection], Any]
Entry = tuple[Op, "asyncio.Future[Any]", bool]
"""A queued write: the operation, its caller's future, and whether it must be fsync'd before the answer."""
Done = Callable[[Any, "BaseException | None"], None]
"""Told on the loop how a call on the store's thread ended: its result, or its error."""

SCHEMA_VERSION = 2  # 2: replies keyed only when they need it (a partial dedupe index)
_BATCH = 256
# Bytes the readiness probe writes after a failed transaction (see ping): several
# messages' worth of WAL, so that "ready again" means messages fit again too.
RECOVERY_PROBE_BYTES = 64 * 1024
# Replies an expiry step deletes at most (~2.5 ms on the loop, measured); a conversation
# with more old ones is trimmed further by the next pass.
_EXPIRE_STEP = 500

SCHEMA = """
CREATE TABLE IF NOT EXISTS messages (
    arrival         INTEGER PRIMARY KEY AUTOINCREMENT,
    id              TEXT NOT NULL UNIQUE,
    conversation_id TEXT NOT NULL,
    message_id      TEXT NOT NULL,
    user_id         TEXT NOT NULL,
    type            TEXT NOT NULL,
    text            TEXT NOT NULL,
    payload         BLOB NOT NULL,
    fingerprint     TEXT NOT NULL,
    received_at     REAL NOT NULL,
    state           TEXT NOT NULL DEFAULT 'pending',
    attempts        INTEGER NOT NULL DEFAULT 0,
    last_error      TEXT NOT NULL DEFAULT ''
);
CREATE INDEX IF NOT EXISTS messages_pending ON messages(arrival) WHERE state = 'pending';
CREATE INDEX IF NOT EXISTS messages_handled ON messages(received_at) WHERE state = 'done';
CREATE TABLE IF NOT EXISTS conversations (
    conversation_id TEXT PRIMARY KEY,
    last_sequence   INTEGER NOT NULL DEFAULT 0,
    first_retained  INTEGER NOT NULL DEFAULT 1,
    user_id         TEXT NOT NULL DEFAULT ''
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS replies (
    conversation_id     TEXT NOT NULL,
    sequence            INTEGER NOT NULL,
    dedupe_key          TEXT NOT NULL,
    type                TEXT NOT NULL,
    payload             BLOB NOT NULL,
    bot_user_id         TEXT NOT NULL,
    bot_message_id      TEXT NOT NULL,
    bot_conversation_id TEXT NOT NULL,
    user_id             TEXT NOT NULL,
    in_reply_to         TEXT NOT NULL,
    created_at          REAL NOT NULL,
    PRIMARY KEY (conversation_id, sequence)
) WITHOUT ROWID;
-- Only keyed replies are indexed: those a bot emitted before it returned, and
-- callbacks. The replies that finish a message need no key (see finish_message),
-- and skipping the index saves a random B-tree leaf per message.
DROP INDEX IF EXISTS replies_dedupe;
CREATE UNIQUE INDEX IF NOT EXISTS replies_keyed ON replies(conversation_id, dedupe_key) WHERE dedupe_key != '';
CREATE TABLE IF NOT EXISTS outbox (
    conversation_id  TEXT NOT NULL,
    sequence         INTEGER NOT NULL,
    attempts         INTEGER NOT NULL DEFAULT 0,
    first_attempt_at REAL,
    next_attempt_at  REAL NOT NULL,
    last_error       TEXT NOT NULL DEFAULT '',
    PRIMARY KEY (conversation_id, sequence)
) WITHOUT ROWID;
CREATE INDEX IF NOT EXISTS outbox_due ON outbox(next_attempt_at);
CREATE TABLE IF NOT EXISTS dead_letters (
    ord             INTEGER PRIMARY KEY AUTOINCREMENT,
    id              TEXT NOT NULL UNIQUE,
    kind            TEXT NOT NULL,
    conversation_id TEXT NOT NULL,
    sequence        INTEGER NOT NULL,
    body            BLOB NOT NULL,
    error           TEXT NOT NULL,
    attempts        INTEGER NOT NULL,
    dead_at         REAL NOT NULL,
    extra           BLOB NOT NULL
);
CREATE INDEX IF NOT EXISTS dead_letters_conversation ON dead_letters(conversation_id, kind, sequence);
-- One row, rewritten by each readiness check: a store that can be read but not
-- written (a full disk) is not ready. Older sidecars ignore the table. (`probe`
-- was its first form, without the padding, for a few commits.)
DROP TABLE IF EXISTS probe;
CREATE TABLE IF NOT EXISTS ready_probe (id INTEGER PRIMARY KEY CHECK (id = 1), at REAL NOT NULL, pad BLOB NOT NULL);
"""

_REPLY_COLUMNS = (
    "r.conversation_id, r.sequence, r.type, r.payload, r.bot_user_id, r.bot_message_id, "
    "r.bot_conversation_id, r.user_id, r.in_reply_to, r.created_at"
)
_MESSAGE_COLUMNS = "id, conversation_id, message_id, user_id, type, text, payload, fingerprint, received_at, attempts"
_REPEAT_SQL = f"SELECT {_MESSAGE_COLUMNS}, state FROM messages WHERE id = ?"
# Each conversation's lowest queued sequence, found by skipping from one
# conversation id to the next on the primary key: two index seeks per
# conversation, however long the queues. (A correlated MIN per outbox row
# cost the scheduler a full scan with a seek per row on every wake-up.)
_HEAD_KEYS = """
WITH RECURSIVE ids(id) AS (
    SELECT (SELECT MIN(conversation_id) FROM outbox)
    UNION ALL
    SELECT (SELECT MIN(conversation_id) FROM outbox WHERE conversation_id > ids.id) FROM ids WHERE ids.id IS NOT NULL
)
SELECT id, (SELECT MIN(sequence) FROM outbox WHERE conversation_id = ids.id) AS sequence FROM ids WHERE id IS NOT NULL
"""
# Queued deliveries with their replies, in the column order _delivery reads.
_DELIVERIES = f"""
SELECT o.attempts, o.first_attempt_at, o.next_attempt_at, o.last_error, {_REPLY_COLUMNS}
FROM outbox o JOIN replies r ON r.conversation_id = o.conversation_id AND r.sequence = o.sequence
"""


def _reply(row: Sequence[Any]) -> Reply:
    return Reply(row[0], row[1], row[2], orjson.loads(row[3]), row[4], row[5], row[6], row[7], row[8], row[9])


def _delivery(row: Sequence[Any]) -> Delivery:
    return Delivery(
        reply=_reply(row[4:]), attempts=row[0], first_attempt_at=row[1], next_attempt_at=row[2], last_error=row[3]
    )


def _message(row: Sequence[Any]) -> StoredMessage:
    inbound = InboundMessage(row[3], row[2], row[1], row[4], row[5], orjson.loads(row[6]))
    return StoredMessage(id=row[0], message=inbound, fingerprint=row[7], received_at=row[8], attempts=row[9])


def _dead_letter(row: Sequence[Any]) -> DeadLetter:
    return DeadLetter(
        id=row[0], kind=row[1], conversation_id=row[2], sequence=row[3], body=orjson.loads(row[4]),
        error=row[5], attempts=row[6], dead_at=row[7], extra=orjson.loads(row[8]),
        position=row[9] if len(row) > 9 else 0,
    )  # fmt: skip


_WAL_SIZE_LIMIT = 64 * 1024 * 1024

_DEAD_COLUMNS = "id, kind, conversation_id, sequence, body, error, attempts, dead_at, extra"


class SqliteStore(Store):
    """Statements run on the event loop; the commit, the one step that waits for the disk, on a thread.

    Operations issued while a commit is in flight queue up. When it ends the
    whole queue runs as one transaction on the loop (its statements touch
    SQLite's page cache only: microseconds, and no GIL hand-off per
    statement, which is what a writer thread running Python pays under load),
    and its COMMIT goes to the store's thread, which waits for the fsync
    with the GIL released. One fsync covers every operation of the batch,
    and no caller hears back before its batch is durable: "committed
    before 200" stays cheap under load.

    Operations are plain functions of the connection and never await, so a
    batch is atomic with respect to the loop; an operation that raises is
    retried alone (see ``_execute``) so it cannot undo the others.

    Pure reads use a second, read-only connection and run at once: under WAL
    they see the last commit and never wait for the writer. Every write a
    caller awaited has committed, so it reads its own writes.
    """

    def __init__(self, path: str, *, sync: str = "full", retention: int = 10000, exclusive: bool = True) -> None:
        """``exclusive=False`` skips the lock that keeps a second sidecar off the file:
        for tools that only read while a sidecar runs (tests, inspection)."""
        self._path = path
        self._exclusive = exclusive
        self._sync = sync.upper()
        self._retention = retention
        self._conn: sqlite3.Connection | None = None
        self._reader: sqlite3.Connection | None = None
        self._thread: _Worker | None = None
        self._lock_fd: int | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._queue: list[Entry] = []
        self._busy = False  # a batch is scheduled or committing: new operations wait for the next one
        self._idle: asyncio.Event | None = None
        self.commits = 0
        """Transactions committed: fewer than operations when group commit batches them."""
        self._batch_errors = Throttle()
        self._write_failures = 0  # failed transactions and operations, ever
        self._failures_cleared = 0  # of those, the ones a recovery probe got through after
        self._op_errors = Throttle()

    # --- plumbing ---------------------------------------------------------------

    async def open(self) -> None:
        if self._conn is not None:
            return
        try:
            await self._open()
        except (OSError, sqlite3.Error) as e:
            # A setting found wrong at start (a read-only or missing directory, a file
            # that is not a database): one line naming it, exit 2, no traceback.
            reason = e.strerror if isinstance(e, OSError) and e.strerror else str(e)
            raise ConfigError(f"store (SIDECAR_STORE): cannot open {self._path}: {reason}") from None

    async def _open(self) -> None:
        self._lock()
        self._loop = asyncio.get_running_loop()
        self._thread = _Worker(self._loop)
        self._idle = asyncio.Event()
        self._idle.set()
        try:
            self._conn = await self._thread.call(self._connect)
            self._reader = await self._thread.call(self._connect_reader)
        except BaseException:
            if self._conn is not None:
                self._conn.close()
                self._conn = None
            self._thread.stop()
            self._thread = None
            self._unlock()
            raise

    def _lock(self) -> None:
        """Hold ``<path>.lock`` exclusively while open, so that a second sidecar on the
        same file refuses to start instead of running the same messages and outbox
        alongside this one. The kernel releases it when the process ends, however."""
        if not self._exclusive:
            return
        Path(self._path).parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(self._path + ".lock", os.O_RDWR | os.O_CREAT, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 200, 0).decode(errors="replace").strip() or "unknown"
            os.close(fd)
            raise ConfigError(
                f"store (SIDECAR_STORE): {self._path} is in use by another sidecar ({holder});"
                " every sidecar needs a store of its own"
            ) from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"pid {os.getpid()} on {socket.gethostname()}".encode(), 0)
        self._lock_fd = fd

    def _unlock(self) -> None:
        if self._lock_fd is not None:
            os.close(self._lock_fd)  # closing the descriptor releases the lock
            self._lock_fd = None

    async def close(self) -> None:
        conn, thread = self._conn, self._thread
        if conn is None or thread is None or self._loop is None or self._idle is None:
            return
        while self._busy or self._queue:  # operations already issued still complete
            self._idle.clear()
            await self._idle.wait()
        self._conn = None
        if self._reader is not None:
            self._reader.close()
            self._reader = None
        await thread.call(conn.close)
        thread.stop()
        self._thread = None
        self._unlock()

    async def ping(self) -> None:
        """A small write through the batches, like any other: a disk that is full (or a file
        gone read-only) fails it. After a failed transaction the write is padded to
        RECOVERY_PROBE_BYTES until it gets through: on a full disk a page or two can still
        fit in the WAL's space where a message cannot, and readiness would come back while
        every message still failed. Not fsync'd: a lost probe is harmless."""
        failures = self._write_failures
        pad = RECOVERY_PROBE_BYTES if self._write_failed else 0
        sql = "INSERT OR REPLACE INTO ready_probe (id, at, pad) VALUES (1, ?, zeroblob(?))"
        await self._run(lambda c: c.execute(sql, (time.time(), pad)), durable=False)
        # Only those before it began: a write failing meanwhile (in its batch, say) stays.
        self._failures_cleared = max(self._failures_cleared, failures)

    @property
    def _write_failed(self) -> bool:
        """A write failed, and no recovery probe got through since."""
        return self._write_failures > self._failures_cleared

    async def _run(self, op: Callable[[sqlite3.Connection], T], *, durable: bool = True) -> T:
        """Queue a write for the next batch; returns once its batch has committed.

        ``durable=False`` is for records whose loss on a power cut is harmless
        (a webhook outcome: at worst the reply is POSTed again with the same
        webhook-id). A batch of only those commits without an fsync, on the loop.
        """
        if self._conn is None or self._loop is None:
            raise RuntimeError("the store is not open")
        future: asyncio.Future[T] = self._loop.create_future()
        self._queue.append((op, future, durable))
        if not self._busy:
            # Not at once: every operation issued in this turn of the loop joins the batch.
            self._busy = True
            self._loop.call_soon(self._flush)
        return await future

    async def _read(self, op: Callable[[sqlite3.Cursor], T]) -> T:
        """Run a read on its own connection, at once: WAL readers see the last commit
        and never wait for the writer, so a read does not sit through a batch's fsync."""
        if self._reader is None:
            raise RuntimeError("the store is not open")
        cursor = self._reader.cursor()
        try:
            return op(cursor)
        finally:
            # Resets a statement left mid-result (fetchone): an open statement would keep
            # its read transaction, and every later read would see that old snapshot.
            cursor.close()

    def _connect_reader(self) -> sqlite3.Connection:
        conn = sqlite3.connect(self._path, isolation_level=None, check_same_thread=False)
        conn.execute("PRAGMA query_only=1")
        conn.execute("PRAGMA busy_timeout=5000")
        return conn

    def _connect(self) -> sqlite3.Connection:
        Path(self._path).parent.mkdir(parents=True, exist_ok=True)
        conn = sqlite3.connect(self._path, isolation_level=None, check_same_thread=False)
        conn.execute("PRAGMA journal_mode=WAL")
        conn.execute(f"PRAGMA synchronous={'FULL' if self._sync == 'FULL' else 'NORMAL'}")
        conn.execute("PRAGMA busy_timeout=5000")
        # The WAL file keeps its largest size after a checkpoint unless told: cut it back.
        conn.execute(f"PRAGMA journal_size_limit={_WAL_SIZE_LIMIT}")
        version = conn.execute("PRAGMA user_version").fetchone()[0]
        if version > SCHEMA_VERSION:
            conn.close()
            raise ConfigError(
                f"store (SIDECAR_STORE): {self._path} was written by a newer sidecar (schema {version});"
                f" this one reads schema {SCHEMA_VERSION} and older"
            )
        conn.executescript(SCHEMA)
        conn.execute(f"PRAGMA user_version={SCHEMA_VERSION}")
        return conn

    def _flush(self) -> None:
        """Run the queued operations in one transaction and hand its COMMIT to the thread."""
        conn, thread = self._conn, self._thread
        batch, self._queue = self._queue[:_BATCH], self._queue[_BATCH:]
        if not batch or conn is None or thread is None:
            self._done()
            return
        # Nothing in the batch needs an fsync: commit under WAL's NORMAL level,
        # which writes the frames to the page cache only, right here instead of
        # a hand-off to the thread and back. The next durable commit's fsync
        # covers these frames too (the WAL is one file, synced in order), and a
        # crash of the process loses nothing; only a power cut can.
        lazy = self._sync == "FULL" and not any(durable for _, _, durable in batch)
        if lazy:
            conn.execute("PRAGMA synchronous=NORMAL")
        try:
            try:
                results = self._execute(conn, batch, isolate=False)
            except _Retry:
                # Some operation raised after others had written: redo the batch
                # with each operation in its own SAVEPOINT, so only that one fails.
                results = self._execute(conn, batch, isolate=True)
            if lazy:
                conn.execute("COMMIT")
        except sqlite3.Error as e:
            self._failed(conn, batch, e)
            return
        finally:
            if lazy:  # after COMMIT or ROLLBACK: the level cannot change inside a transaction
                conn.execute("PRAGMA synchronous=FULL")
        if lazy:
            self._committed(conn, batch, results, None)
            return
        thread.submit(lambda: conn.execute("COMMIT"), lambda _, error: self._committed(conn, batch, results, error))

    def _committed(
        self,
        conn: sqlite3.Connection,
        batch: list[Entry],
        results: list[tuple[asyncio.Future[Any], Any, BaseException | None]],
        error: BaseException | None,
    ) -> None:
        if error is not None:
            self._failed(conn, batch, error)
            return
        self.commits += 1
        failed = [e for _, _, e in results if isinstance(e, sqlite3.Error)]
        if any(isinstance(e, sqlite3.OperationalError) for e in failed):  # e.g. the disk filled mid-batch
            self._write_failures += 1
        if failed and (batches := self._op_errors.due()):  # the callers hear of it as their own error
            log.error(
                "sqlite operations failed",
                extra={"error": str(failed[0]), "operations": len(failed), "batches": batches},
            )
        for future, result, op_error in results:
            _settle(future, result, _for_caller(op_error))
        self._done()

    def _failed(self, conn: sqlite3.Connection, batch: list[Entry], error: BaseException) -> None:
        self._write_failures += 1
        if batches := self._batch_errors.due():  # a full disk fails every batch: a line per 10 s
            log.error(
                "sqlite transaction failed", extra={"error": str(error), "operations": len(batch), "batches": batches}
            )
        if conn.in_transaction:
            conn.execute("ROLLBACK")
        for _, future, _ in batch:
            _settle(future, None, _for_caller(error))
        self._done()

    def _done(self) -> None:
        """The batch is settled: start the next one if operations queued meanwhile."""
        if self._queue and self._loop is not None:
            self._loop.call_soon(self._flush)
            return
        self._busy = False
        if self._idle is not None:
            self._idle.set()

    def _execute(
        self, conn: sqlite3.Connection, batch: list[Entry], *, isolate: bool
    ) -> list[tuple[asyncio.Future[Any], Any, BaseException | None]]:
        """Run the batch inside one open transaction, left for the caller to commit.

        Operations are pure functions of the database, so the batch can be
        re-run from scratch. Without ``isolate`` (the fast path: no SAVEPOINT
        statements) the first exception rolls everything back and raises _Retry.
        """
        results: list[tuple[asyncio.Future[Any], Any, BaseException | None]] = []
        conn.execute("BEGIN IMMEDIATE")
        try:
            for op, future, _ in batch:
                if not isolate:
                    try:
                        results.append((future, op(conn), None))
                    except Exception:  # noqa: BLE001 - rolled back and redone in isolation
                        raise _Retry from None
                    continue
                conn.execute("SAVEPOINT op")
                try:
                    result = op(conn)
                except Exception as e:  # noqa: BLE001 - handed to the caller
                    conn.execute("ROLLBACK TO op")
                    results.append((future, None, e))
                else:
                    results.append((future, result, None))
                conn.execute("RELEASE op")
        except BaseException:
            if conn.in_transaction:
                conn.execute("ROLLBACK")
            raise
        return results

    # --- inbound messages ---------------------------------------------------------

    async def accept(self, message: InboundMessage, *, now: float) -> AcceptResult:
        key = sidecar_id("message", message.conversation_id, message.message_id)
        fingerprint = message.fingerprint()
        payload = orjson.dumps(message.payload)

        def op(c: sqlite3.Connection) -> AcceptResult:
            inserted = c.execute(
                "INSERT OR IGNORE INTO messages (id, conversation_id, message_id, user_id, type, text, payload,"
                " fingerprint, received_at) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
                (key, message.conversation_id, message.message_id, message.user_id, message.type, message.text,
                 payload, fingerprint, now),
            ).rowcount  # fmt: skip
            if not inserted:
                return _repeat(c.execute(_REPEAT_SQL, (key,)).fetchone(), fingerprint)
            c.execute(
                "INSERT INTO conversations (conversation_id, user_id) VALUES (?, ?)"
                " ON CONFLICT(conversation_id) DO UPDATE SET user_id = excluded.user_id",
                (message.conversation_id, message.user_id),
            )
            stored = StoredMessage(id=key, message=message, fingerprint=fingerprint, received_at=now)
            return AcceptResult(stored, duplicate=False)

        return await self._run(op)

    async def known(self, message: InboundMessage) -> AcceptResult | None:
        key = sidecar_id("message", message.conversation_id, message.message_id)
        row = await self._read(lambda c: c.execute(_REPEAT_SQL, (key,)).fetchone())
        return None if row is None else _repeat(row, message.fingerprint())

    async def pending_page(self, limit: int, max_bytes: int) -> tuple[list[StoredMessage], bool]:
        sql = f"SELECT {_MESSAGE_COLUMNS} FROM messages WHERE state = 'pending' ORDER BY arrival LIMIT ?"

        def op(c: sqlite3.Cursor) -> tuple[list[StoredMessage], bool]:
            # The cursor is lazy: rows past the budget are neither read nor parsed.
            rows, more = pending_within(
                ((r, len(r[5]) + len(r[6])) for r in c.execute(sql, (limit + 1,))), limit, max_bytes
            )
            return [_message(r) for r in rows], more

        return await self._read(op)

    async def record_attempt(self, message_id: str, error: str) -> int:
        error = error[:ERROR_LIMIT]

        def op(c: sqlite3.Connection) -> int:
            c.execute(
                "UPDATE messages SET attempts = attempts + 1, last_error = ? WHERE id = ?",
                (error, message_id),
            )
            row = c.execute("SELECT attempts FROM messages WHERE id = ?", (message_id,)).fetchone()
            return int(row[0]) if row else 0

        return await self._run(op)

    async def forget_messages(self, before: float, limit: int) -> int:
        if limit <= 0:
            return 0
        sql = (
            "DELETE FROM messages WHERE arrival IN (SELECT arrival FROM messages"
            " WHERE state = 'done' AND received_at < ? ORDER BY received_at LIMIT ?)"
        )
        # Not fsync'd on its own: forgetting lost to a power cut is done again by the next sweep.
        return int(await self._run(lambda c: c.execute(sql, (before, limit)).rowcount, durable=False))

    async def dead_letter_message(self, message_id: str, error: str, *, now: float) -> DeadLetter | None:
        error = error[:ERROR_LIMIT]

        def op(c: sqlite3.Connection) -> DeadLetter | None:
            row = c.execute(f"SELECT {_MESSAGE_COLUMNS}, state FROM messages WHERE id = ?", (message_id,)).fetchone()
            if row is None:
                raise KeyError(message_id)
            if row[-1] != "pending":
                return None
            stored = _message(row)
            m = stored.message
            c.execute("UPDATE messages SET state = 'dead', last_error = ? WHERE id = ?", (error, message_id))
            return _insert_dead(c, "message", m.conversation_id, 0, m.api_json(), error, stored.attempts, now,
                                {"message_id": message_id})  # fmt: skip

        return await self._run(op)

    # --- reply log ----------------------------------------------------------------

    async def append_replies(
        self, conversation_id: str, drafts: Sequence[ReplyDraft], *, now: float, outbox: bool
    ) -> list[Reply]:
        rows = [(d, orjson.dumps(d.payload)) for d in drafts]
        return await self._run(lambda c: self._append(c, conversation_id, rows, now, outbox))

    async def finish_message(
        self,
        message_id: str,
        conversation_id: str,
        drafts: Sequence[ReplyDraft],
        *,
        now: float,
        outbox: bool,
        keyed: bool = True,
    ) -> list[Reply]:
        rows = [(d, orjson.dumps(d.payload)) for d in drafts]

        def op(c: sqlite3.Connection) -> list[Reply]:
            # Only a pending message can finish, once. On its first run (keyed=False) no
            # earlier run can have emitted under these keys, so they skip the dedupe index.
            if not c.execute(
                "UPDATE messages SET state = 'done' WHERE id = ? AND state = 'pending'", (message_id,)
            ).rowcount:
                return []
            return self._append(c, conversation_id, rows, now, outbox, keyed=keyed) if rows else []

        return await self._run(op)

    def _append(
        self,
        c: sqlite3.Connection,
        conversation_id: str,
        rows: list[tuple[ReplyDraft, bytes]],
        now: float,
        outbox: bool,
        *,
        keyed: bool = True,
    ) -> list[Reply]:
        row = c.execute(
            "SELECT last_sequence, first_retained FROM conversations WHERE conversation_id = ?", (conversation_id,)
        ).fetchone()
        if row is None:
            c.execute("INSERT INTO conversations (conversation_id) VALUES (?)", (conversation_id,))
            row = (0, 1)
        last, first = row
        appended = []
        for d, payload in rows:
            # The dedupe key's UNIQUE index turns a repeat into a no-op: one statement, no pre-check.
            inserted = c.execute(
                "INSERT OR IGNORE INTO replies VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                (conversation_id, last + 1, d.dedupe_key if keyed else "", d.type, payload, d.bot_user_id,
                 d.bot_message_id, d.bot_conversation_id, d.user_id, d.in_reply_to, now),
            ).rowcount  # fmt: skip
            if not inserted:
                continue
            last += 1
            if outbox:
                c.execute(
                    "INSERT INTO outbox (conversation_id, sequence, next_attempt_at) VALUES (?, ?, ?)",
                    (conversation_id, last, now),
                )
            appended.append(
                Reply(conversation_id, last, d.type, d.payload, d.bot_user_id, d.bot_message_id,
                      d.bot_conversation_id, d.user_id, d.in_reply_to, now)
            )  # fmt: skip
        if appended:
            c.execute("UPDATE conversations SET last_sequence = ? WHERE conversation_id = ?", (last, conversation_id))
            if last - self._retention >= first:
                self._trim(c, conversation_id)
        return appended

    def _trim(self, c: sqlite3.Connection, conversation_id: str, before: float | None = None) -> int:
        """Drop replies beyond retention (and, given ``before``, those created before it),
        never past the oldest one still owed or dead-lettered; returns how many."""
        last, first = c.execute(
            "SELECT last_sequence, first_retained FROM conversations WHERE conversation_id = ?", (conversation_id,)
        ).fetchone()
        upto = last - self._retention
        if before is not None and last >= first:
            oldest = c.execute(
                "SELECT created_at FROM replies WHERE conversation_id = ? AND sequence = ?", (conversation_id, first)
            ).fetchone()
            if oldest is not None and oldest[0] < before:  # only then read on, at most one step
                # The leading run of old replies, up to the first young one: a clock stepped
                # back can put a young reply between old ones, and it must stay.
                end = min(last, first + _EXPIRE_STEP - 1)
                young = c.execute(
                    "SELECT sequence FROM replies WHERE conversation_id = ? AND sequence > ? AND sequence <= ?"
                    " AND created_at >= ? ORDER BY sequence LIMIT 1",
                    (conversation_id, first, end, before),
                ).fetchone()
                upto = max(upto, end if young is None else young[0] - 1)
        if upto < first:
            return 0
        protected = c.execute(
            "SELECT MIN(s) FROM (SELECT MIN(sequence) AS s FROM outbox WHERE conversation_id = ?"
            " UNION ALL SELECT MIN(sequence) FROM dead_letters WHERE conversation_id = ? AND kind = 'reply')",
            (conversation_id, conversation_id),
        ).fetchone()[0]
        if protected is not None:
            upto = min(upto, protected - 1)
        if upto < first:
            return 0
        # Nor past a reply emitted for a message still pending or dead-lettered: its next
        # run (a retry, a replay) finds it by its key, whose prefix is the message's id
        # (models.reply_key), or it would append it again under a new webhook-id.
        held = c.execute(
            "SELECT MIN(r.sequence) FROM replies r JOIN messages m"
            " ON m.id = substr(r.dedupe_key, 1, instr(r.dedupe_key, '@') - 1)"
            " WHERE r.conversation_id = ? AND r.sequence BETWEEN ? AND ? AND r.dedupe_key != ''"
            " AND m.state IN ('pending', 'dead')",
            (conversation_id, first, upto),
        ).fetchone()[0]
        if held is not None:
            upto = held - 1
        if upto < first:
            return 0
        deleted = c.execute(
            "DELETE FROM replies WHERE conversation_id = ? AND sequence <= ?", (conversation_id, upto)
        ).rowcount
        c.execute("UPDATE conversations SET first_retained = ? WHERE conversation_id = ?", (upto + 1, conversation_id))
        return int(deleted)

    async def expire_replies(self, before: float, after: str, limit: int) -> tuple[int, str]:
        if limit <= 0:
            return 0, ""

        def op(c: sqlite3.Connection) -> tuple[int, str]:
            ids = [
                row[0]
                for row in c.execute(
                    "SELECT conversation_id FROM conversations WHERE conversation_id > ? ORDER BY conversation_id"
                    " LIMIT ?",
                    (after, limit),
                )
            ]
            deleted = 0
            for i, conversation_id in enumerate(ids):
                deleted += self._trim(c, conversation_id, before)
                if deleted >= _EXPIRE_STEP and i + 1 < len(ids):  # a short step; the rest in the next
                    return deleted, conversation_id
            return deleted, ids[-1] if len(ids) == limit else ""

        # Not fsync'd on its own: an expiry lost to a power cut is done again by the next pass.
        return await self._run(op, durable=False)

    async def replies_after(
        self, conversation_id: str, after: int, limit: int, max_bytes: int | None = None
    ) -> list[Reply]:
        sql = (
            f"SELECT {_REPLY_COLUMNS} FROM replies r WHERE r.conversation_id = ? AND r.sequence > ?"
            " ORDER BY r.sequence LIMIT ?"
        )

        def op(c: sqlite3.Cursor) -> list[Reply]:
            rows = c.execute(sql, (conversation_id, after, max(limit, 0)))
            # Rows are fetched one at a time: those past the budget are never read.
            return [_reply(r) for r in within_bytes(((r, len(r[3])) for r in rows), max_bytes)]

        return await self._read(op)

    async def _conversation_field(self, conversation_id: str, column: str, default: Any) -> Any:
        sql = f"SELECT {column} FROM conversations WHERE conversation_id = ?"

        def op(c: sqlite3.Cursor) -> Any:
            row = c.execute(sql, (conversation_id,)).fetchone()
            return row[0] if row else default

        return await self._read(op)

    async def last_sequence(self, conversation_id: str) -> int:
        return int(await self._conversation_field(conversation_id, "last_sequence", 0))

    async def first_retained_sequence(self, conversation_id: str) -> int:
        return int(await self._conversation_field(conversation_id, "first_retained", 1))

    async def conversation_user(self, conversation_id: str) -> str | None:
        user = await self._conversation_field(conversation_id, "user_id", "")
        return str(user) if user else None

    # --- webhook outbox -------------------------------------------------------------

    async def due_deliveries(self, now: float, limit: int, stepped_after: float | None = None) -> list[Delivery]:
        sql = (
            f"WITH heads AS ({_HEAD_KEYS}) {_DELIVERIES}"
            " JOIN heads h ON h.id = o.conversation_id AND h.sequence = o.sequence"
            " WHERE o.next_attempt_at <= ? OR o.next_attempt_at > ? ORDER BY o.next_attempt_at LIMIT ?"
        )
        beyond = math.inf if stepped_after is None else stepped_after
        return await self._read(lambda c: [_delivery(r) for r in c.execute(sql, (now, beyond, max(limit, 0)))])

    async def queued_deliveries(self, conversation_id: str, limit: int) -> list[Delivery]:
        sql = _DELIVERIES + " WHERE o.conversation_id = ? ORDER BY o.sequence LIMIT ?"
        return await self._read(lambda c: [_delivery(r) for r in c.execute(sql, (conversation_id, max(limit, 0)))])

    async def next_due_at(self, after: float) -> float | None:
        sql = (
            f"WITH heads AS ({_HEAD_KEYS}) SELECT MIN(o.next_attempt_at) FROM heads h"
            " JOIN outbox o ON o.conversation_id = h.id AND o.sequence = h.sequence WHERE o.next_attempt_at > ?"
        )

        def op(c: sqlite3.Cursor) -> float | None:
            row = c.execute(sql, (after,)).fetchone()
            return None if row[0] is None else float(row[0])

        return await self._read(op)

    async def delivery_succeeded(self, conversation_id: str, sequence: int) -> None:
        def op(c: sqlite3.Connection) -> None:
            c.execute("DELETE FROM outbox WHERE conversation_id = ? AND sequence = ?", (conversation_id, sequence))
            self._trim(c, conversation_id)

        # Not fsync'd on its own (see _run): lost only to a power cut, which
        # means one more POST of a reply the receiver already has, same webhook-id.
        await self._run(op, durable=False)

    async def delivery_failed(
        self,
        conversation_id: str,
        sequence: int,
        *,
        attempts: int,
        first_attempt_at: float,
        next_attempt_at: float,
        error: str,
    ) -> None:
        await self._run(
            lambda c: c.execute(
                "UPDATE outbox SET attempts = ?, first_attempt_at = ?, next_attempt_at = ?, last_error = ?"
                " WHERE conversation_id = ? AND sequence = ?",
                (attempts, first_attempt_at, next_attempt_at, error[:ERROR_LIMIT], conversation_id, sequence),
            ),
            durable=False,  # lost only to a power cut: one attempt more, or sooner
        )

    async def delivery_dead(
        self, conversation_id: str, sequence: int, *, attempts: int, error: str, now: float
    ) -> DeadLetter:
        def op(c: sqlite3.Connection) -> DeadLetter:
            row = c.execute(
                f"SELECT {_REPLY_COLUMNS} FROM replies r WHERE r.conversation_id = ? AND r.sequence = ?",
                (conversation_id, sequence),
            ).fetchone()
            # Only a reply still owed: one delivered (or dead) already is not in the outbox.
            if (
                row is None
                or not c.execute(
                    "DELETE FROM outbox WHERE conversation_id = ? AND sequence = ?", (conversation_id, sequence)
                ).rowcount
            ):
                raise KeyError((conversation_id, sequence))
            reply = _reply(row)
            return _insert_dead(c, "reply", conversation_id, sequence, reply.webhook_body(), error, attempts, now,
                                {"webhook_id": reply.webhook_id})  # fmt: skip

        return await self._run(op)

    # --- dead letters ------------------------------------------------------------

    async def list_dead_letters(
        self, *, kind: str | None = None, conversation_id: str | None = None, limit: int = 100, after: int = 0
    ) -> list[DeadLetter]:
        where: list[str] = ["ord > ?"]
        args: list[Any] = [after]
        if kind is not None:
            where.append("kind = ?")
            args.append(kind)
        if conversation_id is not None:
            where.append("conversation_id = ?")
            args.append(conversation_id)
        sql = f"SELECT {_DEAD_COLUMNS}, ord FROM dead_letters WHERE " + " AND ".join(where) + " ORDER BY ord LIMIT ?"
        return await self._read(lambda c: [_dead_letter(r) for r in c.execute(sql, (*args, max(limit, 0)))])

    async def get_dead_letter(self, dead_letter_id: str) -> DeadLetter | None:
        def op(c: sqlite3.Cursor) -> DeadLetter | None:
            row = c.execute(f"SELECT {_DEAD_COLUMNS} FROM dead_letters WHERE id = ?", (dead_letter_id,)).fetchone()
            return _dead_letter(row) if row else None

        return await self._read(op)

    async def replay_dead_letter(self, dead_letter_id: str, *, now: float) -> bool:
        def op(c: sqlite3.Connection) -> bool:
            row = c.execute(f"SELECT {_DEAD_COLUMNS} FROM dead_letters WHERE id = ?", (dead_letter_id,)).fetchone()
            if row is None:
                return False
            letter = _dead_letter(row)
            if letter.kind == "reply":
                c.execute(
                    "INSERT OR REPLACE INTO outbox (conversation_id, sequence, next_attempt_at) VALUES (?, ?, ?)",
                    (letter.conversation_id, letter.sequence, now),
                )
                replayed = True
            else:  # a stale letter (its message was replayed and handled since) is dropped unreplayed
                replayed = (
                    c.execute(
                        "UPDATE messages SET state = 'pending', attempts = 0 WHERE id = ? AND state = 'dead'",
                        (letter.extra["message_id"],),
                    ).rowcount
                    > 0
                )
            c.execute("DELETE FROM dead_letters WHERE id = ?", (dead_letter_id,))
            return replayed

        return await self._run(op)

    async def backlog(self) -> tuple[int, int]:
        sql = "SELECT (SELECT COUNT(*) FROM dead_letters), (SELECT COUNT(DISTINCT conversation_id) FROM outbox)"
        row = await self._read(lambda c: c.execute(sql).fetchone())
        return int(row[0]), int(row[1])

    async def purge_dead_letters(self, ids: Sequence[str]) -> int:
        def op(c: sqlite3.Connection) -> int:
            # The replies a purge unpins are trimmed by the next append or sweep, as in
            # the other stores: not here, which would also forget their dedupe keys at once.
            removed = 0
            for i in ids:
                row = c.execute("SELECT kind, extra FROM dead_letters WHERE id = ?", (i,)).fetchone()
                if row:
                    c.execute("DELETE FROM dead_letters WHERE id = ?", (i,))
                    removed += 1
                    if row[0] == "message":  # given up for good: handled, so the dedupe window forgets it
                        message_id = orjson.loads(row[1])["message_id"]
                        c.execute("UPDATE messages SET state = 'done' WHERE id = ? AND state = 'dead'", (message_id,))
            return removed

        return await self._run(op)


def _insert_dead(
    c: sqlite3.Connection,
    kind: str,
    conversation_id: str,
    sequence: int,
    body: dict[str, Any],
    error: str,
    attempts: int,
    now: float,
    extra: dict[str, Any],
) -> DeadLetter:
    letter = DeadLetter(
        str(uuid.uuid4()), kind, conversation_id, sequence, body, error[:ERROR_LIMIT], attempts, now, extra
    )
    c.execute(
        f"INSERT INTO dead_letters ({_DEAD_COLUMNS}) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
        (letter.id, kind, conversation_id, sequence, orjson.dumps(body), letter.error, attempts, now,
         orjson.dumps(extra)),
    )  # fmt: skip
    return letter


class _Retry(Exception):
    """An operation failed inside a fast-path batch: redo it with savepoints."""


class _Worker:
    """The store's one thread: runs blocking calls (the COMMIT and its fsync, opening
    and closing) and hands each outcome back to the loop.

    Leaner than ``run_in_executor`` on a ThreadPoolExecutor, which per call adds a
    concurrent Future with its lock and Condition, the executor's own lock and an
    asyncio Future chained to it: this is one queue put, and one
    ``call_soon_threadsafe`` back.
    """

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self._loop = loop
        self._calls: queue.SimpleQueue[tuple[Callable[[], Any], Done] | None] = queue.SimpleQueue()
        self._thread = threading.Thread(target=self._serve, name="sqlite-store", daemon=True)
        self._thread.start()

    def submit(self, fn: Callable[[], Any], done: Done) -> None:
        """Run ``fn`` on the thread; ``done(result, error)`` then runs on the loop."""
        self._calls.put((fn, done))

    async def call(self, fn: Callable[[], T]) -> T:
        future: asyncio.Future[T] = self._loop.create_future()
        self.submit(fn, lambda result, error: _settle(future, result, error))
        return await future

    def stop(self) -> None:
        """End the thread; called once every submitted call has been answered, so the
        join is only the thread's way out of its loop."""
        self._calls.put(None)
        self._thread.join()

    def _serve(self) -> None:
        while (item := self._calls.get()) is not None:
            fn, done = item
            result: Any = None
            error: BaseException | None = None
            try:
                result = fn()
            except BaseException as e:  # noqa: BLE001 - handed to the caller on the loop
                error = e
            try:
                self._loop.call_soon_threadsafe(done, result, error)
            except RuntimeError:  # the loop is closed: nobody is left to tell
                return


def _repeat(row: tuple[Any, ...], fingerprint: str) -> AcceptResult:
    """The answer to a message whose ids are stored (``row``, of _REPEAT_SQL): a duplicate,
    or Conflict."""
    if row[7] != fingerprint:
        raise Conflict()
    return AcceptResult(_message(row), duplicate=True, pending=row[10] == "pending")


def _for_caller(error: BaseException | None) -> BaseException | None:
    """What a write's caller hears of a failed transaction. SQLite's OperationalError (the
    disk is full, an I/O error, a lock not granted in time) is the store being unable to
    write for now: Unavailable, so that a client hears "try again" (503 / UNAVAILABLE),
    not an internal error with a traceback per request; the batch's failure is logged once."""
    if isinstance(error, sqlite3.OperationalError):
        unavailable = Unavailable("the store cannot write now; try again")
        unavailable.__cause__ = error
        return unavailable
    return error


def _settle(future: asyncio.Future[Any], result: Any, error: BaseException | None) -> None:
    if future.done():  # the caller was cancelled; the operation still happened (or not) atomically
        return
    if error is not None:
        future.set_exception(error)
    else:
        future.set_result(result)
