"""Bare servers the sidecar is compared with, and the webhook receiver: run as their own processes.

python -m bench.baselines servers GRPC_PORT HTTP_PORT   # bare grpc.aio unary + stream, bare aiohttp POST
python -m bench.baselines receiver PORT                 # counts webhook POSTs; GET /stats reports them
"""

from __future__ import annotations

import asyncio
import sys
import time

import grpc
import orjson
import uvloop
from aiohttp import web

from sidecar.v1 import sidecar_pb2

# The same messages as the sidecar's RPCs, so (de)serialization costs match.
UNARY = "/bench.Bare/Echo"
STREAM = "/bench.Bare/Stream"


async def _echo(request: sidecar_pb2.SendMessageRequest, context: object) -> sidecar_pb2.SendMessageResponse:
    return sidecar_pb2.SendMessageResponse(message_id=request.message_id, conversation_id=request.conversation_id)


async def _stream(request: sidecar_pb2.SubscribeRequest, context: grpc.aio.ServicerContext):  # type: ignore[no-untyped-def]
    await context.send_initial_metadata(())  # as the sidecar does: the client sees the stream open
    await asyncio.Event().wait()  # idle, like a Subscribe with no replies
    yield sidecar_pb2.Reply()


async def _http(request: web.Request) -> web.Response:
    body = orjson.loads(await request.read())
    answer = {"messageId": body.get("messageId"), "conversationId": body.get("conversationId"), "duplicate": False}
    return web.Response(body=orjson.dumps(answer), content_type="application/json")


async def servers(grpc_port: int, http_port: int) -> None:
    # Same server options as the sidecar: 1000 streams per connection, and room
    # for a burst of 10,000 calls waiting to be picked up (grpc's default cancels past 1000).
    server = grpc.aio.server(
        options=[
            ("grpc.max_concurrent_streams", 1000),
            ("grpc.server.max_pending_requests", 20000),
            ("grpc.server.max_pending_requests_hard_limit", 40000),
        ]
    )
    handlers = {
        "Echo": grpc.unary_unary_rpc_method_handler(
            _echo,
            request_deserializer=sidecar_pb2.SendMessageRequest.FromString,
            response_serializer=sidecar_pb2.SendMessageResponse.SerializeToString,
        ),
        "Stream": grpc.unary_stream_rpc_method_handler(
            _stream,
            request_deserializer=sidecar_pb2.SubscribeRequest.FromString,
            response_serializer=sidecar_pb2.Reply.SerializeToString,
        ),
    }
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler("bench.Bare", handlers),))
    server.add_insecure_port(f"127.0.0.1:{grpc_port}")
    await server.start()
    app = web.Application()
    app.router.add_post("/webhook", _http)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", http_port).start()
    print("ready", flush=True)
    await server.wait_for_termination()


async def receiver(port: int) -> None:
    """Answers 200 to every POST and records arrival times per conversation (order checked by the bench)."""
    arrivals: list[float] = []
    order_ok = True
    last: dict[str, str] = {}
    seen: set[str] = set()

    async def post(request: web.Request) -> web.Response:
        nonlocal order_ok
        body = orjson.loads(await request.read())
        key = body.get("botpressMessageId", "")
        if key not in seen:
            seen.add(key)
            arrivals.append(time.monotonic())
            # Bodies carry their position as payload.text "<conversation>/<n>": it must grow per conversation.
            text = body.get("payload", {}).get("text", "")
            conversation, _, n = text.rpartition("/")
            if conversation in last and int(last[conversation]) >= int(n or 0):
                order_ok = False
            last[conversation] = n
        return web.Response()

    async def stats(request: web.Request) -> web.Response:
        span = arrivals[-1] - arrivals[0] if len(arrivals) > 1 else 0.0
        return web.json_response({"count": len(arrivals), "span": span, "order_ok": order_ok})

    async def reset(request: web.Request) -> web.Response:
        nonlocal order_ok
        arrivals.clear()
        last.clear()
        seen.clear()
        order_ok = True
        return web.Response()

    app = web.Application()
    app.router.add_post("/replies", post)
    app.router.add_get("/stats", stats)
    app.router.add_post("/reset", reset)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", port).start()
    print("ready", flush=True)
    await asyncio.Event().wait()


if __name__ == "__main__":
    kind = sys.argv[1]
    if kind == "servers":
        uvloop.run(servers(int(sys.argv[2]), int(sys.argv[3])))
    else:
        uvloop.run(receiver(int(sys.argv[2])))
