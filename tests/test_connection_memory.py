"""What a closed WebSocket leaves behind, over real sockets.

``python -m aether`` tunes the collector to run rarely (``aether.main.tune_garbage_collector``):
anything a closed connection leaves in a reference cycle stays in memory until a full collection.
Every browser negotiates permessage-deflate, whose zlib state costs tens of KiB per connection,
so these tests open deflate connections and count, with the collector switched off, the server's
compression states still alive once the connections closed.
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

from tests.helpers import make_settings, running_server

DEADLINE_S = 10
CONNECTIONS = 40


async def deflate_session(ws_url: str) -> None:
    """Open a WebSocket offering permessage-deflate (as browsers do), read the server's hello
    (sent compressed), then close with a close frame and wait for the server's and its EOF."""
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


async def test_a_closed_deflate_websocket_is_freed_without_a_collection() -> None:
    settings = make_settings(rate_limit_exempt_ips=("127.0.0.1",), history=False)
    with trio.fail_after(DEADLINE_S):
        async with running_server(settings) as server:
            with collector_off():
                for _ in range(CONNECTIONS):
                    await deflate_session(server.ws_url)
                await trio.testing.wait_all_tasks_blocked()
                assert len(server.state.hub) == 0
                assert hypercorn_websocket_streams() == 0
                assert server_compression_states() == 0
