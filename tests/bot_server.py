"""A real HTTP bot for tests: records requests, answers with whatever its handler returns."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from typing import Any

import orjson
from aiohttp import web

from tests.local_server import LocalServer

Handler = Callable[[Any], Awaitable[tuple[int, Any] | web.Response]]
"""Given the request's JSON body: (status, JSON answer), or a whole response (raw body, headers)."""


class BotServer(LocalServer):
    """``async with BotServer(handler) as bot``: bot.url, bot.requests (headers, body)."""

    def __init__(self, handler: Handler, path: str = "/bot") -> None:
        super().__init__(path)
        self.handler = handler
        self.requests: list[tuple[dict[str, str], Any]] = []
        self._changed = asyncio.Condition()

    async def handle(self, request: web.Request) -> web.Response:
        body = orjson.loads(await request.read())
        async with self._changed:
            self.requests.append((dict(request.headers), body))
            self._changed.notify_all()
        result = await self.handler(body)
        if isinstance(result, web.Response):
            return result
        status, answer = result
        data = b"" if answer is None else orjson.dumps(answer)
        return web.Response(status=status, body=data, content_type="application/json")

    async def wait_for(self, count: int, timeout: float = 10.0) -> None:
        async with asyncio.timeout(timeout), self._changed:
            await self._changed.wait_for(lambda: len(self.requests) >= count)
