"""Deterministic stop and disconnect behaviour: in-memory WebSocket, echo model, virtual time.

The echo model emits its block start at once and then one token per second of (virtual) time,
so every assertion about *when* something happened is exact.
"""

from __future__ import annotations

from typing import Any

import pytest
import trio
import trio.testing

from aether.core.chat import ChatRequest, Chunk
from aether.core.providers.echo import EchoProvider
from tests.helpers import assert_stream_invariants, content_of, make_settings
from tests.memory_ws import MemoryServer, MemoryWebSocket

MESSAGE = "one two three four five"
TOKENS = ["one", " two", " three", " four", " five"]


@pytest.fixture
async def server(nursery: trio.Nursery) -> MemoryServer:
    server = MemoryServer(make_settings(provider="echo", echo_token_delay_s=1.0), nursery)
    await server.start()
    return server


@pytest.fixture
async def ws(server: MemoryServer) -> MemoryWebSocket:
    return await server.connect()


def is_delta(message: dict[str, Any]) -> bool:
    return message["type"] == "message" and "content" in message


async def wait_for_deltas(ws: MemoryWebSocket, request_id: str, count: int) -> None:
    while sum(map(is_delta, ws.messages.by_request.get(request_id, []))) < count:
        await ws.receive()


async def test_chat_streams_tokens_then_completion(
    autojump_clock: Any, ws: MemoryWebSocket
) -> None:
    start = trio.current_time()
    await ws.send({"type": "chat", "id": "r1", "message": MESSAGE})
    messages = await ws.finish("r1")
    terminal = assert_stream_invariants(messages)
    assert terminal["type"] == "completion"
    assert [m["type"] for m in messages[:2]] == ["accepted", "message"]
    assert messages[0]["path"] == "echo"
    assert [m["content"] for m in messages if is_delta(m)] == TOKENS
    delta_times = [t - start for t, m in ws.received if m.get("id") == "r1" and is_delta(m)]
    assert delta_times == [1.0, 2.0, 3.0, 4.0, 5.0]


async def test_server_assigns_an_id_when_the_client_gives_none(
    autojump_clock: Any, ws: MemoryWebSocket
) -> None:
    await ws.send({"type": "chat", "message": "hi"})
    accepted = await ws.receive()
    assert accepted["type"] == "accepted"
    assert accepted["seq"] == 0
    assert accepted["id"].startswith("r-")
    messages = await ws.finish(accepted["id"])
    assert assert_stream_invariants(messages)["type"] == "completion"


async def test_stop_before_first_token(
    autojump_clock: Any, server: MemoryServer, ws: MemoryWebSocket
) -> None:
    await ws.send({"type": "chat", "id": "r1", "message": MESSAGE})
    await trio.testing.wait_all_tasks_blocked()
    stop_at = trio.current_time()
    await ws.send({"type": "stop", "id": "r1"})
    messages = await ws.finish("r1")
    assert trio.current_time() == stop_at
    terminal = assert_stream_invariants(messages)
    usage = terminal.pop("usage")
    assert terminal == {"role": "server", "type": "stopped", "reason": "stop", "id": "r1", "seq": 3}
    assert (usage["completion_tokens"], usage["estimated"]) == (0, True)  # nothing generated
    assert content_of(messages) == ""
    assert server.engine.tracker.get("r1", "anonymous").state == "stopped"


async def test_stop_mid_stream_ends_the_block_and_nothing_follows(
    autojump_clock: Any, server: MemoryServer, ws: MemoryWebSocket
) -> None:
    start = trio.current_time()
    await ws.send({"type": "chat", "id": "r1", "message": MESSAGE})
    await wait_for_deltas(ws, "r1", 2)
    await ws.send({"type": "stop", "id": "r1"})
    messages = await ws.finish("r1")
    assert trio.current_time() - start == 2.0
    assert assert_stream_invariants(messages)["type"] == "stopped"
    assert content_of(messages) == "one two"
    assert messages[-2] == {
        "role": "assistant",
        "type": "message",
        "end": True,
        "id": "r1",
        "seq": 4,
    }
    # Long after the echo would have finished, nothing more of r1 has arrived.
    await trio.sleep(10)
    assert [m for m in ws.drain() if m.get("id") == "r1"] == []
    assert server.engine.tracker.live_count == 0


