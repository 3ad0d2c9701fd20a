"""What the server sends over the WebSocket, as Pydantic models: the protocol's other half.

The server builds its messages as plain dicts on the hot path (no model is instantiated per
delta); these models describe them, for ``GET /asyncapi.json`` (``protocol/asyncapi.py``), and
the tests check every message the server sends against that document.

Messages of a request carry its ``id`` and a ``seq`` rising by one from 0; its last is one
terminal (``completion``, ``stopped`` or an ``error`` with its ``id``). Messages about no
request (``hello``, ``pong``, ``keepalive``, ``going_away``, an error about a frame, a
``history`` or ``file`` answer) carry no ``seq``.

@.architecture
role: server messages
jobs: [schema_definition]
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field


class _ServerMessage(BaseModel):
    model_config = ConfigDict(extra="forbid")

    role: Literal["server"]


class _OfRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    id: str = Field(description="The request's id.")
    seq: int = Field(ge=0, description="Its place in the request's stream, from 0, by one.")


class Hello(_ServerMessage):
    """The first message of every connection."""

    type: Literal["hello"]
    client_id: str
    protocol_version: int
    server_version: str


class Pong(_ServerMessage):
    """The answer to a ``ping``."""

    type: Literal["pong"]


class Keepalive(_ServerMessage):
    """Sent on an idle connection, so that proxies keep it open."""

    type: Literal["keepalive"]


class GoingAway(_ServerMessage):
    """The server is shutting down: running answers get ``grace_s`` to finish."""

    type: Literal["going_away"]
    grace_s: float


class FrameError(_ServerMessage):
    """An error about a frame that is not a live request (malformed JSON, an unknown type, a
    stop of an unknown id, a resume taken over or broken off): never a request's terminal."""

    type: Literal["error"]
    id: None
    code: str
    message: str
    ref: dict[str, Any] = Field(description="What it refers to: the frame's type and id.")


class HistoryAnswer(_ServerMessage):
    """The answer to ``history``: the conversation's stored messages, in order."""

    type: Literal["history"]
    id: None
    conversation_id: str
    messages: list[dict[str, Any]] = Field(
        description="As `GET /v1/chat/history` gives them: id, role, content, status, "
        "request_id, created_at, error_code; an answer's model and usage."
    )


class FileStored(_ServerMessage):
    """A file sent with ``file`` and its binary frames is stored."""

    type: Literal["file"]
    id: None
    conversation_id: str
    name: str
    size: int


class Accepted(_ServerMessage, _OfRequest):
    """A request's first message: the model and path that answer it, and its conversation."""

    type: Literal["accepted"]
    path: str
    model: str | None = None
    conversation_id: str | None = None


class TokenUsage(BaseModel):
    """What a turn cost, in tokens: the upstream's counts, or estimated (``estimated``) where it
    gave none (a stop or failure before its count, an upstream without counts)."""

    model_config = ConfigDict(extra="forbid")

    prompt_tokens: int = Field(ge=0)
    completion_tokens: int = Field(ge=0)
    total_tokens: int = Field(ge=0)
    estimated: bool


class Completion(_ServerMessage, _OfRequest):
    """The request's terminal: the answer is complete."""

    type: Literal["completion"]
    usage: TokenUsage | None = None


class Stopped(_ServerMessage, _OfRequest):
    """The request's terminal: it was stopped (a ``stop``, its client gone past the resume
    grace, the server shutting down)."""

    type: Literal["stopped"]
    reason: Literal["stop", "disconnect", "shutdown"]
    usage: TokenUsage | None = Field(
        None, description="What the model generated until the stop counts too."
    )


class RequestError(_ServerMessage, _OfRequest):
    """The request's terminal: it failed (``code`` says how)."""

    type: Literal["error"]
    code: str
    message: str
    usage: TokenUsage | None = None


class Snapshot(_ServerMessage, _OfRequest):
    """On a resume from before what the server kept: the answer's text so far, standing for
    every message up to its ``seq``."""

    type: Literal["snapshot"]
    content: str


class Block(_OfRequest):
    """Open Interpreter's LMC message: a block opens (``start``), streams its ``content`` in
    deltas, and closes (``end``). Text from the model is ``assistant``/``message``; code it
    writes ``assistant``/``code`` (``format``: its language); what the code printed
    ``computer``/``console``."""

    role: Literal["assistant", "computer"]
    type: Literal["message", "code", "console", "image"]
    format: str | None = None
    content: str | None = None
    start: bool | None = None
    end: bool | None = None


class Confirmation(_OfRequest):
    """Code waiting for the user's ``approve`` (naming ``confirmation_id``) before it runs."""

    role: Literal["computer", "assistant"]
    type: Literal["confirmation"]
    format: str | None = None
    content: dict[str, Any] | str
    confirmation_id: str


SERVER_MESSAGES: tuple[type[BaseModel], ...] = (
    Hello,
    Pong,
    Keepalive,
    GoingAway,
    FrameError,
    HistoryAnswer,
    FileStored,
    Accepted,
    Block,
    Confirmation,
    Snapshot,
    Completion,
    Stopped,
    RequestError,
)
