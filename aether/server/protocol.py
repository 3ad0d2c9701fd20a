"""Hypercorn 0.18's HTTP/1.1 protocol, with the edges a hostile client found filed off.

- **HTTP/2 is refused.** Hypercorn's HTTP/2 protocol raises ``KeyError`` when a request's body
  goes on after its stream was closed (a 413 or 401 answered before the body was read), and the
  error ended the whole process. Aether needs only HTTP/1.1 (its WebSocket and SSE run on it), so
  an ``Upgrade: h2c`` is ignored (the request is answered in HTTP/1.1, as RFC 9110 allows), an
  HTTP/2 connection preface is answered ``505`` and the connection closed (once the client
  closes it, or after a linger: see ``HTTP1Connection``), and TLS offers only
  ``http/1.1`` in ALPN (see ``aether.main.hypercorn_config``).
- **A WebSocket frame that cannot be parsed fails the connection with the close code RFC 6455
  asks for** (1007 for invalid UTF-8; 1002 for a reserved opcode, an unmasked frame or an
  invalid close code). wsproto reports such a frame as a close from the peer but leaves its
  connection open, and Hypercorn then dropped TCP without sending a close frame.
- **Responses Hypercorn makes itself** (400, 404, 431, 500, 501, 505: malformed requests and
  handshakes) carry the security headers the application's responses get.
- **Several WebSocket frames go out in one write.** The scope advertises the ``SEND_BATCH``
  extension (see ``aether.asgi``): its message's texts are encoded in order (compressed when
  permessage-deflate was negotiated) and handed to the socket as one buffer. Hypercorn's own
  path costs a lock, a shielded cancel scope, a ``send_all`` and two trips through the scheduler
  per frame.

These are subclasses at the narrowest seams Hypercorn has; ``pyproject.toml`` pins Hypercorn to
0.18, and ``tests/test_server_hardening.py`` fails if the internals they rely on move.

@.architecture
role: HTTP protocol hardening
jobs: [protocol_hardening, header_injection]
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable, Iterable, Sequence
from itertools import chain
from typing import Any

import h11
import trio
from hypercorn.config import Config
from hypercorn.events import Closed, Event, RawData
from hypercorn.protocol.events import Data, Response, StreamClosed
from hypercorn.protocol.events import Event as StreamEvent
from hypercorn.protocol.h11 import H2ProtocolAssumedError, H11Protocol
from hypercorn.protocol.http_stream import HTTPStream
from hypercorn.protocol.ws_stream import ASGIWebsocketState, FrameTooLargeError, WSStream
from hypercorn.typing import (
    AppWrapper,
    ASGISendEvent,
    ConnectionState,
    H11SendableEvent,
    HTTPScope,
    TaskGroup,
    WebsocketScope,
    WorkerContext,
)
from hypercorn.utils import UnexpectedMessageError
from wsproto.connection import ConnectionState as WebSocketState
from wsproto.events import CloseConnection, Message, Ping, TextMessage
from wsproto.utilities import LocalProtocolError

from aether.api.middleware.security import API_HEADERS, HSTS
from aether.asgi import (
    DISCONNECT_SIGNAL,
    RECEIVE_INLINE,
    SEND_BATCH,
    DisconnectSignal,
    InlineReceiver,
)

log = logging.getLogger(__name__)

HeaderList = list[tuple[bytes, bytes]]
CLOSE_MESSAGE_TOO_BIG = 1009

HTTP2_REFUSED = b"".join(
    (
        b"HTTP/1.1 505 HTTP Version Not Supported\r\n",
        b"content-length: 0\r\nconnection: close\r\n",
        *(b"%s: %s\r\n" % header for header in API_HEADERS),
        b"\r\n",
    )
)
# How long a refused connection is read (and what comes dropped) before it is closed.
REFUSAL_LINGER_S = 2.0


def with_security_headers(headers: Iterable[tuple[bytes, bytes]], tls: bool) -> HeaderList:
    """``headers`` plus each security header they lack: the application's responses have them
    all already (its middleware sets them), Hypercorn's own error responses have none."""
    result = list(headers)
    present = {name.lower() for name, _ in result}
    for header in (*API_HEADERS, HSTS) if tls else API_HEADERS:
        if header[0] not in present:
            result.append(header)
    return result


class SignallingHTTPStream(HTTPStream):
    """Hypercorn's HTTP stream, with the ``DISCONNECT_SIGNAL`` extension in its scope: fired
    when the stream closes, before the application is told ``http.disconnect``."""

    _scope: HTTPScope

    @property
    def scope(self) -> HTTPScope:
        return self._scope

    @scope.setter
    def scope(self, scope: HTTPScope) -> None:
        scope["extensions"][DISCONNECT_SIGNAL] = DisconnectSignal()  # type: ignore[assignment]
        self._scope = scope

    async def handle(self, event: Any) -> None:
        if isinstance(event, StreamClosed) and not self.closed and self.app_put is not None:
            signal = self._scope["extensions"].get(DISCONNECT_SIGNAL)
            if isinstance(signal, DisconnectSignal):
                signal.fire()
        await super().handle(event)


