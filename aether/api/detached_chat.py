"""DetachedChat: a chat whose response body is read after its handler returned (SSE, OpenAI
streaming), and the one lifetime both such routes share.

The chat runs in the engine's nursery (``RuntimeEngine.start_detached_chat``), because Quart
iterates a streaming body after the handler returned. The body reads the chat's messages with
``next_batch`` and calls ``close`` in its ``finally``: when the body ends before the chat did (its
client went away and Quart closed the body), the chat is stopped with reason ``disconnect``;
either way the outbox is closed. A chat nobody started reading is stopped by the engine's own
watchdog.

@.architecture
role: detached chat lifetime
jobs: [streaming_coordination, cancellation_handling]
"""

from __future__ import annotations

import logging
import math

import trio

from aether.core.chat import ChatRequest, Chunk
from aether.core.runtime.engine import RuntimeEngine
from aether.core.runtime.outbox import Outbox
from aether.core.runtime.request import RequestRecord

log = logging.getLogger(__name__)


class DetachedChat:
    def __init__(self, engine: RuntimeEngine, record: RequestRecord, outbox: Outbox) -> None:
        self._engine = engine
        self.record = record
        self._outbox = outbox
        self._drained = False

    @classmethod
    async def start(
        cls, engine: RuntimeEngine, request: ChatRequest, outbox_max_bytes: int
    ) -> DetachedChat:
        """Start the chat. Raises what the engine refuses a chat with (DuplicateRequest,
        TooManyRequests, ShuttingDown)."""
        outbox = Outbox(outbox_max_bytes)
        record = await engine.start_detached_chat(request, outbox)
        return cls(engine, record, outbox)

    async def next_batch(self, idle_s: float = math.inf) -> list[Chunk] | None:
        """The chat's next messages; an empty list after ``idle_s`` with none (a heartbeat is
        due); None once the chat ended and everything was read. The wait's scope closes before
        the body yields, so nothing is suspended inside it."""
        with trio.move_on_after(idle_s):
            try:
                return await self._outbox.get_batch()
            except trio.EndOfChannel:
                self._drained = True
                return None
        return []

    def close(self) -> None:
        """The body ended: stop the chat if its client left before the chat's end."""
        if not self._drained and self.record.state == "running":
            log.info("request %s: streaming client went away", self.record.id)
            self._engine.stop_generation(self.record.id, self.record.owner, "disconnect")
        self._outbox.close()
