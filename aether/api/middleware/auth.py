"""Authentication and the WebSocket Origin check, as pure ASGI middleware.

- With API keys configured, every route but ``/health`` and ``/ready`` needs one:
  ``Authorization: Bearer <key>`` on REST and on the WebSocket handshake, or, for browsers
  (which cannot set that header on a WebSocket), the subprotocols ``aether.v2, bearer.<key>``:
  the server then selects ``aether.v2``, never echoing the key. A refused caller gets 401 before
  any upgrade. The caller's identity goes into the scope; it owns what the caller starts.
- Without keys, every caller is the anonymous identity (the settings allow that on loopback only).
- Public paths need no key: health probes, the OpenAPI document, and the web page with its
  files (the page asks for the key; the API behind it needs it).

Which browser pages may send requests at all is decided before this layer
(``browser_guard``).

@.architecture
role: authentication middleware
jobs: [authentication, identity_resolution]
"""

from __future__ import annotations

import logging

from aether.api.middleware.asgi import send_error
from aether.asgi import IDENTITY_KEY, REQUEST_ID_KEY, ASGIApp, Receive, Scope, Send, header
from aether.core.identity import KeyRing

log = logging.getLogger(__name__)

PUBLIC_PATHS = frozenset({"/health", "/ready", "/openapi.json", "/asyncapi.json"})
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


class AuthMiddleware:
    def __init__(
        self,
        app: ASGIApp,
        keys: KeyRing,
        public_paths: frozenset[str] = PUBLIC_PATHS,
        public_prefixes: tuple[str, ...] = (),
    ) -> None:
        self._app = app
        self._keys = keys
        self._public_paths = public_paths
        self._public_prefixes = public_prefixes

    def is_public(self, path: str) -> bool:
        return path in self._public_paths or path.startswith(self._public_prefixes)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        kind = scope["type"]
        if kind not in ("http", "websocket"):
            await self._app(scope, receive, send)
            return
        if self._keys.enabled and not self.is_public(scope.get("path", "")):
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
            scope[IDENTITY_KEY] = identity
        await self._app(scope, receive, send)
