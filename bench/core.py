"""`python -m bench.core`: the core's CPU per message, with no protocol in front of it.

Accepts messages straight into the core (64 at a time, over 256 conversations),
lets the echo bot answer each, and prints the process's CPU per message and
each busy thread's share. One process, no sockets and no load generator on
the other core: between runs it moves by about 2 % (memory store) to 5 %
(SQLite) where the socket benchmark's rates move by 10-30 %, so it is the
figure to read when changing the core,
the lanes or a store. It is not a target: `make bench` is.
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import os
import random
import tempfile
import time
import uuid
from dataclasses import replace
from pathlib import Path

import uvloop

from bench.__main__ import add_store_arguments, forget_redis_keys, store_url
from sidecar.bots import create_bot
from sidecar.config import Config
from sidecar.core import Core
from sidecar.models import InboundMessage
from sidecar.observability import Metrics
from sidecar.store import create_store
from sidecar.validate import message_from_fields

CONCURRENCY = 64
CONVERSATIONS = 256


def messages(count: int, ids: random.Random) -> list[InboundMessage]:
    """Messages with random ids (as clients send them, spread over the id index) drawn
    from a seeded generator: runs of the same code repeat the same work, which the
    instruction count (bench.instructions) relies on."""
    out = []
    for i in range(count):
        text = f"hello {i}"
        message_id = str(uuid.UUID(int=ids.getrandbits(128), version=4))
        fields = {"userId": "bench-user", "messageId": message_id, "conversationId": f"c{i % CONVERSATIONS}",
                  "type": "text", "text": text, "payload": {"text": text}}  # fmt: skip
        out.append(message_from_fields(fields, max_id_length=256, max_payload_depth=32))
    return out


def thread_ticks() -> dict[str, int]:
    """CPU clock ticks (user + system) per thread, by the thread's name and id."""
    ticks = {}
    for tid in os.listdir("/proc/self/task"):
        name = Path(f"/proc/self/task/{tid}/comm").read_text().strip()
        fields = Path(f"/proc/self/task/{tid}/stat").read_text().rsplit(")", 1)[1].split()
        ticks["main thread" if int(tid) == os.getpid() else f"{name} thread {tid}"] = int(fields[11]) + int(fields[12])
    return ticks


async def run(core: Core, batch: list[InboundMessage]) -> None:
    gate = asyncio.Semaphore(CONCURRENCY)

    async def send(message: InboundMessage) -> None:
        async with gate:
            await core.send(message)

    await asyncio.gather(*(send(m) for m in batch))
    while core.pending:  # noqa: ASYNC110 - the lanes still running the bot; the core has no event for it
        await asyncio.sleep(0.001)


async def measure(config: Config, count: int) -> None:
    metrics = Metrics()
    store = create_store(config)
    bot = create_bot(config, metrics)
    core = Core(config, store, bot, metrics, None)
    await store.open()
    await bot.start()
    await core.start()
    gc.freeze()  # as the sidecar does once started (sidecar/app.py): full collections skip start-up's objects
    try:
        ids = random.Random(1)
        warm, timed = messages(2000, ids), messages(count, ids)
        await run(core, warm)
        before, cpu, wall = thread_ticks(), time.process_time(), time.perf_counter()
        await run(core, timed)
        cpu, wall, after = time.process_time() - cpu, time.perf_counter() - wall, thread_ticks()
    finally:
        await core.drain(1.0)
        await bot.close()
        await store.close()
    hz = os.sysconf("SC_CLK_TCK")
    kind = config.store.split("://")[0] + (f" {config.store_sync}" if config.store.startswith("sqlite") else "")
    print(f"{kind}: {count} messages, "
          f"{1e6 * cpu / count:.1f} µs CPU per message, {count / wall:,.0f} messages/s")  # fmt: skip
    for thread, ticks in sorted(after.items(), key=lambda kv: -(kv[1] - before.get(kv[0], 0))):
        used = ticks - before.get(thread, 0)
        if used:
            print(f"  {thread:<24} {1e6 * used / hz / count:6.1f} µs per message")


def main() -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.core", description=__doc__)
    add_store_arguments(parser)
    parser.add_argument("--count", type=int, default=20_000, help="messages timed (after 2,000 of warm-up)")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="sidecar-bench-core-") as tmp:
        store = store_url(args.store, Path(tmp), "core")
        config = replace(Config(), store=store, store_sync=args.sync, max_pending_messages=1_000_000)
        try:
            uvloop.run(measure(config, args.count))
        finally:
            if store.startswith("redis://"):
                forget_redis_keys(store)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
