"""Sidecar ids: the fast formatting must stay byte-for-byte uuid5, or ids change across upgrades."""

from __future__ import annotations

import tracemalloc
import uuid

import orjson
import pytest
from hypothesis import given
from hypothesis import strategies as st

from sidecar.models import _NAMESPACE, InboundMessage, entity_id, queued_size, sidecar_id
from sidecar.validate import reply_problems


@given(st.sampled_from(["user", "conversation", "message", "reply"]), st.lists(st.text(), max_size=3))
def test_sidecar_id_is_uuid5_of_the_joined_name(kind: str, parts: list[str]) -> None:
    assert sidecar_id(kind, *parts) == str(uuid.uuid5(_NAMESPACE, "\x1f".join((kind, *parts))))


def test_sidecar_ids_are_stable_across_releases() -> None:
    # Pinned: a change here would re-key every stored message and reply.
    assert sidecar_id("conversation", "c1") == "586c8db9-9b32-521c-8a56-01810f177589"
    assert uuid.UUID(sidecar_id("user", "u")).version == 5


@given(st.sampled_from(["user", "conversation"]), st.text())
def test_memoized_entity_id_is_the_same_id(kind: str, key: str) -> None:
    assert entity_id(kind, key) == sidecar_id(kind, key) == entity_id(kind, key)


def test_the_room_a_reply_leaves_its_payload_shrinks_with_the_longest_ids() -> None:
    # Eight strings of up to max_id_length characters travel with the payload in a Reply.
    payload = {"t": "x" * (4 * 2**20 - 100_000)}
    ids = {"bot_user_id": "", "bot_message_id": "", "bot_conversation_id": ""}
    assert reply_problems("text", payload, ids, max_id_length=256, max_payload_depth=32) == []
    (bad,) = reply_problems("text", payload, ids, max_id_length=20_000, max_payload_depth=32)
    assert bad.field == "payload" and "4 MiB" in bad.reason


@pytest.mark.parametrize(
    "payload",
    [
        [{}] * 1000,  # parsed, ~24 times its JSON
        ["a"] * 1000,
        [0.5] * 1000,
        [[]] * 1000,
        {f"k{i}": i for i in range(1000)},
        "x" * 10_000,
        {"text": ",".join(["a:b", "[c]", "{d}"] * 10_000)},  # separators inside a string
    ],
)
def test_the_queue_size_estimate_is_on_the_safe_side_and_not_far_off(payload: object) -> None:
    """max_pending_bytes is memory: the estimate must not fall below what the parsed message
    holds (tracemalloc), nor overstate it enough to starve the queue (a comma-heavy text
    was once counted at ~60 times its size)."""
    raw = orjson.dumps(payload)
    tracemalloc.start()
    try:
        parsed = orjson.loads(raw)
        held = tracemalloc.get_traced_memory()[0]
    finally:
        tracemalloc.stop()
    message = InboundMessage("u", "m", "c", "text", "", parsed)
    assert held <= queued_size(message) <= 3 * max(held, len(raw))
