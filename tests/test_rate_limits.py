"""Per-IP rate limiting: buckets in virtual time, and 429s over real sockets."""

from __future__ import annotations

from typing import Any

import httpx
import trio

from aether.api.middleware.rate_limiter import RateLimiter, Tier
from tests.helpers import make_settings, running_server, websocket_handshake_status, ws_client
from tests.memory_ws import MemoryServer

DEADLINE_S = 10


async def test_bucket_allows_a_burst_then_refills_over_the_window(autojump_clock: Any) -> None:
    limiter = RateLimiter(max_clients=100)
    tier = Tier("chat", limit=3, window_s=60)
    assert [limiter.take("1.2.3.4", tier)[:2] for _ in range(3)] == [
        (True, 2),
        (True, 1),
        (True, 0),
    ]
    allowed, _, retry_after = limiter.take("1.2.3.4", tier)
    assert not allowed
    assert retry_after == 20.0
    await trio.sleep(20)
    assert limiter.take("1.2.3.4", tier)[0]
    assert not limiter.take("1.2.3.4", tier)[0]
    assert limiter.take("5.6.7.8", tier)[0]  # other clients have their own bucket


async def test_limiter_memory_is_bounded() -> None:
    limiter = RateLimiter(max_clients=100)
    tier = Tier("default", limit=10, window_s=60)
    for index in range(1000):
        limiter.take(f"10.0.{index // 256}.{index % 256}", tier)
    assert len(limiter) == 100


async def test_chat_requests_over_the_limit_get_429_and_other_ips_do_not() -> None:
    settings = make_settings(provider="echo", echo_token_delay_s=0, rate_limit_chat_per_minute=2)
    other_ip = httpx.AsyncHTTPTransport(local_address="127.0.0.2")
    with trio.fail_after(DEADLINE_S):
        async with (
            running_server(settings) as server,
            httpx.AsyncClient(base_url=server.base_url) as client,
            httpx.AsyncClient(base_url=server.base_url, transport=other_ip) as other,
        ):
            answers = [await client.post("/v1/chat", json={"message": "hi"}) for _ in range(3)]
            health = await client.get("/health")
            handshake = await websocket_handshake_status(server.ws_url)
            elsewhere = await other.post("/v1/chat", json={"message": "hi"})
    assert [a.status_code for a in answers] == [200, 200, 429]
    assert answers[0].headers["ratelimit-policy"] == '"chat";q=2;w=60'
    assert answers[0].headers["ratelimit"] == '"chat";r=1;t=0'
    refused = answers[2]
    assert refused.headers["retry-after"] == "30"
    assert refused.json()["error"]["code"] == "rate_limited"
    assert refused.headers["x-request-id"] == refused.json()["error"]["request_id"]
    assert health.status_code == 200
    assert "ratelimit" not in health.headers
    assert handshake == 429
    assert elsewhere.status_code == 200


async def test_exempt_ips_are_not_limited() -> None:
    settings = make_settings(
        provider="echo",
        echo_token_delay_s=0,
        rate_limit_chat_per_minute=1,
        rate_limit_exempt_ips="127.0.0.1",
    )
    with trio.fail_after(DEADLINE_S):
        async with (
            running_server(settings) as server,
            httpx.AsyncClient(base_url=server.base_url) as client,
        ):
            answers = [await client.post("/v1/chat", json={"message": "hi"}) for _ in range(3)]
    assert [a.status_code for a in answers] == [200, 200, 200]


async def test_websocket_messages_per_second_are_limited(
    autojump_clock: Any, nursery: trio.Nursery
) -> None:
    server = MemoryServer(make_settings(provider="echo", max_messages_per_second=5), nursery)
    await server.start()
    ws = await server.connect()
    for _ in range(11):
        await ws.send({"type": "ping"})
    replies = [await ws.receive() for _ in range(11)]
    assert [r["type"] for r in replies] == ["pong"] * 10 + ["error"]
    assert replies[-1]["code"] == "rate_limited"
    await trio.sleep(1)
    await ws.send({"type": "ping"})
    assert (await ws.receive())["type"] == "pong"


async def test_websocket_connections_per_ip_are_limited() -> None:
    settings = make_settings(provider="echo", max_connections_per_ip=2)
    with trio.fail_after(DEADLINE_S):
        async with (
            running_server(settings) as server,
            ws_client(server.ws_url),
            ws_client(server.ws_url),
        ):
            third = await websocket_handshake_status(server.ws_url)
        # Closing one frees its place.
        async with running_server(settings) as server:
            async with ws_client(server.ws_url), ws_client(server.ws_url):
                pass
            await server.hub.wait_until_empty()
            async with ws_client(server.ws_url) as again:
                assert again.hello["type"] == "hello"
    assert third == 429


async def test_behind_a_trusted_proxy_each_forwarded_client_has_its_own_limit() -> None:
    """127.0.0.1 plays the proxy: its X-Forwarded-For names the client, and each client is
    limited on its own. 127.0.0.2 is not a proxy: the same header from it changes nothing."""
    settings = make_settings(
        provider="echo",
        echo_token_delay_s=0,
        rate_limit_chat_per_minute=1,
        max_connections_per_ip=1,
        trusted_proxies="127.0.0.1,10.0.0.0/8",
    )
    not_a_proxy = httpx.AsyncHTTPTransport(local_address="127.0.0.2")

    def via(*hops: str) -> dict[str, str]:
        return {"X-Forwarded-For": ", ".join(hops)}

    with trio.fail_after(DEADLINE_S):
        async with (
            running_server(settings) as server,
            httpx.AsyncClient(base_url=server.base_url) as proxy,
            httpx.AsyncClient(base_url=server.base_url, transport=not_a_proxy) as client,
        ):

            async def chat(http: httpx.AsyncClient, headers: dict[str, str]) -> int:
                answer = await http.post("/v1/chat", json={"message": "hi"}, headers=headers)
                return answer.status_code

            alice = [await chat(proxy, via("203.0.113.7")) for _ in range(2)]
            # Bob's own header claims Alice's address; a second proxy (10.1.2.3) forwarded it.
            bob = [
                await chat(proxy, via("203.0.113.7", "198.51.100.9", "10.1.2.3")) for _ in range(2)
            ]
            spoofed = [await chat(client, via("192.0.2.1")) for _ in range(2)]
            garbage = await chat(proxy, via("not-an-address"))
            async with ws_client(server.ws_url, extra_headers=[("X-Forwarded-For", "192.0.2.50")]):
                second_from_same = await websocket_handshake_status(
                    server.ws_url, headers=[(b"x-forwarded-for", b"192.0.2.50")]
                )
                other_client = await websocket_handshake_status(
                    server.ws_url, headers=[(b"x-forwarded-for", b"192.0.2.51")]
                )
    assert alice == [200, 429]
    assert bob == [200, 429]
    assert spoofed == [200, 429]  # limited as 127.0.0.2, whatever it says
    assert garbage == 200  # counted as the proxy itself, whose bucket was untouched
    assert (second_from_same, other_client) == (429, 101)
