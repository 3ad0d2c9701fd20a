"""What a closed WebSocket leaves behind, over real sockets.

``python -m aether`` tunes the collector to run rarely (``aether.main.tune_garbage_collector``):
anything a closed connection leaves in a reference cycle stays in memory until a full collection.
Every browser negotiates permessage-deflate, whose zlib state costs tens of KiB per connection,
so these tests open deflate connections and count, with the collector switched off, the server's
compression states still alive once the connections closed.

A closed connection is freed at once; one whose peer vanished (no close frame) stays in wsproto's
own cycle, which only a collection frees: full collections are paced by closes.
"""

from __future__ import annotations

import gc
import json
from collections.abc import Iterator
from contextlib import contextmanager
from urllib.parse import urlsplit

import trio
import trio.testing
from hypercorn.protocol.ws_stream import WSStream
from wsproto import ConnectionType, WSConnection
from wsproto.events import AcceptConnection, CloseConnection, Request, TextMessage
from wsproto.extensions import PerMessageDeflate
from wsproto.frame_protocol import FrameProtocol

from aether.core.collection_pacing import FULL_COLLECTIONS, FullCollectionPacer
from tests.helpers import make_settings, running_server

DEADLINE_S = 10
CONNECTIONS = 40


async def deflate_session(ws_url: str, *, close_frame: bool = True) -> None:
    """Open a WebSocket offering permessage-deflate (as browsers do), read the server's hello
    (sent compressed), then send a close frame and read until the server ends the stream; or,
    without ``close_frame``, end the TCP connection at once, as a vanished peer's ends."""
    parts = urlsplit(ws_url)
    assert parts.hostname is not None
    assert parts.port is not None
    stream = await trio.open_tcp_stream(parts.hostname, parts.port)
    async with stream:
        ws = WSConnection(ConnectionType.CLIENT)
        request = Request(host=parts.netloc, target=parts.path, extensions=[PerMessageDeflate()])
        await stream.send_all(ws.send(request))
        closing = False
        while data := await stream.receive_some(65536):
            ws.receive_data(data)
            for event in ws.events():
                if isinstance(event, AcceptConnection):
                    assert [type(ext) for ext in event.extensions] == [PerMessageDeflate]
                elif isinstance(event, TextMessage) and not closing:
                    assert json.loads(event.data)["type"] == "hello"
                    if not close_frame:
                        return
                    await stream.send_all(ws.send(CloseConnection(code=1000)))
                    closing = True
        assert closing, "the server closed the connection before its hello"


def server_compression_states() -> int:
    """The server-side wsproto frame protocols still alive that hold a permessage-deflate state
    (the client's own protocols are told apart by their ``client`` flag)."""
    return sum(
        1
        for obj in gc.get_objects()
        if isinstance(obj, FrameProtocol)
        and not obj.client
        and any(isinstance(ext, PerMessageDeflate) for ext in obj.extensions)
    )


def hypercorn_websocket_streams() -> int:
    return sum(1 for obj in gc.get_objects() if isinstance(obj, WSStream))


@contextmanager
def collector_off() -> Iterator[None]:
    """No automatic collection at all: what is alive afterwards was freed by reference counting
    or not at all, whatever the collector's thresholds would have done."""
    gc.collect()
    gc.disable()
    try:
        yield
    finally:
        gc.enable()
        gc.collect()


@contextmanager
def full_collections_paced(min_closes: int) -> Iterator[None]:
    FULL_COLLECTIONS.enable(min_closes)
    try:
        yield
    finally:
        FULL_COLLECTIONS.disable()


async def test_a_closed_deflate_websocket_is_freed_without_a_collection() -> None:
    settings = make_settings(rate_limit_exempt_ips=("127.0.0.1",), history=False)
    with trio.fail_after(DEADLINE_S):
        async with running_server(settings) as server:
            with collector_off():
                for _ in range(CONNECTIONS):
                    await deflate_session(server.ws_url)
                await trio.testing.wait_all_tasks_blocked()
                assert len(server.hub) == 0
                assert hypercorn_websocket_streams() == 0
                assert server_compression_states() == 0


async def test_vanished_deflate_websockets_are_collected_every_so_many_closes() -> None:
    settings = make_settings(rate_limit_exempt_ips=("127.0.0.1",), history=False)
    with trio.fail_after(DEADLINE_S):
        async with running_server(settings) as server:
            with collector_off(), full_collections_paced(min_closes=10):
                for _ in range(CONNECTIONS):
                    await deflate_session(server.ws_url, close_frame=False)
                await trio.testing.wait_all_tasks_blocked()
                assert len(server.hub) == 0
                # The last collection ran as the 40th closed: only that one is left.
                assert 0 < server_compression_states() <= 10


async def test_what_the_server_made_as_it_started_is_frozen_out_of_full_collections() -> None:
    """``python -m aether`` freezes its modules before it starts; what starting makes (the app's
    engine, the agentic path's libraries once its warm-up loaded them) is frozen once it has
    started, so full collections do not scan it again and again."""
    settings = make_settings(history=False)
    try:
        with trio.fail_after(DEADLINE_S), full_collections_paced(min_closes=100):
            async with running_server(settings) as server:
                engine = server.state.engine
                scanned = {id(obj) for obj in gc.get_objects()}
                frozen = gc.get_freeze_count()
    finally:
        gc.unfreeze()
    assert id(engine) not in scanned
    assert frozen > 0


def test_full_collections_come_once_as_many_connections_closed_as_are_open() -> None:
    collected_at: list[int] = []
    closes = 0

    def collect() -> int:
        collected_at.append(closes)
        return 0

    pacer = FullCollectionPacer(collect)

    def close(times: int, still_open: int) -> None:
        nonlocal closes
        for _ in range(times):
            closes += 1
            pacer.connection_closed(still_open)

    close(250, still_open=0)
    assert collected_at == []  # off until enabled
    pacer.enable(min_closes=100)
    close(200, still_open=0)
    assert collected_at == [350, 450]
    close(999, still_open=1_000)  # with 1,000 open: after as many closes
    assert collected_at == [350, 450]
    close(1, still_open=1_000)
    assert collected_at == [350, 450, 1_450]
    pacer.disable()
    close(2_000, still_open=0)
    assert collected_at == [350, 450, 1_450]
