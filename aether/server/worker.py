"""``serve_app``: Hypercorn's trio worker loop, serving each connection with Aether's protocol
and containing its failure.

Hypercorn's own loop (``hypercorn.trio.run.worker_serve``) runs every connection in the
listeners' handler nursery, so an exception escaping one connection's task (a bug in the HTTP/2
protocol did) ended ``serve_listeners`` and the process. Here each connection runs under
``serve_connection``: its failure is logged with the peer's address and that connection closed;
every other connection and the listener carry on. Cancellation (shutdown) still propagates.

Listening sockets accept every queued connection in one scheduling round
(``server/listener.py``), not one round each. The rest follows Hypercorn 0.18's loop: lifespan
startup, listening sockets, ``task_status`` with the bound URLs, then serving until
``shutdown_trigger`` returns, with ``config.graceful_timeout`` as the deadline for connections
still open.

@.architecture
role: HTTP server worker
jobs: [server_startup, connection_management, exception_catching]
"""

from __future__ import annotations

import fcntl
import logging
import math
import os
import struct
import sys
from collections.abc import Awaitable, Callable
from functools import partial
from socket import SO_SNDBUF, SOL_SOCKET
from typing import Any

import trio
from hypercorn.config import Config
from hypercorn.events import Closed, Event, RawData, Updated
from hypercorn.trio.lifespan import Lifespan
from hypercorn.trio.statsd import StatsdLogger
from hypercorn.trio.task_group import TaskGroup
from hypercorn.trio.tcp_server import MAX_RECV, TCPServer
from hypercorn.trio.worker_context import WorkerContext
from hypercorn.typing import ConnectionState
from hypercorn.utils import ShutdownError, parse_socket_addr, raise_shutdown, repr_socket_addr
from hypercorn.utils import wrap_app as hypercorn_wrap_app

from aether.server.listener import BatchedSocketListener
from aether.server.protocol import HTTP1Connection

# The ioctls that give the bytes a TCP socket has not had acknowledged yet (SIOCOUTQ) and, of
# them, those not sent yet (SIOCOUTQNSD, linux/sockios.h): Linux's.
SIOCOUTQ: int | None = None
SIOCOUTQNSD = 0x894B
if sys.platform == "linux":
    import termios

    SIOCOUTQ = termios.TIOCOUTQ

log = logging.getLogger(__name__)


