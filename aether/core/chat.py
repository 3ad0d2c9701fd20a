"""Value objects shared by the engine, providers and transports: a chat request and LMC chunks.

A chunk is an Open Interpreter "LMC" message as a plain dict (``role``, ``type``, optional
``format``, ``content``, ``start``, ``end``). Plain dicts keep the hot path free of model
validation; providers build them with the helpers below.

@.architecture
role: chat value objects
jobs: [schema_definition]
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

Chunk = dict[str, Any]
PathName = Literal["auto", "echo", "http", "oi"]
StopReason = Literal["stop", "disconnect", "shutdown"]

# The errors that end a client's attachment to a resumable request: another connection resumed
# it; the stream forwarded from the worker that runs it broke off (the client resumes again).
RESUMED_ELSEWHERE = "resumed_elsewhere"
RESUME_INTERRUPTED = "resume_interrupted"


@dataclass(frozen=True, slots=True)
class ChatRequest:
    """One chat turn as the engine sees it, whatever transport it came from."""

    id: str
    owner: str
    message: str
    path: PathName = "auto"
    # The model the client named (None: the server's default); once admitted, the one that
    # answers.
    model: str | None = None
    conversation_id: str | None = None
    # Earlier turns of the conversation, oldest first: (role, content) pairs.
    history: tuple[tuple[str, str], ...] = ()
    # The request ids of the stored turns ``history`` holds, oldest first, when it comes from
    # the history store (None: the transport's, or none). Any worker may have run them.
    history_turns: tuple[str, ...] | None = None


def block_start(role: str = "assistant", type_: str = "message") -> Chunk:
    return {"role": role, "type": type_, "start": True}


def block_delta(content: str, role: str = "assistant", type_: str = "message") -> Chunk:
    return {"role": role, "type": type_, "content": content}


def block_end(role: str = "assistant", type_: str = "message") -> Chunk:
    return {"role": role, "type": type_, "end": True}


def error_chunk(code: str, message: str) -> Chunk:
    """The producer's way to end a stream with an error: the relay turns it into the terminal."""
    return {"role": "server", "type": "error", "code": code, "message": message}
