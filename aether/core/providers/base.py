"""The interface every model path implements.

@.architecture
role: provider interface
jobs: [schema_definition]
"""

from __future__ import annotations

from typing import Protocol

from aether.core.chat import ChatRequest
from aether.core.chunk_channel import ChunkSender


class Provider(Protocol):
    """Streams one chat turn as LMC chunks.

    Resource handling: the provider does not close ``send``; its caller owns the channel.
    Error handling: failures are raised as ``ProviderError`` subclasses; ``trio.Cancelled``
    propagates, and everything the provider opened (upstream streams, threads) is closed first.
    """

    name: str

    async def stream(self, request: ChatRequest, send: ChunkSender) -> None: ...
