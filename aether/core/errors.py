"""The exceptions the core raises, drawn as one hierarchy so transports map them in one place.

    AetherError
    ├── ProviderError              a model path failed; ``code`` is stable and goes to the client
    │   ├── UpstreamUnavailable    connection refused / DNS / connect timeout
    │   ├── UpstreamHTTPError      the upstream answered 4xx/5xx
    │   ├── UpstreamTimeout        no first token (or no next chunk) in time
    │   ├── UpstreamDisconnected   the upstream dropped the stream mid-way
    │   └── UpstreamProtocolError  the upstream spoke something that is not OpenAI SSE
    ├── PathUnavailable            the requested path is not configured
    ├── UnknownRequest             stop/lookup of an id that is not live for this caller
    ├── DuplicateRequest           a live request already has that id
    ├── StaleConfirmation          an answer to a code confirmation that is not the pending one
    ├── TooManyRequests            the caller already runs as many chats as it may
    └── ShuttingDown               the server is draining and starts no new chat

@.architecture
role: core error hierarchy
jobs: [error_classification]
"""

from __future__ import annotations


class AetherError(Exception):
    """Base of Aether's errors. ``code`` is stable; ``message`` is safe to show a client."""

    code = "internal_error"

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message


class ProviderError(AetherError):
    code = "provider_error"


class UpstreamUnavailable(ProviderError):
    code = "upstream_unavailable"


class UpstreamHTTPError(ProviderError):
    code = "upstream_http_error"

    def __init__(self, message: str, status: int) -> None:
        super().__init__(message)
        self.status = status


class UpstreamTimeout(ProviderError):
    code = "upstream_timeout"


class UpstreamDisconnected(ProviderError):
    code = "upstream_disconnected"


class UpstreamProtocolError(ProviderError):
    code = "upstream_protocol_error"


class PathUnavailable(AetherError):
    code = "path_unavailable"


class UnknownRequest(AetherError):
    code = "unknown_request"


class DuplicateRequest(AetherError):
    code = "duplicate_request"


class TooManyRequests(AetherError):
    code = "too_many_requests"


class ShuttingDown(AetherError):
    code = "shutting_down"


class StaleConfirmation(AetherError):
    code = "stale_confirmation"
