"""REST and SSE over real sockets: Hypercorn on 127.0.0.1, httpx client, fake upstream."""

from __future__ import annotations

import json
from typing import Any

import httpx
import trio

from aether.testing.fake_llm import Behaviour, FakeLLM
from tests.helpers import (
    assert_stream_invariants,
    content_of,
    http_settings,
    make_settings,
    running_server,
)

DEADLINE_S = 10


def parse_sse(text: str) -> list[tuple[int, dict[str, Any]]]:
    events = []
    for block in text.strip().split("\n\n"):
        fields = dict(line.split(": ", 1) for line in block.splitlines())
        events.append((int(fields["id"]), json.loads(fields["data"])))
    return events


async def test_post_chat_returns_the_whole_answer(fake_llm: FakeLLM) -> None:
    fake_llm.script(Behaviour(tokens=3))
    with trio.fail_after(DEADLINE_S):
        async with (
            running_server(http_settings(fake_llm)) as server,
            httpx.AsyncClient(base_url=server.base_url) as client,
        ):
            response = await client.post("/v1/chat", json={"message": "hi", "id": "r1"})
    assert response.status_code == 200
    body = response.json()
    assert body.pop("conversation_id").startswith("c-")
    assert body == {
        "id": "r1",
        "status": "completed",
        "path": "http",
        "model": "fake-model",
        "content": "tok0 tok1 tok2 ",
    }


async def test_post_chat_stream_sends_the_protocol_as_sse(fake_llm: FakeLLM) -> None:
    fake_llm.script(Behaviour(tokens=4))
    with trio.fail_after(DEADLINE_S):
        async with (
            running_server(http_settings(fake_llm)) as server,
            httpx.AsyncClient(base_url=server.base_url) as client,
        ):
            response = await client.post("/v1/chat/stream", json={"message": "hi", "id": "s1"})
    assert response.status_code == 200
    assert response.headers["content-type"].startswith("text/event-stream")
    events = parse_sse(response.text)
    messages = [message for _, message in events]
    assert [event_id for event_id, _ in events] == [m["seq"] for m in messages]
    assert assert_stream_invariants(messages)["type"] == "completion"
    assert content_of(messages) == "tok0 tok1 tok2 tok3 "


async def test_sse_streams_are_not_cut_by_the_response_timeout(fake_llm: FakeLLM) -> None:
    # Quart cuts a response after RESPONSE_TIMEOUT (60 s by default); shrunk here to 0.2 s, an
    # answer that takes 1 s must still arrive whole.
    fake_llm.script(Behaviour(tokens=50, delay_s=0.02))
    with trio.fail_after(DEADLINE_S):
        async with (
            running_server(http_settings(fake_llm), {"RESPONSE_TIMEOUT": 0.2}) as server,
            httpx.AsyncClient(base_url=server.base_url) as client,
        ):
            response = await client.post("/v1/chat/stream", json={"message": "hi", "id": "s1"})
    messages = [message for _, message in parse_sse(response.text)]
    assert assert_stream_invariants(messages)["type"] == "completion"
    assert len(content_of(messages).split()) == 50


async def test_sse_client_that_disconnects_cancels_the_generation(fake_llm: FakeLLM) -> None:
    fake_llm.script(Behaviour(tokens=1000, delay_s=0.01))
    with trio.fail_after(DEADLINE_S):
        async with running_server(http_settings(fake_llm)) as server:
            async with (
                httpx.AsyncClient(base_url=server.base_url) as client,
                client.stream(
                    "POST", "/v1/chat/stream", json={"message": "go", "id": "s1"}
                ) as response,
            ):
                async for line in response.aiter_lines():
                    if '"content"' in line:
                        break
            left_at = trio.current_time()
            record = fake_llm.streams[0]
            await record.closed.wait()
    assert record.outcome == "client_closed"
    assert record.client_closed_at is not None
    assert record.client_closed_at - left_at < 1.0


