"""A resume routed between workers: the owner forwards the stream, the asker delivers it.

A client resumes on worker B a chat that worker A runs (or keeps, ended, for the retention).
B's control plane routes ``resume`` to A (its live-chat hash, or the chat's retention key);
A attaches the chat to an outbox of its own (``WorkerCommands.resume_stream``) and forwards what
it reads there to B's channel, in order, one batch per publish:

    A -> B  reply        (ok, or an error, or "exhausted": ended, nothing left)
    A -> B  stream n=0   messages...          B puts them in the client's outbox
    A -> B  stream n=1   messages, ack asked  (half the window unacknowledged)
    B -> A  ack          once the client's outbox has room again: the bytes it has so far
    A -> B  stream n=k   ..., the terminal    end: both sides are done

Flow control is a window of bytes: A sends while less than ``window_bytes`` of content is
unacknowledged, asks for an ``ack`` in the batch that takes it past half the window, and
otherwise waits, while the request's deltas merge in A's outbox (as for any slow client). B
acknowledges only when asked, once its client has room, so a stream its client keeps up with
costs one publish per batch and no ack, and a slow client on B costs neither side more than the
window. Liveness: while A waits (for a batch, or an ack)
it sends B a ``probe`` every ``probe_s``: a probe nobody receives (B is gone), or one for a
call B does not know (its client left), ends the forwarding, and the chat runs on detached for
the resume grace. B, hearing nothing from A for ``lost_after_s``, or seeing a batch out of
order (its subscription was lost meanwhile), ends the client's stream with an error
``resume_interrupted``: the client resumes again from the last seq it has, so nothing is lost or
doubled. A client that leaves B is told to A (``detach``).

@.architecture
role: routed resume
jobs: [message_routing, stream_relay]
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable
from typing import Any

import orjson
import trio

from aether.core.chat import RESUME_INTERRUPTED, Chunk
from aether.core.control.plane import StreamSink, StreamSource
from aether.core.errors import ControlPlaneUnavailable

log = logging.getLogger(__name__)

# What a forwarded stream may have unacknowledged (its messages' content and overhead), and
# what one message counts besides its content.
WINDOW_BYTES = 64 * 1024
MESSAGE_BYTES = 64

# Publish a message on a worker's channel; how many listeners got it. Raises
# ControlPlaneUnavailable.
Publish = Callable[[str, bytes], Awaitable[int]]


def interrupted_notice(request_id: str) -> Chunk:
    return {
        "role": "server",
        "type": "error",
        "id": None,
        "code": RESUME_INTERRUPTED,
        "message": "the stream from the worker running this request broke off: resume again "
        "after the last seq received",
        "ref": {"type": "resume", "id": request_id},
    }


class IncomingStream:
    """The asking worker's side of a routed resume (a ``RoutedStream``)."""

    def __init__(
        self,
        call: str,
        request_id: str,
        sink: StreamSink,
        tell_owner: Callable[[str, dict[str, Any]], None],
        on_done: Callable[[str], None],
        lost_after_s: float,
    ) -> None:
        self.call = call
        self.request_id = request_id
        self._sink = sink
        self._tell_owner = tell_owner  # (owner worker id, message): published soon
        self._on_done = on_done
        self._lost_after_s = lost_after_s
        self.owner_worker: str | None = None
        self._next = 0
        self._heard = trio.Event()
        # The bytes through the last batch that asked for an ack, until it is sent (else None).
        self._ack_due: int | None = None
        self.done = False
        self._keeping = trio.CancelScope()

    def receive(self, message: dict[str, Any]) -> None:
        """A message from the owner: a batch of the stream, or a probe."""
        if self.done:
            return
        self.owner_worker = str(message["from"])
        self._heard.set()
        if message["op"] != "stream":
            return
        if message["n"] != self._next:
            log.warning(
                "resume of request %s: batch %s came where %d was due: the stream broke off",
                self.request_id,
                message["n"],
                self._next,
            )
            self._lose()
            return
        self._next += 1
        if not self._sink.put(message["messages"]):
            self.detach()
            return
        if message["end"]:
            self._finish(None)
            return
        if message["ack"]:
            self._ack_due = int(message["through"])

    async def keep(self) -> None:
        """Ack each batch once the client has room; notice an owner that fell silent."""
        with self._keeping:
            while not self.done:
                with trio.move_on_after(self._lost_after_s):
                    await self._heard.wait()
                if not self._heard.is_set():
                    log.warning(
                        "resume of request %s: worker %s fell silent",
                        self.request_id,
                        self.owner_worker,
                    )
                    self._lose()
                    return
                self._heard = trio.Event()
                if self._ack_due is not None:
                    try:
                        await self._sink.wait_for_room()
                    except trio.BrokenResourceError:
                        self.detach()
                        return
                    through, self._ack_due = self._ack_due, None
                    self._tell("ack", through=through)

    def detach(self) -> None:
        """The client is gone: tell the owner, which detaches the chat (its grace starts)."""
        if self.done:
            return
        self._tell("detach")
        self._finish(None)

    def _lose(self) -> None:
        self._tell("detach")
        self._finish(interrupted_notice(self.request_id))

    def _tell(self, op: str, **fields: Any) -> None:
        if self.owner_worker is not None:
            self._tell_owner(self.owner_worker, {"op": op, "call": self.call, **fields})

    def _finish(self, notice: Chunk | None) -> None:
        self.done = True
        self._sink.end(notice)
        self._keeping.cancel()
        self._on_done(self.call)


