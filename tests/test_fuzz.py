"""Fuzz the two wire paths: whatever arrives, the answer is a message or a client error, never a crash.

Bounded in `make test` (the default hypothesis profile); `make fuzz` runs the
same properties with many more examples (HYPOTHESIS_PROFILE=fuzz).
"""

from __future__ import annotations

from typing import Any

import orjson
from google.protobuf import struct_pb2
from hypothesis import given
from hypothesis import strategies as st

from sidecar.config import Config
from sidecar.errors import SidecarError
from sidecar.ingress.grpc import message_from_request
from sidecar.ingress.http import parse_json
from sidecar.models import InboundMessage, canonical_json
from sidecar.v1 import sidecar_pb2
from sidecar.validate import message_from_fields

CONFIG = Config()
FIELDS = ("userId", "messageId", "conversationId", "type", "text", "payload")

scalars = (
    st.none()
    | st.booleans()
    | st.integers()
    | st.floats()
    | st.text()
    | st.sampled_from(["", "x" * 300, "\x00", "\ud800", "é", "🙂"])
)
json_like = st.recursive(
    scalars, lambda c: st.lists(c, max_size=4) | st.dictionaries(st.text(max_size=8), c, max_size=4), max_leaves=40
)
bodies = st.fixed_dictionaries({}, optional={name: json_like for name in FIELDS}) | json_like


def accepted_message_is_storable(message: InboundMessage) -> None:
    """What the store will do with an accepted message must not fail either."""
    canonical_json(message.payload)
    message.fingerprint()
    orjson.dumps(message.payload)


def http_path(raw: bytes) -> None:
    try:
        body = parse_json(raw)
        if not isinstance(body, dict):
            return
        message = message_from_fields(
            body, max_id_length=CONFIG.max_id_length, max_payload_depth=CONFIG.max_payload_depth
        )
    except SidecarError as e:
        assert e.http_status in {400, 413, 415}
        return
    accepted_message_is_storable(message)


@given(st.binary(max_size=2000))
def test_fuzz_http_bytes_never_crash(raw: bytes) -> None:
    http_path(raw)


@given(bodies)
def test_fuzz_http_json_bodies_never_crash(body: Any) -> None:
    try:
        raw = orjson.dumps(body)
    except (TypeError, orjson.JSONEncodeError):  # not encodable (NaN is encodable as null; surrogates are not)
        return
    http_path(raw)


def values(depth: int = 0) -> st.SearchStrategy[struct_pb2.Value]:
    leaf = st.one_of(
        st.just(struct_pb2.Value(null_value=struct_pb2.NULL_VALUE)),
        st.floats().map(lambda f: struct_pb2.Value(number_value=f)),
        st.text().map(lambda t: struct_pb2.Value(string_value=t)),
        st.booleans().map(lambda b: struct_pb2.Value(bool_value=b)),
        st.just(struct_pb2.Value()),  # no kind set at all
    )
    if depth > 3:
        return leaf

    def as_list(items: list[struct_pb2.Value]) -> struct_pb2.Value:
        v = struct_pb2.Value()
        v.list_value.SetInParent()
        v.list_value.values.extend(items)
        return v

    def as_struct(items: dict[str, struct_pb2.Value]) -> struct_pb2.Value:
        v = struct_pb2.Value()
        v.struct_value.SetInParent()
        for k, item in items.items():
            v.struct_value.fields[k].CopyFrom(item)
        return v

    child = st.deferred(lambda: values(depth + 1))
    return (
        leaf
        | st.lists(child, max_size=3).map(as_list)
        | st.dictionaries(st.text(max_size=5), child, max_size=3).map(as_struct)
    )


@given(st.text(), st.text(), st.text(), st.text(), st.text(), st.none() | values())
def test_fuzz_grpc_requests_never_crash(
    user: str, message_id: str, conversation: str, type_: str, text: str, payload: struct_pb2.Value | None
) -> None:
    request = sidecar_pb2.SendMessageRequest(
        user_id=user, message_id=message_id, conversation_id=conversation, type=type_, text=text
    )
    if payload is not None:
        request.payload.CopyFrom(payload)
    try:
        message = message_from_request(request, CONFIG)
    except SidecarError as e:
        assert e.http_status == 400
        return
    accepted_message_is_storable(message)
