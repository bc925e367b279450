"""Every row of the SPEC §2 status table, through a real HTTP socket."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator
from pathlib import Path

import aiohttp
import orjson
import pytest

from sidecar.models import JSON
from sidecar.observability import MalformedRequestFilter
from tests.conftest import StartApp, admin_metrics, message, metric


def assert_error_shape(body: dict[str, object], code: str) -> None:
    error = body["error"]
    assert isinstance(error, dict)
    assert error["code"] == code
    assert isinstance(error["message"], str) and error["message"]
    assert isinstance(error["details"], list)
    text = str(body)
    assert "Traceback" not in text and "/sidecar/" not in text


async def test_accepted_message_answers_200_with_ids_and_integration_objects(start_app: StartApp) -> None:
    s = await start_app()
    resp = await s.post(message())
    assert resp.status == 200
    body = await resp.json()
    assert body["messageId"] == "m1" and body["conversationId"] == "c1" and body["duplicate"] is False
    for name in ("message", "user", "conversation"):
        assert isinstance(body[name]["id"], str) and body[name]["id"]


async def test_repeat_with_same_content_is_a_duplicate_with_the_same_ids(start_app: StartApp) -> None:
    s = await start_app()
    first = await (await s.post(message())).json()
    resp = await s.post(message())
    assert resp.status == 200
    second = await resp.json()
    assert second["duplicate"] is True
    assert second["message"]["id"] == first["message"]["id"]


async def test_repeat_with_other_content_is_409(start_app: StartApp) -> None:
    s = await start_app()
    await s.post(message(text="one"))
    resp = await s.post(message(text="two"))
    assert resp.status == 409
    assert_error_shape(await resp.json(), "conflict")


async def test_readyz_polled_in_a_loop_checks_the_store_once_per_interval(
    start_app: StartApp, monkeypatch: pytest.MonkeyPatch
) -> None:
    """/readyz needs no token: asking it must not become a stream of store writes."""
    monkeypatch.setattr("sidecar.app.STORE_CHECK_INTERVAL", 3600.0)
    s = await start_app()
    real, checks = s.app.store.ping, []

    async def counted() -> None:
        checks.append(1)
        await real()

    monkeypatch.setattr(s.app.store, "ping", counted)
    async with aiohttp.ClientSession() as session:
        for _ in range(50):
            async with session.get(s.admin + "/readyz") as r:
                assert r.status == 200
    assert len(checks) == 1


async def test_a_store_check_that_hangs_is_not_ready_and_holds_up_no_one(
    start_app: StartApp, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr("sidecar.app.STORE_CHECK_TIMEOUT", 0.2)
    monkeypatch.setattr("sidecar.app.STORE_CHECK_INTERVAL", 0.0)
    s = await start_app()

    async def hung() -> None:
        await asyncio.Event().wait()

    monkeypatch.setattr(s.app.store, "ping", hung)
    async with aiohttp.ClientSession() as session:
        async with asyncio.timeout(5):  # bounded: two checks of 0.2 s each, not forever
            answers = await asyncio.gather(*(session.get(s.admin + "/readyz") for _ in range(2)))
        for r in answers:
            assert (r.status, (await r.json())["details"]["store"]) == (503, "unavailable")
            r.release()


async def test_each_refusal_is_counted_under_its_own_outcome(start_app: StartApp) -> None:
    """A botched token rotation (every request 401) must not look like bad payloads."""
    s = await start_app(auth_tokens=("t0k3n",))
    assert (await s.post(message())).status == 401
    assert (await s.post(message(), token="t0k3n")).status == 200
    assert (await s.post(message(text="other"), token="t0k3n")).status == 409
    assert (await s.post({"userId": "u1"}, token="t0k3n")).status == 400
    text = await admin_metrics(s)
    for outcome in ("unauthenticated", "accepted", "conflict", "rejected"):
        assert f'sidecar_messages_total{{outcome="{outcome}",protocol="http"}} 1.0' in text, outcome


@pytest.mark.parametrize(
    ("raw", "field"),
    [
        (b"{not json", "body"),
        (b"[1, 2]", "body"),
        (b'"text"', "body"),
        (b"\xff\xfe{}", "body"),
    ],
)
async def test_body_not_a_json_object_is_400(start_app: StartApp, raw: bytes, field: str) -> None:
    s = await start_app()
    async with s.session.post(s.http + "/webhook", data=raw, headers={"Content-Type": "application/json"}) as resp:
        assert resp.status == 400
        body = await resp.json()
    assert_error_shape(body, "invalid_argument")
    assert body["error"]["details"][0]["field"] == field


@pytest.mark.parametrize("name", ["userId", "messageId", "conversationId", "type", "text"])
async def test_missing_field_is_400_naming_it(start_app: StartApp, name: str) -> None:
    s = await start_app()
    body = message()
    del body[name]
    resp = await s.post(body)
    assert resp.status == 400
    answer = await resp.json()
    assert_error_shape(answer, "invalid_argument")
    assert [d["field"] for d in answer["error"]["details"]] == [name]


@pytest.mark.parametrize(
    ("name", "value"),
    [
        ("userId", 5),
        ("messageId", ""),
        ("conversationId", None),
        ("type", ["text"]),
        ("text", 1),
        ("userId", "x" * 257),
    ],
)
async def test_wrong_type_empty_or_too_long_field_is_400(start_app: StartApp, name: str, value: object) -> None:
    s = await start_app()
    body = message()
    body[name] = value
    resp = await s.post(body)
    assert resp.status == 400
    answer = await resp.json()
    assert answer["error"]["details"][0]["field"] == name


async def test_missing_payload_is_accepted_and_becomes_the_text(start_app: StartApp) -> None:
    s = await start_app()
    body = message(text="hi")
    del body["payload"]
    resp = await s.post(body)
    assert resp.status == 200
    assert (await resp.json())["message"]["payload"] == {"text": "hi"}


async def test_object_payload_without_text_gets_it_and_unknown_fields_are_ignored(start_app: StartApp) -> None:
    s = await start_app()
    resp = await s.post(message(text="hi", payload={"a": 1}, somethingElse=True))
    assert resp.status == 200
    assert (await resp.json())["message"]["payload"] == {"a": 1, "text": "hi"}


@pytest.mark.parametrize(
    ("payload", "seen"),
    [
        ({"text": None}, "hi"),
        ({"text": ""}, "hi"),
        ({"text": "own"}, "own"),
        ({"text": 0}, 0),
        ({"text": False}, False),
    ],
)
async def test_a_null_or_empty_payload_text_is_filled_in_as_the_integration_does(
    start_app: StartApp, payload: JSON, seen: JSON
) -> None:
    s = await start_app()
    resp = await s.post(message(text="hi", payload=payload))
    assert resp.status == 200
    assert (await resp.json())["message"]["payload"]["text"] == seen


async def test_json_body_is_parsed_whatever_the_content_type(start_app: StartApp) -> None:
    s = await start_app()
    import orjson

    async with s.session.post(
        s.http + "/webhook", data=orjson.dumps(message()), headers={"Content-Type": "text/plain"}
    ) as resp:
        assert resp.status == 200


@pytest.mark.parametrize("header", [None, "Bearer wrong", "Basic c2VjcmV0", "Bearer"])
async def test_missing_or_wrong_token_is_401_with_www_authenticate(start_app: StartApp, header: str | None) -> None:
    s = await start_app(auth_tokens=("secret",))
    headers = {"Authorization": header} if header else {}
    async with s.session.post(s.http + "/webhook", json=message(), headers=headers) as resp:
        assert resp.status == 401
        assert resp.headers["WWW-Authenticate"].startswith("Bearer")
        assert_error_shape(await resp.json(), "unauthenticated")


async def test_bearer_scheme_is_case_insensitive(start_app: StartApp) -> None:
    s = await start_app(auth_tokens=("one", "secret"))
    async with s.session.post(s.http + "/webhook", json=message(), headers={"Authorization": "bearer secret"}) as r:
        assert r.status == 200


async def test_body_too_large_is_413(start_app: StartApp) -> None:
    s = await start_app(max_body_bytes=1000)
    resp = await s.post(message(text="x" * 2000))
    assert resp.status == 413
    assert_error_shape(await resp.json(), "payload_too_large")


async def test_chunked_body_too_large_is_413(start_app: StartApp) -> None:
    s = await start_app(max_body_bytes=1000)

    async def chunks() -> AsyncIterator[bytes]:
        for _ in range(10):
            yield b"x" * 500

    async with s.session.post(s.http + "/webhook", data=chunks()) as resp:
        assert resp.status == 413


@pytest.mark.parametrize("content_type", ["application/x-www-form-urlencoded", "multipart/form-data; boundary=xyz"])
async def test_form_and_multipart_bodies_are_415(start_app: StartApp, content_type: str) -> None:
    s = await start_app()
    async with s.session.post(s.http + "/webhook", data=b"a=b", headers={"Content-Type": content_type}) as resp:
        assert resp.status == 415
        assert_error_shape(await resp.json(), "unsupported_media_type")


async def test_queue_bound_reached_is_429_with_retry_after(start_app: StartApp, tmp_path: Path) -> None:
    rules = tmp_path / "slow.yaml"
    rules.write_text("rules:\n  - match: {}\n    replies: [{type: text, payload: {text: slow}, delay: 20}]\n")
    s = await start_app(bot="script", bot_script=str(rules), max_pending_messages=1)
    assert (await s.post(message(message_id="m1"))).status == 200
    resp = await s.post(message(message_id="m2"))
    assert resp.status == 429
    assert int(resp.headers["Retry-After"]) >= 1
    assert_error_shape(await resp.json(), "overloaded")
    # A repeat of the accepted message adds no work: it still gets its answers.
    again = await s.post(message(message_id="m1"))
    assert again.status == 200 and (await again.json())["duplicate"] is True
    assert (await s.post(message(message_id="m1", text="other"))).status == 409


async def test_draining_sidecar_answers_503(start_app: StartApp) -> None:
    s = await start_app()
    await s.app.core.drain(0)
    resp = await s.post(message())
    assert resp.status == 503
    assert_error_shape(await resp.json(), "unavailable")


async def test_unknown_path_answers_404_in_the_error_shape(start_app: StartApp) -> None:
    s = await start_app()
    async with s.session.get(s.http + "/nope") as resp:
        assert resp.status == 404
        assert_error_shape(await resp.json(), "not_found")


async def test_configured_webhook_path_is_served(start_app: StartApp) -> None:
    s = await start_app(webhook_path="/in/messages")
    assert (await s.post(message(), path="/in/messages")).status == 200


async def test_admin_probes_and_metrics(start_app: StartApp) -> None:
    s = await start_app()
    await s.post(message())
    async with aiohttp.ClientSession() as session:
        async with session.get(s.admin + "/healthz") as r:
            assert r.status == 200
        async with session.get(s.admin + "/readyz") as r:
            assert r.status == 200
            assert (await r.json())["details"]["store"] == "ok"
        async with session.get(s.admin + "/metrics") as r:
            text = await r.text()
    assert 'sidecar_messages_total{outcome="accepted",protocol="http"} 1.0' in text
    for name in ("sidecar_replies_total", "sidecar_active_streams", "sidecar_ingress_seconds_bucket"):
        assert name in text
    await s.app.drain(0)
    async with aiohttp.ClientSession() as session, session.get(s.admin + "/readyz") as r:
        assert r.status == 503


@pytest.mark.parametrize(
    ("raw", "field"),
    [
        (b'{"userId":"u","messageId":"m","conversationId":"c","type":"text","text":"t","payload":NaN}', "body"),
        (b'{"userId":"u","messageId":"m","conversationId":"c","type":"text","text":"t","payload":1e999}', "body"),
        (b'{"userId":"\\ud800","messageId":"m","conversationId":"c","type":"text","text":"t"}', "body"),
        (
            b'{"userId":"u","messageId":"m","conversationId":"c","type":"text","text":"t","payload":12345678901234567890}',
            "payload",
        ),
        # Past 64 bits orjson reads an integer as a float (digits lost): still refused.
        (
            b'{"userId":"u","messageId":"m","conversationId":"c","type":"text","text":"t",'
            b'"payload":{"n":123456789012345678901}}',
            "payload",
        ),
        (
            b'{"userId":"u","messageId":"m","conversationId":"c","type":"text","text":"t",'
            b'"payload":[-18446744073709551617]}',
            "payload",
        ),
        (
            b'{"userId":"u","messageId":"m","conversationId":"c","type":"text","text":"t","payload":'
            + b"[" * 40
            + b"]" * 40
            + b"}",
            "payload",
        ),
    ],
)
async def test_unrepresentable_json_is_400_naming_the_problem(start_app: StartApp, raw: bytes, field: str) -> None:
    s = await start_app()
    async with s.session.post(s.http + "/webhook", data=raw, headers={"Content-Type": "application/json"}) as resp:
        assert resp.status == 400
        body = await resp.json()
    assert_error_shape(body, "invalid_argument")
    assert body["error"]["details"][0]["field"] == field


async def test_a_client_gone_mid_body_is_not_an_error(start_app: StartApp, caplog: pytest.LogCaptureFixture) -> None:
    s = await start_app()
    _, writer = await asyncio.open_connection("127.0.0.1", s.app.http_port)
    writer.write(
        b"POST /webhook HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: 1000\r\n\r\n{"
    )
    await writer.drain()
    await asyncio.sleep(0.1)
    writer.close()
    await asyncio.sleep(0.2)
    assert (await s.post(message())).status == 200  # still serving
    assert not [r for r in caplog.records if r.levelno >= logging.ERROR]


async def test_a_large_number_written_as_a_float_is_a_float_and_accepted(start_app: StartApp) -> None:
    s = await start_app()
    resp = await s.post(message(payload={"n": 1e20, "text": "x"}))
    assert resp.status == 200
    assert (await resp.json())["message"]["payload"]["n"] == 1e20


async def test_a_client_too_slow_to_send_its_headers_is_disconnected(start_app: StartApp) -> None:
    s = await start_app(http_header_timeout=0.5)
    for port in (s.app.http_port, s.app.admin_port):
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.write(b"POST /webhook HTTP/1.1\r\nHost: x\r\n")  # and then nothing more
        await writer.drain()
        async with asyncio.timeout(10):
            assert await reader.read() == b""  # closed by the sidecar, without an answer
        writer.close()
    # Empty lines first (the parser skips them) are no way around the deadline.
    reader, writer = await asyncio.open_connection("127.0.0.1", s.app.http_port)
    for piece in (b"\r\n\r\n", b"\r\n", b"P"):
        writer.write(piece)
        await writer.drain()
    async with asyncio.timeout(10):
        assert await reader.read() == b""
    writer.close()
    # Headers sent in pieces, but in time, are fine, and so is the next request on the connection.
    reader, writer = await asyncio.open_connection("127.0.0.1", s.app.http_port)
    body = orjson.dumps(message())
    head = f"POST /webhook HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: {len(body)}\r\n"
    for piece in (head[:20].encode(), head[20:].encode(), b"\r", b"\n" + body):
        writer.write(piece)
        await writer.drain()
        await asyncio.sleep(0.1)
    assert (await reader.readline()).split()[1] == b"200"
    writer.close()
    assert (await s.post(message(message_id="m2"))).status == 200
    await asyncio.sleep(0.7)  # past the deadline: the kept-alive connection is not cut for it
    assert (await s.post(message(message_id="m3"))).status == 200


async def test_a_body_too_slow_to_arrive_is_408_and_the_connection_closed(start_app: StartApp) -> None:
    # Headers in time, then the body a byte now and then: without a deadline such a
    # sender holds one of http_max_connections for as long as it likes.
    s = await start_app(http_body_timeout=0.5, callback_secret_path="x", admin_tokens=("admin",))

    async def slow(port: int, path: str) -> bytes:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        head = f"POST {path} HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer admin\r\nContent-Length: 100\r\n\r\n"
        writer.write(head.encode() + b"{")
        await writer.drain()
        # The answer, then the close: after aiohttp's lingering (up to 10 s), in which
        # it reads and discards the rest of a body it did not read.
        async with asyncio.timeout(30):
            answer = await reader.read(-1)
        writer.close()
        return answer

    answers = await asyncio.gather(
        slow(s.app.http_port, "/webhook"), slow(s.app.http_port, "/bot/replies/x"),
        slow(s.app.admin_port, "/v1/dead-letters/replay"),
    )  # fmt: skip
    for answer in answers:
        head, _, body = answer.partition(b"\r\n\r\n")
        assert head.split()[1] == b"408" and b"Connection: close" in head, answer[:300]
        assert orjson.loads(body)["error"]["code"] == "request_timeout"
    assert (await s.post(message())).status == 200  # a body in time is fine


async def test_connections_past_the_cap_are_closed_at_once_and_counted(start_app: StartApp) -> None:
    s = await start_app(http_max_connections=2)
    held = [await asyncio.open_connection("127.0.0.1", s.app.http_port) for _ in range(2)]
    await asyncio.sleep(0.1)
    reader, writer = await asyncio.open_connection("127.0.0.1", s.app.http_port)
    async with asyncio.timeout(5):
        assert await reader.read() == b""  # closed without a word
    writer.close()
    assert await metric(s, 'sidecar_http_connections_refused_total{listener="http"}') == 1.0
    for _, w in held:
        w.close()
    await asyncio.sleep(0.1)  # their slots are free again
    async with aiohttp.ClientSession() as session, session.post(s.http + "/webhook", json=message()) as resp:
        assert resp.status == 200


async def raw_exchange(port: int, request: bytes) -> tuple[int, dict[str, str], bytes]:
    """Send bytes as they are; the status, headers and body of the answer."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        writer.write(request)
        await writer.drain()
        async with asyncio.timeout(10):
            head = await reader.readuntil(b"\r\n\r\n")
            lines = head.decode("latin-1").split("\r\n")
            headers = {k.lower(): v.strip() for k, _, v in (x.partition(":") for x in lines[1:] if x)}
            body = await reader.readexactly(int(headers.get("content-length", "0")))
        return int(lines[0].split()[1]), headers, body
    finally:
        writer.close()


