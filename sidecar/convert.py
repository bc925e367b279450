"""JSON ↔ google.protobuf.Value and core models ↔ protobuf messages, for the gRPC front door."""

from __future__ import annotations

import math

from google.protobuf import struct_pb2, timestamp_pb2

from sidecar.models import JSON, MAX_SAFE_INT, Reply
from sidecar.v1 import sidecar_pb2

# Initial metadata of every Subscribe stream: the sequence it starts after (the
# request's after_sequence, or the conversation's last reply for a live-only one).
CURSOR_METADATA = "sidecar-after-sequence"


def json_to_value(value: JSON) -> struct_pb2.Value:
    """Any JSON value as a Value; ValueError for what would not round-trip exactly."""
    out = struct_pb2.Value()
    _fill(out, value)
    return out


def _fill(out: struct_pb2.Value, value: JSON) -> None:
    if value is None:
        out.null_value = struct_pb2.NULL_VALUE
    elif isinstance(value, bool):
        out.bool_value = value
    elif isinstance(value, str):
        out.string_value = value
    elif isinstance(value, int):
        if abs(value) > MAX_SAFE_INT:
            raise ValueError("integers must be within ±2^53 to round-trip exactly")
        out.number_value = value
    elif isinstance(value, float):
        if not math.isfinite(value):
            raise ValueError("numbers must be finite")
        out.number_value = value
    elif isinstance(value, dict):
        fields = out.struct_value.fields
        out.struct_value.SetInParent()  # an empty object must stay an object, not become unset
        for key, item in value.items():
            if not isinstance(key, str):
                raise ValueError("object keys must be strings")
            _fill(fields[key], item)
    elif isinstance(value, list | tuple):
        values = out.list_value.values
        out.list_value.SetInParent()
        for item in value:
            _fill(values.add(), item)
    else:
        raise ValueError(f"not a JSON value: {type(value).__name__}")


def value_to_json(value: struct_pb2.Value) -> JSON:
    """A Value as plain JSON. Integral doubles within ±2^53 become ints: JSON has one number type."""
    kind = value.WhichOneof("kind")
    if kind == "string_value":
        return value.string_value
    if kind == "number_value":
        n = value.number_value
        if n.is_integer() and abs(n) <= MAX_SAFE_INT:
            return int(n)
        return n
    if kind == "bool_value":
        return value.bool_value
    if kind == "struct_value":
        return {k: value_to_json(v) for k, v in value.struct_value.fields.items()}
    if kind == "list_value":
        return [value_to_json(v) for v in value.list_value.values]
    return None  # null_value, or unset (treated as null)


def reply_to_proto(reply: Reply) -> sidecar_pb2.Reply:
    seconds = int(reply.created_at)
    nanos = round((reply.created_at - seconds) * 1e9)
    if nanos == 1_000_000_000:  # a fraction that rounds up is the next second, not this one's start
        seconds, nanos = seconds + 1, 0
    created = timestamp_pb2.Timestamp(seconds=seconds, nanos=nanos)
    return sidecar_pb2.Reply(
        conversation_id=reply.conversation_id,
        sequence=reply.sequence,
        type=reply.type,
        payload=json_to_value(reply.payload),
        bot_user_id=reply.bot_user_id,
        bot_message_id=reply.bot_message_id,
        bot_conversation_id=reply.bot_conversation_id,
        user_id=reply.user_id,
        in_reply_to=reply.in_reply_to,
        created_at=created,
    )


def send_request_to_fields(request: sidecar_pb2.SendMessageRequest) -> dict[str, object]:
    """The request under the SPEC §2 JSON names; payload None when the request has none."""
    return {
        "userId": request.user_id,
        "messageId": request.message_id,
        "conversationId": request.conversation_id,
        "type": request.type,
        "text": request.text,
        "payload": value_to_json(request.payload) if request.HasField("payload") else None,
    }
