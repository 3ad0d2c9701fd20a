"""StreamingTransport: the httpx transport of the HTTP path, made for many long streamed answers.

httpx's default transport (httpcore) costs about 36 us of CPU per chunk read on this stack: six
nested async generators, two generator-based context managers and a ``fail_after`` per socket
read. Its pool also walks every connection it holds whenever a request starts or ends. For an
answer that arrives a token at a time on a thousand connections at once, those costs are the
server's. This transport speaks HTTP/1.1 with h11 on Trio streams and nothing more: one cancel
scope per read, a plain async iterator for the body (about 30 us per chunk read through httpx's
``aiter_bytes``, 21 us for h11 and the socket alone), and a pool whose every operation is O(1).
The client API stays httpx's: ``client.stream(...)``, ``httpx.Timeout`` and httpx's exceptions.

What it does: ``http`` and ``https`` (TLS with certifi's CAs by default), keep-alive with idle
connections reused last-in first-out and closed after ``keepalive_expiry``, a request retried
once on a fresh connection when a kept-alive one turns out closed before any byte of its
answer. What it does not: proxies (``upstream_client`` mounts httpx's own transport for proxied
origins), HTTP/2 (``llm_transport = httpx`` has it), request bodies streamed while the answer
arrives.

@.architecture
role: upstream HTTP transport
jobs: [http_communication, connection_pooling]
"""

from __future__ import annotations

import math
import ssl
from collections import deque
from typing import Any

import h11
import httpx
import trio

READ_SIZE = 65536
DEFAULT_PORTS = {b"http": 80, b"https": 443}
# Errors of a socket that the peer closed or reset.
_STREAM_ERRORS = (trio.BrokenResourceError, trio.ClosedResourceError, OSError)

Origin = tuple[bytes, bytes, int]


def _timeout(timeouts: dict[str, Any], name: str) -> float:
    value = timeouts.get(name)
    return math.inf if value is None else float(value)


class _Connection:
    """One HTTP/1.1 connection: its stream, its h11 state, when it was last used."""

    __slots__ = ("h11", "origin", "received", "socket", "stream", "used_at")

    def __init__(self, origin: Origin, stream: trio.abc.Stream, sock: trio.socket.SocketType):
        self.origin = origin
        self.stream = stream
        self.socket = sock
        self.h11 = h11.Connection(h11.CLIENT)
        self.used_at = trio.current_time()
        # Whether any byte of the current answer arrived (decides if a failure may be retried).
        self.received = False

    def close(self) -> None:
        """Close at once, without a TLS goodbye: HTTP/1.1 delimits its own messages, and a
        stop must reach the upstream now, even from a cancelled task."""
        self.socket.close()

    def is_stale(self, now: float, keepalive_expiry: float) -> bool:
        # Readable while idle means the server closed it (or sent what nobody asked for).
        return now - self.used_at > keepalive_expiry or self.socket.is_readable()

    async def send(self, data: bytes, within_s: float, request: httpx.Request) -> None:
        with trio.move_on_after(within_s) as scope:
            try:
                await self.stream.send_all(data)
            except _STREAM_ERRORS as exc:
                raise httpx.WriteError(
                    f"could not send the request: {exc}", request=request
                ) from exc
        if scope.cancelled_caught:
            raise httpx.WriteTimeout("timed out sending the request", request=request)

    async def receive(self, within_s: float, request: httpx.Request) -> None:
        """Read what the socket has into h11 (b"" at end of stream)."""
        with trio.CancelScope(deadline=trio.current_time() + within_s) as scope:
            try:
                data = await self.stream.receive_some(READ_SIZE)
            except _STREAM_ERRORS as exc:
                raise httpx.ReadError(
                    f"the upstream connection failed: {exc}", request=request
                ) from exc
        if scope.cancelled_caught:
            raise httpx.ReadTimeout("timed out waiting for the upstream", request=request)
        if data:
            self.received = True
        self.h11.receive_data(bytes(data))

    def next_event(self, request: httpx.Request) -> Any:
        try:
            return self.h11.next_event()
        except h11.RemoteProtocolError as exc:
            raise httpx.RemoteProtocolError(str(exc), request=request) from exc

    @property
    def reusable(self) -> bool:
        return self.h11.our_state is h11.DONE and self.h11.their_state is h11.DONE


