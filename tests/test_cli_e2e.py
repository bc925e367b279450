"""`sidecar send` and `sidecar tail` against a real `sidecar serve` subprocess, over gRPC and HTTP."""

from __future__ import annotations

import json
import selectors
import signal
import subprocess
import sys
import time
import urllib.request
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.procs import SidecarProcess, clean_env

TOKEN = "e2e-token"


class Server(SidecarProcess):
    """`python -m sidecar serve` on free loopback ports with the given store; start() waits for /readyz."""

    def __init__(self, tmp: Path, store: str, **env: str) -> None:
        super().__init__(tmp, SIDECAR_STORE=store, SIDECAR_STORE_SYNC="normal", **env)

    @property
    def grpc(self) -> str:
        return self.grpc_target

    @property
    def webhook(self) -> str:
        return f"{self.http}/webhook"

    def stop(self) -> int:
        """SIGTERM and wait; a sidecar that does not stop is killed and fails the test."""
        assert self.proc is not None
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        try:
            return self.proc.wait(30)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            raise AssertionError(f"serve did not stop on SIGTERM:\n{self.log()}") from None


def cli(*args: str, token: str | None = TOKEN, timeout: float = 30) -> subprocess.CompletedProcess[str]:
    env = clean_env(**({"SIDECAR_TOKEN": token} if token else {}))
    return subprocess.run(
        [sys.executable, "-m", "sidecar", *args], env=env, capture_output=True, text=True, timeout=timeout, check=False
    )


def send(server: Server, *args: str, http: bool = False, token: str | None = TOKEN) -> dict[str, Any]:
    where = ("--http", server.webhook) if http else ("--grpc", server.grpc)
    result = cli("send", *where, "--user", "u1", *args, token=token)
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert len(lines) == 1
    answer: dict[str, Any] = json.loads(lines[0])
    return answer


def tail_lines(proc: subprocess.Popen[str], count: int, timeout: float = 20.0) -> list[dict[str, Any]]:
    """Read `count` JSON lines from a running `sidecar tail`, failing at the deadline."""
    assert proc.stdout is not None
    out: list[dict[str, Any]] = []
    deadline = time.monotonic() + timeout
    with selectors.DefaultSelector() as selector:
        selector.register(proc.stdout, selectors.EVENT_READ)
        while len(out) < count:
            remaining = deadline - time.monotonic()
            if remaining <= 0 or not selector.select(remaining):
                raise AssertionError(f"got {len(out)} of {count} replies within {timeout}s")
            line = proc.stdout.readline()
            if not line:
                raise AssertionError(f"tail exited with {proc.wait()}: {proc.stderr.read() if proc.stderr else ''}")
            out.append(json.loads(line))
    return out


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    running = Server(tmp_path_factory.mktemp("e2e"), "memory://", SIDECAR_AUTH_TOKENS=TOKEN).start()
    yield running
    running.stop()


def conversation() -> str:
    return f"conv-{uuid.uuid4()}"


def test_send_over_grpc_prints_the_answer_and_a_repeat_is_a_duplicate(server: Server) -> None:
    conv = conversation()
    first = send(server, "--conversation", conv, "--message-id", "m1", "--text", "hi")
    assert first == {"messageId": "m1", "conversationId": conv, "duplicate": False}
    again = send(server, "--conversation", conv, "--message-id", "m1", "--text", "hi")
    assert again["duplicate"] is True


def test_send_over_http_prints_the_messaging_api_answer(server: Server) -> None:
    conv = conversation()
    answer = send(server, "--conversation", conv, "--message-id", "m1", "--text", "hi", http=True)
    assert answer["messageId"] == "m1"
    assert answer["conversationId"] == conv
    assert answer["duplicate"] is False
    assert {"message", "user", "conversation"} <= answer.keys()


def test_the_same_message_over_http_then_grpc_is_one_message(server: Server) -> None:
    conv = conversation()
    payload = '{"text": "hi", "n": [1, 2.5, null, true]}'
    send(server, "--conversation", conv, "--message-id", "m1", "--text", "hi", "--payload", payload, http=True)
    answer = send(server, "--conversation", conv, "--message-id", "m1", "--text", "hi", "--payload", payload)
    assert answer["duplicate"] is True


def test_send_without_a_message_id_makes_a_new_one_each_time(server: Server) -> None:
    conv = conversation()
    first = send(server, "--conversation", conv, "--text", "a")
    second = send(server, "--conversation", conv, "--text", "a")
    assert first["messageId"] != second["messageId"]
    assert uuid.UUID(first["messageId"]).version == 4


