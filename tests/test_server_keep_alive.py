"""The server's keep-alive, over real sockets: an idle connection is closed after
``keep_alive_timeout``, a request in progress is never cut by it, and a shutdown closes idle
connections at once and busy ones once their answer is sent."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import trio
from hypercorn.config import Config

from aether.server.worker import serve_app

KEEP_ALIVE_S = 0.5
DEADLINE_S = 10


class SlowApp:
    """``GET /fast`` answers at once; ``GET /slow`` answers once ``release`` is set."""

    def __init__(self) -> None:
        self.release = trio.Event()
        self.slow_started = trio.Event()

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] == "lifespan":
            while (await receive())["type"] != "lifespan.shutdown":
                await send({"type": "lifespan.startup.complete"})
            await send({"type": "lifespan.shutdown.complete"})
            return
        if scope["path"] == "/slow":
            self.slow_started.set()
            await self.release.wait()
        body = scope["path"].encode()
        await send(
            {
                "type": "http.response.start",
                "status": 200,
                "headers": [(b"content-length", str(len(body)).encode())],
            }
        )
        await send({"type": "http.response.body", "body": body})


@asynccontextmanager
async def serving(app: SlowApp) -> AsyncIterator[tuple[int, trio.Event]]:
    """The app under Aether's worker on 127.0.0.1; yields its port and its shutdown trigger."""
    config = Config()
    config.bind = ["127.0.0.1:0"]
    config.keep_alive_timeout = KEEP_ALIVE_S
    config.graceful_timeout = DEADLINE_S
    stop = trio.Event()
    async with trio.open_nursery() as nursery:
        binds = await nursery.start(
            lambda task_status: serve_app(
                app, config, shutdown_trigger=stop.wait, task_status=task_status
            )
        )
        yield int(binds[0].rsplit(":", 1)[1]), stop
        stop.set()


async def get(stream: trio.SocketStream, path: str) -> bytes:
    """One keep-alive GET; returns the whole response (its body is the path)."""
    await stream.send_all(f"GET {path} HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n".encode())
    received = b""
    while not received.endswith(path.encode()):
        data = await stream.receive_some(65536)
        assert data, f"closed after {received!r}"
        received += data
    return received


async def closed_by_server(stream: trio.SocketStream) -> None:
    """Wait until the server closes the connection (nothing else may come first)."""
    assert await stream.receive_some(65536) == b""


async def test_an_idle_connection_is_closed_after_the_keep_alive_timeout() -> None:
    app = SlowApp()
    with trio.fail_after(DEADLINE_S):
        async with serving(app) as (port, _stop):
            stream = await trio.open_tcp_stream("127.0.0.1", port)
            async with stream:
                assert (await get(stream, "/fast")).startswith(b"HTTP/1.1 200")
                idle_since = trio.current_time()
                assert (await get(stream, "/fast")).startswith(b"HTTP/1.1 200")
                idle_since = trio.current_time()
                await closed_by_server(stream)
                idle_for = trio.current_time() - idle_since
    assert idle_for >= KEEP_ALIVE_S * 0.9


async def test_a_request_in_progress_is_not_cut_by_the_keep_alive_timeout() -> None:
    app = SlowApp()
    with trio.fail_after(DEADLINE_S):
        async with serving(app) as (port, _stop):
            stream = await trio.open_tcp_stream("127.0.0.1", port)
            async with stream, trio.open_nursery() as nursery:
                answer: list[bytes] = []

                async def ask_slowly() -> None:
                    answer.append(await get(stream, "/slow"))

                nursery.start_soon(ask_slowly)
                await app.slow_started.wait()
                # Longer than the keep-alive timeout, measured by the server's own clock.
                await trio.sleep(KEEP_ALIVE_S * 3)
                app.release.set()
    assert answer[0].startswith(b"HTTP/1.1 200")


async def test_a_shutdown_closes_idle_connections_and_lets_busy_ones_answer() -> None:
    app = SlowApp()
    with trio.fail_after(DEADLINE_S):
        async with serving(app) as (port, stop):
            idle = await trio.open_tcp_stream("127.0.0.1", port)
            busy = await trio.open_tcp_stream("127.0.0.1", port)
            async with idle, busy, trio.open_nursery() as nursery:
                await get(idle, "/fast")
                answer: list[bytes] = []

                async def ask_slowly() -> None:
                    answer.append(await get(busy, "/slow"))

                nursery.start_soon(ask_slowly)
                await app.slow_started.wait()
                stop.set()
                stopped_at = trio.current_time()
                await closed_by_server(idle)
                closed_after = trio.current_time() - stopped_at
                assert not answer
                app.release.set()
    assert answer[0].startswith(b"HTTP/1.1 200")
    assert closed_after < KEEP_ALIVE_S  # by the shutdown, not by the idle timeout
