"""TurnRecorder: saves one answer while it streams, so a crash loses at most a second of it.

The user's message and an empty ``streaming`` answer are stored when the turn starts; the text
relayed so far is saved at least every ``FLUSH_INTERVAL_S`` by a task beside the relay (never on
the relay's path); the final text and status (``complete``, ``stopped``, ``error``) are saved
when the turn ends, even when it ends by cancellation. After a crash, ``open`` marks what is still
``streaming`` as ``interrupted``, with the text saved so far.

@.architecture
role: answer recorder
jobs: [history_management]
"""

from __future__ import annotations

import logging

import trio

from aether.core.history.store import HistoryStore, MessageStatus, StorageError

log = logging.getLogger(__name__)

FLUSH_INTERVAL_S = 1.0
# The final save runs shielded from cancellation (the turn is ending), but not for ever.
FINAL_SAVE_TIMEOUT_S = 5.0


class TurnRecorder:
    def __init__(
        self,
        store: HistoryStore,
        owner: str,
        conversation_id: str,
        title: str,
        request_id: str,
        user_text: str,
    ) -> None:
        self._store = store
        self._owner = owner
        self._title = title
        self._conversation_id = conversation_id
        self._request_id = request_id
        self._user_text = user_text
        # The relay appends each assistant text delta here (one list append per delta).
        self.transcript: list[str] = []
        self._message_id: int | None = None
        self._saved_parts = 0

    async def run(self) -> None:
        """Store the turn's start, then save the answer so far every second until cancelled.

        It runs beside the stream, which does not wait for it. The start is shielded: once the
        turn exists in the store, ``finish`` must be able to give it its final status."""
        with trio.CancelScope(shield=True):
            message_id = await self._store.begin_turn(
                self._owner,
                self._conversation_id,
                self._title,
                self._request_id,
                self._user_text,
            )
        self._message_id = message_id
        log.debug(
            "request %s: turn stored in conversation %s",
            self._request_id,
            self._conversation_id,
            extra={"request_id": self._request_id, "conversation_id": self._conversation_id},
        )
        while True:
            await trio.sleep(FLUSH_INTERVAL_S)
            if len(self.transcript) != self._saved_parts:
                self._saved_parts = len(self.transcript)
                await self._store.save_answer(message_id, "".join(self.transcript), "streaming")

    async def finish(self, status: MessageStatus, error_code: str | None = None) -> None:
        """Save the final text and status; safe to call while the caller is being cancelled."""
        if self._message_id is None:
            return  # the start was never stored: nothing to finish
        with trio.CancelScope(shield=True) as scope:
            scope.deadline = trio.current_time() + FINAL_SAVE_TIMEOUT_S
            try:
                await self._store.save_answer(
                    self._message_id, "".join(self.transcript), status, error_code
                )
            except StorageError:
                log.error("request %s: final answer not saved", self._request_id)
        if scope.cancelled_caught:
            log.error("request %s: saving the final answer timed out", self._request_id)
