"""Reads that share round trips: those asked within one scheduling round go out together.

Every chat turn reads its conversation's context before it starts. With one statement per
round trip, 500 chats starting at once on a pool of 8 connections queue for the connections,
and each round trip also waits for the event loop to come back to it: the last chat started
seconds late. Here a read queues its statements; after one scheduling round (in which the other
reads of that round queue theirs) the first reader still waiting takes every queued read and
sends them in one pipeline on a pooled connection, each read its own group (a failing read
aborts only itself), and the others find their results there. While reads keep coming, up to
``leaders`` readers (the pool's size) lead batches at once, each taking what queued meanwhile.

Cancellation: a reader cancelled while its read is queued withdraws it; once its batch is out,
its result is dropped. A leading reader's batch is shielded (bounded by the timeout): the
other readers depend on it, so a stopped chat never fails another's read.

@.architecture
role: PostgreSQL read batching
jobs: [database_io, backpressure]
"""

from __future__ import annotations

import collections
from collections.abc import Sequence

import psycopg
import trio

from aether.core.postgres.connection import Row, Statement
from aether.core.postgres.pool import PgPool

Outcome = list[Row] | psycopg.Error
# Most statements one pipeline takes; what is left waits for the next batch.
MAX_BATCH_STATEMENTS = 512


class _Read:
    __slots__ = ("done", "failure", "outcomes", "statements", "taken")

    def __init__(self, statements: Sequence[Statement]) -> None:
        self.statements = statements
        self.outcomes: list[Outcome] = []
        self.failure: BaseException | None = None
        self.taken = False  # a batch holds it
        self.done = trio.Event()


class ReadBatcher:
    def __init__(self, pool: PgPool, leaders: int, timeout_s: float) -> None:
        self._pool = pool
        self._leaders = leaders
        self._timeout_s = timeout_s
        self._queued: collections.deque[_Read] = collections.deque()
        self._leading = 0
        self.batches = 0  # round trips taken (tests, benchmarks)

    async def run(self, statements: Sequence[Statement]) -> list[Outcome]:
        """The statements' outcomes, as ``PgConnection.run`` gives them. Raises what the batch
        failed with (``psycopg.Error``, ``OSError``, ``trio.TooSlowError``)."""
        read = _Read(statements)
        self._queued.append(read)
        try:
            await trio.lowlevel.checkpoint()  # the other reads of this round queue theirs
        except BaseException:
            if not read.taken:
                self._queued.remove(read)
            raise
        if not read.taken and self._leading < self._leaders:
            await self._lead()
        await read.done.wait()
        if read.failure is not None:
            raise read.failure
        return read.outcomes

    async def _lead(self) -> None:
        """Send batches until no read is queued."""
        self._leading += 1
        try:
            with trio.CancelScope(shield=True):
                while self._queued:
                    batch: list[_Read] = []
                    count = 0
                    while self._queued and (
                        not batch or count + len(self._queued[0].statements) <= MAX_BATCH_STATEMENTS
                    ):
                        read = self._queued.popleft()
                        read.taken = True
                        batch.append(read)
                        count += len(read.statements)
                    await self._send(batch)
        finally:
            self._leading -= 1

    async def _send(self, batch: list[_Read]) -> None:
        self.batches += 1
        try:
            with trio.fail_after(self._timeout_s):
                async with self._pool.connection() as connection:
                    groups = await connection.run_groups([read.statements for read in batch])
            for read, outcomes in zip(batch, groups, strict=True):
                read.outcomes = outcomes
        except (psycopg.Error, OSError, trio.TooSlowError) as exc:
            for read in batch:
                read.failure = exc
        finally:
            for read in batch:
                read.done.set()
