"""The HTTP path: an OpenAI-compatible ``POST {base_url}/chat/completions`` with ``stream: true``.

Works with OpenAI, vLLM, Ollama, llama.cpp's server and LM Studio. Every upstream failure becomes a
``ProviderError`` with a stable code; a cancelled request closes the upstream stream at once
(leaving ``client.stream(...)`` closes the response, and an unfinished response never returns
its connection to the pool, so the upstream sees the connection close).

@.architecture
role: OpenAI-compatible HTTP provider
jobs: [http_communication, stream_generation, error_handling]
"""

from __future__ import annotations

import logging
import math
from collections.abc import AsyncIterable
from typing import Any

import httpx
import trio

from aether.core.chat import ChatRequest, block_delta, block_end, block_start
from aether.core.chunk_channel import ChunkSender
from aether.core.errors import (
    UpstreamDisconnected,
    UpstreamHTTPError,
    UpstreamProtocolError,
    UpstreamTimeout,
    UpstreamUnavailable,
)
from aether.core.providers.sse import DONE, SSEDecoder, parse_event

# How long the rest of a response is read after its [DONE].
AFTER_DONE_GRACE_S = 1.0
# Asks for the stream's token counts, sent in a last chunk before [DONE].
USAGE_OPTIONS = {"include_usage": True}

log = logging.getLogger(__name__)


class HTTPProvider:
    name = "http"

    def __init__(
        self,
        client: httpx.AsyncClient,
        *,
        base_url: str,
        model: str,
        api_key: str | None,
        first_token_timeout_s: float,
    ) -> None:
        self._client = client
        self._url = f"{base_url}/chat/completions"
        self._model = model
        # An uncompressed answer is read straight from the transport (see _body_chunks);
        # compressing a stream of small events saves little and can delay them.
        self._headers = {"Accept": "text/event-stream", "Accept-Encoding": "identity"}
        if api_key:
            self._headers["Authorization"] = f"Bearer {api_key}"
        self._first_token_timeout_s = first_token_timeout_s
        # The stream's token counts are asked for (``stream_options``) until the upstream
        # refuses the field: an older server may answer 400 to what it does not know.
        self._ask_usage = True

    async def stream(self, request: ChatRequest, send: ChunkSender) -> None:
        body: dict[str, Any] = {
            "model": self._model,
            "messages": [
                *({"role": role, "content": content} for role, content in request.history),
                {"role": "user", "content": request.message},
            ],
            "stream": True,
        }
        # Until the first event arrives the whole exchange (connect, headers, first chunk) is
        # bounded by one deadline; after it, httpx's read timeout bounds each silence.
        first_token = trio.CancelScope(deadline=trio.current_time() + self._first_token_timeout_s)
        try:
            with first_token:
                asked_usage = self._ask_usage
                if asked_usage:
                    body["stream_options"] = USAGE_OPTIONS
                if not await self._try_stream(body, send, first_token, retry=asked_usage):
                    del body["stream_options"]
                    await self._try_stream(body, send, first_token, retry=False)
                    self._ask_usage = False
                    log.warning(
                        "the upstream of model %s refused stream_options: its token counts "
                        "are estimated from now on",
                        self._model,
                    )
        except httpx.ConnectTimeout:
            raise UpstreamUnavailable("timed out connecting to the upstream model") from None
        except httpx.ConnectError:
            raise UpstreamUnavailable("could not connect to the upstream model") from None
        except httpx.TimeoutException:
            raise UpstreamTimeout("the upstream model stopped sending") from None
        except (httpx.RemoteProtocolError, httpx.ReadError, httpx.WriteError):
            raise UpstreamDisconnected(
                "the upstream closed the stream before it finished"
            ) from None
        if first_token.cancelled_caught:
            raise UpstreamTimeout(
                f"no first token from the upstream within {self._first_token_timeout_s:g} s"
            )

    async def _try_stream(
        self, body: dict[str, Any], send: ChunkSender, first_token: trio.CancelScope, retry: bool
    ) -> bool:
        """Stream one answer; False, with nothing sent, when ``retry`` allows the request to be
        made again without ``stream_options`` (the upstream called it invalid)."""
        async with self._client.stream(
            "POST", self._url, json=body, headers=self._headers
        ) as response:
            status = response.status_code
            if retry and status in (400, 422):
                return False
            if status >= 400:
                raise UpstreamHTTPError(f"the upstream answered HTTP {status}", status)
            await self._relay_events(response, send, first_token)
        return True

    async def _relay_events(
        self,
        response: httpx.Response,
        send: ChunkSender,
        first_token: trio.CancelScope,
    ) -> None:
        state = _StreamState(send, first_token)
        # After [DONE] the rest is read only briefly: servers close right after it, and reading
        # to the end lets httpx's nested generators finish instead of being left for the GC; a
        # server that keeps the response open does not turn a whole answer into a timeout.
        with trio.CancelScope() as tail:
            async for raw in _body_chunks(response):
                await state.relay(state.decoder.feed(raw))
                if state.done and tail.deadline == math.inf:
                    tail.deadline = trio.current_time() + AFTER_DONE_GRACE_S
            await state.relay(state.decoder.flush())
        # Some servers omit [DONE]; a finish_reason is then the sign the answer is whole.
        if not state.done and not state.finished:
            raise UpstreamDisconnected("the upstream ended the stream without [DONE]")
        if state.started:
            await send.send(block_end())


def _body_chunks(response: httpx.Response) -> AsyncIterable[bytes]:
    """The response body as it arrives. Uncompressed (as asked for), it is the transport's own
    stream: httpx's decoding and re-chunking layers cost about a quarter of each read. The
    response's context manager still closes it."""
    stream = response.stream
    identity = response.headers.get("content-encoding", "identity") == "identity"
    if identity and isinstance(stream, httpx.AsyncByteStream):
        return stream
    return response.aiter_bytes()


class _StreamState:
    """What one upstream stream has produced so far."""

    __slots__ = ("decoder", "done", "finished", "first_token", "send", "started")

    def __init__(self, send: ChunkSender, first_token: trio.CancelScope) -> None:
        self.decoder = SSEDecoder()
        self.send = send
        self.first_token = first_token
        self.started = self.finished = self.done = False

    async def relay(self, events: list[bytes]) -> None:
        """Send the text of the events one read of the socket brought, as one delta: they
        arrived together, so merging them delays nothing and saves a trip through the relay,
        the outbox and the client's socket for each."""
        if not events or self.done:
            return
        self.first_token.deadline = math.inf
        texts: list[str] = []
        try:
            for data in events:
                if data == DONE:
                    self.done = True
                    break
                content, last, usage = parse_event(data)
                self.finished = self.finished or last
                if usage is not None:
                    self.send.usage.report(usage)
                if content:
                    texts.append(content)
        except UpstreamProtocolError:
            await self._send_text(texts)  # what came before the bad event still counts
            raise
        await self._send_text(texts)

    async def _send_text(self, texts: list[str]) -> None:
        if not texts:
            return
        if not self.started:
            self.started = True
            await self.send.send(block_start())
        delta = block_delta(texts[0] if len(texts) == 1 else "".join(texts))
        # No yield while the channel has room (ChunkSender): chunks httpx already holds reach
        # the relay together and leave as one coalesced frame.
        await self.send.send(delta)
