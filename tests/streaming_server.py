"""A real HTTP server whose answers are written in chunks, with pauses: for the clients' body limits."""

from __future__ import annotations

import asyncio
from collections.abc import Sequence

from aiohttp import web


class StreamingServer:
    """``async with StreamingServer(chunks, pause) as s``: every POST to ``s.url`` is answered
    200 with ``chunks`` written one by one, ``pause`` seconds apart, without a Content-Length."""

    def __init__(self, chunks: Sequence[bytes], pause: float = 0.0, headers: dict[str, str] | None = None) -> None:
        self.chunks = chunks
        self.pause = pause
        self.headers = headers or {}
        self.posts = 0
        self.port = 0
        self._runner: web.AppRunner | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}/"

    async def __aenter__(self) -> StreamingServer:
        app = web.Application()
        app.router.add_post("/", self._handle)
        self._runner = web.AppRunner(app, access_log=None, shutdown_timeout=0.1)
        await self._runner.setup()
        await web.TCPSite(self._runner, "127.0.0.1", 0).start()
        self.port = int(self._runner.addresses[0][1])
        return self

    async def __aexit__(self, *exc: object) -> None:
        if self._runner is not None:
            await self._runner.cleanup()

    async def _handle(self, request: web.Request) -> web.StreamResponse:
        await request.read()
        self.posts += 1
        resp = web.StreamResponse(status=200, headers={"Content-Type": "application/json", **self.headers})
        await resp.prepare(request)
        try:
            for i, chunk in enumerate(self.chunks):
                if i and self.pause:
                    await asyncio.sleep(self.pause)
                await resp.write(chunk)
            await resp.write_eof()
        except ConnectionError:
            pass  # the client stopped reading: what the limit tests want
        return resp
