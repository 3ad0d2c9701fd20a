"""What the baseline relays share: the upstream request and the SSE-to-delta parsing.

Kept deliberately small and equal for every baseline, so the benchmark compares servers, not
parsers. The protocol is Aether's v1: hello, then per chat start, deltas, end and one terminal.

@.architecture
role: benchmark baseline helpers
jobs: [benchmarking]
"""

from __future__ import annotations

import re
from typing import Any

import orjson

# The tokens of Aether's echo model: the message, split before each run of spaces.
_ECHO_TOKEN = re.compile(r"\s*\S+")


def upstream_body(message: str, model: str) -> dict[str, Any]:
    return {"model": model, "messages": [{"role": "user", "content": message}], "stream": True}


def echo_tokens(message: str) -> list[str]:
    """What the echo path streams: the message back, token by token (as Aether's echo)."""
    return _ECHO_TOKEN.findall(message) or [message]


def delta_from_line(line: str) -> str | None:
    """Content of one ``data:`` line of an OpenAI stream ('' for [DONE]/no content)."""
    if not line.startswith("data: "):
        return None
    payload = line[6:]
    if payload == "[DONE]":
        return None
    choices = orjson.loads(payload).get("choices") or [{}]
    content = choices[0].get("delta", {}).get("content")
    return content if isinstance(content, str) else None


def frame(message: dict[str, Any], request_id: str, seq: int) -> str:
    message["id"] = request_id
    message["seq"] = seq
    return orjson.dumps(message).decode()


HELLO = orjson.dumps({"role": "server", "type": "hello", "protocol_version": 1}).decode()
