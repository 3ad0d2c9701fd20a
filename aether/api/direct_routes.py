"""The hottest REST routes' ordinary requests, answered as plain ASGI in front of Quart.

``POST /v1/chat`` and ``POST /v1/chat/completions`` (not streamed) are where a chat's fixed cost
is paid most often, and Quart's share of it was larger than the chat's own: two tasks and a
nursery per request, a request context, werkzeug's request and response objects, and a body
read through its own timer. A request these routes can answer the ordinary way (a JSON body
of declared length within the limit, whose fields validate) is answered here, with the same
functions the Quart views use (``answer_chat``, ``answer_completion``): the same answers,
statuses and errors. Every other request (a chunked or oversized body, another media type,
invalid fields, a streamed completion) goes on to Quart with its body replayed, and Quart
answers it as before. The Quart views stay the routes' definition: their OpenAPI documentation,
and the answer to everything not taken here.

Sits inside the middleware stack (security headers, request ids, browser guard, rate limits and
authentication all apply, as for ``/ws``).

Cancellation: a client that disconnects while its chat runs cancels the chat (reason
``disconnect``), as Quart's handling did: one task watches ``receive`` for the disconnect.

@.architecture
role: direct REST routes
jobs: [routing_registration, message_handling, validation]
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Mapping
from typing import Any, TypeVar

import orjson
import trio
from pydantic import BaseModel, ValidationError
from werkzeug.exceptions import RequestTimeout

from aether.api.dependencies import AppState
from aether.api.errors import http_error_fields, status_for
from aether.api.json_body import JSON_MEDIA_TYPE
from aether.api.responses import error_body
from aether.api.v1.endpoints.chat import REFUSED, answer_chat
from aether.api.v1.endpoints.openai_compat import (
    CompletionBody,
    answer_completion,
    completion_request,
    has_user_message,
    served_model,
)
from aether.asgi import (
    REQUEST_ID_KEY,
    ASGIApp,
    Message,
    Receive,
    Scope,
    Send,
    header,
    identity_from_scope,
)
from aether.core.chat import ChatRequest
from aether.protocol.messages import ChatBody, new_request_id

ModelT = TypeVar("ModelT", bound=BaseModel)
# What a route does with a body it validated: its status and JSON answer.
Answer = tuple[int, dict[str, Any]]
RouteHandler = Callable[[Scope, bytes], Awaitable[Answer] | None]


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
        answer = route(scope, body)
        if answer is None:  # not for this route: Quart answers it, with its own errors
            await self._app(scope, _replayed(body, receive), send)
            return
        status, json_body = await _until_disconnect(receive, answer)
        if status:
            await _send_json(send, status, json_body)

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

    def _chat(self, scope: Scope, body: bytes) -> Awaitable[Answer] | None:
        fields = _validated(ChatBody, body)
        if fields is None:
            return None
        chat = ChatRequest(
            id=fields.id or new_request_id(),
            owner=identity_from_scope(scope),
            message=fields.message,
            path=fields.path,
            conversation_id=fields.conversation_id,
        )
        return self._refusable(scope, answer_chat(self._state.engine, chat))

    def _completion(self, scope: Scope, body: bytes) -> Awaitable[Answer] | None:
        fields = _validated(CompletionBody, body)
        if fields is None or fields.stream or not has_user_message(fields):
            return None
        chat = completion_request(fields, identity_from_scope(scope))
        model = served_model(self._state)
        request_id = scope.get(REQUEST_ID_KEY)
        return self._refusable(
            scope, answer_completion(self._state.engine, chat, model, request_id)
        )

    async def _refusable(self, scope: Scope, answer: Awaitable[Answer]) -> Answer:
        try:
            return await answer
        except REFUSED as exc:
            status = status_for(exc.code)
            return status, error_body(exc.code, exc.message, scope.get(REQUEST_ID_KEY))


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


async def _until_disconnect(receive: Receive, answer: Awaitable[Answer]) -> Answer:
    """Await ``answer``, unless the client disconnects first: then it is cancelled (its chat
    stops with reason ``disconnect``) and the status is 0 (nothing is sent)."""
    result: Answer = (0, {})
    async with trio.open_nursery() as nursery:

        async def watch() -> None:
            while (await receive())["type"] != "http.disconnect":
                pass
            nursery.cancel_scope.cancel()

        nursery.start_soon(watch)
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
