"""RequestOutlet: where one request's messages go: the attached client's outbox, and the
request's retained log, so that a client that lost its connection can come back (``resume``).

The relay numbers each message and hands it here as an ``OutboxEntry``; the same entry object
goes into the log and into the attached client's outbox, so what the log replays is exactly
what was sent: a delta the client's writer had not yet taken when more content arrived was
extended in place (coalescing), and the log sees the extended entry.

Detached (the client's writer is gone, or no client is attached), entries still go into the log
and deltas still merge into the last untaken one; nothing waits for room: the model goes on
during the resume grace, the log's byte cap bounds memory. Past the cap the oldest entries are
dropped and their assistant text kept as one string: a resume from before them gets that text as
one ``snapshot`` message (numbered as the last message it stands for: the client replaces the
answer it has with it), then the entries kept.

``attach`` replays the entries after ``after_seq`` into a client's outbox, then streams on
into it; an entry the previous client's writer never took is handed over as is (it may still
grow), one it took is copied.

@.architecture
role: request outlet
jobs: [stream_relay, backpressure]
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable
from typing import Protocol

import trio

from aether.core.chat import RESUME_INTERRUPTED, RESUMED_ELSEWHERE, Chunk
from aether.core.runtime.outbox import MESSAGE_OVERHEAD_BYTES, Outbox, OutboxEntry

TERMINAL_TYPES = frozenset({"completion", "stopped", "error"})


def ends_attachment(message: Chunk, request_id: str) -> bool:
    """Whether ``message`` is the last a client attached to ``request_id`` gets from it: the
    request's terminal, or word that another connection took the request over."""
    if message.get("role") != "server":
        return False
    if message.get("id") == request_id:
        return message.get("type") in TERMINAL_TYPES
    ref = message.get("ref")
    return (
        message.get("code") in (RESUMED_ELSEWHERE, RESUME_INTERRUPTED)
        and isinstance(ref, dict)
        and ref.get("id") == request_id
    )


def _content(entry: OutboxEntry) -> Chunk:
    """The entry's message as sent (its coalesced parts joined), as a new dict."""
    message = dict(entry.message)
    if entry.parts is not None and not entry.taken:
        message["content"] = "".join([str(message.get("content", "")), *entry.parts])
    return message


class Attachment(Protocol):
    """A client's hold on a resumable request's stream (``RuntimeEngine.resume``): the
    request's outlet on this worker, or a stream routed from the worker that runs it."""

    @property
    def finished(self) -> bool:
        """Whether the request's terminal was sent (to whichever client was attached)."""

    def sends_to(self, outbox: Outbox) -> bool:
        """Whether the request's messages go to ``outbox``."""

    def detach(self) -> None:
        """The client is gone: the request runs on for the resume grace."""


