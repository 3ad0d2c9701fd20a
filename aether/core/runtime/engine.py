"""RuntimeEngine: the one entry point the transports use to run, stop and track chats.

A thin facade: admission (draining, the per-caller limit, the path) and then a ``ChatTurn``
(``core/runtime/turn.py``) runs each chat; the tracker holds the live ones, the streamer the
paths, ``TurnHistory`` the store's side of a turn.

Resource handling: ``run`` (or ``start(nursery, model_paths)``) holds the model paths the
application opened for it (``core/runtime/model_paths.py``: the upstream HTTP client, Open
Interpreter) and a nursery for requests that outlive their handler (SSE bodies through Quart);
``stop`` cancels every live request with reason ``shutdown`` and then that nursery. A chat
admitted with ``admit`` runs in the caller's task (``turn.run()``): a WebSocket connection's
nursery, so a disconnect cancels all of its chats. ``run`` also runs the history's answer
writer, and lets it store what is queued before the store closes.

@.architecture
role: runtime engine
jobs: [cancellation, cleanup, initialization, lifecycle_management, streaming_orchestration]
"""

from __future__ import annotations

import contextlib
import logging
import math
from collections.abc import Callable
from contextlib import AbstractAsyncContextManager
from dataclasses import replace

import trio

from aether.config import Settings
from aether.core.chat import ChatRequest, StopReason
from aether.core.control.plane import ControlPlane, LocalControlPlane, StreamSource
from aether.core.errors import (
    PathUnavailable,
    ShuttingDown,
    UnknownRequest,
)
from aether.core.files import ConversationFiles
from aether.core.history.store import (
    HistoryStore,
)
from aether.core.history.turns import TurnHistory, new_conversation_id
from aether.core.metrics import Metrics
from aether.core.providers.base import Provider
from aether.core.runtime.file_chat import FileChat
from aether.core.runtime.model_paths import open_model_paths
from aether.core.runtime.outbox import Outbox
from aether.core.runtime.outlet import Attachment, RequestOutlet
from aether.core.runtime.request import RequestRecord, RequestTracker
from aether.core.runtime.resumable import ResumableChats
from aether.core.runtime.resumed_streams import AttachedStream, RemoteAttachment
from aether.core.runtime.streaming import ChatStreamer
from aether.core.runtime.turn import ChatTurn, TurnServices

log = logging.getLogger(__name__)

# The model paths the engine runs chats on, opened for its life (``open_model_paths``).
ModelPaths = AbstractAsyncContextManager[ChatStreamer]

# A detached chat (SSE) whose reader has not started by then is stopped: its client is gone.
READER_ATTACH_TIMEOUT_S = 10.0


