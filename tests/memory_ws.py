"""Drive Aether's ASGI WebSocket endpoint in memory: no sockets, so MockClock time is exact."""

from __future__ import annotations

import json
import math
from typing import Any

import trio

from aether.asgi import SEND_BATCH
from aether.config import Settings
from aether.core.history.store import HistoryStore
from aether.core.runtime.engine import RuntimeEngine
from aether.ws.endpoint import WebSocketEndpoint
from aether.ws.hub import ClientHub
from tests.helpers import StreamCollector


class MemoryWebSocket:
    """An ASGI WebSocket peer: what the client sends goes to ``receive``; ``send`` is recorded."""

    def __init__(self, client_buffer: float = math.inf) -> None:
        """``client_buffer`` 0 makes a client that only takes what the test receives. ``writes``
        records how many frames each of the app's sends carried (several with ``SEND_BATCH``)."""
        self._to_app_send, self._to_app_receive = trio.open_memory_channel[dict[str, Any]](math.inf)
        self._from_app_send, self._from_app_receive = trio.open_memory_channel[dict[str, Any]](
            client_buffer
        )
        self.messages = StreamCollector()
        self.received: list[tuple[float, dict[str, Any]]] = []
        self.closed_with: int | None = None
        self.writes: list[int] = []

    async def app_receive(self) -> dict[str, Any]:
        return await self._to_app_receive.receive()

    async def app_send(self, event: dict[str, Any]) -> None:
        if event["type"] == SEND_BATCH:
            self.writes.append(len(event["texts"]))
            for text in event["texts"]:
                await self._from_app_send.send({"type": "websocket.send", "text": text})
            return
        if event["type"] == "websocket.send":
            self.writes.append(1)
        await self._from_app_send.send(event)

    async def connect(self) -> None:
        await self._to_app_send.send({"type": "websocket.connect"})
        accept = await self._from_app_receive.receive()
        assert accept["type"] == "websocket.accept", accept
        hello = await self.receive()
        assert hello["type"] == "hello", hello

    async def send(self, message: dict[str, Any] | str) -> None:
        text = message if isinstance(message, str) else json.dumps(message)
        await self._to_app_send.send({"type": "websocket.receive", "text": text})

    async def send_bytes(self, data: bytes) -> None:
        await self._to_app_send.send({"type": "websocket.receive", "bytes": data})

    async def disconnect(self) -> None:
        await self._to_app_send.send({"type": "websocket.disconnect", "code": 1006})

    async def receive(self) -> dict[str, Any]:
        event = await self._from_app_receive.receive()
        if event["type"] == "websocket.close":
            self.closed_with = event["code"]
            raise EOFError(event)
        message: dict[str, Any] = json.loads(event["text"])
        self.messages.add(message)
        self.received.append((trio.current_time(), message))
        return message

    def drain(self) -> list[dict[str, Any]]:
        """Every message already sent by the app (no waiting)."""
        drained = []
        while True:
            try:
                event = self._from_app_receive.receive_nowait()
            except trio.WouldBlock:
                return drained
            message = json.loads(event["text"])
            self.messages.add(message)
            self.received.append((trio.current_time(), message))
            drained.append(message)

    async def finish(self, request_id: str) -> list[dict[str, Any]]:
        while not self.messages.finished(request_id):
            await self.receive()
        return self.messages.by_request[request_id]


class MemoryServer:
    """An engine plus the WebSocket endpoint, started in a nursery, clients in memory."""

    def __init__(
        self, settings: Settings, nursery: trio.Nursery, history: HistoryStore | None = None
    ) -> None:
        self.settings = settings
        self.engine = RuntimeEngine(settings, history=history)
        self.hub = ClientHub()
        self.endpoint = WebSocketEndpoint(self.engine, self.hub, settings)
        self._nursery = nursery

    async def start(self) -> None:
        await self.engine.start(self._nursery)

    async def connect(
        self, client_buffer: float = math.inf, *, batches: bool = False
    ) -> MemoryWebSocket:
        """A connected client; with ``batches`` the scope advertises ``SEND_BATCH``, as Aether's
        server does."""
        ws = MemoryWebSocket(client_buffer)
        scope: dict[str, Any] = {"type": "websocket", "path": "/ws", "client": ("127.0.0.1", 5)}
        if batches:
            scope["extensions"] = {SEND_BATCH: {}}
        self._nursery.start_soon(self.endpoint, scope, ws.app_receive, ws.app_send)
        await ws.connect()
        return ws
