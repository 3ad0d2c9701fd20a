"""A client's outbound queue: bounded, coalescing, and never blocking a terminal message.

One ``Outbox`` sits between the relays of a client's requests (many producers) and the one task
that writes to that client (WebSocket writer or SSE body). It differs from a memory channel in
three ways the streaming contract needs:

- **Coalescing.** While the writer lags, a content delta is appended to the same request's
  previous delta if that one is still unsent, so a slow client gets fewer, larger frames
  instead of an ever longer queue. Order within a request is kept; ``seq`` stays contiguous
  because a merged delta takes no new number.
- **Bounded memory.** Unsent content is limited to ``max_bytes``; past it, relays wait (which
  backpressures their producers and, through TCP, the upstream). Waiting is cancellable, so a
  stop never depends on the client's socket.
- **Terminals never wait.** ``put_final`` appends at once, even over the limit and even while
  the caller is being cancelled: every request ends with its terminal message queued. Their
  number is bounded by the requests a client may run at once.
- **A stream's lead waits for company.** A batch holding nothing but streams' first messages
  (``accepted``: ``lead``) is taken after up to ``LEAD_ROUNDS`` scheduling rounds, not at once:
  a quick answer's first chunks, or all of it, then leave in the same write. Every other
  message is taken as soon as the writer runs.

Resource handling: the writer owns the read side and calls ``close()`` when it stops; after
that, ``put``/``extend`` raise ``trio.BrokenResourceError`` and terminals are dropped.

@.architecture
role: client outbound queue
jobs: [backpressure, message_coalescing]
"""

from __future__ import annotations

from collections import deque
from collections.abc import Iterable

import trio
from trio_util import AsyncBool

from aether.core.chat import Chunk

# What a queued message costs besides its content, so that many empty messages also count.
MESSAGE_OVERHEAD_BYTES = 64
# Coalesced deltas kept as separate strings before they are joined into one.
MAX_PARTS = 64
# Scheduling rounds a batch of leads alone waits for what follows them. A socket write costs
# far more than a round; an echo chat over a WebSocket took 2.5 writes without the wait and
# 1.7 with two rounds (3.1 and 2.0 with history).
LEAD_ROUNDS = 2


class OutboxEntry:
    """One queued message. ``parts`` collects coalesced content until the writer takes it."""

    __slots__ = ("control", "lead", "message", "parts", "queued_in", "size", "taken")

    def __init__(
        self, message: Chunk, size: int, *, control: bool = False, lead: bool = False
    ) -> None:
        self.message = message
        self.parts: list[str] | None = None
        self.size = size
        self.taken = False
        self.control = control
        # A stream's first message: it may wait a little for the stream's next ones.
        self.lead = lead
        # The outbox holding it until its writer takes it.
        self.queued_in: Outbox | None = None

    def extend(self, content: str) -> None:
        """Append ``content`` to the message (coalescing), joined when the writer takes it."""
        parts = self.parts
        if parts is None:
            self.parts = [content]
        else:
            parts.append(content)
            if len(parts) >= MAX_PARTS:
                # Many small strings cost far more than their length: fold them now and then.
                self.parts = ["".join(parts)]
        self.size += len(content)


