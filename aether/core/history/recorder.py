"""TurnRecorder: one turn's answer as the history writer stores it, so a crash loses at most a
second of it.

The turn hands its recorder to the engine's one ``AnswerWriter`` (``begin``), which stores the
user's message and the answer so far (``streaming``) in its next cycle, the text relayed since at
least every ``FLUSH_INTERVAL_S``, and the final text and status (``complete``, ``stopped``,
``error``) once the turn ends (``finish``, even when it ends by cancellation). A turn that ends
before its start is stored is stored in one step, its final status included. After a crash,
``open`` marks what is still ``streaming`` as ``interrupted``, with the text saved so far.

@.architecture
role: answer recorder
jobs: [history_management]
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import TYPE_CHECKING

import trio

from aether.core.errors import AetherError, StorageError
from aether.core.history.store import AnswerWrite, MessageStatus, TurnStart
from aether.core.usage import Usage

if TYPE_CHECKING:
    from aether.core.history.writer import AnswerWriter

log = logging.getLogger(__name__)

FLUSH_INTERVAL_S = 1.0
# The final save is waited for shielded from cancellation (the turn is ending), but not for ever.
FINAL_SAVE_TIMEOUT_S = 5.0

# A final status and its error code.
Final = tuple[MessageStatus, str | None]


class TurnRecorder:
    def __init__(self, writer: AnswerWriter, start: TurnStart) -> None:
        self._writer = writer
        self.start = start
        # The relay appends each assistant text delta here (one list append per delta).
        self.transcript: list[str] = []
        # Set once the start's outcome is known: stored (``message_id``) or not (``failure``).
        self.begun = trio.Event()
        self.message_id: int | None = None
        self.failure: AetherError | None = None
        # The final status the turn asks for (None while it streams), and what the writer is
        # done with (stored, or gave up on): the final, and how many transcript parts.
        self.final: Final | None = None
        self._done_final: Final | None = None
        self._done_parts = 0
        # The turn's token usage, given with its final status, and the one stored.
        self.usage: Usage | None = None
        self._done_usage: Usage | None = None
        self._final_done = trio.Event()
        # Set once the final answer is saved (or could not be): the next turn waits for it.
        self.saved = trio.Event()
        self._on_start_failed: Callable[[AetherError], None] | None = None

    @property
    def conversation_id(self) -> str:
        return self.start.conversation_id

    @property
    def conversation_key(self) -> tuple[str, str]:
        """The conversation as the store keys it: ids are per owner."""
        return (self.start.owner, self.start.conversation_id)

    def begin(self, on_start_failed: Callable[[AetherError], None]) -> None:
        """Have the writer store the turn's start in its next cycle. If it cannot,
        ``on_start_failed`` is called (from the writer's task) with the error."""
        self._on_start_failed = on_start_failed
        if not self._writer.add(self):
            self._started(StorageError("the history is closed; the answer was not stored"))

    async def await_start(
        self, status: MessageStatus, error_code: str | None, usage: Usage | None = None
    ) -> None:
        """The answer is whole before its start is stored: wait (cancellably) for the start's
        outcome, and have the answer stored with it in one step (``status`` and ``usage`` are
        its final ones unless ``finish`` says otherwise)."""
        if self.begun.is_set():
            return
        self.final = (status, error_code)
        self.usage = usage
        self._writer.add(self)
        await self.begun.wait()

    async def finish(
        self, status: MessageStatus, error_code: str | None = None, usage: Usage | None = None
    ) -> None:
        """Have the final text, status and usage stored and wait for it; safe to call while the
        caller is being cancelled (the wait is shielded, for at most ``FINAL_SAVE_TIMEOUT_S``)."""
        try:
            self.final = (status, error_code)
            self.usage = usage
            if not self.pending:
                return  # stored already (with its start), or the start was never stored
            self._final_done = trio.Event()
            if not self._writer.add(self):
                log.error("request %s: final answer not saved (history closed)", self.request_id)
                return
            with trio.CancelScope(shield=True) as scope:
                scope.deadline = trio.current_time() + FINAL_SAVE_TIMEOUT_S
                await self._final_done.wait()
            if scope.cancelled_caught:
                log.error("request %s: saving the final answer timed out", self.request_id)
        finally:
            self.saved.set()

    @property
    def request_id(self) -> str:
        return self.start.request_id

    @property
    def pending(self) -> bool:
        """Whether the writer has something of this turn left to store (progress aside)."""
        if self.failure is not None:
            return False
        if self.message_id is None:
            return True
        return self.final is not None and (
            self.final != self._done_final
            or len(self.transcript) != self._done_parts
            or self.usage != self._done_usage
        )

    @property
    def has_new_text(self) -> bool:
        return len(self.transcript) != self._done_parts

    def next_write(self) -> tuple[AnswerWrite, int]:
        """What to store now, and how many transcript parts that is."""
        parts = len(self.transcript)
        status, error_code = self.final or ("streaming", None)
        start = self.start if self.message_id is None else None
        content = "".join(self.transcript)
        usage = self.usage if self.final is not None else None
        return AnswerWrite(start, self.message_id, content, status, error_code, usage), parts

    def written(self, write: AnswerWrite, parts: int, result: int | StorageError) -> None:
        """The writer's report on one write of this turn: ``result`` is the answer's id, or the
        error it failed with."""
        if write.start is not None:
            self._started(result)
            if isinstance(result, StorageError):
                return
        elif isinstance(result, StorageError):
            saved = "answer so far" if write.status == "streaming" else "final answer"
            log.error("request %s: %s not saved", self.request_id, saved)
        # Done with it, stored or not: a failed save is not retried.
        self._done_parts = parts
        if write.status != "streaming":
            self._done_final = (write.status, write.error_code)
            self._done_usage = write.usage
        if self.final is not None and not self.pending:
            self._final_done.set()

    def _started(self, result: int | StorageError) -> None:
        if isinstance(result, StorageError):
            self.failure = result
            self._final_done.set()
        else:
            self.message_id = result
            log.debug(
                "request %s: turn stored in conversation %s",
                self.request_id,
                self.conversation_id,
                extra={"request_id": self.request_id, "conversation_id": self.conversation_id},
            )
        self.begun.set()
        if self.failure is not None and self._on_start_failed is not None:
            self._on_start_failed(self.failure)
