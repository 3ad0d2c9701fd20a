"""The wire protocol (version 2) as Pydantic models: parse and validate, no I/O.

Client frames are JSON objects with a ``type``. ``parse_client_message`` returns a model or
raises ``ProtocolError`` with a stable ``code`` and a message safe to show the client; nothing
here imports Trio or Quart, so the rules are tested as pure functions.

@.architecture
role: wire protocol
jobs: [message_parsing, schema_validation]
"""

from __future__ import annotations

import secrets
from typing import Annotated, Any, Literal

import orjson
from pydantic import BaseModel, ConfigDict, Field, TypeAdapter, ValidationError

from aether import PROTOCOL_VERSION

# The WebSocket subprotocols the server speaks, preferred first. A client offering only the
# version 1 name still connects (its approve must now name a confirmation_id).
SUBPROTOCOLS = ("aether.v2", "aether.v1")

RequestId = Annotated[str, Field(min_length=1, max_length=64, pattern=r"^[A-Za-z0-9._:-]+$")]
ConversationId = Annotated[str, Field(min_length=1, max_length=128, pattern=r"^[A-Za-z0-9._:-]+$")]
ConfirmationId = Annotated[str, Field(min_length=1, max_length=64, pattern=r"^[A-Za-z0-9._:-]+$")]
ChatPath = Literal["auto", "echo", "http", "oi"]
# What a model may be called (it goes in URLs and logs): no spaces or control characters.
MODEL_NAME_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9._:/@+-]{0,127}$"
ModelName = Annotated[str, Field(min_length=1, max_length=128, pattern=MODEL_NAME_PATTERN)]


class _Message(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True, frozen=True)


class ChatFields(_Message):
    """The fields of a chat, shared by the WebSocket ``chat`` message and ``POST /v1/chat``."""

    id: RequestId | None = None
    message: str = Field(min_length=1)
    conversation_id: ConversationId | None = None
    path: ChatPath = "auto"
    # One of GET /v1/models; none: the server's default model.
    model: ModelName | None = None


class ChatMessage(ChatFields):
    type: Literal["chat"]


class ChatBody(ChatFields):
    """The JSON body of ``POST /v1/chat`` and ``/v1/chat/stream``: a chat, ``type`` optional."""

    type: Literal["chat"] = "chat"


class StopMessage(_Message):
    type: Literal["stop"]
    id: RequestId


class ResumeMessage(_Message):
    """Re-attach to a running (or recently finished) request: every message after
    ``after_seq``, then the live stream."""

    type: Literal["resume"]
    id: RequestId
    after_seq: int = Field(ge=-1)


class ApproveMessage(_Message):
    """Answers the code ``confirmation`` named by ``confirmation_id`` (version 2)."""

    type: Literal["approve"]
    id: RequestId
    confirmation_id: ConfirmationId
    approved: bool


class PingMessage(_Message):
    type: Literal["ping"]


class HistoryMessage(_Message):
    type: Literal["history"]
    conversation_id: ConversationId


class FileMessage(_Message):
    """Announces a file for file chat: exactly ``size`` bytes follow, in binary frames."""

    type: Literal["file"]
    name: str = Field(min_length=1, max_length=255)
    size: int = Field(ge=0)
    conversation_id: ConversationId | None = None


ClientMessage = Annotated[
    ChatMessage
    | StopMessage
    | ApproveMessage
    | PingMessage
    | HistoryMessage
    | FileMessage
    | ResumeMessage,
    Field(discriminator="type"),
]
_client_message: TypeAdapter[ClientMessage] = TypeAdapter(ClientMessage)


_conversation_id: TypeAdapter[str] = TypeAdapter(ConversationId)


def new_request_id() -> str:
    """An id for a chat whose client gave none."""
    return "r-" + secrets.token_hex(8)


def valid_conversation_id(value: str) -> bool:
    """Whether ``value`` may name a conversation (the rule the protocol's fields follow)."""
    try:
        _conversation_id.validate_python(value)
    except ValidationError:
        return False
    return True


class ProtocolError(Exception):
    """A frame that cannot be handled. ``ref`` names the frame (its type and id, when known)."""

    def __init__(self, code: str, message: str, ref: dict[str, Any] | None = None) -> None:
        super().__init__(message)
        self.code = code
        self.message = message
        self.ref = ref or {}


def _ref(data: Any) -> dict[str, Any]:
    ref: dict[str, Any] = {}
    if isinstance(data, dict):
        for key in ("type", "id"):
            if isinstance(data.get(key), str):
                ref[key] = data[key][:64]
    return ref


def _describe(error: ValidationError) -> str:
    first = error.errors()[0]
    loc = ".".join(str(part) for part in first["loc"][1:] or first["loc"])
    return f"{loc}: {first['msg']}" if loc else first["msg"]


def parse_client_message(frame: str) -> ClientMessage:
    """Parse one client text frame. Raises ProtocolError on bad JSON, type or fields."""
    try:
        data = orjson.loads(frame)
    except orjson.JSONDecodeError:
        raise ProtocolError("invalid_json", "the frame is not valid JSON") from None
    if not isinstance(data, dict):
        raise ProtocolError("invalid_message", "a message must be a JSON object")
    kind = data.get("type")
    if not isinstance(kind, str):
        raise ProtocolError("invalid_message", "a message needs a string 'type'", _ref(data))
    try:
        return _client_message.validate_python(data)
    except ValidationError as exc:
        if exc.errors()[0]["type"] == "union_tag_invalid":
            raise ProtocolError(
                "unknown_type", f"unknown message type {kind[:64]!r}", _ref(data)
            ) from None
        raise ProtocolError("invalid_message", _describe(exc), _ref(data)) from None


def select_subprotocol(offered: list[str] | tuple[str, ...]) -> str | None:
    """The subprotocol to accept: the most recent of ours that the client offered."""
    return next((name for name in SUBPROTOCOLS if name in offered), None)


def error_message(code: str, message: str, ref: dict[str, Any] | None = None) -> dict[str, Any]:
    """An error about a frame that is not a live request: ``id`` is null, ``ref`` names it."""
    return {
        "role": "server",
        "type": "error",
        "id": None,
        "code": code,
        "message": message,
        "ref": ref or {},
    }


def hello_message(client_id: str, server_version: str) -> dict[str, Any]:
    return {
        "role": "server",
        "type": "hello",
        "client_id": client_id,
        "protocol_version": PROTOCOL_VERSION,
        "server_version": server_version,
    }


def pong_message() -> dict[str, Any]:
    return {"role": "server", "type": "pong"}
