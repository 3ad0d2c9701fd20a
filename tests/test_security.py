"""Authentication, ownership, Origin, security headers and request ids, over real sockets."""

from __future__ import annotations

import logging
from typing import Any

import httpx
import pytest
import trio

from aether.api.middleware.error_handler import ErrorHandlerMiddleware
from aether.config import ConfigError, load_settings
from aether.testing.fake_llm import Behaviour, FakeLLM
from tests.helpers import (
    assert_stream_invariants,
    make_settings,
    running_server,
    websocket_handshake_status,
    ws_client,
)

DEADLINE_S = 10
KEY_A = "key-alpha-0123456789"
KEY_B = "key-bravo-0123456789"


def bearer(key: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}


def secured_settings(fake: FakeLLM, **overrides: Any) -> Any:
    return make_settings(
        provider="http",
        llm_base_url=fake.base_url,
        llm_model="fake-model",
        api_keys=f"{KEY_A},{KEY_B}",
        **overrides,
    )


async def test_rest_needs_a_valid_key_except_health(fake_llm: FakeLLM) -> None:
    with trio.fail_after(DEADLINE_S):
        async with (
            running_server(secured_settings(fake_llm)) as server,
            httpx.AsyncClient(base_url=server.base_url) as client,
        ):
            missing = await client.post("/v1/chat", json={"message": "hi"})
            wrong = await client.post("/v1/chat", json={"message": "hi"}, headers=bearer("nope"))
            right = await client.post("/v1/chat", json={"message": "hi"}, headers=bearer(KEY_A))
            health = await client.get("/health")
    for refused in (missing, wrong):
        assert refused.status_code == 401
        assert refused.headers["www-authenticate"].startswith("Bearer")
        error = refused.json()["error"]
        assert error["code"] == "unauthorized"
        assert error["request_id"] == refused.headers["x-request-id"]
    assert right.status_code == 200
    assert health.status_code == 200


async def test_websocket_handshake_without_a_key_is_refused_before_upgrade(
    fake_llm: FakeLLM,
) -> None:
    with trio.fail_after(DEADLINE_S):
        async with running_server(secured_settings(fake_llm)) as server:
            missing = await websocket_handshake_status(server.ws_url)
            wrong = await websocket_handshake_status(
                server.ws_url, subprotocols=["aether.v2", "bearer.nope"]
            )
    assert missing == 401
    assert wrong == 401


async def test_websocket_accepts_a_header_key_or_a_bearer_subprotocol(fake_llm: FakeLLM) -> None:
    with trio.fail_after(DEADLINE_S):
        async with running_server(secured_settings(fake_llm)) as server:
            async with ws_client(
                server.ws_url, extra_headers=[(b"authorization", f"Bearer {KEY_A}".encode())]
            ) as by_header:
                first = await by_header.chat("hi", id="r1")
            async with ws_client(
                server.ws_url, subprotocols=["aether.v2", f"bearer.{KEY_B}"]
            ) as by_subprotocol:
                assert by_subprotocol.ws.subprotocol == "aether.v2"
                second = await by_subprotocol.chat("hi", id="r1")
    assert assert_stream_invariants(first)["type"] == "completion"
    assert assert_stream_invariants(second)["type"] == "completion"


async def test_callers_cannot_stop_each_others_requests(fake_llm: FakeLLM) -> None:
    fake_llm.default = Behaviour(tokens=300, delay_s=0.005)
    with trio.fail_after(DEADLINE_S):
        async with (
            running_server(secured_settings(fake_llm)) as server,
            ws_client(server.ws_url, subprotocols=["aether.v2", f"bearer.{KEY_A}"]) as alice,
            ws_client(server.ws_url, subprotocols=["aether.v2", f"bearer.{KEY_B}"]) as bob,
            httpx.AsyncClient(base_url=server.base_url) as rest,
        ):
            await alice.send({"type": "chat", "id": "shared-id", "message": "go"})
            await alice.wait_for("shared-id", lambda m: m.get("content"))
            await bob.send({"type": "stop", "id": "shared-id"})
            refused = await bob.receive_control()
            rest_refused = await rest.post("/v1/chat/shared-id/stop", headers=bearer(KEY_B))
            # The same id is free for another caller.
            bobs = await bob.chat("mine", id="shared-id")
            alices = await alice.finish("shared-id")
    assert (refused["code"], refused["id"]) == ("unknown_request", None)
    assert rest_refused.status_code == 404
    assert assert_stream_invariants(alices)["type"] == "completion"
    assert assert_stream_invariants(bobs)["type"] == "completion"


async def test_a_caller_can_stop_its_request_from_another_connection(fake_llm: FakeLLM) -> None:
    fake_llm.default = Behaviour(tokens=1000, delay_s=0.01)
    with trio.fail_after(DEADLINE_S):
        async with (
            running_server(secured_settings(fake_llm)) as server,
            ws_client(server.ws_url, subprotocols=["aether.v2", f"bearer.{KEY_A}"]) as first,
            httpx.AsyncClient(base_url=server.base_url) as rest,
        ):
            await first.send({"type": "chat", "id": "r1", "message": "go"})
            await first.wait_for("r1", lambda m: m.get("content"))
            stop = await rest.post("/v1/chat/r1/stop", headers=bearer(KEY_A))
            messages = await first.finish("r1")
    assert stop.status_code == 202
    assert assert_stream_invariants(messages)["type"] == "stopped"


