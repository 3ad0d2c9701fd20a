"""The agentic path's upstream failures, as the HTTP path names them.

Open Interpreter asks the model through LiteLLM, which wraps the OpenAI SDK, which wraps httpx:
a refused connection arrives as LiteLLM's ``InternalServerError`` (status 500) caused by
``openai.APIConnectionError`` caused by ``httpx.ConnectError``; a connection reset mid-answer as
``MidStreamFallbackError`` caused by ``httpx.ReadError``. The outermost class says little, so
the cause chain is read down to what happened, and the failure gets the code, status and words
the HTTP path gives the same failure.

@.architecture
role: agentic upstream errors
jobs: [error_handling, error_classification]
"""

from __future__ import annotations

import json
from collections.abc import Iterator

import httpx

from aether.core.errors import (
    ProviderError,
    UpstreamDisconnected,
    UpstreamHTTPError,
    UpstreamProtocolError,
    UpstreamTimeout,
    UpstreamUnavailable,
)


def upstream_error(exc: BaseException, answered: bool, read_timeout_s: float) -> ProviderError:
    """The ProviderError ``exc`` (raised by a model call, or while reading its stream) stands
    for; ``answered``: the stream had given a chunk before."""
    causes = list(_chain(exc))
    for cause in causes:
        if isinstance(cause, ProviderError):
            return cause
    for cause in causes:
        if isinstance(cause, httpx.ConnectTimeout):
            return UpstreamUnavailable("timed out connecting to the upstream model")
        if isinstance(cause, httpx.ConnectError):
            return UpstreamUnavailable("could not connect to the upstream model")
        if isinstance(cause, httpx.TimeoutException):
            if answered:
                return UpstreamTimeout("the upstream model stopped sending")
            return UpstreamTimeout(f"no first token from the upstream within {read_timeout_s:g} s")
        if isinstance(cause, httpx.HTTPStatusError):
            status = cause.response.status_code
            return UpstreamHTTPError(f"the upstream answered HTTP {status}", status)
        if isinstance(cause, (httpx.RemoteProtocolError, httpx.ReadError, httpx.WriteError)):
            return UpstreamDisconnected("the upstream closed the stream before it finished")
        if isinstance(cause, json.JSONDecodeError):
            return UpstreamProtocolError("the upstream sent an event that is not JSON")
    if _named(causes, "APIError"):  # the OpenAI SDK's: an error event inside the stream
        return UpstreamProtocolError("the upstream reported an error inside the stream")
    return UpstreamUnavailable(f"the model failed: {exc.__class__.__name__}")


def _chain(exc: BaseException) -> Iterator[BaseException]:
    """``exc`` and its causes, outermost first (each once)."""
    seen: set[int] = set()
    current: BaseException | None = exc
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        yield current
        current = current.__cause__ or current.__context__


def _named(causes: list[BaseException], name: str) -> bool:
    return any(
        type(cause).__name__ == name and type(cause).__module__.startswith("openai")
        for cause in causes
    )
