"""UpstreamClients: the HTTP path's connections to the model, spread over a few httpx clients.

httpcore's pool walks every connection it holds each time a request starts or ends, so one pool
of 1,000 streaming connections spends about 0.3 ms of CPU per chat just on that walk, on the
event loop, ahead of everyone's tokens. Shards of at most ``SHARD_CONNECTIONS`` keep the walk
short. A request goes to the shard with the fewest requests in flight, so the shards fill evenly
and ``llm_max_connections`` still bounds the total.

@.architecture
role: upstream HTTP client pool
jobs: [http_communication, connection_pooling]
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import AsyncIterator

import httpx

# Connections per shard: small enough that httpcore's per-request walk stays cheap, large enough
# that a modest deployment runs on one client.
SHARD_CONNECTIONS = 64


class UpstreamClients:
    """Owns the shards; ``lease()`` lends the least busy one for one request."""

    def __init__(self, *, max_connections: int, timeout: httpx.Timeout) -> None:
        shards = math.ceil(max_connections / SHARD_CONNECTIONS)
        per_shard = math.ceil(max_connections / shards)
        # Keep-alive up to the shard's size: a chat that finds an idle connection skips the TCP
        # (and TLS) handshake. httpcore closes idle connections after 5 s.
        limits = httpx.Limits(max_connections=per_shard, max_keepalive_connections=per_shard)
        self._clients = [
            httpx.AsyncClient(timeout=timeout, limits=limits, trust_env=False)
            for _ in range(shards)
        ]
        self._in_flight = [0] * shards
        self._exit_stack = contextlib.AsyncExitStack()

    @property
    def shards(self) -> int:
        return len(self._clients)

    @contextlib.asynccontextmanager
    async def lease(self) -> AsyncIterator[httpx.AsyncClient]:
        index = min(range(len(self._clients)), key=self._in_flight.__getitem__)
        self._in_flight[index] += 1
        try:
            yield self._clients[index]
        finally:
            self._in_flight[index] -= 1

    async def __aenter__(self) -> UpstreamClients:
        async with contextlib.AsyncExitStack() as stack:
            for client in self._clients:
                await stack.enter_async_context(client)
            self._exit_stack = stack.pop_all()
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        # Every shard is closed even if closing one fails.
        await self._exit_stack.aclose()