class RequestOutlet:
    def __init__(
        self,
        request_id: str,
        outbox: Outbox | None,
        *,
        keep: bool,
        max_bytes: int,
        on_detach: Callable[[], None] | None = None,
    ) -> None:
        self.request_id = request_id
        self._target = outbox
        # Whether the log is kept and a lost client detaches rather than ends the request.
        self.keep = keep
        self._max_bytes = max_bytes
        self._log: deque[OutboxEntry] = deque()
        self._bytes = 0
        self._dropped_text: list[str] = []
        self._dropped_through = -1  # the seq of the last entry dropped from the log
        self._on_detach = on_detach
        self.finished = False  # the terminal was queued
        self.detachments = 0  # how many times a client went (a resume grace each)

    @property
    def attached(self) -> bool:
        return self._target is not None and not self._target.closed

    def sends_to(self, outbox: Outbox) -> bool:
        return self._target is outbox

    @property
    def last_seq(self) -> int:
        return int(self._log[-1].message["seq"]) if self._log else self._dropped_through

    def detach(self) -> None:
        """The client is gone: keep logging, send nowhere."""
        if self._target is None:
            return
        self._target = None
        self.detachments += 1
        if self._on_detach is not None:
            self._on_detach()

    async def wait_for_room(self) -> None:
        """Wait while the attached client is over its budget. Detached, or once its writer is
        gone (then the outlet detaches, if it keeps its log), it does not wait. Raises
        trio.BrokenResourceError when the writer is gone and the outlet keeps no log."""
        target = self._target
        if target is None:
            await trio.lowlevel.checkpoint_if_cancelled()
            return
        try:
            await target.wait_for_room()
        except trio.BrokenResourceError:
            if not self.keep:
                raise
            if self._target is target:
                self.detach()

    def put_nowait(
        self, message: Chunk, content_size: int = 0, *, lead: bool = False
    ) -> OutboxEntry:
        """Queue a stream message (``lead``: the stream's first, see ``Outbox``)."""
        entry = OutboxEntry(message, content_size + MESSAGE_OVERHEAD_BYTES, lead=lead)
        self._record(entry)
        if self._target is not None:
            self._target.put_entry(entry)
        return entry

    def extend_nowait(self, entry: OutboxEntry, content: str) -> bool:
        """Append ``content`` to a delta not yet taken by a client's writer."""
        if entry.taken:
            return False
        target = self._target
        if target is not None and target.holds(entry):
            extended = target.extend_nowait(entry, content)
        else:
            entry.extend(content)  # waiting for a client: merged, as for a slow one
            extended = True
        if extended and self.keep:
            self._bytes += len(content)
            self._trim()
        return extended

    def put_final(self, messages: list[Chunk]) -> None:
        entries = [OutboxEntry(message, MESSAGE_OVERHEAD_BYTES) for message in messages]
        for entry in entries:
            self._record(entry)
        if self._target is not None:
            self._target.put_entries(entries)
        self.finished = True

    def _record(self, entry: OutboxEntry) -> None:
        if not self.keep:
            return
        self._log.append(entry)
        self._bytes += entry.size
        self._trim()

    def _trim(self) -> None:
        """Drop the oldest entries past the byte cap (never the newest: it may still grow)."""
        while self._bytes > self._max_bytes and len(self._log) > 1:
            entry = self._log.popleft()
            self._bytes -= entry.size
            message = _content(entry)
            if message.get("role") == "assistant" and message.get("type") == "message":
                content = message.get("content")
                if isinstance(content, str):
                    self._dropped_text.append(content)
            self._dropped_through = int(message["seq"])

    def attach(self, outbox: Outbox, after_seq: int) -> None:
        """Send the messages after ``after_seq`` into ``outbox``, then stream on into it. The
        previous client, if one is attached, is detached first."""
        previous = self._target
        self._target = None
        if previous is not None and previous is not outbox:
            previous.forget(self._log)  # what it had not sent goes to the new client
            previous.put_control(
                {
                    "role": "server",
                    "type": "error",
                    "id": None,
                    "code": RESUMED_ELSEWHERE,
                    "message": "another connection resumed this request: its stream goes there",
                    "ref": {"type": "resume", "id": self.request_id},
                }
            )
        replay: list[OutboxEntry] = []
        if after_seq < self._dropped_through:
            # Stands for every message up to its seq: the answer's text so far, whole.
            snapshot: Chunk = {
                "role": "server",
                "type": "snapshot",
                "content": "".join(self._dropped_text),
                "id": self.request_id,
                "seq": self._dropped_through,
            }
            replay.append(OutboxEntry(snapshot, MESSAGE_OVERHEAD_BYTES))
        for entry in self._log:
            if int(entry.message["seq"]) <= after_seq:
                continue
            if entry.taken or entry.queued_in is not None:
                # Sent before (or queued for a client that still has it): a copy.
                replay.append(OutboxEntry(_content(entry), entry.size))
            else:
                replay.append(entry)  # never sent: it may still grow
        outbox.put_entries(replay)
        self._target = outbox
