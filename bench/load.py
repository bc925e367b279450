"""Load generators, run in a process of their own: `python -m bench.load FIGURE '<json args>'` prints JSON."""

from __future__ import annotations

import asyncio
import itertools
import json
import random
import resource
import sys
import time
import uuid
from collections.abc import Callable, Coroutine
from typing import Any

import aiohttp
import grpc
import orjson
import uvloop

from sidecar.v1 import sidecar_pb2, sidecar_pb2_grpc


def _channels(target: str, streams: int) -> list[grpc.aio.Channel]:
    """Enough channels for ``streams`` concurrent streams at the server's 1000 per connection.

    Each with its own subchannel pool: grpc otherwise shares one connection
    between channels to the same target, and streams past the limit wait forever.
    """
    return [
        grpc.aio.insecure_channel(target, options=[("grpc.use_local_subchannel_pool", 1)])
        for _ in range((streams + 999) // 1000)
    ]


def _request(conversation: str, text: str) -> sidecar_pb2.SendMessageRequest:
    return sidecar_pb2.SendMessageRequest(
        user_id="bench-user", message_id=str(uuid.uuid4()), conversation_id=conversation, type="text", text=text
    )


def _body(conversation: str, text: str) -> bytes:
    return orjson.dumps({"userId": "bench-user", "messageId": str(uuid.uuid4()), "conversationId": conversation,
                         "type": "text", "text": text, "payload": {"text": text}})  # fmt: skip


def _unary(channel: grpc.aio.Channel, bare: bool) -> Any:
    if bare:
        return channel.unary_unary(
            "/bench.Bare/Echo",
            request_serializer=sidecar_pb2.SendMessageRequest.SerializeToString,
            response_deserializer=sidecar_pb2.SendMessageResponse.FromString,
        )
    return sidecar_pb2_grpc.MessagingServiceStub(channel).SendMessage


async def grpc_ingest(target: str, bare: bool, duration: float, concurrency: int, conversations: int) -> dict[str, Any]:
    """Closed loop: ``concurrency`` callers over 4 channels, unique message ids, for ``duration`` seconds."""
    channels = [grpc.aio.insecure_channel(target) for _ in range(4)]
    calls = [_unary(c, bare) for c in channels]
    counter = itertools.count()
    done = 0
    errors = 0
    deadline = time.monotonic() + duration

    async def worker(i: int) -> None:
        nonlocal done, errors
        call = calls[i % len(calls)]
        while time.monotonic() < deadline:
            n = next(counter)
            try:
                await call(_request(f"g{n % conversations}", f"g{n % conversations}/{n}"))
                done += 1
            except grpc.aio.AioRpcError:
                errors += 1

    started = time.monotonic()
    await asyncio.gather(*(worker(i) for i in range(concurrency)))
    elapsed = time.monotonic() - started
    for c in channels:
        await c.close()
    return {"rate": done / elapsed, "count": done, "errors": errors}


async def http_ingest(url: str, duration: float, concurrency: int, conversations: int) -> dict[str, Any]:
    counter = itertools.count()
    done = 0
    errors = 0
    deadline = time.monotonic() + duration
    headers = {"Content-Type": "application/json"}
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=concurrency)) as session:

        async def worker() -> None:
            nonlocal done, errors
            while time.monotonic() < deadline:
                n = next(counter)
                async with session.post(url, data=_body(f"h{n % conversations}", f"h/{n}"), headers=headers) as r:
                    await r.read()
                    if r.status == 200:
                        done += 1
                    else:
                        errors += 1

        started = time.monotonic()
        await asyncio.gather(*(worker() for _ in range(concurrency)))
        elapsed = time.monotonic() - started
    return {"rate": done / elapsed, "count": done, "errors": errors}


def _percentiles(samples: list[float]) -> dict[str, float]:
    if not samples:
        return {"p50_ms": float("nan"), "p99_ms": float("nan"), "max_ms": float("nan"), "n": 0}
    ordered = sorted(samples)

    def at(q: float) -> float:
        return ordered[min(len(ordered) - 1, int(q * len(ordered)))] * 1000

    return {"p50_ms": at(0.50), "p99_ms": at(0.99), "max_ms": ordered[-1] * 1000, "n": len(ordered)}


