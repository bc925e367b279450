"""Time limits for many short calls, checked by one task instead of a timer per call."""

from __future__ import annotations

import asyncio
import contextlib
from types import TracebackType


class Deadlines:
    """``with deadlines.limit():`` raises TimeoutError in the calling task when the block
    runs past ``seconds`` (one limit for every block), like ``async with
    asyncio.timeout(seconds)``. ``start`` and ``stop`` run the watch.

    asyncio.timeout arms an event-loop timer per block: for the bot call every message
    makes, that was ~29,000 instructions a message (bench.instructions, memory store),
    8 % of the core. Here a block costs two dict operations, and one task looks for
    overdue blocks ``checks`` times per limit: a block may run up to a quarter of its
    limit (at most a second) past it. A block that never waits is never cut short.
    """

    def __init__(self, seconds: float, checks: int = 4) -> None:
        self.seconds = seconds
        self._tick = min(1.0, max(0.01, seconds / checks))  # no busy loop for a tiny limit
        self._due: dict[asyncio.Task[object], float] = {}  # a task inside a block -> when it is overdue
        self._cut: set[asyncio.Task[object]] = set()  # cancelled by the watch, not yet out of their block
        self._watch: asyncio.Task[None] | None = None

    def start(self) -> None:
        self._watch = asyncio.create_task(self._run())

    async def stop(self) -> None:
        if self._watch is not None:
            self._watch.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._watch
            self._watch = None

    def limit(self) -> _Limit:
        return _Limit(self)

    async def _run(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            await asyncio.sleep(self._tick)
            now = loop.time()
            for task, due in list(self._due.items()):
                if due <= now and task not in self._cut:
                    self._cut.add(task)
                    task.cancel()


class _Limit:
    __slots__ = ("_cancelling", "_deadlines", "_task")

    def __init__(self, deadlines: Deadlines) -> None:
        self._deadlines = deadlines

    def __enter__(self) -> None:
        task = asyncio.current_task()
        assert task is not None, "a limit is for code running in a task"
        self._task = task
        self._cancelling = task.cancelling()
        self._deadlines._due[task] = asyncio.get_running_loop().time() + self._deadlines.seconds

    def __exit__(
        self, kind: type[BaseException] | None, error: BaseException | None, traceback: TracebackType | None
    ) -> None:
        deadlines, task = self._deadlines, self._task
        del deadlines._due[task]
        if task in deadlines._cut:
            deadlines._cut.discard(task)
            # Ours, not someone else's cancellation (a drain's): as asyncio.timeout does.
            if task.uncancel() <= self._cancelling and kind is asyncio.CancelledError:
                raise TimeoutError from error
