"""ChatStreamer: picks the model path for a request and runs it as the request's producer.

The producer owns the send side of the request's channel: it closes it when the turn ends, and
turns every failure into one error chunk, so the relay always sees a clean end of stream.

@.architecture
role: chat streamer
jobs: [error_handling, path_selection, stream_generation]
"""

from __future__ import annotations

import logging

import httpx
import trio

from aether.config import Settings
from aether.core.chat import ChatRequest, PathName, error_chunk
from aether.core.chunk_channel import ChunkSender
from aether.core.errors import PathUnavailable, ProviderError
from aether.core.providers.base import Provider
from aether.core.providers.echo import EchoProvider
from aether.core.providers.http import HTTPProvider
from aether.core.providers.oi.provider import OIProvider

log = logging.getLogger(__name__)


class ChatStreamer:
    def __init__(
        self,
        settings: Settings,
        http_client: httpx.AsyncClient,
        oi: OIProvider | None = None,
    ) -> None:
        self._echo = EchoProvider(settings.echo_token_delay_s)
        self._oi = oi
        self._http: HTTPProvider | None = None
        if settings.llm_base_url is not None and settings.llm_model is not None:
            key = settings.llm_api_key.get_secret_value() if settings.llm_api_key else None
            self._http = HTTPProvider(
                http_client,
                base_url=settings.llm_base_url,
                model=settings.llm_model,
                api_key=key,
                first_token_timeout_s=settings.llm_first_token_timeout_s,
            )
        self._default: Provider = self._echo
        if settings.provider == "oi" or (settings.provider == "auto" and self._oi and self._http):
            if self._oi is None:
                raise PathUnavailable("provider 'oi' needs the open-interpreter extra")
            self._default = self._oi
        elif settings.provider == "http" or (settings.provider == "auto" and self._http):
            if self._http is None:
                raise PathUnavailable("provider 'http' needs llm_base_url and llm_model")
            self._default = self._http

    @property
    def default_path(self) -> str:
        return self._default.name

    @property
    def available_paths(self) -> list[str]:
        """The paths a chat can ask for (``auto`` always: it takes ``default_path``)."""
        paths = ["auto", "echo"]
        if self._http is not None:
            paths.append("http")
        if self._oi is not None:
            paths.append("oi")
        return paths

    async def forget_conversation(self, owner: str, conversation_id: str) -> None:
        """The conversation was deleted: the paths that keep state per conversation (the
        agentic path's interpreters) drop it."""
        if self._oi is not None:
            await self._oi.forget_conversation(owner, conversation_id)

    def select_provider(self, path: PathName) -> Provider:
        """The provider for a requested path. Raises PathUnavailable when it is not configured."""
        if path == "auto":
            return self._default
        if path == "http":
            if self._http is None:
                raise PathUnavailable("the http path needs a model: set AETHER_LLM_BASE_URL")
            return self._http
        if path == "echo":
            return self._echo
        if path == "oi" and self._oi is not None:
            return self._oi
        raise PathUnavailable(f"the {path} path is not available on this server")

    async def stream_chat(
        self,
        request: ChatRequest,
        provider: Provider | PathUnavailable,
        send: ChunkSender,
    ) -> None:
        """Produce the request's chunks into ``send``, ending with an error chunk on failure."""
        try:
            if isinstance(provider, PathUnavailable):
                await send.send(error_chunk(provider.code, provider.message))
                return
            try:
                await provider.stream(request, send)
            except (trio.BrokenResourceError, trio.ClosedResourceError):
                # The relay is gone (its client left or was closed by the server): the request
                # is ending already, and the provider has closed what it opened.
                log.debug("request %s: relay gone, producer stops", request.id)
            except ProviderError as exc:
                log.warning("request %s: %s: %s", request.id, exc.code, exc.message)
                await send.send(error_chunk(exc.code, exc.message))
            except Exception:
                log.exception("request %s: provider %s failed", request.id, provider.name)
                await send.send(error_chunk("internal_error", "the model path failed"))
        finally:
            send.close()  # no checkpoint: the turn's end needs no extra scheduling round
