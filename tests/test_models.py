"""Sidecar ids: the fast formatting must stay byte-for-byte uuid5, or ids change across upgrades."""

from __future__ import annotations

import uuid

from hypothesis import given
from hypothesis import strategies as st

from sidecar.models import _NAMESPACE, entity_id, sidecar_id
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