def takes_at_once(socket: trio.socket.SocketType, size: int) -> bool:
    """Whether the kernel takes a write of ``size`` bytes on TCP ``socket`` whole, at once:
    nothing written waits for the peer's window (a peer that stops reading closes it), and what
    is unacknowledged and the write fit in half the send buffer (the kernel counts more than
    the payload against it). Linux only (the queues are asked with ``SIOCOUTQ`` and
    ``SIOCOUTQNSD``); elsewhere, never."""
    if SIOCOUTQ is None:
        return False
    try:
        fd = socket.fileno()
        unsent = struct.unpack("i", fcntl.ioctl(fd, SIOCOUTQNSD, b"\0\0\0\0"))[0]
        if unsent:
            return False
        queued = struct.unpack("i", fcntl.ioctl(fd, SIOCOUTQ, b"\0\0\0\0"))[0]
        buffer = socket.getsockopt(SOL_SOCKET, SO_SNDBUF)
    except OSError:
        return False
    return bool(queued + size <= buffer // 2)


Listener = trio.SSLListener[trio.SocketStream] | BatchedSocketListener


class AetherTCPServer(TCPServer):
    """Hypercorn's per-connection server, speaking ``HTTP1Connection`` instead of its
    ``ProtocolWrapper`` (which Hypercorn names inside ``run``: hence this copy of it), and
    writing without a trip through the scheduler before each write (``protocol_send``), and
    watching for idleness with one task for the connection's life (``_watch_idle``)."""

    def __init__(self, *args: Any) -> None:
        super().__init__(*args)
        # Hypercorn cancels its idle task when a request starts and starts a new one (through
        # ``nursery.start``) when it ends: two tasks' worth of work per request. Here one task
        # waits, and a request only moves its deadline.
        self._idle_scope = trio.CancelScope(
            deadline=trio.current_time() + self.config.keep_alive_timeout
        )
        self._busy = False
        self._became_idle = trio.lowlevel.ParkingLot()
        # Ends the watch once nothing more can be read: it must not hold the connection open.
        self._watching = trio.CancelScope()

    async def _watch_idle(self) -> None:
        """Close the connection once it has been idle for ``keep_alive_timeout``, or once the
        server is shutting down and no request is in progress (as Hypercorn's idle task does)."""
        with self._watching:
            with self._idle_scope:
                await self.context.terminated.wait()
            while self._busy:  # shutting down: let the request in progress finish first
                await self._became_idle.park()
        if self._watching.cancelled_caught:
            return
        with trio.CancelScope(shield=True):
            await self._initiate_server_close()

    def _update_idle(self, idle: bool) -> None:
        self._busy = not idle
        if idle:
            self._idle_scope.deadline = trio.current_time() + self.config.keep_alive_timeout
            self._became_idle.unpark_all()
        else:
            self._idle_scope.deadline = math.inf

    async def protocol_send(self, event: Event) -> None:
        """Hypercorn's, except that a write which finds the send lock free takes it at once:
        ``trio.Lock.acquire`` yields even when the lock is free, which put a whole scheduling
        round between every frame (a stop's ``stopped`` among them) and the socket. The send
        itself yields only when the kernel cannot take the bytes at once (``_write_now``)."""
        if isinstance(event, Updated):
            self._update_idle(event.idle)
            return
        if not isinstance(event, RawData):
            await super().protocol_send(event)
            return
        lock = self.send_lock
        if lock.locked():
            await lock.acquire()
        else:
            lock.acquire_nowait()
        try:
            try:
                data = self._write_now(event.data)
                if data:
                    with trio.CancelScope(shield=True):
                        await self.stream.send_all(data)
            except (trio.BrokenResourceError, trio.ClosedResourceError):
                await self.protocol.handle(Closed())
        finally:
            lock.release()

    def writable_now(self, size: int) -> bool:
        """Whether ``size`` bytes sent now would leave at once, whole: nothing is being sent on
        this connection, and its socket takes them (``takes_at_once``). Never over TLS."""
        stream: trio.abc.Stream = self.stream
        if self.send_lock.locked() or not isinstance(stream, trio.SocketStream):
            return False
        return takes_at_once(stream.socket, size)

    def _write_now(self, data: bytes) -> bytes | memoryview:
        """Write what the kernel takes at once; return the rest, for ``send_all`` to wait with.

        ``send_all`` yields after every write, even one the kernel took whole: a scheduling
        round per frame, which was a third of a short chat's rounds. A plain TCP stream is
        written here directly (its socket is non-blocking); TLS goes through ``send_all``. Any
        error is left for ``send_all`` to raise, the way Trio reports it."""
        stream: trio.abc.Stream = self.stream
        if not isinstance(stream, trio.SocketStream):
            return data
        try:
            sent = os.write(stream.socket.fileno(), data)
        except OSError:
            return data
        return memoryview(data)[sent:] if sent < len(data) else b""

    async def _read_data(self) -> None:
        """Hypercorn's, without a ``fail_after`` around every read when there is no read
        timeout (a cancel scope entered and left per read, for an infinite deadline)."""
        if self.config.read_timeout is not None:
            await super()._read_data()
            return
        while True:
            try:
                data = await self.stream.receive_some(MAX_RECV)
            except (trio.ClosedResourceError, trio.BrokenResourceError):
                break
            await self.protocol.handle(RawData(bytes(data)))
            if data == b"":
                break
        await self.protocol.handle(Closed())

    async def run(self) -> None:
        stream: Any = self.stream
        if isinstance(stream, trio.SSLStream):
            try:
                with trio.fail_after(self.config.ssl_handshake_timeout):
                    await stream.do_handshake()
            except (trio.BrokenResourceError, trio.TooSlowError):
                return  # the handshake failed
            socket = stream.transport_stream.socket
            ssl = True
        else:
            socket = stream.socket
            ssl = False
        try:
            client = parse_socket_addr(socket.family, socket.getpeername())
            server = parse_socket_addr(socket.family, socket.getsockname())
            async with TaskGroup() as task_group:
                self._task_group = task_group
                self.protocol = HTTP1Connection(  # type: ignore[assignment]
                    self.app,
                    self.config,
                    self.context,
                    task_group,
                    ConnectionState(self.state),
                    ssl,
                    client,
                    server,
                    self.protocol_send,
                    self.writable_now,
                )
                await self.protocol.initiate()
                task_group.spawn(self._watch_idle)
                await self._read_data()
                self._watching.cancel()
        except OSError:
            pass
        finally:
            await self._close()


def describe_peer(stream: trio.abc.Stream) -> str:
    transport: Any = getattr(stream, "transport_stream", stream)
    try:
        return repr_socket_addr(transport.socket.family, transport.socket.getpeername())
    except (AttributeError, OSError):
        return "?"


async def serve_connection(
    make_server: Callable[[trio.abc.Stream], AetherTCPServer], stream: trio.abc.Stream
) -> None:
    """Serve one connection; whatever it raises (but cancellation) ends it, not the server."""
    peer = describe_peer(stream)
    try:
        await make_server(stream).run()
    except* Exception as failure:
        log.error("connection from %s failed and was closed", peer, exc_info=failure)
    # serve_listeners closes the stream when this returns.


async def serve_app(
    app: Any,
    config: Config,
    *,
    shutdown_trigger: Callable[[], Awaitable[None]],
    task_status: trio.TaskStatus[list[str]] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Serve the ASGI ``app`` until ``shutdown_trigger`` returns; ``task_status.started``
    receives the bound URLs (``http://127.0.0.1:PORT``)."""
    wrapped = hypercorn_wrap_app(app, config.wsgi_max_body_size, "asgi")
    config.set_statsd_logger_class(StatsdLogger)
    lifespan_state: dict[str, Any] = {}
    lifespan = Lifespan(wrapped, config, lifespan_state)
    context = WorkerContext(None)
    async with trio.open_nursery() as lifespan_nursery:
        await lifespan_nursery.start(lifespan.handle_lifespan)
        await lifespan.wait_for_startup()
        async with trio.open_nursery() as server_nursery:
            listeners, binds = _listen(config)
            task_status.started(binds)
            make_server = partial(
                AetherTCPServer, wrapped, config, context, ConnectionState(lifespan_state.copy())
            )
            try:
                async with trio.open_nursery() as nursery:
                    nursery.start_soon(raise_shutdown, shutdown_trigger)
                    nursery.start_soon(raise_shutdown, context.terminate.wait)
                    nursery.start_soon(
                        partial(
                            trio.serve_listeners,
                            partial(serve_connection, make_server),
                            listeners,
                            handler_nursery=server_nursery,
                        )
                    )
                    await trio.sleep_forever()
            except BaseExceptionGroup as error:
                _, others = error.split(ShutdownError)
                if others is not None:
                    raise others from None
            finally:
                await context.terminated.set()
                server_nursery.cancel_scope.deadline = trio.current_time() + config.graceful_timeout
        await lifespan.wait_for_shutdown()


def _listen(config: Config) -> tuple[list[Listener], list[str]]:
    sockets = config.create_sockets()
    ssl_context = config.create_ssl_context()
    listeners: list[Listener] = []
    binds: list[str] = []
    for sock in sockets.secure_sockets:
        sock.listen(config.backlog)
        assert ssl_context is not None
        listeners.append(
            trio.SSLListener(BatchedSocketListener(sock), ssl_context, https_compatible=True)
        )
        binds.append(f"https://{repr_socket_addr(sock.family, sock.getsockname())}")
    for sock in sockets.insecure_sockets:
        sock.listen(config.backlog)
        listeners.append(BatchedSocketListener(sock))
        binds.append(f"http://{repr_socket_addr(sock.family, sock.getsockname())}")
    return listeners, binds
