"""MessageHandler: turns a client's frames into engine calls and protocol answers.

Chats run with their own scope (``ChatTurn``); ``stop`` cancels one of them through the engine.
With a resume grace (``resume_grace_s`` > 0) they run in the engine's nursery, so that the
client's going does not end them: its chats are detached (``stop_all``) and run on until a
``resume`` on another connection takes them or the grace ends; without one they run in the
connection's nursery and stop with it. The handler never waits on the client's socket:
everything it answers is queued in the client's outbox.

@.architecture
role: WebSocket message handler
jobs: [cancellation_handling, message_parsing, message_routing]
"""

from __future__ import annotations

import contextlib
import logging
from dataclasses import dataclass

import trio

from aether.config import Settings
from aether.core.chat import ChatRequest
from aether.core.errors import (
    AetherError,
    ControlPlaneUnavailable,
    DuplicateRequest,
    ShuttingDown,
    StaleConfirmation,
    StorageError,
    TooManyRequests,
    UnknownConversation,
    UnknownModel,
    UnknownRequest,
)
from aether.core.history.store import message_json
from aether.core.runtime.engine import RuntimeEngine
from aether.core.runtime.outlet import Attachment
from aether.core.runtime.turn import ChatTurn
from aether.core.token_bucket import TokenBucket
from aether.protocol.messages import (
    ApproveMessage,
    ChatMessage,
    FileMessage,
    HistoryMessage,
    PingMessage,
    ProtocolError,
    ResumeMessage,
    StopMessage,
    error_message,
    new_request_id,
    parse_client_message,
    pong_message,
)
from aether.ws.hub import CLOSE_POLICY_VIOLATION, ClientConnection
from aether.ws.uploads import FileReceiver

log = logging.getLogger(__name__)


