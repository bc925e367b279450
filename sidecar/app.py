"""Lifecycle: build the sidecar from config, start its listeners, drain on SIGTERM, stop."""

from __future__ import annotations

import asyncio
import contextlib
import gc
import logging
import signal
import ssl
import time
from collections.abc import Sequence
from pathlib import Path

import grpc
from aiohttp import web
from grpc_health.v1.health import aio as health_aio

from sidecar.admin import AdminApp
from sidecar.auth import TokenChecker
from sidecar.bots import create_bot
from sidecar.config import Config, ConfigError, env_name, is_loopback, split_addr
from sidecar.core import Core
from sidecar.dead_letters import DeadLetters
from sidecar.delivery.webhook import WebhookDelivery
from sidecar.http_server import HttpServer
from sidecar.ingress.grpc import NOT_SERVING, SERVICE_NAME, SERVING, build_server
from sidecar.ingress.http import HttpIngress
from sidecar.models import JSON
from sidecar.observability import Metrics, Throttle, describe_error, setup_logging
from sidecar.store import create_store

log = logging.getLogger(__name__)

# How often gRPC health is brought in line with readiness when nobody asks /readyz
# (a gRPC probe or load balancer reads the health service only).
HEALTH_INTERVAL = 5.0
# The store's readiness write is made at most this often, however often /readyz is asked.
STORE_CHECK_INTERVAL = 1.0
# A readiness write that takes longer than this counts as failed (a hung store is not ready).
STORE_CHECK_TIMEOUT = 5.0


