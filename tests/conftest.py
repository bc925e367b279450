"""Shared fixtures: a real sidecar in-process on port 0, and clients for it."""

from __future__ import annotations

import asyncio
import inspect
import os
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import replace
from pathlib import Path
from typing import Any

import aiohttp
import grpc
import pytest
from hypothesis import settings

from sidecar.app import App
from sidecar.config import Config, validate
from sidecar.v1 import sidecar_pb2_grpc

settings.register_profile("default", max_examples=200, deadline=None)
settings.register_profile("fuzz", max_examples=20_000, deadline=None)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "default"))


def make_config(tmp_path: Path, **overrides: Any) -> Config:
    """A config on free loopback ports with a SQLite file under tmp_path."""
    base = replace(
        Config(),
        http_addr="127.0.0.1:0",
        grpc_addr="127.0.0.1:0",
        admin_addr="127.0.0.1:0",
        # SIDECAR_TEST_STORE runs the whole suite against another store (e.g. memory://).
        store=os.environ.get("SIDECAR_TEST_STORE") or f"sqlite:///{tmp_path}/sidecar.db",
        store_sync="normal",
        check_response_url=False,
        webhook_backoff_initial=0.01,
        webhook_backoff_max=0.05,
        bot_backoff_initial=0.01,
        bot_backoff_max=0.05,
    )
    config = replace(base, **overrides)
    validate(config)
    return config


class Running:
    """A started App plus ready-made clients."""

    def __init__(self, app: App, session: aiohttp.ClientSession, channel: grpc.aio.Channel) -> None:
        self.app = app
        self.session = session
        self.channel = channel
        self.stub = sidecar_pb2_grpc.MessagingServiceStub(channel)

    @property
    def http(self) -> str:
        return f"http://127.0.0.1:{self.app.http_port}"

    @property
    def admin(self) -> str:
        return f"http://127.0.0.1:{self.app.admin_port}"

    async def post(self, body: Any, *, token: str | None = None, path: str | None = None) -> aiohttp.ClientResponse:
        headers = {"Authorization": f"Bearer {token}"} if token else {}
        url = self.http + (path or self.app.config.webhook_path)
        async with self.session.post(url, json=body, headers=headers) as resp:
            await resp.read()
            return resp


StartApp = Callable[..., Awaitable[Running]]


@pytest.fixture
async def start_app(tmp_path: Path) -> AsyncIterator[StartApp]:
    """Start sidecars with config overrides; all are drained and stopped at teardown."""
    started: list[Running] = []

    async def start(**overrides: Any) -> Running:
        app = App(make_config(tmp_path, **overrides))
        try:
            await app.start()
        except BaseException:
            await app.stop()
            raise
        session = aiohttp.ClientSession()
        channel = grpc.aio.insecure_channel(f"127.0.0.1:{app.grpc_port}")
        running = Running(app, session, channel)
        started.append(running)
        return running

    yield start
    for running in started:
        await running.channel.close()
        await running.session.close()
        await running.app.drain(0.5)
        await running.app.stop()


async def admin_metrics(s: Running) -> str:
    """The Prometheus text the admin port serves."""
    async with aiohttp.ClientSession() as session, session.get(s.admin + "/metrics") as resp:
        return await resp.text()


async def metric(s: Running, name: str) -> float:
    """The value of one unlabelled metric."""
    (line,) = [x for x in (await admin_metrics(s)).splitlines() if x.startswith(name + " ")]
    return float(line.split()[1])


async def eventually(probe: Callable[[], Any], timeout: float = 10.0, what: str = "condition") -> Any:
    """Poll a probe (sync or async) until it returns something truthy, with a deadline (for state with no event)."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while True:
        result = probe()
        if inspect.isawaitable(result):
            result = await result
        if result:
            return result
        if loop.time() > deadline:
            raise AssertionError(f"{what} not reached within {timeout}s")
        await asyncio.sleep(0.01)


def message(conversation: str = "c1", message_id: str = "m1", text: str = "hello", **extra: Any) -> dict[str, Any]:
    """A valid SPEC §2 body."""
    body = {
        "userId": "u1",
        "messageId": message_id,
        "conversationId": conversation,
        "type": "text",
        "text": text,
        "payload": {"text": text},
    }
    body.update(extra)
    return body
