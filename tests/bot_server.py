"""A real HTTP bot for tests: records requests, answers with whatever its handler returns."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from typing import Any

import orjson
from aiohttp import web

Handler = Callable[[Any], Awaitable[tuple[int, Any]]]


class BotServer:
    """``async with BotServer(handler) as bot``: bot.url, bot.requests (headers, body)."""

    def __init__(self, handler: Handler, path: str = "/bot") -> None:
        self.handler = handler
        self.path = path
        self.requests: list[tuple[dict[str, str], Any]] = []
        self.port = 0
        self._runner: web.AppRunner | None = None
        self._changed = asyncio.Condition()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}{self.path}"

    async def __aenter__(self) -> BotServer:
        app = web.Application()
        app.router.add_post(self.path, self._handle)
        self._runner = web.AppRunner(app, access_log=None, shutdown_timeout=0.1)
        await self._runner.setup()
        await web.TCPSite(self._runner, "127.0.0.1", self.port).start()
        self.port = int(self._runner.addresses[0][1])
        return self

    async def __aexit__(self, *exc: object) -> None:
        if self._runner is not None:
            await self._runner.cleanup()

    async def _handle(self, request: web.Request) -> web.Response:
        body = orjson.loads(await request.read())
        async with self._changed:
            self.requests.append((dict(request.headers), body))
            self._changed.notify_all()
        status, answer = await self.handler(body)
        data = b"" if answer is None else orjson.dumps(answer)
        return web.Response(status=status, body=data, content_type="application/json")

    async def wait_for(self, count: int, timeout: float = 10.0) -> None:
        async with asyncio.timeout(timeout), self._changed:
            await self._changed.wait_for(lambda: len(self.requests) >= count)
