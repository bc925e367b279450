"""JSON ↔ google.protobuf.Value round-trips exactly; what cannot is refused."""

from __future__ import annotations

import math

import pytest
from hypothesis import given
from hypothesis import strategies as st

from sidecar.convert import json_to_value, reply_to_proto, value_to_json
from sidecar.ingress.grpc import WireCache
from sidecar.models import Reply, canonical_json
from sidecar.v1 import sidecar_pb2
from sidecar.validate import normalize_numbers

json_values = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(min_value=-(2**53), max_value=2**53)
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(),
    lambda children: st.lists(children, max_size=5) | st.dictionaries(st.text(max_size=10), children, max_size=5),
    max_leaves=30,
)


@given(json_values)
def test_any_json_value_round_trips_exactly(value: object) -> None:
    back = value_to_json(json_to_value(value))
    assert back == value
    # The ingress normalizes integral floats (validate.normalize_numbers); after that, bytes match too.
    assert canonical_json(back) == canonical_json(normalize_numbers(value))


@pytest.mark.parametrize("bad", [2**53 + 1, -(2**60), math.nan, math.inf, {1: "x"}, object()])
def test_values_that_cannot_round_trip_are_refused(bad: object) -> None:
    with pytest.raises(ValueError):
        json_to_value(bad)


def test_empty_containers_stay_containers() -> None:
    assert value_to_json(json_to_value({})) == {}
    assert value_to_json(json_to_value([])) == []
    assert value_to_json(json_to_value({"a": {}})) == {"a": {}}


def test_reply_to_proto_carries_every_field() -> None:
    r = Reply("c", 3, "text", {"text": "hi"}, "bu", "bm", "bc", "u", "m", 1700000000.25)
    p = reply_to_proto(r)
    assert (p.conversation_id, p.sequence, p.type, p.bot_user_id, p.bot_message_id) == ("c", 3, "text", "bu", "bm")
    assert (p.bot_conversation_id, p.user_id, p.in_reply_to) == ("bc", "u", "m")
    assert value_to_json(p.payload) == {"text": "hi"}
    assert p.created_at.seconds == 1700000000 and p.created_at.nanos == 250_000_000


def test_wire_cache_serializes_each_reply_once_and_stays_bounded() -> None:
    cache = WireCache(max_entries=3, max_bytes=10_000)
    first = Reply("c", 1, "text", {"text": "hi"}, "bu", "bm", "bc", "u", "m", 1700000000.25)
    data = cache(first)
    assert sidecar_pb2.Reply.FromString(data) == reply_to_proto(first)
    assert cache(first) is data  # the same object again: no second conversion
    # An equal reply that is another object (read from the log) is converted on its own.
    twin = Reply("c", 1, "text", {"text": "hi"}, "bu", "bm", "bc", "u", "m", 1700000000.25)
    assert cache(twin) == data and cache(twin) is not data
    later = [Reply("c", n, "text", {"text": "x" * 10}, "", "", "", "", "", 0.0) for n in range(2, 6)]
    for r in later:
        cache(r)
    assert len(cache._entries) == 3  # oldest out first
    assert id(first) not in cache._entries and id(later[-1]) in cache._entries
    big = Reply("c", 9, "text", {"text": "y" * 20_000}, "", "", "", "", "", 0.0)
    assert sidecar_pb2.Reply.FromString(cache(big)).payload.struct_value.fields["text"].string_value == "y" * 20_000
    assert cache._size <= 10_000 and not cache._entries  # larger than the byte bound: not kept


def test_a_creation_time_whose_fraction_rounds_up_is_the_next_second() -> None:
    p = reply_to_proto(Reply("c", 1, "text", {}, "", "", "", "", "", 5.9999999999))
    assert (p.created_at.seconds, p.created_at.nanos) == (6, 0)  # not (5, 0): a second early