class HardenedWSStream(WSStream):
    """Hypercorn's WebSocket stream; a frame wsproto cannot parse fails the connection with the
    close code wsproto names, and the application can send several frames in one write."""

    _scope: WebsocketScope
    # The connection's: whether a write of that size would leave at once (set by the protocol).
    writable_now: Callable[[int], bool] | None = None

    @property
    def scope(self) -> WebsocketScope:
        return self._scope

    @scope.setter
    def scope(self, scope: WebsocketScope) -> None:
        # Hypercorn builds the scope and starts the application in one method: the extension
        # is added as the scope is assigned, before the application can see it.
        scope["extensions"][SEND_BATCH] = {}
        self._inline = InlineReceiver(self.writable_now)
        scope["extensions"][RECEIVE_INLINE] = self._inline  # type: ignore[assignment]
        self._scope = scope

    async def app_send(self, message: ASGISendEvent | None) -> None:
        if message is not None and message["type"] == SEND_BATCH:
            await self._send_texts(message["texts"])  # type: ignore[typeddict-item]
        else:
            await super().app_send(message)

    async def _send_texts(self, texts: Sequence[str]) -> None:
        """Every text as a frame of its own, encoded in order into one buffer, which goes to the
        socket in one write. A peer that stopped reading holds that write up as it held up the
        first frame sent alone; how much one write holds is the caller's choice."""
        if self.closed:
            return  # as for one frame: the application may finish after a close
        if self.state is not ASGIWebsocketState.CONNECTED:
            raise UnexpectedMessageError(self.state, SEND_BATCH)
        for text in texts:
            if not isinstance(text, str):
                raise TypeError(f"{text!r} should be a str")
        connection = self.connection
        try:
            # In order: with permessage-deflate each frame continues the one compression context.
            data = b"".join([connection.send(TextMessage(data=text)) for text in texts])
        except LocalProtocolError:
            return  # already closing: nothing more may be sent
        if data:
            await self.send(Data(stream_id=self.stream_id, data=data))

    async def _handle_events(self) -> None:
        for event in self.connection.events():
            if isinstance(event, Message):
                # Hypercorn's buffer checks the size limit, then hands whole messages to the app.
                try:
                    self.buffer.extend(event)
                except FrameTooLargeError:
                    await self._send_wsproto_event(CloseConnection(code=CLOSE_MESSAGE_TOO_BIG))
                    break
                if event.message_finished and self.app_put is not None:
                    message = self.buffer.to_message()
                    self.buffer.clear()
                    on_message = self._inline.on_message
                    if on_message is not None:
                        await on_message(message)  # in this (the reading) task
                    else:
                        await self.app_put(message)
            elif isinstance(event, Ping):
                await self._send_wsproto_event(event.response())
            elif isinstance(event, CloseConnection):
                if self.connection.state is WebSocketState.OPEN:
                    # Not a close the peer sent (that moves the state to REMOTE_CLOSING): a
                    # frame that failed to parse. Fail the connection as RFC 6455 §7.1.7 says.
                    log.info(
                        "WebSocket from %s failed: %s (closing with %d)",
                        self.client,
                        event.reason,
                        event.code,
                    )
                    await self._send_wsproto_event(CloseConnection(code=event.code))
                elif self.connection.state is WebSocketState.REMOTE_CLOSING:
                    await self._send_wsproto_event(event.response())
                await self.send(StreamClosed(stream_id=self.stream_id))

    async def _send_wsproto_event(self, event: Any) -> None:
        try:
            data = self.connection.send(event)
        except LocalProtocolError:
            return  # already closing: nothing more may be sent
        await self.send(Data(stream_id=self.stream_id, data=data))