class App:
    """The whole sidecar. Construction opens nothing (it reads only the token file, if
    one is set, so that a bad one fails before any port is bound); ``start`` opens
    everything.

    Tests run it in-process on port 0 and read the bound ports back.
    """

    def __init__(self, config: Config) -> None:
        self.config = config
        self.metrics = Metrics()
        self.store = create_store(config)
        self.bot = create_bot(config, self.metrics)
        self.webhook = WebhookDelivery(config, self.store, self.metrics) if config.response_url else None
        self.core = Core(config, self.store, self.bot, self.metrics, self.webhook)
        self.tokens = TokenChecker(config.auth_tokens, config.auth_tokens_file)
        callback_tokens = TokenChecker(config.callback_tokens)
        self._http = HttpIngress(config, self.core, self.metrics, self.tokens, callback_tokens)
        self._admin = AdminApp(
            self.metrics,
            self.readiness,
            DeadLetters(self.store, self.webhook, self.core),
            TokenChecker(config.admin_tokens),
            config.http_body_timeout,
        )
        self._http_servers: list[HttpServer] = []
        self._grpc: grpc.aio.Server | None = None
        self._health: health_aio.HealthServicer | None = None
        self._health_watch: asyncio.Task[None] | None = None
        self._response_url_check = "not checked"
        self._ping_errors = Throttle()
        self._store_check = asyncio.Lock()
        self._store_checked_at = float("-inf")
        self._store_ok = False
        self._started = False
        self._draining = False
        self.http_port = self.grpc_port = self.admin_port = 0

    async def start(self) -> None:
        c = self.config
        await self.store.open()
        await self.bot.start()
        if self.webhook is not None:
            await self.webhook.start()
        await self.core.start()
        tls = self._ssl_context()
        self.http_port = await self._serve_http(self._http.app(), c.http_addr, "http_addr", tls)
        self.admin_port = await self._serve_http(
            self._admin.app(), c.admin_addr, "admin_addr", tls if c.admin_tls else None
        )
        server, health = build_server(c, self.core, self.metrics, self.tokens)
        host, port = split_addr(c.grpc_addr, "grpc_addr")
        target = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
        try:
            if c.tls_cert_file:
                self.grpc_port = server.add_secure_port(target, self._grpc_credentials())
            else:
                self.grpc_port = server.add_insecure_port(target)
        except RuntimeError:
            # grpc says only that it failed: with TLS, the certificate may be the cause
            # (it takes RSA and ECDSA keys; aiohttp, which loaded them already, takes more).
            also = (
                "; or grpc cannot use the certificate and key (tls_cert_file, SIDECAR_TLS_CERT_FILE:"
                " RSA or ECDSA keys only)"
                if c.tls_cert_file
                else ""
            )
            raise ConfigError(f"grpc_addr (SIDECAR_GRPC_ADDR): cannot listen on {c.grpc_addr}{also}") from None
        await server.start()
        for service in ("", SERVICE_NAME):
            await health.set(service, SERVING)
        self._grpc, self._health = server, health
        self._started = True
        self._health_watch = asyncio.create_task(self._watch_health())
        if self.webhook is not None and c.check_response_url:
            self._response_url_check = await self.webhook.check_response_url()
            level = logging.INFO if self._response_url_check == "ok" else logging.WARNING
            log.log(level, "response URL check", extra={"result": self._response_url_check})
        if not self.tokens.enabled:
            exposed = [a for a in (c.http_addr, c.grpc_addr) if not is_loopback(split_addr(a, "addr")[0])]
            if exposed:  # only with allow_unauthenticated: validate() refuses it otherwise
                log.warning("no auth tokens configured: ingress accepts anyone, beyond loopback", extra={"on": exposed})
            else:
                log.warning("no auth tokens configured: HTTP and gRPC ingress accept anyone on loopback only")
        log.info(
            "sidecar started",
            extra={
                "http_port": self.http_port,
                "grpc_port": self.grpc_port,
                "admin_port": self.admin_port,
                "bot": c.bot,
                "store": c.store.split("://")[0],
                "webhook": bool(c.response_url),
            },
        )

    def _grpc_credentials(self) -> grpc.ServerCredentials:
        key, cert = Path(self.config.tls_key_file).read_bytes(), Path(self.config.tls_cert_file).read_bytes()
        return grpc.ssl_server_credentials([(key, cert)])

    def _ssl_context(self) -> ssl.SSLContext | None:
        if not self.config.tls_cert_file:
            return None
        context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        try:
            context.load_cert_chain(self.config.tls_cert_file, self.config.tls_key_file)
        except (OSError, ssl.SSLError):
            raise ConfigError("tls_cert_file (SIDECAR_TLS_CERT_FILE): cannot load the certificate and key") from None
        return context

    async def _serve_http(
        self, app: web.Application, addr: str, name: str, ssl_context: ssl.SSLContext | None = None
    ) -> int:
        host, port = split_addr(addr, name)
        refused = self.metrics.connections_refused.labels(name.removesuffix("_addr")).inc
        server = HttpServer(app, self.config.http_header_timeout, self.config.http_max_connections, refused)
        self._http_servers.append(server)
        try:
            await server.start(host, port, ssl_context)
        except OSError as e:
            raise ConfigError(f"{name} ({env_name(name)}): cannot listen on {addr}: {e.strerror}") from None
        return server.port

    async def readiness(self) -> tuple[bool, dict[str, JSON]]:
        """Whether the sidecar is ready, with the details /readyz shows; also sets gRPC
        health to the same answer, so that the two can never disagree."""
        details: dict[str, JSON] = {"started": self._started, "draining": self._draining}
        details["store"] = await self._store_state()
        details["pending_messages"] = self.core.pending
        details["streams"] = self.core.streams
        if self.webhook is not None:
            details["response_url"] = self._response_url_check
        ready = self._started and not self._draining and details["store"] == "ok"
        if self._health is not None and not self._draining:
            # gRPC health says what /readyz says: a store that cannot be reached is
            # NOT_SERVING on both. (Draining has already set NOT_SERVING for good.)
            status = SERVING if ready else NOT_SERVING
            for service in ("", SERVICE_NAME):
                await self._health.set(service, status)
        return ready, details

    async def _store_state(self) -> str:
        """ "ok" if the store takes a small write, else "unavailable". The write is made at
        most once per STORE_CHECK_INTERVAL, whoever asks: /readyz needs no token, and a
        client polling it must not turn into a stream of writes."""
        async with self._store_check:  # callers meanwhile wait for this check's answer
            now = time.monotonic()
            if now - self._store_checked_at >= STORE_CHECK_INTERVAL:
                try:
                    # A small write: a store that cannot write is not ready. Bounded: every
                    # caller waits on this lock, the gRPC health watch included.
                    async with asyncio.timeout(STORE_CHECK_TIMEOUT):
                        await self.store.ping()
                    self._store_ok = True
                except Exception as e:  # noqa: BLE001 - any store failure means not ready
                    self._store_ok = False
                    if checks := self._ping_errors.due():
                        log.warning("store check failed", extra={"error": describe_error(e), "checks": checks})
                self._store_checked_at = time.monotonic()
            return "ok" if self._store_ok else "unavailable"

    async def _watch_health(self) -> None:
        """Every HEALTH_INTERVAL: gRPC health from readiness, and the store's backlog gauges
        (read here, not at scrape time: the store is async, a scrape is not)."""
        while True:
            await asyncio.sleep(HEALTH_INTERVAL)
            try:
                ready, _ = await self.readiness()
                if ready:
                    held, owed = await self.store.backlog()
                    self.metrics.dead_letters_held.set(held)
                    self.metrics.webhook_backlog.set(owed)
            except Exception:  # the next round tries again
                log.exception("updating gRPC health and the backlog gauges failed")

    async def drain(self, timeout: float | None = None) -> None:
        """Fail readiness, refuse new work, let work in flight finish within the grace period."""
        budget = self.config.drain_timeout if timeout is None else timeout
        deadline = time.monotonic() + budget
        self._draining = True
        self._stop_health_watch()
        if self._health is not None:
            await self._health.enter_graceful_shutdown()
        await self.core.drain(max(0.0, deadline - time.monotonic()))
        if self.webhook is not None:
            await self.webhook.drain(max(0.0, deadline - time.monotonic()))
        if self._grpc is not None:
            await self._grpc.stop(grace=max(0.0, min(1.0, deadline - time.monotonic())))

    def _stop_health_watch(self) -> None:
        if self._health_watch is not None:
            self._health_watch.cancel()
            self._health_watch = None

    async def stop(self) -> None:
        """Close everything; safe after a failed start and when called twice."""
        self._stop_health_watch()
        # After a failed start nothing drained: lanes resuming recovered messages must
        # not go on against a store about to close (unhandled, they stay pending).
        await self.core.drain(0.0)
        if self._grpc is not None:
            await self._grpc.stop(grace=None)
        for server in reversed(self._http_servers):
            await server.stop()
        self._http_servers.clear()
        if self.webhook is not None:
            await self.webhook.stop()
        with contextlib.suppress(Exception):
            await self.bot.close()
        await self.store.close()


