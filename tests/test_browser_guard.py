"""A web page the user visits cannot drive a local Aether: DNS rebinding (a foreign Host), foreign
origins, cross-site requests without a preflight, over real sockets."""

from __future__ import annotations

from typing import Any

import httpx
import pytest
import trio

from aether.api.middleware.browser_guard import BrowserPolicy, split_host
from aether.config import ConfigError, load_settings
from aether.testing.fake_llm import Behaviour, FakeLLM
from tests.helpers import (
    assert_stream_invariants,
    http_settings,
    running_server,
    websocket_handshake_status,
    ws_client,
)

DEADLINE_S = 10


def port_of(base_url: str) -> int:
    return int(base_url.rsplit(":", 1)[1])


async def test_a_rebound_name_cannot_open_the_websocket(fake_llm: FakeLLM) -> None:
    """A page on evil.example, rebound to 127.0.0.1, is same-origin with itself: its handshake
    names its own host and origin."""
    with trio.fail_after(DEADLINE_S):
        async with running_server(http_settings(fake_llm)) as server:
            port = port_of(server.base_url)
            rebound = await websocket_handshake_status(
                server.ws_url.replace("127.0.0.1", "evil.example"),
                [(b"origin", f"http://evil.example:{port}".encode())],
                connect_to=("127.0.0.1", port),
            )
            own_page = await websocket_handshake_status(
                server.ws_url, [(b"origin", f"http://localhost:{port}".encode())]
            )
    assert rebound == 421
    assert own_page == 101


async def test_a_rebound_name_cannot_read_the_api(fake_llm: FakeLLM) -> None:
    with trio.fail_after(DEADLINE_S):
        async with (
            running_server(http_settings(fake_llm)) as server,
            httpx.AsyncClient(base_url=server.base_url) as client,
        ):
            await client.post("/v1/chat", json={"message": "private", "conversation_id": "c1"})
            rebound = await client.get("/v1/conversations", headers={"host": "evil.example"})
            rebound_page = await client.get("/", headers={"host": "evil.example:8000"})
            by_name = await client.get(
                "/v1/conversations", headers={"host": f"localhost:{port_of(server.base_url)}"}
            )
            by_ipv6 = await client.get("/health", headers={"host": "[::1]:1234"})
            no_host = await client.get("/health", headers={"host": ""})
    assert rebound.status_code == 421
    error = rebound.json()["error"]
    assert error["code"] == "host_not_allowed"
    assert "evil.example" in error["message"]
    assert "private" not in rebound.text
    assert rebound_page.status_code == 421
    assert by_name.status_code == 200
    assert by_name.json()["conversations"][0]["id"] == "c1"
    assert by_ipv6.status_code == 200
    assert no_host.status_code in (400, 421)


async def test_a_cross_site_text_plain_post_starts_nothing(fake_llm: FakeLLM) -> None:
    """What a cross-site form or ``fetch(..., {mode: "no-cors"})`` sends: no preflight."""
    with trio.fail_after(DEADLINE_S):
        async with (
            running_server(http_settings(fake_llm)) as server,
            httpx.AsyncClient(base_url=server.base_url) as client,
        ):
            body = '{"message": "run this", "id": "chosen-by-attacker"}'
            cross_site = await client.post(
                "/v1/chat/stream",
                content=body,
                headers={
                    "content-type": "text/plain",
                    "origin": "https://evil.example",
                    "sec-fetch-site": "cross-site",
                },
            )
            # The same body without any browser header still is not JSON.
            plain = await client.post(
                "/v1/chat/stream", content=body, headers={"content-type": "text/plain"}
            )
            # A fetch() whose Origin is stripped (a redirect, some extensions) is still marked.
            no_origin = await client.post(
                "/v1/chat",
                json={"message": "run this"},
                headers={"sec-fetch-site": "cross-site"},
            )
            null_origin = await client.post(
                "/v1/chat", json={"message": "run this"}, headers={"origin": "null"}
            )
    assert cross_site.status_code == 403
    assert cross_site.json()["error"]["code"] == "origin_not_allowed"
    assert plain.status_code == 415
    assert plain.json()["error"]["code"] == "unsupported_media_type"
    assert no_origin.status_code == 403
    assert no_origin.json()["error"]["code"] == "cross_site_request"
    assert null_origin.status_code == 403
    assert fake_llm.requests_seen == 0  # nothing reached the model


