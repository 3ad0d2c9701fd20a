"""The hub of connected WebSocket clients, and the one writer task each of them has.

Every message to a client goes through that client's ``Outbox``; the writer (``write_outbox``)
sends it, or, for what a frame queued while the writer was idle, the task that read the frame
(``send_outbox_now``), when the socket takes it at once; ``sending`` keeps them from sending at
the same time, so the order on the wire is the outbox's. A client that has to be closed by the
server is closed by its writer, after what was queued before the close. Where the server takes
several frames in one write, what was taken from the outbox goes in as few writes as
``MAX_WRITE_CHARS`` allows: per frame, the server's send path costs more than the frame.

@.architecture
role: WebSocket hub
jobs: [cleanup, connection_management, message_routing]
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable, Iterator, Sequence
from dataclasses import dataclass, field

import orjson
import trio

from aether.core.chat import Chunk
from aether.core.collection_pacing import FULL_COLLECTIONS
from aether.core.metrics import Metrics
from aether.core.runtime.outbox import Outbox

log = logging.getLogger(__name__)

CLOSE_NORMAL = 1000
CLOSE_GOING_AWAY = 1001
CLOSE_POLICY_VIOLATION = 1008
CLOSE_TRY_AGAIN_LATER = 1013

# What one write holds at most (in characters) when frames are sent together, unless a single
# frame is larger. A send the peer is slow to take cannot be cancelled (the server shields it)
# and ``last_sent_at`` moves only when it returns: a write of about what a socket's send buffer
# takes at once keeps both as they were with one frame per write. A chat's frames are far
# smaller, so a burst of them still goes in one write.
MAX_WRITE_CHARS = 16 * 1024


@dataclass(eq=False)
class ClientConnection:
    """One connected client. ``last_sent_at`` is when its writer last sent a message (the
    watchdogs' clock: keepalives, stalls)."""

    id: str
    owner: str
    outbox: Outbox
    ip: str
    remote: str
    last_sent_at: float = field(default_factory=trio.current_time)
    # True while a task sends what it took from the outbox (its order on the wire is kept).
    sending: bool = False
    cancel_scope: trio.CancelScope = field(default_factory=trio.CancelScope)
    close_code: int = CLOSE_NORMAL
    close_reason: str = ""

    @property
    def closing(self) -> bool:
        """True once the server began closing this client (its outbox takes nothing more)."""
        return self.outbox.closed

    def close(self, code: int, reason: str, *, drop_queued: bool = False) -> None:
        """Ask the writer to close with ``code``: after what is queued, or at once (a client too
        slow to take what is queued would otherwise never see the close)."""
        if drop_queued:
            # Also after a gentler close began: the queue may be what the client cannot take.
            log.info("client %s: closing at once (%d %s)", self.id, code, reason)
            self.close_code, self.close_reason = code, reason
            self.outbox.close()
        elif not self.outbox.closed:
            log.info("client %s: closing (%d %s)", self.id, code, reason)
            self.close_code, self.close_reason = code, reason
            self.outbox.finish()


class ClientHub:
    def __init__(self, metrics: Metrics | None = None) -> None:
        self._metrics = metrics or Metrics()
        self._clients: dict[str, ClientConnection] = {}
        self._per_ip: dict[str, int] = {}
        self._client_left = trio.lowlevel.ParkingLot()

    def register(self, client: ClientConnection) -> None:
        self._clients[client.id] = client
        self._per_ip[client.ip] = self._per_ip.get(client.ip, 0) + 1
        self._metrics.connections.inc()
        log.info(
            "client %s connected from %s (%d connected)",
            client.id,
            client.remote,
            len(self),
            extra={"client_id": client.id, "remote": client.remote, "owner": client.owner},
        )

    def unregister(self, client: ClientConnection) -> None:
        if self._clients.pop(client.id, None) is not None:
            self._metrics.connections.dec()
            left = self._per_ip[client.ip] - 1
            if left:
                self._per_ip[client.ip] = left
            else:
                del self._per_ip[client.ip]
            log.info(
                "client %s disconnected (%d connected)",
                client.id,
                len(self),
                extra={"client_id": client.id},
            )
            self._client_left.unpark_all()
            FULL_COLLECTIONS.connection_closed(still_open=len(self))

    def count_from(self, ip: str) -> int:
        """How many clients are connected from ``ip``."""
        return self._per_ip.get(ip, 0)

    def broadcast(self, message: Chunk) -> int:
        """Queue a control message for every client; returns how many accepted it."""
        return sum(client.outbox.put_control(dict(message)) for client in self)

    def close_all(self, code: int, reason: str) -> None:
        for client in self:
            client.close(code, reason)

    async def wait_until_empty(self) -> None:
        """Return once no client is connected."""
        await trio.lowlevel.checkpoint()
        while self._clients:
            await self._client_left.park()

    def __iter__(self) -> Iterator[ClientConnection]:
        return iter(list(self._clients.values()))

    def __len__(self) -> int:
        return len(self._clients)


def encode(message: Chunk) -> str:
    return orjson.dumps(message).decode()


def writes(batch: list[Chunk]) -> Iterator[list[str]]:
    """The encoded messages of ``batch``, in order, in groups of at most ``MAX_WRITE_CHARS``
    (a larger message alone)."""
    texts: list[str] = []
    size = 0
    for message in batch:
        text = encode(message)
        if texts and size + len(text) > MAX_WRITE_CHARS:
            yield texts
            texts, size = [], 0
        texts.append(text)
        size += len(text)
    if texts:
        yield texts


async def write_outbox(
    client: ClientConnection,
    send_text: Callable[[str], Awaitable[None]],
    send_texts: Callable[[Sequence[str]], Awaitable[None]] | None = None,
) -> None:
    """The client's writer: send every queued message, in order, until the outbox ends. With
    ``send_texts`` (several frames in one write), each batch the outbox gives goes in as few
    writes as ``writes`` makes; without, one message at a time."""
    outbox = client.outbox
    while True:
        try:
            batch = await outbox.get_batch()
        except trio.EndOfChannel:
            return
        if send_texts is None or len(batch) == 1:
            await send_batch(client, batch, send_text=send_text)
        else:
            await send_batch(client, batch, send_texts=send_texts)


async def send_batch(
    client: ClientConnection,
    batch: list[Chunk],
    *,
    send_text: Callable[[str], Awaitable[None]] | None = None,
    send_texts: Callable[[Sequence[str]], Awaitable[None]] | None = None,
) -> None:
    """Send ``batch`` in order: a frame a send with ``send_text``, else in as few writes as
    ``writes`` makes with ``send_texts``. The client counts as sending meanwhile."""
    client.sending = True
    try:
        if send_text is not None:
            for message in batch:
                await send_text(encode(message))
                client.last_sent_at = trio.current_time()
        elif send_texts is not None:
            for texts in writes(batch):
                await send_texts(texts)
                client.last_sent_at = trio.current_time()
    finally:
        client.sending = False


# What a queued message's frame adds to its size in the outbox's count (its JSON fields, the
# frame's header), for the estimate ``send_outbox_now`` asks the socket about.
FRAME_OVERHEAD_BYTES = 256


async def send_outbox_now(
    client: ClientConnection,
    send_texts: Callable[[Sequence[str]], Awaitable[None]],
    writable_now: Callable[[int], bool],
) -> None:
    """Send what the client's outbox holds from the calling task (the one that read a frame),
    if the writer is not sending and the socket takes it at once (``writable_now``): a stop's
    ``stopped`` then leaves in the step that read the stop, not a scheduling round later, when
    the writer runs among every task the burst woke. Otherwise the writer sends it as usual."""
    outbox = client.outbox
    queued = outbox.pending_messages
    if not queued or client.sending or client.closing:
        return
    if not writable_now(outbox.pending_bytes + queued * FRAME_OVERHEAD_BYTES):
        return
    await send_batch(client, outbox.take_all(), send_texts=send_texts)