class SlowToCloseEcho(EchoProvider):
    """The echo model, but closing it after a stop takes CLOSE_S: like a model stream whose
    teardown must wait (a thread told to stop, a socket that lingers)."""

    CLOSE_S = 5.0

    def __init__(self) -> None:
        super().__init__(token_delay_s=1.0)
        self.closed_at: float | None = None

    async def stream(self, request: ChatRequest, send: trio.MemorySendChannel[Chunk]) -> None:
        try:
            await super().stream(request, send)
        finally:
            with trio.CancelScope(shield=True):
                await trio.sleep(self.CLOSE_S)
            self.closed_at = trio.current_time()


async def test_stopped_does_not_wait_for_the_model_stream_to_close(
    autojump_clock: Any, server: MemoryServer, ws: MemoryWebSocket
) -> None:
    slow = SlowToCloseEcho()
    server.engine.streamer._providers[("aether-echo", "echo")] = slow  # the path "echo" asks for
    await ws.send({"type": "chat", "id": "r1", "message": MESSAGE, "path": "echo"})
    await wait_for_deltas(ws, "r1", 2)
    stop_at = trio.current_time()
    await ws.send({"type": "stop", "id": "r1"})
    messages = await ws.finish("r1")
    assert trio.current_time() == stop_at
    assert assert_stream_invariants(messages)["type"] == "stopped"
    record = server.engine.tracker.get("r1", "anonymous")
    assert record is not None
    assert record.state == "stopped"
    # The request stays live (its id taken, its limits held) until its model stream is closed.
    assert slow.closed_at is None
    assert server.engine.tracker.get_live("r1", "anonymous") is record
    await ws.send({"type": "chat", "id": "r1", "message": "again"})
    refused = await ws.receive()
    assert (refused["code"], refused["ref"]) == ("duplicate_request", {"type": "chat", "id": "r1"})
    await server.engine.tracker.wait_until_idle()
    assert slow.closed_at == stop_at + SlowToCloseEcho.CLOSE_S
    assert record.ended_at == slow.closed_at
    assert [m for m in ws.drain() if m.get("id") == "r1"] == []


async def test_stop_after_completion_is_an_unknown_request(
    autojump_clock: Any, ws: MemoryWebSocket
) -> None:
    await ws.send({"type": "chat", "id": "r1", "message": "hi"})
    await ws.finish("r1")
    await ws.send({"type": "stop", "id": "r1"})
    error = await ws.receive()
    assert error["type"] == "error"
    assert error["id"] is None
    assert error["code"] == "unknown_request"
    assert error["ref"] == {"type": "stop", "id": "r1"}
    assert len(ws.messages.by_request["r1"]) == 5  # accepted, start, "hi", end, completion


async def test_stop_twice_gives_one_terminal(autojump_clock: Any, ws: MemoryWebSocket) -> None:
    await ws.send({"type": "chat", "id": "r1", "message": MESSAGE})
    await wait_for_deltas(ws, "r1", 1)
    await ws.send({"type": "stop", "id": "r1"})
    await ws.send({"type": "stop", "id": "r1"})
    messages = await ws.finish("r1")
    assert assert_stream_invariants(messages)["type"] == "stopped"
    # The second stop either found the request still stopping (no answer) or already gone.
    await trio.testing.wait_all_tasks_blocked()
    extra = ws.drain()
    assert all(m["id"] is None and m["code"] == "unknown_request" for m in extra), extra
    assert [m for m in ws.messages.by_request["r1"] if m["type"] == "stopped"] == [messages[-1]]


async def test_stopping_one_chat_leaves_the_others_running(
    autojump_clock: Any, ws: MemoryWebSocket
) -> None:
    await ws.send({"type": "chat", "id": "a", "message": MESSAGE})
    await ws.send({"type": "chat", "id": "b", "message": MESSAGE})
    await wait_for_deltas(ws, "a", 1)
    await ws.send({"type": "stop", "id": "a"})
    a = await ws.finish("a")
    b = await ws.finish("b")
    assert assert_stream_invariants(a)["type"] == "stopped"
    assert assert_stream_invariants(b)["type"] == "completion"
    assert content_of(b) == MESSAGE


async def test_disconnect_stops_every_request_and_leaves_no_task(
    autojump_clock: Any, server: MemoryServer
) -> None:
    await trio.testing.wait_all_tasks_blocked()
    tasks_before = trio.lowlevel.current_statistics().tasks_living
    ws = await server.connect()
    for request_id in ("a", "b", "c"):
        await ws.send({"type": "chat", "id": request_id, "message": MESSAGE})
    await wait_for_deltas(ws, "c", 1)
    assert server.engine.tracker.live_count == 3
    await ws.disconnect()
    await trio.testing.wait_all_tasks_blocked()
    assert server.engine.tracker.live_count == 0
    assert len(server.hub) == 0
    for request_id in ("a", "b", "c"):
        record = server.engine.tracker.get(request_id, "anonymous")
        assert record is not None
        assert (record.state, record.stop_reason) == ("stopped", "disconnect")
    assert trio.lowlevel.current_statistics().tasks_living == tasks_before


