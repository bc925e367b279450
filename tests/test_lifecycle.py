"""The real process: SIGTERM drains and exits 0; a restart on the same SQLite file loses nothing."""

from __future__ import annotations

import asyncio
import contextlib
import json
import sqlite3
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
import pytest

from sidecar.v1 import sidecar_pb2, sidecar_pb2_grpc
from tests.conftest import message
from tests.procs import SidecarProcess
from tests.test_grpc_ingress import request


@pytest.fixture
def procs(tmp_path: Path) -> Iterator[list[SidecarProcess]]:
    started: list[SidecarProcess] = []
    yield started
    for p in started:
        p.close()


def launch(procs: list[SidecarProcess], tmp_path: Path, **env: str) -> SidecarProcess:
    p = SidecarProcess(tmp_path, **env)
    procs.append(p)
    return p.start()


async def read_sequences(target: str, conversation: str, after: int, count: int) -> list[int]:
    async with grpc.aio.insecure_channel(target) as channel:
        stub = sidecar_pb2_grpc.MessagingServiceStub(channel)
        call = stub.Subscribe(sidecar_pb2.SubscribeRequest(conversation_id=conversation, after_sequence=after))
        out: list[int] = []
        async with asyncio.timeout(15):
            while len(out) < count:
                out.append((await call.read()).sequence)
        call.cancel()
        return out


async def send(target: str, **kw: str) -> sidecar_pb2.SendMessageResponse:
    async with grpc.aio.insecure_channel(target) as channel:
        response: sidecar_pb2.SendMessageResponse = await sidecar_pb2_grpc.MessagingServiceStub(channel).SendMessage(
            request(**kw)
        )
        return response


async def test_sigterm_ends_streams_with_unavailable_and_exits_zero(
    procs: list[SidecarProcess], tmp_path: Path
) -> None:
    p = launch(procs, tmp_path)
    async with grpc.aio.insecure_channel(p.grpc_target) as channel:
        stub = sidecar_pb2_grpc.MessagingServiceStub(channel)
        await stub.SendMessage(request())
        call = stub.Subscribe(sidecar_pb2.SubscribeRequest(conversation_id="c1", after_sequence=0))
        assert (await call.read()).sequence == 1
        code = await asyncio.to_thread(p.terminate)
        with pytest.raises(grpc.aio.AioRpcError) as e:
            await call.read()
    assert e.value.code() == grpc.StatusCode.UNAVAILABLE
    assert code == 0
    assert '"draining"' in p.log() and '"stopped"' in p.log()


async def test_message_accepted_before_a_crash_is_handled_after_restart(
    procs: list[SidecarProcess], tmp_path: Path
) -> None:
    rules = tmp_path / "slow.yaml"
    rules.write_text("rules:\n  - match: {}\n    replies: [{type: text, payload: {text: late}, delay: 60}]\n")
    p = launch(procs, tmp_path, SIDECAR_BOT="script", SIDECAR_BOT_SCRIPT=str(rules), SIDECAR_BOT_TIMEOUT="120")
    answer = await send(p.grpc_target, text="survive")
    assert answer.duplicate is False
    p.kill()  # the bot is still sleeping: nothing but the accepted message is on disk
    p2 = launch(procs, tmp_path)  # same SQLite file, echo bot
    assert await read_sequences(p2.grpc_target, "c1", 0, 1) == [1]
    again = await send(p2.grpc_target, text="survive")
    assert again.duplicate is True


async def test_restart_keeps_replies_sequences_and_deduplication(procs: list[SidecarProcess], tmp_path: Path) -> None:
    p = launch(procs, tmp_path)
    for i in range(3):
        await send(p.grpc_target, message_id=f"m{i}", text=f"t{i}")
    assert await read_sequences(p.grpc_target, "c1", 0, 3) == [1, 2, 3]
    assert await asyncio.to_thread(p.terminate) == 0
    p2 = launch(procs, tmp_path)
    assert (await send(p2.grpc_target, message_id="m1", text="t1")).duplicate is True
    await send(p2.grpc_target, message_id="m3", text="t3")
    assert await read_sequences(p2.grpc_target, "c1", 0, 4) == [1, 2, 3, 4]


async def test_start_fails_with_a_clear_message_when_a_port_is_taken(
    procs: list[SidecarProcess], tmp_path: Path
) -> None:
    p = launch(procs, tmp_path)
    clash = SidecarProcess(tmp_path / "other", SIDECAR_HTTP_ADDR=f"127.0.0.1:{p.http_port}")
    (tmp_path / "other").mkdir()
    procs.append(clash)
    with pytest.raises(AssertionError, match="cannot listen"):
        clash.start(timeout=15)


async def test_a_request_aiohttp_cannot_parse_is_logged_without_its_bytes(
    procs: list[SidecarProcess], tmp_path: Path
) -> None:
    p = launch(procs, tmp_path)
    secret = "s3cr3t-" + "x" * 9000  # past aiohttp's 8190-byte header limit: refused by its parser
    reader, writer = await asyncio.open_connection("127.0.0.1", p.http_port)
    writer.write(
        f"POST /webhook HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {secret}\r\nContent-Length: 2\r\n\r\n{{}}".encode()
    )
    await writer.drain()
    status = await asyncio.wait_for(reader.readline(), 10)
    writer.close()
    assert status.split()[1] == b"400"
    assert await asyncio.to_thread(p.terminate) == 0
    log = p.log()
    assert "malformed HTTP request refused" in log and '"LineTooLong"' in log
    assert "s3cr3t" not in log and "Traceback" not in log


