"""Across protocols: one message is one message, and payloads survive JSON ↔ protobuf exactly."""

from __future__ import annotations

import json
from pathlib import Path

import grpc
import pytest
from google.protobuf import json_format

from sidecar.convert import value_to_json
from tests.conftest import StartApp, message
from tests.receiver import Receiver
from tests.test_grpc_ingress import request, wait_until
from tests.test_streams import read_n, subscribe

PAYLOAD = {"text": "hi", "n": 1, "f": 2.5, "nested": {"list": [True, None, "x", {"deep": []}]}, "empty": {}}


async def test_the_same_message_over_http_then_grpc_is_handled_once(start_app: StartApp) -> None:
    async with Receiver() as r:
        s = await start_app(response_url=r.url)
        first = await s.post(message(text="hi", payload=PAYLOAD))
        assert (await first.json())["duplicate"] is False
        again = await s.stub.SendMessage(request(text="hi", payload=PAYLOAD))
        assert again.duplicate is True
        await r.wait_for(1)
        call = subscribe(s, after=0)
        (reply,) = await read_n(call, 1)
        call.cancel()
    assert reply.sequence == 1 and await s.app.store.last_sequence("c1") == 1
    assert len(r.requests) == 1


async def test_the_same_message_over_grpc_then_http_is_handled_once_even_with_1_0_for_1(start_app: StartApp) -> None:
    s = await start_app()
    await s.stub.SendMessage(request(text="hi", payload={"text": "hi", "n": 1}))
    resp = await s.post(message(text="hi", payload={"text": "hi", "n": 1.0}))
    assert resp.status == 200
    assert (await resp.json())["duplicate"] is True


async def test_other_content_under_the_same_ids_conflicts_across_protocols(start_app: StartApp) -> None:
    s = await start_app()
    await s.post(message(text="one"))
    with pytest.raises(grpc.aio.AioRpcError) as e:
        await s.stub.SendMessage(request(text="two"))
    assert e.value.code() == grpc.StatusCode.ALREADY_EXISTS


async def test_a_payload_round_trips_exactly_from_http_to_the_stream_and_the_webhook(
    start_app: StartApp, tmp_path: Path
) -> None:
    rules = tmp_path / "card.yaml"
    rules.write_text(json.dumps({"rules": [{"match": {}, "replies": [{"type": "card", "payload": PAYLOAD}]}]}))
    async with Receiver() as r:
        s = await start_app(response_url=r.url, bot="script", bot_script=str(rules))
        call = subscribe(s)
        await wait_until(lambda: len(s.app.core.broker) == 1)
        await s.post(message(text="go"))
        (reply,) = await read_n(call, 1)
        call.cancel()
        (hook,) = await r.wait_for(1)
    assert value_to_json(reply.payload) == PAYLOAD
    assert json_format.MessageToDict(reply)["type"] == "card"
    assert hook.body["payload"] == PAYLOAD and hook.body["type"] == "card"


async def test_a_grpc_payload_reaches_the_bot_as_the_same_json(start_app: StartApp) -> None:
    async with Receiver() as r:
        s = await start_app(response_url=r.url)
        await s.stub.SendMessage(request(text="hi", payload=PAYLOAD))
        body = await s.post(message(text="hi", payload=PAYLOAD))
        answer = await body.json()
        (hook,) = await r.wait_for(1)
    assert answer["duplicate"] is True and answer["message"]["payload"] == PAYLOAD
    assert hook.body["payload"] == {"text": "hi"}
