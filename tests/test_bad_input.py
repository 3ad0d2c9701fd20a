"""Whatever a client sends, it gets a clear answer and loses nothing: property-based tests over
the protocol parser and over a live (in-memory) connection that keeps streaming meanwhile."""

from __future__ import annotations

import json
from typing import Any

import trio
import trio.testing
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from aether.protocol.messages import ProtocolError, parse_client_message
from tests.helpers import assert_stream_invariants, content_of, make_settings
from tests.memory_ws import MemoryServer

FRAME_CODES = {"invalid_json", "invalid_message", "unknown_type"}
TYPES = st.sampled_from(["chat", "stop", "approve", "ping", "history", "nope", "", "CHAT"])
JSON_VALUES = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=20),
    lambda children: (
        st.lists(children, max_size=3) | st.dictionaries(st.text(max_size=8), children, max_size=3)
    ),
    max_leaves=8,
)
MESSAGES = st.dictionaries(
    st.sampled_from(
        ["type", "id", "message", "path", "approved", "confirmation_id", "conversation_id", "x"]
    ),
    JSON_VALUES | TYPES,
    max_size=5,
)


def parse_outcome(frame: str) -> Any:
    """The parsed message, or the ProtocolError (anything else escapes and fails the test)."""
    try:
        return parse_client_message(frame)
    except ProtocolError as exc:
        return exc


@given(st.text(max_size=200))
def test_any_text_parses_or_gets_a_frame_error(frame: str) -> None:
    outcome = parse_outcome(frame)
    if isinstance(outcome, ProtocolError):
        assert outcome.code in FRAME_CODES
        assert outcome.message
        assert all(isinstance(v, str) for v in outcome.ref.values())


@given(MESSAGES)
def test_any_json_object_parses_or_gets_a_frame_error(message: dict[str, Any]) -> None:
    outcome = parse_outcome(json.dumps(message))
    if isinstance(outcome, ProtocolError):
        assert outcome.code in FRAME_CODES
        assert "Traceback" not in outcome.message
    else:
        assert outcome.type == message["type"]


@settings(
    max_examples=30, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(st.lists(st.one_of(st.text(max_size=50), MESSAGES.map(json.dumps)), max_size=8))
async def test_bad_frames_never_disturb_a_stream_on_the_same_connection(
    frames: list[str],
) -> None:
    async with trio.open_nursery() as nursery:
        server = MemoryServer(make_settings(provider="echo", echo_token_delay_s=0.001), nursery)
        await server.start()
        ws = await server.connect()
        await ws.send({"type": "chat", "id": "main", "message": "one two three four"})
        for frame in frames:
            await ws.send(frame)
        messages = await ws.finish("main")
        await trio.testing.wait_all_tasks_blocked()
        ws.drain()
        await ws.send({"type": "ping"})
        while not ws.messages.control or ws.messages.control[-1]["type"] != "pong":
            await ws.receive()
        nursery.cancel_scope.cancel()
    assert assert_stream_invariants(messages)["type"] == "completion"
    assert content_of(messages) == "one two three four"
    for reply in ws.messages.control:
        assert reply["type"] in {"error", "pong", "hello"}
        if reply["type"] == "error":
            assert reply["id"] is None
            assert reply["code"]