def _post(headers: bytes, body: bytes) -> bytes:
    return b"POST /webhook HTTP/1.1\r\nHost: x\r\n" + headers + b"\r\n" + body


@pytest.mark.parametrize(
    ("request_bytes", "status", "code"),
    [
        # Refused by aiohttp's parser, before any route: still the one JSON error shape.
        (_post(b"Content-Type: application/json\r\nContent-Type: text/plain\r\nContent-Length: 2\r\n", b"{}"),
         400, "invalid_argument"),
        (_post(b"Transfer-Encoding: chunked\r\n", b"zz\r\n{}\r\n0\r\n\r\n"), 400, "invalid_argument"),
        (_post(b"Content-Encoding: br\r\nContent-Length: 2\r\n", b"{}"), 415, "unsupported_media_type"),
        # Read by the route, but not readable as sent.
        (_post(b"Content-Encoding: gzip\r\nContent-Length: 16\r\n", b"this is not gzip"), 400, "invalid_argument"),
        (_post(b"Content-Encoding: deflate\r\nContent-Length: 5\r\n", b"\x78\x9c\x00\x01\x02"), 400,
         "invalid_argument"),
    ],
)  # fmt: skip
async def test_malformed_http_is_answered_in_the_error_shape_without_an_error_logged(
    start_app: StartApp, caplog: pytest.LogCaptureFixture, request_bytes: bytes, status: int, code: str
) -> None:
    s = await start_app()
    # As `sidecar serve` sets it up: aiohttp's own record of a malformed request is one WARNING.
    server_log = logging.getLogger("aiohttp.server")
    demote = MalformedRequestFilter()
    server_log.addFilter(demote)
    try:
        got, headers, body = await raw_exchange(s.app.http_port, request_bytes)
        await asyncio.sleep(0.1)  # aiohttp's lingering read of the rest, logged after the answer
    finally:
        server_log.removeFilter(demote)
    assert (got, headers["content-type"].split(";")[0]) == (status, "application/json")
    assert_error_shape(orjson.loads(body), code)
    assert b"Brotli" not in body and b"chunk" not in body  # no parser internals
    assert not [r for r in caplog.records if r.levelno >= logging.ERROR]
    assert (await s.post(message())).status == 200


