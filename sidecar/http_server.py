"""Serving the aiohttp apps: aiohttp's runner, plus a deadline for a request's headers
and a cap on open connections."""

from __future__ import annotations

import asyncio
import logging
import ssl
from collections.abc import Callable
from typing import Any

import orjson
from aiohttp import http_exceptions, web, web_protocol
from aiohttp.web_request import BaseRequest

from sidecar.errors import Internal, InvalidArgument, PayloadTooLarge, SidecarError, UnsupportedMediaType

log = logging.getLogger(__name__)

# How long an idle kept-alive connection stays open, and so how long a later request
# on it may take to send its headers (aiohttp's own default is 3,630 s). At least the
# header timeout, which bounds the first request's.
KEEPALIVE_TIMEOUT = 75.0


class JsonErrors(web_protocol.RequestHandler):
    """aiohttp's per-connection handler, answering what it refuses before any route
    runs (malformed HTTP, a bad chunk, an unknown Content-Encoding) in the one JSON
    error shape instead of aiohttp's plain text, and without its parser's words."""

    def handle_error(
        self, request: BaseRequest, status: int = 500, exc: BaseException | None = None, message: str | None = None
    ) -> web.StreamResponse:
        super().handle_error(request, status, exc, message)  # logs; raises if an answer already began
        error: SidecarError
        if isinstance(exc, http_exceptions.ContentEncodingError) and "install" in str(exc).lower():
            # A known coding whose decoder is not installed (br, zstd): aiohttp's words
            # for it advise installing a package. A corrupt body is a plain 400 below.
            error = UnsupportedMediaType("the Content-Encoding is not supported (gzip and deflate are)")
        elif status == 413:
            error = PayloadTooLarge("the request is too large")
        elif 400 <= status < 500:
            error = InvalidArgument("the request is not valid HTTP/1.1")
        else:
            error = Internal()
        response = web.Response(
            body=orjson.dumps(error.to_json()), status=error.http_status, content_type="application/json"
        )
        response.force_close()
        return response


class HeaderDeadline(asyncio.Protocol):
    """aiohttp's protocol for one connection, closed if the first request's headers are
    not complete within ``timeout`` seconds.

    aiohttp waits for them without limit: a client sending a header line now and then
    would hold the connection, and a file descriptor, for ever ("slowloris"). Later
    requests on a kept-alive connection fall under the keep-alive timeout
    (KEEPALIVE_TIMEOUT), which aiohttp applies until their headers are complete.
    Everything else is passed on untouched.
    """

    def __init__(self, inner: asyncio.Protocol, server: HttpServer) -> None:
        self._inner = inner
        self._server = server  # its header timeout, connection cap and count
        self._timer: asyncio.TimerHandle | None = None
        self._tail = b""  # the end of what arrived so far: "\r\n\r\n" may straddle two reads
        self._begun = False  # a byte of the request line arrived (not only empty lines)
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
            if not self._begun:
                # Empty lines before the request line are skipped by the parser (RFC 9112
                # 2.2): they are not the end of any headers, and must not stop the clock.
                seen = seen.lstrip(b"\r\n")
                self._begun = bool(seen)
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
        self._runner = web.AppRunner(
            app,
            access_log=None,
            handle_signals=False,
            shutdown_timeout=1.0,
            keepalive_timeout=max(KEEPALIVE_TIMEOUT, header_timeout),
        )
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
        loop = asyncio.get_running_loop()
        # What web.Server.__call__ does, with JsonErrors in place of RequestHandler.
        # _kwargs is private (the handler options AppRunner was given) but has been the
        # same through aiohttp 3.x; the JSON refusal tests fail if a release changes it.
        options: dict[str, Any] = factory._kwargs
        self._server = await loop.create_server(
            lambda: HeaderDeadline(JsonErrors(factory, loop=loop, **options), self), host, port, ssl=ssl_context
        )
        self.port = int(self._server.sockets[0].getsockname()[1])

    async def stop(self) -> None:
        if self._server is not None:
            self._server.close()
            self._server = None
        await self._runner.cleanup()
