"""What the tests' HTTP servers share: one POST route on 127.0.0.1, started and stopped by ``async with``."""

from __future__ import annotations

from typing import Self

from aiohttp import web


class LocalServer:
    """Serves ``handle`` for POST ``path`` on 127.0.0.1: on ``port`` if set (a restart on the
    same address), else on a free one; ``url`` is where to reach it."""

    def __init__(self, path: str) -> None:
        self.path = path
        self.port = 0
        self._runner: web.AppRunner | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}{self.path}"

    async def handle(self, request: web.Request) -> web.StreamResponse:
        raise NotImplementedError

    async def __aenter__(self) -> Self:
        app = web.Application()
        app.router.add_post(self.path, self.handle)
        self._runner = web.AppRunner(app, access_log=None, shutdown_timeout=0.1)
        await self._runner.setup()
        await web.TCPSite(self._runner, "127.0.0.1", self.port).start()
        self.port = int(self._runner.addresses[0][1])
        return self

    async def __aexit__(self, *exc: object) -> None:
        if self._runner is not None:
            await self._runner.cleanup()
