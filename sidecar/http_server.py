"""Serving the aiohttp apps: aiohttp's runner, plus a deadline for a request's headers
and a cap on open connections."""

from __future__ import annotations

import asyncio
import logging
import ssl
from collections.abc import Callable

from aiohttp import web

log = logging.getLogger(__name__)


class HeaderDeadline(asyncio.Protocol):
    """aiohttp's protocol for one connection, closed if the first request's headers are
    not complete within ``timeout`` seconds.

    aiohttp waits for them without limit: a client sending a header line now and then
    would hold the connection, and a file descriptor, for ever ("slowloris"). Later
    requests on a kept-alive connection fall under aiohttp's own keep-alive timeout.
    Everything else is passed on untouched.
    """

    def __init__(self, inner: asyncio.Protocol, server: HttpServer) -> None:
        self._inner = inner
        self._server = server  # its header timeout, connection cap and count
        self._timer: asyncio.TimerHandle | None = None
        self._tail = b""  # the end of what arrived so far: "\r\n\r\n" may straddle two reads
        self._transport: asyncio.BaseTransport | None = None
        self._admitted = False

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        server = self._server
        if server.connections >= server.max_connections:
            # Past the cap: closed before aiohttp sees it, so it holds no handler or buffer.
            server.refused()
            transport.close()
            return
        self._admitted = True
        server.connections += 1
        self._transport = transport
        self._timer = asyncio.get_running_loop().call_later(server.header_timeout, self._expire)
        self._inner.connection_made(transport)

    def data_received(self, data: bytes) -> None:
        if not self._admitted:
            return
        if self._timer is not None:
            seen = self._tail + data
            if b"\r\n\r\n" in seen:
                self._timer.cancel()
                self._timer = None
            else:
                self._tail = seen[-3:]
        self._inner.data_received(data)

    def eof_received(self) -> bool | None:
        return self._inner.eof_received() if self._admitted else None

    def connection_lost(self, exc: Exception | None) -> None:
        if not self._admitted:
            return
        self._admitted = False
        self._server.connections -= 1
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        self._inner.connection_lost(exc)

    def pause_writing(self) -> None:
        if self._admitted:
            self._inner.pause_writing()

    def resume_writing(self) -> None:
        if self._admitted:
            self._inner.resume_writing()

    def _expire(self) -> None:
        self._timer = None
        log.debug("closing a connection whose request headers did not arrive in time")
        if self._transport is not None:
            self._transport.close()


class HttpServer:
    """One aiohttp app on one address: ``start`` binds (OSError if it cannot), ``stop``
    stops accepting and closes the connections (requests in flight get ``shutdown_timeout``)."""

    def __init__(
        self, app: web.Application, header_timeout: float, max_connections: int, refused: Callable[[], None]
    ) -> None:
        self._runner = web.AppRunner(app, access_log=None, handle_signals=False, shutdown_timeout=1.0)
        self.header_timeout = header_timeout
        self.max_connections = max_connections
        self.refused = refused
        self.connections = 0  # open now: counted by the connections' protocols
        self._server: asyncio.AbstractServer | None = None
        self.port = 0

    async def start(self, host: str, port: int, ssl_context: ssl.SSLContext | None) -> None:
        await self._runner.setup()
        factory = self._runner.server
        assert factory is not None
        self._server = await asyncio.get_running_loop().create_server(
            lambda: HeaderDeadline(factory(), self), host, port, ssl=ssl_context
        )
        self.port = int(self._server.sockets[0].getsockname()[1])

    async def stop(self) -> None:
        if self._server is not None:
            self._server.close()
            self._server = None
        await self._runner.cleanup()