async def latency(target: str, bare: bool, rate: float, duration: float, conversations: int) -> dict[str, Any]:
    """Open loop at ``rate``: bare = unary round trip; sidecar = SendMessage until its Reply arrives on Subscribe."""
    channel = grpc.aio.insecure_channel(target)
    call = _unary(channel, bare)
    sent: dict[str, float] = {}
    samples: list[float] = []
    readers: list[asyncio.Task[None]] = []
    subscribed = asyncio.Event()
    ready = 0
    if not bare:
        stub = sidecar_pb2_grpc.MessagingServiceStub(channel)

        async def read(conversation: str) -> None:
            nonlocal ready
            stream = stub.Subscribe(sidecar_pb2.SubscribeRequest(conversation_id=conversation))
            await stream.wait_for_connection()
            ready += 1
            if ready == conversations:
                subscribed.set()
            async for reply in stream:
                t0 = sent.pop(reply.in_reply_to, None)
                if t0 is not None:
                    samples.append(time.monotonic() - t0)

        readers = [asyncio.create_task(read(f"l{i}")) for i in range(conversations)]
        await asyncio.wait_for(subscribed.wait(), 30)
        await asyncio.sleep(0.5)  # let every Subscribe reach the broker before the first send
    pending: set[asyncio.Task[None]] = set()

    async def one(n: int) -> None:
        request = _request(f"l{n % conversations}", f"l/{n}")
        t0 = time.monotonic()
        if not bare:
            sent[request.message_id] = t0
        await call(request)
        if bare:
            samples.append(time.monotonic() - t0)

    interval = 1.0 / rate
    start = time.monotonic()
    n = 0
    while (now := time.monotonic()) - start < duration:
        due = start + n * interval
        if now < due:
            await asyncio.sleep(due - now)
        task = asyncio.create_task(one(n))
        pending.add(task)
        task.add_done_callback(pending.discard)
        n += 1
    await asyncio.gather(*pending, return_exceptions=True)
    if not bare:
        deadline = time.monotonic() + 10
        while sent and time.monotonic() < deadline:  # noqa: ASYNC110 - a bounded drain of stragglers
            await asyncio.sleep(0.05)
        for task in readers:
            task.cancel()
    await channel.close()
    return {**_percentiles(samples), "rate": rate, "sent": n, "missing": len(sent)}


async def counted_ingest(
    protocol: str, address: str, count: int, concurrency: int, conversations: int, bare: bool = False
) -> dict[str, Any]:
    """The ingest phases' closed loop, for ``count`` messages instead of a duration, with
    message ids from a seeded generator: two runs send the same requests (bench.instructions)."""
    ids = random.Random(1)
    requests: list[Any] = []
    for n in range(count):
        conversation, text = f"g{n % conversations}", f"g{n % conversations}/{n}"
        message_id = str(uuid.UUID(int=ids.getrandbits(128), version=4))
        if protocol == "grpc":
            requests.append(sidecar_pb2.SendMessageRequest(
                user_id="bench-user", message_id=message_id, conversation_id=conversation, type="text", text=text
            ))  # fmt: skip
        else:
            requests.append(orjson.dumps({"userId": "bench-user", "messageId": message_id,
                                          "conversationId": conversation, "type": "text", "text": text,
                                          "payload": {"text": text}}))  # fmt: skip
    pending = iter(requests)
    errors = 0
    if protocol == "grpc":
        channels = [grpc.aio.insecure_channel(address) for _ in range(4)]
        calls = [_unary(c, bare) for c in channels]

        async def grpc_worker(i: int) -> None:
            nonlocal errors
            for request in pending:
                try:
                    await calls[i % len(calls)](request)
                except grpc.aio.AioRpcError:
                    errors += 1

        await asyncio.gather(*(grpc_worker(i) for i in range(concurrency)))
        for c in channels:
            await c.close()
        return {"count": count, "errors": errors}
    headers = {"Content-Type": "application/json"}
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=concurrency)) as session:

        async def http_worker() -> None:
            nonlocal errors
            for body in pending:
                async with session.post(address, data=body, headers=headers) as r:
                    await r.read()
                    errors += r.status != 200

        await asyncio.gather(*(http_worker() for _ in range(concurrency)))
    return {"count": count, "errors": errors}


async def send_batch(target: str, count: int, conversations: int, concurrency: int) -> dict[str, Any]:
    """Send ``count`` messages, ``conversations`` round robin, in order within each conversation."""
    channel = grpc.aio.insecure_channel(target)
    call = _unary(channel, False)

    async def conversation(c: int) -> None:
        for n in range(c, count, conversations):
            await call(_request(f"w{c}", f"w{c}/{n}"))

    started = time.monotonic()
    sem = asyncio.Semaphore(concurrency)

    async def guarded(c: int) -> None:
        async with sem:
            await conversation(c)

    await asyncio.gather(*(guarded(c) for c in range(conversations)))
    await channel.close()
    return {"seconds": time.monotonic() - started}


