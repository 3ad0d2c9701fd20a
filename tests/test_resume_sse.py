"""Resume over server-sent events, on real sockets: ``POST /v1/chat/stream`` runs on when its
client goes (the resume grace), and ``GET /v1/chat/<id>/events`` picks the stream up after the
last event the client got (``Last-Event-ID``, as an EventSource sends it, or ``?after_seq=``):
every message once, in order, then the live stream."""

from __future__ import annotations

import json
from collections.abc import AsyncGenerator, AsyncIterator
from contextlib import aclosing
from typing import Any

import httpx
import pytest
import trio

from aether.testing.fake_llm import Behaviour, FakeLLM
from tests.helpers import (
    assert_stream_invariants,
    content_of,
    http_settings,
    running_server,
    ws_client,
)

DEADLINE_S = 15
TOKENS = 60
WHOLE = "".join(f"tok{index} " for index in range(TOKENS))


async def events(response: httpx.Response) -> AsyncGenerator[dict[str, Any], None]:
    """The JSON of each event of a stream as it comes; checks each event's id is its seq."""
    event_id: int | None = None
    async for line in response.aiter_lines():
        if line.startswith("id: "):
            event_id = int(line[4:])
        elif line.startswith("data: "):
            message = json.loads(line[6:])
            assert message.get("seq") == event_id
            event_id = None
            yield message


class EventReader:
    """One stream's events, read in parts."""

    def __init__(self, response: httpx.Response) -> None:
        self._events = events(response)

    async def until_seq(self, seq: int) -> list[dict[str, Any]]:
        """The next events through the first with ``seq`` or more."""
        received: list[dict[str, Any]] = []
        async for message in self._events:
            received.append(message)
            if message.get("seq", -1) >= seq:
                break
        return received

    async def rest(self) -> list[dict[str, Any]]:
        return [message async for message in self._events]

    async def aclose(self) -> None:
        await self._events.aclose()


async def read_until_seq(response: httpx.Response, seq: int) -> list[dict[str, Any]]:
    """The stream's events through the first with ``seq`` or more (then the client leaves)."""
    async with aclosing(EventReader(response)) as reader:
        return await reader.until_seq(seq)


async def read_all(response: httpx.Response) -> list[dict[str, Any]]:
    async with aclosing(EventReader(response)) as reader:
        return await reader.rest()


@pytest.fixture
async def slow_answer(fake_llm: FakeLLM) -> FakeLLM:
    fake_llm.script(Behaviour(tokens=TOKENS, delay_s=0.01))
    return fake_llm


def resumable(fake_llm: FakeLLM, **overrides: Any) -> Any:
    return http_settings(fake_llm, resume_grace_s=10, **overrides)


@pytest.mark.parametrize("through", ["header", "query"])
@pytest.mark.parametrize("quart", [False, True], ids=["direct", "quart"])
async def test_a_dropped_event_stream_resumes_with_every_message_once(
    slow_answer: FakeLLM, through: str, quart: bool
) -> None:
    body = json.dumps({"message": "go", "id": "s1"}).encode()

    async def chunked() -> AsyncIterator[bytes]:  # (Quart then takes the request)
        yield body

    with trio.fail_after(DEADLINE_S):
        async with (
            running_server(resumable(slow_answer)) as server,
            httpx.AsyncClient(base_url=server.base_url) as client,
        ):
            async with client.stream(
                "POST",
                "/v1/chat/stream",
                content=chunked() if quart else body,
                headers={"content-type": "application/json"},
            ) as response:
                before = await read_until_seq(response, 5)
            last = before[-1]["seq"]
            headers, params = (
                ({"Last-Event-ID": str(last)}, {})
                if through == "header"
                else (
                    {},
                    {"after_seq": last},
                )
            )
            async with client.stream(
                "GET", "/v1/chat/s1/events", headers=headers, params=params
            ) as resumed:
                assert resumed.status_code == 200
                assert resumed.headers["content-type"].startswith("text/event-stream")
                after = await read_all(resumed)
    assert assert_stream_invariants(before + after)["type"] == "completion"
    assert content_of(before + after) == WHOLE
    assert slow_answer.streams[0].outcome == "completed"  # never stopped by the drop


async def test_the_header_wins_over_a_stale_query(slow_answer: FakeLLM) -> None:
    """An EventSource reconnects to the URL it was given (its ``after_seq`` of then) with the
    id of the last event it got since: that id is where the stream resumes."""
    with trio.fail_after(DEADLINE_S):
        async with (
            running_server(resumable(slow_answer)) as server,
            httpx.AsyncClient(base_url=server.base_url) as client,
        ):
            async with client.stream(
                "POST", "/v1/chat/stream", json={"message": "go", "id": "s1"}
            ) as response:
                before = await read_until_seq(response, 8)
            async with client.stream(
                "GET",
                "/v1/chat/s1/events?after_seq=2",
                headers={"Last-Event-ID": str(before[-1]["seq"])},
            ) as resumed:
                after = await read_all(resumed)
    assert after[0]["seq"] == before[-1]["seq"] + 1
    assert content_of(before + after) == WHOLE


