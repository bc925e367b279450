"""Validation of an inbound message, one implementation for both protocols."""

from __future__ import annotations

import math
from collections.abc import Mapping

import orjson

from sidecar.convert import json_to_value
from sidecar.errors import FieldViolation, InvalidArgument
from sidecar.models import JSON, MAX_SAFE_INT, InboundMessage

ID_FIELDS = ("userId", "messageId", "conversationId", "type")

# Violations name the field as the client wrote it: JSON names over HTTP,
# proto names over gRPC (google.rpc.BadRequest convention).
PROTO_NAMES = {
    "userId": "user_id",
    "messageId": "message_id",
    "conversationId": "conversation_id",
    "type": "type",
    "text": "text",
    "payload": "payload",
}

# gRPC clients refuse a message over 4 MiB unless told otherwise (grpc's default receive
# limit): a reply larger than that as a Reply would stop every standard subscriber of its
# conversation at it, resuming for ever. Replies must fit, with room for their other
# fields (see _payload_room).
MAX_REPLY_WIRE_BYTES = 4 * 1024 * 1024
# JSON grows at most 5.5 times as google.protobuf.Value: "0," is 11 bytes in a ListValue.
_VALUE_GROWTH = 5.5


def message_from_fields(
    fields: Mapping[str, object],
    *,
    max_id_length: int,
    max_payload_depth: int,
    names: Mapping[str, str] | None = None,
) -> InboundMessage:
    """Check a message's fields (JSON names) and build the normalized message.

    ``payload`` may be absent (None): the hosted integration accepts that.
    Raises InvalidArgument listing every bad field at once.
    """
    bad: list[FieldViolation] = []

    def violation(name: str, reason: str) -> None:
        bad.append(FieldViolation((names or {}).get(name, name), reason))

    for name in ID_FIELDS:
        value = fields.get(name)
        if value is None:
            violation(name, "is required")
        elif not isinstance(value, str):
            violation(name, "must be a string")
        elif not value:
            violation(name, "must not be empty")
        elif len(value) > max_id_length and name != "type":  # a kind, not an id: the body's limit bounds it
            violation(name, f"must be at most {max_id_length} characters")
    text = fields.get("text")
    if text is None:
        violation("text", "is required")
    elif not isinstance(text, str):
        violation("text", "must be a string")
    payload = fields.get("payload")
    reason = payload_problem(payload, max_payload_depth)
    if reason:
        violation("payload", reason)
    else:
        payload = normalize_numbers(payload)
    if bad:
        raise InvalidArgument("the message has invalid fields", details=tuple(bad))
    return InboundMessage.normalized(
        user_id=str(fields["userId"]),
        message_id=str(fields["messageId"]),
        conversation_id=str(fields["conversationId"]),
        type=str(fields["type"]),
        text=str(text),
        payload=payload,
    )


def payload_problem(payload: JSON, max_depth: int) -> str:
    """Why a payload is refused ("" when it is fine): too deep, or numbers that do not round-trip."""
    if _flat_wire_bound(payload) >= 0:  # most payloads ({"text": ...}) need no walk
        return ""
    stack: list[tuple[JSON, int]] = [(payload, 1)]
    while stack:
        value, depth = stack.pop()
        if isinstance(value, dict | list):
            if depth > max_depth:
                return f"must not nest deeper than {max_depth} levels"
            if isinstance(value, dict) and not all(isinstance(k, str) for k in value):
                return "object keys must be strings"  # parsed JSON never has others; a bot's value may
            children = value.values() if isinstance(value, dict) else value
            stack.extend((child, depth + 1) for child in children)
        elif isinstance(value, bool) or value is None or isinstance(value, str):
            continue
        elif isinstance(value, int):
            if abs(value) > MAX_SAFE_INT:
                return f"integers must be within ±2^53 to round-trip exactly (got {len(str(value))} digits)"
        elif isinstance(value, float):
            if not math.isfinite(value):
                return "numbers must be finite"
        else:
            return "must be a JSON value"
    return ""


def _flat_wire_bound(payload: JSON) -> int:
    """For an object of strings only (most payloads, {"text": ...}): an upper bound of
    its size as a Value (4 bytes of UTF-8 per character at most, and a few of tags and
    lengths per entry). -1 for any other value. A loop, not a generator: the hot path."""
    if type(payload) is not dict:
        return -1
    size = 0
    for key, value in payload.items():
        if type(key) is not str or type(value) is not str:
            return -1
        size += 4 * (len(key) + len(value)) + 16
    return size


def reply_problems(
    kind: object, payload: JSON, bot_ids: Mapping[str, object], *, max_id_length: int, max_payload_depth: int
) -> list[FieldViolation]:
    """What makes a bot's reply one the log cannot hold or a protocol cannot carry
    exactly: its type, its bot ids (by the names given) and its payload. Empty when fine."""
    bad = []
    if type(kind) is not str or not 0 < len(kind) <= max_id_length:
        bad.append(FieldViolation("type", f"must be a non-empty string of at most {max_id_length} characters"))
    for name, value in bot_ids.items():
        if type(value) is not str or len(value) > max_id_length:
            bad.append(FieldViolation(name, f"must be a string of at most {max_id_length} characters"))
    # Flat strings well within the limit (most replies) need no walk and no size check.
    room = _payload_room(max_id_length)
    if not 0 <= _flat_wire_bound(payload) <= room and (
        reason := payload_problem(payload, max_payload_depth) or _too_large_for_grpc(payload, room)
    ):
        bad.append(FieldViolation("payload", reason))
    return bad


def _payload_room(max_id_length: int) -> int:
    """What a Reply leaves its payload of the 4 MiB: its eight other strings (type, ids,
    user and message ids) are at most max_id_length characters of up to 4 bytes each, and
    its numbers, timestamp and tags take well under a KiB."""
    return MAX_REPLY_WIRE_BYTES - 8 * 4 * max_id_length - 1024


def _too_large_for_grpc(payload: JSON, room: int) -> str:
    """Why a valid reply payload cannot reach gRPC subscribers: too large as a Value."""
    # Quick bounds first (most replies are far below the limit), the exact size near it.
    bound = _flat_wire_bound(payload)
    if bound < 0:
        bound = int(_VALUE_GROWTH * len(orjson.dumps(payload)))
    if bound <= room:
        return ""
    size = json_to_value(payload).ByteSize()
    if size <= room:
        return ""
    return (
        f"is {size:,} bytes as a google.protobuf.Value: a reply must fit gRPC's"
        f" {MAX_REPLY_WIRE_BYTES // 2**20} MiB message limit"
    )


def normalize_numbers(value: JSON) -> JSON:
    """Integral floats become ints (1.0 → 1), as they come back from google.protobuf.Value.

    JSON has one number type; without this, one message sent as 1.0 over
    HTTP and as 1 over gRPC would fingerprint differently and be refused
    as a conflict instead of recognised as a duplicate.
    """
    if isinstance(value, float):
        return int(value) if value.is_integer() and abs(value) <= MAX_SAFE_INT else value
    if isinstance(value, dict):
        return {k: normalize_numbers(v) for k, v in value.items()}
    if isinstance(value, list):
        return [normalize_numbers(v) for v in value]
    return value
