"""A real HTTP receiver for webhook tests: records every POST, answers as scripted per conversation."""

from __future__ import annotations

import asyncio
import collections
from dataclasses import dataclass, field
from typing import Any

import orjson
from aiohttp import web

from tests.local_server import LocalServer


@dataclass
class Received:
    headers: dict[str, str]
    raw: bytes
    body: Any
    status: int


@dataclass
class Script:
    """Answers for one conversation, consumed in order; then ``then`` for ever.

    A status of 0 means: never answer (until the receiver closes), like a
    receiver too slow for the sender's timeout.
    """

    statuses: collections.deque[int] = field(default_factory=collections.deque)
    then: int = 200
    retry_after: str | None = None
    hang: bool = False
    delay: float = 0.0  # seconds to wait before each answer


class Receiver(LocalServer):
    """``async with Receiver() as r``: r.url to POST to, r.requests, r.wait_for(n)."""

    def __init__(self, path: str = "/replies") -> None:
        super().__init__(path)
        self.requests: list[Received] = []
        self.scripts: dict[str, Script] = {}
        self._changed = asyncio.Condition()
        self._release = asyncio.Event()

    def script(self, conversation_id: str, *statuses: int, then: int = 200, retry_after: str | None = None,
               hang: bool = False, delay: float = 0.0) -> None:  # fmt: skip
        self.scripts[conversation_id] = Script(collections.deque(statuses), then, retry_after, hang, delay)

    async def __aexit__(self, *exc: object) -> None:
        self._release.set()  # hanging answers end, so that the server can stop
        await super().__aexit__(*exc)

    async def handle(self, request: web.Request) -> web.Response:
        raw = await request.read()
        body = orjson.loads(raw) if raw else None
        conversation = body.get("conversationId", "") if isinstance(body, dict) else ""
        script = self.scripts.get(conversation)
        status = 200
        headers = {}
        if script is not None:
            status = script.statuses.popleft() if script.statuses else script.then
            if script.hang or status == 0:
                await self._release.wait()
            await asyncio.sleep(script.delay)
            if script.retry_after and status != 200:
                headers["Retry-After"] = script.retry_after
        async with self._changed:
            self.requests.append(Received(dict(request.headers), raw, body, status))
            self._changed.notify_all()
        return web.Response(status=status, headers=headers)

    def delivered(self, conversation_id: str | None = None) -> list[Any]:
        """Bodies answered 2xx, in arrival order."""
        return [
            r.body
            for r in self.requests
            if 200 <= r.status < 300 and (conversation_id is None or r.body.get("conversationId") == conversation_id)
        ]

    async def wait_for(self, count: int, *, conversation_id: str | None = None, ok: bool = True,
                       timeout: float = 10.0) -> list[Received]:  # fmt: skip
        """Wait until ``count`` requests (2xx ones with ok) arrived for the conversation."""

        def matching() -> list[Received]:
            return [
                r
                for r in self.requests
                if (not ok or 200 <= r.status < 300)
                and (
                    conversation_id is None
                    or (isinstance(r.body, dict) and r.body.get("conversationId") == conversation_id)
                )
            ]

        async with asyncio.timeout(timeout), self._changed:
            await self._changed.wait_for(lambda: len(matching()) >= count)
        return matching()