async def test_a_finished_stream_is_replayed_and_then_answers_204(slow_answer: FakeLLM) -> None:
    with trio.fail_after(DEADLINE_S):
        async with (
            running_server(resumable(slow_answer)) as server,
            httpx.AsyncClient(base_url=server.base_url) as client,
        ):
            whole = await client.post("/v1/chat/stream", json={"message": "go", "id": "s1"})
            messages = [
                json.loads(line[6:]) for line in whole.text.splitlines() if line[:6] == "data: "
            ]
            terminal_seq = messages[-1]["seq"]
            replayed = await client.get("/v1/chat/s1/events", params={"after_seq": 3})
            done = await client.get(
                "/v1/chat/s1/events", headers={"Last-Event-ID": str(terminal_seq)}
            )
    replay = [json.loads(line[6:]) for line in replayed.text.splitlines() if line[:6] == "data: "]
    assert replay == messages[4:]
    # An EventSource stops reconnecting on a 204.
    assert (done.status_code, done.content) == (204, b"")


async def test_a_second_reader_takes_the_stream_over(slow_answer: FakeLLM) -> None:
    with trio.fail_after(DEADLINE_S):
        async with (
            running_server(resumable(slow_answer)) as server,
            httpx.AsyncClient(base_url=server.base_url) as client,
            client.stream("POST", "/v1/chat/stream", json={"message": "go", "id": "s1"}) as first,
            aclosing(EventReader(first)) as reader,
        ):
            before = await reader.until_seq(3)
            async with client.stream(
                "GET", "/v1/chat/s1/events", params={"after_seq": before[-1]["seq"]}
            ) as second:
                # The first stream gets word of the takeover, and then ends.
                rest_of_first = await reader.rest()
                after = await read_all(second)
    notice = rest_of_first[-1]
    assert (notice["type"], notice["code"], notice["id"]) == ("error", "resumed_elsewhere", None)
    assert notice["ref"] == {"type": "resume", "id": "s1"}
    got = [m for m in before + rest_of_first[:-1] if m["seq"] <= before[-1]["seq"]] + after
    assert assert_stream_invariants(got)["type"] == "completion"
    assert content_of(got) == WHOLE


@pytest.mark.parametrize(
    ("path", "headers", "status", "code"),
    [
        ("/v1/chat/nope/events", {}, 404, "unknown_request"),
        ("/v1/chat/s1/events?after_seq=x", {}, 400, "invalid_request"),
        ("/v1/chat/s1/events?after_seq=-2", {}, 400, "invalid_request"),
        ("/v1/chat/s1/events", {"Last-Event-ID": "1_0"}, 400, "invalid_request"),
    ],
    ids=["unknown", "not-a-number", "below-minus-one", "bad-header"],
)
async def test_a_resume_that_cannot_be_answered_gets_a_json_error(
    fake_llm: FakeLLM, path: str, headers: dict[str, str], status: int, code: str
) -> None:
    fake_llm.script(Behaviour(tokens=2))
    with trio.fail_after(DEADLINE_S):
        async with (
            running_server(resumable(fake_llm)) as server,
            httpx.AsyncClient(base_url=server.base_url) as client,
        ):
            await client.post("/v1/chat/stream", json={"message": "go", "id": "s1"})
            response = await client.get(path, headers=headers)
    assert response.status_code == status
    assert response.json()["error"]["code"] == code


async def test_a_websocket_chat_resumes_as_an_event_stream(slow_answer: FakeLLM) -> None:
    with trio.fail_after(DEADLINE_S):
        async with (
            running_server(resumable(slow_answer)) as server,
            httpx.AsyncClient(base_url=server.base_url) as client,
        ):
            async with ws_client(server.ws_url) as ws:
                await ws.send({"type": "chat", "id": "w1", "message": "go"})
                before = []
                while not before or before[-1].get("seq", -1) < 4:
                    message = await ws.receive()
                    if message.get("id") == "w1":
                        before.append(message)
            async with client.stream(
                "GET", "/v1/chat/w1/events", headers={"Last-Event-ID": str(before[-1]["seq"])}
            ) as resumed:
                after = await read_all(resumed)
    assert assert_stream_invariants(before + after)["type"] == "completion"
    assert content_of(before + after) == WHOLE


@pytest.mark.parametrize("route", ["completions", "chat"])
async def test_streams_that_cannot_resume_still_stop_when_their_client_goes(
    slow_answer: FakeLLM, route: str
) -> None:
    """The OpenAI-compatible stream and ``POST /v1/chat`` have no resume: a client that goes
    stops its chat at once, whatever the grace."""
    with trio.fail_after(DEADLINE_S):
        async with running_server(resumable(slow_answer)) as server:
            async with httpx.AsyncClient(base_url=server.base_url) as client:
                if route == "completions":
                    body = {"messages": [{"role": "user", "content": "go"}], "stream": True}
                    async with client.stream("POST", "/v1/chat/completions", json=body) as response:
                        async for line in response.aiter_lines():
                            if '"content": "tok' in line or '"content":"tok' in line:
                                break
                else:
                    with trio.move_on_after(0.2):
                        await client.post("/v1/chat", json={"message": "go"})
            left_at = trio.current_time()
            record = slow_answer.streams[0]
            await record.closed.wait()
    assert record.outcome == "client_closed"
    assert record.client_closed_at is not None
    assert record.client_closed_at - left_at < 1.0