async def test_a_cross_site_approve_is_refused_before_the_handler(fake_llm: FakeLLM) -> None:
    fake_llm.default = Behaviour(tokens=200, delay_s=0.01)
    with trio.fail_after(DEADLINE_S):
        async with (
            running_server(http_settings(fake_llm)) as server,
            ws_client(server.ws_url) as ws,
            httpx.AsyncClient(base_url=server.base_url) as client,
        ):
            await ws.send({"type": "chat", "id": "r1", "message": "hi"})
            await ws.wait_for("r1", lambda m: m.get("content"))
            attempts = [
                await client.post(
                    f"/v1/chat/r1/{action}",
                    content='{"approved": true}',
                    headers={
                        "content-type": content_type,
                        "origin": "https://evil.example",
                        "sec-fetch-site": "cross-site",
                    },
                )
                for action in ("approve", "stop")
                for content_type in ("text/plain", "application/json")
            ]
            messages = await ws.finish("r1")
    assert [a.status_code for a in attempts] == [403, 403, 403, 403]
    assert assert_stream_invariants(messages)["type"] == "completion"


async def test_the_servers_own_page_and_listed_origins_are_allowed(fake_llm: FakeLLM) -> None:
    settings = http_settings(fake_llm, allowed_origins="https://chat.example.com")
    with trio.fail_after(DEADLINE_S):
        async with (
            running_server(settings) as server,
            httpx.AsyncClient(base_url=server.base_url) as client,
        ):
            port = port_of(server.base_url)
            own = await client.post(
                "/v1/chat",
                json={"message": "hi"},
                headers={"origin": f"http://127.0.0.1:{port}", "sec-fetch-site": "same-origin"},
            )
            listed = await client.post(
                "/v1/chat",
                json={"message": "hi"},
                headers={"origin": "https://chat.example.com", "sec-fetch-site": "cross-site"},
            )
            other_port = await client.post(
                "/v1/chat",
                json={"message": "hi"},
                headers={"origin": f"http://localhost:{port + 1}"},
            )
            # Following a link to the page from another site is a navigation: allowed.
            navigation = await client.get(
                "/", headers={"sec-fetch-site": "cross-site", "sec-fetch-mode": "navigate"}
            )
    assert own.status_code == 200
    assert listed.status_code == 200
    assert other_port.status_code == 403  # another local app's page is another site
    assert navigation.status_code == 200


async def test_any_host_is_answered_only_with_keys(fake_llm: FakeLLM) -> None:
    with pytest.raises(ConfigError, match=r"allowed_hosts '\*' needs API keys"):
        load_settings(environ={"AETHER_ALLOWED_HOSTS": "*"})
    settings = http_settings(fake_llm, allowed_hosts="*", api_keys="key-0123456789")
    key = {"authorization": "Bearer key-0123456789"}
    with trio.fail_after(DEADLINE_S):
        async with (
            running_server(settings) as server,
            httpx.AsyncClient(base_url=server.base_url) as client,
        ):
            any_name = await client.get(
                "/v1/conversations", headers={**key, "host": "chat.example.com"}
            )
            own_page = await client.post(
                "/v1/chat",
                json={"message": "hi"},
                headers={**key, "host": "chat.example.com", "origin": "https://chat.example.com"},
            )
            foreign = await client.post(
                "/v1/chat",
                json={"message": "hi"},
                headers={**key, "host": "chat.example.com", "origin": "https://evil.example"},
            )
    assert any_name.status_code == 200
    assert own_page.status_code == 200
    assert foreign.status_code == 403


def test_allowed_hosts_default_to_loopback_and_the_listening_address() -> None:
    settings = load_settings(environ={"AETHER_HOST": "127.0.0.2"})
    assert settings.effective_allowed_hosts == {"localhost", "127.0.0.1", "::1", "127.0.0.2"}
    listed = load_settings(environ={"AETHER_ALLOWED_HOSTS": "Chat.Example.com.,[::1]"})
    assert listed.effective_allowed_hosts == {"chat.example.com", "::1"}
    with pytest.raises(ConfigError, match=r"AETHER_ALLOWED_HOSTS: 'example\.com:80' is not"):
        load_settings(environ={"AETHER_ALLOWED_HOSTS": "example.com:80"})
    with pytest.raises(ConfigError, match="set AETHER_ALLOWED_HOSTS"):
        load_settings(environ={"AETHER_HOST": "0.0.0.0", "AETHER_API_KEYS": "k1"})


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        ("localhost:8000", ("localhost", 8000)),
        ("Example.COM.", ("example.com", None)),
        ("[::1]:8000", ("::1", 8000)),
        ("[::1]", ("::1", None)),
        ("[nope]:1", None),
        ("[::1", None),
        ("host:port", None),
        (":80", None),
    ],
)
def test_split_host(value: str, expected: tuple[str, int | None] | None) -> None:
    assert split_host(value) == expected


def test_an_origin_on_an_allowed_host_but_another_port_is_foreign() -> None:
    policy = BrowserPolicy(frozenset({"localhost"}), frozenset())
    scope: dict[str, Any] = {"type": "http", "headers": [(b"host", b"localhost:8000")]}
    assert policy.origin_allowed("http://localhost:8000", scope)
    assert not policy.origin_allowed("http://localhost:3000", scope)
    assert not policy.origin_allowed("http://evil.example:8000", scope)
    assert not policy.origin_allowed("null", scope)
