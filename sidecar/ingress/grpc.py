"""gRPC front door: MessagingService over the core, plus health and reflection."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import AsyncIterator
from typing import Any, NoReturn

import grpc
from google.protobuf import any_pb2, descriptor_pb2, descriptor_pool, duration_pb2
from google.protobuf.message import DecodeError, Message
from google.rpc import error_details_pb2, status_pb2
from grpc._cython.cygrpc import ExecuteBatchError  # what a write to a call that ended raises
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection, reflection_pb2, reflection_pb2_grpc
from grpc_status import rpc_status

from sidecar.auth import TokenChecker
from sidecar.config import Config
from sidecar.convert import CURSOR_METADATA, reply_to_proto, send_request_to_fields
from sidecar.core import Core
from sidecar.errors import FieldViolation, Internal, InvalidArgument, SidecarError, Unauthenticated
from sidecar.models import InboundMessage, Reply
from sidecar.observability import INGRESS_OUTCOMES, Metrics, ingress_metrics, outcome_of
from sidecar.v1 import sidecar_pb2, sidecar_pb2_grpc
from sidecar.validate import PROTO_NAMES, message_from_fields

log = logging.getLogger(__name__)

# How long a cut-off subscriber has to read what is in flight before its stream is reset.
ABORT_GRACE = 10.0

SERVICE_NAME = sidecar_pb2.DESCRIPTOR.services_by_name["MessagingService"].full_name


def to_status(error: SidecarError) -> grpc.Status:
    """The gRPC form of a core error, with BadRequest / RetryInfo details as google.rpc expects."""
    details = []
    if error.details:
        bad = error_details_pb2.BadRequest(
            field_violations=[
                error_details_pb2.BadRequest.FieldViolation(field=d.field, description=d.reason) for d in error.details
            ]
        )
        details.append(_pack(bad))
    if error.retry_after is not None:
        info = error_details_pb2.RetryInfo(retry_delay=duration_pb2.Duration(seconds=max(1, round(error.retry_after))))
        details.append(_pack(info))
    status = status_pb2.Status(code=error.grpc_status.value[0], message=error.message, details=details)
    return rpc_status.to_status(status)


def _pack(message: Any) -> any_pb2.Any:
    packed = any_pb2.Any()
    packed.Pack(message)
    return packed


async def abort(context: grpc.aio.ServicerContext[Any, Any], error: SidecarError) -> NoReturn:
    await context.abort_with_status(to_status(error))
    raise AssertionError("abort_with_status returned")  # pragma: no cover - it always raises


# What the lenient deserializers give for bytes protobuf cannot decode (nested past
# its depth limit, a string that is not UTF-8): a handler answers INVALID_ARGUMENT
# after the token check, instead of grpc answering UNKNOWN with the parser's error
# text (and logging a traceback per request) before any check at all.
UNDECODABLE_SEND = sidecar_pb2.SendMessageRequest()
UNDECODABLE_SUBSCRIBE = sidecar_pb2.SubscribeRequest()


def _lenient(message_type: type[Message], undecodable: Message) -> Any:
    def parse(data: bytes) -> Message:
        try:
            return message_type.FromString(data)
        except DecodeError:
            return undecodable

    return parse


def _undecodable(name: str) -> InvalidArgument:
    return InvalidArgument(
        f"the request is not a valid {name}",
        details=(FieldViolation("request", "cannot be decoded: nested too deeply, or a string that is not UTF-8"),),
    )


class WireCache:
    """Recent replies' wire bytes, so a reply fanned out to many subscribers is
    converted and serialized once (~9 µs) rather than once per subscriber.

    Keyed by identity: the broker hands every live subscriber the same Reply
    object. An entry holds that object, so its id cannot be reused while the
    entry lives and a hit is always the same reply. Bounded in entries and in
    bytes, oldest out first; a miss costs one dict lookup.
    """

    __slots__ = ("_entries", "_max_bytes", "_max_entries", "_size")

    def __init__(self, max_entries: int = 256, max_bytes: int = 4 << 20) -> None:
        self._entries: dict[int, tuple[Reply, bytes]] = {}
        self._max_entries = max_entries
        self._max_bytes = max_bytes
        self._size = 0

    def __call__(self, reply: Reply) -> bytes:
        entry = self._entries.get(id(reply))
        if entry is not None and entry[0] is reply:
            return entry[1]
        data = reply_to_proto(reply).SerializeToString()
        entries = self._entries
        entries[id(reply)] = (reply, data)
        self._size += len(data)
        while len(entries) > self._max_entries or self._size > self._max_bytes:
            oldest = next(iter(entries))
            self._size -= len(entries.pop(oldest)[1])
        return data


def message_from_request(request: sidecar_pb2.SendMessageRequest, config: Config) -> InboundMessage:
    """A SendMessageRequest as a validated message, or InvalidArgument naming proto fields."""
    try:
        fields = send_request_to_fields(request)
    except (ValueError, RecursionError):
        raise InvalidArgument(
            "the payload is invalid", details=(FieldViolation("payload", "not representable"),)
        ) from None
    return message_from_fields(
        fields, max_id_length=config.max_id_length, max_payload_depth=config.max_payload_depth, names=PROTO_NAMES
    )


class MessagingService(sidecar_pb2_grpc.MessagingServiceServicer):
    """Translates protobuf ↔ core models; every decision is the core's."""

    def __init__(self, config: Config, core: Core, metrics: Metrics, tokens: TokenChecker) -> None:
        self._config = config
        self._core = core
        self._tokens = tokens
        self._outcomes, self._latency = ingress_metrics(metrics, "grpc")
        self._wire = WireCache()

    def _authorize(self, context: grpc.aio.ServicerContext[Any, Any]) -> None:
        if not self._tokens.enabled:
            return
        header = next((v for k, v in context.invocation_metadata() or () if k == "authorization"), None)
        if not self._tokens.check(header if isinstance(header, str) else None):
            raise Unauthenticated()

    async def SendMessage(  # noqa: N802 - the proto's name
        self, request: sidecar_pb2.SendMessageRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> sidecar_pb2.SendMessageResponse:
        started = time.perf_counter()
        outcome = "rejected"
        try:
            self._authorize(context)
            if request is UNDECODABLE_SEND:
                raise _undecodable("SendMessageRequest")
            message = message_from_request(request, self._config)
            result = await self._core.send(message)
            outcome = "duplicate" if result.duplicate else "accepted"
            return sidecar_pb2.SendMessageResponse(
                message_id=message.message_id, conversation_id=message.conversation_id, duplicate=result.duplicate
            )
        except SidecarError as e:
            outcome = outcome_of(e, INGRESS_OUTCOMES)
            await abort(context, e)
        except Exception as e:
            outcome = outcome_of(e, INGRESS_OUTCOMES)
            log.exception("unhandled error in SendMessage")
            await abort(context, Internal())
        except asyncio.CancelledError as e:  # the client's deadline passed, or it went away
            outcome = outcome_of(e, INGRESS_OUTCOMES)
            raise
        finally:
            self._outcomes[outcome].inc()
            self._latency.observe(time.perf_counter() - started)

    # A coroutine writing with context.write() rather than an async generator:
    # each write must race the subscriber's cut-off (see _pump).
    async def Subscribe(  # type: ignore[override]  # noqa: N802 - the proto's name
        self, request: sidecar_pb2.SubscribeRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> None:
        try:
            self._authorize(context)
            if request is UNDECODABLE_SUBSCRIBE:
                raise _undecodable("SubscribeRequest")
            conversation_id = request.conversation_id
            if not conversation_id or len(conversation_id) > self._config.max_id_length:
                reason = f"must be a non-empty string of at most {self._config.max_id_length} characters"
                raise InvalidArgument(
                    "conversation_id is invalid", details=(FieldViolation("conversation_id", reason),)
                )
            after = request.after_sequence if request.HasField("after_sequence") else None
            stream = await self._core.subscribe(conversation_id, after)
        except SidecarError as e:
            await abort(context, e)
        except Exception:
            log.exception("unhandled error in Subscribe")
            await abort(context, Internal())
        try:
            # Headers now, not with the first reply: the client learns the
            # subscription is live (wait_for_connection) before any reply exists,
            # and the cursor it starts from, to resume from should it be cut
            # off before its first reply (a live-only subscriber has no other).
            await context.send_initial_metadata(((CURSOR_METADATA, str(stream.last)),))
            await self._pump(stream, context, self._wire)
        except SidecarError as e:
            await self._end(stream, context, e, conversation_id)
        except Exception as e:
            # A write that failed because the call is over: the client cancelled or went
            # away while a reply was being sent. Nobody is left to tell.
            if isinstance(e, ExecuteBatchError) or context.cancelled() or context.done():
                log.debug("subscriber left mid-write", extra={"conversation_id": conversation_id})
                return
            log.exception("unhandled error in Subscribe", extra={"conversation_id": conversation_id})
            await self._end(stream, context, Internal(), conversation_id)
        finally:
            stream.close()

    @staticmethod
    async def _end(
        stream: Any, context: grpc.aio.ServicerContext[Any, Any], error: SidecarError, conversation_id: str
    ) -> None:
        # Leave the broker first: a client that stopped reading must not
        # hold a buffer while its trailers wait behind unread data.
        stream.close()
        try:
            await asyncio.wait_for(abort(context, error), ABORT_GRACE)
        except TimeoutError:
            # Still not reading: give up on a status it will never read
            # and let grpc reset the stream (the client sees CANCELLED).
            log.info("subscriber not reading; dropping the stream", extra={"conversation_id": conversation_id})
            raise asyncio.CancelledError from None

    @staticmethod
    async def _pump(stream: Any, context: grpc.aio.ServicerContext[Any, Any], wire: WireCache) -> None:
        # A client that stops reading blocks context.write() on flow control.
        # The broker's cut-off cancels this task wherever it waits, so such a
        # stream ends (RESOURCE_EXHAUSTED) instead of buffering without bound;
        # the common path awaits each write directly, with no task per reply.
        task = asyncio.current_task()
        assert task is not None
        cut = False

        def cut_off() -> None:
            nonlocal cut
            cut = True
            task.cancel()

        stream.on_cut_off(cut_off)
        try:
            async for reply in stream:
                await context.write(wire(reply))  # bytes: see Subscribe's serializer
        except asyncio.CancelledError:
            if not cut:
                raise  # the client went away or the server is stopping
            task.uncancel()
            raise stream.close_reason from None
        finally:
            stream.on_cut_off(None)


def build_server(
    config: Config, core: Core, metrics: Metrics, tokens: TokenChecker
) -> tuple[grpc.aio.Server, health.aio.HealthServicer]:
    """The gRPC server with every service registered; the caller binds and starts it."""
    # Room for every call our own limits would admit (streams, and SendMessage up to
    # the pending-message cap, which answers RESOURCE_EXHAUSTED past it), so that grpc
    # core never cancels one of them first; bounded, since each waiting call holds
    # its request.
    pending = min(100_000, max(1_000, config.max_streams + config.max_pending_messages))
    server = grpc.aio.server(
        options=[
            ("grpc.max_receive_message_length", config.max_body_bytes),
            # grpc sets SO_REUSEPORT by default: a second sidecar on a port in use would
            # bind it too and take half of the calls. Off, the bind fails and says so.
            ("grpc.so_reuseport", 0),
            # Bounds file descriptors and per-connection memory, as http_max_connections
            # does for HTTP: grpc core closes a connection past it as soon as it is accepted.
            ("grpc.max_allowed_incoming_connections", config.grpc_max_connections),
            ("grpc.max_concurrent_streams", 1000),
            # Calls that arrived but the asyncio server has not picked up yet.
            # grpc core cancels them at random past 1000 (all past 3000), so a
            # burst of reconnecting subscribers after a restart would see
            # CANCELLED; our own limits are the ones that should bite.
            ("grpc.server.max_pending_requests", pending),
            ("grpc.server.max_pending_requests_hard_limit", 2 * pending),
            # Idle Subscribe streams must survive proxies; answer client pings.
            ("grpc.keepalive_time_ms", 60_000),
            ("grpc.http2.min_ping_interval_without_data_ms", 10_000),
            ("grpc.keepalive_permit_without_calls", 1),
        ]
    )
    _add_messaging_service(MessagingService(config, core, metrics, tokens), server)
    gate = _OpenStreams(MAX_OPEN_TOKENLESS_STREAMS)
    health_servicer = _BoundedHealth(gate)
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    names = (SERVICE_NAME, health.SERVICE_NAME, reflection.SERVICE_NAME, REFLECTION_V1)
    reflector = _BoundedReflection(gate, names)
    reflection_pb2_grpc.add_ServerReflectionServicer_to_server(reflector, server)
    _serve_reflection_v1(reflector, server)
    return server, health_servicer


# Health Watch and reflection streams need no token (kubelet probes, grpcurl): without a
# bound of their own, anyone reaching the port could hold as many as grpc admits per
# connection times grpc_max_connections (~15 KiB each). Probes use Check (unary, not
# counted); a Watch or a reflection session lasts while a tool runs. Together, at most:
MAX_OPEN_TOKENLESS_STREAMS = 100


class _OpenStreams:
    """A count of open streams with a bound: past it, RESOURCE_EXHAUSTED."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.open = 0

    async def enter(self, context: grpc.aio.ServicerContext[Any, Any]) -> None:
        if self.open >= self.limit:
            await context.abort(
                grpc.StatusCode.RESOURCE_EXHAUSTED,
                f"at most {self.limit} health Watch and reflection streams are open at once",
            )
        self.open += 1


class _BoundedHealth(health.aio.HealthServicer):  # type: ignore[misc]  # grpc_health is untyped
    def __init__(self, gate: _OpenStreams) -> None:
        super().__init__()
        self._gate = gate

    async def Watch(self, request: health_pb2.HealthCheckRequest, context: Any) -> None:  # noqa: N802 - grpc's name
        await self._gate.enter(context)
        try:
            await super().Watch(request, context)
        finally:
            self._gate.open -= 1


class _BoundedReflection(reflection.aio.ReflectionServicer):  # type: ignore[misc]  # untyped too
    def __init__(self, gate: _OpenStreams, names: tuple[str, ...]) -> None:
        super().__init__(names)
        self._gate = gate

    async def ServerReflectionInfo(  # noqa: N802 - grpc's name
        self, request_iterator: AsyncIterator[reflection_pb2.ServerReflectionRequest], context: Any
    ) -> AsyncIterator[reflection_pb2.ServerReflectionResponse]:
        await self._gate.enter(context)
        try:
            # Closed here, not whenever the collector gets to it, when the call ends early.
            async with contextlib.aclosing(super().ServerReflectionInfo(request_iterator, context)) as responses:
                async for response in responses:
                    yield response
        finally:
            self._gate.open -= 1


REFLECTION_V1 = "grpc.reflection.v1.ServerReflection"


def _add_messaging_service(servicer: MessagingService, server: grpc.aio.Server) -> None:
    """What the generated ``add_MessagingServiceServicer_to_server`` does, with the
    lenient request deserializers."""
    handlers = {
        "SendMessage": grpc.unary_unary_rpc_method_handler(
            servicer.SendMessage,
            request_deserializer=_lenient(sidecar_pb2.SendMessageRequest, UNDECODABLE_SEND),
            response_serializer=sidecar_pb2.SendMessageResponse.SerializeToString,
        ),
        "Subscribe": grpc.unary_stream_rpc_method_handler(
            servicer.Subscribe,
            request_deserializer=_lenient(sidecar_pb2.SubscribeRequest, UNDECODABLE_SUBSCRIBE),
            # Subscribe writes Reply messages already serialized, by WireCache.
            response_serializer=_as_is,
        ),
    }
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(SERVICE_NAME, handlers),))
    server.add_registered_method_handlers(SERVICE_NAME, handlers)


def _as_is(data: bytes) -> bytes:
    return data


def _serve_reflection_v1(servicer: _BoundedReflection, server: grpc.aio.Server) -> None:
    """Server reflection under its v1 name too: grpcio-reflection serves only v1alpha,
    and clients such as grpcurl and Postman ask for v1 first. The two protos are the
    same messages with the same field numbers, so v1alpha's servicer answers v1 bytes."""
    _describe_reflection_v1()
    handler = grpc.stream_stream_rpc_method_handler(
        servicer.ServerReflectionInfo,
        request_deserializer=reflection_pb2.ServerReflectionRequest.FromString,
        response_serializer=reflection_pb2.ServerReflectionResponse.SerializeToString,
    )
    server.add_generic_rpc_handlers(
        (grpc.method_handlers_generic_handler(REFLECTION_V1, {"ServerReflectionInfo": handler}),)
    )


def _describe_reflection_v1() -> None:
    """Put a descriptor of the v1 service in the default pool, or reflection would list a
    service it cannot describe (a client resolving every listed name, as ``grpcurl
    describe`` does, fails on it). Made from v1alpha's: the same file under v1's
    name and package. Once per process: the pool is process-wide."""
    pool = descriptor_pool.Default()
    try:
        pool.FindFileByName(_REFLECTION_V1_FILE)
        return
    except KeyError:
        pass
    proto = descriptor_pb2.FileDescriptorProto()
    reflection_pb2.DESCRIPTOR.CopyToProto(proto)
    proto.name, proto.package = _REFLECTION_V1_FILE, "grpc.reflection.v1"
    proto.ClearField("options")  # v1alpha's language packages and its deprecation
    alpha, v1 = ".grpc.reflection.v1alpha.", ".grpc.reflection.v1."
    for message in proto.message_type:
        for field in message.field:
            if field.HasField("type_name"):  # set only where it was: a scalar must not get one
                field.type_name = field.type_name.replace(alpha, v1)
    for method in proto.service[0].method:
        method.input_type = method.input_type.replace(alpha, v1)
        method.output_type = method.output_type.replace(alpha, v1)
    pool.AddSerializedFile(proto.SerializeToString())


_REFLECTION_V1_FILE = "grpc/reflection/v1/reflection.proto"

SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING
