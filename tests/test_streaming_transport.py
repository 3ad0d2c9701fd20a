"""The HTTP path's transport, against real servers on 127.0.0.1: keep-alive, its failures, the
pool's limits, TLS, and what a closed answer does to its connection."""

from __future__ import annotations

import functools
import socket
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import h11
import httpx
import pytest
import trio
import trio.testing

from aether.core.providers.streaming_transport import StreamingTransport
from tests.helpers import make_settings, running_server, tls_certificate

Handler = Callable[[trio.SocketStream, int], Awaitable[None]]
NO_TIMEOUTS = httpx.Timeout(None)


class ScriptedServer:
    """A raw HTTP/1.1 server whose every connection runs ``handler(stream, index)``."""

    def __init__(self, handler: Handler) -> None:
        self.handler = handler
        self.connections = 0
        self.requests: list[bytes] = []
        self.port = 0

    async def start(self, nursery: trio.Nursery) -> None:
        listeners = await nursery.start(
            functools.partial(trio.serve_tcp, self._serve, 0, host="127.0.0.1")
        )
        self.port = listeners[0].socket.getsockname()[1]

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    async def _serve(self, stream: trio.SocketStream) -> None:
        index = self.connections
        self.connections += 1
        async with stream:
            await self.handler(stream, index)

    async def read_request(self, stream: trio.SocketStream, conn: h11.Connection) -> bool:
        """Read one whole request; False if the client closed instead."""
        while True:
            event = conn.next_event()
            if event is h11.NEED_DATA:
                conn.receive_data(await stream.receive_some(65536))
            elif isinstance(event, h11.Request):
                self.requests.append(event.target)
            elif isinstance(event, h11.EndOfMessage):
                return True
            elif isinstance(event, h11.ConnectionClosed):
                return False


async def answer(stream: trio.SocketStream, conn: h11.Connection, body: bytes) -> None:
    headers = [("content-length", str(len(body)))]
    data = conn.send(h11.Response(status_code=200, headers=headers)) or b""
    data += (conn.send(h11.Data(data=body)) or b"") + (conn.send(h11.EndOfMessage()) or b"")
    await stream.send_all(data)


def client_for(transport: StreamingTransport, server: ScriptedServer) -> httpx.AsyncClient:
    return httpx.AsyncClient(transport=transport, base_url=server.url, timeout=NO_TIMEOUTS)


async def test_keep_alive_serves_many_requests_on_one_connection(nursery: trio.Nursery) -> None:
    async def keep_answering(stream: trio.SocketStream, index: int) -> None:
        conn = h11.Connection(h11.SERVER)
        while await server.read_request(stream, conn):
            await answer(stream, conn, b"ok %d" % index)
            conn.start_next_cycle()

    server = ScriptedServer(keep_answering)
    await server.start(nursery)
    transport = StreamingTransport(max_connections=4)
    async with client_for(transport, server) as client:
        bodies = [(await client.post(f"/r{i}", json={"i": i})).content for i in range(3)]
        assert transport.open_connections == 1
    assert bodies == [b"ok 0"] * 3
    assert server.connections == 1
    assert server.requests == [b"/r0", b"/r1", b"/r2"]


async def test_a_connection_the_server_closed_while_idle_is_not_used(
    nursery: trio.Nursery,
) -> None:
    async def answer_once(stream: trio.SocketStream, index: int) -> None:
        conn = h11.Connection(h11.SERVER)
        await server.read_request(stream, conn)
        await answer(stream, conn, b"ok %d" % index)
        # ...and close, without having said "Connection: close".

    server = ScriptedServer(answer_once)
    await server.start(nursery)
    async with client_for(StreamingTransport(max_connections=4), server) as client:
        first = await client.get("/a")
        await trio.testing.wait_all_tasks_blocked()  # the server's close has arrived
        second = await client.get("/b")
    assert (first.content, second.content) == (b"ok 0", b"ok 1")
    assert server.requests == [b"/a", b"/b"]


async def test_a_request_whose_kept_alive_connection_closes_under_it_goes_again(
    nursery: trio.Nursery,
) -> None:
    async def answer_then_drop_the_next(stream: trio.SocketStream, index: int) -> None:
        conn = h11.Connection(h11.SERVER)
        await server.read_request(stream, conn)
        if index == 0:
            await answer(stream, conn, b"first")
            conn.start_next_cycle()
            await server.read_request(stream, conn)  # read it, answer nothing, close
        else:
            await answer(stream, conn, b"second")

    server = ScriptedServer(answer_then_drop_the_next)
    await server.start(nursery)
    async with client_for(StreamingTransport(max_connections=4), server) as client:
        first = await client.get("/a")
        second = await client.get("/b")
    assert (first.content, second.content) == (b"first", b"second")
    assert server.requests == [b"/a", b"/b", b"/b"]
    assert server.connections == 2


async def test_an_answer_that_breaks_off_is_an_error_and_is_not_sent_again(
    nursery: trio.Nursery,
) -> None:
    async def break_off(stream: trio.SocketStream, index: int) -> None:
        conn = h11.Connection(h11.SERVER)
        await server.read_request(stream, conn)
        head = h11.Response(status_code=200, headers=[("content-length", "100")])
        await stream.send_all((conn.send(head) or b"") + (conn.send(h11.Data(data=b"part")) or b""))

    server = ScriptedServer(break_off)
    await server.start(nursery)
    transport = StreamingTransport(max_connections=4)
    async with (
        client_for(transport, server) as client,
        client.stream("POST", "/chat", json={}) as response,
    ):
        with pytest.raises(httpx.RemoteProtocolError):
            await response.aread()
    assert server.requests == [b"/chat"]


async def test_closing_an_unfinished_answer_closes_its_connection_and_frees_its_slot(
    nursery: trio.Nursery,
) -> None:
    closed = trio.Event()

    async def stream_forever(stream: trio.SocketStream, index: int) -> None:
        conn = h11.Connection(h11.SERVER)
        await server.read_request(stream, conn)
        head = h11.Response(status_code=200, headers=[("transfer-encoding", "chunked")])
        await stream.send_all((conn.send(head) or b"") + (conn.send(h11.Data(data=b"a")) or b""))
        if index == 0:
            assert await stream.receive_some(1) == b""  # the client's close
            closed.set()
        else:
            await stream.send_all(conn.send(h11.EndOfMessage()) or b"")

    server = ScriptedServer(stream_forever)
    await server.start(nursery)
    transport = StreamingTransport(max_connections=1)
    async with client_for(transport, server) as client:
        async with client.stream("GET", "/first") as response:
            assert await response.aiter_raw().__anext__() == b"a"
        await closed.wait()
        assert transport.open_connections == 0
        # The only slot is free again: the next request gets it.
        second = await client.get("/second")
    assert second.content == b"a"


async def test_waiting_for_a_free_connection_is_bounded(
    autojump_clock: Any, nursery: trio.Nursery
) -> None:
    async def never_finish(stream: trio.SocketStream, index: int) -> None:
        conn = h11.Connection(h11.SERVER)
        await server.read_request(stream, conn)
        head = h11.Response(status_code=200, headers=[("transfer-encoding", "chunked")])
        await stream.send_all(conn.send(head) or b"")
        await trio.sleep_forever()

    server = ScriptedServer(never_finish)
    await server.start(nursery)
    transport = StreamingTransport(max_connections=1)
    timeout = httpx.Timeout(None, pool=2.0)
    async with (
        httpx.AsyncClient(transport=transport, base_url=server.url, timeout=timeout) as c,
        c.stream("GET", "/held"),
    ):
        start = trio.current_time()
        with pytest.raises(httpx.PoolTimeout):
            await c.get("/waits")
        assert trio.current_time() - start == 2.0
    assert server.requests == [b"/held"]


async def test_a_silent_upstream_is_a_read_timeout(
    autojump_clock: Any, nursery: trio.Nursery
) -> None:
    async def silent(stream: trio.SocketStream, index: int) -> None:
        await server.read_request(stream, h11.Connection(h11.SERVER))
        await trio.sleep_forever()

    server = ScriptedServer(silent)
    await server.start(nursery)
    transport = StreamingTransport(max_connections=1)
    timeout = httpx.Timeout(None, read=3.0)
    async with httpx.AsyncClient(transport=transport, base_url=server.url, timeout=timeout) as c:
        with pytest.raises(httpx.ReadTimeout):
            await c.get("/slow")
    assert transport.open_connections == 0


async def test_nothing_listening_is_a_connect_error() -> None:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]  # bound, not listening: connections are refused
        async with httpx.AsyncClient(transport=StreamingTransport(max_connections=1)) as client:
            with pytest.raises(httpx.ConnectError):
                await client.get(f"http://127.0.0.1:{port}/")


async def test_https_verifies_the_upstream_certificate(tmp_path: Path) -> None:
    certfile, keyfile, trusting = tls_certificate(tmp_path)
    settings = make_settings(provider="echo", tls_certfile=str(certfile), tls_keyfile=str(keyfile))
    with trio.fail_after(10):
        async with running_server(settings) as server:
            transport = StreamingTransport(max_connections=2, ssl_context=trusting)
            async with httpx.AsyncClient(transport=transport, base_url=server.base_url) as client:
                health = await client.get("/health")
            # The default context trusts public CAs only, not this test's own.
            async with httpx.AsyncClient(transport=StreamingTransport(max_connections=1)) as other:
                with pytest.raises(httpx.ConnectError, match="TLS"):
                    await other.get(server.base_url + "/health")
    assert server.base_url.startswith("https://")
    assert health.status_code == 200
