"""The ``/ws`` endpoint as a plain ASGI application: one nursery and cancel scope per client.

It runs under Hypercorn's trio worker next to the Quart app (see ``aether.app``). Plain ASGI,
rather than Quart's websocket wrapper, keeps one task reading frames, one task writing them and
nothing in between: no extra buffered channel hop per frame, the exact close codes, and empty
binary frames arrive as bytes. Under Aether's own server (``RECEIVE_INLINE``) the task that reads
the socket handles each frame itself (``InlineDispatch``); under another, this task does, from
``receive``.

    client connection (nursery + scope)
      ├─ reader (the server's reading task, or this one): frame -> MessageHandler
      ├─ this task: waits for the disconnect
      ├─ writer: Outbox -> websocket.send, or the server's batch send
      │    (the reader sends what a frame queued itself when the writer is idle and the
      │    socket takes it at once: ``hub.send_outbox_now``)
      └─ one task per chat: RuntimeEngine.run_chat (own nursery + scope)

Resource handling: when the client leaves, its chats are stopped with reason ``disconnect`` and
the connection scope is cancelled; the hub forgets it in ``finally``.

@.architecture
role: WebSocket endpoint
jobs: [connection_management, handshake, message_routing]
"""

from __future__ import annotations

import logging
import secrets
from collections.abc import Awaitable, Callable, Sequence
from functools import partial

import orjson
import trio

from aether import __version__
from aether.asgi import (
    RAW_SEND_KEY,
    RECEIVE_INLINE,
    REQUEST_ID_KEY,
    SEND_BATCH,
    InlineReceiver,
    Message,
    Receive,
    Scope,
    Send,
    identity_from_scope,
)
from aether.config import Settings
from aether.core.runtime.engine import RuntimeEngine
from aether.core.runtime.outbox import Outbox
from aether.protocol.messages import hello_message, select_subprotocol
from aether.ws.handlers import MessageHandler
from aether.ws.hub import (
    CLOSE_TRY_AGAIN_LATER,
    ClientConnection,
    ClientHub,
    send_outbox_now,
    write_outbox,
)
from aether.ws.inline_dispatch import InlineDispatch

log = logging.getLogger(__name__)


async def refuse(scope: Scope, send: Send, status: int, code: str, message: str) -> None:
    """Refuse a handshake with an HTTP status and a JSON error (no upgrade)."""
    request_id = scope.get(REQUEST_ID_KEY)
    body = orjson.dumps({"error": {"code": code, "message": message, "request_id": request_id}})
    headers = [(b"content-type", b"application/json"), (b"content-length", b"%d" % len(body))]
    await send({"type": "websocket.http.response.start", "status": status, "headers": headers})
    await send({"type": "websocket.http.response.body", "body": body})


