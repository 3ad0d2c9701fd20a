"""The REST routes answered in front of Quart (``aether.api.direct_routes``): the same answers as
Quart's, every unusual request still answered by Quart, a client that leaves stops its chat,
and a body that never comes gets 408."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from typing import Any

import httpx
import pytest
import trio
import trio.testing

from aether.api.dependencies import EXTENSION_KEY
from aether.api.direct_routes import DirectRoutes, until_disconnect
from aether.app import create_app
from aether.asgi import DISCONNECT_SIGNAL, DisconnectSignal, Message
from aether.testing.fake_llm import Behaviour, FakeLLM
from tests.helpers import http_settings, make_settings, running_server

DEADLINE_S = 10
CHAT = {"message": "hi there", "path": "echo"}


async def chunked(body: bytes) -> AsyncIterator[bytes]:
    """A body of undeclared length (sent chunked): not an ordinary request, so Quart takes it."""
    yield body


def without_ids(answer: dict[str, Any]) -> dict[str, Any]:
    return {key: value for key, value in answer.items() if key not in ("id", "conversation_id")}


async def both_ways(
    client: httpx.AsyncClient, path: str, body: dict[str, Any]
) -> tuple[httpx.Response, httpx.Response]:
    """The same request answered in front of Quart (declared length) and through it (chunked)."""
    encoded = json.dumps(body).encode()
    headers = {"content-type": "application/json"}
    direct = await client.post(path, content=encoded, headers=headers)
    through_quart = await client.post(path, content=chunked(encoded), headers=headers)
    assert "content-length" not in through_quart.request.headers
    return direct, through_quart


def assert_same_headers(one: httpx.Response, other: httpx.Response) -> None:
    """Headers alike, but those of a moment (date, the rate limit left) and the request's."""
    varying = {"date", "x-request-id", "content-length", "ratelimit"}
    assert {k: v for k, v in one.headers.items() if k not in varying} == {
        k: v for k, v in other.headers.items() if k not in varying
    }


async def test_an_answer_is_the_same_in_front_of_quart_and_through_it() -> None:
    with trio.fail_after(DEADLINE_S):
        async with (
            running_server(make_settings()) as server,
            httpx.AsyncClient(base_url=server.base_url) as client,
        ):
            direct, through_quart = await both_ways(client, "/v1/chat", CHAT)
            with_charset = await client.post(
                "/v1/chat",
                content=json.dumps(CHAT),
                headers={"content-type": "application/json; charset=utf-8"},
            )
    assert direct.status_code == through_quart.status_code == with_charset.status_code == 200
    assert without_ids(direct.json()) == without_ids(through_quart.json())
    assert without_ids(with_charset.json()) == without_ids(direct.json())
    assert direct.json()["content"] == "hi there"
    assert_same_headers(direct, through_quart)


def events_of(text: str) -> list[dict[str, Any]]:
    """The JSON of each ``data:`` line of an event stream, without what names its request."""
    messages = [json.loads(line[6:]) for line in text.splitlines() if line.startswith("data: ")]
    return [without_ids(message) for message in messages]


async def test_an_event_stream_is_the_same_in_front_of_quart_and_through_it() -> None:
    with trio.fail_after(DEADLINE_S):
        async with (
            running_server(make_settings()) as server,
            httpx.AsyncClient(base_url=server.base_url) as client,
        ):
            direct, through_quart = await both_ways(client, "/v1/chat/stream", CHAT)
    assert direct.status_code == through_quart.status_code == 200
    assert events_of(direct.text) == events_of(through_quart.text)
    assert events_of(direct.text)[-1]["type"] == "completion"
    assert_same_headers(direct, through_quart)


@pytest.mark.parametrize(
    ("path", "body", "content_type", "status", "code"),
    [
        ("/v1/chat", b'{"message": ""}', "application/json", 400, "invalid_request"),
        ("/v1/chat", b"{not json", "application/json", 400, "invalid_request"),
        ("/v1/chat", b'{"message": "hi"}', "text/plain", 415, "unsupported_media_type"),
        (
            "/v1/chat/completions",
            b'{"messages": [{"role": "system", "content": "be brief"}]}',
            "application/json",
            400,
            "invalid_request",
        ),
    ],
    ids=["invalid-field", "not-json", "not-json-media-type", "no-user-message"],
)
async def test_requests_it_does_not_take_get_quarts_errors(
    path: str, body: bytes, content_type: str, status: int, code: str
) -> None:
    with trio.fail_after(DEADLINE_S):
        async with (
            running_server(make_settings()) as server,
            httpx.AsyncClient(base_url=server.base_url) as client,
        ):
            response = await client.post(path, content=body, headers={"content-type": content_type})
    assert response.status_code == status
    error = response.json()["error"]
    assert error["code"] == code
    assert error["request_id"] == response.headers["x-request-id"]


def completion_deltas(text: str) -> list[Any]:
    """What each event of a streamed completion says, without its id and time."""
    events = []
    for line in text.splitlines():
        if line.startswith("data: {"):
            event = json.loads(line[6:])
            events.append([event["model"], event["choices"]])
        elif line.startswith("data: "):
            events.append(line)
    return events


