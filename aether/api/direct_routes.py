"""The hottest REST routes' ordinary requests, answered as plain ASGI in front of Quart.

``POST /v1/chat``, ``POST /v1/chat/stream`` and ``POST /v1/chat/completions`` are where a chat's
fixed cost is paid most often, and Quart's share of it was larger than the chat's own: two tasks
and a nursery per request, a request context, werkzeug's request and response objects, and a
body read through its own timer (and, for an event stream, a detached chat with a watchdog,
since Quart reads a streamed body after its view returned). A request these routes can answer
the ordinary way (a JSON body of declared length within the limit, whose fields validate) is
answered here, with the same functions the Quart views use (``answer_chat``,
``answer_completion``, ``sse_body``, ``completion_chunks``): the same answers, statuses, errors
and events. Every other request (a chunked or oversized body, another media type, invalid
fields) goes on to Quart with its body replayed, and Quart answers it as before. The Quart views
stay the routes' definition: their OpenAPI documentation, and the answer to everything not
taken here.

Sits inside the middleware stack (security headers, request ids, browser guard, rate limits and
authentication all apply, as for ``/ws``).

Cancellation: a client that disconnects while its chat runs cancels the chat (reason
``disconnect``), as Quart's handling did; an event stream's chat with a resume grace is
detached instead (it runs on for the grace). Aether's server says so through the scope's
``DISCONNECT_SIGNAL`` extension, so no task per request watches ``receive`` for it.

@.architecture
role: direct REST routes
jobs: [routing_registration, message_handling, validation]
"""

from __future__ import annotations

from collections.abc import AsyncGenerator, Awaitable, Callable, Mapping
from contextlib import aclosing
from typing import Any, TypeVar

import orjson
import trio
from pydantic import BaseModel, ValidationError
from werkzeug.exceptions import RequestTimeout

from aether.api.dependencies import AppState
from aether.api.detached_chat import DetachedChat
from aether.api.errors import http_error_fields, status_for
from aether.api.json_body import JSON_MEDIA_TYPE
from aether.api.responses import error_body
from aether.api.v1.endpoints.chat import REFUSED, SSE_HEADERS, answer_chat, sse_body
from aether.api.v1.endpoints.openai_compat import (
    COMPLETION_STREAM_HEADERS,
    CompletionBody,
    answer_completion,
    answering_model,
    completion_chunks,
    completion_request,
    has_user_message,
)
from aether.asgi import (
    DISCONNECT_SIGNAL,
    REQUEST_ID_KEY,
    ASGIApp,
    DisconnectSignal,
    Message,
    Receive,
    Scope,
    Send,
    header,
    identity_from_scope,
)
from aether.core.chat import ChatRequest
from aether.core.errors import AetherError
from aether.core.runtime.outbox import Outbox
from aether.core.runtime.turn import ChatTurn
from aether.protocol.messages import ChatBody, new_request_id

ModelT = TypeVar("ModelT", bound=BaseModel)
# A JSON route's answer: its status and body.
Answer = tuple[int, dict[str, Any]]
Headers = list[tuple[bytes, bytes]]
# How a route answers a body it takes, given the request's receive and send.
Responder = Callable[[Receive, Send], Awaitable[None]]
# A route: the responder for a body, or None for a body it leaves to Quart.
RouteHandler = Callable[[Scope, bytes], Responder | None]