class HardenedH11Protocol(H11Protocol):
    """Hypercorn's HTTP/1.1 protocol without its ways into HTTP/2, with security headers on
    every response it sends, and a response of declared length written with its body: Hypercorn
    wrote its head, its body and its (empty) end in three writes."""

    _stream: HTTPStream | WSStream | None
    # The head of a response of declared length, until its body (or its end) goes with it.
    _held_head = b""
    # The connection's, handed to its WebSocket stream (see ``HardenedWSStream``).
    writable_now: Callable[[int], bool] | None = None

    async def _send_h11_event(self, event: H11SendableEvent) -> None:
        try:
            data = self.connection.send(event)
        except h11.LocalProtocolError:
            if self.connection.their_state != h11.ERROR:
                raise
            return
        if isinstance(event, h11.Response) and _declares_length(event.headers):
            self._held_head = data
            return
        if self._held_head:
            data, self._held_head = self._held_head + data, b""
        if data:
            await self.send(RawData(data=data))

    async def _flush_held_head(self) -> None:
        """A response that ends before its body (the application failed) still gets its head
        out, as it would have without the hold."""
        if self._held_head:
            data, self._held_head = self._held_head, b""
            await self.send(RawData(data=data))

    async def _check_protocol(self, event: h11.Request) -> None:
        if _asks_for_h2c(event):
            return  # answered in HTTP/1.1: the Upgrade header is ignored
        await super()._check_protocol(event)  # raises H2ProtocolAssumedError on a preface

    @property
    def stream(self) -> HTTPStream | WSStream | None:
        return self._stream

    @stream.setter
    def stream(self, stream: HTTPStream | WSStream | None) -> None:
        # Hypercorn builds the stream in ``_create_stream`` with no way to choose its class, and
        # hands it the handshake at once (which builds the scope and binds ``app_send`` for the
        # application): the stream takes on its class as it is assigned, before its first event.
        # The subclass adds behaviour and no state of its own until then.
        if type(stream) is WSStream:
            stream.__class__ = HardenedWSStream
            assert isinstance(stream, HardenedWSStream)
            stream.writable_now = self.writable_now
        elif type(stream) is HTTPStream:
            stream.__class__ = SignallingHTTPStream
        self._stream = stream

    async def stream_send(self, event: StreamEvent) -> None:
        if isinstance(event, Response) and event.status_code >= 200:
            event = Response(
                stream_id=event.stream_id,
                headers=with_security_headers(event.headers, self.ssl),
                status_code=event.status_code,
            )
        elif isinstance(event, StreamClosed):
            await self._flush_held_head()
        await super().stream_send(event)

    async def _send_error_response(self, status_code: int) -> None:
        headers = [(b"content-length", b"0"), (b"connection", b"close")]
        response = h11.Response(
            status_code=status_code,
            headers=with_security_headers(
                chain(headers, self.config.response_headers("h11")), self.ssl
            ),
        )
        await self._send_h11_event(response)
        await self._send_h11_event(h11.EndOfMessage())


def _declares_length(headers: Iterable[tuple[bytes, bytes]]) -> bool:
    return any(name == b"content-length" for name, _ in headers)


def _asks_for_h2c(request: h11.Request) -> bool:
    return any(
        name == b"upgrade" and value.strip().lower() == b"h2c" for name, value in request.headers
    )


class HTTP1Connection:
    """Stands in for Hypercorn's ``ProtocolWrapper``, which would switch a connection to HTTP/2:
    this one speaks HTTP/1.1 (and WebSocket) only, whatever ALPN or the client says."""

    def __init__(
        self,
        app: AppWrapper,
        config: Config,
        context: WorkerContext,
        task_group: TaskGroup,
        state: ConnectionState,
        ssl: bool,
        client: tuple[str, int] | None,
        server: tuple[str, int] | None,
        send: Callable[[Event], Awaitable[None]],
        writable_now: Callable[[int], bool] | None = None,
    ) -> None:
        self._send = send
        self._client = client
        self._task_group = task_group
        # Set once the connection is refused: what the client still sends is read and dropped.
        self._lingering: trio.CancelScope | None = None
        self._close_sent = False
        self.protocol = HardenedH11Protocol(
            app, config, context, task_group, state, ssl, client, server, send
        )
        self.protocol.writable_now = writable_now

    async def initiate(self) -> None:
        await self.protocol.initiate()

    async def handle(self, event: Event) -> None:
        if self._lingering is not None:
            if isinstance(event, Closed):  # the client has read the refusal and gone
                self._lingering.cancel()
                await self._close_once()
            return
        try:
            await self.protocol.handle(event)
        except H2ProtocolAssumedError:
            log.info("HTTP/2 connection preface from %s refused (505)", self._client)
            await self._send(RawData(data=HTTP2_REFUSED))
            self._lingering = trio.CancelScope()
            self._task_group.spawn(self._close_after_linger, self._lingering)

    async def _close_after_linger(self, lingering: trio.CancelScope) -> None:
        """Close a refused connection after ``REFUSAL_LINGER_S``, unless the client closes it
        first. Closing at once would drop the refusal: a socket closed while the client's
        bytes are still unread resets the connection, and the client then loses the answer
        it had not read yet (the lingering close of RFC 9112 section 9.6)."""
        with lingering:
            await trio.sleep(REFUSAL_LINGER_S)
        await self._close_once()

    async def _close_once(self) -> None:
        # Closing tells this protocol ``Closed`` in turn: only the first one closes.
        if not self._close_sent:
            self._close_sent = True
            await self._send(Closed())
