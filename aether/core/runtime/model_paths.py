"""The model paths a server offers, opened for its life: the upstream HTTP client (the HTTP
path) and, when enabled, Open Interpreter (the agentic path), behind one ``ChatStreamer``.

The application opens them (``aether.app``) and hands the streamer to the engine, which only
runs chats on them. Opening checks the sandbox the agentic path needs (and says how approved
code will run); closing ends every interpreter's kernel, and its sandbox, with the server.

@.architecture
role: model paths
jobs: [initialization, lifecycle_management, path_selection]
"""

from __future__ import annotations

import logging
import os
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import httpx
import trio

from aether.config import Settings
from aether.core.chat import ChatRequest
from aether.core.files import ConversationFiles
from aether.core.models import catalog_from_settings
from aether.core.providers.oi.approval import ApprovalGate
from aether.core.providers.oi.interpreters import (
    InterpreterManager,
    agentic_path_enabled,
    oi_installed,
)
from aether.core.providers.oi.provider import OIProvider
from aether.core.providers.oi.sandbox import Sandbox, require_sandbox
from aether.core.providers.upstream_client import upstream_client
from aether.core.runtime.request import RequestTracker
from aether.core.runtime.streaming import ChatStreamer

log = logging.getLogger(__name__)


@asynccontextmanager
async def open_model_paths(
    settings: Settings,
    tracker: RequestTracker,
    files: ConversationFiles,
    history: bool,
) -> AsyncIterator[ChatStreamer]:
    """The streamer over every configured path. ``tracker`` finds a running chat's code
    confirmation for the agentic path; ``files`` are the conversations' files (given to the
    model only with ``history``: without it no conversation outlives its turn)."""
    interpreters: InterpreterManager | None = None
    try:
        oi: OIProvider | None = None
        if agentic_path_enabled(settings):
            interpreters = InterpreterManager(settings, files, await _sandbox(settings))
            await interpreters.prepare()  # before the server says it is ready
            oi = _oi_provider(settings, interpreters, tracker, files if history else None)
        catalog = catalog_from_settings(settings, os.environ, oi_installed())
        async with upstream_client(settings) as client:
            yield ChatStreamer(settings, client, catalog, oi)
    finally:
        # Also when the server's lifespan is cancelled while the client closes.
        if interpreters is not None:
            await interpreters.close()


async def _sandbox(settings: Settings) -> Sandbox | None:
    sandbox = await trio.to_thread.run_sync(require_sandbox, settings)
    if sandbox is not None:
        network = "on" if sandbox.network else "off"
        log.info("approved code runs in a bubblewrap sandbox (network %s)", network)
    else:
        log.warning(
            "AETHER_OI_SANDBOX=none: approved code runs UNSANDBOXED, with the server's "
            "rights: it can read the API keys in its environment, the history database and "
            "every caller's files"
        )
    return sandbox


def _oi_provider(
    settings: Settings,
    interpreters: InterpreterManager,
    tracker: RequestTracker,
    files: ConversationFiles | None,
) -> OIProvider:
    def approval_for(request: ChatRequest) -> ApprovalGate | None:
        record = tracker.get_live(request.id, request.owner)
        return None if record is None else record.approval

    if settings.oi_auto_run:
        log.warning("AETHER_OI_AUTO_RUN is on: code the model writes runs WITHOUT asking anyone")
    timeouts = httpx.Timeout(settings.llm_read_timeout_s, connect=settings.llm_connect_timeout_s)
    return OIProvider(interpreters, approval_for, files, timeouts)