def test_tail_after_0_prints_the_bot_reply_as_one_json_line(server: Server) -> None:
    conv = conversation()
    send(server, "--conversation", conv, "--message-id", "m1", "--text", "hello")
    result = cli("tail", conv, "--grpc", server.grpc, "--after", "0", "--max-replies", "1")
    assert result.returncode == 0, result.stderr
    (line,) = result.stdout.splitlines()
    reply = json.loads(line)
    assert reply["conversationId"] == conv
    assert reply["sequence"] == 1
    assert reply["type"] == "text"
    assert reply["payload"] == {"text": "hello"}
    assert reply["userId"] == "u1"
    assert reply["inReplyTo"] == "m1"
    assert reply["createdAt"].endswith("Z")
    assert {"botUserId", "botMessageId", "botConversationId"} <= reply.keys()


def test_wrong_token_is_refused_by_send_over_both_protocols_and_is_fatal_for_tail(server: Server) -> None:
    conv = conversation()
    grpc_send = cli("send", "--grpc", server.grpc, "--user", "u", "--conversation", conv, token="wrong")
    assert grpc_send.returncode == 1
    assert "UNAUTHENTICATED" in grpc_send.stderr
    http_send = cli("send", "--http", server.webhook, "--user", "u", "--conversation", conv, token=None)
    assert http_send.returncode == 1
    assert "HTTP 401" in http_send.stderr
    tail = cli("tail", conv, "--grpc", server.grpc, token="wrong")
    assert tail.returncode == 1
    assert "UNAUTHENTICATED" in tail.stderr


def test_send_reports_a_refused_message_with_its_field(server: Server) -> None:
    result = cli("send", "--grpc", server.grpc, "--user", "u", "--conversation", "c" * 1000)
    assert result.returncode == 1
    assert "INVALID_ARGUMENT" in result.stderr
    assert "conversation" in result.stderr


def test_tail_resumes_after_a_restart_from_the_last_sequence_printed(tmp_path: Path) -> None:
    # Replies must survive the restart, so this needs the durable store.
    pytest.importorskip("sidecar.store.sqlite", reason="the SQLite store has not landed yet")
    server = Server(tmp_path, f"sqlite:///{tmp_path}/sidecar.db", SIDECAR_AUTH_TOKENS=TOKEN).start()
    conv = conversation()
    send(server, "--conversation", conv, "--message-id", "m1", "--text", "one")
    tail = subprocess.Popen(
        [sys.executable, "-m", "sidecar", "tail", conv, "--grpc", server.grpc, "--after", "0", "--max-replies", "3"],
        env=clean_env(SIDECAR_TOKEN=TOKEN),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        assert [r["sequence"] for r in tail_lines(tail, 1)] == [1]
        assert server.stop() == 0
        # Same ports, same file: what a restarted pod looks like to the client.
        server.start()
        send(server, "--conversation", conv, "--message-id", "m2", "--text", "two")
        send(server, "--conversation", conv, "--message-id", "m3", "--text", "three")
        replies = tail_lines(tail, 2)
        assert tail.wait(10) == 0
        stderr = tail.stderr.read() if tail.stderr else ""
    finally:
        if tail.poll() is None:
            tail.kill()
        tail.communicate()
        server.stop()
    assert [(r["sequence"], r["payload"]) for r in replies] == [(2, {"text": "two"}), (3, {"text": "three"})]
    assert "reconnecting" in stderr


def test_live_only_tail_misses_nothing_across_a_restart_before_its_first_reply(tmp_path: Path) -> None:
    """Without --after, tail still has a cursor from the start: the one the stream names
    in its headers. A reply committed while it reconnects is printed, not skipped."""
    server = Server(tmp_path, f"sqlite:///{tmp_path}/sidecar.db", SIDECAR_AUTH_TOKENS=TOKEN).start()
    conv = conversation()
    send(server, "--conversation", conv, "--message-id", "m0", "--text", "before")  # sequence 1
    tail = subprocess.Popen(
        [sys.executable, "-m", "sidecar", "tail", conv, "--grpc", server.grpc, "--max-replies", "2"],
        env=clean_env(SIDECAR_TOKEN=TOKEN),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        deadline = time.monotonic() + 20
        while _streams(server) < 1:  # subscribed, live only, nothing printed yet
            assert time.monotonic() < deadline, "tail never subscribed"
            time.sleep(0.05)
        assert server.stop() == 0
        server.start()
        send(server, "--conversation", conv, "--message-id", "m1", "--text", "one")  # before tail is back
        send(server, "--conversation", conv, "--message-id", "m2", "--text", "two")
        replies = tail_lines(tail, 2)
        assert tail.wait(10) == 0
    finally:
        if tail.poll() is None:
            tail.kill()
        tail.communicate()
        server.stop()
    assert [(r["sequence"], r["payload"]) for r in replies] == [(2, {"text": "one"}), (3, {"text": "two"})]


def _streams(server: Server) -> int:
    with urllib.request.urlopen(f"http://127.0.0.1:{server.admin_port}/readyz", timeout=5) as r:
        return int(json.load(r)["details"]["streams"])
