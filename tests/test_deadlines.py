"""Deadlines: the bot call's time limit, checked by one task instead of a timer per call."""

from __future__ import annotations

import asyncio
import time

import pytest

from sidecar.deadlines import Deadlines


async def test_a_block_past_its_limit_raises_timeout_and_the_task_goes_on() -> None:
    deadlines = Deadlines(0.2)
    deadlines.start()
    try:
        started = time.monotonic()
        with pytest.raises(TimeoutError), deadlines.limit():
            await asyncio.sleep(30)
        assert time.monotonic() - started >= 0.2  # not before its limit
        await asyncio.sleep(0.01)  # no cancellation left behind for the task's next await
        with deadlines.limit():  # and the next block has its full limit again
            await asyncio.sleep(0.01)
    finally:
        await deadlines.stop()


async def test_someone_elses_cancellation_stays_a_cancellation() -> None:
    deadlines = Deadlines(0.2)
    deadlines.start()

    async def call() -> None:
        with deadlines.limit():
            await asyncio.sleep(30)

    try:
        task = asyncio.create_task(call())
        await asyncio.sleep(0.05)
        task.cancel()  # a drain, say: before the limit
        with pytest.raises(asyncio.CancelledError):
            await task
    finally:
        await deadlines.stop()


async def test_a_block_that_ends_in_time_or_never_waits_is_left_alone() -> None:
    deadlines = Deadlines(0.1)
    deadlines.start()
    try:
        for _ in range(3):
            with deadlines.limit():
                await asyncio.sleep(0.04)
        with deadlines.limit():
            time.sleep(0.15)  # noqa: ASYNC251 - past its limit, but never waiting: nothing could cut it
        await asyncio.sleep(0.1)  # and no cancellation arrives afterwards
    finally:
        await deadlines.stop()
