"""The SPEC §4 status codes, health and reflection, through a real gRPC socket."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import grpc
import pytest
from google.protobuf import descriptor_pb2, json_format, struct_pb2
from google.rpc import error_details_pb2
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2
from grpc_status import rpc_status

from sidecar.ingress import grpc as grpc_ingress
from sidecar.v1 import sidecar_pb2
from tests.conftest import StartApp, eventually


def request(conversation: str = "c1", message_id: str = "m1", text: str = "hello", **kw: Any) -> Any:
    payload = kw.pop("payload", {"text": text})
    value = json_format.ParseDict(payload, struct_pb2.Value())
    fields = {"user_id": "u1", "message_id": message_id, "conversation_id": conversation, "type": "text", "text": text}
    fields.update(kw)
    return sidecar_pb2.SendMessageRequest(payload=value, **fields)


def bad_request_fields(error: grpc.aio.AioRpcError) -> list[str]:
    status = rpc_status.from_call(error)
    assert status is not None
    fields = []
    for detail in status.details:
        if detail.Is(error_details_pb2.BadRequest.DESCRIPTOR):
            bad = error_details_pb2.BadRequest()
            detail.Unpack(bad)
            fields += [v.field for v in bad.field_violations]
    return fields


async def test_send_message_answers_ids_and_duplicate_flag(start_app: StartApp) -> None:
    s = await start_app()
    first = await s.stub.SendMessage(request())
    assert (first.message_id, first.conversation_id, first.duplicate) == ("m1", "c1", False)
    again = await s.stub.SendMessage(request())
    assert again.duplicate is True


async def test_invalid_fields_are_invalid_argument_with_bad_request_details(start_app: StartApp) -> None:
    s = await start_app()
    with pytest.raises(grpc.aio.AioRpcError) as e:
        await s.stub.SendMessage(request(user_id="", message_id="x" * 300))
    assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert sorted(bad_request_fields(e.value)) == ["message_id", "user_id"]


async def test_missing_token_is_unauthenticated(start_app: StartApp) -> None:
    s = await start_app(auth_tokens=("secret",))
    with pytest.raises(grpc.aio.AioRpcError) as e:
        await s.stub.SendMessage(request())
    assert e.value.code() == grpc.StatusCode.UNAUTHENTICATED
    with pytest.raises(grpc.aio.AioRpcError) as e:
        await s.stub.SendMessage(request(), metadata=(("authorization", "Bearer wrong"),))
    assert e.value.code() == grpc.StatusCode.UNAUTHENTICATED
    ok = await s.stub.SendMessage(request(), metadata=(("authorization", "Bearer secret"),))
    assert ok.duplicate is False


async def test_reused_message_id_with_other_content_is_already_exists(start_app: StartApp) -> None:
    s = await start_app()
    await s.stub.SendMessage(request(text="one"))
    with pytest.raises(grpc.aio.AioRpcError) as e:
        await s.stub.SendMessage(request(text="two"))
    assert e.value.code() == grpc.StatusCode.ALREADY_EXISTS


async def test_overload_is_resource_exhausted(start_app: StartApp, tmp_path: Path) -> None:
    rules = tmp_path / "slow.yaml"
    rules.write_text("rules:\n  - match: {}\n    replies: [{type: text, payload: {text: slow}, delay: 20}]\n")
    s = await start_app(bot="script", bot_script=str(rules), max_pending_messages=1)
    await s.stub.SendMessage(request(message_id="m1"))
    with pytest.raises(grpc.aio.AioRpcError) as e:
        await s.stub.SendMessage(request(message_id="m2"))
    assert e.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED


async def test_cursor_older_than_retention_is_out_of_range(start_app: StartApp) -> None:
    s = await start_app(reply_retention=2)
    for i in range(5):
        await s.stub.SendMessage(request(message_id=f"m{i}"))
    await wait_for_sequence(s, "c1", 5)
    call = s.stub.Subscribe(sidecar_pb2.SubscribeRequest(conversation_id="c1", after_sequence=0))
    with pytest.raises(grpc.aio.AioRpcError) as e:
        await call.read()
    assert e.value.code() == grpc.StatusCode.OUT_OF_RANGE
    # The oldest retained cursor still works.
    call = s.stub.Subscribe(sidecar_pb2.SubscribeRequest(conversation_id="c1", after_sequence=3))
    assert (await call.read()).sequence == 4
    call.cancel()


async def test_draining_is_unavailable_for_send_and_ends_open_streams(start_app: StartApp) -> None:
    s = await start_app()
    call = s.stub.Subscribe(sidecar_pb2.SubscribeRequest(conversation_id="c1"))
    await wait_until(lambda: s.app.core.broker and len(s.app.core.broker) == 1)
    await s.app.core.drain(0)
    with pytest.raises(grpc.aio.AioRpcError) as e:
        await call.read()
    assert e.value.code() == grpc.StatusCode.UNAVAILABLE
    with pytest.raises(grpc.aio.AioRpcError) as e:
        await s.stub.SendMessage(request())
    assert e.value.code() == grpc.StatusCode.UNAVAILABLE


async def test_subscribe_without_conversation_is_invalid_argument(start_app: StartApp) -> None:
    s = await start_app()
    call = s.stub.Subscribe(sidecar_pb2.SubscribeRequest(conversation_id=""))
    with pytest.raises(grpc.aio.AioRpcError) as e:
        await call.read()
    assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert bad_request_fields(e.value) == ["conversation_id"]


async def test_tokenless_watch_and_reflection_streams_are_bounded_together(
    start_app: StartApp, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Health Watch and reflection need no token: without a bound of their own anyone
    reaching the port could hold ~1,000 per connection (12,000 on 12 took 185 MB)."""
    monkeypatch.setattr(grpc_ingress, "MAX_OPEN_TOKENLESS_STREAMS", 3)
    s = await start_app(auth_tokens=("secret",))
    health = health_pb2_grpc.HealthStub(s.channel)
    watches = [health.Watch(health_pb2.HealthCheckRequest()) for _ in range(2)]
    for watch in watches:
        assert (await watch.read()).status == health_pb2.HealthCheckResponse.SERVING
    reflect = s.channel.stream_stream(
        "/grpc.reflection.v1.ServerReflection/ServerReflectionInfo",
        request_serializer=reflection_pb2.ServerReflectionRequest.SerializeToString,
        response_deserializer=reflection_pb2.ServerReflectionResponse.FromString,
    )()
    await reflect.write(reflection_pb2.ServerReflectionRequest(list_services=""))
    assert (await reflect.read()).list_services_response.service  # the third: open
    refused = health.Watch(health_pb2.HealthCheckRequest())
    with pytest.raises(grpc.aio.AioRpcError) as e:
        await refused.read()
    assert e.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    # Probes use Check, which is not a stream: still answered.
    assert (await health.Check(health_pb2.HealthCheckRequest())).status == health_pb2.HealthCheckResponse.SERVING
    watches[0].cancel()
    await reflect.done_writing()
    await eventually(lambda: reflect.done(), what="the reflection stream ended")

    async def another_opens() -> bool:
        watch = health.Watch(health_pb2.HealthCheckRequest())
        try:
            return bool((await watch.read()).status == health_pb2.HealthCheckResponse.SERVING)
        except grpc.aio.AioRpcError:
            return False

    await eventually(another_opens, what="room again once streams ended")