class DirectRoutes:
    def __init__(self, app: ASGIApp, state: AppState, config: Mapping[str, Any]) -> None:
        """``config`` is Quart's: its body limit (MAX_CONTENT_LENGTH) and timeout (BODY_TIMEOUT)
        hold here too, read at each request."""
        self._app = app
        self._state = state
        self._config = config
        self._routes: dict[tuple[str, str], RouteHandler] = {
            ("POST", "/v1/chat"): self._chat,
            ("POST", "/v1/chat/completions"): self._completion,
            ("POST", "/v1/chat/stream"): self._chat_stream,
        }

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        route = None
        if scope["type"] == "http":
            route = self._routes.get((scope["method"], scope["path"]))
        if route is None or not self._ordinary(scope):
            await self._app(scope, receive, send)
            return
        body = None
        with trio.move_on_after(self._config["BODY_TIMEOUT"]) as reading:
            body = await _read_body(receive)
        if reading.cancelled_caught:  # the body did not come in time: what Quart answers then
            status, code, message = http_error_fields(RequestTimeout())
            await _send_json(send, status, error_body(code, message, scope.get(REQUEST_ID_KEY)))
            return
        if body is None:
            return  # the client left before its body came
        respond = route(scope, body)
        if respond is None:  # not for this route: Quart answers it, with its own errors
            await self._app(scope, _replayed(body, receive), send)
            return
        await respond(receive, send)

    def _ordinary(self, scope: Scope) -> bool:
        """A JSON body whose declared length is within the limit."""
        media_type = (header(scope, b"content-type") or "").split(";", 1)[0].strip().lower()
        length = header(scope, b"content-length")
        return (
            media_type == JSON_MEDIA_TYPE
            and length is not None
            and length.isdigit()
            and int(length) <= self._config["MAX_CONTENT_LENGTH"]
        )

    def _chat_request(self, scope: Scope, fields: ChatBody) -> ChatRequest:
        return ChatRequest(
            id=fields.id or new_request_id(),
            owner=identity_from_scope(scope),
            message=fields.message,
            path=fields.path,
            model=fields.model,
            conversation_id=fields.conversation_id,
        )

    def _chat(self, scope: Scope, body: bytes) -> Responder | None:
        fields = _validated(ChatBody, body)
        if fields is None:
            return None
        chat = self._chat_request(scope, fields)
        return self._json(scope, answer_chat(self._state.engine, chat))

    def _completion(self, scope: Scope, body: bytes) -> Responder | None:
        fields = _validated(CompletionBody, body)
        if fields is None or not has_user_message(fields):
            return None
        model = answering_model(self._state, fields.model)
        if model is None:  # Quart's view answers 404 model_not_found
            return None
        chat = completion_request(fields, identity_from_scope(scope), model)
        if fields.stream:
            return self._events(
                scope,
                chat,
                COMPLETION_STREAM_HEADERS,
                lambda events: completion_chunks(events, model, fields.include_usage),
                resumable=False,
            )
        request_id = scope.get(REQUEST_ID_KEY)
        return self._json(scope, answer_completion(self._state.engine, chat, model, request_id))

    def _chat_stream(self, scope: Scope, body: bytes) -> Responder | None:
        fields = _validated(ChatBody, body)
        if fields is None:
            return None
        heartbeat_s = self._state.settings.sse_heartbeat_s
        return self._events(
            scope,
            self._chat_request(scope, fields),
            SSE_HEADERS,
            lambda events: sse_body(events, heartbeat_s),
            resumable=self._state.engine.resumes,
        )

    def _events(
        self,
        scope: Scope,
        chat: ChatRequest,
        headers: Headers,
        encode: Callable[[DetachedChat], AsyncGenerator[bytes, None]],
        *,
        resumable: bool,
    ) -> Responder:
        async def respond(receive: Receive, send: Send) -> None:
            await self._stream_events(
                scope, chat, headers, encode, receive, send, resumable=resumable
            )

        return respond

    def _json(self, scope: Scope, answer: Awaitable[Answer]) -> Responder:
        """Send ``answer`` once it comes, unless the client left first (which cancels it)."""

        async def respond(receive: Receive, send: Send) -> None:
            status, body = await until_disconnect(scope, receive, self._refusable(scope, answer))
            if status:
                await _send_json(send, status, body)

        return respond

    async def _refusable(self, scope: Scope, answer: Awaitable[Answer]) -> Answer:
        try:
            return await answer
        except REFUSED as exc:
            return _refusal(scope, exc)

    async def _stream_events(
        self,
        scope: Scope,
        chat: ChatRequest,
        headers: Headers,
        encode: Callable[[DetachedChat], AsyncGenerator[bytes, None]],
        receive: Receive,
        send: Send,
        *,
        resumable: bool,
    ) -> None:
        """The chat as server-sent events, as ``encode`` makes them (``sse_body`` or
        ``completion_chunks``, as Quart's views send them). A chat that cannot be resumed runs
        beside the writing, in this request's nursery (no detached task, no watchdog for a
        reader that never came), and a client that leaves stops it (reason ``disconnect``); a
        resumable one runs in the engine's nursery, and a client that leaves detaches it."""
        engine, settings = self._state.engine, self._state.settings
        outbox = Outbox(settings.outbox_max_bytes)
        try:
            turn = await engine.admit(chat, outbox, resumable=resumable)
        except REFUSED as exc:
            await _send_json(send, *_refusal(scope, exc))
            return
        async with trio.open_nursery() as nursery:
            if resumable:
                engine.run_resumable(turn)
                events = DetachedChat(engine, chat.id, outbox, attachment=turn.outlet)
            else:
                nursery.start_soon(_run_turn, turn, outbox)
                events = DetachedChat(engine, chat.id, outbox, record=turn.record)
            _on_disconnect(scope, receive, nursery)
            try:
                await send({"type": "http.response.start", "status": 200, "headers": headers})
                async with aclosing(encode(events)) as parts:
                    async for part in parts:
                        await send({"type": "http.response.body", "body": part, "more_body": True})
                await send({"type": "http.response.body", "body": b"", "more_body": False})
            finally:
                events.close()  # (the body closes it too, once it has begun)
            nursery.cancel_scope.cancel()  # the turn has ended: only the watch is left


