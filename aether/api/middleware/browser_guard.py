"""What a browser may ask of this server: the Host allow-list, the Origin check and cross-site
refusal, as pure ASGI middleware in front of every route and the WebSocket.

A local server is attacked through its user's browser. A page on another site can send it
requests (a ``text/plain`` POST needs no preflight), and a page on a name the attacker rebinds
to 127.0.0.1 is, to the browser, same-origin with whatever it serves. So, before any handler:

- **Host.** A request whose ``Host`` is not one of ``allowed_hosts`` gets ``421`` (no Host: 400).
  This defeats DNS rebinding: the browser sends the attacker's name. The port is not compared
  (a rebinding page names the same port as the server).
- **Origin.** A request that carries ``Origin`` (browsers send it on every POST and WebSocket
  handshake) is refused with ``403`` unless the origin is one of ``allowed_origins`` or its host
  is one of ``allowed_hosts``; with ``allowed_hosts = *`` (only allowed with API keys, which a
  browser never sends by itself) the server's own origin is accepted too. ``Origin: null``
  (sandboxed frames, local files) is refused.
- **Cross-site.** ``Sec-Fetch-Site: cross-site`` or ``same-site`` without an allowed ``Origin``
  is refused with ``403``: it covers the requests that carry no Origin (a ``<script src>`` or
  ``<img>`` reading an API). Navigating to the web page from another site is allowed: the page
  and its files are public and change nothing.

@.architecture
role: browser guard middleware
jobs: [host_checking, origin_checking, csrf_protection]
"""

from __future__ import annotations

import ipaddress
import logging
from dataclasses import dataclass
from urllib.parse import urlsplit

from aether.api.middleware.asgi import send_error
from aether.asgi import REQUEST_ID_KEY, ASGIApp, Receive, Scope, Send, header

log = logging.getLogger(__name__)

ANY_HOST = "*"
# Sec-Fetch-Site values that mean another site made the browser send the request.
_FOREIGN_SITES = frozenset({"cross-site", "same-site"})


def split_host(value: str) -> tuple[str, int | None] | None:
    """A ``Host`` header's (or an origin's) name and port, lower-cased, without a trailing dot
    (``[::1]:8000`` -> ``("::1", 8000)``, ``Example.COM.`` -> ``("example.com", None)``); None
    if it is malformed."""
    value = value.strip().lower()
    if value.startswith("["):
        end = value.find("]")
        name, rest = value[1:end], value[end + 1 :]
        if end < 0 or (rest and not rest.startswith(":")):
            return None
        try:
            ipaddress.IPv6Address(name)
        except ValueError:
            return None
        port = rest[1:]
    else:
        name, _, port = value.partition(":")
        name = name.rstrip(".")
    if not name or (port and not port.isdigit()) or len(port) > 5:
        return None
    return name, int(port) if port else None


def host_name(value: str) -> str | None:
    """The name part of ``split_host``."""
    split = split_host(value)
    return None if split is None else split[0]


def _explicit_port(port: int | None) -> int | None:
    """A port, or None for HTTP's and HTTPS's defaults: an origin ``https://x`` and a ``Host: x``
    behind a TLS proxy name the same place."""
    return None if port in (80, 443) else port


@dataclass(frozen=True)
class BrowserPolicy:
    """The hosts a request may name and the origins a browser page may come from."""

    allowed_hosts: frozenset[str]
    allowed_origins: frozenset[str]
    public_paths: frozenset[str] = frozenset()
    public_prefixes: tuple[str, ...] = ()

    @property
    def any_host(self) -> bool:
        return ANY_HOST in self.allowed_hosts

    def host_allowed(self, host: str | None) -> bool:
        if self.any_host:
            return True
        name = host_name(host) if host is not None else None
        return name is not None and name in self.allowed_hosts

    def origin_allowed(self, origin: str, scope: Scope) -> bool:
        """An origin is allowed when it is listed, or when it names an allowed host on the port
        the request came to (a page this server serves). With ``*`` for hosts, only a listed
        origin or the server's own: the same name and port as ``Host``."""
        origin = origin.strip().lower()
        if origin in self.allowed_origins:
            return True
        parts = urlsplit(origin)
        if parts.scheme not in ("http", "https") or not parts.netloc or parts.path:
            return False  # "null", or not an origin at all
        page = split_host(parts.netloc)
        host = header(scope, b"host")
        here = split_host(host) if host is not None else None
        if page is None or here is None or _explicit_port(page[1]) != _explicit_port(here[1]):
            return False
        if self.any_host:
            return page[0] == here[0]
        return page[0] in self.allowed_hosts

    def is_public_page(self, scope: Scope) -> bool:
        """GET/HEAD of the web page and its files: navigable from anywhere."""
        if scope["type"] != "http" or scope.get("method") not in ("GET", "HEAD"):
            return False
        path = scope.get("path", "")
        return path in self.public_paths or path.startswith(self.public_prefixes)


class BrowserGuardMiddleware:
    def __init__(self, app: ASGIApp, policy: BrowserPolicy) -> None:
        self._app = app
        self._policy = policy

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] not in ("http", "websocket"):
            await self._app(scope, receive, send)
            return
        refusal = self._refusal(scope)
        if refusal is None:
            await self._app(scope, receive, send)
            return
        status, code, message = refusal
        log.info(
            "request %s: %s %s refused: %s",
            scope.get(REQUEST_ID_KEY),
            scope["type"],
            scope.get("path"),
            message,
        )
        await send_error(scope, receive, send, status, code, message)

    def _refusal(self, scope: Scope) -> tuple[int, str, str] | None:
        policy = self._policy
        host = header(scope, b"host")
        if host is None and not policy.any_host:
            return 400, "missing_host", "the request has no Host header"
        if not policy.host_allowed(host):
            return (
                421,
                "host_not_allowed",
                f"this server does not answer to the host {host_name(host or '') or host!r} "
                "(the server's AETHER_ALLOWED_HOSTS lists the names it answers to)",
            )
        origin = header(scope, b"origin")
        if origin is not None:
            if not policy.origin_allowed(origin, scope):
                return (
                    403,
                    "origin_not_allowed",
                    f"requests from the origin {origin[:100]!r} are not allowed",
                )
            return None
        site = (header(scope, b"sec-fetch-site") or "").strip().lower()
        if site in _FOREIGN_SITES and not policy.is_public_page(scope):
            return 403, "cross_site_request", "requests from another site are not allowed"
        return None
