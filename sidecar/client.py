"""Client side of the CLI: send a message over gRPC or HTTP, tail a conversation's replies with resume."""

from __future__ import annotations

import http.client
import json
import ssl
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, TextIO

import grpc
from google.rpc import error_details_pb2
from grpc_status import rpc_status

from sidecar import convert  # the JSON <-> protobuf mapping the server uses, so payloads match exactly
from sidecar.config import redact_url
from sidecar.convert import CURSOR_METADATA
from sidecar.models import JSON
from sidecar.v1 import sidecar_pb2, sidecar_pb2_grpc

BACKOFF_INITIAL = 0.2
BACKOFF_MAX = 5.0

# Cursor resume makes a retry always safe, so every status that can mean "this
# connection or server went away" is retried; UNKNOWN and INTERNAL are what a
# reset HTTP/2 stream surfaces as. Anything else is the caller's mistake or a
# state a retry cannot fix (OUT_OF_RANGE: the cursor is older than retention).
RETRYABLE = frozenset(
    {
        grpc.StatusCode.UNAVAILABLE,
        grpc.StatusCode.RESOURCE_EXHAUSTED,
        grpc.StatusCode.ABORTED,
        grpc.StatusCode.CANCELLED,
        grpc.StatusCode.DEADLINE_EXCEEDED,
        grpc.StatusCode.INTERNAL,
        grpc.StatusCode.UNKNOWN,
    }
)

CHANNEL_OPTIONS = [
    # A silently dropped connection (no RST) must be noticed, or tail would hang forever.
    ("grpc.keepalive_time_ms", 20_000),
    ("grpc.keepalive_timeout_ms", 10_000),
    # A quiet Subscribe stream carries no data; without this the pings stop after two.
    ("grpc.http2.max_pings_without_data", 0),
    # Subchannels are shared process-wide and keep their own backoff (up to 120 s
    # by default); align it with ours so a restarted server is found promptly.
    ("grpc.initial_reconnect_backoff_ms", int(BACKOFF_INITIAL * 1000)),
    ("grpc.min_reconnect_backoff_ms", int(BACKOFF_INITIAL * 1000)),
    ("grpc.max_reconnect_backoff_ms", int(BACKOFF_MAX * 1000)),
    # A reply may be as large as the server's SIDECAR_MAX_BODY_BYTES allows; past grpc's
    # 4 MiB default the stream would fail with RESOURCE_EXHAUSTED at every reconnect.
    ("grpc.max_receive_message_length", -1),
]


class ClientError(Exception):
    """A request failed; the message says how, for stderr."""


@dataclass(frozen=True, slots=True)
class Outgoing:
    """One user message as `sidecar send` was asked to send it; payload None means absent."""

    user_id: str
    message_id: str
    conversation_id: str
    type: str
    text: str
    payload: JSON | None


def _metadata(token: str | None) -> tuple[tuple[str, str], ...] | None:
    return (("authorization", f"Bearer {token}"),) if token else None


def describe_rpc_error(error: grpc.RpcError) -> str:
    """CODE: message, plus the field violations of a google.rpc.BadRequest when the server sent one."""
    text = f"{error.code().name}: {error.details()}"
    try:
        status = rpc_status.from_call(error)
    except ValueError:  # the rich status disagrees with the plain one; the plain one is enough
        status = None
    for detail in status.details if status is not None else ():
        if detail.Is(error_details_pb2.BadRequest.DESCRIPTOR):
            bad = error_details_pb2.BadRequest()
            detail.Unpack(bad)
            text += "".join(f"\n  {v.field}: {v.description}" for v in bad.field_violations)
    return text


