"""BatchedSocketListener: every connection waiting in the kernel's queue, accepted in one go.

``trio.SocketListener.accept`` takes one connection per call, and each call costs a scheduling
round (a checkpoint before and after the ``accept``). On a loop busy with hundreds of streams a
round lasts milliseconds, so a burst of new connections queued for seconds: 500 REST stops sent
at once to one worker streaming 500 answers waited 7.7 s (p50) for their ``stopped``, mostly to
be accepted. Here, once the socket is readable, every connection already queued is accepted at
once (up to ``MAX_BATCH``) and handed out without another round each; the listener waits again
only when none is left.

Errors follow ``trio.SocketListener``: a connection the peer dropped before it was accepted is
skipped; running out of file descriptors or memory is raised (``trio.serve_listeners`` waits
and tries again), unless connections were taken before it, which are handed out first.

@.architecture
role: batched listener
jobs: [connection_management]
"""

from __future__ import annotations

import errno
import socket
from collections import deque

import trio

# The most connections taken from the kernel's queue between two scheduling rounds.
MAX_BATCH = 256

# Errors of ``accept`` that concern one connection only (as trio's SocketListener skips them).
SKIPPED_ERRNOS = frozenset(
    getattr(errno, name)
    for name in (
        "EPERM",
        "ECONNABORTED",
        "EPROTO",
        "ENETDOWN",
        "ENOPROTOOPT",
        "EHOSTDOWN",
        "ENONET",
        "EHOSTUNREACH",
        "EOPNOTSUPP",
        "ENETUNREACH",
        "ENOSR",
        "ESOCKTNOSUPPORT",
        "EPROTONOSUPPORT",
        "ETIMEDOUT",
        "ECONNRESET",
    )
    if hasattr(errno, name)
)


class BatchedSocketListener(trio.abc.Listener[trio.SocketStream]):
    def __init__(self, sock: socket.socket) -> None:
        """``sock``: a listening stream socket; it is made non-blocking and owned from now."""
        sock.setblocking(False)
        self._sock = sock
        self._ready: deque[trio.SocketStream] = deque()
        self._closed = False

    @property
    def socket(self) -> socket.socket:
        return self._sock

    async def accept(self) -> trio.SocketStream:
        while not self._ready:
            if self._closed:
                raise trio.ClosedResourceError("the listener is closed")
            await trio.lowlevel.wait_readable(self._sock)
            self._take_queued()
        await trio.lowlevel.checkpoint_if_cancelled()
        return self._ready.popleft()

    def _take_queued(self) -> None:
        for _ in range(MAX_BATCH):
            try:
                connection, _ = self._sock.accept()
            except BlockingIOError:
                return
            except OSError as exc:
                if exc.errno in SKIPPED_ERRNOS:
                    continue
                if self._ready:
                    return  # hand these out; the error comes again on the next call
                raise
            connection.setblocking(False)
            self._ready.append(trio.SocketStream(trio.socket.from_stdlib_socket(connection)))

    async def aclose(self) -> None:
        if not self._closed:
            self._closed = True
            trio.lowlevel.notify_closing(self._sock)
            self._sock.close()
            while self._ready:  # taken from the kernel, never handed out
                await self._ready.popleft().aclose()
        await trio.lowlevel.checkpoint()