async def test_a_streamed_completion_is_the_same_in_front_of_quart_and_through_it() -> None:
    body = {"messages": [{"role": "user", "content": "hi there"}], "stream": True}
    with trio.fail_after(DEADLINE_S):
        async with (
            running_server(make_settings(provider="echo")) as server,
            httpx.AsyncClient(base_url=server.base_url) as client,
        ):
            direct, through_quart = await both_ways(client, "/v1/chat/completions", body)
    assert direct.headers["content-type"].startswith("text/event-stream")
    assert direct.text.rstrip().endswith("data: [DONE]")
    assert completion_deltas(direct.text) == completion_deltas(through_quart.text)
    assert_same_headers(direct, through_quart)


async def test_a_refused_chat_gets_the_refusal_in_front_of_quart(fake_llm: FakeLLM) -> None:
    fake_llm.script(Behaviour(tokens=1000, delay_s=0.01))
    with trio.fail_after(DEADLINE_S):
        async with (
            running_server(http_settings(fake_llm)) as server,
            httpx.AsyncClient(base_url=server.base_url) as first,
            httpx.AsyncClient(base_url=server.base_url) as second,
            trio.open_nursery() as nursery,
        ):
            long_chat = {"message": "long", "id": "same"}
            nursery.start_soon(lambda: first.post("/v1/chat", json=long_chat))
            await fake_llm.wait_for_stream(0)
            duplicate = await second.post("/v1/chat", json={"message": "again", "id": "same"})
            server.state.engine.stop_generation("same", "anonymous")
    assert duplicate.status_code == 409
    assert duplicate.json()["error"]["code"] == "duplicate_request"
    assert duplicate.json()["error"]["request_id"] == duplicate.headers["x-request-id"]


async def test_a_client_that_leaves_its_post_chat_stops_the_chat(fake_llm: FakeLLM) -> None:
    fake_llm.script(Behaviour(tokens=1000, delay_s=0.01))
    with trio.fail_after(DEADLINE_S):
        async with running_server(http_settings(fake_llm)) as server:
            host, port = server.base_url.removeprefix("http://").rsplit(":", 1)
            body = json.dumps({"message": "go", "id": "leaver"}).encode()
            stream = await trio.open_tcp_stream(host, int(port))
            await stream.send_all(
                b"POST /v1/chat HTTP/1.1\r\nHost: 127.0.0.1\r\n"
                b"Content-Type: application/json\r\nContent-Length: %d\r\n\r\n%s"
                % (len(body), body)
            )
            upstream = await fake_llm.wait_for_stream(0)
            await stream.aclose()
            await upstream.closed.wait()
            await server.state.engine.tracker.wait_until_idle()
    assert upstream.outcome == "client_closed"
    assert upstream.tokens_sent < 1000


async def test_a_body_that_does_not_come_in_time_gets_408(
    autojump_clock: trio.testing.MockClock,
) -> None:
    app = create_app(make_settings())
    reached_quart = False

    async def quart(scope: Any, receive: Any, send: Any) -> None:
        nonlocal reached_quart
        reached_quart = True

    sent: list[Message] = []

    async def send(message: Message) -> None:
        sent.append(message)

    async def receive() -> Message:
        await trio.sleep_forever()
        raise AssertionError

    routes = DirectRoutes(quart, app.extensions[EXTENSION_KEY], app.config)
    scope = {
        "type": "http",
        "method": "POST",
        "path": "/v1/chat",
        "headers": [(b"content-type", b"application/json"), (b"content-length", b"20")],
        "aether.request_id": "req-1",
    }
    started = trio.current_time()
    await routes(scope, receive, send)
    assert trio.current_time() - started == 30
    assert not reached_quart
    assert sent[0]["status"] == 408
    error = json.loads(sent[1]["body"])["error"]
    assert (error["code"], error["request_id"]) == ("request_timeout", "req-1")


async def test_a_disconnect_signal_cancels_the_scopes_it_was_given_and_later_ones_at_once() -> None:
    signal = DisconnectSignal()
    before, after = trio.CancelScope(), trio.CancelScope()
    signal.cancel_on_disconnect(before)
    assert not before.cancel_called
    signal.fire()
    assert before.cancel_called
    signal.cancel_on_disconnect(after)
    assert after.cancel_called


@pytest.mark.parametrize("signalled", [True, False], ids=["disconnect-signal", "watching-receive"])
async def test_a_client_leaving_cancels_the_answer_it_waits_for(signalled: bool) -> None:
    """Told by the server's extension, or (from a server without it) seen on ``receive``."""
    signal = DisconnectSignal()
    scope: dict[str, Any] = {"extensions": {DISCONNECT_SIGNAL: signal} if signalled else {}}
    left = trio.Event()
    cancelled = False

    async def receive() -> Message:
        await left.wait()
        return {"type": "http.disconnect"}

    async def answer() -> tuple[int, dict[str, Any]]:
        nonlocal cancelled
        try:
            await trio.sleep_forever()
        except trio.Cancelled:
            cancelled = True
            raise
        raise AssertionError

    async with trio.open_nursery() as nursery:
        outcome: list[tuple[int, dict[str, Any]]] = []

        async def wait() -> None:
            outcome.append(await until_disconnect(scope, receive, answer()))

        nursery.start_soon(wait)
        await trio.testing.wait_all_tasks_blocked()
        assert not outcome
        if signalled:
            signal.fire()  # nothing comes on receive: the signal alone does it
        else:
            left.set()
    assert cancelled
    assert outcome == [(0, {})]
