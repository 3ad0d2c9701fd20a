"""The built-in echo model: offline, deterministic, paced like a real one.

It repeats the user's message back token by token, so ``python -m aether`` works on a fresh
machine with no model configured, and tests can reason about exact output and timing.

@.architecture
role: echo provider
jobs: [stream_generation]
"""

from __future__ import annotations

import re

import trio

from aether.core.chat import ChatRequest, block_delta, block_end, block_start
from aether.core.chunk_channel import ChunkSender

_TOKEN = re.compile(r"\s*\S+")


def echo_tokens(message: str) -> list[str]:
    """Split a message into the tokens the echo model streams (leading spaces kept)."""
    return _TOKEN.findall(message) or [message]


class EchoProvider:
    name = "echo"

    def __init__(self, token_delay_s: float) -> None:
        self._token_delay_s = token_delay_s

    async def stream(self, request: ChatRequest, send: ChunkSender) -> None:
        await send.send(block_start())
        for token in echo_tokens(request.message):
            if self._token_delay_s > 0:
                await trio.sleep(self._token_delay_s)
            await send.send(block_delta(token))
        await send.send(block_end())