async def test_websocket_origin_must_be_the_servers_own_or_allowed(fake_llm: FakeLLM) -> None:
    settings = make_settings(provider="echo", echo_token_delay_s=0)
    with trio.fail_after(DEADLINE_S):
        async with running_server(settings) as server:
            host = server.base_url.removeprefix("http://")
            foreign = await websocket_handshake_status(
                server.ws_url, [(b"origin", b"https://evil.example")]
            )
            async with ws_client(
                server.ws_url, extra_headers=[(b"origin", f"http://{host}".encode())]
            ) as same_origin:
                assert same_origin.hello["type"] == "hello"
        allowed = make_settings(provider="echo", allowed_origins="https://chat.example.com")
        async with running_server(allowed) as server:
            async with ws_client(
                server.ws_url, extra_headers=[(b"origin", b"https://chat.example.com")]
            ) as listed:
                assert listed.hello["type"] == "hello"
            unlisted = await websocket_handshake_status(
                server.ws_url, [(b"origin", b"https://other.example.com")]
            )
    assert foreign == 403
    assert unlisted == 403


async def test_every_response_carries_security_headers_and_a_request_id(
    fake_llm: FakeLLM,
) -> None:
    with trio.fail_after(DEADLINE_S):
        async with (
            running_server(secured_settings(fake_llm)) as server,
            httpx.AsyncClient(base_url=server.base_url) as client,
        ):
            responses = [
                await client.get("/health"),
                await client.get("/nowhere", headers=bearer(KEY_A)),
                await client.post("/v1/chat", json={}, headers=bearer(KEY_A)),
                await client.post("/v1/chat", json={"message": "x"}),
                await client.get("/health", headers={"X-Request-Id": "trace-123"}),
            ]
    for response in responses:
        assert response.headers["cache-control"] == "no-store"
        assert response.headers["x-content-type-options"] == "nosniff"
        assert response.headers["x-frame-options"] == "DENY"
        assert response.headers["referrer-policy"] == "no-referrer"
        assert "default-src 'none'" in response.headers["content-security-policy"]
        assert "server" not in response.headers
        assert response.headers["x-request-id"]
    assert [r.status_code for r in responses] == [200, 404, 400, 401, 200]
    assert responses[1].json()["error"]["request_id"] == responses[1].headers["x-request-id"]
    assert responses[-1].headers["x-request-id"] == "trace-123"


async def test_an_escaped_exception_becomes_a_json_500_without_details(
    caplog: pytest.LogCaptureFixture,
) -> None:
    async def broken_app(scope: Any, receive: Any, send: Any) -> None:
        raise RuntimeError("secret internal detail /etc/passwd")

    sent: list[dict[str, Any]] = []

    async def send(message: dict[str, Any]) -> None:
        sent.append(message)

    async def receive() -> dict[str, Any]:
        return {"type": "http.request", "body": b""}

    scope = {"type": "http", "path": "/boom", "headers": []}
    with caplog.at_level(logging.ERROR):
        await ErrorHandlerMiddleware(broken_app)(scope, receive, send)
    assert sent[0]["status"] == 500
    body = sent[1]["body"].decode()
    assert "secret" not in body
    assert "internal_error" in body
    assert scope["aether.request_id"] in body
    assert scope["aether.request_id"] in caplog.text
    assert "secret internal detail" in caplog.text


def test_listening_beyond_loopback_needs_keys() -> None:
    with pytest.raises(ConfigError, match=r"refusing to listen on 0\.0\.0\.0 without API keys"):
        load_settings(environ={"AETHER_HOST": "0.0.0.0"})
    settings = load_settings(
        environ={"AETHER_HOST": "0.0.0.0", "AETHER_API_KEYS": "k1,k2", "AETHER_ALLOWED_HOSTS": "*"}
    )
    assert len(settings.api_keys) == 2
    assert "k1" not in repr(settings)


async def test_the_web_page_is_public_and_the_api_behind_it_is_not(fake_llm: FakeLLM) -> None:
    """With keys on, the page must load so that its API key field can be filled in."""
    with trio.fail_after(DEADLINE_S):
        async with (
            running_server(secured_settings(fake_llm)) as server,
            httpx.AsyncClient(base_url=server.base_url) as client,
        ):
            page = await client.get("/")
            script = await client.get("/static/app.js")
            style = await client.get("/static/app.css")
            missing_file = await client.get("/static/nothing.js")
            api = await client.get("/v1/conversations")
            api_with_key = await client.get("/v1/conversations", headers=bearer(KEY_A))
    assert page.status_code == 200
    assert "text/html" in page.headers["content-type"]
    assert script.status_code == 200
    assert style.status_code == 200
    assert missing_file.status_code == 404
    assert api.status_code == 401
    assert api_with_key.status_code == 200


async def test_the_pages_files_are_revalidated_while_the_api_is_never_stored() -> None:
    with trio.fail_after(DEADLINE_S):
        async with (
            running_server(make_settings(provider="echo")) as server,
            httpx.AsyncClient(base_url=server.base_url) as client,
        ):
            first = await client.get("/static/vendor/purify.min.js")
            again = await client.get(
                "/static/vendor/purify.min.js", headers={"if-none-match": first.headers["etag"]}
            )
            changed = await client.get(
                "/static/vendor/purify.min.js", headers={"if-none-match": '"something-else"'}
            )
            page = await client.get("/")
            api = await client.get("/v1/conversations")
    assert first.status_code == 200
    assert first.headers["cache-control"] == "no-cache"
    assert again.status_code == 304
    assert again.content == b""
    assert again.headers["etag"] == first.headers["etag"]
    assert "script-src 'self'" in again.headers["content-security-policy"]
    assert changed.status_code == 200
    assert changed.content == first.content
    assert page.headers["cache-control"] == "no-cache"
    assert api.headers["cache-control"] == "no-store"
    assert api.headers["content-security-policy"].startswith("default-src 'none'")
