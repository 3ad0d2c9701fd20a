"""``GET /asyncapi.json``: the WebSocket protocol as an AsyncAPI 3 document, valid against
AsyncAPI's published schema (``tests/vendor/asyncapi-3.0.0.json``), naming every message; and
every message the server sends in the tests matches it (``tests/protocol_check.py``, applied
to every test by ``conftest.py``)."""

from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Any

import httpx
import jsonschema
import trio

from aether.protocol.asyncapi import CLIENT_MESSAGES, asyncapi_document
from aether.protocol.server_messages import SERVER_MESSAGES
from tests.helpers import make_settings, running_server, ws_client
from tests.protocol_check import ProtocolCheck, sent_types

SPEC = Path(__file__).with_name("vendor") / "asyncapi-3.0.0.json"
KEY = "k" * 32


def spec_errors(document: dict[str, Any]) -> list[str]:
    schema = json.loads(SPEC.read_text())
    validator = jsonschema.validators.validator_for(schema)(schema)
    return [f"{list(e.path)}: {e.message[:200]}" for e in validator.iter_errors(document)]


async def test_the_document_is_served_publicly_and_is_valid_asyncapi_3() -> None:
    with trio.fail_after(10):
        async with (
            running_server(make_settings(provider="echo", api_keys=KEY)) as server,
            httpx.AsyncClient(base_url=server.base_url) as client,
        ):
            response = await client.get("/asyncapi.json")  # no key: public, as /openapi.json
    assert response.status_code == 200
    assert response.headers["content-type"].startswith("application/json")
    document = response.json()
    assert document["asyncapi"] == "3.0.0"
    assert spec_errors(document) == []
    names = {model.__name__ for model in (*CLIENT_MESSAGES, *SERVER_MESSAGES)}
    assert set(document["components"]["messages"]) == names
    assert document["channels"]["chat"]["address"] == "/ws"
    operations = document["operations"]
    assert operations["receiveClientMessage"]["action"] == "receive"
    assert operations["sendServerMessage"]["action"] == "send"
    assert len(operations["sendServerMessage"]["messages"]) == len(SERVER_MESSAGES)


def test_the_published_schema_is_not_a_formality() -> None:
    """A document that breaks AsyncAPI's rules fails the check the served one passes."""
    broken = copy.deepcopy(asyncapi_document("test"))
    broken["operations"]["sendServerMessage"]["action"] = "broadcast"
    del broken["channels"]["chat"]["address"]
    broken["info"].pop("title")
    assert len(spec_errors(broken)) >= 2


def test_a_message_the_document_does_not_describe_is_caught() -> None:
    check = ProtocolCheck(lambda message: json.dumps(message))
    check({"role": "server", "type": "pong"})
    check({"role": "server", "type": "completion", "id": "r1", "seq": 3})
    check({"role": "server", "type": "pong", "extra": 1})
    check({"role": "server", "type": "teleport", "id": "r1", "seq": 4})
    check({"role": "assistant", "type": "message", "content": 5, "id": "r1", "seq": 1})
    assert len(check.undescribed) == 3


async def test_what_a_websocket_chat_sends_is_checked_against_the_document() -> None:
    settings = make_settings(provider="echo", echo_token_delay_s=0)
    with trio.fail_after(10):
        async with running_server(settings) as server, ws_client(server.ws_url) as client:
            await client.chat("hello there", id="r1")
            await client.send({"type": "ping"})
            await client.receive_control()
            await client.send({"type": "stop", "id": "nobody"})
            await client.receive_control()
    assert {
        ("server", "hello"),
        ("server", "accepted"),
        ("assistant", "message"),
        ("server", "completion"),
        ("server", "pong"),
        ("server", "error"),
    } <= sent_types()