async def webhook_client(url: str, count: int, conversations: int) -> dict[str, Any]:
    """The baseline: one loop per conversation POSTing the six-field bodies in order, all loops at once."""
    headers = {"Content-Type": "application/json"}
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=conversations)) as session:

        async def conversation(c: int) -> None:
            for n in range(c, count, conversations):
                body = {"type": "text", "payload": {"text": f"w{c}/{n}"}, "conversationId": f"w{c}",
                        "botpressUserId": "u", "botpressMessageId": f"b{n}", "botpressConversationId": "c"}  # fmt: skip
                async with session.post(url, data=orjson.dumps(body), headers=headers) as r:
                    await r.read()

        started = time.monotonic()
        await asyncio.gather(*(conversation(c) for c in range(conversations)))
    return {"seconds": time.monotonic() - started}


async def streams(target: str, bare: bool, count: int, hold: float) -> dict[str, Any]:
    """Open ``count`` idle streams over channels of ≤1000 streams, hold them ``hold`` seconds, close."""
    channels = _channels(target, count)
    calls = []
    for i in range(count):
        channel = channels[i // 1000]
        if bare:
            method = channel.unary_stream(
                "/bench.Bare/Stream",
                request_serializer=sidecar_pb2.SubscribeRequest.SerializeToString,
                response_deserializer=sidecar_pb2.Reply.FromString,
            )
        else:
            method = sidecar_pb2_grpc.MessagingServiceStub(channel).Subscribe
        calls.append(method(sidecar_pb2.SubscribeRequest(conversation_id=f"idle{i}")))
    await asyncio.gather(*(c.wait_for_connection() for c in calls))
    print(json.dumps({"opened": count}), flush=True)  # the orchestrator measures RSS now
    await asyncio.sleep(hold)
    for c in calls:
        c.cancel()
    for ch in channels:
        await ch.close()
    return {"opened": count}


async def fanout(target: str, subscribers: int, messages: int) -> dict[str, Any]:
    """``subscribers`` streams on one conversation; per message, the delay until each subscriber has the reply."""
    channels = _channels(target, subscribers)
    samples: list[float] = []
    sent_at: dict[str, float] = {}
    got = [0] * messages
    all_in = [asyncio.Event() for _ in range(messages)]
    index: dict[str, int] = {}

    async def read(i: int) -> None:
        stub = sidecar_pb2_grpc.MessagingServiceStub(channels[i // 1000])
        stream = stub.Subscribe(sidecar_pb2.SubscribeRequest(conversation_id="fan"))
        async for reply in stream:
            t0 = sent_at.get(reply.in_reply_to)
            if t0 is not None:
                samples.append(time.monotonic() - t0)
                k = index[reply.in_reply_to]
                got[k] += 1
                if got[k] == subscribers:
                    all_in[k].set()

    readers = [asyncio.create_task(read(i)) for i in range(subscribers)]
    await asyncio.sleep(2.0 + subscribers / 1000)  # every Subscribe reaches the broker
    # Its own connection: the subscribers' ones are full (1000 streams each),
    # and a call waiting for a free stream would wait forever.
    (sender,) = _channels(target, 1)
    channels.append(sender)
    send = sidecar_pb2_grpc.MessagingServiceStub(sender).SendMessage
    last_fanout = 0.0
    for k in range(messages):
        request = _request("fan", f"fan/{k}")
        index[request.message_id] = k
        sent_at[request.message_id] = time.monotonic()
        await send(request, timeout=30)
        await asyncio.wait_for(all_in[k].wait(), 30)
        last_fanout = time.monotonic() - sent_at[request.message_id]
    for task in readers:
        task.cancel()
    for ch in channels:
        await ch.close()
    return {**_percentiles(samples), "subscribers": subscribers, "last_ms": last_fanout * 1000}


FIGURES: dict[str, Callable[..., Coroutine[Any, Any, dict[str, Any]]]] = {
    "grpc_ingest": grpc_ingest,
    "http_ingest": http_ingest,
    "latency": latency,
    "send_batch": send_batch,
    "counted_ingest": counted_ingest,
    "webhook_client": webhook_client,
    "streams": streams,
    "fanout": fanout,
}


def main() -> None:
    _, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    figure, args = sys.argv[1], json.loads(sys.argv[2])
    result: dict[str, Any] = uvloop.run(FIGURES[figure](**args))
    print(json.dumps(result), flush=True)


if __name__ == "__main__":
    main()
