"""The channel that carries one chat turn's chunks from its producer to its relay.

``ChunkSender.send`` hands a chunk over without a scheduling round while the channel has room,
and waits (yielding, cancellably) only when it is full. A producer that makes several chunks at
once (the start of a block and its first delta, or a burst the upstream sent in one packet)
then reaches the relay in one step: the relay drains them together, consecutive deltas merge in
the outbox, and the client gets one write instead of one per chunk. Producers still yield at
their own waits (socket reads, the model's thread, the echo model's pacing), and a full channel
makes them wait, so no producer can hold the loop for more than a buffer's worth of chunks.

Resource handling: the turn owns both ends; closing the sender ends the relay's iteration.

@.architecture
role: chunk channel
jobs: [stream_relay]
"""

from __future__ import annotations

import trio

from aether.core.chat import Chunk
from aether.core.usage import TurnUsage


class ChunkSender:
    __slots__ = ("_channel", "usage")

    def __init__(self, channel: trio.MemorySendChannel[Chunk], usage: TurnUsage) -> None:
        self._channel = channel
        # Where the producer reports the upstream's token counts for the turn.
        self.usage = usage

    async def send(self, chunk: Chunk) -> None:
        """Queue ``chunk``; wait for room only when the channel is full. Raises
        trio.BrokenResourceError once the relay is gone."""
        try:
            self._channel.send_nowait(chunk)
        except trio.WouldBlock:
            await self._channel.send(chunk)

    def send_nowait(self, chunk: Chunk) -> None:
        self._channel.send_nowait(chunk)

    def close(self) -> None:
        """No more chunks: the relay ends once it has the ones queued."""
        self._channel.close()


def open_chunk_channel(
    buffer: int, usage: TurnUsage | None = None
) -> tuple[ChunkSender, trio.MemoryReceiveChannel[Chunk]]:
    send, receive = trio.open_memory_channel[Chunk](buffer)
    return ChunkSender(send, usage or TurnUsage()), receive
