"""AnswerWriter: the engine's one task that stores every chat turn's answer.

A turn costs the history no task and no timer of its own: it hands its recorder to the writer
(``add``, synchronous), and the writer, woken by that, stores in one write batch (one
transaction) every start, every final save and, once a second, every answer that streamed new
text since its last save. It lets ``GATHER_ROUNDS`` scheduling rounds pass before it collects:
a turn that ends that quickly has queued its final save in time to be stored with its start, in
one step.

Resource handling: ``run`` lives in the engine's startup, beside it; ``close`` (the engine is
stopping) or a cancellation ends it after it stored what is still due (shielded, for at most
``FINAL_SAVE_TIMEOUT_S``). After that, ``add`` refuses, and a turn's save says so at once rather
than waiting. Its writes are shielded: a cancellation never leaves a batch half-taken.

@.architecture
role: history writer
jobs: [history_management, lifecycle_management]
"""

from __future__ import annotations

import math

import trio

from aether.core.errors import StorageError
from aether.core.history.recorder import FINAL_SAVE_TIMEOUT_S, FLUSH_INTERVAL_S, TurnRecorder
from aether.core.history.store import AnswerWrite, HistoryStore

# Scheduling rounds the writer lets pass between being woken and collecting its batch (a few
# tens of microseconds). An echo chat of two words takes three from its start to its final
# save: with three, nearly every quick chat is one transaction instead of two (measured: 1.00
# transactions per chat against 1.50 with two rounds and 2.00 with one).
GATHER_ROUNDS = 3


class AnswerWriter:
    def __init__(self, store: HistoryStore) -> None:
        self._store = store
        # Recorders with a start or a final save due (a dict: ordered, no duplicates).
        self._due: dict[TurnRecorder, None] = {}
        # Recorders whose start is stored and which still stream: the progress saves' turns.
        self._streaming: dict[TurnRecorder, None] = {}
        self._next_progress = math.inf
        self._wake = trio.Event()
        self._closing = False
        self._open = True

    def add(self, recorder: TurnRecorder) -> bool:
        """Store the recorder's start or final save in the next cycle. False once the writer
        has stopped (nothing will be stored)."""
        if not self._open:
            return False
        self._due[recorder] = None
        self._wake.set()
        return True

    def close(self) -> None:
        """Store what is due, then end ``run``."""
        self._closing = True
        self._wake.set()

    async def run(self) -> None:
        try:
            while not self._closing:
                progress = await self._wait_for_work()
                await self._write(progress)
        finally:
            # Each write is shielded on its own: the deadline is checked between them.
            deadline = trio.current_time() + FINAL_SAVE_TIMEOUT_S
            progress = True
            while (self._due or progress) and trio.current_time() < deadline:
                await self._write(progress)
                progress = False
            self._open = False

    async def _wait_for_work(self) -> bool:
        """Wait until a start or a final save is due, or the progress saves are; return whether
        the progress saves are due."""
        while not self._due and not self._closing:
            if trio.current_time() >= self._next_progress:
                return True
            self._wake = trio.Event()
            with trio.move_on_at(self._next_progress):
                await self._wake.wait()
        for _ in range(GATHER_ROUNDS):
            await trio.lowlevel.checkpoint()
        return trio.current_time() >= self._next_progress

    async def _write(self, progress: bool) -> None:
        """One batch: what is due, and with ``progress`` every answer with new text."""
        due, self._due = self._due, {}
        work: list[tuple[TurnRecorder, AnswerWrite, int]] = []
        for recorder in due:
            if recorder.pending:
                work.append((recorder, *recorder.next_write()))
        if progress:
            for recorder in self._streaming:
                if recorder not in due and recorder.has_new_text:
                    work.append((recorder, *recorder.next_write()))
            self._next_progress = trio.current_time() + FLUSH_INTERVAL_S
        if work:
            results: list[int | StorageError]
            try:
                with trio.CancelScope(shield=True):
                    results = await self._store.write_answers([write for _, write, _ in work])
            except StorageError as exc:  # the store is closed
                results = [exc] * len(work)
            for (recorder, write, parts), result in zip(work, results, strict=True):
                recorder.written(write, parts, result)
                if recorder.final is None and recorder.message_id is not None:
                    if not self._streaming:
                        self._next_progress = trio.current_time() + FLUSH_INTERVAL_S
                    self._streaming[recorder] = None
                else:
                    self._streaming.pop(recorder, None)
                if recorder.pending:  # its final changed while the batch ran
                    self._due[recorder] = None
        for recorder in due:
            if recorder.final is not None:
                self._streaming.pop(recorder, None)
        if not self._streaming:
            self._next_progress = math.inf
