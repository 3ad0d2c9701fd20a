"""The wire protocol and the SSE parser as pure functions."""

from __future__ import annotations

import pytest

from aether.core.errors import UpstreamProtocolError
from aether.core.providers.sse import DONE, SSEDecoder, parse_chunk
from aether.protocol.messages import (
    ChatMessage,
    PingMessage,
    ProtocolError,
    StopMessage,
    parse_client_message,
)


def test_chat_with_defaults() -> None:
    message = parse_client_message('{"type": "chat", "message": "hi"}')
    assert message == ChatMessage(type="chat", message="hi")
    assert message.path == "auto"
    assert message.id is None


def test_stop_and_ping() -> None:
    assert parse_client_message('{"type": "stop", "id": "r1"}') == StopMessage(type="stop", id="r1")
    assert isinstance(parse_client_message('{"type": "ping"}'), PingMessage)


@pytest.mark.parametrize(
    ("frame", "code", "ref"),
    [
        ("{not json", "invalid_json", {}),
        ("[1, 2]", "invalid_message", {}),
        ('{"message": "hi"}', "invalid_message", {}),
        ('{"type": "dance"}', "unknown_type", {"type": "dance"}),
        ('{"type": "chat", "message": 5}', "invalid_message", {"type": "chat"}),
        ('{"type": "chat", "message": ""}', "invalid_message", {"type": "chat"}),
        ('{"type": "chat", "message": "x", "path": "magic"}', "invalid_message", {"type": "chat"}),
        ('{"type": "chat", "message": "x", "auto_run": true}', "invalid_message", {"type": "chat"}),
        ('{"type": "stop"}', "invalid_message", {"type": "stop"}),
        (
            '{"type": "stop", "id": "has space"}',
            "invalid_message",
            {"type": "stop", "id": "has space"},
        ),
        (
            '{"type": "approve", "id": "r1", "confirmation_id": "cf-1", "approved": "yes"}',
            "invalid_message",
            {"type": "approve", "id": "r1"},
        ),
        (
            '{"type": "approve", "id": "r1", "approved": true}',  # version 1: names no question
            "invalid_message",
            {"type": "approve", "id": "r1"},
        ),
    ],
)
def test_bad_frames_get_a_code_and_a_reference(frame: str, code: str, ref: dict[str, str]) -> None:
    with pytest.raises(ProtocolError) as caught:
        parse_client_message(frame)
    assert caught.value.code == code
    assert caught.value.ref == ref
    assert caught.value.message


def test_sse_decoder_joins_data_lines_and_skips_comments() -> None:
    decoder = SSEDecoder()
    stream = b": keepalive\n\nevent: x\ndata: a\ndata: b\n\ndata:c\r\n\r\n"
    assert decoder.feed(stream) == [b"a\nb", b"c"]
    assert decoder.feed(b"data: [DONE]") == []
    assert decoder.flush() == [DONE]


def test_sse_decoder_handles_events_split_anywhere() -> None:
    stream = b'data: {"x": 1}\n\ndata: {"x": 2}\n\n'
    for cut in range(len(stream) + 1):
        decoder = SSEDecoder()
        events = decoder.feed(stream[:cut]) + decoder.feed(stream[cut:]) + decoder.flush()
        assert events == [b'{"x": 1}', b'{"x": 2}'], cut


def test_sse_decoder_refuses_an_endless_line() -> None:
    decoder = SSEDecoder()
    for _ in range(10):
        decoder.feed(b"data: " + b"x" * 100_000)
    with pytest.raises(UpstreamProtocolError):
        decoder.feed(b"x" * 100_000)


def test_parse_chunk_reads_openai_deltas() -> None:
    assert parse_chunk('{"choices": [{"delta": {"content": "Hi"}, "finish_reason": null}]}') == (
        "Hi",
        False,
    )
    assert parse_chunk('{"choices": [{"delta": {"role": "assistant"}}]}') == (None, False)
    assert parse_chunk('{"choices": [{"delta": {}, "finish_reason": "stop"}]}') == (None, True)
    assert parse_chunk('{"choices": [], "usage": {"total_tokens": 3}}') == (None, False)


@pytest.mark.parametrize(
    "payload",
    [
        "{not json",
        "[]",
        '{"error": {"message": "overloaded"}}',
        '{"object": "chat.completion.chunk"}',
        '{"choices": [{"message": {}}]}',
        '{"choices": [{"delta": {"content": 5}}]}',
    ],
)
def test_parse_chunk_rejects_what_is_not_a_chunk(payload: str) -> None:
    with pytest.raises(UpstreamProtocolError):
        parse_chunk(payload)