async def serve(config: Config) -> int:
    """Run until SIGTERM or SIGINT, then drain and exit 0.

    A setting found wrong only while starting (the script file, the TLS files, a
    store that cannot be opened, a port that cannot be bound) exits 2, like one
    that validation refuses; anything else that stops the start exits 1."""
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    try:
        app = App(config)
    except ConfigError as e:
        log.error("cannot start", extra={"reason": str(e)})
        return 2
    try:
        await app.start()
    except ConfigError as e:
        log.error("cannot start", extra={"reason": str(e)})
        await app.stop()
        return 2
    except Exception:
        log.exception("cannot start")
        await app.stop()
        return 1
    # What start-up built (modules, descriptors, servers) lives as long as the
    # process: take it out of the collector's sight, so that a full collection
    # under load walks only what requests create instead of pausing the loop
    # (and every commit waiting for the GIL) for ~20 ms each time.
    gc.freeze()
    await stop.wait()
    log.info("draining", extra={"grace_seconds": config.drain_timeout})
    await app.drain()
    await app.stop()
    log.info("stopped")
    return 0


def run(config: Config, unknown: Sequence[str] = ()) -> int:
    """Blocking entry point of ``sidecar serve``; ``unknown``: SIDECAR_* variables no
    setting reads, warned about (a misspelt SIDECAR_DRAIN_TIMEOUTS would otherwise leave
    the default in force without a word)."""
    setup_logging(config.log_format, config.log_level)
    log.info("configuration", extra={"settings": config.redacted()})
    if unknown:
        log.warning("unknown SIDECAR_* variables ignored (misspelt?)", extra={"variables": list(unknown)})
    try:
        import uvloop

        return uvloop.run(serve(config))
    except ImportError:  # pragma: no cover - uvloop is absent on Windows only
        return asyncio.run(serve(config))
