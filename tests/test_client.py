"""`sidecar tail`'s client logic against grpc_testing's channel double: the test plays
the server, call by call, so reconnects and cursors are exact and need no timing."""

from __future__ import annotations

import contextlib
import io
import json
import threading
import time
from collections.abc import Iterator
from typing import Any

import grpc
import grpc_testing
import pytest

from sidecar import client
from sidecar.v1 import sidecar_pb2

SERVICE = sidecar_pb2.DESCRIPTOR.services_by_name["MessagingService"]
SUBSCRIBE = SERVICE.methods_by_name["Subscribe"]


class Tail:
    """client.tail in a thread, on a grpc_testing channel the test answers."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch, **options: Any) -> None:
        self.channel = grpc_testing.channel([SERVICE], grpc_testing.strict_real_time())

        @contextlib.contextmanager
        def channel(_tls: client.Tls, _target: str, _options: Any = None) -> Iterator[grpc.Channel]:
            yield self.channel

        monkeypatch.setattr(client.Tls, "channel", channel)
        self.out, self.err = io.StringIO(), io.StringIO()
        self.slept: list[float] = []
        opts = client.TailOptions(target="sidecar:50051", token="t0k", conversation_id="c1", **options)
        self.code: int | None = None
        self._thread = threading.Thread(target=self._run, args=(opts,), daemon=True)
        self._thread.start()

    def _run(self, options: client.TailOptions) -> None:
        self.code = client.tail(options, self.out, self.err, sleep=self.slept.append)

    def subscribe(self) -> tuple[Any, Any, Any]:
        """The next Subscribe call: (metadata, request, the RPC to play the server with)."""
        metadata, request, rpc = self.channel.take_unary_stream(SUBSCRIBE)
        return metadata, request, rpc

    def wait(self) -> int:
        self._thread.join(10)
        assert self.code is not None, "tail did not end"
        return self.code

    def printed(self, count: int) -> None:
        """Until ``count`` replies are printed (the double would otherwise let a status
        overtake the replies sent before it, which a real server never does)."""
        deadline = time.monotonic() + 10
        while len(self.sequences()) < count:
            assert time.monotonic() < deadline, f"tail printed {self.sequences()}"
            time.sleep(0.01)

    def sequences(self) -> list[int]:
        return [json.loads(line)["sequence"] for line in self.out.getvalue().splitlines()]


def reply(sequence: int) -> sidecar_pb2.Reply:
    return sidecar_pb2.Reply(conversation_id="c1", sequence=sequence, type="text")


def test_a_live_only_tail_resumes_from_the_cursor_its_first_stream_named(monkeypatch: pytest.MonkeyPatch) -> None:
    tail = Tail(monkeypatch, after=None, max_replies=2)
    metadata, request, rpc = tail.subscribe()
    assert not request.HasField("after_sequence") and ("authorization", "Bearer t0k") in metadata
    rpc.send_initial_metadata((("sidecar-after-sequence", "5"),))
    rpc.terminate((), grpc.StatusCode.UNAVAILABLE, "the sidecar is shutting down")  # before any reply
    _, request, rpc = tail.subscribe()
    assert request.after_sequence == 5  # not live-only again: replies 6.. committed meanwhile are not lost
    for sequence in (6, 7):
        rpc.send_response(reply(sequence))
    assert tail.wait() == 0 and tail.sequences() == [6, 7]
    assert tail.slept == [client.BACKOFF_INITIAL] and "after sequence 5" in tail.err.getvalue()


def test_a_reply_seen_before_a_reconnect_is_not_printed_twice(monkeypatch: pytest.MonkeyPatch) -> None:
    tail = Tail(monkeypatch, after=0, max_replies=3)
    _, request, rpc = tail.subscribe()
    rpc.send_initial_metadata((("sidecar-after-sequence", "0"),))
    rpc.send_response(reply(1))
    rpc.send_response(reply(2))
    tail.printed(2)
    rpc.terminate((), grpc.StatusCode.RESOURCE_EXHAUSTED, "too slow")  # cut off: resume from 2
    _, request, rpc = tail.subscribe()
    assert request.after_sequence == 2
    for sequence in (2, 3):  # a server repeating one is not trusted blindly
        rpc.send_response(reply(sequence))
    assert tail.wait() == 0 and tail.sequences() == [1, 2, 3]


def test_a_refused_token_ends_tail_with_the_servers_reason(monkeypatch: pytest.MonkeyPatch) -> None:
    tail = Tail(monkeypatch, after=None)
    _, _, rpc = tail.subscribe()
    rpc.terminate((), grpc.StatusCode.UNAUTHENTICATED, "missing or invalid bearer token")
    assert tail.wait() == 1 and tail.sequences() == []
    assert "UNAUTHENTICATED" in tail.err.getvalue() and not tail.slept
