"""An OpenAI-compatible face: ``POST /v1/chat/completions``, streaming and not.

Existing OpenAI clients and SDKs can use Aether as their backend: point their base URL at
``http://HOST:PORT/v1`` and give an Aether API key as theirs. The client sends the whole
conversation each time, as OpenAI's API expects: its earlier messages become the turn's context
and its last user message the turn (stored as a new conversation in the history). ``model``
names one of ``GET /v1/models`` (empty: the default one); any other is 404 ``model_not_found``,
as OpenAI answers. Closing a stream stops the generation, as on every Aether route.

@.architecture
role: OpenAI-compatible endpoint
jobs: [message_handling, streaming_coordination]
"""

from __future__ import annotations

import logging
import time
from collections.abc import AsyncGenerator
from typing import Any, Literal

import orjson
from pydantic import BaseModel, ConfigDict, Field
from quart import Blueprint, Response
from quart_schema import document

from aether.api.dependencies import AppState, app_state, caller_identity
from aether.api.detached_chat import DetachedChat
from aether.api.errors import error_response, status_for
from aether.api.json_body import read_json_body
from aether.api.responses import error_body, json_error, json_response, request_id
from aether.api.schemas import ChatCompletion, ModelList, ModelObject, errors
from aether.api.v1.endpoints.chat import REFUSED, run_to_end
from aether.core.chat import ChatRequest, Chunk
from aether.core.runtime.engine import RuntimeEngine
from aether.protocol.messages import new_request_id

log = logging.getLogger(__name__)

blueprint = Blueprint("openai_compat", __name__)


class _TextPart(BaseModel):
    model_config = ConfigDict(extra="ignore", strict=True)
    type: str
    text: str | None = None


class _Message(BaseModel):
    model_config = ConfigDict(extra="ignore", strict=True)
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[_TextPart] | None = None

    def text(self) -> str:
        if self.content is None:
            return ""
        if isinstance(self.content, str):
            return self.content
        return "".join(part.text or "" for part in self.content if part.type == "text")


class _StreamOptions(BaseModel):
    model_config = ConfigDict(extra="ignore", strict=True)
    include_usage: bool = False


class CompletionBody(BaseModel):
    """The fields of OpenAI's request that Aether uses; the others are accepted and ignored."""

    model_config = ConfigDict(extra="ignore", strict=True)
    model: str = ""
    messages: list[_Message] = Field(
        min_length=1,
        json_schema_extra={
            "contains": {
                "type": "object",
                "properties": {"role": {"const": "user"}},
                "required": ["role"],
            }
        },
    )
    stream: bool = False
    # With include_usage, a streamed answer ends with a chunk of its token usage, as OpenAI's.
    stream_options: _StreamOptions | None = None

    @property
    def include_usage(self) -> bool:
        return self.stream_options is not None and self.stream_options.include_usage


NO_USER_MESSAGE = "messages must include a user message"


def answering_model(state: AppState, asked: str) -> str | None:
    """The model that answers a completion asking for ``asked`` (empty: the default one), or
    None when this server has no model of that name."""
    catalog = state.engine.streamer.catalog
    if not asked:
        return catalog.default.name
    return asked if asked in catalog else None


def model_not_found(model: str) -> Response:
    return json_error(
        404,
        "model_not_found",
        f"The model {model!r} does not exist on this server (GET /v1/models lists them)",
        type="invalid_request_error",
    )


def has_user_message(body: CompletionBody) -> bool:
    return any(message.role == "user" for message in body.messages)


async def _completion_body() -> CompletionBody | Response:
    parsed = await read_json_body(CompletionBody)
    if isinstance(parsed, Response):
        return parsed
    if not has_user_message(parsed):
        return json_error(400, "invalid_request", NO_USER_MESSAGE)
    return parsed


def completion_request(body: CompletionBody, owner: str, model: str) -> ChatRequest:
    """The last user message is the turn; the messages before it are its context (messages
    after it, which OpenAI's API would also accept, are not used)."""
    last_user = max(i for i, message in enumerate(body.messages) if message.role == "user")
    context = tuple(
        (m.role if m.role in ("user", "assistant") else "system", m.text())
        for m in body.messages[:last_user]
        if m.text()
    )
    return ChatRequest(
        id=new_request_id(),
        owner=owner,
        message=body.messages[last_user].text(),
        model=model,
        history=context,
    )


async def answer_completion(
    engine: RuntimeEngine, chat: ChatRequest, model: str, request_id: str | None
) -> tuple[int, dict[str, Any]]:
    """Run a chat to its end; the HTTP status and JSON body of its completion, or of its error
    (``request_id`` is the HTTP request's, for the error body). Raises what the engine raises
    when it will not start the chat (REFUSED)."""
    text: list[str] = []
    errors: list[Chunk] = []
    usage: dict[str, int] = {}

    def on_message(message: Chunk) -> None:
        content = _content(message)
        if content:
            text.append(content)
            return
        if message.get("type") == "error" and message.get("id") is not None:
            errors.append(message)
        if message.get("type") in TERMINALS:
            usage.update(openai_usage(message))

    await run_to_end(engine, chat, on_message)
    if errors:
        code, message = errors[0]["code"], errors[0]["message"]
        return status_for(code), error_body(code, message, request_id, type=code)
    return 200, {
        "id": f"chatcmpl-{chat.id}",
        "object": "chat.completion",
        "created": int(time.time()),
        "model": model,
        "choices": [
            {
                "index": 0,
                "message": {"role": "assistant", "content": "".join(text)},
                "finish_reason": "stop",
            }
        ],
        "usage": usage,
    }


