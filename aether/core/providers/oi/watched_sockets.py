"""The sockets the agentic path's model calls read from, so that a stop can shut one down
before the model has answered at all.

A stop closes the model's stream from the event loop (``_ModelStream.close``). Once LiteLLM has
returned the stream, its response names the socket; before that (the upstream has not sent its
headers yet) Open Interpreter's thread is blocked inside LiteLLM's call, and nothing outside it
holds the connection: the stop waited for the headers. Here the HTTP client's connections are
made by a network backend whose streams tell, as a thread starts reading from one, the model
stream that thread serves (a thread-local, set by the turn's model call): the stop then shuts
that socket down, which wakes the blocked read at once and closes the connection upstream.

@.architecture
role: watched model sockets
jobs: [cancellation, http_communication]
"""

from __future__ import annotations

import contextlib
import logging
import socket
import ssl
import threading
import typing
from collections.abc import Iterable, Iterator

import httpcore
import httpx

log = logging.getLogger(__name__)


class SocketWatcher(typing.Protocol):
    def watch(self, sock: socket.socket) -> None:
        """The socket the model call is about to read from."""


_reading = threading.local()


@contextlib.contextmanager
def reading_for(watcher: SocketWatcher) -> Iterator[None]:
    """Within: the sockets this thread reads from are told to ``watcher``."""
    _reading.watcher = watcher
    try:
        yield
    finally:
        _reading.watcher = None


def shut_down(sock: socket.socket | None) -> None:
    if sock is not None:
        with contextlib.suppress(OSError):
            sock.shutdown(socket.SHUT_RDWR)


class _WatchedStream(httpcore.NetworkStream):
    def __init__(self, stream: httpcore.NetworkStream) -> None:
        self._stream = stream

    def read(self, max_bytes: int, timeout: float | None = None) -> bytes:
        watcher: SocketWatcher | None = getattr(_reading, "watcher", None)
        if watcher is not None:
            sock = self._stream.get_extra_info("socket")
            if sock is not None:
                watcher.watch(sock)
        return self._stream.read(max_bytes, timeout)

    def write(self, buffer: bytes, timeout: float | None = None) -> None:
        self._stream.write(buffer, timeout)

    def close(self) -> None:
        self._stream.close()

    def start_tls(
        self,
        ssl_context: ssl.SSLContext,
        server_hostname: str | None = None,
        timeout: float | None = None,
    ) -> httpcore.NetworkStream:
        return _WatchedStream(self._stream.start_tls(ssl_context, server_hostname, timeout))

    def get_extra_info(self, info: str) -> typing.Any:
        return self._stream.get_extra_info(info)


class _WatchedBackend(httpcore.SyncBackend):
    def connect_tcp(
        self,
        host: str,
        port: int,
        timeout: float | None = None,
        local_address: str | None = None,
        socket_options: Iterable[httpcore.SOCKET_OPTION] | None = None,
    ) -> httpcore.NetworkStream:
        stream = super().connect_tcp(host, port, timeout, local_address, socket_options)
        return _WatchedStream(stream)


def watched_client(verify: ssl.SSLContext) -> httpx.Client:
    """An HTTP client (environment proxies honoured) whose connections tell their readers'
    watchers. httpx builds its connection pools itself: the backend is set on each (httpx 0.28,
    httpcore 1.0); where it cannot be, a stop before the headers waits for them, as before."""
    client = httpx.Client(verify=verify, trust_env=True, follow_redirects=True)
    transports = [client._transport, *(t for t in client._mounts.values() if t is not None)]
    for transport in transports:
        pool = getattr(transport, "_pool", None)
        if pool is not None and hasattr(pool, "_network_backend"):
            pool._network_backend = _WatchedBackend()
        else:
            log.warning(
                "the agentic path's HTTP client has no watched sockets: a stop before "
                "the model's headers waits for them"
            )
    return client
