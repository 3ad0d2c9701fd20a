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

from aether.core.errors import AetherError, StorageError
from aether.core.history.store import HistoryStore, MessageStatus

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
        # Set once the final answer is saved (or could not be): the next turn waits for it.
        self.saved = trio.Event()
        self._request_id = request_id
        self._user_text = user_text
        # The relay appends each assistant text delta here (one list append per delta).
        self.transcript: list[str] = []
        self._message_id: int | None = None
        self._saved_parts = 0
        self.begun = trio.Event()
        self.failure: AetherError | None = None
        self._saving = trio.CancelScope()

    async def run(self) -> None:
        """Store the turn's start, then save the answer so far every second until ``finish``.

        It runs in the engine's nursery, not the request's: a stop must not wait for the store
        (the request's ``stopped`` goes out at once; ``finish`` then waits for this task's
        writes). The start is shielded: once the turn exists, it must get its final status."""
        try:
            with trio.CancelScope(shield=True):
                message_id = await self._store.begin_turn(
                    self._owner,
                    self._conversation_id,
                    self._title,
                    self._request_id,
                    self._user_text,
                )
        except StorageError as exc:
            self.failure = exc
            return
        else:
            self._message_id = message_id
        finally:
            self.begun.set()
        log.debug(
            "request %s: turn stored in conversation %s",
            self._request_id,
            self._conversation_id,
            extra={"request_id": self._request_id, "conversation_id": self._conversation_id},
        )
        with self._saving:
            while True:
                await trio.sleep(FLUSH_INTERVAL_S)
                if len(self.transcript) != self._saved_parts:
                    self._saved_parts = len(self.transcript)
                    try:
                        await self._store.save_answer(
                            message_id, "".join(self.transcript), "streaming"
                        )
                    except StorageError:
                        log.error("request %s: answer so far not saved", self._request_id)

    async def check_start(self) -> None:
        """In the request's nursery: raise the start's failure, if any, to end the request
        with that error (cancellable, so a stop never waits on the store)."""
        await self.begun.wait()
        if self.failure is not None:
            raise self.failure

    @property
    def conversation_id(self) -> str:
        return self._conversation_id

    @property
    def conversation_key(self) -> tuple[str, str]:
        """The conversation as the store keys it: ids are per owner."""
        return (self._owner, self._conversation_id)

    async def finish(self, status: MessageStatus, error_code: str | None = None) -> None:
        """Save the final text and status; safe to call while the caller is being cancelled."""
        try:
            await self._finish(status, error_code)
        finally:
            self.saved.set()

    async def _finish(self, status: MessageStatus, error_code: str | None) -> None:
        self._saving.cancel()
        with trio.CancelScope(shield=True) as scope:
            scope.deadline = trio.current_time() + FINAL_SAVE_TIMEOUT_S
            await self.begun.wait()
            if self._message_id is None:
                return  # the start was never stored: nothing to finish
            try:
                await self._store.save_answer(
                    self._message_id, "".join(self.transcript), status, error_code
                )
            except StorageError:
                log.error("request %s: final answer not saved", self._request_id)
        if scope.cancelled_caught:
            log.error("request %s: saving the final answer timed out", self._request_id)
