"""Per-IP rate limiting with tiers, as pure ASGI middleware.

Each request falls in a tier by its route: ``exempt`` (health probes), ``chat`` (starting a chat:
``POST /v1/chat``, ``/v1/chat/stream`` and opening ``/ws``) or ``default`` (the rest). Each
(IP, tier) has a token bucket holding ``limit`` tokens that refills over ``window_s``: a burst of
``limit`` is allowed, then one request per ``window_s / limit``. A refused request gets ``429``
with ``Retry-After`` and a JSON error; limited routes carry the IETF draft's ``RateLimit-Policy``
and ``RateLimit`` headers (``"chat";q=60;w=60`` and ``"chat";r=59;t=0``).

Memory is bounded: at most ``max_clients`` buckets are kept, least recently used evicted first
(an evicted client starts again with a full bucket, which errs on the side of serving it).
Loopback is limited like any address unless listed in ``exempt_ips``.

@.architecture
role: rate limiting middleware
jobs: [request_identification, tier_classification, limit_checking, header_injection]
"""

from __future__ import annotations

import logging
import math
from collections import OrderedDict
from dataclasses import dataclass

import trio

from aether.api.middleware.asgi import send_error
from aether.asgi import REQUEST_ID_KEY, ASGIApp, Message, Receive, Scope, Send
from aether.core.control.plane import ControlPlane
from aether.core.metrics import Metrics
from aether.core.token_bucket import TokenBucket

log = logging.getLogger(__name__)

EXEMPT_PATHS = frozenset({"/health", "/ready"})
CHAT_PATHS = frozenset({"/v1/chat", "/v1/chat/stream", "/v1/chat/completions", "/ws"})


@dataclass(frozen=True)
class Tier:
    name: str
    limit: int
    window_s: float

    @property
    def policy(self) -> bytes:
        return f'"{self.name}";q={self.limit};w={math.ceil(self.window_s)}'.encode()


class RateLimiter:
    """Token buckets per (client, tier), bounded in number. Time comes from Trio's clock."""

    def __init__(self, max_clients: int) -> None:
        self._buckets: OrderedDict[tuple[str, str], TokenBucket] = OrderedDict()
        self._max_clients = max_clients
        self.refused = 0

    def take(self, client: str, tier: Tier) -> tuple[bool, int, float]:
        """Try to take a token: (allowed, tokens left, seconds until the next token)."""
        now = trio.current_time()
        key = (client, tier.name)
        bucket = self._buckets.get(key)
        if bucket is None:
            bucket = self._buckets[key] = TokenBucket(tier.limit, tier.window_s, now)
            if len(self._buckets) > self._max_clients:
                self._buckets.popitem(last=False)
        else:
            self._buckets.move_to_end(key)
        allowed, remaining, retry_after_s = bucket.take(now)
        if not allowed:
            self.refused += 1
        return allowed, remaining, retry_after_s

    def __len__(self) -> int:
        return len(self._buckets)


class RateLimitMiddleware:
    def __init__(
        self,
        app: ASGIApp,
        limiter: RateLimiter,
        *,
        chat: Tier,
        default: Tier,
        exempt_ips: frozenset[str],
        metrics: Metrics,
        control: ControlPlane,
    ) -> None:
        self._app = app
        self._metrics = metrics
        self._limiter = limiter
        # With several workers, the buckets are the server's (in the control plane).
        self._control = control
        self._chat = chat
        self._default = default
        self._exempt_ips = exempt_ips

    def tier_for(self, scope: Scope) -> Tier | None:
        path = scope.get("path", "")
        if path in EXEMPT_PATHS:
            return None
        if path in CHAT_PATHS and (scope["type"] == "websocket" or scope.get("method") == "POST"):
            return self._chat
        return self._default

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] not in ("http", "websocket"):
            await self._app(scope, receive, send)
            return
        tier = self.tier_for(scope)
        client = (scope.get("client") or ("unknown", 0))[0]
        if tier is None or client in self._exempt_ips:
            await self._app(scope, receive, send)
            return
        if self._control.shared:
            bucket = f"{tier.name}:{client}"
            verdict = await self._control.take_token(bucket, tier.limit, tier.window_s)
            assert verdict is not None
            allowed, remaining, retry_after_s = verdict
        else:
            allowed, remaining, retry_after_s = self._limiter.take(client, tier)
        reset_s = 0 if allowed else math.ceil(retry_after_s)
        headers = [
            (b"ratelimit-policy", tier.policy),
            (b"ratelimit", f'"{tier.name}";r={remaining};t={reset_s}'.encode()),
        ]
        if not allowed:
            self._metrics.rate_limited.labels(tier.name).inc()
            log.info(
                "request %s: %s rate limited (%s tier)",
                scope.get(REQUEST_ID_KEY),
                client,
                tier.name,
            )
            await send_error(
                scope,
                receive,
                send,
                429,
                "rate_limited",
                f"too many requests: the {tier.name} limit is {tier.limit} per "
                f"{tier.window_s:g} s; retry after {reset_s} s",
                [(b"retry-after", str(reset_s).encode()), *headers],
            )
            return

        async def send_with_headers(message: Message) -> None:
            if message["type"] == "http.response.start":
                message["headers"] = [*message.get("headers", ()), *headers]
            await send(message)

        await self._app(scope, receive, send_with_headers)