def _usage_chunk(request_id: str, model: str, created: int, usage: dict[str, int]) -> bytes:
    payload = {
        "id": f"chatcmpl-{request_id}",
        "object": "chat.completion.chunk",
        "created": created,
        "model": model,
        "choices": [],
        "usage": usage,
    }
    return b"data: " + orjson.dumps(payload) + b"\n\n"


def _chunk(
    request_id: str, model: str, created: int, delta: dict[str, Any], finish: str | None
) -> bytes:
    payload = {
        "id": f"chatcmpl-{request_id}",
        "object": "chat.completion.chunk",
        "created": created,
        "model": model,
        "choices": [{"index": 0, "delta": delta, "finish_reason": finish}],
    }
    return b"data: " + orjson.dumps(payload) + b"\n\n"


TERMINALS = ("completion", "stopped", "error")


def openai_usage(terminal: Chunk) -> dict[str, int]:
    """A terminal's usage in OpenAI's shape (its three counts; ``estimated`` is Aether's)."""
    usage = terminal.get("usage") or {}
    return {name: usage.get(name, 0) for name in USAGE_COUNTS}


USAGE_COUNTS = ("prompt_tokens", "completion_tokens", "total_tokens")


def _content(message: Chunk) -> str | None:
    if message.get("role") == "assistant" and message.get("type") == "message":
        content = message.get("content")
        return content if isinstance(content, str) else None
    return None


# A streamed completion's headers (OpenAI's: no Cache-Control of its own).
COMPLETION_STREAM_HEADERS = [
    (b"content-type", b"text/event-stream; charset=utf-8"),
    (b"x-accel-buffering", b"no"),
]


async def completion_chunks(
    chat: DetachedChat, model: str, include_usage: bool = False
) -> AsyncGenerator[bytes, None]:
    created = int(time.time())
    request_id = chat.request_id
    try:
        yield _chunk(request_id, model, created, {"role": "assistant", "content": ""}, None)
        while (batch := await chat.next_batch()) is not None:
            parts: list[bytes] = []
            for message in batch:
                content = _content(message)
                if content:
                    parts.append(_chunk(request_id, model, created, {"content": content}, None))
                elif message.get("type") == "error" and message.get("id") is not None:
                    error = {"message": message["message"], "type": message["code"]}
                    parts.append(b"data: " + orjson.dumps({"error": error}) + b"\n\n")
                elif message.get("type") in ("completion", "stopped"):
                    parts.append(_chunk(request_id, model, created, {}, "stop"))
                if include_usage and message.get("type") in TERMINALS:
                    parts.append(_usage_chunk(request_id, model, created, openai_usage(message)))
            if parts:
                yield b"".join(parts)
        yield b"data: [DONE]\n\n"
    finally:
        chat.close()


# When this server's models came to be, as far as OpenAI's `created` field goes.
_STARTED = int(time.time())


def _model_object(model_id: str) -> dict[str, Any]:
    return {"id": model_id, "object": "model", "created": _STARTED, "owned_by": "aether"}


@blueprint.get("/v1/models")
@document(responses={200: (ModelList, None), **errors()})
async def list_models() -> Response:
    """The models this server answers with, in OpenAI's shape (clients list them first); the
    default one first."""
    catalog = app_state().engine.streamer.catalog
    return json_response(
        {"object": "list", "data": [_model_object(m.name) for m in catalog.listed]}
    )


@blueprint.get("/v1/models/<model_id>")
@document(responses={200: (ModelObject, None), **errors(404)})
async def get_model(model_id: str) -> Response:
    if model_id not in app_state().engine.streamer.catalog:
        return model_not_found(model_id)
    return json_response(_model_object(model_id))


@blueprint.post("/v1/chat/completions")
@document(
    request=CompletionBody,
    responses={200: (ChatCompletion, None), **errors(400, 404, 413, 415, 502, 503, 504)},
)
async def chat_completions() -> Response:
    parsed = await _completion_body()
    if isinstance(parsed, Response):
        return parsed
    state = app_state()
    model = answering_model(state, parsed.model)
    if model is None:
        return model_not_found(parsed.model)
    chat = completion_request(parsed, caller_identity(), model)
    if parsed.stream:
        try:
            detached = await DetachedChat.start(state.engine, chat, state.settings.outbox_max_bytes)
        except REFUSED as exc:
            return error_response(exc)
        response = Response(
            completion_chunks(detached, model, parsed.include_usage),
            headers={name.decode(): value.decode() for name, value in COMPLETION_STREAM_HEADERS},
        )
        response.timeout = None
        return response

    try:
        status, body = await answer_completion(state.engine, chat, model, request_id())
    except REFUSED as exc:
        return error_response(exc)
    return json_response(body, status)