class WebSocketEndpoint:
    def __init__(self, engine: RuntimeEngine, hub: ClientHub, settings: Settings) -> None:
        self._engine = engine
        self._hub = hub
        self._settings = settings

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        event = await receive()
        if event["type"] != "websocket.connect":
            return
        host, port = scope.get("client") or ("?", 0)
        limit = self._settings.max_connections_per_ip
        control = self._engine.control
        counted = await control.connection_opened(host, limit)
        if counted is None:  # this worker is the whole server
            counted = self._hub.count_from(host) < limit
        if not counted:
            log.info("WebSocket from %s refused: %d connections already", host, limit)
            await refuse(
                scope, send, 429, "too_many_connections", f"at most {limit} connections per IP"
            )
            return
        try:
            await self._serve(scope, receive, send, host, port)
        finally:
            control.connection_closed(host)

    async def _serve(
        self, scope: Scope, receive: Receive, send: Send, host: str, port: int
    ) -> None:
        """Accept the counted connection and serve it to its end."""
        accept: Message = {"type": "websocket.accept"}
        subprotocol = select_subprotocol(scope.get("subprotocols", ()))
        if subprotocol is not None:
            accept["subprotocol"] = subprotocol
        await send(accept)
        client = ClientConnection(
            id="c-" + secrets.token_hex(6),
            owner=identity_from_scope(scope),
            outbox=Outbox(self._settings.outbox_max_bytes),
            ip=host,
            remote=f"{host}:{port}",
        )
        self._hub.register(client)
        handler: MessageHandler | None = None
        dispatch: InlineDispatch | None = None
        inline: InlineReceiver | None = (scope.get("extensions") or {}).get(RECEIVE_INLINE)
        try:
            async with trio.open_nursery() as nursery:
                client.cancel_scope = nursery.cancel_scope
                # After the accept, frames go straight to the server (no middleware needs them).
                raw_send = scope.get(RAW_SEND_KEY, send)
                batches = SEND_BATCH in (scope.get("extensions") or {})
                nursery.start_soon(self._write, client, raw_send, batches)
                nursery.start_soon(self._watch_for_stall, client)
                nursery.start_soon(self._keep_alive, client)
                client.outbox.put_control(hello_message(client.id, __version__))
                handler = MessageHandler(client, self._engine, nursery, self._settings)
                if inline is not None:
                    # Frames are handled in the server's reading task from now on (no hop
                    # through the receive channel); what they queue goes out through the
                    # writer, or from that task when the socket takes it at once.
                    reply_now = None
                    if batches and inline.writable_now is not None:
                        reply_now = partial(
                            send_outbox_now, client, batch_sender(raw_send), inline.writable_now
                        )
                    dispatch = self._inline_dispatch(
                        client, handler, nursery.cancel_scope, reply_now
                    )
                    nursery.start_soon(dispatch.guard)
                    inline.on_message = dispatch
                await self._read(receive, client, handler)
                handler.stop_all()
                nursery.cancel_scope.cancel()
            if dispatch is not None and dispatch.failure is not None:
                raise dispatch.failure
        finally:
            if inline is not None:
                inline.on_message = None  # it holds the connection: no cycle through the server
            if handler is not None:
                await handler.files.abort()  # a file left half-sent is dropped
            client.outbox.close()
            self._hub.unregister(client)

    def _inline_dispatch(
        self,
        client: ClientConnection,
        handler: MessageHandler,
        scope: trio.CancelScope,
        reply_now: Callable[[], Awaitable[None]] | None,
    ) -> InlineDispatch:
        async def handle(event: Message) -> None:
            if not client.closing:
                await self._dispatch(event, handler)
                if reply_now is not None:
                    await reply_now()

        return InlineDispatch(handle, scope)

    async def _read(
        self, receive: Receive, client: ClientConnection, handler: MessageHandler
    ) -> None:
        """Handle frames until the client disconnects. Once the server is closing the
        connection (a flood, a stall), frames still arriving are dropped: nothing may start on
        a connection whose writer will send nothing more."""
        while True:
            event = await receive()
            kind = event["type"]
            if kind == "websocket.receive" and client.closing:
                continue
            if kind == "websocket.receive":
                await self._dispatch(event, handler)
            elif kind == "websocket.disconnect":
                return

    @staticmethod
    async def _dispatch(event: Message, handler: MessageHandler) -> None:
        text = event.get("text")
        if text is not None:
            await handler.handle_text(text)
        else:
            await handler.handle_binary(event.get("bytes") or b"")

    async def _watch_for_stall(self, client: ClientConnection) -> None:
        """Disconnect a client whose streams have waited on it for too long (memory is already
        bounded by the outbox; this frees the upstream streams and the connection)."""
        timeout_s = self._settings.slow_client_timeout_s
        outbox = client.outbox
        while True:
            await outbox.stalled.wait_value(True)
            # Stalled means streams wait for room; a client that still takes messages is slow,
            # not stuck: the deadline runs from the later of the stall and the last send.
            deadline = max(outbox.stalled_since, client.last_sent_at) + timeout_s
            if trio.current_time() < deadline:
                await trio.sleep_until(deadline)
                continue
            if outbox.stalled.value:
                break
        log.warning("client %s: took nothing for %.0f s: disconnecting", client.id, timeout_s)
        client.close(CLOSE_TRY_AGAIN_LATER, "client too slow", drop_queued=True)

    async def _keep_alive(self, client: ClientConnection) -> None:
        """Send a ``keepalive`` message when nothing went out for a while: proxies close idle
        connections. (Hypercorn's protocol pings are not used: its ping task keeps a closed
        connection alive until the next ping, which holds up every graceful shutdown.)"""
        interval_s = self._settings.ws_keepalive_s
        outbox = client.outbox
        last_keepalive = client.last_sent_at
        while True:
            due = max(client.last_sent_at, last_keepalive) + interval_s
            await trio.sleep_until(due)
            if trio.current_time() >= max(client.last_sent_at, last_keepalive) + interval_s:
                last_keepalive = trio.current_time()
                if not outbox.pending_messages:  # something queued will do as well
                    outbox.put_control({"role": "server", "type": "keepalive"})

    async def _write(self, client: ClientConnection, send: Send, batches: bool) -> None:
        """The writer; with ``batches`` (the server advertised ``SEND_BATCH``), what the outbox
        gives at once goes out in one write to the socket."""

        async def send_text(text: str) -> None:
            await send({"type": "websocket.send", "text": text})

        await write_outbox(client, send_text, batch_sender(send) if batches else None)
        # The outbox was finished by a server-side close: say goodbye, then end the connection.
        await send(
            {"type": "websocket.close", "code": client.close_code, "reason": client.close_reason}
        )
        client.cancel_scope.cancel()


def batch_sender(send: Send) -> Callable[[Sequence[str]], Awaitable[None]]:
    """Several text frames in one write, through the server's ``SEND_BATCH``."""

    async def send_texts(texts: Sequence[str]) -> None:
        await send({"type": SEND_BATCH, "texts": texts})

    return send_texts