def _refusal(scope: Scope, exc: AetherError) -> Answer:
    return status_for(exc.code), error_body(exc.code, exc.message, scope.get(REQUEST_ID_KEY))


async def _run_turn(turn: ChatTurn, outbox: Outbox) -> None:
    try:
        await turn.run()
    finally:
        outbox.finish()


async def _cancel_on_disconnect(receive: Receive, scope: trio.CancelScope) -> None:
    while (await receive())["type"] != "http.disconnect":
        pass
    scope.cancel()


def _validated(model: type[ModelT], body: bytes) -> ModelT | None:
    try:
        return model.model_validate_json(body)
    except ValidationError:
        return None


async def _read_body(receive: Receive) -> bytes | None:
    """The whole request body; None if the client disconnected first."""
    parts: list[bytes] = []
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            return None
        parts.append(message.get("body", b""))
        if not message.get("more_body", False):
            return parts[0] if len(parts) == 1 else b"".join(parts)


def _replayed(body: bytes, receive: Receive) -> Receive:
    """``receive`` as if the body had not been read yet."""
    replayed = False

    async def receive_again() -> Message:
        nonlocal replayed
        if not replayed:
            replayed = True
            return {"type": "http.request", "body": body, "more_body": False}
        return await receive()

    return receive_again


def _on_disconnect(scope: Scope, receive: Receive, nursery: trio.Nursery) -> None:
    """Cancel ``nursery`` when the client leaves: told by the server (``DISCONNECT_SIGNAL``),
    or, from a server without it, seen by a task watching ``receive``."""
    signal = scope.get("extensions", {}).get(DISCONNECT_SIGNAL)
    if isinstance(signal, DisconnectSignal):
        signal.cancel_on_disconnect(nursery.cancel_scope)
    else:
        nursery.start_soon(_cancel_on_disconnect, receive, nursery.cancel_scope)


async def until_disconnect(scope: Scope, receive: Receive, answer: Awaitable[Answer]) -> Answer:
    """Await ``answer``, unless the client disconnects first: then it is cancelled (its chat
    stops with reason ``disconnect``) and the status is 0 (nothing is sent)."""
    signal = scope.get("extensions", {}).get(DISCONNECT_SIGNAL)
    if isinstance(signal, DisconnectSignal):  # no task needed: a cancel scope will do
        with trio.CancelScope() as cancel_scope:
            signal.cancel_on_disconnect(cancel_scope)
            return await answer
        return (0, {})
    result: Answer = (0, {})
    async with trio.open_nursery() as nursery:
        nursery.start_soon(_cancel_on_disconnect, receive, nursery.cancel_scope)
        result = await answer
        nursery.cancel_scope.cancel()
    return result


async def _send_json(send: Send, status: int, body: dict[str, Any]) -> None:
    payload = orjson.dumps(body)
    await send(
        {
            "type": "http.response.start",
            "status": status,
            "headers": [
                (b"content-type", JSON_MEDIA_TYPE.encode()),
                (b"content-length", str(len(payload)).encode()),
            ],
        }
    )
    await send({"type": "http.response.body", "body": payload})
