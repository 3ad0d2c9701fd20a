"""Server-sent events, sans-IO: turn raw bytes into event payloads and OpenAI deltas.

No I/O and no Trio here, so the parsing rules are tested as pure functions. The decoder works on
bytes as they come off the socket (no text decoding layer: orjson reads the UTF-8 payloads).

@.architecture
role: SSE parser
jobs: [message_parsing]
"""

from __future__ import annotations

from typing import Any

import orjson

from aether.core.errors import UpstreamProtocolError

DONE = b"[DONE]"
# An event larger than this is not a chat delta: refuse it rather than buffer without bound.
MAX_EVENT_BYTES = 1024 * 1024


class SSEDecoder:
    """Splits a byte stream into lines and lines into events (the SSE framing rules): ``data:``
    lines accumulate until a blank line ends the event; comments and other fields are skipped.
    """

    __slots__ = ("_buffer", "_data")

    def __init__(self) -> None:
        self._buffer = b""
        self._data: list[bytes] = []

    def feed(self, chunk: bytes) -> list[bytes]:
        """Feed bytes; return the data of every event they complete, in order."""
        buffer = self._buffer + chunk if self._buffer else chunk
        *lines, self._buffer = buffer.split(b"\n")
        if len(self._buffer) > MAX_EVENT_BYTES:
            raise UpstreamProtocolError("the upstream sent an oversized event")
        events: list[bytes] = []
        for line in lines:
            event = self._line(line[:-1] if line.endswith(b"\r") else line)
            if event is not None:
                events.append(event)
        return events

    def _line(self, line: bytes) -> bytes | None:
        if not line:
            if not self._data:
                return None
            data = self._data[0] if len(self._data) == 1 else b"\n".join(self._data)
            self._data = []
            return data
        if line.startswith(b"data:"):
            value = line[5:]
            self._data.append(value[1:] if value.startswith(b" ") else value)
            if len(self._data) > 1 and sum(map(len, self._data)) > MAX_EVENT_BYTES:
                raise UpstreamProtocolError("the upstream sent an oversized event")
        return None  # comments (":...") and other fields (event:, id:, retry:)

    def flush(self) -> list[bytes]:
        """The events still pending at end of stream (a last line without newline)."""
        events = self.feed(b"\n") if self._buffer else []
        last = self._line(b"")
        return [*events, last] if last is not None else events


def parse_chunk(payload: bytes | str) -> tuple[str | None, bool]:
    """The text delta of one OpenAI ``chat.completion.chunk`` payload and whether it is the last
    (``parse_event`` without the usage)."""
    content, finished, _ = parse_event(payload)
    return content, finished


def parse_event(payload: bytes | str) -> tuple[str | None, bool, Any]:
    """The text delta of one OpenAI ``chat.completion.chunk`` payload, whether it is the last,
    and its ``usage`` object if it carries one (None if not).

    The text is None when the chunk carries none (role-only or usage-only chunks); the flag is
    True when the choice has a ``finish_reason``. Raises UpstreamProtocolError on anything that
    is not such a chunk.
    """
    try:
        event: Any = orjson.loads(payload)
    except orjson.JSONDecodeError:
        raise UpstreamProtocolError("the upstream sent an event that is not JSON") from None
    if not isinstance(event, dict):
        raise UpstreamProtocolError("the upstream sent an event that is not a JSON object")
    if "error" in event:
        raise UpstreamProtocolError("the upstream reported an error inside the stream")
    choices = event.get("choices")
    if not isinstance(choices, list):
        raise UpstreamProtocolError("the upstream sent a chunk without choices")
    usage = event.get("usage")  # the last chunk's, when asked for (some servers: every chunk's)
    if not choices:
        return None, False, usage  # e.g. a trailing usage-only chunk
    choice = choices[0]
    delta = choice.get("delta") if isinstance(choice, dict) else None
    if not isinstance(delta, dict):
        raise UpstreamProtocolError("the upstream sent a choice without a delta")
    finished = choice.get("finish_reason") is not None
    content = delta.get("content")
    if content is not None and not isinstance(content, str):
        raise UpstreamProtocolError("the upstream sent non-text content")
    return content, finished, usage