async def test_an_authorization_header_that_is_not_utf8_is_401(start_app: StartApp) -> None:
    s = await start_app(auth_tokens=("t0ken",))
    body = orjson.dumps(message())
    head = b"Content-Type: application/json\r\nAuthorization: Bearer \xff\xfe\r\nContent-Length: %d\r\n" % len(body)
    status, headers, answer = await raw_exchange(s.app.http_port, _post(head, body))
    assert status == 401 and headers["www-authenticate"].startswith("Bearer")
    assert_error_shape(orjson.loads(answer), "unauthenticated")


async def test_a_wrong_method_is_405_saying_which_is_allowed(start_app: StartApp) -> None:
    s = await start_app()
    async with s.session.get(s.http + "/webhook") as resp:
        assert resp.status == 405 and resp.headers["Allow"] == "POST"
        assert_error_shape(await resp.json(), "method_not_allowed")


async def test_a_kept_alive_connection_is_closed_once_idle_past_the_keepalive_timeout(
    start_app: StartApp, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A later request's headers are bounded too: aiohttp's own default would hold such a
    connection for an hour."""
    monkeypatch.setattr("sidecar.http_server.KEEPALIVE_TIMEOUT", 0.5)
    s = await start_app(http_header_timeout=0.2)
    reader, writer = await asyncio.open_connection("127.0.0.1", s.app.http_port)
    body = orjson.dumps(message())
    writer.write(_post(b"Content-Type: application/json\r\nContent-Length: %d\r\n" % len(body), body))
    await writer.drain()
    assert (await reader.readline()).split()[1] == b"200"
    writer.write(b"POST /webhook HTTP/1.1\r\nHost: x\r\n")  # the next request's headers, never finished
    await writer.drain()
    async with asyncio.timeout(10):
        while await reader.read(65536):  # the first answer's rest, then the close
            pass
    writer.close()


async def test_what_the_hosted_integration_parses_is_taken_duplicate_keys_last_and_a_long_type(
    start_app: StartApp,
) -> None:
    """It reads bodies with JavaScript's JSON.parse, where the last of duplicate keys wins,
    and bounds `type` by nothing but the body: SPEC section 2, no request it accepts is
    refused here."""
    s = await start_app()
    raw = (
        b'{"userId":"u","userId":"v","messageId":"m","conversationId":"c","type":"text","text":"a","text":"b",'
        b'"payload":{"n":1,"n":2,"text":"b"}}'
    )
    async with s.session.post(s.http + "/webhook", data=raw, headers={"Content-Type": "application/json"}) as resp:
        assert resp.status == 200, await resp.text()
    kind = "k" * 1000
    long_type = {"userId": "u", "messageId": "m2", "conversationId": "c", "type": kind, "text": "t"}
    async with s.session.post(s.http + "/webhook", json=long_type) as resp:
        assert resp.status == 200, await resp.text()
    # The same message again, written with the last values only: a duplicate (same content),
    # so those are what was stored.
    again = {"userId": "v", "messageId": "m", "conversationId": "c", "type": "text", "text": "b",
             "payload": {"n": 2, "text": "b"}}  # fmt: skip
    async with s.session.post(s.http + "/webhook", json=again) as resp:
        assert resp.status == 200 and (await resp.json())["duplicate"] is True
