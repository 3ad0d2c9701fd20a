"""Upstream failures become one `error` terminal with a stable code; the server keeps serving."""

from __future__ import annotations

import socket
from typing import Any

import pytest
import trio

from aether.testing.fake_llm import Behaviour, FakeLLM
from tests.helpers import (
    assert_stream_invariants,
    content_of,
    make_settings,
    running_server,
    ws_client,
)

DEADLINE_S = 10


def settings_for(base_url: str, **overrides: Any) -> Any:
    return make_settings(
        provider="http", llm_base_url=base_url, llm_model="fake-model", **overrides
    )


@pytest.fixture(params=["aether", "httpx"])
def transport(request: pytest.FixtureRequest) -> str:
    """Each upstream fault, with either transport of the HTTP path."""
    value: str = request.param
    return value


@pytest.mark.parametrize(
    ("behaviour", "code", "partial"),
    [
        (Behaviour(status=500), "upstream_http_error", ""),
        (Behaviour(status=401), "upstream_http_error", ""),
        (
            Behaviour(tokens=10, failure="reset", fail_after=3),
            "upstream_disconnected",
            "tok0 tok1 tok2 ",
        ),
        (
            Behaviour(tokens=10, failure="malformed", fail_after=2),
            "upstream_protocol_error",
            "tok0 tok1 ",
        ),
        (
            Behaviour(tokens=10, failure="error_event", fail_after=1),
            "upstream_protocol_error",
            "tok0 ",
        ),
        (
            Behaviour(tokens=10, failure="no_done", fail_after=2),
            "upstream_disconnected",
            "tok0 tok1 ",
        ),
        (Behaviour(first_token_delay_s=5), "upstream_timeout", ""),
    ],
    ids=["500", "401", "reset", "malformed", "error-event", "no-done", "first-token-timeout"],
)
async def test_upstream_failure_becomes_an_error_terminal(
    fake_llm: FakeLLM, behaviour: Behaviour, code: str, partial: str, transport: str
) -> None:
    fake_llm.script(behaviour)
    settings = settings_for(
        fake_llm.base_url, llm_first_token_timeout_s=0.3, llm_transport=transport
    )
    with trio.fail_after(DEADLINE_S):
        async with running_server(settings) as server, ws_client(server.ws_url) as client:
            failed = await client.chat("hi", id="bad")
            after = await client.chat("hi", id="good")
    terminal = assert_stream_invariants(failed)
    assert terminal["type"] == "error"
    assert terminal["code"] == code
    assert "Traceback" not in terminal["message"]
    assert content_of(failed) == partial
    assert assert_stream_invariants(after)["type"] == "completion"


async def test_an_unterminated_last_event_with_finish_reason_is_a_whole_answer(
    fake_llm: FakeLLM,
) -> None:
    fake_llm.script(Behaviour(tokens=10, failure="unterminated", fail_after=2))
    with trio.fail_after(DEADLINE_S):
        async with (
            running_server(settings_for(fake_llm.base_url)) as server,
            ws_client(server.ws_url) as client,
        ):
            messages = await client.chat("hi", id="r1")
    assert assert_stream_invariants(messages)["type"] == "completion"
    assert content_of(messages) == "tok0 tok1 end."


async def test_refused_connection_is_upstream_unavailable(
    nursery: trio.Nursery, transport: str
) -> None:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    settings = settings_for(f"http://127.0.0.1:{port}/v1", llm_transport=transport)
    with trio.fail_after(DEADLINE_S):
        async with running_server(settings) as server, ws_client(server.ws_url) as client:
            first = await client.chat("hi", id="a")
            second = await client.chat("hi", id="b")
    for messages in (first, second):
        terminal = assert_stream_invariants(messages)
        assert (terminal["type"], terminal["code"]) == ("error", "upstream_unavailable")