class RuntimeEngine:
    def __init__(
        self,
        settings: Settings,
        metrics: Metrics | None = None,
        history: HistoryStore | None = None,
        control: ControlPlane | None = None,
    ) -> None:
        self.settings = settings
        self.metrics = metrics or Metrics()
        self._history = history
        self.tracker = RequestTracker()
        # What the workers share; by default this worker is the whole server.
        self.control: ControlPlane = control or LocalControlPlane(self.tracker.live_count_for)
        self._streamer: ChatStreamer | None = None
        self._services: TurnServices | None = None
        self._nursery: trio.Nursery | None = None
        self._stopped = trio.Event()
        self._draining = False
        # Chats a client may come back for (resume), running or recently ended.
        self.resumable = ResumableChats(
            settings.resume_grace_s, settings.resume_retention_s, self._stop_vanished
        )
        self._turn_history = (
            TurnHistory(history, settings.history_context_messages) if history is not None else None
        )
        files = ConversationFiles(
            settings.files_root,
            max_bytes=settings.max_file_bytes,
            max_files=settings.max_files_per_conversation,
            extensions=settings.file_types,
            archive=history.files_archive if history is not None else None,
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

    async def run(
        self,
        model_paths: ModelPaths | None = None,
        *,
        task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED,
    ) -> None:
        """Run the engine until ``stop``: its model paths, the detached request nursery."""
        if self._history is not None:
            await self._history.open()
        upkeep = trio.CancelScope()
        try:
            async with trio.open_nursery() as writing:
                if self._history is not None:
                    writing.start_soon(self._keep_up, self._history, upkeep)
                if self._turn_history is not None:
                    writing.start_soon(self._turn_history.writer.run)
                try:
                    await self._serve(model_paths, task_status)
                finally:
                    # The answers' writer stores what is queued, then ends: before the close.
                    if self._turn_history is not None:
                        self._turn_history.writer.close()
                    upkeep.cancel()
        finally:
            if self._history is not None:
                await self._history.close()
        log.info("engine stopped")

    @staticmethod
    async def _keep_up(history: HistoryStore, scope: trio.CancelScope) -> None:
        with scope:
            await history.maintain()

    @property
    def history(self) -> HistoryStore | None:
        return self._history

    async def forget_conversation(self, owner: str, conversation_id: str) -> None:
        """A conversation was deleted from the history: its interpreter (which remembers it)
        and its files go too, here and on every other worker. Raises what deleting the files
        raises (an AetherError)."""
        self.control.conversation_deleted(owner, conversation_id)
        await self.forget_local(owner, conversation_id)

    async def forget_local(self, owner: str, conversation_id: str) -> None:
        """Drop what this worker keeps of a deleted conversation."""
        if self._streamer is not None:
            await self._streamer.forget_conversation(owner, conversation_id)
        await self.file_chat.delete_conversation(owner, conversation_id)

    def approve(self, request_id: str, owner: str, confirmation_id: str, approved: bool) -> None:
        """Answer a code confirmation of a request this worker runs. Raises UnknownRequest, or
        StaleConfirmation when that confirmation is not the pending one."""
        record = self.tracker.get_live(request_id, owner)
        if record is None:
            raise UnknownRequest(f"no running request with id {request_id!r}")
        record.approval.answer(confirmation_id, approved)
        record.note(f"code {'approved' if approved else 'denied'} ({confirmation_id})")

    async def approve_anywhere(
        self, request_id: str, owner: str, confirmation_id: str, approved: bool
    ) -> None:
        """``approve``, for a request any worker runs. Raises as ``approve`` does, and
        ControlPlaneUnavailable when another worker may run it but cannot be asked."""
        try:
            self.approve(request_id, owner, confirmation_id, approved)
        except UnknownRequest:
            await self.control.approve_elsewhere(request_id, owner, confirmation_id, approved)

    # What the control plane asks of this worker for the others (``WorkerCommands``).
    def stop_local(self, request_id: str, owner: str, reason: StopReason) -> None:
        self.stop_generation(request_id, owner, reason)

    def approve_local(
        self, request_id: str, owner: str, confirmation_id: str, approved: bool
    ) -> None:
        self.approve(request_id, owner, confirmation_id, approved)

    def live_requests(self) -> list[tuple[str, str]]:
        return [(record.owner, record.id) for record in self.tracker.live()]

    async def wait_saved(self, owner: str, conversation_id: str) -> None:
        if self._turn_history is not None:
            await self._turn_history.wait_saved(owner, conversation_id)

    async def _serve(
        self, model_paths: ModelPaths | None, task_status: trio.TaskStatus[None]
    ) -> None:
        if model_paths is None:  # an engine on its own (tests): the paths its settings name
            model_paths = open_model_paths(
                self.settings, self.tracker, self.file_chat.files, self._history is not None
            )
        try:
            async with model_paths as streamer, trio.open_nursery() as nursery:
                await nursery.start(self.control.run, self)
                await nursery.start(self.resumable.run)
                self._streamer = streamer
                self._nursery = nursery
                log.info("engine started; default path: %s", streamer.default_path)
                task_status.started()
                await self._stopped.wait()
                nursery.cancel_scope.cancel()
        finally:
            self._nursery = None

    async def start(self, nursery: trio.Nursery, model_paths: ModelPaths | None = None) -> None:
        """Run the engine in ``nursery`` on ``model_paths`` (opened by the engine, and closed
        when it stops); by default, the paths its settings name."""
        await nursery.start(self.run, model_paths)

    @property
    def draining(self) -> bool:
        return self._draining

    def begin_drain(self) -> None:
        """Start no new chat from now on (graceful shutdown); running ones carry on."""
        self._draining = True

    @property
    def live_count(self) -> int:
        """How many chats are running."""
        return self.tracker.live_count

    def stop_all(self, reason: StopReason) -> int:
        """Stop every running chat (each gets its terminal); returns how many."""
        return self.tracker.cancel_all(reason)

    def stop(self) -> None:
        """Cancel every live request (reason ``shutdown``) and end ``run``."""
        self.tracker.cancel_all("shutdown")
        self._stopped.set()

    def stop_generation(self, request_id: str, owner: str, reason: StopReason = "stop") -> None:
        """Stop a request this worker runs: cancels its scope. Raises UnknownRequest if it is
        not live here for owner."""
        self.tracker.cancel_request(request_id, owner, reason)

    @property
    def shared(self) -> bool:
        """Whether other workers run chats of this server (a stop may be theirs to do)."""
        return self.control.shared

    async def stop_anywhere(self, request_id: str, owner: str, reason: StopReason = "stop") -> None:
        """Stop a request whichever worker runs it. Raises UnknownRequest when none does,
        ControlPlaneUnavailable when another worker may run it but cannot be asked."""
        try:
            self.tracker.cancel_request(request_id, owner, reason)
        except UnknownRequest:
            await self.control.stop_elsewhere(request_id, owner, reason)

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
        turn = await self.admit(request, outbox)
        task_status.started(turn.record)
        return await turn.run()

    async def admit(
        self, request: ChatRequest, outbox: Outbox, *, resumable: bool = False
    ) -> ChatTurn:
        """Register a chat as live and return its turn, which the caller must run (``await
        turn.run()``) in a task of its choosing, so a transport refuses a chat without starting
        a task for it. With one worker this never yields. Raises UnknownModel, DuplicateRequest,
        TooManyRequests, ShuttingDown.

        ``resumable``: the chat keeps its messages and, when its client goes, runs on for the
        resume grace (``resume``); the caller must then run the turn where the client's going
        does not cancel it (``run_resumable``).
        """
        if self._draining:
            raise ShuttingDown("the server is shutting down and starts no new chat")
        if request.model is not None:
            self.streamer.catalog.get(request.model)  # raises UnknownModel: refused, not begun
        conversation_id = None
        if self._turn_history is not None:
            if request.conversation_id is None and self.control.shared:
                # Named now, so that a follow-up on another worker can tell it is a turn's.
                request = replace(request, conversation_id=new_conversation_id())
            conversation_id = request.conversation_id
        limit = self.settings.max_requests_per_caller
        unsaved_on = await self.control.admit(request.owner, request.id, limit, conversation_id)
        try:
            provider: Provider | PathUnavailable
            try:
                model, provider = self.streamer.select_provider(request.path, request.model)
                request = replace(request, model=model.name)
            except PathUnavailable as exc:
                provider = exc  # the turn tells the client, as its error terminal
            path = provider.name if not isinstance(provider, PathUnavailable) else request.path
            record = self.tracker.start_request(request.id, request.owner, path)
        except BaseException:
            self.control.release(request.owner, request.id, conversation_id)
            raise
        key = (request.owner, request.id)
        outlet = RequestOutlet(
            request.id,
            outbox,
            keep=resumable,
            max_bytes=self.settings.resume_log_max_bytes,
            on_detach=(lambda: self.resumable.detached(key)) if resumable else None,
        )
        if resumable:
            self.resumable.add(key, outlet)
        return ChatTurn(self._turn_services(), request, outlet, provider, record, unsaved_on)

    @property
    def resumes(self) -> bool:
        """Whether a streaming chat whose client went away runs on for a resume (a grace)."""
        return self.settings.resume_grace_s > 0

    async def resume(
        self, owner: str, request_id: str, after_seq: int, outbox: Outbox
    ) -> Attachment | None:
        """Send a resumable chat's messages after ``after_seq`` to ``outbox``, then its live
        stream; a client attached elsewhere is told it was taken over. None: the chat has
        ended and the client has it all (nothing is sent). Raises UnknownRequest for an id
        the caller has no resumable chat of."""
        try:
            attachment = self.resume_local(owner, request_id, after_seq, outbox)
        except UnknownRequest:
            if not self.control.shared:
                raise
        else:
            await trio.lowlevel.checkpoint()
            return attachment
        remote = RemoteAttachment(request_id, outbox)
        routed = await self.control.resume_elsewhere(request_id, owner, after_seq, remote)
        if routed is None:
            return None
        remote.routed = routed
        return remote

    def resume_local(
        self, owner: str, request_id: str, after_seq: int, outbox: Outbox
    ) -> Attachment | None:
        """``resume``, for a chat this worker keeps. Raises UnknownRequest."""
        return self.resumable.resume(owner, request_id, after_seq, outbox)

    def resume_stream(self, owner: str, request_id: str, after_seq: int) -> StreamSource | None:
        """A chat of this worker resumed by a client on another (``WorkerCommands``)."""
        outbox = Outbox(self.settings.outbox_max_bytes)
        attachment = self.resume_local(owner, request_id, after_seq, outbox)
        return None if attachment is None else AttachedStream(request_id, outbox, attachment)

    def run_resumable(self, turn: ChatTurn, on_end: Callable[[], None] | None = None) -> None:
        """Run a resumable chat in the engine's nursery (its client's going does not end it);
        ``on_end`` is called when it has ended. Replayable for ``resume_retention_s`` after."""
        if self._nursery is None:
            raise RuntimeError("the engine is not started")
        self._nursery.start_soon(self._run_resumable, turn, on_end)

    async def _run_resumable(self, turn: ChatTurn, on_end: Callable[[], None] | None) -> None:
        try:
            await turn.run()
        finally:
            if on_end is not None:
                on_end()
            self.resumable.ended((turn.request.owner, turn.request.id), turn.outlet)

    def _stop_vanished(self, owner: str, request_id: str) -> None:
        with contextlib.suppress(UnknownRequest):
            self.tracker.cancel_request(request_id, owner, "disconnect")

    def _turn_services(self) -> TurnServices:
        if self._services is None:
            self._services = TurnServices(
                streamer=self.streamer,
                tracker=self.tracker,
                control=self.control,
                history=self._turn_history,
                metrics=self.metrics,
            )
        return self._services

    async def start_resumable_stream(self, request: ChatRequest, outbox: Outbox) -> ChatTurn:
        """Start a resumable chat streaming into ``outbox``, for a transport whose handler
        returns before the body is read (SSE). A reader that never comes detaches it (the
        resume grace starts)."""
        if self._nursery is None:
            raise RuntimeError("the engine is not started")
        turn = await self.admit(request, outbox, resumable=True)
        self.run_resumable(turn)
        self.detach_if_unread(turn.outlet, outbox)
        return turn

    def detach_if_unread(self, attachment: Attachment, outbox: Outbox) -> None:
        """Detach a resumable chat from ``outbox`` if no reader starts reading it (its client
        left before the transport began the response): the resume grace then starts."""
        if self._nursery is None:
            raise RuntimeError("the engine is not started")
        self._nursery.start_soon(self._detach_if_unread, attachment, outbox)

    @staticmethod
    async def _detach_if_unread(attachment: Attachment, outbox: Outbox) -> None:
        with trio.move_on_after(READER_ATTACH_TIMEOUT_S):
            await outbox.reader_attached.wait()
            return
        if attachment.sends_to(outbox):
            log.info("a resumed stream got no reader: detached")
            attachment.detach()

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
