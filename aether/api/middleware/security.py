"""Security headers on every HTTP response, errors and refused handshakes included.

API responses get a strict policy: not cached (``no-store``), not sniffed, not framed, no
referrer, a Content-Security-Policy that allows nothing, and HSTS when served over TLS. The
``Server`` header never leaves. The web page's routes set their own policy and caching (their
files are revalidated by ETag); nothing else may.

@.architecture
role: security headers middleware
jobs: [response_interception, header_injection]
"""

from __future__ import annotations

from aether.asgi import RAW_SEND_KEY, ASGIApp, Message, Receive, Scope, Send

API_HEADERS: tuple[tuple[bytes, bytes], ...] = (
    (b"cache-control", b"no-store"),
    (b"x-content-type-options", b"nosniff"),
    (b"x-frame-options", b"DENY"),
    (b"referrer-policy", b"no-referrer"),
    (b"content-security-policy", b"default-src 'none'; frame-ancestors 'none'; base-uri 'none'"),
)
HSTS = (b"strict-transport-security", b"max-age=31536000; includeSubDomains")
# Headers a route may set for itself (the web page's policy, its files' caching); every other
# response gets the API's: a policy that allows nothing, and no-store.
_ROUTE_MAY_SET = {b"content-security-policy", b"cache-control"}
# Every response gets these, whatever the route set.
_REPLACED = {name for name, _ in API_HEADERS if name not in _ROUTE_MAY_SET} | {b"server"}
_STARTS = {"http.response.start", "websocket.http.response.start"}


class SecurityHeadersMiddleware:
    def __init__(self, app: ASGIApp) -> None:
        self._app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] not in ("http", "websocket"):
            await self._app(scope, receive, send)
            return
        if scope["type"] == "websocket":
            scope[RAW_SEND_KEY] = send  # the outermost layer for WebSockets: see the key's note
        added = [*API_HEADERS, HSTS] if scope.get("scheme") in ("https", "wss") else API_HEADERS

        async def send_with_headers(message: Message) -> None:
            if message["type"] in _STARTS:
                kept = [
                    (name, value)
                    for name, value in message.get("headers", ())
                    if name.lower() not in _REPLACED
                ]
                set_by_route = {name.lower() for name, _ in kept} & _ROUTE_MAY_SET
                extra = [h for h in added if h[0] not in set_by_route]
                message["headers"] = [*kept, *extra]
            await send(message)

        try:
            await self._app(scope, receive, send_with_headers)
        finally:
            # Hypercorn's WebSocket stream holds this scope and ``send`` is its bound method: the
            # key would close a reference cycle that keeps the whole connection (its zlib
            # compression state included) alive until a full collection.
            scope.pop(RAW_SEND_KEY, None)