class _ResponseBody(httpx.AsyncByteStream):
    """The answer's body, read chunk by chunk as the socket delivers it."""

    def __init__(
        self,
        transport: StreamingTransport,
        connection: _Connection,
        request: httpx.Request,
        read_timeout: float,
    ) -> None:
        self._transport = transport
        self._connection: _Connection | None = connection
        self._request = request
        self._read_timeout = read_timeout

    def __aiter__(self) -> _ResponseBody:
        return self

    async def __anext__(self) -> bytes:
        connection = self._connection
        if connection is None:
            raise StopAsyncIteration
        while True:
            event = connection.next_event(self._request)
            if event is h11.NEED_DATA:
                await connection.receive(self._read_timeout, self._request)
            elif type(event) is h11.Data:
                return bytes(event.data)
            elif type(event) is h11.EndOfMessage or event is h11.PAUSED:
                raise StopAsyncIteration  # PAUSED: asked again after the end
            else:
                raise httpx.RemoteProtocolError(
                    f"unexpected {type(event).__name__} in a response body", request=self._request
                )

    async def aclose(self) -> None:
        connection, self._connection = self._connection, None
        if connection is not None:
            self._transport._release(connection)


class StreamingTransport(httpx.AsyncBaseTransport):
    def __init__(
        self,
        *,
        max_connections: int,
        keepalive_expiry: float = 5.0,
        ssl_context: ssl.SSLContext | None = None,
    ) -> None:
        self._slots = trio.Semaphore(max_connections)
        self._max_connections = max_connections
        self._keepalive_expiry = keepalive_expiry
        self._ssl_context = ssl_context
        # Per origin, most recently used last: a new request takes the warmest connection.
        self._idle: dict[Origin, deque[_Connection]] = {}
        self._idle_count = 0
        self._in_use = 0
        self._closed = False

    @property
    def open_connections(self) -> int:
        return self._in_use + self._idle_count

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        if self._closed:
            raise RuntimeError("the transport is closed")
        timeouts: dict[str, Any] = request.extensions.get("timeout", {})
        body = request.content if _is_read(request) else await request.aread()
        head = _request_head(request, body)
        with trio.move_on_after(_timeout(timeouts, "pool")) as waiting:
            await self._slots.acquire()
        if waiting.cancelled_caught:
            raise httpx.PoolTimeout("no upstream connection free in time", request=request)
        try:
            return await self._exchange(request, head, body, timeouts)
        except BaseException:
            self._slots.release()
            raise

    async def _exchange(
        self, request: httpx.Request, head: h11.Request, body: bytes, timeouts: dict[str, Any]
    ) -> httpx.Response:
        origin = _origin(request.url)
        while True:
            connection = self._take_idle(origin)
            reused = connection is not None
            if connection is None:
                self._make_room()
            self._in_use += 1  # counts a connection being opened, too
            try:
                if connection is None:
                    connection = await self._connect(origin, _timeout(timeouts, "connect"), request)
                return await self._send_request(connection, request, head, body, timeouts)
            except BaseException as exc:
                self._in_use -= 1
                if connection is None:
                    raise
                connection.close()
                # A kept-alive connection the server had closed fails before any byte of the
                # answer: the server never saw the request, so it goes again on a new one.
                if reused and not connection.received and isinstance(exc, httpx.TransportError):
                    continue
                raise

    async def _send_request(
        self,
        connection: _Connection,
        request: httpx.Request,
        head: h11.Request,
        body: bytes,
        timeouts: dict[str, Any],
    ) -> httpx.Response:
        connection.received = False
        data = connection.h11.send(head) or b""
        if body:
            data += connection.h11.send(h11.Data(data=body)) or b""
        data += connection.h11.send(h11.EndOfMessage()) or b""
        await connection.send(data, _timeout(timeouts, "write"), request)
        read_timeout = _timeout(timeouts, "read")
        while True:
            event = connection.next_event(request)
            if event is h11.NEED_DATA:
                await connection.receive(read_timeout, request)
            elif type(event) is h11.Response:
                break
            elif type(event) is not h11.InformationalResponse:
                raise httpx.RemoteProtocolError(
                    "the upstream closed the connection without answering", request=request
                )
        return httpx.Response(
            status_code=event.status_code,
            headers=event.headers,
            stream=_ResponseBody(self, connection, request, read_timeout),
            extensions={"http_version": b"HTTP/1.1", "reason_phrase": event.reason},
        )

    async def _connect(
        self, origin: Origin, within_s: float, request: httpx.Request
    ) -> _Connection:
        scheme, host, port = origin
        with trio.move_on_after(within_s) as scope:
            try:
                tcp = await trio.open_tcp_stream(host.decode("ascii"), port)
            except OSError as exc:
                raise httpx.ConnectError(f"could not connect: {exc}", request=request) from exc
            stream: trio.abc.Stream = tcp
            if scheme == b"https":
                tls = trio.SSLStream(
                    tcp,
                    self._ssl_context or _default_ssl_context(),
                    server_hostname=host.decode("ascii"),
                    https_compatible=True,
                )
                try:
                    await tls.do_handshake()
                except (*_STREAM_ERRORS, ssl.SSLError) as exc:
                    tcp.socket.close()
                    raise httpx.ConnectError(
                        f"TLS handshake failed: {exc}", request=request
                    ) from exc
                stream = tls
        if scope.cancelled_caught:
            raise httpx.ConnectTimeout("timed out connecting", request=request)
        return _Connection(origin, stream, tcp.socket)

    def _take_idle(self, origin: Origin) -> _Connection | None:
        idle = self._idle.get(origin)
        now = trio.current_time()
        while idle:
            connection = idle.pop()
            self._idle_count -= 1
            if not connection.is_stale(now, self._keepalive_expiry):
                return connection
            connection.close()
        return None

    def _make_room(self) -> None:
        """Keep open connections within max_connections: close the oldest idle one."""
        if self.open_connections < self._max_connections:
            return
        oldest = min(
            (idle for idle in self._idle.values() if idle), key=lambda q: q[0].used_at, default=None
        )
        if oldest is not None:
            oldest.popleft().close()
            self._idle_count -= 1

    def _release(self, connection: _Connection) -> None:
        """The answer was read (or abandoned): keep the connection for the next request if it
        is ready for one, else close it (an unread answer, ``Connection: close``)."""
        self._in_use -= 1
        self._slots.release()
        if self._closed or not connection.reusable:
            connection.close()
            return
        connection.h11.start_next_cycle()
        connection.used_at = trio.current_time()
        self._idle.setdefault(connection.origin, deque()).append(connection)
        self._idle_count += 1

    async def aclose(self) -> None:
        self._closed = True
        for idle in self._idle.values():
            while idle:
                idle.pop().close()
        self._idle_count = 0
        await trio.lowlevel.checkpoint()


