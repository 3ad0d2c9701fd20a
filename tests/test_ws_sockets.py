"""The WebSocket protocol over real sockets: Hypercorn on 127.0.0.1, trio-websocket clients,
the fake upstream model as a real HTTP server. Real clock, every wait under a deadline."""

from __future__ import annotations

import pytest
import trio
from trio_websocket import ConnectionClosed

from aether.testing.fake_llm import Behaviour, FakeLLM
from tests.helpers import (
    assert_stream_invariants,
    content_of,
    http_settings,
    raw_websocket_close_code,
    running_server,
    ws_client,
)

DEADLINE_S = 10


async def test_http_path_streams_the_upstream_answer(fake_llm: FakeLLM) -> None:
    fake_llm.script(Behaviour(tokens=5))
    with trio.fail_after(DEADLINE_S):
        async with (
            running_server(http_settings(fake_llm)) as server,
            ws_client(server.ws_url) as client,
        ):
            assert client.hello["protocol_version"] == 2
            messages = await client.chat("hello", id="r1")
    assert assert_stream_invariants(messages)["type"] == "completion"
    assert messages[0]["path"] == "http"
    assert content_of(messages) == "tok0 tok1 tok2 tok3 tok4 "
    assert fake_llm.streams[0].request["messages"] == [{"role": "user", "content": "hello"}]
    assert fake_llm.streams[0].outcome == "completed"


@pytest.mark.parametrize("transport", ["aether", "httpx"])
async def test_stop_closes_the_upstream_stream(fake_llm: FakeLLM, transport: str) -> None:
    fake_llm.script(Behaviour(tokens=1000, delay_s=0.01))
    with trio.fail_after(DEADLINE_S):
        async with (
            running_server(http_settings(fake_llm, llm_transport=transport)) as server,
            ws_client(server.ws_url) as client,
        ):
            await client.send({"type": "chat", "id": "r1", "message": "go"})
            await client.wait_for("r1", lambda m: m.get("content"))
            stopped_at = trio.current_time()
            await client.send({"type": "stop", "id": "r1"})
            messages = await client.finish("r1")
            record = fake_llm.streams[0]
            await record.closed.wait()
            # The connection still works after a stop.
            again = await client.chat("again", id="r2")
    terminal = assert_stream_invariants(messages)
    assert terminal["type"] == "stopped"
    assert terminal["reason"] == "stop"
    assert record.outcome == "client_closed"
    assert record.client_closed_at is not None
    assert record.client_closed_at - stopped_at < 1.0
    assert record.tokens_sent < 1000
    assert assert_stream_invariants(again)["type"] == "completion"


async def test_closing_the_websocket_cancels_every_upstream_stream(fake_llm: FakeLLM) -> None:
    fake_llm.default = Behaviour(tokens=1000, delay_s=0.01)
    with trio.fail_after(DEADLINE_S):
        async with running_server(http_settings(fake_llm)) as server:
            async with ws_client(server.ws_url) as client:
                for request_id in ("a", "b", "c"):
                    await client.send({"type": "chat", "id": request_id, "message": "go"})
                for request_id in ("a", "b", "c"):
                    await client.wait_for(request_id, lambda m: m.get("content"))
            for index in range(3):
                await fake_llm.streams[index].closed.wait()
    assert [s.outcome for s in fake_llm.streams] == ["client_closed"] * 3


async def test_other_clients_are_unaffected_by_a_bad_client(fake_llm: FakeLLM) -> None:
    fake_llm.default = Behaviour(tokens=30, delay_s=0.005)
    with trio.fail_after(DEADLINE_S):
        async with (
            running_server(http_settings(fake_llm)) as server,
            ws_client(server.ws_url) as good,
            ws_client(server.ws_url) as bad,
        ):
            await good.send({"type": "chat", "id": "g", "message": "hi"})
            for frame in ("{not json", '{"type": "chat", "message": 5}', '{"type": "nope"}'):
                await bad.send(frame)
                error = await bad.receive_control()
                assert error["type"] == "error"
            await bad.ws.send_message(b"\x00\x01")
            assert (await bad.receive_control())["code"] == "binary_not_supported"
            messages = await good.finish("g")
            assert bad.messages.by_request == {}
    assert assert_stream_invariants(messages)["type"] == "completion"
    assert len(content_of(messages).split()) == 30


async def test_message_over_the_limit_gets_an_error_and_the_connection_lives(
    fake_llm: FakeLLM,
) -> None:
    settings = http_settings(fake_llm, max_message_bytes=1024)
    with trio.fail_after(DEADLINE_S):
        async with running_server(settings) as server, ws_client(server.ws_url) as client:
            await client.send({"type": "chat", "message": "x" * 2000})
            error = await client.receive_control()
            assert error["code"] == "message_too_large"
            assert error["id"] is None
            messages = await client.chat("small", id="r1")
    assert assert_stream_invariants(messages)["type"] == "completion"


async def test_frame_over_the_hard_limit_closes_with_1009(fake_llm: FakeLLM) -> None:
    settings = http_settings(fake_llm, max_frame_bytes=4096, max_message_bytes=1024)
    with trio.fail_after(DEADLINE_S):
        async with running_server(settings) as server:
            code = await raw_websocket_close_code(server.ws_url, "x" * 10_000)
            assert code == 1009
            # The server keeps serving others.
            async with ws_client(server.ws_url) as other:
                messages = await other.chat("still there?", id="r1")
    assert assert_stream_invariants(messages)["type"] == "completion"


async def test_the_most_recent_offered_subprotocol_is_selected(fake_llm: FakeLLM) -> None:
    with trio.fail_after(DEADLINE_S):
        async with running_server(http_settings(fake_llm)) as server:
            async with ws_client(server.ws_url, subprotocols=["aether.v1", "aether.v2"]) as both:
                assert both.ws.subprotocol == "aether.v2"
                assert both.hello["protocol_version"] == 2
            async with ws_client(server.ws_url, subprotocols=["aether.v1"]) as old:
                assert old.ws.subprotocol == "aether.v1"


async def test_ping_gets_pong(fake_llm: FakeLLM) -> None:
    with trio.fail_after(DEADLINE_S):
        async with (
            running_server(http_settings(fake_llm)) as server,
            ws_client(server.ws_url) as client,
        ):
            await client.send({"type": "ping"})
            assert (await client.receive_control())["type"] == "pong"


async def test_shutdown_stops_running_chats_and_closes_with_1001(fake_llm: FakeLLM) -> None:
    fake_llm.default = Behaviour(tokens=10_000, delay_s=0.01)
    settings = http_settings(fake_llm, shutdown_grace_s=0.2)
    with trio.fail_after(DEADLINE_S):
        async with running_server(settings) as server, ws_client(server.ws_url) as client:
            await client.send({"type": "chat", "id": "r1", "message": "go"})
            await client.wait_for("r1", lambda m: m.get("content"))
            server.stop()
            messages = await client.finish("r1")
            with pytest.raises(ConnectionClosed) as closed:
                await client.receive()
            await fake_llm.streams[0].closed.wait()
    terminal = assert_stream_invariants(messages)
    assert (terminal["type"], terminal["reason"]) == ("stopped", "shutdown")
    assert closed.value.reason.code == 1001
    assert fake_llm.streams[0].outcome == "client_closed"
