"""ASGI types and the scope keys Aether's layers pass each other, shared by the REST middleware
and the WebSocket endpoint (which import it; it imports neither).

The middleware record, in the connection's scope: the request id (``REQUEST_ID_KEY``), the
caller's identity once authenticated (``IDENTITY_KEY``), and for a WebSocket the server's own
``send`` (``RAW_SEND_KEY``): once the handshake is accepted, frames need none of the
middleware (which only touch HTTP responses), and skipping their wrappers saves a few calls per
frame on the hottest path.

``SEND_BATCH`` is an ASGI extension of Aether's server (``aether.server.protocol``): advertised
in a WebSocket scope's ``extensions``, it lets the application send ``{"type": SEND_BATCH,
"texts": [...]}``, several text frames in one write to the socket.

``DISCONNECT_SIGNAL`` is another, in an HTTP scope's ``extensions``: a ``DisconnectSignal`` that
cancels the scopes handed to it once the request's stream closes (its client left, or its
response ended), so an application need not watch ``receive`` in a task of its own.

@.architecture
role: ASGI scope
jobs: [identity_resolution]
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Mapping, MutableMapping
from typing import Any

import trio

from aether.core.identity import ANONYMOUS

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
ASGIApp = Callable[[Scope, Receive, Send], Awaitable[None]]

IDENTITY_KEY = "aether.identity"
REQUEST_ID_KEY = "aether.request_id"
RAW_SEND_KEY = "aether.raw_send"
SEND_BATCH = "aether.websocket.send_batch"
DISCONNECT_SIGNAL = "aether.http.disconnect_signal"
# A WebSocket scope's extension (Aether's server): an ``InlineReceiver``. Once the application
# sets its ``on_message``, every message received (text or bytes) is handed to it in the
# connection's reading task, instead of going through the receive channel to the application's
# task (a task hop and a scheduling round per frame); connect and disconnect still come from
# ``receive``. Its ``writable_now(size)``, when the server sets it, says whether a write of
# ``size`` bytes sent now from the calling task would leave at once, whole (nothing else being
# sent on the connection, room for it in the kernel's send queue): the reading task may then
# send a reply itself instead of waking the connection's writer for it.
RECEIVE_INLINE = "aether.websocket.receive_inline"


class InlineReceiver:
    __slots__ = ("on_message", "writable_now")

    def __init__(self, writable_now: Callable[[int], bool] | None = None) -> None:
        self.on_message: Callable[[Message], Awaitable[None]] | None = None
        self.writable_now = writable_now


class DisconnectSignal:
    __slots__ = ("_scopes", "disconnected")

    def __init__(self) -> None:
        self._scopes: list[trio.CancelScope] = []
        self.disconnected = False

    def cancel_on_disconnect(self, scope: trio.CancelScope) -> None:
        """Cancel ``scope`` when the stream closes (at once if it has)."""
        if self.disconnected:
            scope.cancel()
        else:
            self._scopes.append(scope)

    def fire(self) -> None:
        """The stream closed (the server calls this)."""
        self.disconnected = True
        scopes, self._scopes = self._scopes, []
        for scope in scopes:
            scope.cancel()


def header(scope: Mapping[str, Any], name: bytes) -> str | None:
    """The first value of a request header (``name`` in lower case), decoded as latin-1."""
    for key, value in scope.get("headers", ()):
        if key.lower() == name:
            return bytes(value).decode("latin-1")
    return None


def identity_from_scope(scope: Mapping[str, Any]) -> str:
    """The caller's identity the authentication layer recorded (anonymous without keys)."""
    identity = scope.get(IDENTITY_KEY)
    return identity if isinstance(identity, str) and identity else ANONYMOUS
