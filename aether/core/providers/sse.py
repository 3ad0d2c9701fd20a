"""Server-sent events, sans-IO: turn decoded lines into event payloads and OpenAI deltas.

No I/O and no Trio here, so the parsing rules are tested as pure functions.

@.architecture
role: SSE parser
jobs: [message_parsing]
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import orjson

from aether.core.errors import UpstreamProtocolError

DONE = "[DONE]"


@dataclass(slots=True)
class SSEDecoder:
    """Accumulates ``data:`` lines until a blank line ends the event (the SSE framing rules)."""

    _data: list[str]

    def __init__(self) -> None:
        self._data = []

    def feed_line(self, line: str) -> str | None:
        """Feed one line without its newline; return the event's data when the event ends."""
        if not line:
            if not self._data:
                return None
            data = "\n".join(self._data)
            self._data.clear()
            return data
        if line.startswith(":"):
            return None  # comment / heartbeat
        field, _, value = line.partition(":")
        if value.startswith(" "):
            value = value[1:]
        if field == "data":
            self._data.append(value)
        return None

    def flush(self) -> str | None:
        """The pending event at end of stream, if the upstream omitted the final blank line."""
        return self.feed_line("")


def parse_chunk(payload: str) -> tuple[str | None, bool]:
    """The text delta of one OpenAI ``chat.completion.chunk`` payload and whether it is the last.

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
    if not choices:
        return None, False  # e.g. a trailing usage-only chunk
    choice = choices[0]
    delta = choice.get("delta") if isinstance(choice, dict) else None
    if not isinstance(delta, dict):
        raise UpstreamProtocolError("the upstream sent a choice without a delta")
    finished = choice.get("finish_reason") is not None
    content = delta.get("content")
    if content is not None and not isinstance(content, str):
        raise UpstreamProtocolError("the upstream sent non-text content")
    return content, finished
