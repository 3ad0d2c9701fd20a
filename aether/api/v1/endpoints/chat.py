"""Chat over REST: the whole answer as JSON, or the stream as server-sent events, and stop.

- ``POST /v1/chat`` runs the chat in the handler's task and answers with the full text. A client
  that disconnects cancels the handler and so the chat (reason ``disconnect``).
- ``POST /v1/chat/stream`` runs the chat in the engine's nursery and streams the same JSON
  messages as the WebSocket, one ``data:`` line each with ``id: <seq>``. The body generator
  holds no nursery or cancel scope across its ``yield``; when the client goes away, Quart closes
  the generator and its ``finally`` stops the chat, or, with a resume grace, detaches it (it
  runs on for a client that comes back). The stream has no response timeout.
- ``GET /v1/chat/<id>/events`` resumes a streaming chat after the last event the client got.
- ``POST /v1/chat/<id>/stop`` stops one of the caller's running chats.

@.architecture
role: chat REST endpoints
jobs: [message_handling, streaming_coordination, cancellation_handling]
"""

from __future__ import annotations

import logging
import math
from collections.abc import AsyncGenerator, Callable
from typing import Any

import orjson
from quart import Blueprint, Response, request
from quart_schema import document

from aether.api import query
from aether.api.dependencies import app_state, caller_identity
from aether.api.detached_chat import DetachedChat
from aether.api.errors import error_response, status_for
from aether.api.json_body import read_json_body
from aether.api.responses import json_error, json_response
from aether.api.schemas import (
    ApprovalAccepted,
    ApproveBody,
    ChatAnswer,
    ChatEventStream,
    ChatOrError,
    EventsQuery,
    NoContent,
    StopAccepted,
    errors,
)
from aether.core.chat import ChatRequest, Chunk
from aether.core.errors import (
    ControlPlaneUnavailable,
    DuplicateRequest,
    ShuttingDown,
    StaleConfirmation,
    TooManyRequests,
    UnknownModel,
    UnknownRequest,
)
from aether.core.runtime.engine import RuntimeEngine
from aether.core.runtime.outbox import Outbox
from aether.protocol.messages import ChatBody, new_request_id

log = logging.getLogger(__name__)

blueprint = Blueprint("chat", __name__)

# Why the engine may refuse to start a chat.
REFUSED = (UnknownModel, DuplicateRequest, TooManyRequests, ShuttingDown)


async def _chat_request() -> ChatRequest | Response:
    fields = await read_json_body(ChatBody)
    if isinstance(fields, Response):
        return fields
    return ChatRequest(
        id=fields.id or new_request_id(),
        owner=caller_identity(),
        message=fields.message,
        path=fields.path,
        model=fields.model,
        conversation_id=fields.conversation_id,
    )


class AnswerCollector:
    """Folds a request's messages into the JSON answer of ``POST /v1/chat``."""

    def __init__(self, request_id: str) -> None:
        self.body: dict[str, Any] = {"id": request_id, "status": "running"}
        self._parts: list[str] = []

    def add(self, message: Chunk) -> None:
        kind = message.get("type")
        if kind == "accepted":
            self.body["path"] = message["path"]
            if "model" in message:
                self.body["model"] = message["model"]
            if "conversation_id" in message:
                self.body["conversation_id"] = message["conversation_id"]
        elif kind == "message" and message.get("role") == "assistant":
            content = message.get("content")
            if isinstance(content, str):
                self._parts.append(content)
        elif kind == "completion":
            self.body["status"] = "completed"
        elif kind == "stopped":
            self.body["status"] = "stopped"
            self.body["reason"] = message["reason"]
        elif kind == "error":
            self.body["status"] = "error"
            self.body["error"] = {"code": message["code"], "message": message["message"]}

    def answer(self) -> tuple[int, dict[str, Any]]:
        """The HTTP status and the JSON body of the answer."""
        self.body["content"] = "".join(self._parts)
        status = 200
        if self.body["status"] == "error":
            status = status_for(self.body["error"]["code"])
        return status, self.body


async def answer_chat(
    engine: RuntimeEngine, chat_request: ChatRequest
) -> tuple[int, dict[str, Any]]:
    """Run a chat to its end; its HTTP status and JSON answer. Raises what the engine raises
    when it will not start the chat (REFUSED)."""
    collector = AnswerCollector(chat_request.id)
    await run_to_end(engine, chat_request, collector.add)
    return collector.answer()


@blueprint.post("/v1/chat")
@document(
    request=ChatBody,
    responses={
        **errors(400, 409, 413, 415),
        200: (ChatAnswer, None),
        404: (ChatOrError, None),
        500: (ChatOrError, None),
        502: (ChatAnswer, None),
        503: (ChatOrError, None),
        504: (ChatAnswer, None),
    },
)
async def chat() -> Response:
    chat_request = await _chat_request()
    if isinstance(chat_request, Response):
        return chat_request
    try:
        status, body = await answer_chat(app_state().engine, chat_request)
    except REFUSED as exc:
        return error_response(exc)
    return json_response(body, status)


