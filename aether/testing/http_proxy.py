"""A small forward HTTP proxy on loopback, for tests of the upstream client's proxy support.

It tunnels ``CONNECT host:port`` (what clients send for ``https://`` through a proxy) and
forwards absolute-form requests (``GET http://host:port/path``, what they send for ``http://``),
and records each target it carried, so a test can assert that a request went through it, or did
not. One exchange per connection for the forwarded form (it answers ``Connection: close``).

@.architecture
role: test forward proxy
jobs: [test_support]
"""

from __future__ import annotations

import logging
from typing import Any
from urllib.parse import urlsplit

import trio

log = logging.getLogger(__name__)

MAX_HEAD_BYTES = 64 * 1024


class ForwardProxy:
    def __init__(self) -> None:
        self.port: int | None = None
        self.targets: list[str] = []  # "host:port" of every request carried, in order

    @property
    def url(self) -> str:
        if self.port is None:
            raise RuntimeError("the proxy is not serving yet")
        return f"http://127.0.0.1:{self.port}"

    async def serve(self, *, task_status: Any = trio.TASK_STATUS_IGNORED) -> None:
        listeners = await trio.open_tcp_listeners(0, host="127.0.0.1")
        self.port = listeners[0].socket.getsockname()[1]
        await trio.serve_listeners(self._handle, listeners, task_status=task_status)

    async def _handle(self, client: trio.SocketStream) -> None:
        async with client:
            head, rest = await _read_head(client)
            if head is None:
                return
            method, target, version = head.split(b"\r\n", 1)[0].split(b" ", 2)
            if method == b"CONNECT":
                await self._tunnel(client, target.decode(), rest)
            else:
                await self._forward(client, method, target.decode(), version, head, rest)

    async def _tunnel(self, client: trio.SocketStream, target: str, rest: bytes) -> None:
        host, _, port = target.rpartition(":")
        try:
            upstream = await trio.open_tcp_stream(host, int(port))
        except OSError:
            await client.send_all(b"HTTP/1.1 502 Bad Gateway\r\ncontent-length: 0\r\n\r\n")
            return
        self.targets.append(target)
        await client.send_all(b"HTTP/1.1 200 Connection established\r\n\r\n")
        async with upstream:
            if rest:
                await upstream.send_all(rest)
            await _splice(client, upstream)

    async def _forward(
        self,
        client: trio.SocketStream,
        method: bytes,
        url: str,
        version: bytes,
        head: bytes,
        rest: bytes,
    ) -> None:
        parts = urlsplit(url)
        host, port = parts.hostname or "", parts.port or 80
        path = (parts.path or "/") + (f"?{parts.query}" if parts.query else "")
        lines = head.split(b"\r\n")[1:]
        kept = [line for line in lines if not line.lower().startswith(b"proxy-")]
        request = b"\r\n".join([b"%s %s %s" % (method, path.encode(), version), *kept])
        upstream = await trio.open_tcp_stream(host, port)
        self.targets.append(f"{host}:{port}")
        async with upstream:
            await upstream.send_all(request + b"\r\n\r\n" + rest)
            await _splice(client, upstream)


async def _read_head(stream: trio.SocketStream) -> tuple[bytes | None, bytes]:
    """The request head (without its blank line) and what came after it."""
    data = b""
    while b"\r\n\r\n" not in data:
        chunk = await stream.receive_some(65536)
        if not chunk or len(data) > MAX_HEAD_BYTES:
            return None, b""
        data += chunk
    head, _, rest = data.partition(b"\r\n\r\n")
    return head, rest


async def _splice(a: trio.SocketStream, b: trio.SocketStream) -> None:
    """Copy both ways until either side closes."""

    async def copy(source: trio.SocketStream, sink: trio.SocketStream) -> None:
        try:
            while data := await source.receive_some(65536):
                await sink.send_all(data)
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            pass
        nursery.cancel_scope.cancel()

    async with trio.open_nursery() as nursery:
        nursery.start_soon(copy, a, b)
        nursery.start_soon(copy, b, a)
