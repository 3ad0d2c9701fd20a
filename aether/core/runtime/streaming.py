"""ChatStreamer: picks the model and path for a request and runs it as the request's producer.

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
from aether.core.models import ModelCatalog, ServedModel
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
        catalog: ModelCatalog,
        oi: OIProvider | None = None,
    ) -> None:
        self.catalog = catalog
        self._oi = oi
        echo = EchoProvider(settings.echo_token_delay_s)
        # Each model's provider on each of its paths.
        self._providers: dict[tuple[str, PathName], Provider] = {}
        for model in catalog:
            for path in model.paths:
                provider: Provider = echo
                if path != "echo":
                    assert model.upstream is not None
                    provider = self._upstream_provider(settings, http_client, model, path)
                self._providers[(model.name, path)] = provider

    def _upstream_provider(
        self,
        settings: Settings,
        http_client: httpx.AsyncClient,
        model: ServedModel,
        path: PathName,
    ) -> Provider:
        upstream = model.upstream
        assert upstream is not None
        if path == "oi":
            if self._oi is None:
                raise PathUnavailable("the oi path needs the open-interpreter extra")
            return self._oi.serving(upstream)
        return HTTPProvider(
            http_client,
            base_url=upstream.base_url,
            model=upstream.model,
            api_key=upstream.api_key,
            first_token_timeout_s=settings.llm_first_token_timeout_s,
        )

    @property
    def oi(self) -> OIProvider | None:
        """The agentic path, when this server offers it."""
        return self._oi

    @property
    def default_path(self) -> str:
        return self.catalog.default.default_path

    @property
    def available_paths(self) -> list[str]:
        """The paths a chat can ask for (``auto`` always: it takes ``default_path``)."""
        served = self.catalog.paths
        return ["auto", *(path for path in ("echo", "http", "oi") if path in served)]

    async def forget_conversation(self, owner: str, conversation_id: str) -> None:
        """The conversation was deleted: the paths that keep state per conversation (the
        agentic path's interpreters) drop it."""
        if self._oi is not None:
            await self._oi.forget_conversation(owner, conversation_id)

    def select_provider(
        self, path: PathName, model: str | None = None
    ) -> tuple[ServedModel, Provider]:
        """The model and provider a chat asking for ``model`` (None: any) on ``path`` gets.
        Raises UnknownModel, or PathUnavailable when no model it may get serves the path."""
        served, path = self.catalog.resolve(model, path)
        return served, self._providers[(served.name, path)]

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