async def test_rest_stop_stops_a_running_stream(fake_llm: FakeLLM) -> None:
    fake_llm.script(Behaviour(tokens=1000, delay_s=0.01))
    with trio.fail_after(DEADLINE_S):
        async with (
            running_server(http_settings(fake_llm)) as server,
            httpx.AsyncClient(base_url=server.base_url) as client,
        ):
            async with client.stream(
                "POST", "/v1/chat/stream", json={"message": "go", "id": "s1"}
            ) as response:
                lines: list[str] = []
                stop_status = None
                async for line in response.aiter_lines():
                    lines.append(line)
                    if stop_status is None and '"content"' in line:
                        stop_status = (await client.post("/v1/chat/s1/stop")).status_code
            unknown = await client.post("/v1/chat/s1/stop")
            await fake_llm.streams[0].closed.wait()
    messages = [message for _, message in parse_sse("\n".join(lines))]
    terminal = assert_stream_invariants(messages)
    assert (terminal["type"], terminal["reason"]) == ("stopped", "stop")
    assert stop_status == 202
    assert unknown.status_code == 404
    assert unknown.json()["error"]["code"] == "unknown_request"
    assert fake_llm.streams[0].outcome == "client_closed"


async def test_invalid_chat_body_gets_a_json_400(fake_llm: FakeLLM) -> None:
    with trio.fail_after(DEADLINE_S):
        async with (
            running_server(http_settings(fake_llm)) as server,
            httpx.AsyncClient(base_url=server.base_url) as client,
        ):
            not_json = await client.post(
                "/v1/chat", content=b"{nope", headers={"content-type": "application/json"}
            )
            wrong_type = await client.post("/v1/chat", json={"message": 3})
            missing = await client.post("/v1/chat/stream", json={})
            unknown_route = await client.get("/v1/nothing")
    for response in (not_json, wrong_type, missing):
        assert response.status_code == 400
        assert response.json()["error"]["code"] == "invalid_request"
    assert "message" in wrong_type.json()["error"]["message"]
    assert unknown_route.status_code == 404
    assert unknown_route.json()["error"]["code"] == "not_found"


async def test_health_and_ready(fake_llm: FakeLLM) -> None:
    with trio.fail_after(DEADLINE_S):
        async with (
            running_server(http_settings(fake_llm)) as server,
            httpx.AsyncClient(base_url=server.base_url) as client,
        ):
            health = await client.get("/health")
            ready = await client.get("/ready")
    assert health.status_code == 200
    assert health.json()["status"] == "ok"
    assert ready.status_code == 200
    assert ready.json()["status"] == "ready"
    assert ready.json()["default_path"] == "http"
    assert "server" not in health.headers


async def read_http_response(stream: trio.SocketStream) -> tuple[bytes, bytes]:
    """One HTTP/1.1 response with a Content-Length: (status line and headers, body)."""
    buffer = b""
    while b"\r\n\r\n" not in buffer:
        data = await stream.receive_some()
        assert data, f"connection closed mid-response after {buffer!r}"
        buffer += data
    head, _, body = buffer.partition(b"\r\n\r\n")
    lines = head.split(b"\r\n")
    length = next(
        int(v)
        for k, _, v in (line.partition(b":") for line in lines[1:])
        if k.lower() == b"content-length"
    )
    while len(body) < length:
        body += await stream.receive_some()
    return head, body


async def test_a_response_sent_before_the_request_body_closes_the_connection() -> None:
    # A 405 leaves before the request's body arrives, so the connection cannot be kept for
    # another request: the server must close it, not leave the client's next request unanswered.
    body = b'{"message": "hi"}'
    head = (
        b"PUT /v1/chat HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
        b"Content-Length: %d\r\n\r\n" % len(body)
    )
    with trio.fail_after(DEADLINE_S):
        async with running_server(make_settings(provider="echo")) as server:
            host, port = server.base_url.removeprefix("http://").rsplit(":", 1)
            async with await trio.open_tcp_stream(host, int(port)) as early:
                await early.send_all(head)
                early_head, _ = await read_http_response(early)
                assert await early.receive_some() == b""
            # A request the server reads whole keeps its connection for the next one.
            async with await trio.open_tcp_stream(host, int(port)) as kept:
                heads = []
                for _ in range(2):
                    await kept.send_all(b"GET /health HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n")
                    heads.append((await read_http_response(kept))[0])
    assert early_head.startswith(b"HTTP/1.1 405 ")
    assert b"\r\nconnection: close" in early_head.lower()  # the client is told, too
    assert all(head.startswith(b"HTTP/1.1 200 ") for head in heads)
    assert all(b"connection: close" not in head.lower() for head in heads)
