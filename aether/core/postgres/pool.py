"""A small pool of PostgreSQL connections: at most ``size`` at once, opened when first needed.

A connection comes back to the pool after use unless it broke (closed mid-statement, or its
socket failed). An idle connection whose socket has become readable is stale: the server only
speaks first to say goodbye (it restarted, or ended an idle session), so it is dropped before
being lent, and a restarted server costs no request an error it could have avoided.

@.architecture
role: PostgreSQL connection pool
jobs: [database_io, cleanup]
"""

from __future__ import annotations

import select
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import psycopg
import trio

from aether.core.postgres.connection import PgConnection


def _stale(connection: PgConnection) -> bool:
    """Whether the server has spoken (or hung up) on an idle connection. poll, not select: a
    busy server's descriptors are past select's limit of 1024."""
    poller = select.poll()
    poller.register(connection.fileno, select.POLLIN)
    return bool(poller.poll(0))


class PgPool:
    def __init__(self, conninfo: str, size: int) -> None:
        self._conninfo = conninfo
        self._slots = trio.Semaphore(size)
        self._idle: list[PgConnection] = []
        self._closed = False
        self.opened = 0  # connections opened so far (tests and logs)

    @asynccontextmanager
    async def connection(self) -> AsyncIterator[PgConnection]:
        """Lend a connection; raises ``psycopg.Error`` if none can be opened.

        A free slot is taken without a scheduling round (``Semaphore.acquire`` always spends
        one): on a saturated loop a round lasts tens of milliseconds, and the answer writer's
        batches waited about a third of their round trips here."""
        await trio.lowlevel.checkpoint_if_cancelled()
        try:
            self._slots.acquire_nowait()
        except trio.WouldBlock:
            await self._slots.acquire()
        try:
            if self._closed:
                raise psycopg.OperationalError("the connection pool is closed")
            connection = None
            while self._idle and connection is None:
                candidate = self._idle.pop()
                if _stale(candidate):
                    candidate.close()
                else:
                    connection = candidate
            if connection is None:
                connection = await PgConnection.connect(self._conninfo)
                self.opened += 1
            try:
                yield connection
            finally:
                if connection.broken or self._closed:
                    connection.close()
                else:
                    self._idle.append(connection)
        finally:
            self._slots.release()

    def close(self) -> None:
        """Close the idle connections; those lent are closed when they come back."""
        self._closed = True
        idle, self._idle = self._idle, []
        for connection in idle:
            connection.close()
