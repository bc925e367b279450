"""The Redis store end to end: a real sidecar on redis://, restarted on the same key prefix."""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator

import pytest

from sidecar.config import redact_url
from sidecar.store.redis import RedisStore, RedisStoreError
from tests.conftest import StartApp, message
from tests.test_store_contract import delete_prefix, open_redis_or_skip, redis_url
from tests.test_streams import read_n, subscribe


@pytest.fixture
async def prefixed_url() -> AsyncIterator[str]:
    """A REDIS_URL with a fresh key prefix (skip without Redis, fail in CI); its keys are deleted after."""
    url = redis_url(f"test-{uuid.uuid4().hex}:")
    store = RedisStore(url)
    await open_redis_or_skip(store)
    try:
        yield url
    finally:
        await delete_prefix(store)
        await store.close()


async def test_messages_and_replies_survive_a_restart_on_the_same_prefix(
    start_app: StartApp, prefixed_url: str
) -> None:
    s = await start_app(store=prefixed_url)
    call = subscribe(s, after=0)
    resp = await s.post(message(text="ping"))
    assert resp.status == 200
    assert (await resp.json())["duplicate"] is False
    (reply,) = await read_n(call, 1)
    call.cancel()
    assert reply.sequence == 1 and reply.payload.struct_value.fields["text"].string_value == "ping"
    await s.app.drain(0.5)
    await s.app.stop()

    again = await start_app(store=prefixed_url)
    resp = await again.post(message(text="ping"))
    assert resp.status == 200
    assert (await resp.json())["duplicate"] is True
    call = subscribe(again, after=0)
    (replayed,) = await read_n(call, 1)
    call.cancel()
    assert replayed.sequence == 1 and replayed.payload.struct_value.fields["text"].string_value == "ping"
    assert await again.app.store.last_sequence("c1") == 1  # the duplicate ran no bot


async def test_an_unreachable_server_is_a_clear_error_without_the_password() -> None:
    store = RedisStore("redis://:hunter2@127.0.0.1:1/0?prefix=x:")
    with pytest.raises(RedisStoreError, match=r"SIDECAR_STORE.*cannot connect") as e:
        await store.open()
    assert "hunter2" not in str(e.value) and "***" in str(e.value)
    await store.close()
    assert redact_url("redis://user:pw@h:1/2") == "redis://user:***@h:1/2"