@dataclass(frozen=True, slots=True)
class Tls:
    """How to reach a sidecar serving TLS (SIDECAR_TLS_CERT_FILE): ``enabled`` for gRPC,
    and ``ca_file`` to verify its certificate with (None: the system's CAs)."""

    enabled: bool = False
    ca_file: str | None = None

    def channel(self, target: str, options: Any = None) -> grpc.Channel:
        if not self.enabled:
            return grpc.insecure_channel(target, options=options)
        roots = None
        if self.ca_file:
            try:
                with open(self.ca_file, "rb") as f:
                    roots = f.read()
            except OSError as e:
                raise ClientError(f"cannot read the CA file {self.ca_file}: {e.strerror}") from None
        return grpc.secure_channel(target, grpc.ssl_channel_credentials(root_certificates=roots), options=options)

    def context(self) -> ssl.SSLContext | None:
        """For https:// URLs: the CA file's trust instead of the system's, when given."""
        if not self.ca_file:
            return None
        try:
            return ssl.create_default_context(cafile=self.ca_file)
        except (OSError, ssl.SSLError) as e:
            raise ClientError(f"cannot use the CA file {self.ca_file}: {e}") from None


def send_grpc(target: str, token: str | None, message: Outgoing, timeout: float, tls: Tls = Tls()) -> dict[str, JSON]:
    """SendMessage; the answer as the JSON the HTTP ingress would give (its first three fields)."""
    request = sidecar_pb2.SendMessageRequest(
        user_id=message.user_id,
        message_id=message.message_id,
        conversation_id=message.conversation_id,
        type=message.type,
        text=message.text,
    )
    if message.payload is not None:  # absent: the sidecar uses {"text": text}, as over HTTP
        request.payload.CopyFrom(convert.json_to_value(message.payload))
    with tls.channel(target) as channel:
        stub = sidecar_pb2_grpc.MessagingServiceStub(channel)
        try:
            response = stub.SendMessage(request, metadata=_metadata(token), timeout=timeout)
        except grpc.RpcError as e:
            raise ClientError(describe_rpc_error(e)) from None
    return {
        "messageId": response.message_id,
        "conversationId": response.conversation_id,
        "duplicate": response.duplicate,
    }


def send_http(url: str, token: str | None, message: Outgoing, timeout: float, tls: Tls = Tls()) -> JSON:
    """POST the SPEC §2 body; the answer body, parsed."""
    body: dict[str, JSON] = {
        "userId": message.user_id,
        "messageId": message.message_id,
        "conversationId": message.conversation_id,
        "type": message.type,
        "text": message.text,
    }
    if message.payload is not None:  # absent: the sidecar uses {"text": text}, as the hosted integration does
        body["payload"] = message.payload
    return http_json("POST", url, token, body, timeout, tls.context())


def http_json(
    method: str, url: str, token: str | None, body: JSON | None, timeout: float, context: ssl.SSLContext | None = None
) -> JSON:
    """One JSON request (body may be None), its JSON answer; ClientError with the server's error otherwise."""
    headers = {"Content-Type": "application/json"}
    if token:
        headers["Authorization"] = f"Bearer {token}"
    data = None if body is None else json.dumps(body).encode()
    # The CLI checked that the scheme is http(s): file:// and friends never get here.
    request = urllib.request.Request(url, data=data, headers=headers, method=method)  # noqa: S310
    # No redirects: urllib would resend the token to wherever a 3xx points (a POST as a
    # GET), and report what that answered as the sidecar's answer. The sidecar never
    # redirects, so a 3xx means the URL is wrong.
    opener = urllib.request.build_opener(_NoRedirects, urllib.request.HTTPSHandler(context=context))
    shown = redact_url(url)  # in messages: a URL may hold a password
    try:
        with opener.open(request, timeout=timeout) as response:
            raw = response.read()
    except urllib.error.HTTPError as e:
        if 300 <= e.code < 400:
            raise ClientError(f"HTTP {e.code} {e.reason}: redirects are not followed; check the URL") from None
        detail = e.read().decode("utf-8", errors="replace").strip()
        raise ClientError(f"HTTP {e.code} {e.reason}: {detail}") from None
    except (urllib.error.URLError, OSError) as e:
        reason = e.reason if isinstance(e, urllib.error.URLError) else e
        raise ClientError(f"cannot reach {shown}: {reason}") from None
    except http.client.HTTPException as e:  # something answered, but not HTTP (a gRPC port, say)
        raise ClientError(f"{shown} did not answer in HTTP ({type(e).__name__})") from None
    except ValueError as e:  # http.client.InvalidURL and friends: the URL itself
        raise ClientError(f"cannot use {shown}: {e}") from None
    try:
        return json.loads(raw)
    except ValueError:
        raise ClientError(f"the answer from {shown} is not JSON: {raw[:200]!r}") from None


