"""A resumed stream read through an outbox of its own, and one routed from another worker.

- ``AttachedStream``: one reader's hold on a resumable request whose messages go to an outbox
  of its own (an event stream's body, or the control plane forwarding a resume to another
  worker): its messages up to the end of its attachment (the request's terminal, or word that
  another connection took it over), and a ``close`` that detaches the request if it still
  streams here, so the resume grace starts.
- ``RemoteAttachment``: a client attached to a request another worker runs. The control plane
  routes the resume there and puts what that worker forwards into this client's outbox (as a
  ``StreamSink``); transports hold it as any ``Attachment`` (``detach`` when the client goes).

@.architecture
role: resumed streams
jobs: [stream_relay, cancellation_management]
"""

from __future__ import annotations

import math

import trio

from aether.core.chat import Chunk
from aether.core.control.plane import RoutedStream
from aether.core.runtime.outbox import MESSAGE_OVERHEAD_BYTES, Outbox, OutboxEntry
from aether.core.runtime.outlet import Attachment, ends_attachment


class AttachedStream:
    def __init__(self, request_id: str, outbox: Outbox, attachment: Attachment) -> None:
        self.request_id = request_id
        self._outbox = outbox
        self._attachment = attachment
        # The batch that ends the attachment was handed out: nothing more comes.
        self.ended = False

    async def next_batch(self, idle_s: float = math.inf) -> list[Chunk] | None:
        """The next messages; an empty list after ``idle_s`` with none; None once the
        attachment ended and its last message was handed out."""
        if self.ended:
            return None
        with trio.move_on_after(idle_s):
            try:
                batch = await self._outbox.get_batch()
            except trio.EndOfChannel:
                self.ended = True
                return None
            if any(ends_attachment(message, self.request_id) for message in batch):
                self.ended = True
            return batch
        return []

    def close(self) -> None:
        """The reader is done: a request still streaming here is detached (its grace starts)."""
        if self._attachment.sends_to(self._outbox):
            self._attachment.detach()
        self._outbox.close()


class RemoteAttachment:
    def __init__(self, request_id: str, outbox: Outbox) -> None:
        self.request_id = request_id
        self._outbox = outbox
        self.finished = False
        self._active = True
        # The control plane's side of the route, once it answered.
        self.routed: RoutedStream | None = None

    # As a StreamSink (the control plane delivers).
    def put(self, messages: list[Chunk]) -> bool:
        if self._outbox.closed or not self._active:
            return False
        entries = []
        for message in messages:
            content = message.get("content")
            size = len(content) if isinstance(content, str) else 0
            entries.append(OutboxEntry(message, size + MESSAGE_OVERHEAD_BYTES))
            if ends_attachment(message, self.request_id):
                self.finished = True
                self._active = False
        self._outbox.put_entries(entries)
        return True

    async def wait_for_room(self) -> None:
        await self._outbox.wait_for_room()

    def end(self, notice: Chunk | None) -> None:
        self._active = False
        if notice is not None:
            self._outbox.put_control(notice)

    # As an Attachment (the transport holds it).
    def sends_to(self, outbox: Outbox) -> bool:
        return self._active and outbox is self._outbox

    def detach(self) -> None:
        if not self._active:
            return
        self._active = False
        if self.routed is not None:
            self.routed.detach()
