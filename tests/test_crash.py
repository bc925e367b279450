"""kill -9 under load, restart on the same store: nothing accepted is lost, nothing is produced twice."""

from __future__ import annotations

import asyncio
import random
from pathlib import Path

import aiohttp
import grpc

from sidecar.models import Reply
from sidecar.store.sqlite import SqliteStore
from sidecar.v1 import sidecar_pb2, sidecar_pb2_grpc
from tests.conftest import eventually
from tests.procs import SidecarProcess
from tests.receiver import Receiver
from tests.test_grpc_ingress import request

CONVERSATIONS = 24
MESSAGES = 480  # bounded: the whole test stays within a few seconds of load
KILL_AFTER = 160  # acknowledged messages before the kill -9


class Driver:
    """Sends messages over HTTP and gRPC concurrently; remembers which ones were acknowledged."""

    def __init__(self) -> None:
        self.acked: set[str] = set()
        self.enough = asyncio.Event()

    async def run(self, p: SidecarProcess) -> None:
        order = [(f"c{i % CONVERSATIONS}", f"m{i}") for i in range(MESSAGES)]
        random.Random(7).shuffle(order)
        per_conversation: dict[str, list[str]] = {}
        for conversation, message_id in order:
            per_conversation.setdefault(conversation, []).append(message_id)
        async with aiohttp.ClientSession() as session, grpc.aio.insecure_channel(p.grpc_target) as channel:
            stub = sidecar_pb2_grpc.MessagingServiceStub(channel)
            await asyncio.gather(
                *(self._conversation(session, stub, p, c, ids) for c, ids in per_conversation.items()),
                return_exceptions=True,
            )

    async def _conversation(self, session: aiohttp.ClientSession, stub: sidecar_pb2_grpc.MessagingServiceStub,
                            p: SidecarProcess, conversation: str, ids: list[str]) -> None:  # fmt: skip
        for n, message_id in enumerate(ids):
            text = f"{conversation}/{message_id}"
            try:
                if n % 2:
                    await stub.SendMessage(request(conversation, message_id, text), timeout=5)
                else:
                    body = {"userId": "u", "messageId": message_id, "conversationId": conversation,
                            "type": "text", "text": text}  # fmt: skip
                    async with session.post(p.http + "/webhook", json=body, timeout=aiohttp.ClientTimeout(5)) as r:
                        if r.status != 200:
                            continue
            except (grpc.aio.AioRpcError, aiohttp.ClientError, TimeoutError):
                return  # the process died under us: the rest of this conversation is never sent
            self.acked.add(text)
            if len(self.acked) >= KILL_AFTER:
                self.enough.set()


async def follow(target_of: list[str], conversation: str, seen: list[int], stop: asyncio.Event) -> None:
    """A subscriber that resumes from its last sequence across the crash, like `sidecar tail`."""
    last: int | None = 0
    while not stop.is_set():
        try:
            async with grpc.aio.insecure_channel(target_of[0]) as channel:
                stub = sidecar_pb2_grpc.MessagingServiceStub(channel)
                call = stub.Subscribe(sidecar_pb2.SubscribeRequest(conversation_id=conversation, after_sequence=last))
                async for reply in call:
                    seen.append(reply.sequence)
                    last = reply.sequence
        except grpc.aio.AioRpcError:
            pass
        await asyncio.sleep(0.05)


