"""RuntimeEngine: the one entry point the transports use to run, stop and track chats.

Resource handling: ``run`` (or ``start(nursery)``) owns the upstream HTTP client and a nursery
for requests that outlive their handler (SSE bodies); ``stop`` cancels every live request with
reason ``shutdown`` and then that nursery. A request started with ``run_chat`` lives in the
caller's task: a WebSocket connection's nursery, so a disconnect cancels all of its requests.

Error handling: provider failures arrive as an error chunk and become the request's ``error``
terminal; a failure of the relay itself is logged with its traceback and reported to the client
as ``internal_error``; ``trio.Cancelled`` always propagates.

@.architecture
role: runtime engine
jobs: [cancellation, cleanup, initialization, lifecycle_management, streaming_orchestration]
"""

from __future__ import annotations

import contextlib
import logging
import math
import secrets
from collections.abc import Awaitable, Callable
from dataclasses import replace

import trio

from aether.config import Settings
from aether.core.errors import (
    AetherError,
    PathUnavailable,
    ShuttingDown,
    TooManyRequests,
    UnknownRequest,
)
from aether.core.files import ConversationFiles
from aether.core.history.recorder import TurnRecorder
from aether.core.history.store import (
    HistoryStore,
    MessageStatus,
    StoredMessage,
)
from aether.core.metrics import Metrics
from aether.core.providers.base import Provider
from aether.core.providers.oi import OIProvider
from aether.core.providers.upstream_client import upstream_client
from aether.core.runtime.approval import ApprovalGate
from aether.core.runtime.chat import ChatRequest, Chunk, StopReason, error_chunk
from aether.core.runtime.file_chat import FileChat
from aether.core.runtime.interpreter import InterpreterManager, agentic_path_enabled
from aether.core.runtime.outbox import Outbox
from aether.core.runtime.relay import StreamRelay
from aether.core.runtime.request import RequestRecord, RequestState, RequestTracker
from aether.core.runtime.sandbox import require_sandbox
from aether.core.runtime.streaming import ChatStreamer

log = logging.getLogger(__name__)

# Chunks buffered between a producer and its relay. Small: a stop discards at most this many.
CHUNK_BUFFER = 8
# How an ended request's answer is stored.
ANSWER_STATUS: dict[RequestState, MessageStatus] = {
    "completed": "complete",
    "stopped": "stopped",
    "error": "error",
    "running": "interrupted",
}
# A new conversation's title: the start of its first message.
TITLE_CHARS = 60
# A detached chat (SSE) whose reader has not started by then is stopped: its client is gone.
READER_ATTACH_TIMEOUT_S = 10.0


def new_conversation_id() -> str:
    return "c-" + secrets.token_hex(8)