def _is_read(request: httpx.Request) -> bool:
    try:
        request.content  # noqa: B018 - raises if the body is still a stream
    except httpx.RequestNotRead:
        return False
    return True


def _origin(url: httpx.URL) -> Origin:
    scheme = url.raw_scheme
    if scheme not in DEFAULT_PORTS:
        raise httpx.UnsupportedProtocol(f"unsupported URL scheme {url.scheme!r}")
    return scheme, url.raw_host, url.port or DEFAULT_PORTS[scheme]


def _request_head(request: httpx.Request, body: bytes) -> h11.Request:
    headers = list(request.headers.raw)
    names = {name.lower() for name, _ in headers}
    if body and b"content-length" not in names and b"transfer-encoding" not in names:
        headers.append((b"Content-Length", str(len(body)).encode()))
    target = request.url.raw_path
    return h11.Request(method=request.method, target=target, headers=headers)


_DEFAULT_SSL_CONTEXT: ssl.SSLContext | None = None


def _default_ssl_context() -> ssl.SSLContext:
    global _DEFAULT_SSL_CONTEXT
    if _DEFAULT_SSL_CONTEXT is None:
        context = httpx.create_ssl_context(trust_env=False)
        context.set_alpn_protocols(["http/1.1"])
        _DEFAULT_SSL_CONTEXT = context
    return _DEFAULT_SSL_CONTEXT