async def test_health_and_reflection_are_served(start_app: StartApp) -> None:
    s = await start_app()
    health = health_pb2_grpc.HealthStub(s.channel)
    for service in ("", "sidecar.v1.MessagingService"):
        answer = await health.Check(health_pb2.HealthCheckRequest(service=service))
        assert answer.status == health_pb2.HealthCheckResponse.SERVING
    for service in ("grpc.reflection.v1alpha.ServerReflection", "grpc.reflection.v1.ServerReflection"):
        # v1's messages are v1alpha's under another package: the same bytes on the wire.
        call = s.channel.stream_stream(
            f"/{service}/ServerReflectionInfo",
            request_serializer=reflection_pb2.ServerReflectionRequest.SerializeToString,
            response_deserializer=reflection_pb2.ServerReflectionResponse.FromString,
        )()
        await call.write(reflection_pb2.ServerReflectionRequest(list_services=""))
        answer = await call.read()
        names = {svc.name for svc in answer.list_services_response.service}
        assert {"sidecar.v1.MessagingService", "grpc.health.v1.Health", service} <= names
        for name in names:  # every service listed can be described (grpcurl describe asks for each)
            await call.write(reflection_pb2.ServerReflectionRequest(file_containing_symbol=name))
            answer = await call.read()
            assert answer.file_descriptor_response.file_descriptor_proto, (name, answer.error_response)
            described = descriptor_pb2.FileDescriptorProto.FromString(
                answer.file_descriptor_response.file_descriptor_proto[0]
            )
            assert name.rpartition(".")[2] in {svc.name for svc in described.service}
            assert name.startswith(described.package + ".")
        await call.done_writing()