class RuntimeEngine:
    def __init__(
        self,
        settings: Settings,
        metrics: Metrics | None = None,
        history: HistoryStore | None = None,
    ) -> None:
        self.settings = settings
        self.metrics = metrics or Metrics()
        self._history = history
        self.tracker = RequestTracker()
        self._streamer: ChatStreamer | None = None
        self._nursery: trio.Nursery | None = None
        self._stopped = trio.Event()
        self._draining = False
        self._interpreters: InterpreterManager | None = None
        # (owner, conversation id) -> set when the latest turn's answer is finally saved
        self._saving_turns: dict[tuple[str, str], trio.Event] = {}
        files = ConversationFiles(
            settings.files_root,
            max_bytes=settings.max_file_bytes,
            max_files=settings.max_files_per_conversation,
            extensions=settings.file_types,
        )
        self.file_chat = FileChat(files, history, self._agentic_path_available)

    def _agentic_path_available(self) -> bool:
        return self._streamer is not None and "oi" in self._streamer.available_paths

    @property
    def started(self) -> bool:
        return self._streamer is not None and not self._stopped.is_set()

    @property
    def streamer(self) -> ChatStreamer:
        if self._streamer is None:
            raise RuntimeError("the engine is not started")
        return self._streamer

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Run the engine until ``stop``: upstream client, streamer, detached request nursery."""
        if self._history is not None:
            await self._history.open()
        try:
            await self._serve(task_status)
        finally:
            if self._history is not None:
                await self._history.close()
        log.info("engine stopped")

    @property
    def history(self) -> HistoryStore | None:
        return self._history

    async def _oi_provider(self) -> OIProvider | None:
        if not agentic_path_enabled(self.settings):
            return None
        sandbox = await trio.to_thread.run_sync(require_sandbox, self.settings)
        if sandbox is not None:
            network = "on" if sandbox.network else "off"
            log.info("approved code runs in a bubblewrap sandbox (network %s)", network)
        else:
            log.warning(
                "AETHER_OI_SANDBOX=none: approved code runs UNSANDBOXED, with the server's "
                "rights: it can read the API keys in its environment, the history database and "
                "every caller's files"
            )
        self._interpreters = InterpreterManager(self.settings, self.file_chat.files, sandbox)

        def approval_for(request: ChatRequest) -> ApprovalGate | None:
            record = self.tracker.get_live(request.id, request.owner)
            return None if record is None else record.approval

        if self.settings.oi_auto_run:
            log.warning(
                "AETHER_OI_AUTO_RUN is on: code the model writes runs WITHOUT asking anyone"
            )
        files = self.file_chat.files if self._history is not None else None
        return OIProvider(self._interpreters, approval_for, files)

    def approve(self, request_id: str, owner: str, confirmation_id: str, approved: bool) -> None:
        """Answer a running request's code confirmation ``confirmation_id``. Raises
        UnknownRequest, or StaleConfirmation when that confirmation is not the pending one."""
        record = self.tracker.get_live(request_id, owner)
        if record is None:
            raise UnknownRequest(f"no running request with id {request_id!r}")
        record.approval.answer(confirmation_id, approved)
        record.note(f"code {'approved' if approved else 'denied'} ({confirmation_id})")

    async def _serve(self, task_status: trio.TaskStatus[None]) -> None:
        try:
            async with upstream_client(self.settings) as client, trio.open_nursery() as nursery:
                self._streamer = ChatStreamer(self.settings, client, await self._oi_provider())
                self._nursery = nursery
                log.info("engine started; default path: %s", self._streamer.default_path)
                task_status.started()
                await self._stopped.wait()
                nursery.cancel_scope.cancel()
        finally:
            # Also when the server's lifespan is cancelled while the client closes: the
            # interpreters' kernels (and their sandboxes) end with the server.
            self._nursery = None
            if self._interpreters is not None:
                await self._interpreters.close()

    async def start(self, nursery: trio.Nursery) -> None:
        await nursery.start(self.run)

    @property
    def draining(self) -> bool:
        return self._draining

    def begin_drain(self) -> None:
        """Start no new chat from now on (graceful shutdown); running ones carry on."""
        self._draining = True

    def stop(self) -> None:
        """Cancel every live request (reason ``shutdown``) and end ``run``."""
        self.tracker.cancel_all("shutdown")
        self._stopped.set()

    def stop_generation(self, request_id: str, owner: str, reason: StopReason = "stop") -> None:
        """Stop a live request: cancels its scope. Raises UnknownRequest if not live for owner."""
        self.tracker.cancel_request(request_id, owner, reason)

    async def run_chat(
        self,
        request: ChatRequest,
        outbox: Outbox,
        *,
        task_status: trio.TaskStatus[RequestRecord] = trio.TASK_STATUS_IGNORED,
    ) -> RequestRecord:
        """Run one chat request to its terminal message, inside its own nursery and scope.

        Raises, before ``task_status.started``: DuplicateRequest if the id is already live,
        TooManyRequests if the caller runs as many chats as it may, ShuttingDown while draining.
        """
        if self._draining:
            raise ShuttingDown("the server is shutting down and starts no new chat")
        limit = self.settings.max_requests_per_caller
        if self.tracker.live_count_for(request.owner) >= limit:
            raise TooManyRequests(f"at most {limit} chats may run at once for one caller")
        provider: Provider | PathUnavailable
        try:
            provider = self.streamer.select_provider(request.path)
        except PathUnavailable as exc:
            provider = exc
        path = provider.name if not isinstance(provider, PathUnavailable) else request.path
        record = self.tracker.start_request(request.id, request.owner, path)
        recorder: TurnRecorder | None = None
        relay = StreamRelay(request.id, outbox)
        in_flight = self.metrics.requests_in_flight.labels(path)
        in_flight.inc()
        task_status.started(record)
        state: RequestState = "stopped"
        failure: Chunk | None = None

        def seal() -> None:
            """Queue the request's terminal (once), after publishing its pending save."""
            if relay.finished:
                return
            if recorder is not None:
                # Published before the terminal is queued: a follow-up the client sends on
                # seeing it then waits for this answer's save. A turn still streaming is not
                # waited for (its answer is not part of a concurrent turn's context).
                self._saving_turns[recorder.conversation_key] = recorder.saved
            if state == "completed":
                relay.finish({"role": "server", "type": "completion"})
            elif state == "error":
                relay.finish(failure or relay.error or {})
            else:
                reason = record.stop_reason or "disconnect"
                relay.finish({"role": "server", "type": "stopped", "reason": reason})
            # What the client was told; the record stays live until the request's tasks end.
            record.state = state

        try:
            with record.cancel_scope:
                if self._history is not None:
                    request, recorder = await self._open_turn(request)
                    relay.transcript = recorder.transcript
                accepted: Chunk = {"path": path}
                if request.conversation_id is not None:
                    accepted["conversation_id"] = request.conversation_id
                await relay.announce(accepted)
                async with trio.open_nursery() as nursery:
                    if recorder is not None:
                        self._spawn(recorder.run)
                        nursery.start_soon(recorder.check_start)
                    send, receive = trio.open_memory_channel[Chunk](CHUNK_BUFFER)
                    nursery.start_soon(self.streamer.stream_chat, request, provider, send)
                    async with receive:
                        try:
                            await relay.relay_stream(receive)
                        finally:
                            if record.cancel_scope.cancel_called:
                                # Stopped: the terminal leaves now, while the producer closes
                                # its upstream stream (the nursery waits for that). Nothing of
                                # this request can follow it: the relay reads no more.
                                seal()
                    # The nursery also waits for the recorder's start check: an answer that
                    # outran a failed start still ends with storage_error, never "completion".
                if not relay.finished:  # else it was stopped, and the client was told so
                    state = "error" if relay.error is not None else "completed"
        except* trio.BrokenResourceError:
            # The client's writer is gone: the client left while this request streamed.
            record.stop_reason = record.stop_reason or "disconnect"
        except* AetherError as group:
            error = group.exceptions[0]
            assert isinstance(error, AetherError)
            log.warning("request %s: %s: %s", request.id, error.code, error.message)
            state = "error"
            failure = error_chunk(error.code, error.message)
        except* Exception as group:
            log.error("request %s: relay failed", request.id, exc_info=group)
            state = "error"
            failure = error_chunk(
                AetherError.code, "the server failed while streaming this request"
            )
        finally:
            seal()
            state = record.state  # the outcome the client was told, also if told early
            record.note(f"relayed {relay.chunks_relayed} chunks")
            if recorder is not None:
                error_code = (failure or relay.error or {}).get("code")
                await recorder.finish(ANSWER_STATUS[state], error_code)
                if self._saving_turns.get(recorder.conversation_key) is recorder.saved:
                    del self._saving_turns[recorder.conversation_key]
            self.tracker.end_request(record, state)
            in_flight.dec()
            self._observe(record, relay, failure or relay.error)
        return record

    async def _open_turn(self, request: ChatRequest) -> tuple[ChatRequest, TurnRecorder]:
        """Name the request's conversation and load its context. Only reads happen here, on
        the store's reader: the turn itself is written beside the stream by the recorder.
        Conversation ids are the caller's own: a named one the caller does not have yet is
        new, whoever else has a conversation of that id."""
        assert self._history is not None
        conversation_id = request.conversation_id
        context: list[StoredMessage] = []
        if conversation_id is None:
            conversation_id = new_conversation_id()
        else:
            # A follow-up sent the moment the previous answer's terminal arrived must see that
            # answer: wait (cancellably) until its final save is done.
            previous = self._saving_turns.get((request.owner, conversation_id))
            if previous is not None:
                await previous.wait()
            context = await self._history.context(
                request.owner, conversation_id, self.settings.history_context_messages
            )
        # Stored context, if any; else whatever context the transport gave (OpenAI clients
        # send the whole conversation with every request).
        history = tuple((m.role, m.content) for m in context) if context else request.history
        request = replace(request, conversation_id=conversation_id, history=history)
        recorder = TurnRecorder(
            self._history,
            request.owner,
            conversation_id,
            request.message[:TITLE_CHARS],
            request.id,
            request.message,
        )
        return request, recorder

    def _observe(self, record: RequestRecord, relay: StreamRelay, error: Chunk | None) -> None:
        metrics = self.metrics
        metrics.requests.labels(record.path, record.state).inc()
        metrics.deltas_relayed.inc(relay.chunks_relayed)
        if relay.first_content_at is not None:
            ttft = relay.first_content_at - record.started_at
            metrics.time_to_first_token.labels(record.path).observe(ttft)
        if record.cancel_requested_at is not None and record.ended_at is not None:
            reason = record.stop_reason or "stop"
            latency = record.ended_at - record.cancel_requested_at
            metrics.stop_latency.labels(reason).observe(latency)
        if record.state == "error" and error is not None:
            code = str(error.get("code", ""))
            if code.startswith("upstream_"):
                metrics.upstream_errors.labels(code).inc()

    def _spawn(self, fn: Callable[[], Awaitable[None]]) -> None:
        """Run a helper of a request in the engine's nursery (it outlives the request's)."""
        if self._nursery is None:
            raise RuntimeError("the engine is not started")
        self._nursery.start_soon(fn)

    async def start_detached_chat(self, request: ChatRequest, outbox: Outbox) -> RequestRecord:
        """Run a chat in the engine's nursery, for a transport whose handler must return first
        (an SSE body is iterated after the handler returns). The caller must stop the request
        if it stops reading."""
        if self._nursery is None:
            raise RuntimeError("the engine is not started")
        record: RequestRecord = await self._nursery.start(self._run_detached, request, outbox)
        self._nursery.start_soon(self._stop_if_unread, record, outbox)
        return record

    async def _stop_if_unread(self, record: RequestRecord, outbox: Outbox) -> None:
        """Stop a detached chat nobody started reading: its client left before the transport
        began the response, so no reader will ever run the cleanup."""
        with trio.move_on_after(READER_ATTACH_TIMEOUT_S):
            await outbox.reader_attached.wait()
            return
        log.info("request %s: no reader came: stopping it", record.id)
        with contextlib.suppress(UnknownRequest):
            self.tracker.cancel_request(record.id, record.owner, "disconnect")

    async def _run_detached(
        self, request: ChatRequest, outbox: Outbox, *, task_status: trio.TaskStatus[RequestRecord]
    ) -> None:
        try:
            await self.run_chat(request, outbox, task_status=task_status)
        finally:
            outbox.finish()

    async def wait_idle(self, timeout_s: float = math.inf) -> bool:
        """Wait until no request is live (graceful shutdown). False if the timeout passed."""
        with trio.move_on_after(timeout_s):
            await self.tracker.wait_until_idle()
            return True
        return False