class MessageHandler:
    def __init__(
        self,
        client: ClientConnection,
        engine: RuntimeEngine,
        nursery: trio.Nursery,
        settings: Settings,
    ) -> None:
        self._client = client
        self._engine = engine
        self._nursery = nursery
        self._settings = settings
        rate = settings.max_messages_per_second
        self._messages = TokenBucket(2 * rate, 2.0, trio.current_time())
        # One slot per chat running on this connection; each running chat holds its slot.
        self._chat_slots = trio.CapacityLimiter(settings.max_requests_per_connection)
        self._running: set[_RunningChat] = set()
        # A client that vanishes may come back for its chats (resume): they then run on for
        # the grace, outside this connection's nursery.
        self._resumable = settings.resume_grace_s > 0
        # The resumable chats streaming to this connection (started or resumed here).
        self._attached: dict[str, Attachment] = {}
        self.files = FileReceiver(engine.file_chat, client.owner)

    def _reply(self, message: dict[str, object]) -> None:
        if not self._client.outbox.put_control(message):
            self._client.close(CLOSE_POLICY_VIOLATION, "too many unread replies")

    def _reply_error(self, code: str, message: str, ref: dict[str, object] | None = None) -> None:
        log.info(
            "client %s: %s: %s",
            self._client.id,
            code,
            message,
            extra={"client_id": self._client.id, "code": code},
        )
        self._reply(error_message(code, message, ref))

    def _within_rate(self) -> bool:
        allowed, _, retry_after_s = self._messages.take(trio.current_time())
        if not allowed:
            self._engine.metrics.rate_limited.labels("ws_messages").inc()
            self._reply_error(
                "rate_limited",
                f"at most {self._settings.max_messages_per_second} messages per second; "
                f"retry after {retry_after_s:.2f} s",
            )
        return allowed

    async def handle_text(self, frame: str) -> None:
        if not self._within_rate():
            return
        # Cheap first: UTF-8 is at most 4 bytes a character and at least one.
        limit = self._settings.max_message_bytes
        if len(frame) > limit or (len(frame) * 4 > limit and len(frame.encode()) > limit):
            self._reply_error("message_too_large", f"messages are limited to {limit} bytes")
            return
        try:
            message = parse_client_message(frame)
        except ProtocolError as exc:
            self._reply_error(exc.code, exc.message, exc.ref)
            return
        if isinstance(message, ChatMessage):
            await self._start_chat(message)
        elif isinstance(message, StopMessage):
            self._stop(message)
        elif isinstance(message, PingMessage):
            self._reply(pong_message())
        elif isinstance(message, ApproveMessage):
            self._approve(message)
        elif isinstance(message, ResumeMessage):
            self._resume(message)
        elif isinstance(message, HistoryMessage):
            await self._history(message)
        elif isinstance(message, FileMessage):
            await self._file(message)

    async def _file(self, message: FileMessage) -> None:
        try:
            reply = await self.files.begin(message)
        except AetherError as exc:
            self._reply_error(exc.code, exc.message, {"type": "file", "name": message.name[:64]})
            return
        if reply is not None:
            self._reply(reply)

    async def _history(self, message: HistoryMessage) -> None:
        store = self._engine.history
        ref: dict[str, object] = {"type": "history", "conversation_id": message.conversation_id}
        if store is None:
            self._reply_error("history_unavailable", "this server keeps no history", ref)
            return
        try:
            # A turn whose terminal the client has seen is read whole.
            await self._engine.wait_saved(self._client.owner, message.conversation_id)
            stored = await store.messages(self._client.owner, message.conversation_id)
        except (UnknownConversation, StorageError) as exc:
            self._reply_error(exc.code, exc.message, ref)
            return
        self._reply(
            {
                "role": "server",
                "type": "history",
                "id": None,
                "conversation_id": message.conversation_id,
                "messages": [message_json(m) for m in stored],
            }
        )

    async def handle_binary(self, data: bytes) -> None:
        # A file's frames are bounded by its announced size; other binary frames are rate limited.
        if not self.files.receiving and not self._within_rate():
            return
        try:
            reply = await self.files.receive(data)
        except AetherError as exc:
            self._reply_error(exc.code, exc.message, {"type": "binary"})
            return
        if reply is not None:
            self._reply(reply)

    async def _start_chat(self, message: ChatMessage) -> None:
        chat = _RunningChat(
            ChatRequest(
                id=message.id or new_request_id(),
                owner=self._client.owner,
                message=message.message,
                path=message.path,
                model=message.model,
                conversation_id=message.conversation_id,
            )
        )
        try:
            self._chat_slots.acquire_on_behalf_of_nowait(chat)
        except trio.WouldBlock:
            self._reply_error(
                "too_many_requests",
                f"at most {self._settings.max_requests_per_connection} chats may run at once "
                "on one connection",
                {"type": "chat", **({"id": message.id} if message.id else {})},
            )
            return
        try:
            turn = await self._engine.admit(
                chat.request, self._client.outbox, resumable=self._resumable
            )
        except (UnknownModel, DuplicateRequest, TooManyRequests, ShuttingDown) as exc:
            self._chat_slots.release_on_behalf_of(chat)
            self._reply_error(exc.code, exc.message, {"type": "chat", "id": chat.request.id})
            return
        self._running.add(chat)
        if self._resumable:
            self._attached[chat.request.id] = turn.outlet

            def ended() -> None:
                self._running.discard(chat)
                self._chat_slots.release_on_behalf_of(chat)
                if self._attached.get(chat.request.id) is turn.outlet:
                    del self._attached[chat.request.id]

            self._engine.run_resumable(turn, ended)
        else:
            self._nursery.start_soon(self._run_chat, chat, turn)

    async def _run_chat(self, chat: _RunningChat, turn: ChatTurn) -> None:
        """Run one admitted chat, holding its slot."""
        try:
            await turn.run()
        finally:
            self._running.discard(chat)
            self._chat_slots.release_on_behalf_of(chat)

    def _stop(self, message: StopMessage) -> None:
        try:
            self._engine.stop_generation(message.id, self._client.owner)
        except UnknownRequest as exc:
            if self._engine.shared:  # another worker's, perhaps: asked beside the reading
                self._nursery.start_soon(self._stop_elsewhere, message)
            else:
                self._reply_error(exc.code, exc.message, {"type": "stop", "id": message.id})

    async def _stop_elsewhere(self, message: StopMessage) -> None:
        try:
            await self._engine.stop_anywhere(message.id, self._client.owner)
        except (UnknownRequest, ControlPlaneUnavailable) as exc:
            self._reply_error(exc.code, exc.message, {"type": "stop", "id": message.id})

    def _approve(self, message: ApproveMessage) -> None:
        owner = self._client.owner
        ref: dict[str, object] = {"type": "approve", "id": message.id}
        try:
            self._engine.approve(message.id, owner, message.confirmation_id, message.approved)
        except UnknownRequest as exc:
            if self._engine.shared:
                self._nursery.start_soon(self._approve_elsewhere, message)
            else:
                self._reply_error(exc.code, exc.message, ref)
        except StaleConfirmation as exc:
            self._reply_error(exc.code, exc.message, ref)

    async def _approve_elsewhere(self, message: ApproveMessage) -> None:
        owner = self._client.owner
        ref: dict[str, object] = {"type": "approve", "id": message.id}
        try:
            await self._engine.approve_anywhere(
                message.id, owner, message.confirmation_id, message.approved
            )
        except (UnknownRequest, StaleConfirmation, ControlPlaneUnavailable) as exc:
            self._reply_error(exc.code, exc.message, ref)

    def _resume(self, message: ResumeMessage) -> None:
        try:
            attachment = self._engine.resume_local(
                self._client.owner, message.id, message.after_seq, self._client.outbox
            )
        except UnknownRequest as exc:
            if self._engine.shared:  # another worker's, perhaps: asked beside the reading
                self._nursery.start_soon(self._resume_elsewhere, message)
            else:
                self._reply_error(exc.code, exc.message, {"type": "resume", "id": message.id})
            return
        self._attach(message.id, attachment)

    async def _resume_elsewhere(self, message: ResumeMessage) -> None:
        try:
            attachment = await self._engine.resume(
                self._client.owner, message.id, message.after_seq, self._client.outbox
            )
        except (UnknownRequest, ControlPlaneUnavailable) as exc:
            self._reply_error(exc.code, exc.message, {"type": "resume", "id": message.id})
            return
        if self._client.outbox.closed and attachment is not None:
            attachment.detach()  # the client left meanwhile
            return
        self._attach(message.id, attachment)

    def _attach(self, request_id: str, attachment: Attachment | None) -> None:
        for held_id, held in list(self._attached.items()):
            if held.finished and not held.sends_to(self._client.outbox):
                del self._attached[held_id]
        if attachment is not None:
            self._attached[request_id] = attachment

    def stop_all(self) -> None:
        """The client left: its resumable chats run on for the grace (detached), the others
        are stopped with reason ``disconnect``."""
        outbox = self._client.outbox
        for outlet in self._attached.values():
            if outlet.sends_to(outbox):
                outlet.detach()
        for chat in list(self._running):
            if chat.request.id in self._attached:
                continue
            with contextlib.suppress(UnknownRequest):
                self._engine.stop_generation(chat.request.id, self._client.owner, "disconnect")


@dataclass(eq=False, slots=True)
class _RunningChat:
    """A chat of this connection, from its frame to its end: a borrower of one of the
    connection's slots. Compared by identity, so a refused duplicate id is never mistaken for
    the running chat of that id."""

    request: ChatRequest
