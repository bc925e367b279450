"""A real HTTP server whose answers are written in chunks, with pauses: for the clients' body limits."""

from __future__ import annotations

import asyncio
from collections.abc import Sequence

from aiohttp import web

from tests.local_server import LocalServer


class StreamingServer(LocalServer):
    """``async with StreamingServer(chunks, pause) as s``: every POST to ``s.url`` is answered
    200 with ``chunks`` written one by one, ``pause`` seconds apart, without a Content-Length."""

    def __init__(self, chunks: Sequence[bytes], pause: float = 0.0, headers: dict[str, str] | None = None) -> None:
        super().__init__("/")
        self.chunks = chunks
        self.pause = pause
        self.headers = headers or {}
        self.posts = 0

    async def handle(self, request: web.Request) -> web.StreamResponse:
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
