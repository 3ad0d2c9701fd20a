"""The client's address behind a reverse proxy (nginx, a load balancer).

Behind a proxy every connection comes from the proxy, so per-IP limits (rate limits, WebSocket
connections per IP) would count all clients as one. When the connection comes from one of
``trusted_proxies``, the client is read from ``X-Forwarded-For``: walking it from the right
(the hop nearest to this server), trusted proxies are skipped and the first other address is
the client. A header that is missing or holds something other than addresses leaves the
connection's own address. ``X-Forwarded-Proto`` (``http``/``https``) from a trusted proxy sets
the scheme the client used (so HSTS and links follow TLS that ended at the proxy). From any
other peer both headers are ignored: a client cannot name itself someone else.

@.architecture
role: forwarded-address middleware
jobs: [request_identification]
"""

from __future__ import annotations

import ipaddress
from collections.abc import Iterable

from aether.asgi import ASGIApp, Receive, Scope, Send, header

Network = ipaddress.IPv4Network | ipaddress.IPv6Network


def proxy_networks(entries: Iterable[str]) -> tuple[Network, ...]:
    """Addresses or networks (``10.0.0.0/8``) as networks; raises ValueError on anything else."""
    return tuple(ipaddress.ip_network(entry, strict=False) for entry in entries)


class ForwardedMiddleware:
    def __init__(self, app: ASGIApp, trusted: tuple[Network, ...]) -> None:
        self._app = app
        self._trusted = trusted

    def _is_trusted(self, address: str) -> bool:
        try:
            ip = ipaddress.ip_address(address)
        except ValueError:
            return False
        return any(ip in network for network in self._trusted)

    def client_of(self, scope: Scope) -> str | None:
        """The client's address by the proxies' headers, or None to keep the connection's."""
        peer = (scope.get("client") or ("", 0))[0]
        if not self._is_trusted(peer):
            return None
        hops = [
            hop.strip()
            for key, value in scope.get("headers", ())
            if key.lower() == b"x-forwarded-for"
            for hop in bytes(value).decode("latin-1").split(",")
        ]
        for hop in reversed(hops):
            try:
                ipaddress.ip_address(hop)
            except ValueError:
                return None  # not an address: trust nothing further along
            if not self._is_trusted(hop):
                return hop
        return hops[0] if hops else None

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if self._trusted and scope["type"] in ("http", "websocket"):
            client = self.client_of(scope)
            if client is not None:
                scope = {**scope, "client": (client, 0)}
                proto = (header(scope, b"x-forwarded-proto") or "").strip().lower()
                if proto in ("http", "https"):
                    secure = proto == "https"
                    if scope["type"] == "websocket":
                        scope["scheme"] = "wss" if secure else "ws"
                    else:
                        scope["scheme"] = proto
        await self._app(scope, receive, send)