async def test_kill_9_under_load_loses_nothing_accepted_and_doubles_nothing(tmp_path: Path) -> None:
    async with Receiver() as receiver:
        env = {"SIDECAR_RESPONSE_URL": receiver.url, "SIDECAR_WEBHOOK_BACKOFF_INITIAL": "0.05",
               "SIDECAR_WEBHOOK_BACKOFF_MAX": "0.2", "SIDECAR_LOG_LEVEL": "WARNING"}  # fmt: skip
        receiver.script("c3", 503, 503, 503)  # one conversation also rides through receiver failures
        first = SidecarProcess(tmp_path, **env)
        second = SidecarProcess(tmp_path, **env)
        # The restarted process takes over the same addresses, as a restarted container would.
        second.http_port, second.grpc_port, second.admin_port = first.http_port, first.grpc_port, first.admin_port
        second.env.update({k: first.env[k] for k in ("SIDECAR_HTTP_ADDR", "SIDECAR_GRPC_ADDR", "SIDECAR_ADMIN_ADDR")})
        try:
            await asyncio.to_thread(first.start)
            target = [first.grpc_target]
            stop = asyncio.Event()
            streams: dict[str, list[int]] = {c: [] for c in ("c0", "c5")}
            followers = [asyncio.create_task(follow(target, c, seen, stop)) for c, seen in streams.items()]
            driver = Driver()
            load = asyncio.create_task(driver.run(first))
            await asyncio.wait_for(driver.enough.wait(), 60)
            first.kill()  # mid-flight: requests, bot calls and webhook POSTs are all in progress
            await load
            acked = set(driver.acked)
            assert len(acked) >= KILL_AFTER

            await asyncio.to_thread(second.start)
            # Everything acknowledged must now reach the receiver.
            await eventually(
                lambda: acked <= {b["payload"]["text"] for b in receiver.delivered()},
                60,
                "acked replies delivered",
            )

            await wait_idle(second)
            logs = await read_logs(tmp_path / "sidecar.db")
            wanted = {r.bot_message_id for log in logs.values() for r in log}
            await eventually(
                lambda: wanted <= {b["botpressMessageId"] for b in receiver.delivered()}, 60, "outbox drained"
            )
            await eventually(
                lambda: all(len(seen) >= len(logs[c]) for c, seen in streams.items()), 30, "streams caught up"
            )
            stop.set()
            for task in followers:
                task.cancel()
        finally:
            first.close()
            second.close()

    by_webhook_id: dict[str, dict] = {}  # type: ignore[type-arg]
    for body in receiver.delivered():
        by_webhook_id.setdefault(body["botpressMessageId"], body)
    for conversation, log in logs.items():
        sequences = [r.sequence for r in log]
        assert sequences == list(range(1, len(sequences) + 1)), f"gap in {conversation}"
        texts = [r.payload["text"] for r in log]
        assert len(texts) == len(set(texts)), f"the bot's reply was appended twice in {conversation}"
        # First deliveries follow sequence order.
        first_seen: list[str] = []
        for body in receiver.delivered(conversation):
            if body["botpressMessageId"] not in first_seen:
                first_seen.append(body["botpressMessageId"])
        assert first_seen == [r.bot_message_id for r in log], f"out of order in {conversation}"
    produced = [r.payload["text"] for log in logs.values() for r in log]
    assert acked <= set(produced)
    assert len(by_webhook_id) == len(produced)
    for conversation, seen in streams.items():
        assert seen == list(range(1, len(logs[conversation]) + 1)), f"stream {conversation} repeated or lost"
    # The figures, for `pytest -s` (how much the kill actually interrupted).
    print(f"\ncrash: {len(acked)} acknowledged before kill -9, {len(produced)} replies produced once each, "
          f"{len(receiver.delivered())} POSTs for {len(by_webhook_id)} webhook-ids")  # fmt: skip


async def wait_idle(p: SidecarProcess) -> None:
    """Until the restarted sidecar has handed every pending message to the bot."""
    async with aiohttp.ClientSession() as session:

        async def idle() -> bool:
            async with session.get(f"http://127.0.0.1:{p.admin_port}/readyz") as resp:
                return resp.status == 200 and (await resp.json())["details"]["pending_messages"] == 0

        await eventually(idle, 60, "an idle sidecar")


async def read_logs(path: Path) -> dict[str, list[Reply]]:
    """Every conversation's reply log, read through the store itself (WAL allows a second reader)."""
    store = SqliteStore(str(path), exclusive=False)  # beside the running sidecar
    await store.open()
    try:
        return {f"c{i}": await store.replies_after(f"c{i}", 0, 100_000) for i in range(CONVERSATIONS)}
    finally:
        await store.close()
