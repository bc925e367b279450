"""Chaos soak: kill, stop or starve the sidecar of Redis answers under load, then check what it promises.

    python -m bench.soak [--store sqlite|redis] [--variant kill|term|stop|lostanswer|diskfull|mixed] [--cycles N]
                         [--seed S]

Runs ``sidecar serve`` as a child (echo bot, queue bound 60, two bot lanes) and loads it from 20 conversations,
each sending messages in turn over HTTP or gRPC until acknowledged, sometimes resending one or giving up; a
follower per conversation Subscribes, resuming from its last sequence; the webhook receiver sometimes answers
5xx or too slowly. Each cycle does one thing to the child, then restarts it on the same store and ports. kill:
kill -9 under load, 0-1.2 s after a start, just after ready, while a receiver outage's backlog drains, or after
a restart with a queue bound below the backlog. term: SIGTERM, whose drain must exit 0. stop: SIGSTOP for 1-4 s.
lostanswer (Redis): a proxy drops Redis's answers for 0.5-2.5 s, so steps run unanswered. diskfull (SQLite):
for 0.5-3 s the child cannot grow a file past the WAL's size then (RLIMIT_FSIZE: a disk that filled up), so
commits fail (503) while the WAL has no room. mixed: all of these.

Then the load stops and, once the sidecar is idle, it checks: each acknowledged message has exactly one reply
(a given-up one at most one), echoing it; sequences are 1..n; replies follow send order; resends are answered
as duplicates; webhook first deliveries follow sequence order, each after the previous reply's 2xx, and every
reply is delivered under a webhook-id of its own; each follower saw exactly 1..n; nothing is pending or owed;
no dead letters (none expected: the bot never fails, webhook attempts are unlimited).

Loopback only (Redis: 127.0.0.1:6379, under a key prefix of its own, deleted at the end) and bounded: a cycle
takes 3-10 s, the final wait for idle at most --final-timeout (90 s), a conversation sends at most
--max-messages (1000); 6 cycles take about 30 s when all is well. The child is killed however the run ends.
It runs the ``sidecar`` this module imports (the summary names it): to soak another checkout, run it there.

Prints each violation (check, conversation, message ids, expected, seen), then a one-line JSON summary.
Exit 0: every invariant held; 1: one broke (its work directory, with the sidecar's log, is kept); 2: bad
usage or a harness failure.
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import contextlib
import functools
import itertools
import json
import os
import random
import resource
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import grpc
import orjson
import redis.asyncio
from aiohttp import web
from google.protobuf import json_format, struct_pb2

import sidecar
from sidecar.models import Reply
from sidecar.store.base import Store
from sidecar.store.redis import RedisStore, RedisStoreError
from sidecar.store.sqlite import SqliteStore
from sidecar.v1 import sidecar_pb2, sidecar_pb2_grpc
from tests.local_server import LocalServer
from tests.procs import SidecarProcess

SOURCE = str(Path(sidecar.__file__).resolve().parent.parent)
REDIS_HOST, REDIS_PORT = "127.0.0.1", 6379
ADMIN_TOKEN = "soak-admin-token"
CONVERSATIONS, PACE = 20, 0.05  # PACE: the longest pause between two messages of a conversation
RESEND_RATE = GIVE_UP_RATE = 0.05  # of resending an acknowledged message; of giving up after a failed send
DRAIN_TIMEOUT = 5.0
SETTINGS = (  # fast webhook retries, never a dead letter; a small queue and two bot lanes, so backlogs build
    "WEBHOOK_TIMEOUT=1 WEBHOOK_BACKOFF_INITIAL=0.05 WEBHOOK_BACKOFF_MAX=0.5 WEBHOOK_MAX_ATTEMPTS=100000 "
    f"MAX_PENDING_MESSAGES=60 BOT_CONCURRENCY=2 DRAIN_TIMEOUT={DRAIN_TIMEOUT}"
)
GRPC_OUTCOMES = {"RESOURCE_EXHAUSTED": "busy", "UNAVAILABLE": "unavailable", "ALREADY_EXISTS": "conflict"}
GRPC_OUTCOMES |= {"DEADLINE_EXCEEDED": "timeout", "CANCELLED": "connection"}
GRPC_OPTIONS = [("grpc.initial_reconnect_backoff_ms", 100), ("grpc.max_reconnect_backoff_ms", 300)]
ACTIONS = {"term": ["sigterm"], "stop": ["sigstop"], "lostanswer": ["lost_answers"], "diskfull": ["disk_full"]}
ACTIONS["kill"] = ["early", "after_ready", "mid_load", "mid_load", "webhook_outage", "backlog"]
ACTIONS["mixed"] = (
    ACTIONS["kill"] + ACTIONS["term"] + ACTIONS["stop"] + (ACTIONS["lostanswer"] + ACTIONS["diskfull"]) * 3
)
STORE_ACTIONS = {"lost_answers": "redis", "disk_full": "sqlite"}  # what only one store can meet
T0 = time.monotonic()


def at(t: float | None = None) -> str:
    return f"{(time.monotonic() if t is None else t) - T0:.3f}s"


class StartFailed(Exception):
    """A start did not get ready: the child exited, or /readyz stayed unready for 40 s."""


@dataclass
class Violation:
    check: str
    conversation: str
    messages: list[str]
    expected: str
    seen: str

    def __str__(self) -> str:
        ids = ",".join(self.messages[:10]) + (f",... ({len(self.messages)})" if len(self.messages) > 10 else "")
        where = f"conversation={self.conversation or '-'} messages={ids or '-'}"
        return f"VIOLATION [{self.check}] {where}: expected {self.expected}; seen {self.seen}"


@dataclass
class Msg:
    conv: str
    mid: str  # also its text, which the echo bot sends back
    index: int
    acked: bool = False
    given_up: bool = False
    answers: list[str] = field(default_factory=list)


class Clients:
    """Each conversation sends its messages one after another, each until acknowledged or given up."""

    def __init__(self, child: SidecarProcess, rng: random.Random, limit: int, flag: Callable[..., None]) -> None:
        self.child, self.rng, self.limit, self.flag = child, rng, limit, flag
        self.sent: dict[str, list[Msg]] = {f"c{i:02d}": [] for i in range(CONVERSATIONS)}
        self.outcomes: collections.Counter[str] = collections.Counter()
        self.stop = asyncio.Event()
        self.session: aiohttp.ClientSession | None = None
        self.stub: Any = None

    async def run(self) -> None:
        async with (
            aiohttp.ClientSession() as self.session,
            grpc.aio.insecure_channel(self.child.grpc_target, options=GRPC_OPTIONS) as channel,
        ):
            self.stub = sidecar_pb2_grpc.MessagingServiceStub(channel)
            await asyncio.gather(*(self.conversation(c, random.Random(self.rng.random())) for c in self.sent))

    async def conversation(self, conv: str, rng: random.Random) -> None:
        for i in range(self.limit):
            if self.stop.is_set():
                return
            m = Msg(conv, f"{conv}-m{i}", i)
            self.sent[conv].append(m)
            await self.send(m, rng)
            if m.acked and rng.random() < RESEND_RATE:  # an at-least-once producer repeats itself
                await self.send(m, rng, resend=True)
            await asyncio.sleep(rng.uniform(0, PACE))

    async def send(self, m: Msg, rng: random.Random, *, resend: bool = False) -> None:
        while True:
            proto = rng.choice(("http", "grpc"))
            outcome, dup = await (self.http_send(m, rng) if proto == "http" else self.grpc_send(m))
            m.answers.append(f"{proto}:{outcome}{' duplicate' if dup else ''}")
            self.outcomes[outcome] += 1
            if outcome == "ok":
                if resend and not dup:
                    self.flag("dedupe", m.conv, [m.mid], "a resend answered as a duplicate", f"{m.answers[-6:]}")
                m.acked = True
                return
            if outcome in ("conflict", "bad"):
                self.flag("ingress", m.conv, [m.mid], "200 or a retryable error", f"{m.answers[-6:]} at {at()}")
            if not resend and rng.random() < GIVE_UP_RATE:
                m.given_up = True  # stored or not, it must not be stranded
                return
            await asyncio.sleep(rng.uniform(0.02, 0.3))

    async def http_send(self, m: Msg, rng: random.Random) -> tuple[str, bool]:
        assert self.session is not None
        body: dict[str, Any] = {"userId": "u", "messageId": m.mid, "conversationId": m.conv, "text": m.mid}
        body |= {"type": "text", "payload": {"text": m.mid}} if rng.random() < 0.7 else {"type": "text"}
        try:
            url, timeout = self.child.http + "/webhook", aiohttp.ClientTimeout(total=2.0)
            async with self.session.post(url, json=body, timeout=timeout) as r:
                raw = await r.read()
                if r.status != 200:
                    return {429: "busy", 503: "unavailable", 409: "conflict"}.get(r.status, "bad"), False
                data = orjson.loads(raw)
                ok = data.get("messageId") == m.mid and data.get("conversationId") == m.conv
                return ("ok" if ok else "bad"), bool(data.get("duplicate"))
        except TimeoutError:
            return "timeout", False
        except aiohttp.ClientError:
            return "connection", False

    async def grpc_send(self, m: Msg) -> tuple[str, bool]:
        payload = json_format.ParseDict({"text": m.mid}, struct_pb2.Value())
        request = sidecar_pb2.SendMessageRequest(
            user_id="u", message_id=m.mid, conversation_id=m.conv, type="text", text=m.mid, payload=payload
        )
        try:
            response = await self.stub.SendMessage(request, timeout=2.0)
        except grpc.aio.AioRpcError as e:
            return GRPC_OUTCOMES.get(e.code().name, "bad"), False
        ok = response.message_id == m.mid and response.conversation_id == m.conv
        return ("ok" if ok else "bad"), response.duplicate


class Follower:
    """A Subscribe stream for one conversation that resumes after its last sequence, like ``sidecar tail``."""

    def __init__(self, target: str, conv: str) -> None:
        self.target, self.conv = target, conv
        self.seen: list[tuple[int, str]] = []  # (sequence, in_reply_to)
        self.last = self.streams = 0

    async def run(self) -> None:
        while True:
            with contextlib.suppress(grpc.aio.AioRpcError):  # the sidecar went away: resume once it is back
                async with grpc.aio.insecure_channel(self.target, options=GRPC_OPTIONS) as channel:
                    stub = sidecar_pb2_grpc.MessagingServiceStub(channel)
                    request = sidecar_pb2.SubscribeRequest(conversation_id=self.conv, after_sequence=self.last)
                    self.streams += 1
                    async for reply in stub.Subscribe(request):
                        self.seen.append((reply.sequence, reply.in_reply_to))
                        self.last = reply.sequence
            await asyncio.sleep(0.05)


@dataclass
class Post:
    conv: str
    bot_message_id: str
    webhook_id: str | None
    text: Any
    arrived: float
    answered: float
    status: int


class FlakyReceiver(LocalServer):
    """The response URL; ``mode``: ok (rare 5xx and slow 200s), flaky (more of both), down (503) or perfect."""

    def __init__(self, rng: random.Random) -> None:
        super().__init__("/replies")
        self.rng, self.mode = rng, "ok"
        self.posts: list[Post] = []

    def answer(self) -> tuple[int, float]:
        r, (failing, slow) = self.rng.random(), {"ok": (0.03, 0.05), "flaky": (0.25, 0.35)}.get(self.mode, (0, 0))
        if self.mode == "down" or r < failing:
            return self.rng.choice((500, 503)), 0.0
        return 200, (self.rng.uniform(0.1, 1.8) if r < slow else 0.0)  # past 1 s the sidecar times out and retries

    async def handle(self, request: web.Request) -> web.Response:
        arrived = time.monotonic()
        body = orjson.loads(await request.read())
        status, delay = self.answer()
        await asyncio.sleep(delay)
        text = body["payload"].get("text") if isinstance(body.get("payload"), dict) else None
        ids = body.get("conversationId", ""), body.get("botpressMessageId", ""), request.headers.get("webhook-id")
        self.posts.append(Post(*ids, text, arrived, time.monotonic(), status))
        return web.Response(status=status)


class LossyProxy:
    """sidecar <-> proxy <-> Redis. While ``lossy``, each chunk of Redis's answers is dropped with probability
    0.3 and the connection closed: the step ran, its answer never arrives."""

    def __init__(self, rng: random.Random) -> None:
        self.rng, self.lossy, self.drops, self.port = rng, False, 0, 0
        self.server: asyncio.Server | None = None

    async def start(self) -> None:
        self.server = await asyncio.start_server(self.handle, "127.0.0.1", 0)
        self.port = int(self.server.sockets[0].getsockname()[1])

    async def handle(self, client_r: asyncio.StreamReader, client_w: asyncio.StreamWriter) -> None:
        redis_r, redis_w = await asyncio.open_connection(REDIS_HOST, REDIS_PORT)

        async def pump(src: asyncio.StreamReader, dst: asyncio.StreamWriter, answers: bool) -> None:
            with contextlib.suppress(OSError):
                while data := await src.read(65536):
                    if answers and self.lossy and self.rng.random() < 0.3:
                        self.drops += 1
                        break
                    dst.write(data)
                    await dst.drain()
            client_w.close()
            redis_w.close()

        await asyncio.gather(pump(client_r, redis_w, False), pump(redis_r, client_w, True))


@dataclass
class Snapshot:
    logs: dict[str, list[Reply]] = field(default_factory=dict)
    bounds: dict[str, tuple[int, int]] = field(default_factory=dict)  # first retained, last sequence
    owed: dict[str, list[int]] = field(default_factory=dict)
    pending: list[str] = field(default_factory=list)
    dead: list[str] = field(default_factory=list)


class Soak:
    def __init__(self, args: argparse.Namespace, workdir: Path) -> None:
        self.args, self.workdir, self.rng = args, workdir, random.Random(args.seed)
        self.found: list[Violation] = []
        self.actions: collections.Counter[str] = collections.Counter()
        self.receiver = FlakyReceiver(random.Random(self.rng.random()))
        self.proxy = LossyProxy(random.Random(self.rng.random())) if args.store == "redis" else None
        self.prefix = f"soak-{os.getpid()}-{args.seed}:"  # of every Redis key of this run
        self.redis_url = f"redis://{REDIS_HOST}:{REDIS_PORT}/0?prefix={self.prefix}"
        self.child = SidecarProcess(
            workdir,
            PYTHONPATH=os.pathsep.join(filter(None, [SOURCE, os.environ.get("PYTHONPATH")])),  # the code we import
            SIDECAR_STORE=f"sqlite:///{workdir}/sidecar.db",
            SIDECAR_WEBHOOK_SECRET="whsec_c29hay1zZWNyZXQtMDEyMzQ1Njc4OWFiY2RlZg==",  # signed: webhook-id headers
            SIDECAR_ADMIN_TOKENS=ADMIN_TOKEN,
            **{"SIDECAR_" + k: v for k, v in (kv.split("=") for kv in SETTINGS.split())},
        )
        self.clients = Clients(self.child, random.Random(self.rng.random()), args.max_messages, self.flag)
        self.followers = [Follower(self.child.grpc_target, c) for c in self.clients.sent]
        self.admin: aiohttp.ClientSession | None = None

    def flag(self, check: str, conversation: str, messages: list[str], expected: str, seen: str) -> None:
        self.found.append(Violation(check, conversation, messages, expected, seen[:1000]))

    async def run(self) -> None:
        async with self.receiver, aiohttp.ClientSession() as self.admin:
            self.child.env["SIDECAR_RESPONSE_URL"] = self.receiver.url
            tasks: list[asyncio.Task[None]] = []
            try:
                if self.proxy is not None:
                    await self.proxy.start()
                    self.child.env["SIDECAR_STORE"] = f"redis://{REDIS_HOST}:{self.proxy.port}/0?prefix={self.prefix}"
                await self.start()  # if the first start fails, the run does (exit 2)
                tasks = [*map(asyncio.create_task, [self.clients.run(), *(f.run() for f in self.followers)])]
                if await self.cycles():
                    await self.finish(tasks[0])
            finally:
                for task in tasks:
                    task.cancel()
                await asyncio.gather(*tasks, return_exceptions=True)
                self.child.close()
                if self.proxy is not None and self.proxy.server is not None:
                    self.proxy.server.close()
                    with contextlib.suppress(redis.asyncio.RedisError, RedisStoreError):  # Redis is down
                        store = RedisStore(self.redis_url, exclusive=False)
                        await store.open()
                        await store.drop()
                        await store.close()

    async def cycles(self) -> bool:
        """Each cycle one action, then a restart if it left the child dead; False if a restart failed."""
        await asyncio.sleep(self.rng.uniform(1, 2))
        for cycle in range(self.args.cycles):
            actions = ACTIONS[self.args.variant]
            action = self.rng.choice([a for a in actions if STORE_ACTIONS.get(a, self.args.store) == self.args.store])
            self.receiver.mode = self.rng.choice(["ok", "ok", "flaky"])
            print(f"[{at()}] cycle {cycle + 1}/{self.args.cycles}: {action}", file=sys.stderr, flush=True)
            self.actions[action] += 1
            try:
                await asyncio.sleep(self.rng.uniform(0.5, 2.5))
                await self.act(action)
                if self.child.proc is None or self.child.proc.poll() is not None:
                    await self.start()
            except StartFailed as e:
                self.flag("restart", "", [], "ready within 40 s of a restart", str(e)[-1000:])
                return False
            await asyncio.sleep(self.rng.uniform(0.2, 1.5))
        return True

    async def start(self, **override: str) -> None:
        env, self.child.env = self.child.env, {**self.child.env, **override}
        try:
            # SQLite: SIGXFSZ ignored and the limit settable later, for the disk_full action.
            limit = resource.RLIM_INFINITY if self.args.store == "sqlite" else None
            await asyncio.to_thread(functools.partial(self.child.start, 40.0, file_size_limit=limit))
        except AssertionError as e:  # how SidecarProcess says it
            raise StartFailed(str(e)) from None
        finally:
            self.child.env = env

    async def kill(self) -> None:
        await asyncio.to_thread(self.child.kill)
        if self.proxy is not None:  # the dead holder's Redis lease: the restart need not wait it out
            client = redis.asyncio.Redis(host=REDIS_HOST, port=REDIS_PORT)
            await client.delete(self.prefix + "owner")
            await client.aclose()

    async def act(self, action: str) -> None:
        proc, rng = self.child.proc, self.rng
        assert proc is not None
        if action in ("early", "after_ready", "mid_load", "backlog"):
            await self.kill()
        if action == "early":  # killed before ready, while reloading pending messages, or just after
            starting = asyncio.create_task(self.start())
            await asyncio.sleep(rng.uniform(0.05, 1.2))
            await self.kill()
            with contextlib.suppress(StartFailed):
                await starting
        elif action == "after_ready":
            await self.start()
            await asyncio.sleep(rng.uniform(0.0, 0.3))  # its pending messages being run again
            await self.kill()
        elif action == "backlog":  # more pending than the bound: loaded as the queue drains
            await self.start(SIDECAR_MAX_PENDING_MESSAGES="8")
            await asyncio.sleep(rng.uniform(0.0, 0.8))
            if rng.random() < 0.7:
                await self.kill()
        elif action == "webhook_outage":
            self.receiver.mode = "down"
            await asyncio.sleep(rng.uniform(1.5, 3.0))
            self.receiver.mode = rng.choice(["ok", "flaky", "perfect"])
            await asyncio.sleep(rng.uniform(0.0, 0.6))  # the backlog being delivered
            await self.kill()
        elif action == "sigterm":
            await self.drain("a SIGTERM under load")
        elif action == "sigstop":
            proc.send_signal(signal.SIGSTOP)
            await asyncio.sleep(rng.uniform(1.0, 4.0))
            proc.send_signal(signal.SIGCONT)
        elif action == "disk_full":
            wal = self.workdir / "sidecar.db-wal"
            room = max(wal.stat().st_size if wal.exists() else 0, 64 * 1024)
            resource.prlimit(proc.pid, resource.RLIMIT_FSIZE, (room, resource.RLIM_INFINITY))
            await asyncio.sleep(rng.uniform(0.5, 3.0))
            if proc.poll() is None:
                resource.prlimit(proc.pid, resource.RLIMIT_FSIZE, (resource.RLIM_INFINITY, resource.RLIM_INFINITY))
        elif action == "lost_answers" and self.proxy is not None:
            self.proxy.lossy = True
            await asyncio.sleep(rng.uniform(0.5, 2.5))
            self.proxy.lossy = False

    async def drain(self, what: str) -> None:
        try:
            code = await asyncio.to_thread(self.child.terminate, DRAIN_TIMEOUT + 15)
        except subprocess.TimeoutExpired:
            code = None
            await self.kill()
        if code != 0:
            self.flag("drain", "", [], f"{what} exits 0 within the drain timeout", f"exit code {code}")

    async def admin_get(self, path: str) -> Any:
        """The admin listener's JSON answer, or what went wrong."""
        assert self.admin is not None
        url, auth = f"http://127.0.0.1:{self.child.admin_port}{path}", {"Authorization": f"Bearer {ADMIN_TOKEN}"}
        try:
            async with self.admin.get(url, headers=auth, timeout=aiohttp.ClientTimeout(total=5)) as r:
                return await r.json() if r.status == 200 else f"HTTP {r.status}"
        except (aiohttp.ClientError, TimeoutError) as e:
            return repr(e)

    async def snapshot(self, store: Store) -> Snapshot:
        s = Snapshot()
        for c in self.clients.sent:
            s.logs[c] = await store.replies_after(c, 0, 10**7)
            s.bounds[c] = await store.first_retained_sequence(c), await store.last_sequence(c)
            s.owed[c] = [d.reply.sequence for d in await store.queued_deliveries(c, 10**7)]
        s.pending = [p.message.message_id for p in await store.pending_messages(10**7)]
        s.dead = [f"{d.kind} {d.conversation_id} #{d.sequence}: {d.error}" for d in await store.list_dead_letters()]
        return s

    async def finish(self, load: asyncio.Task[None]) -> None:
        """Stop the load, wait until the sidecar is idle, check, and end the child with a drain."""
        print(f"[{at()}] load stopped, waiting until idle", file=sys.stderr, flush=True)
        self.receiver.mode = "perfect"
        self.clients.stop.set()
        await asyncio.wait([load], timeout=60)
        stuck = [ms[-1].mid for ms in self.clients.sent.values() if ms and not (ms[-1].acked or ms[-1].given_up)]
        if stuck:
            self.flag("ingress", "", stuck, "an answer within 60 s of retries once the load stopped", "none")
        sqlite = SqliteStore(str(self.workdir / "sidecar.db"), exclusive=False)
        store: Store = RedisStore(self.redis_url, exclusive=False) if self.proxy is not None else sqlite
        await store.open()
        try:
            deadline = time.monotonic() + self.args.final_timeout
            while time.monotonic() < deadline:
                snap, ready = await self.snapshot(store), await self.admin_get("/readyz")
                caught_up = all(f.last >= snap.bounds[f.conv][1] for f in self.followers)
                pending = ready["details"]["pending_messages"] if isinstance(ready, dict) else None
                if pending == 0 and not snap.pending and not any(snap.owed.values()) and caught_up:
                    break
                await asyncio.sleep(0.5)
            await asyncio.sleep(1.0)  # late duplicates, if any
            snap, ready = await self.snapshot(store), await self.admin_get("/readyz")
        finally:
            await store.close()
        self.check(snap, ready, await self.admin_get("/v1/dead-letters?limit=1000"))
        await self.drain("the final SIGTERM")

    def check(self, snap: Snapshot, ready: Any, dead_letters: Any) -> None:
        """The invariants, once the sidecar is idle; each broken one is flagged."""
        if snap.pending or not isinstance(ready, dict) or ready["details"]["pending_messages"] != 0:
            self.flag("pending", "", snap.pending, "nothing pending once idle", f"store: those; /readyz: {ready}")
        if snap.dead or not isinstance(dead_letters, dict) or dead_letters["deadLetters"]:
            self.flag("dead letters", "", [], "none", f"store {snap.dead[:5]}; admin API {dead_letters}")
        for c in self.clients.sent:
            self.check_conversation(c, snap.logs[c], *snap.bounds[c])
            self.check_webhook(c, snap.logs[c])

    def check_conversation(self, c: str, log: list[Reply], first: int, last: int) -> None:
        n, seqs, sent = len(log), [r.sequence for r in log], {m.mid: m for m in self.clients.sent[c]}
        if seqs != list(range(1, n + 1)) or last != n or first != 1:
            self.flag("sequence", c, [], f"1..{n}, last {n}, first 1", f"{seqs[:20]}, last {last}, first {first}")
        replies: dict[str, list[int]] = collections.defaultdict(list)
        for r in log:
            replies[r.in_reply_to].append(r.sequence)
            if r.in_reply_to not in sent or r.payload != {"text": r.in_reply_to}:
                self.flag("reply", c, [r.in_reply_to], "replies to messages sent, echoing them", f"{r}")
        for m in sent.values():
            got = replies.get(m.mid, [])
            if len(got) > 1 or (m.acked and not got):
                expected = "exactly one reply" if m.acked else "at most one reply (given up)"
                self.flag("reply", c, [m.mid], expected, f"seqs {got}; client answers {m.answers[-6:]}")
        order = [r for r in log if r.in_reply_to in sent and sent[r.in_reply_to].acked]
        for a, b in itertools.pairwise(order):
            if sent[b.in_reply_to].index < sent[a.in_reply_to].index:
                seen = f"seq {a.sequence} answers the later message, seq {b.sequence} the earlier"
                self.flag("order", c, [a.in_reply_to, b.in_reply_to], "replies in send order", seen)
                break
        follower = next(f for f in self.followers if f.conv == c)
        if follower.seen != [(r.sequence, r.in_reply_to) for r in log]:
            counts = collections.Counter(s for s, _ in follower.seen)
            repeated = [s for s, k in counts.items() if k > 1][:5]
            missing = sorted(set(range(1, n + 1)) - set(counts))[:5]
            seen = f"{len(follower.seen)} replies, repeated {repeated}, missing {missing}"
            self.flag("subscribe", c, [], f"a follower sees 1..{n} once each, as logged", seen)

    def check_webhook(self, c: str, log: list[Reply]) -> None:
        """First deliveries follow sequence order, each after the previous reply's 2xx; every reply gets one."""
        by_id = {r.bot_message_id: r for r in log}
        posts = sorted((p for p in self.receiver.posts if p.conv == c), key=lambda p: p.arrived)
        acked: dict[int, float] = {}  # sequence -> its earliest 2xx
        for p in posts:
            if p.bot_message_id in by_id and 200 <= p.status < 300:
                seq = by_id[p.bot_message_id].sequence
                acked[seq] = min(acked.get(seq, p.answered), p.answered)
        webhook_ids: dict[str, set[str | None]] = collections.defaultdict(set)
        for p in posts:
            r = by_id.get(p.bot_message_id)
            if r is None or {"text": p.text} != r.payload:
                self.flag("webhook", c, [p.bot_message_id], "POSTs of logged replies, as logged", f"{p}")
                continue
            first = r.bot_message_id not in webhook_ids
            webhook_ids[r.bot_message_id].add(p.webhook_id)
            previous = acked.get(r.sequence - 1, float("inf")) if r.sequence > 1 else 0.0
            if first and previous > p.arrived:
                expected = f"seq {r.sequence} first POSTed after seq {r.sequence - 1}'s 2xx"
                seen = f"first POST at {at(p.arrived)}, the 2xx at {at(previous)}"
                self.flag("webhook order", c, [r.in_reply_to], expected, seen)
        undelivered = [r for r in log if r.sequence not in acked]
        if undelivered:
            seen = f"never: seqs {[r.sequence for r in undelivered][:10]}"
            self.flag("webhook", c, [r.in_reply_to for r in undelivered], "every reply delivered with a 2xx", seen)
        owners = collections.Counter(i for ids in webhook_ids.values() for i in ids)  # replies per webhook-id
        for ids in webhook_ids.values():
            if len(ids) > 1 or None in ids or any(owners[i] > 1 for i in ids):
                self.flag("webhook", c, [], "one webhook-id per reply, of its own", f"{sorted(map(str, ids))}")

    def summary(self, seconds: float) -> dict[str, Any]:
        msgs = [m for ms in self.clients.sent.values() for m in ms]
        return {
            "ok": not self.found,
            "violations": len(self.found),
            **{k: getattr(self.args, k) for k in ("store", "variant", "cycles", "seed")},
            "actions": dict(self.actions),
            "messages": len(msgs),
            "acknowledged": sum(m.acked for m in msgs),
            "given_up": sum(m.given_up for m in msgs),
            "client_outcomes": dict(self.clients.outcomes),
            "webhook_posts": len(self.receiver.posts),
            "subscribe_streams": sum(f.streams for f in self.followers),
            "redis_answers_dropped": self.proxy.drops if self.proxy else None,
            "seconds": round(seconds, 1),
            "sidecar": SOURCE,
        }


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m bench.soak", description=(__doc__ or "").split("\n")[0])
    parser.add_argument("--store", choices=["sqlite", "redis"], default="sqlite")
    parser.add_argument("--variant", choices=sorted(ACTIONS), default="kill")
    parser.add_argument("--cycles", type=int, default=6, help="chaos actions, each followed by a restart (1-1000)")
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--max-messages", type=int, default=1000, help="messages per conversation, at most")
    parser.add_argument("--final-timeout", type=float, default=90.0, help="seconds to wait for idle at the end")
    args = parser.parse_args(argv)
    if not 1 <= args.cycles <= 1000 or args.max_messages < 1 or not 0 < args.final_timeout <= 3600:
        parser.error("--cycles must be 1-1000, --max-messages positive, --final-timeout 0-3600")
    if args.variant == "lostanswer" and args.store != "redis":
        parser.error("--variant lostanswer needs --store redis: only Redis can run a step and lose its answer")
    if args.variant == "diskfull" and args.store != "sqlite":
        parser.error("--variant diskfull needs --store sqlite: it limits the sidecar's own files")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)  # exits 2 on bad usage
    workdir = Path(tempfile.mkdtemp(prefix=f"soak-{args.store}-{args.variant}-"))
    soak, started = Soak(args, workdir), time.monotonic()
    try:
        asyncio.run(soak.run())
    except Exception as e:  # noqa: BLE001 - the harness failed, which is not a finding: exit 2
        if not isinstance(e, StartFailed):  # the first start: its log says why (Redis down, a port taken)
            traceback.print_exc()
        lines = (str(e) or repr(e)).strip().splitlines()  # a failed start: its first line, the log's last
        print(json.dumps({"ok": False, "error": " ".join(lines[:1] + lines[1:][-1:]), "workdir": str(workdir)}))
        return 2
    for violation in soak.found[:50]:
        print(violation, flush=True)
    if len(soak.found) > 50:
        print(f"... and {len(soak.found) - 50} more violations", flush=True)
    summary = soak.summary(time.monotonic() - started)
    if soak.found:
        summary["workdir"] = str(workdir)  # kept for the post-mortem: the sidecar's log, the SQLite store
    else:
        shutil.rmtree(workdir, ignore_errors=True)
    print(json.dumps(summary), flush=True)
    return 1 if soak.found else 0


if __name__ == "__main__":
    sys.exit(main())