async def run_to_end(
    engine: RuntimeEngine,
    chat_request: ChatRequest,
    on_message: Callable[[Chunk], None],
) -> None:
    """Run a chat in this task, then give each of its messages to ``on_message``.

    Raises what the engine raises when it will not start the chat (REFUSED). A client that
    disconnects cancels the caller, and with it the chat (reason ``disconnect``). The answer
    is collected whole, so its outbox has no budget: nobody reads it before the turn ends, and
    consecutive deltas merge in it as they come."""
    outbox = Outbox(math.inf)
    turn = await engine.admit(chat_request, outbox)
    try:
        await turn.run()
    finally:
        outbox.finish()
    for message in outbox.take_all():
        on_message(message)


def _sse_event(message: Chunk) -> bytes:
    seq = message.get("seq")
    if seq is None:  # not a stream message (a takeover notice): the last event id stands
        return b"data: %s\n\n" % orjson.dumps(message)
    return b"id: %d\ndata: %s\n\n" % (seq, orjson.dumps(message))


SSE_HEARTBEAT = b": keepalive\n\n"
# An event stream's headers: not cached, and not buffered by proxies (nginx's header).
SSE_HEADERS = [
    (b"content-type", b"text/event-stream; charset=utf-8"),
    (b"cache-control", b"no-cache"),
    (b"x-accel-buffering", b"no"),
]


async def sse_body(chat: DetachedChat, heartbeat_s: float) -> AsyncGenerator[bytes, None]:
    try:
        while (batch := await chat.next_batch(heartbeat_s)) is not None:
            if batch:
                yield b"".join(_sse_event(message) for message in batch)
            else:
                yield SSE_HEARTBEAT  # keeps proxies from closing an idle stream
    finally:
        chat.close()


@blueprint.post("/v1/chat/stream")
@document(
    request=ChatBody,
    responses={200: (ChatEventStream, None), **errors(400, 404, 409, 413, 415, 503)},
)
async def chat_stream() -> Response:
    chat_request = await _chat_request()
    if isinstance(chat_request, Response):
        return chat_request
    state = app_state()
    try:
        chat = await DetachedChat.start(state.engine, chat_request, state.settings.outbox_max_bytes)
    except REFUSED as exc:
        return error_response(exc)
    response = Response(
        sse_body(chat, state.settings.sse_heartbeat_s),
        headers={name.decode(): value.decode() for name, value in SSE_HEADERS},
    )
    # Quart's RESPONSE_TIMEOUT (60 s by default) would cut long answers.
    response.timeout = None
    return response


@blueprint.get("/v1/chat/<request_id>/events")
@document(
    querystring=EventsQuery,
    responses={200: (ChatEventStream, None), 204: (NoContent, None), **errors(400, 404, 503)},
)
async def chat_events(request_id: str) -> Response:
    """Resume a chat's event stream (``POST /v1/chat/stream``'s, or a WebSocket chat's) after
    a lost connection: every message after the last one the client received, then the live
    stream to its terminal. 204 when the chat has ended and the client has it all (an
    EventSource then stops reconnecting)."""
    after_seq = _after_seq()
    if isinstance(after_seq, Response):
        return after_seq
    state = app_state()
    outbox = Outbox(state.settings.outbox_max_bytes)
    try:
        attachment = await state.engine.resume(caller_identity(), request_id, after_seq, outbox)
    except (UnknownRequest, ControlPlaneUnavailable) as exc:
        return error_response(exc)
    if attachment is None:
        return Response(b"", status=204)
    state.engine.detach_if_unread(attachment, outbox)
    chat = DetachedChat(state.engine, request_id, outbox, attachment=attachment)
    response = Response(
        sse_body(chat, state.settings.sse_heartbeat_s),
        headers={name.decode(): value.decode() for name, value in SSE_HEADERS},
    )
    response.timeout = None
    return response


def _after_seq() -> int | Response:
    """Where the client's stream stopped: ``Last-Event-ID`` (what an EventSource sends when
    it reconnects), else ``?after_seq=``, else before the first message."""
    try:
        last_event_id = request.headers.get("Last-Event-ID")
        if last_event_id is not None:
            after_seq = query.integer_value(last_event_id, "Last-Event-ID")
        else:
            after_seq = query.integer(request.args, "after_seq", -1)
    except query.InvalidQuery as exc:
        return json_error(400, "invalid_request", str(exc))
    if after_seq < -1:
        return json_error(400, "invalid_request", "the last seq received is -1 or more")
    return after_seq


@blueprint.post("/v1/chat/<request_id>/stop")
@document(responses={202: (StopAccepted, None), **errors(404, 503)})
async def stop_chat(request_id: str) -> Response:
    try:
        await app_state().engine.stop_anywhere(request_id, caller_identity())
    except (UnknownRequest, ControlPlaneUnavailable) as exc:
        return error_response(exc)
    return json_response({"id": request_id, "status": "stopping"}, 202)


@blueprint.post("/v1/chat/<request_id>/approve")
@document(
    request=ApproveBody,
    responses={202: (ApprovalAccepted, None), **errors(400, 404, 409, 415, 503)},
)
async def approve_chat(request_id: str) -> Response:
    body = await read_json_body(ApproveBody)
    if isinstance(body, Response):
        return body
    try:
        engine = app_state().engine
        await engine.approve_anywhere(
            request_id, caller_identity(), body.confirmation_id, body.approved
        )
    except (UnknownRequest, StaleConfirmation, ControlPlaneUnavailable) as exc:
        return error_response(exc)
    return json_response({"id": request_id, "approved": body.approved}, 202)