class Outbox:
    def __init__(self, max_bytes: float, *, max_control_messages: int = 256) -> None:
        self._max_bytes = max_bytes
        self._max_control = max_control_messages
        self._entries: deque[OutboxEntry] = deque()
        self._bytes = 0
        self._control = 0
        self._closed = False
        self._readable = trio.lowlevel.ParkingLot()
        self._room = trio.lowlevel.ParkingLot()
        self.messages_coalesced = 0
        # True while a relay waits for room: the client is not keeping up. With ``stalled_since``
        # and the time its writer last sent, a watchdog tells a stalled client from a slow one.
        self.stalled = AsyncBool(False)
        self.stalled_since = trio.current_time()
        self.reader_attached = trio.Event()

    @property
    def pending_bytes(self) -> int:
        return self._bytes

    @property
    def pending_messages(self) -> int:
        return len(self._entries)

    @property
    def closed(self) -> bool:
        return self._closed

    async def wait_for_room(self) -> None:
        """Wait while the client is over its byte budget (cancellable: a stop never waits on a
        slow client). Raises trio.BrokenResourceError once the writer has stopped."""
        await trio.lowlevel.checkpoint_if_cancelled()
        while self._bytes >= self._max_bytes and not self._closed:
            if not self.stalled.value:
                self.stalled_since = trio.current_time()
                self.stalled.value = True
            await self._room.park()
        if self._closed:
            raise trio.BrokenResourceError("the client's writer has stopped")

    def _append(self, entry: OutboxEntry) -> None:
        entry.queued_in = self
        self._entries.append(entry)
        self._bytes += entry.size
        self._readable.unpark_all()

    def put_nowait(
        self, message: Chunk, content_size: int = 0, *, lead: bool = False
    ) -> OutboxEntry:
        """Queue a stream message (``lead``: the stream's first). Call ``wait_for_room`` first:
        this does not check the budget, so that a message is numbered and queued in one step,
        never lost to a cancellation."""
        entry = OutboxEntry(message, content_size + MESSAGE_OVERHEAD_BYTES, lead=lead)
        self._append(entry)
        return entry

    def put_entry(self, entry: OutboxEntry) -> None:
        """Queue a numbered message made elsewhere (a request's outlet); as ``put_nowait``."""
        if not self._closed:
            self._append(entry)

    def put_entries(self, entries: list[OutboxEntry]) -> None:
        """Queue messages now, whatever the budget (a terminal, a resume's replay)."""
        if self._closed:
            return
        for entry in entries:
            self._append(entry)

    def holds(self, entry: OutboxEntry) -> bool:
        """Whether ``entry`` waits here for the writer."""
        return entry.queued_in is self and not entry.taken

    def forget(self, entries: Iterable[OutboxEntry]) -> None:
        """Take back entries not sent yet (their request moved to another client)."""
        leaving = {id(entry) for entry in entries if self.holds(entry)}
        if not leaving:
            return
        kept: deque[OutboxEntry] = deque()
        for entry in self._entries:
            if id(entry) in leaving:
                entry.queued_in = None
                self._bytes -= entry.size
            else:
                kept.append(entry)
        self._entries = kept
        self._room.unpark_all()

    def extend_nowait(self, entry: OutboxEntry, content: str) -> bool:
        """Append ``content`` to an unsent delta; False if the writer has already taken it."""
        if entry.taken:
            return False
        entry.extend(content)
        self._bytes += len(content)
        self.messages_coalesced += 1
        return True

    def put_final(self, messages: list[Chunk]) -> None:
        """Queue a request's closing messages now, whatever the budget (never blocks)."""
        if self._closed:
            return
        for message in messages:
            self._append(OutboxEntry(message, MESSAGE_OVERHEAD_BYTES))

    def put_control(self, message: Chunk) -> bool:
        """Queue a message that belongs to no stream (pong, protocol errors, hello).

        Returns False, queueing nothing, when the client already has too many of them unread:
        a client that keeps sending without reading must not grow the server's memory.
        """
        if self._closed:
            return True
        if self._control >= self._max_control:
            return False
        self._control += 1
        self._append(OutboxEntry(message, MESSAGE_OVERHEAD_BYTES, control=True))
        return True

    async def get_batch(self) -> list[Chunk]:
        """Take every queued message, waiting for one if there is none.

        Raises trio.EndOfChannel once the outbox is closed and drained.
        """
        if not self.reader_attached.is_set():
            self.reader_attached.set()
        if self._entries:
            await trio.lowlevel.checkpoint()  # a writer that always finds work still yields
        rounds = LEAD_ROUNDS
        while True:
            while not self._entries:
                if self._closed:
                    raise trio.EndOfChannel
                await self._readable.park()
            if not rounds or not self._leads_only():
                return self.take_all()
            rounds -= 1
            await trio.lowlevel.checkpoint()

    def _leads_only(self) -> bool:
        return all(entry.lead for entry in self._entries)

    def take_all(self) -> list[Chunk]:
        """Take every queued message now (none if there is none)."""
        batch: list[Chunk] = []
        entries = self._entries
        while entries:
            entry = entries.popleft()
            entry.taken = True
            message = entry.message
            if entry.parts is not None:
                message["content"] = "".join([message["content"], *entry.parts])
            if entry.control:
                self._control -= 1
            batch.append(message)
        self._bytes = 0
        self._room.unpark_all()
        if self.stalled.value:
            self.stalled.value = False
        return batch

    def close(self) -> None:
        """No more messages will be read: wake everyone waiting, drop what comes later."""
        self._closed = True
        for entry in self._entries:
            entry.queued_in = None  # never sent: a request's outlet may hand it to another
        self._entries.clear()
        self._bytes = 0
        self._readable.unpark_all()
        self._room.unpark_all()

    def finish(self) -> None:
        """No more messages will be written: the reader drains what is queued, then ends."""
        self._closed = True
        self._readable.unpark_all()
        self._room.unpark_all()
