"""Sidecar ids: the fast formatting must stay byte-for-byte uuid5, or ids change across upgrades."""

from __future__ import annotations

import uuid

from hypothesis import given
from hypothesis import strategies as st

from sidecar.models import _NAMESPACE, entity_id, sidecar_id


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
