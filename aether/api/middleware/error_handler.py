"""Request ids and the last line of error handling, as pure ASGI middleware.

Every HTTP request and WebSocket handshake gets an id (the caller's ``X-Request-Id`` when it is
a sane token, else a new one) in ``scope["aether.request_id"]``; every response carries it back
in ``X-Request-Id``, every error body names it, and log lines use it. An exception that escapes
the application is logged here with its traceback and the request id; the client gets a JSON 500
with the id and nothing of the exception.

@.architecture
role: error handling middleware
jobs: [exception_catching, error_classification, response_formatting, sanitization, logging]
"""

from __future__ import annotations

import logging
import re
import secrets

from aether.api.middleware.asgi import send_error
from aether.asgi import REQUEST_ID_KEY, ASGIApp, Message, Receive, Scope, Send, header

log = logging.getLogger(__name__)

_SANE_REQUEST_ID = re.compile(r"[A-Za-z0-9._:-]{1,64}")
_STARTS = {"http.response.start", "websocket.http.response.start", "websocket.accept"}


def new_request_id() -> str:
    return "q-" + secrets.token_hex(8)


class ErrorHandlerMiddleware:
    def __init__(self, app: ASGIApp) -> None:
        self._app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] not in ("http", "websocket"):
            await self._app(scope, receive, send)
            return
        offered = header(scope, b"x-request-id")
        request_id = offered if offered and _SANE_REQUEST_ID.fullmatch(offered) else None
        request_id = request_id or new_request_id()
        scope[REQUEST_ID_KEY] = request_id
        encoded = request_id.encode()
        started = False

        async def send_with_id(message: Message) -> None:
            nonlocal started
            if message["type"] in _STARTS:
                started = True
                if message["type"] != "websocket.accept":
                    message["headers"] = [*message.get("headers", ()), (b"x-request-id", encoded)]
            await send(message)

        try:
            await self._app(scope, receive, send_with_id)
        except Exception:
            log.exception("request %s %s failed", request_id, scope.get("path"))
            if not started and scope["type"] == "http":
                await send_error(
                    scope, receive, send, 500, "internal_error", "the server failed to answer"
                )
