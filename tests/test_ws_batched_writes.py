"""A WebSocket client's writer sends what it took from the outbox in one write to the socket
(``SEND_BATCH``): every frame arrives, intact and in order, with and without permessage-deflate;
the server's writes are counted where Hypercorn hands bytes to the socket. In memory, without the
extension, one send per message as before. And a write goes to the socket without a scheduling
round first."""

from __future__ import annotations

import json
import os
from typing import Any

import pytest
import trio
import trio.testing
from hypercorn.config import Config
from hypercorn.events import Event, RawData
from hypercorn.trio.worker_context import WorkerContext
from wsproto.events import TextMessage

from aether.server.worker import AetherTCPServer, takes_at_once
from aether.testing.fake_llm import Behaviour, FakeLLM
from aether.ws.hub import MAX_WRITE_CHARS, encode, writes
from tests.helpers import (
    RawWebSocket,
    assert_stream_invariants,
    content_of,
    http_settings,
    make_settings,
    running_server,
)
from tests.memory_ws import MemoryServer

# The bursts are made-up messages put straight into a client's outbox.
pytestmark = pytest.mark.synthetic_messages

DEADLINE_S = 10

# Many small frames (one write), and frames that add up to several writes' worth, one of them
# larger than a write may hold.
SMALL_BURST = [{"role": "server", "type": "pong", "n": n} for n in range(200)]
LARGE_BURST = [
    {"role": "server", "type": "pong", "n": n, "pad": "x" * (MAX_WRITE_CHARS // 10)}
    for n in range(40)
] + [{"role": "server", "type": "pong", "n": 40, "pad": "y" * (MAX_WRITE_CHARS * 2)}]


@pytest.fixture
def server_writes(monkeypatch: pytest.MonkeyPatch) -> list[bytes]:
    """The bytes of every write Hypercorn hands to a socket, in order (connections opened
    after the fixture began)."""
    written: list[bytes] = []
    protocol_send = AetherTCPServer.protocol_send

    async def recording(self: AetherTCPServer, event: Event) -> None:
        if isinstance(event, RawData):
            written.append(event.data)
        await protocol_send(self, event)

    monkeypatch.setattr(AetherTCPServer, "protocol_send", recording)
    return written


class FrameReader:
    """Reads whole text frames from a bare wsproto client, counting the bytes on the wire."""

    def __init__(self, client: RawWebSocket) -> None:
        self.client = client
        self.wire_bytes = 0
        self._parts: list[str] = []
        self._texts: list[str] = []

    async def texts(self, count: int) -> list[str]:
        while len(self._texts) < count:
            data = await self.client.stream.receive_some(65536)
            assert data, "the server closed the connection"
            self.wire_bytes += len(data)
            self.client.ws.receive_data(data)
            for event in self.client.ws.events():
                if isinstance(event, TextMessage):
                    self._parts.append(event.data)
                    if event.message_finished:
                        self._texts.append("".join(self._parts))
                        self._parts.clear()
        taken, self._texts = self._texts[:count], self._texts[count:]
        return taken

    async def messages_until_terminal(self, request_id: str) -> list[dict[str, Any]]:
        messages: list[dict[str, Any]] = []
        while not messages or messages[-1]["type"] not in ("completion", "stopped", "error"):
            message = json.loads((await self.texts(1))[0])
            if message.get("id") == request_id:
                messages.append(message)
        return messages


@pytest.mark.parametrize("deflate", [False, True], ids=["plain", "deflate"])
@pytest.mark.parametrize("burst", [SMALL_BURST, LARGE_BURST], ids=["small", "large"])
async def test_a_burst_arrives_frame_by_frame_in_order_in_as_few_writes_as_allowed(
    fake_llm: FakeLLM, server_writes: list[bytes], deflate: bool, burst: list[dict[str, Any]]
) -> None:
    expected_texts = [encode(message) for message in burst]
    expected_writes = len(list(writes(burst)))
    with trio.fail_after(DEADLINE_S):
        async with running_server(http_settings(fake_llm)) as server:
            client = await RawWebSocket.connect(server.ws_url, deflate=deflate)
            async with client.stream:
                reader = FrameReader(client)
                assert json.loads((await reader.texts(1))[0])["type"] == "hello"
                connection = next(iter(server.hub))
                server_writes.clear()
                reader.wire_bytes = 0
                for message in burst:  # all queued at once, as a relay's closing messages are
                    assert connection.outbox.put_control(dict(message))
                texts = await reader.texts(len(burst))
    assert texts == expected_texts
    assert len(server_writes) == expected_writes < len(burst)
    if burst is SMALL_BURST:
        assert expected_writes == 1
    else:
        assert expected_writes > 2  # split, the largest frame in a write of its own
    text_bytes = sum(len(text) for text in expected_texts)
    if deflate:
        assert reader.wire_bytes < text_bytes / 4  # compressed: the frames repeat themselves
    else:
        assert reader.wire_bytes > text_bytes


@pytest.mark.parametrize("deflate", [False, True], ids=["plain", "deflate"])
async def test_a_streamed_chat_arrives_intact_with_and_without_compression(
    fake_llm: FakeLLM, server_writes: list[bytes], deflate: bool
) -> None:
    fake_llm.script(Behaviour(tokens=300))
    with trio.fail_after(DEADLINE_S):
        async with running_server(http_settings(fake_llm)) as server:
            client = await RawWebSocket.connect(server.ws_url, deflate=deflate)
            async with client.stream:
                reader = FrameReader(client)
                await reader.texts(1)  # hello
                server_writes.clear()
                await client.send({"type": "chat", "id": "r1", "message": "go"})
                messages = await reader.messages_until_terminal("r1")
    assert assert_stream_invariants(messages)["type"] == "completion"
    assert content_of(messages) == "".join(f"tok{n} " for n in range(300))
    assert len(server_writes) <= len(messages)


async def stop_after_first_token(ws_url: str) -> list[dict[str, Any]]:
    """Over a raw WebSocket: a chat, stopped once its first token came; its messages."""
    client = await RawWebSocket.connect(ws_url)
    async with client.stream:
        reader = FrameReader(client)
        await reader.texts(1)  # hello
        await client.send({"type": "chat", "id": "r1", "message": "go"})
        first = await reader.texts(1)
        while "content" not in json.loads(first[0]):
            first = await reader.texts(1)
        await client.send({"type": "stop", "id": "r1"})
        return await reader.messages_until_terminal("r1")


async def test_a_stop_sends_the_block_end_and_stopped_in_one_write(
    fake_llm: FakeLLM, server_writes: list[bytes]
) -> None:
    fake_llm.script(Behaviour(tokens=1000, delay_s=0.01))
    with trio.fail_after(DEADLINE_S):
        async with running_server(http_settings(fake_llm)) as server:
            messages = await stop_after_first_token(server.ws_url)
    end, stopped = messages[-2:]
    assert (end["type"], end.get("end"), stopped["type"]) == ("message", True, "stopped")
    [last_write] = [data for data in server_writes if b'"type":"stopped"' in data]
    assert b'"end":true' in last_write


async def test_in_memory_without_the_extension_each_message_is_one_send(
    autojump_clock: Any, nursery: trio.Nursery
) -> None:
    server = MemoryServer(make_settings(provider="echo"), nursery)
    await server.start()
    ws = await server.connect()
    connection = next(iter(server.hub))
    for message in SMALL_BURST:
        connection.outbox.put_control(dict(message))
    received = [await ws.receive() for _ in SMALL_BURST]
    assert received == SMALL_BURST
    assert ws.writes == [1] * (1 + len(SMALL_BURST))  # the hello, then each message


async def test_in_memory_with_the_extension_a_batch_goes_in_few_sends_and_then_counts_as_sent(
    autojump_clock: Any, nursery: trio.Nursery
) -> None:
    server = MemoryServer(make_settings(provider="echo"), nursery)
    await server.start()
    ws = await server.connect(client_buffer=0, batches=True)
    connection = next(iter(server.hub))
    for message in LARGE_BURST:
        connection.outbox.put_control(dict(message))
    received = []
    for _ in LARGE_BURST:
        await trio.sleep(1)  # a slow reader: the last frame is taken 41 s from now
        received.append(await ws.receive())
    await trio.testing.wait_all_tasks_blocked()
    assert received == LARGE_BURST
    assert ws.writes == [1] + [len(texts) for texts in writes(LARGE_BURST)]
    # The writer counts a write as sent once the server took all of it.
    assert connection.last_sent_at == trio.current_time()


class TaskSteps(trio.abc.Instrument):
    """Counts the scheduling steps of one task: each time it yielded and ran again, one more."""

    def __init__(self) -> None:
        self.task = trio.lowlevel.current_task()
        self.count = 0

    def after_task_step(self, task: trio.lowlevel.Task) -> None:
        if task is self.task:
            self.count += 1


class RecordingStream:
    """Stands in for a connection's socket: records what is sent, and the sender's steps."""

    def __init__(self, steps: TaskSteps) -> None:
        self.steps = steps
        self.sent: list[tuple[bytes, int]] = []

    async def send_all(self, data: bytes) -> None:
        self.sent.append((data, self.steps.count))
        await trio.lowlevel.checkpoint()


async def test_a_write_reaches_the_socket_without_a_scheduling_round_first() -> None:
    steps = TaskSteps()
    stream = RecordingStream(steps)
    server = AetherTCPServer(None, Config(), WorkerContext(None), {}, stream)  # type: ignore[arg-type]
    trio.lowlevel.add_instrument(steps)
    try:
        before = steps.count
        await server.protocol_send(RawData(data=b"frame"))
    finally:
        trio.lowlevel.remove_instrument(steps)
    # The lock was free: the bytes left before the task yielded (trio.Lock.acquire yields).
    assert stream.sent == [(b"frame", before)]


async def test_a_write_waits_while_another_holds_the_send_lock(nursery: trio.Nursery) -> None:
    sent: list[bytes] = []

    class Stream:
        async def send_all(self, data: bytes) -> None:
            sent.append(data)
            await trio.lowlevel.checkpoint()

    server = AetherTCPServer(None, Config(), WorkerContext(None), {}, Stream())  # type: ignore[arg-type]
    async with server.send_lock:
        nursery.start_soon(server.protocol_send, RawData(data=b"second"))
        await trio.testing.wait_all_tasks_blocked()
        sent.append(b"first")  # what the holder sends
    await trio.testing.wait_all_tasks_blocked()
    assert sent == [b"first", b"second"]


async def test_a_stops_reply_leaves_from_the_task_that_read_the_stop(
    fake_llm: FakeLLM, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The writer would send ``stopped`` a scheduling round later, among every task a burst of
    # stops woke; the reading task sends it itself when the socket takes it at once.
    writers: list[tuple[bytes, str]] = []
    protocol_send = AetherTCPServer.protocol_send

    async def recording(self: AetherTCPServer, event: Event) -> None:
        if isinstance(event, RawData):
            writers.append((event.data, trio.lowlevel.current_task().name))
        await protocol_send(self, event)

    monkeypatch.setattr(AetherTCPServer, "protocol_send", recording)
    fake_llm.script(Behaviour(tokens=1000, delay_s=0.01))
    with trio.fail_after(DEADLINE_S):
        async with running_server(http_settings(fake_llm)) as server:
            messages = await stop_after_first_token(server.ws_url)
    assert messages[-1]["type"] == "stopped"
    [stopped_by] = [task for data, task in writers if b'"type":"stopped"' in data]
    [hello_by] = [task for data, task in writers if b'"type":"hello"' in data]
    assert hello_by.endswith("WebSocketEndpoint._write")  # the connection's writer
    assert stopped_by != hello_by


async def test_stops_from_a_client_that_stopped_reading_are_each_handled(
    fake_llm: FakeLLM,
) -> None:
    # While its writer waits on the full socket, the reading task leaves the replies to it: a
    # reply sent from the reading task would hold the next frame up behind the client.
    fake_llm.default = Behaviour(tokens=1_000_000)
    settings = http_settings(fake_llm, outbox_max_bytes=4096)
    with trio.fail_after(DEADLINE_S):
        async with running_server(settings) as server:
            client = await RawWebSocket.connect(server.ws_url, receive_buffer=4096)
            try:
                for request_id in ("r1", "r2"):
                    await client.send({"type": "chat", "id": request_id, "message": "go"})
                    await fake_llm.wait_for_stream(int(request_id[1]) - 1)
                connection = next(iter(server.hub))
                await connection.outbox.stalled.wait_value(True)
                for request_id in ("r1", "r2"):
                    await client.send({"type": "stop", "id": request_id})
                await server.state.engine.tracker.wait_until_idle()
            finally:
                await client.aclose()
    states = [server.state.engine.tracker.get(r, "anonymous") for r in ("r1", "r2")]
    assert [(s.state, s.stop_reason) for s in states if s is not None] == [
        ("stopped", "stop"),
        ("stopped", "stop"),
    ]


async def test_a_socket_takes_a_small_write_at_once_until_its_peer_stops_reading() -> None:
    listener = (await trio.open_tcp_listeners(0, host="127.0.0.1"))[0]
    async with listener:
        port = listener.socket.getsockname()[1]
        peer = await trio.open_tcp_stream("127.0.0.1", port)
        async with peer, await listener.accept() as stream:
            server = AetherTCPServer(None, Config(), WorkerContext(None), {}, stream)  # type: ignore[arg-type]
            assert server.writable_now(300)
            async with server.send_lock:
                assert not server.writable_now(300)  # another task is sending
            # The peer reads nothing: fill what the kernel takes (bounded: its buffers).
            sent = 0
            while server.writable_now(300) and sent < 64 << 20:
                try:
                    sent += os.write(stream.socket.fileno(), b"x" * 65536)
                except BlockingIOError:
                    break
            assert sent > 0
            assert not takes_at_once(stream.socket, 300)