@pytest.mark.parametrize("stop_after_s", [4.0, 4.5, 5.0, 5.5])
async def test_stop_racing_completion_gives_exactly_one_terminal(
    autojump_clock: Any, server: MemoryServer, ws: MemoryWebSocket, stop_after_s: float
) -> None:
    start = trio.current_time()
    await ws.send({"type": "chat", "id": "r1", "message": MESSAGE})
    await trio.sleep_until(start + stop_after_s)
    await ws.send({"type": "stop", "id": "r1"})
    messages = await ws.finish("r1")
    terminal = assert_stream_invariants(messages)
    await trio.testing.wait_all_tasks_blocked()
    late = ws.drain()
    if terminal["type"] == "completion":
        assert content_of(messages) == MESSAGE
        assert [m["code"] for m in late] == ["unknown_request"]
    else:
        assert terminal["type"] == "stopped"
        assert late == []
    assert server.engine.tracker.live_count == 0


async def test_duplicate_live_id_is_refused_without_touching_the_first(
    autojump_clock: Any, ws: MemoryWebSocket
) -> None:
    await ws.send({"type": "chat", "id": "r1", "message": MESSAGE})
    await wait_for_deltas(ws, "r1", 1)
    await ws.send({"type": "chat", "id": "r1", "message": "again"})
    await trio.testing.wait_all_tasks_blocked()
    errors = [m for m in ws.drain() if m.get("id") is None]
    assert [(e["code"], e["ref"]) for e in errors] == [
        ("duplicate_request", {"type": "chat", "id": "r1"})
    ]
    await ws.send({"type": "stop", "id": "r1"})
    messages = await ws.finish("r1")
    assert assert_stream_invariants(messages)["type"] == "stopped"


async def test_a_refused_duplicate_leaves_the_first_to_be_stopped_by_a_disconnect(
    autojump_clock: Any, server: MemoryServer, ws: MemoryWebSocket
) -> None:
    await ws.send({"type": "chat", "id": "r1", "message": MESSAGE})
    await wait_for_deltas(ws, "r1", 1)
    await ws.send({"type": "chat", "id": "r1", "message": "again"})
    await trio.testing.wait_all_tasks_blocked()
    left_at = trio.current_time()
    await ws.disconnect()
    await server.engine.tracker.wait_until_idle()
    record = server.engine.tracker.get("r1", "anonymous")
    assert record is not None
    assert (record.state, record.stop_reason) == ("stopped", "disconnect")
    assert record.ended_at == left_at


async def test_concurrent_chat_limit_per_connection(
    autojump_clock: Any, nursery: trio.Nursery
) -> None:
    settings = make_settings(provider="echo", echo_token_delay_s=1.0, max_requests_per_connection=2)
    server = MemoryServer(settings, nursery)
    await server.start()
    ws = await server.connect()
    for request_id in ("a", "b", "c"):
        await ws.send({"type": "chat", "id": request_id, "message": MESSAGE})
    error = await ws.receive()
    while error.get("id") is not None:
        error = await ws.receive()
    assert error["code"] == "too_many_requests"
    assert error["ref"] == {"type": "chat", "id": "c"}
    assert assert_stream_invariants(await ws.finish("a"))["type"] == "completion"


async def test_a_stop_queues_the_terminal_in_its_own_step(
    autojump_clock: Any, server: MemoryServer, ws: MemoryWebSocket
) -> None:
    """The terminal does not wait for the relay or the producer to notice the cancellation:
    once the stop returns, the block end and `stopped` are queued for the writer."""
    await ws.send({"type": "chat", "id": "r1", "message": MESSAGE})
    await wait_for_deltas(ws, "r1", 1)
    await trio.testing.wait_all_tasks_blocked()
    connection = next(iter(server.hub))
    assert connection.outbox.pending_messages == 0
    server.engine.stop_generation("r1", "anonymous")
    assert connection.outbox.pending_messages == 2
    messages = await ws.finish("r1")
    assert [m.get("end") or m["type"] for m in messages[-2:]] == [True, "stopped"]
    assert assert_stream_invariants(messages)["type"] == "stopped"