class _NoRedirects(urllib.request.HTTPRedirectHandler):
    def redirect_request(self, *args: Any, **kwargs: Any) -> None:
        return None  # the 3xx is raised as an HTTPError instead


def reply_to_json(reply: sidecar_pb2.Reply) -> dict[str, JSON]:
    """A Reply as one JSON object with the HTTP side's camelCase names."""
    return {
        "conversationId": reply.conversation_id,
        "sequence": reply.sequence,
        "type": reply.type,
        "payload": convert.value_to_json(reply.payload) if reply.HasField("payload") else None,
        "botUserId": reply.bot_user_id,
        "botMessageId": reply.bot_message_id,
        "botConversationId": reply.bot_conversation_id,
        "userId": reply.user_id,
        "inReplyTo": reply.in_reply_to,
        "createdAt": reply.created_at.ToJsonString() if reply.HasField("created_at") else None,
    }


@dataclass(frozen=True, slots=True)
class TailOptions:
    target: str
    token: str | None
    conversation_id: str
    after: int | None
    """None: live replies only; N: replay every reply after sequence N first."""
    once: bool = False
    """Connect once: end when the stream ends instead of reconnecting."""
    max_replies: int | None = None
    tls: Tls = Tls()


def _start_cursor(call: Any) -> int | None:
    """The sequence a Subscribe stream starts after, from its initial metadata (None from
    a server that does not send it). Waits for the stream's headers, which the sidecar
    sends as soon as the subscription is live."""
    value = dict(call.initial_metadata() or ()).get(CURSOR_METADATA)
    return int(value) if isinstance(value, str) and value.isascii() and value.isdigit() else None


def tail(
    options: TailOptions,
    out: TextIO,
    err: TextIO,
    sleep: Callable[[float], None] = time.sleep,
) -> int:
    """Print each reply as a JSON line, reconnecting from the last printed sequence; the exit code."""
    cursor = options.after
    printed = 0
    delay = BACKOFF_INITIAL
    with options.tls.channel(options.target, CHANNEL_OPTIONS) as channel:
        stub = sidecar_pb2_grpc.MessagingServiceStub(channel)
        while True:
            kwargs: dict[str, Any] = {"conversation_id": options.conversation_id}
            if cursor is not None:
                kwargs["after_sequence"] = cursor
            started = time.monotonic()
            call = stub.Subscribe(sidecar_pb2.SubscribeRequest(**kwargs), metadata=_metadata(options.token))
            try:
                if cursor is None:
                    # Live only: the server names where the stream starts, so that a
                    # reconnect before the first reply still misses nothing.
                    cursor = _start_cursor(call)
                for reply in call:
                    # The server promises no repeats; this makes "never printed twice" hold regardless.
                    if cursor is not None and reply.sequence <= cursor:
                        continue
                    out.write(json.dumps(reply_to_json(reply), ensure_ascii=False) + "\n")
                    out.flush()
                    cursor = reply.sequence
                    printed += 1
                    delay = BACKOFF_INITIAL
                    if options.max_replies is not None and printed >= options.max_replies:
                        call.cancel()
                        return 0
                reason = "the server ended the stream"
                if options.once:
                    return 0
            except grpc.RpcError as e:
                if e.code() not in RETRYABLE:
                    err.write(f"sidecar tail: {describe_rpc_error(e)}\n")
                    return 1
                reason = describe_rpc_error(e)
                if options.once:
                    err.write(f"sidecar tail: {reason}\n")
                    return 1
            if time.monotonic() - started > BACKOFF_MAX:
                delay = BACKOFF_INITIAL  # the connection was healthy for a while: this is a fresh failure
            resume = "live replies only" if cursor is None else f"after sequence {cursor}"
            err.write(f"sidecar tail: {reason}; reconnecting in {delay:.1f}s ({resume})\n")
            err.flush()
            sleep(delay)
            delay = min(delay * 2, BACKOFF_MAX)