class OutgoingStream:
    """The owner's side of a routed resume: forwards ``source`` to the asker's channel."""

    def __init__(
        self,
        call: str,
        source: StreamSource,
        channel: str,
        worker_id: str,
        window_bytes: int = WINDOW_BYTES,
    ) -> None:
        self.call = call
        self._source = source
        self._channel = channel
        self._worker_id = worker_id
        self._window = window_bytes
        self.scope = trio.CancelScope()  # cancelled when the asker detaches
        self._acked_through = 0  # the bytes the asker's client has room for
        self._acked = trio.Event()

    def acked(self, through: int) -> None:
        if through > self._acked_through:
            self._acked_through = through
            self._acked.set()
            self._acked = trio.Event()

    async def forward(self, publish: Publish, reply: bytes, probe_s: float) -> None:
        """Send ``reply``, then the stream, until it ends, the asker goes, or Redis fails;
        the source is closed (the chat detached, if it still streams here) either way."""
        try:
            with self.scope:
                if not await publish(self._channel, reply):
                    return
                number = 0
                sent = 0  # the bytes forwarded, as counted for the window
                asked = 0  # the bytes through the last batch that asked for an ack
                while True:
                    batch = await self._source.next_batch(probe_s)
                    if batch is None:
                        return
                    if not batch:
                        if not await self._probe(publish):
                            return
                        continue
                    end = self._source.ended
                    sent += _counted(batch)
                    ask = sent - max(asked, self._acked_through) >= self._window // 2
                    if ask:
                        asked = sent
                    message = {
                        "op": "stream",
                        "call": self.call,
                        "from": self._worker_id,
                        "n": number,
                        "messages": batch,
                        "end": end,
                        "ack": ask,
                        "through": sent,
                    }
                    number += 1
                    if not await publish(self._channel, orjson.dumps(message)) or end:
                        return
                    while sent - self._acked_through >= self._window:
                        acked = self._acked
                        with trio.move_on_after(probe_s):
                            await acked.wait()
                        if not acked.is_set() and not await self._probe(publish):
                            return
        except ControlPlaneUnavailable:
            log.warning(
                "forwarding call %s: Redis unreachable; the chat runs on detached", self.call
            )
        finally:
            self._source.close()

    async def _probe(self, publish: Publish) -> bool:
        """Whether the asker still listens (a probe for a call it forgot gets a ``detach``)."""
        probe = {"op": "probe", "call": self.call, "from": self._worker_id}
        return bool(await publish(self._channel, orjson.dumps(probe)))


def _counted(batch: list[Chunk]) -> int:
    """What a batch counts against the window: its text, and a fixed cost per message."""
    total = 0
    for message in batch:
        content = message.get("content")
        total += MESSAGE_BYTES + (len(content) if isinstance(content, str) else 0)
    return total