def _deep_payload(levels: int) -> bytes:
    """A SendMessageRequest whose payload nests ``levels`` objects: past protobuf's own
    decoding depth (each JSON level is three message levels in google.protobuf.Value)."""
    req = request()
    value = req.payload
    for _ in range(levels):
        value = value.struct_value.fields["a"]
    value.string_value = "deep"
    return bytes(req.SerializeToString())


@pytest.mark.parametrize(
    "raw",
    [
        b"\x0a\x02\xff\xfe" + bytes(request(user_id="").SerializeToString()),  # user_id: not UTF-8
        _deep_payload(40),
    ],
    ids=["bad-utf8", "too-deep"],
)
async def test_a_request_protobuf_cannot_decode_is_invalid_argument_after_the_token_check(
    start_app: StartApp, raw: bytes
) -> None:
    s = await start_app(auth_tokens=("t",))
    send = s.channel.unary_unary(
        "/sidecar.v1.MessagingService/SendMessage",
        request_serializer=lambda b: b,
        response_deserializer=sidecar_pb2.SendMessageResponse.FromString,
    )
    with pytest.raises(grpc.aio.AioRpcError) as e:
        await send(raw, metadata=(("authorization", "Bearer wrong"),))
    assert e.value.code() == grpc.StatusCode.UNAUTHENTICATED
    with pytest.raises(grpc.aio.AioRpcError) as e:
        await send(raw, metadata=(("authorization", "Bearer t"),))
    assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert bad_request_fields(e.value) == ["request"]
    assert "Error parsing" not in (e.value.details() or "")


# --- helpers -----------------------------------------------------------------


async def wait_until(predicate: Any, timeout: float = 5.0) -> None:
    """Poll a condition with a deadline (for state with no event to wait on)."""
    deadline = asyncio.get_running_loop().time() + timeout
    while not predicate():
        if asyncio.get_running_loop().time() > deadline:
            raise AssertionError("condition not met in time")
        await asyncio.sleep(0.01)


async def wait_for_sequence(s: Any, conversation: str, sequence: int) -> None:
    async def last() -> int:
        return int(await s.app.store.last_sequence(conversation))

    deadline = asyncio.get_running_loop().time() + 10
    while await last() < sequence:
        if asyncio.get_running_loop().time() > deadline:
            raise AssertionError(f"sequence {sequence} not reached")
        await asyncio.sleep(0.01)


async def test_connections_past_the_cap_are_refused_until_one_closes(start_app: StartApp) -> None:
    s = await start_app(grpc_max_connections=2)
    target = f"127.0.0.1:{s.app.grpc_port}"

    def connect() -> grpc.aio.Channel:
        # A channel of its own, not one sharing the process-wide subchannel (connection).
        return grpc.aio.insecure_channel(target, options=[("grpc.use_local_subchannel_pool", 1)])

    held = [connect() for _ in range(2)]
    for channel in held:
        assert (await health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest())).status == 1
    extra = connect()
    with pytest.raises(grpc.aio.AioRpcError) as refused:
        await health_pb2_grpc.HealthStub(extra).Check(health_pb2.HealthCheckRequest(), timeout=5)
    assert refused.value.code() == grpc.StatusCode.UNAVAILABLE
    await extra.close()
    await held.pop().close()

    async def admitted() -> bool:
        channel = connect()
        try:
            await health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=5)
            held.append(channel)
            return True
        except grpc.aio.AioRpcError:
            await channel.close()
            return False

    await eventually(admitted, what="a connection admitted once another closed")
    for channel in held:
        await channel.close()
