"""Clients that stop reading, vanish, or outlive the server: bounded memory, prompt cleanup."""

from __future__ import annotations

import time

import httpx
import pytest
import trio
import trio.testing
from trio_websocket import ConnectionClosed

from aether.testing.fake_llm import Behaviour, FakeLLM
from tests.helpers import (
    RawWebSocket,
    WSClient,
    assert_stream_invariants,
    http_settings,
    make_settings,
    running_server,
    ws_client,
)

DEADLINE_S = 15


async def read_until_closed(client: WSClient) -> None:
    while True:
        await client.receive()


async def test_a_client_that_stops_reading_is_bounded_then_disconnected(
    fake_llm: FakeLLM,
) -> None:
    fake_llm.default = Behaviour(tokens=1_000_000)
    settings = http_settings(fake_llm, outbox_max_bytes=4096, slow_client_timeout_s=1.0)
    with trio.fail_after(DEADLINE_S):
        async with running_server(settings) as server:
            client = await RawWebSocket.connect(server.ws_url, receive_buffer=4096)
            try:
                await client.send({"type": "chat", "id": "r1", "message": "go"})
                record = await fake_llm.wait_for_stream(0)
                # While stalled, what the server holds for the client stays within its budget.
                connection = next(iter(server.hub))
                await connection.outbox.stalled.wait_value(True)
                assert connection.outbox.pending_bytes <= 4096 + 1024
                started = trio.current_time()
                await record.closed.wait()
                detected_after = trio.current_time() - started
            finally:
                await client.aclose()
            await server.hub.wait_until_empty()
    assert record.outcome == "client_closed"
    assert record.tokens_sent < 1_000_000  # backpressure reached the upstream
    assert detected_after < 3.0
    request = server.state.engine.tracker.get("r1", "anonymous")
    assert request is not None
    assert request.state == "stopped"


async def test_a_vanished_client_stops_its_streams_and_leaves_the_server_idle(
    fake_llm: FakeLLM,
) -> None:
    fake_llm.default = Behaviour(tokens=100_000, delay_s=0.001)
    with trio.fail_after(DEADLINE_S):
        async with running_server(http_settings(fake_llm)) as server:
            client = await RawWebSocket.connect(server.ws_url)
            for request_id in ("a", "b"):
                await client.send({"type": "chat", "id": request_id, "message": "go"})
            records = [await fake_llm.wait_for_stream(i) for i in (0, 1)]
            client.reset()
            vanished_at = trio.current_time()
            for record in records:
                await record.closed.wait()
            closed_after = trio.current_time() - vanished_at
            await server.hub.wait_until_empty()
            await server.state.engine.tracker.wait_until_idle()
            cpu_before = time.process_time()
            await trio.sleep(0.5)
            idle_cpu_s = time.process_time() - cpu_before
    assert [r.outcome for r in records] == ["client_closed", "client_closed"]
    assert closed_after < 0.5
    assert idle_cpu_s < 0.1  # nothing spins once the client is gone


async def test_shutdown_refuses_new_work_and_warns_clients(fake_llm: FakeLLM) -> None:
    fake_llm.default = Behaviour(tokens=10_000, delay_s=0.01)
    settings = http_settings(fake_llm, shutdown_grace_s=0.5)
    with trio.fail_after(DEADLINE_S):
        async with running_server(settings) as server, ws_client(server.ws_url) as client:
            await client.send({"type": "chat", "id": "r1", "message": "go"})
            await client.wait_for("r1", lambda m: m.get("content"))
            server.stop()
            notice = await client.receive_control()
            await client.send({"type": "chat", "id": "r2", "message": "late"})
            refused = await client.receive_control()
            port = int(server.base_url.rsplit(":", 1)[1])
            with pytest.raises(OSError, match="all attempts to connect"):
                await trio.open_tcp_stream("127.0.0.1", port)
            messages = await client.finish("r1")
            with pytest.raises(ConnectionClosed):
                await read_until_closed(client)
    assert notice == {"role": "server", "type": "going_away", "grace_s": 0.5}
    assert (refused["code"], refused["ref"]) == ("shutting_down", {"type": "chat", "id": "r2"})
    terminal = assert_stream_invariants(messages)
    assert (terminal["type"], terminal["reason"]) == ("stopped", "shutdown")


async def test_per_caller_limit_covers_every_transport(fake_llm: FakeLLM) -> None:
    fake_llm.default = Behaviour(tokens=10_000, delay_s=0.01)
    settings = http_settings(fake_llm, max_requests_per_caller=2)
    with trio.fail_after(DEADLINE_S):
        async with (
            running_server(settings) as server,
            ws_client(server.ws_url) as client,
            httpx.AsyncClient(base_url=server.base_url) as rest,
        ):
            for request_id in ("a", "b"):
                await client.send({"type": "chat", "id": request_id, "message": "go"})
                await client.wait_for(request_id, lambda m: m["type"] == "accepted")
            refused = await rest.post("/v1/chat/stream", json={"message": "one more"})
            await client.send({"type": "chat", "id": "c", "message": "go"})
            ws_refused = await client.receive_control()
    assert refused.status_code == 429
    assert refused.json()["error"]["code"] == "too_many_requests"
    assert ws_refused["code"] == "too_many_requests"


async def test_shutdown_completes_while_a_client_has_stopped_reading(fake_llm: FakeLLM) -> None:
    fake_llm.default = Behaviour(tokens=1_000_000)
    settings = http_settings(
        fake_llm, outbox_max_bytes=4096, slow_client_timeout_s=1.0, shutdown_grace_s=0.2
    )
    with trio.fail_after(DEADLINE_S):
        async with running_server(settings) as server:
            client = await RawWebSocket.connect(server.ws_url, receive_buffer=4096)
            await client.send({"type": "chat", "id": "r1", "message": "go"})
            record = await fake_llm.wait_for_stream(0)
            connection = next(iter(server.hub))
            await connection.outbox.stalled.wait_value(True)
            stopping_at = trio.current_time()
            server.stop()
        stopped_after = trio.current_time() - stopping_at
        await client.aclose()
    assert record.outcome == "client_closed"
    # Bounded by the grace period plus the kernel's TCP_USER_TIMEOUT on the stuck send.
    assert stopped_after < 5.0


async def test_idle_sse_streams_get_heartbeats(fake_llm: FakeLLM) -> None:
    fake_llm.script(Behaviour(tokens=2, first_token_delay_s=0.5))
    settings = http_settings(fake_llm, sse_heartbeat_s=0.1)
    with trio.fail_after(DEADLINE_S):
        async with (
            running_server(settings) as server,
            httpx.AsyncClient(base_url=server.base_url) as client,
        ):
            response = await client.post("/v1/chat/stream", json={"message": "hi"})
    comments = [line for line in response.text.splitlines() if line.startswith(":")]
    assert len(comments) >= 3
    assert set(comments) == {": keepalive"}
    assert '"type":"completion"' in response.text


async def test_oversized_rest_body_gets_413() -> None:
    settings = make_settings(provider="echo", max_body_bytes=2048)
    with trio.fail_after(DEADLINE_S):
        async with (
            running_server(settings) as server,
            httpx.AsyncClient(base_url=server.base_url) as client,
        ):
            response = await client.post("/v1/chat", json={"message": "x" * 5000})
    assert response.status_code == 413
    assert response.json()["error"]["code"] == "request_entity_too_large"
