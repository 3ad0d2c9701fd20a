"""Authentication and the WebSocket Origin check, as pure ASGI middleware.

- With API keys configured, every route but ``/health`` and ``/ready`` needs one:
  ``Authorization: Bearer <key>`` on REST and on the WebSocket handshake, or, for browsers
  (which cannot set that header on a WebSocket), the subprotocols ``aether.v1, bearer.<key>``:
  the server then selects ``aether.v1``, never echoing the key. A refused caller gets 401 before
  any upgrade. The caller's identity goes into the scope; it owns what the caller starts.
- Without keys, every caller is the anonymous identity (the settings allow that on loopback only).
- A WebSocket handshake from a browser (one that sends ``Origin``) is refused with 403 unless the
  origin is in ``allowed_origins``, or, when that list is empty, is the server's own origin: a
  web page elsewhere cannot use a visitor's browser to reach this server.

@.architecture
role: authentication middleware
jobs: [authentication, origin_checking, identity_resolution]
"""

from __future__ import annotations

import logging

from aether.api.middleware.asgi import (
    REQUEST_ID_KEY,
    ASGIApp,
    Receive,
    Scope,
    Send,
    header,
    send_error,
)
from aether.core.identity import SCOPE_IDENTITY_KEY, KeyRing

log = logging.getLogger(__name__)

PUBLIC_PATHS = frozenset({"/health", "/ready", "/openapi.json"})
BEARER_SUBPROTOCOL_PREFIX = "bearer."


def presented_key(scope: Scope) -> str | None:
    """The key in ``Authorization: Bearer``, else (WebSocket) in a ``bearer.`` subprotocol."""
    authorization = header(scope, b"authorization")
    if authorization is not None:
        scheme, _, token = authorization.partition(" ")
        return token.strip() if scheme.lower() == "bearer" and token.strip() else None
    if scope["type"] == "websocket":
        for protocol in scope.get("subprotocols", ()):
            if protocol.startswith(BEARER_SUBPROTOCOL_PREFIX):
                return protocol[len(BEARER_SUBPROTOCOL_PREFIX) :] or None
    return None


def origin_allowed(scope: Scope, allowed: tuple[str, ...]) -> bool:
    origin = header(scope, b"origin")
    if origin is None:
        return True  # not a browser: Origin only protects browsers' users
    origin = origin.lower()
    if allowed:
        return origin in allowed
    host = header(scope, b"host")
    return host is not None and origin in (f"http://{host}".lower(), f"https://{host}".lower())


class AuthMiddleware:
    def __init__(
        self,
        app: ASGIApp,
        keys: KeyRing,
        allowed_origins: tuple[str, ...],
        public_paths: frozenset[str] = PUBLIC_PATHS,
    ) -> None:
        self._app = app
        self._keys = keys
        self._allowed_origins = allowed_origins
        self._public_paths = public_paths

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        kind = scope["type"]
        if kind not in ("http", "websocket"):
            await self._app(scope, receive, send)
            return
        if kind == "websocket" and not origin_allowed(scope, self._allowed_origins):
            log.info(
                "request %s: WebSocket from origin %r refused",
                scope.get(REQUEST_ID_KEY),
                header(scope, b"origin"),
            )
            await send_error(scope, receive, send, 403, "origin_not_allowed", "origin not allowed")
            return
        if self._keys.enabled and scope.get("path") not in self._public_paths:
            key = presented_key(scope)
            identity = self._keys.identify(key) if key is not None else None
            if identity is None:
                log.info("request %s: %s without a valid API key", scope.get(REQUEST_ID_KEY), kind)
                await send_error(
                    scope,
                    receive,
                    send,
                    401,
                    "unauthorized",
                    "a valid API key is required (Authorization: Bearer <key>)",
                    [(b"www-authenticate", b'Bearer realm="aether"')],
                )
                return
            scope[SCOPE_IDENTITY_KEY] = identity
        await self._app(scope, receive, send)
