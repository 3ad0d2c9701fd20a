"""DetachedChat: a chat whose response body is read after its handler returned (SSE, OpenAI
streaming), and the one lifetime such routes share.

The chat runs in the engine's nursery (``RuntimeEngine.start_detached_chat``), because Quart
iterates a streaming body after the handler returned. The body reads the chat's messages with
``next_batch`` and calls ``close`` in its ``finally``. Either way the outbox is closed; when the
body ends before the chat did (its client went away and Quart closed the body):

- a chat that cannot be resumed (the OpenAI-compatible stream, or no resume grace) is stopped
  with reason ``disconnect``;
- a resumable one (``POST /v1/chat/stream`` with a resume grace, or a stream resumed with
  ``GET /v1/chat/<id>/events``) is detached from this body: it runs on for the grace, for a
  client that comes back.

A resumable stream's body ends after the request's terminal, or after word that another
connection took the request over (``ends_attachment``). A chat nobody started reading is
stopped (or detached) by the engine's own watchdog.

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
from aether.core.runtime.outlet import Attachment
from aether.core.runtime.request import RequestRecord
from aether.core.runtime.resumed_streams import AttachedStream

log = logging.getLogger(__name__)


class DetachedChat:
    def __init__(
        self,
        engine: RuntimeEngine,
        request_id: str,
        outbox: Outbox,
        *,
        record: RequestRecord | None = None,
        attachment: Attachment | None = None,
    ) -> None:
        """``record``: the chat, stopped when its reader leaves early; ``attachment``: the
        resumable chat's attachment to ``outbox``, detached instead."""
        self._engine = engine
        self.request_id = request_id
        self._outbox = outbox
        self._record = record
        self._resumed = (
            AttachedStream(request_id, outbox, attachment) if attachment is not None else None
        )
        self._drained = False

    @classmethod
    async def start(
        cls, engine: RuntimeEngine, request: ChatRequest, outbox_max_bytes: int
    ) -> DetachedChat:
        """Start the chat, resumable if the engine keeps chats for a resume. Raises what the
        engine refuses a chat with (DuplicateRequest, TooManyRequests, ShuttingDown)."""
        outbox = Outbox(outbox_max_bytes)
        if engine.resumes:
            turn = await engine.start_resumable_stream(request, outbox)
            return cls(engine, request.id, outbox, attachment=turn.outlet)
        record = await engine.start_detached_chat(request, outbox)
        return cls(engine, request.id, outbox, record=record)

    async def next_batch(self, idle_s: float = math.inf) -> list[Chunk] | None:
        """The chat's next messages; an empty list after ``idle_s`` with none (a heartbeat is
        due); None once the chat ended (or, resumable, went to another connection) and
        everything was read. The wait's scope closes before the body yields, so nothing is
        suspended inside it."""
        if self._resumed is not None:
            return await self._resumed.next_batch(idle_s)
        with trio.move_on_after(idle_s):
            try:
                return await self._outbox.get_batch()
            except trio.EndOfChannel:
                self._drained = True
                return None
        return []

    def close(self) -> None:
        """The body ended: if its client left before the chat's end, stop the chat, or detach
        it (resumable: it runs on for the resume grace)."""
        if self._resumed is not None:
            if not self._resumed.ended:
                log.info("request %s: streaming client went away", self.request_id)
            self._resumed.close()
            return
        record = self._record
        if not self._drained and record is not None and record.state == "running":
            log.info("request %s: streaming client went away", self.request_id)
            self._engine.stop_generation(record.id, record.owner, "disconnect")
        self._outbox.close()
