"""Deadlines that guard the server, in virtual time: keepalives, stalled clients, SSE chats
whose reader never came."""

from __future__ import annotations

from typing import Any

import pytest
import trio
import trio.testing

from aether.core.chat import ChatRequest
from aether.core.runtime.engine import READER_ATTACH_TIMEOUT_S, RuntimeEngine
from aether.core.runtime.outbox import Outbox
from tests.helpers import make_settings
from tests.memory_ws import MemoryServer, MemoryWebSocket

LONG_MESSAGE = " ".join(f"w{i}" for i in range(10_000))


async def read_until_closed(ws: MemoryWebSocket) -> None:
    while True:
        await ws.receive()


async def test_an_idle_connection_gets_a_keepalive(
    autojump_clock: Any, nursery: trio.Nursery
) -> None:
    server = MemoryServer(make_settings(provider="echo", ws_keepalive_s=20), nursery)
    await server.start()
    connected_at = trio.current_time()
    ws = await server.connect()
    assert await ws.receive() == {"role": "server", "type": "keepalive"}
    assert trio.current_time() - connected_at == 20
    await ws.send({"type": "ping"})
    assert (await ws.receive())["type"] == "pong"
    pong_at = trio.current_time()
    assert await ws.receive() == {"role": "server", "type": "keepalive"}
    assert trio.current_time() - pong_at == 20


async def test_a_stalled_client_is_closed_with_1013_after_the_deadline(
    autojump_clock: Any, nursery: trio.Nursery
) -> None:
    settings = make_settings(
        provider="echo", echo_token_delay_s=0, outbox_max_bytes=1024, slow_client_timeout_s=30
    )
    server = MemoryServer(settings, nursery)
    await server.start()
    ws = await server.connect(client_buffer=0)
    await ws.send({"type": "chat", "id": "r1", "message": LONG_MESSAGE})
    connection = next(iter(server.hub))
    await connection.outbox.stalled.wait_value(True)
    stalled_at = trio.current_time()
    await server.engine.tracker.wait_until_idle()
    record = server.engine.tracker.get("r1", "anonymous")
    assert record is not None
    assert record.ended_at == stalled_at + 30
    assert (record.state, record.stop_reason) == ("stopped", "disconnect")
    with pytest.raises(EOFError):
        await read_until_closed(ws)
    assert ws.closed_with == 1013


async def test_a_client_that_reads_slowly_is_not_disconnected(
    autojump_clock: Any, nursery: trio.Nursery
) -> None:
    settings = make_settings(
        provider="echo", echo_token_delay_s=0, outbox_max_bytes=1024, slow_client_timeout_s=30
    )
    server = MemoryServer(settings, nursery)
    await server.start()
    ws = await server.connect(client_buffer=0)
    await ws.send({"type": "chat", "id": "r1", "message": " ".join(["w"] * 3000)})
    while not ws.messages.finished("r1"):
        await trio.sleep(20)  # a slow reader: one message every 20 s, never 30 s idle
        await ws.receive()
    assert ws.messages.by_request["r1"][-1]["type"] == "completion"
    assert ws.closed_with is None


async def test_a_detached_chat_nobody_reads_is_stopped(
    autojump_clock: Any, nursery: trio.Nursery
) -> None:
    engine = RuntimeEngine(make_settings(provider="echo", echo_token_delay_s=1))
    await engine.start(nursery)
    request = ChatRequest(id="s1", owner="anonymous", message=LONG_MESSAGE)
    record = await engine.start_detached_chat(request, Outbox(1 << 20))
    await engine.tracker.wait_until_idle()
    assert record.ended_at is not None
    assert record.ended_at - record.started_at == READER_ATTACH_TIMEOUT_S
    assert (record.state, record.stop_reason) == ("stopped", "disconnect")
    engine.stop()


async def test_nothing_starts_on_a_connection_the_server_is_closing(
    autojump_clock: Any, nursery: trio.Nursery
) -> None:
    """A client that floods without reading is closed (1008); the chats it queued behind the
    flood must not start: they would stream to nobody and wait on their final saves."""
    settings = make_settings(provider="echo", max_messages_per_second=10_000)
    server = MemoryServer(settings, nursery)
    await server.start()
    ws = await server.connect(client_buffer=0)
    for _ in range(300):  # more unread replies than a connection may hold
        await ws.send({"type": "ping"})
    for number in range(3):
        await ws.send({"type": "chat", "id": f"late-{number}", "message": "hi"})
    await trio.testing.wait_all_tasks_blocked()
    connection = next(iter(server.hub))
    assert connection.closing
    assert connection.close_code == 1008
    assert server.engine.tracker.live_count == 0
    with pytest.raises(EOFError):
        await read_until_closed(ws)
    assert ws.closed_with == 1008
    assert not any(request_id.startswith("late-") for request_id in ws.messages.by_request)
    assert all(
        record is None
        for record in (server.engine.tracker.get(f"late-{n}", "anonymous") for n in range(3))
    )
