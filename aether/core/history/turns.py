"""TurnHistory: what the history does around each chat turn: name its conversation, give it
its context, record it, and make the next turn of the conversation wait for its answer.

Every turn is recorded by the one ``AnswerWriter`` (``writer``), which the engine runs beside it
for as long as it serves.

A follow-up sent the moment the previous answer's terminal arrived must see that answer. So a
turn publishes its pending final save (``publish``) before its terminal is queued; a turn of the
same conversation that starts meanwhile waits (cancellably) for that save before it reads the
context. Conversation ids are per caller: the wait, like the store, is keyed by (owner, id).

@.architecture
role: turn history
jobs: [history_management]
"""

from __future__ import annotations

import secrets
from dataclasses import replace

import trio

from aether.core.chat import ChatRequest
from aether.core.history.recorder import FINAL_SAVE_TIMEOUT_S, TurnRecorder
from aether.core.history.store import HistoryStore, StoredMessage, TurnStart
from aether.core.history.writer import AnswerWriter

# A new conversation's title: the start of its first message.
TITLE_CHARS = 60


def new_conversation_id() -> str:
    return "c-" + secrets.token_hex(8)


class TurnHistory:
    def __init__(self, store: HistoryStore, context_messages: int) -> None:
        self.store = store
        self.writer = AnswerWriter(store)
        self._context_messages = context_messages
        # (owner, conversation id) -> set when the latest turn's answer is finally saved
        self._saving: dict[tuple[str, str], trio.Event] = {}

    async def open(self, request: ChatRequest) -> tuple[ChatRequest, TurnRecorder]:
        """Name the request's conversation and load its context. Only reads happen here: the
        turn itself is written beside the stream by the writer. A named conversation the
        caller does not have yet is new, whoever else has one of that id."""
        conversation_id = request.conversation_id
        context: list[StoredMessage] = []
        if conversation_id is None:
            conversation_id = new_conversation_id()
        else:
            previous = self._saving.get((request.owner, conversation_id))
            if previous is not None:
                await previous.wait()
            context = await self.store.context(
                request.owner, conversation_id, self._context_messages
            )
        # Stored context, if any; else whatever context the transport gave (OpenAI clients
        # send the whole conversation with every request).
        history = tuple((m.role, m.content) for m in context) if context else request.history
        turns = tuple(dict.fromkeys(m.request_id for m in context if m.request_id is not None))
        request = replace(
            request, conversation_id=conversation_id, history=history, history_turns=turns
        )
        title = request.message[:TITLE_CHARS]
        start = TurnStart(
            request.owner, conversation_id, title, request.id, request.message, request.model
        )
        recorder = TurnRecorder(self.writer, start)
        return request, recorder

    async def wait_saved(self, owner: str, conversation_id: str) -> None:
        """Return once the conversation's turn whose terminal was queued is saved (at once if
        none is pending), or after the final save's own timeout."""
        saved = self._saving.get((owner, conversation_id))
        if saved is not None:
            with trio.move_on_after(FINAL_SAVE_TIMEOUT_S):
                await saved.wait()

    def publish(self, recorder: TurnRecorder) -> None:
        """The turn's terminal is about to be queued: later turns wait for its final save. (A
        turn still streaming is not waited for: its answer is not a concurrent turn's context.)"""
        self._saving[recorder.conversation_key] = recorder.saved

    def release(self, recorder: TurnRecorder) -> None:
        """The turn's final save is done."""
        if self._saving.get(recorder.conversation_key) is recorder.saved:
            del self._saving[recorder.conversation_key]
