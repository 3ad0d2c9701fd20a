"""The HTTP path's sharded upstream clients: requests spread evenly, every shard is closed."""

from __future__ import annotations

import contextlib

import httpx

from aether.core.providers.upstream_clients import SHARD_CONNECTIONS, UpstreamClients

TIMEOUT = httpx.Timeout(5.0)


async def test_shards_bound_the_total_and_leases_go_to_the_least_busy() -> None:
    clients = UpstreamClients(max_connections=2 * SHARD_CONNECTIONS + 1, timeout=TIMEOUT)
    assert clients.shards == 3
    async with clients, contextlib.AsyncExitStack() as stack:
        leased = [await stack.enter_async_context(clients.lease()) for _ in range(3)]
        assert len({id(client) for client in leased}) == 3
        # Three in flight, one per shard: the fourth shares a shard, the least busy one.
        async with clients.lease() as fourth:
            assert fourth in leased
    for client in leased:
        assert client.is_closed


async def test_a_finished_lease_frees_its_shard() -> None:
    clients = UpstreamClients(max_connections=2 * SHARD_CONNECTIONS, timeout=TIMEOUT)
    async with clients:
        async with clients.lease() as first, clients.lease() as second:
            assert second is not first
        async with clients.lease() as again:
            assert again is first


async def test_a_small_pool_is_one_client() -> None:
    clients = UpstreamClients(max_connections=10, timeout=TIMEOUT)
    assert clients.shards == 1
    async with clients, clients.lease() as client:
        assert not client.is_closed
