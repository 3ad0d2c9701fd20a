"""The middleware's JSON error responses (ASGI types and scope keys are in ``aether.asgi``).

An error sent by middleware has the same shape as one from a route:
``{"error": {"code", "message", "request_id"}}``. On a WebSocket handshake it is sent with the
ASGI "websocket.http.response" extension, so the client gets a real HTTP status before any
upgrade (no 101).

@.architecture
role: ASGI helpers
jobs: [response_formatting]
"""

from __future__ import annotations

from collections.abc import Iterable

import orjson

from aether.asgi import REQUEST_ID_KEY, Receive, Scope, Send


def error_body(code: str, message: str, request_id: str | None) -> bytes:
    return orjson.dumps({"error": {"code": code, "message": message, "request_id": request_id}})


async def send_error(
    scope: Scope,
    receive: Receive,
    send: Send,
    status: int,
    code: str,
    message: str,
    headers: Iterable[tuple[bytes, bytes]] = (),
) -> None:
    """Answer the request (or refuse the WebSocket handshake) with a JSON error."""
    body = error_body(code, message, scope.get(REQUEST_ID_KEY))
    all_headers = [
        (b"content-type", b"application/json"),
        (b"content-length", str(len(body)).encode()),
        *headers,
    ]
    if scope["type"] == "websocket":
        event = await receive()  # websocket.connect comes first
        if event["type"] != "websocket.connect":
            return
        await send(
            {"type": "websocket.http.response.start", "status": status, "headers": all_headers}
        )
        await send({"type": "websocket.http.response.body", "body": body})
        return
    await send({"type": "http.response.start", "status": status, "headers": all_headers})
    await send({"type": "http.response.body", "body": body})