def test_a_second_sidecar_on_the_same_store_file_exits_2(procs: list[SidecarProcess], tmp_path: Path) -> None:
    launch(procs, tmp_path)
    second = SidecarProcess(tmp_path)  # same SQLite file, ports of its own
    procs.append(second)
    with pytest.raises(AssertionError, match="exited with 2"):
        second.start()
    assert "in use by another sidecar" in second.log() and "SIDECAR_STORE" in second.log()


@pytest.mark.parametrize("listener", ["SIDECAR_HTTP_ADDR", "SIDECAR_GRPC_ADDR", "SIDECAR_ADMIN_ADDR"])
def test_a_port_in_use_stops_the_start_with_exit_2(procs: list[SidecarProcess], tmp_path: Path, listener: str) -> None:
    first = launch(procs, tmp_path)
    port = {"SIDECAR_HTTP_ADDR": first.http_port, "SIDECAR_GRPC_ADDR": first.grpc_port,
            "SIDECAR_ADMIN_ADDR": first.admin_port}[listener]  # fmt: skip
    other = tmp_path / "other"
    other.mkdir()
    second = SidecarProcess(other, **{listener: f"127.0.0.1:{port}"})  # a store of its own
    procs.append(second)
    with pytest.raises(AssertionError, match="exited with 2"):
        second.start()
    assert "cannot listen" in second.log() and listener in second.log()


@pytest.mark.parametrize("where", ["not-a-database", "under-a-file", "newer-schema"])
def test_a_sqlite_store_that_cannot_be_opened_exits_2_in_one_line(
    procs: list[SidecarProcess], tmp_path: Path, where: str
) -> None:
    if where == "newer-schema":
        path = tmp_path / "newer.db"
        with contextlib.closing(sqlite3.connect(path)) as conn:
            conn.execute("PRAGMA user_version=999")
    else:
        (tmp_path / "file").write_text("not a database, not a directory")
        path = tmp_path / "file" if where == "not-a-database" else tmp_path / "file" / "sidecar.db"
    p = SidecarProcess(tmp_path, SIDECAR_STORE=f"sqlite:///{path}")
    procs.append(p)
    with pytest.raises(AssertionError, match="exited with 2"):
        p.start()
    log = p.log()
    assert "cannot start" in log and "SIDECAR_STORE" in log and str(path) in log
    assert "Traceback" not in log


def _post(p: SidecarProcess, body: dict[str, Any]) -> int:
    request = urllib.request.Request(
        p.http + "/webhook", data=json.dumps(body).encode(), headers={"Content-Type": "application/json"}
    )
    try:
        with urllib.request.urlopen(request, timeout=10) as r:
            return int(r.status)
    except urllib.error.HTTPError as e:
        return int(e.code)


def _readyz(p: SidecarProcess) -> tuple[int, dict[str, Any]]:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{p.admin_port}/readyz", timeout=10) as r:
            return int(r.status), json.loads(r.read())
    except urllib.error.HTTPError as e:
        return int(e.code), json.loads(e.read())


def test_a_store_that_cannot_write_is_not_ready_until_it_can_again(procs: list[SidecarProcess], tmp_path: Path) -> None:
    # A file size limit stands in for a disk filling up: the WAL cannot grow past it.
    p = SidecarProcess(tmp_path)
    procs.append(p)
    p.start(file_size_limit=256 * 1024)
    statuses = []
    for i in range(2000):
        statuses.append(_post(p, message(message_id=f"m{i}", text="x" * 2000)))
        if statuses[-1] != 200:
            break
    assert statuses[-1] == 503 and statuses.count(200) == len(statuses) - 1  # "try again", not 500
    deadline = time.monotonic() + 15  # the store is checked at most once a second
    while (state := _readyz(p))[0] != 503:
        assert time.monotonic() < deadline, "the sidecar stayed ready"
        time.sleep(0.1)
    assert state[1]["details"]["store"] == "unavailable"
    # And it stays so while the disk stays full: a probe of a page may still fit in
    # the WAL's space, so readiness must not come back on its strength alone.
    for _ in range(7):  # longer than any grace a past version gave a failure (5 s)
        time.sleep(1.0)
        assert _readyz(p)[0] == 503
    p.grow_files()  # space freed
    deadline = time.monotonic() + 15
    while _readyz(p)[0] != 200:
        assert time.monotonic() < deadline, "the sidecar did not become ready again"
        time.sleep(0.1)
    assert _post(p, message(message_id="after")) == 200
    log = p.log()
    assert "sqlite transaction failed" in log and "Traceback" not in log


def test_a_misspelt_variable_is_named_at_start_and_its_value_is_not(
    procs: list[SidecarProcess], tmp_path: Path
) -> None:
    p = launch(procs, tmp_path, SIDECAR_DRAIN_TIMEOUTS="99.5", SIDECAR_SERVICE_HOST="10.9.8.7")
    assert p.terminate() == 0
    (line,) = [json.loads(x) for x in p.log().splitlines() if "unknown SIDECAR_" in x]
    assert line["level"] == "WARNING" and line["variables"] == ["SIDECAR_DRAIN_TIMEOUTS"]
    assert "99.5" not in p.log() and "10.9.8.7" not in p.log()
