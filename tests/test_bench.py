"""The benchmark's store settings (each run gets a store of its own and leaves nothing behind in
Redis), and bench.core runs."""

from __future__ import annotations

import asyncio
import shutil
import subprocess
import sys
import uuid
from pathlib import Path

import pytest

from bench.__main__ import forget_redis_keys, store_url
from sidecar.store.redis import RedisStore, parse_url
from tests.test_store_contract import REDIS_URL, open_redis_or_skip


def test_default_store_is_a_fresh_sqlite_file_per_sidecar(tmp_path: Path) -> None:
    assert store_url("sqlite", tmp_path, "ingest") == f"sqlite:///{tmp_path}/ingest.db"
    assert store_url("memory://", tmp_path, "ingest") == "memory://"


def test_redis_store_gets_a_prefix_per_run_and_sidecar(tmp_path: Path) -> None:
    url = store_url("redis://127.0.0.1:6379/2?socket_timeout=5", tmp_path, "webhook")
    plain, prefix = parse_url(url)
    assert plain == "redis://127.0.0.1:6379/2?socket_timeout=5"
    assert prefix == f"bench-{tmp_path.name}-webhook:"


async def test_forgetting_a_run_deletes_its_keys_and_no_others(tmp_path: Path) -> None:
    ours, theirs = f"bench-{uuid.uuid4().hex}-x:", f"other-{uuid.uuid4().hex}:"
    url = f"{REDIS_URL}{'&' if '?' in REDIS_URL else '?'}prefix={ours}"
    store = RedisStore(url)
    await open_redis_or_skip(store)
    client = store._redis()
    try:
        await client.set(ours + "a", 1)
        await client.set(ours + "b", 2)
        await client.set(theirs + "a", 3)
        await asyncio.to_thread(forget_redis_keys, url)  # the bench calls it outside any event loop
        assert await client.exists(ours + "a", ours + "b") == 0
        assert await client.get(theirs + "a") == "3"
    finally:
        await client.delete(theirs + "a")
        await store.close()


def bench(module: str, *args: str, timeout: float) -> list[str]:
    """``python -m bench.MODULE ARGS`` on the memory store: its stdout lines, once it exits 0."""
    done = subprocess.run(
        [sys.executable, "-m", f"bench.{module}", "--store", "memory://", *args],
        capture_output=True, text=True, timeout=timeout, check=False,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-2000:]
    return done.stdout.strip().splitlines()


needs_valgrind = pytest.mark.skipif(
    shutil.which("valgrind") is None, reason="bench.instructions needs valgrind (not a dependency)"
)


# Each test's own limit is a little over its subprocess's, so a slow run fails with the
# subprocess's timeout (and its output), not with pytest-timeout's 60 s default.
@pytest.mark.timeout(90)
def test_core_benchmark_runs_and_reports_cpu_per_message() -> None:
    # Enough messages for the main thread to use a few of the kernel's 10-ms CPU ticks:
    # with 300 (12 ms of work) it sometimes used none and was not listed.
    first, *threads = bench("core", "--count", "5000", timeout=60)
    assert first.startswith("memory: 5000 messages, ") and "µs CPU per message" in first
    assert any(line.strip().startswith("main thread") for line in threads)


@needs_valgrind
@pytest.mark.timeout(330)
def test_instruction_count_runs_and_reports_instructions_per_message() -> None:
    (line,) = bench("instructions", "--count", "50", timeout=300)
    assert line.startswith("memory: ") and "instructions per message" in line
    assert int(line.split()[1].replace(",", "")) > 0


@needs_valgrind
@pytest.mark.timeout(630)
def test_instruction_count_of_whole_servers_runs_beside_the_bare_baseline() -> None:
    sidecar, bare = bench("instructions", "--protocol", "http", "--count", "20", timeout=600)
    assert sidecar.startswith("memory: ") and "through the sidecar over http" in sidecar
    assert bare.startswith("bare http server of make bench: ") and bare.endswith("x")
