"""The last send of an HTTP response runs shielded, so its connection is always recycled or closed.

Hypercorn does its end-of-response work inside the application's final ``send``: it ends the
message, tells the application ``http.disconnect``, then keeps the connection for the next
request or closes it. Quart-Trio cancels its request nursery the moment that disconnect arrives,
and the cancellation lands in the middle of the same call. When the response was sent before
the request's body had arrived (a 405 or 413 to a request with a body), Hypercorn must close
the connection, and the cancelled close left it open and deaf: the client's next request on it
waited forever. Shielding the final send lets that work finish; Hypercorn already shields its
socket writes, and a deadline bounds the rest.

Such a response (one that starts before the request's body was read to its end: an
authentication failure, a 405, a 413) also says ``Connection: close``, so that a client does not
send its next request on a connection the server is about to close.

@.architecture
role: response end middleware
jobs: [response_interception, cleanup]
"""

from __future__ import annotations

import trio

from aether.asgi import ASGIApp, Message, Receive, Scope, Send

FINAL_SEND_TIMEOUT_S = 10.0


class ResponseEndMiddleware:
    def __init__(self, app: ASGIApp) -> None:
        self._app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            # WebSocket frames skip this layer (they are the hot path); a refused handshake's
            # response needs no recycling, the connection closes after it.
            await self._app(scope, receive, send)
            return

        body_expected = _has_body(scope)
        body_read = not body_expected

        async def receive_tracking_body() -> Message:
            nonlocal body_read
            message = await receive()
            if message["type"] == "http.request" and not message.get("more_body", False):
                body_read = True
            return message

        async def send_final_shielded(message: Message) -> None:
            if message["type"] == "http.response.start" and not body_read:
                message["headers"] = [*message.get("headers", ()), (b"connection", b"close")]
            if message["type"] == "http.response.body" and not message.get("more_body", False):
                with trio.CancelScope(shield=True) as shield:
                    shield.relative_deadline = FINAL_SEND_TIMEOUT_S
                    await send(message)
                return
            await send(message)

        await self._app(scope, receive_tracking_body, send_final_shielded)


def _has_body(scope: Scope) -> bool:
    for name, value in scope.get("headers", ()):
        name = name.lower()
        if name == b"transfer-encoding" or (name == b"content-length" and value.strip() != b"0"):
            return True
    return False
