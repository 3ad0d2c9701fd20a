"""The HTTP path's client as httpx users expect it, with either transport: a CA bundle of one's
own, the standard proxy variables, HTTP/2 with httpx's transport."""

from __future__ import annotations

import ssl
from pathlib import Path
from typing import Any

import pytest
import trio
import trustme

from aether.config import ConfigError, load_settings
from aether.testing.fake_llm import Behaviour, FakeLLM
from aether.testing.http_proxy import ForwardProxy
from tests.helpers import (
    assert_stream_invariants,
    content_of,
    http_settings,
    running_server,
    ws_client,
)

DEADLINE_S = 10
TRANSPORTS = pytest.mark.parametrize("transport", ["aether", "httpx"])
PROXY_VARIABLES = ("HTTPS_PROXY", "HTTP_PROXY", "ALL_PROXY", "NO_PROXY")


@pytest.fixture
def upstream_ca() -> trustme.CA:
    return trustme.CA()


@pytest.fixture
async def tls_upstream(nursery: trio.Nursery, upstream_ca: trustme.CA) -> FakeLLM:
    """The fake upstream over HTTPS, with a certificate from a CA nobody trusts by default."""
    server_context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    upstream_ca.issue_cert("127.0.0.1").configure_cert(server_context)
    fake = FakeLLM(Behaviour(tokens=5), ssl_context=server_context)
    await nursery.start(fake.serve)
    return fake


@pytest.fixture
async def proxy(nursery: trio.Nursery) -> ForwardProxy:
    forward = ForwardProxy()
    await nursery.start(forward.serve)
    return forward


@pytest.fixture(autouse=True)
def no_proxy_from_the_machine(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in PROXY_VARIABLES:
        monkeypatch.delenv(name, raising=False)
        monkeypatch.delenv(name.lower(), raising=False)


def ca_file(ca: trustme.CA, tmp_path: Path) -> str:
    path = tmp_path / "upstream-ca.pem"
    ca.cert_pem.write_to_path(str(path))
    return str(path)


async def chat_once(settings: Any) -> list[dict[str, Any]]:
    with trio.fail_after(DEADLINE_S):
        async with running_server(settings) as server, ws_client(server.ws_url) as client:
            return await client.chat("hi", id="r1")


@TRANSPORTS
async def test_an_upstream_certificate_is_checked_against_the_ca_file(
    transport: str, tls_upstream: FakeLLM, upstream_ca: trustme.CA, tmp_path: Path
) -> None:
    trusted = await chat_once(
        http_settings(
            tls_upstream, llm_transport=transport, llm_ca_file=ca_file(upstream_ca, tmp_path)
        )
    )
    untrusted = await chat_once(http_settings(tls_upstream, llm_transport=transport))
    assert assert_stream_invariants(trusted)["type"] == "completion"
    assert content_of(trusted) == "tok0 tok1 tok2 tok3 tok4 "
    refused = assert_stream_invariants(untrusted)
    assert (refused["type"], refused["code"]) == ("error", "upstream_unavailable")


@TRANSPORTS
async def test_https_goes_through_the_proxy_the_environment_names(
    transport: str,
    tls_upstream: FakeLLM,
    upstream_ca: trustme.CA,
    proxy: ForwardProxy,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("HTTPS_PROXY", proxy.url)
    settings = http_settings(
        tls_upstream, llm_transport=transport, llm_ca_file=ca_file(upstream_ca, tmp_path)
    )
    messages = await chat_once(settings)
    assert assert_stream_invariants(messages)["type"] == "completion"
    assert proxy.targets == [f"127.0.0.1:{tls_upstream.port}"]


@TRANSPORTS
async def test_http_goes_through_the_proxy_unless_no_proxy_names_the_host(
    transport: str, fake_llm: FakeLLM, proxy: ForwardProxy, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("HTTP_PROXY", proxy.url)
    proxied = await chat_once(http_settings(fake_llm, llm_transport=transport))
    carried = list(proxy.targets)
    monkeypatch.setenv("NO_PROXY", "127.0.0.1")
    direct = await chat_once(http_settings(fake_llm, llm_transport=transport))
    assert assert_stream_invariants(proxied)["type"] == "completion"
    assert assert_stream_invariants(direct)["type"] == "completion"
    assert carried == [f"127.0.0.1:{fake_llm.port}"]
    assert proxy.targets == carried  # the second chat went direct


def test_a_missing_ca_file_is_a_clear_startup_error(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"llm_ca_file .* is not a readable file"):
        load_settings(environ={"AETHER_LLM_CA_FILE": str(tmp_path / "missing.pem")})
