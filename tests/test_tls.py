"""Serving HTTPS and WSS: HSTS appears only over TLS."""

from __future__ import annotations

from pathlib import Path

import httpx
import trio

from tests.helpers import (
    assert_stream_invariants,
    make_settings,
    running_server,
    tls_certificate,
    ws_client,
)

DEADLINE_S = 10


async def test_tls_serves_https_and_wss_with_hsts(tmp_path: Path) -> None:
    certfile, keyfile, client_context = tls_certificate(tmp_path)
    settings = make_settings(
        provider="echo", echo_token_delay_s=0, tls_certfile=str(certfile), tls_keyfile=str(keyfile)
    )
    with trio.fail_after(DEADLINE_S):
        async with (
            running_server(settings) as server,
            httpx.AsyncClient(base_url=server.base_url, verify=client_context) as client,
        ):
            health = await client.get("/health")
            async with ws_client(server.ws_url, ssl_context=client_context) as ws:
                messages = await ws.chat("over tls", id="r1")
    assert server.base_url.startswith("https://")
    assert health.status_code == 200
    assert health.headers["strict-transport-security"].startswith("max-age=")
    assert assert_stream_invariants(messages)["type"] == "completion"


async def test_plain_http_has_no_hsts() -> None:
    with trio.fail_after(DEADLINE_S):
        async with (
            running_server(make_settings(provider="echo")) as server,
            httpx.AsyncClient(base_url=server.base_url) as client,
        ):
            health = await client.get("/health")
    assert "strict-transport-security" not in health.headers
