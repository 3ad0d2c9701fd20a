"""StreamRelay: one request's chunks, from its memory channel into a client's outbox.

The relay is where the stream invariants are kept, for every transport alike:

- every message carries the request ``id`` and a ``seq`` that rises by one per message;
- a block that was started is ended before the terminal message, whatever stopped the stream;
- exactly one terminal message (``completion``, ``stopped`` or ``error``) ends the request, and
  nothing is queued after it, even by a relay that was waiting for room when it was sealed;
- while the client lags, content deltas of one block are merged into the unsent one (see Outbox).

@.architecture
role: stream relay
jobs: [stream_relay, message_coalescing, sequence_numbering]
"""

from __future__ import annotations

import trio

from aether.core.chat import Chunk
from aether.core.runtime.outbox import Outbox, OutboxEntry
from aether.core.runtime.outlet import RequestOutlet

BlockKey = tuple[str, str, str | None]


class StreamRelay:
    __slots__ = (
        "_last_delta",
        "_last_key",
        "_open_block",
        "answer_chars",
        "chunks_relayed",
        "error",
        "finished",
        "first_content_at",
        "outbox",
        "request_id",
        "seq",
        "transcript",
    )

    def __init__(
        self,
        request_id: str,
        outbox: Outbox | RequestOutlet,
        transcript: list[str] | None = None,
    ) -> None:
        self.request_id = request_id
        # When given, receives the text of every assistant message delta (for history).
        self.transcript = transcript
        self.outbox = outbox
        self.seq = 0
        self.chunks_relayed = 0
        # Characters of what the model wrote (its text and code): a usage estimate's base.
        self.answer_chars = 0
        self.first_content_at: float | None = None
        self.error: Chunk | None = None
        self.finished = False
        self._open_block: BlockKey | None = None
        self._last_delta: OutboxEntry | None = None
        self._last_key: BlockKey | None = None

    def _frame(self, message: Chunk) -> Chunk:
        message["id"] = self.request_id
        message["seq"] = self.seq
        self.seq += 1
        return message

    async def announce(self, fields: Chunk) -> None:
        """Send the request's first message: ``accepted``, with the fields the client needs."""
        await self.outbox.wait_for_room()
        if not self.finished:
            accepted = self._frame({"role": "server", "type": "accepted", **fields})
            self.outbox.put_nowait(accepted, lead=True)

    async def relay_stream(self, chunks: trio.MemoryReceiveChannel[Chunk]) -> None:
        """Relay until the producer closes its channel. An error chunk is kept for ``finish``."""
        async for chunk in chunks:
            await self.relay_chunk(chunk)
            # Take what else is ready without a scheduler round each: consecutive deltas then
            # merge in the outbox before the writer runs.
            while True:
                try:
                    chunk = chunks.receive_nowait()
                except trio.WouldBlock:
                    break
                except trio.EndOfChannel:
                    return
                await self.relay_chunk(chunk)

    async def relay_chunk(self, chunk: Chunk) -> None:
        role = chunk.get("role", "assistant")
        kind = chunk.get("type", "message")
        if role == "server" and kind == "error":
            self.error = chunk
            return
        self.chunks_relayed += 1
        key: BlockKey = (role, kind, chunk.get("format"))
        content = chunk.get("content")
        delta = (
            content
            if type(content) is str and "start" not in chunk and "end" not in chunk
            else None
        )
        last = self._last_delta
        await self.outbox.wait_for_room()
        # From here to the end nothing yields: a cancellation cannot split numbering from queueing.
        if self.finished:
            return  # sealed (a stop) while it waited: nothing follows the terminal
        if delta is not None:
            if self.first_content_at is None:
                self.first_content_at = trio.current_time()
            if role == "assistant":
                self.answer_chars += len(delta)
                if self.transcript is not None and kind == "message":
                    self.transcript.append(delta)
        if (
            delta is not None
            and last is not None
            and key == self._last_key
            and self.outbox.extend_nowait(last, delta)
        ):
            return
        if chunk.get("start"):
            self._open_block = key
        elif chunk.get("end"):
            self._open_block = None
        entry = self.outbox.put_nowait(self._frame(chunk), 0 if delta is None else len(delta))
        self._last_delta = None if delta is None else entry
        self._last_key = key

    def finish(self, terminal: Chunk) -> None:
        """Queue the end of any open block and then the terminal message (never blocks).
        Only the first call counts: a request has exactly one terminal."""
        if self.finished:
            return
        self.finished = True
        closing: list[Chunk] = []
        if self._open_block is not None:
            role, kind, fmt = self._open_block
            end: Chunk = {"role": role, "type": kind, "end": True}
            if fmt is not None:
                end["format"] = fmt
            closing.append(self._frame(end))
            self._open_block = None
        closing.append(self._frame(terminal))
        self.outbox.put_final(closing)
