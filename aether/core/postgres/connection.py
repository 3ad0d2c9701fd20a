"""One PostgreSQL connection driven by Trio: psycopg's libpq core, waited on by the event loop.

psycopg 3's async API is asyncio-only, and running its blocking API in ``trio.to_thread`` makes
every statement wait for the GIL behind a busy loop (seconds, measured for SQLite). libpq itself
is non-blocking: this module sends with ``PQsendQueryParams``, flushes, and reads results as the
socket becomes ready (``trio.lowlevel.wait_readable`` / ``wait_writable``), so a statement costs
the loop only its own CPU. psycopg supplies the rest: libpq (``psycopg.pq``, the binary wheel's
build), the connection generator, parameter and result adaptation (``Transformer``) and errors
carrying their SQLSTATE (``psycopg.errors``).

Statements go out in pipeline mode: a batch of statements (``run``) costs one round trip, and a
statement that fails makes the rest of its batch report ``PipelineAborted`` rather than run.

Cancellation and errors: a connection interrupted while a statement is in flight (cancelled,
timed out, or its socket failed) sends the server a cancel request and is closed: its state is
unknown, and the server rolls back whatever transaction it had open, so nothing half-done is
ever committed. ``broken`` then tells its pool to drop it.

@.architecture
role: PostgreSQL connection
jobs: [database_io]
"""

from __future__ import annotations

import ipaddress
import logging
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import psycopg
import psycopg.abc
import psycopg.errors
import trio
from psycopg import pq
from psycopg.adapt import PyFormat, Transformer
from psycopg.conninfo import conninfo_to_dict, make_conninfo
from psycopg.generators import cancel as cancel_generator
from psycopg.generators import connect as connect_generator
from psycopg.waiting import Ready, Wait

log = logging.getLogger(__name__)

Row = tuple[Any, ...]
# What a server must answer a connection attempt within.
CONNECT_TIMEOUT_S = 10.0
# How long an interrupted statement's cancel request may take before the connection is closed
# regardless.
CANCEL_TIMEOUT_S = 1.0


class PipelineAborted(psycopg.Error):
    """A statement that did not run because an earlier one of its batch failed."""


@dataclass(frozen=True, slots=True)
class Statement:
    sql: str
    params: Sequence[object] = ()


async def _wait(fileno: int, wait: Wait) -> Ready:
    """Wait until the socket is ready as ``wait`` asks; which way it became ready."""
    if wait == Wait.R:
        await trio.lowlevel.wait_readable(fileno)
        return Ready.R
    if wait == Wait.W:
        await trio.lowlevel.wait_writable(fileno)
        return Ready.W
    ready = Ready.NONE

    async def until(fn: Any, mark: Ready, scope: trio.CancelScope) -> None:
        nonlocal ready
        await fn(fileno)
        ready = Ready(ready | mark)
        scope.cancel()

    async with trio.open_nursery() as nursery:
        nursery.start_soon(until, trio.lowlevel.wait_readable, Ready.R, nursery.cancel_scope)
        nursery.start_soon(until, trio.lowlevel.wait_writable, Ready.W, nursery.cancel_scope)
    return ready


async def _resolved(conninfo: str) -> str:
    """The conninfo with its host names resolved by Trio: libpq would resolve them with a
    blocking getaddrinfo inside the connection attempt, stalling the loop."""
    params = conninfo_to_dict(conninfo)
    hosts = str(params.get("host") or "")
    if not hosts or params.get("hostaddr"):
        return conninfo
    port = int(str(params.get("port") or 5432).split(",")[0])
    addresses = []
    for host in hosts.split(","):
        if host.startswith("/") or host.startswith("@"):
            return conninfo  # a Unix socket directory: nothing to resolve
        try:
            ipaddress.ip_address(host)
            addresses.append(host)
            continue
        except ValueError:
            pass
        found = await trio.socket.getaddrinfo(host, port, type=trio.socket.SOCK_STREAM)
        addresses.append(str(found[0][4][0]))
    return make_conninfo(conninfo, hostaddr=",".join(addresses))


class PgConnection:
    def __init__(self, pgconn: pq.abc.PGconn) -> None:
        self._pgconn = pgconn
        self._encoding = "utf-8"
        self.broken = False

    @classmethod
    async def connect(cls, conninfo: str) -> PgConnection:
        """Open a connection; raises ``psycopg.OperationalError`` (or TimeoutError)."""
        conninfo = make_conninfo(
            await _resolved(conninfo), client_encoding="UTF8", application_name="aether"
        )
        generator = connect_generator(conninfo)
        pgconn: pq.abc.PGconn | None = None
        try:
            with trio.fail_after(CONNECT_TIMEOUT_S):
                fileno, wait = next(generator)
                while True:
                    fileno, wait = generator.send(await _wait(fileno, wait))
        except StopIteration as done:
            pgconn = done.value
        finally:
            generator.close()
        assert pgconn is not None
        pgconn.nonblocking = 1
        return cls(pgconn)

    @property
    def fileno(self) -> int:
        return self._pgconn.socket

    @property
    def backend_pid(self) -> int:
        return self._pgconn.backend_pid

    def close(self) -> None:
        self.broken = True
        self._pgconn.finish()

    async def execute(self, sql: str, params: Sequence[object] = ()) -> list[Row]:
        """One statement's rows; raises its error (``psycopg.Error``)."""
        (outcome,) = await self.run([Statement(sql, params)])
        if isinstance(outcome, BaseException):
            raise outcome
        return outcome

    async def run(self, statements: Sequence[Statement]) -> list[list[Row] | psycopg.Error]:
        """Send every statement in one round trip; for each, its rows or its error. After a
        failed statement, the rest of the batch is ``PipelineAborted`` (not run)."""
        (outcomes,) = await self.run_groups([statements])
        return outcomes

    async def run_groups(
        self, groups: Sequence[Sequence[Statement]]
    ) -> list[list[list[Row] | psycopg.Error]]:
        """``run`` for several batches at once, in one round trip: a failure aborts only the
        rest of its own group (each group ends with a sync point). Statements outside an
        explicit transaction run in one implicit transaction per group."""
        if self.broken:
            raise psycopg.OperationalError("the connection is closed")
        pgconn = self._pgconn
        try:
            pgconn.enter_pipeline_mode()
            transformer = Transformer()
            for group in groups:
                for statement in group:
                    values = transformer.dump_sequence(
                        statement.params, [PyFormat.AUTO] * len(statement.params)
                    )
                    pgconn.send_query_params(
                        statement.sql.encode(),
                        values,
                        param_types=transformer.types,
                        param_formats=transformer.formats,
                        result_format=pq.Format.BINARY,
                    )
                pgconn.pipeline_sync()
            results = await self._communicate([len(group) for group in groups])
            pgconn.exit_pipeline_mode()
        except BaseException:
            await self._abandon()
            raise
        return [[self._outcome(result, transformer) for result in group] for group in results]

    async def _abandon(self) -> None:
        """Interrupted with statements in flight: ask the server to cancel them, then close.
        The server ends a session only when it next reads from or writes to its socket: without
        the cancel request, a statement waiting for a lock would run on once it got it, and the
        rest of its batch with it, COMMIT included. Cancelled, it fails, and its transaction is
        rolled back. (A statement that had finished already is not undone: a timeout at commit
        leaves the outcome unknown, as with any database.)"""
        pgconn = self._pgconn
        if not self.broken and pgconn.status == pq.ConnStatus.OK:
            with trio.CancelScope(shield=True), trio.move_on_after(CANCEL_TIMEOUT_S):
                try:
                    request = pgconn.cancel_conn()
                    request.start()
                    generator = cancel_generator(request)
                    try:
                        fileno, wait = next(generator)
                        while True:
                            fileno, wait = generator.send(await _wait(fileno, wait))
                    except StopIteration:
                        pass
                    finally:
                        generator.close()
                        request.finish()
                except psycopg.Error as exc:
                    log.debug("PostgreSQL cancel request failed: %r", exc)
        self.close()

    async def _communicate(self, expected: list[int]) -> list[list[pq.abc.PGresult]]:
        """Flush the groups and collect each statement's result, group by group, until the
        last group's sync."""
        pgconn = self._pgconn
        fileno = pgconn.socket
        groups: list[list[pq.abc.PGresult]] = []
        results: list[pq.abc.PGresult] = []
        flushed = False
        while True:
            if not flushed:
                flushed = pgconn.flush() == 0
            ready = await _wait(fileno, Wait.R if flushed else Wait.RW)
            if not ready & Ready.R:
                continue
            pgconn.consume_input()
            while not pgconn.is_busy():
                result = pgconn.get_result()
                if result is None:
                    continue  # the end of one statement's results
                if result.status == pq.ExecStatus.PIPELINE_SYNC:
                    if len(results) != expected[len(groups)]:
                        raise psycopg.InterfaceError(
                            f"{len(results)} results for {expected[len(groups)]} statements"
                        )
                    groups.append(results)
                    results = []
                    if len(groups) == len(expected):
                        return groups
                    continue
                lost = pgconn.status == pq.ConnStatus.BAD
                if result.status == pq.ExecStatus.FATAL_ERROR and lost:
                    raise psycopg.errors.error_from_result(result, encoding=self._encoding)
                results.append(result)
            if pgconn.status == pq.ConnStatus.BAD:
                raise psycopg.OperationalError(
                    pgconn.get_error_message(self._encoding) or "the connection was lost"
                )

    def _outcome(
        self, result: pq.abc.PGresult, transformer: psycopg.abc.Transformer
    ) -> list[Row] | psycopg.Error:
        status = result.status
        if status == pq.ExecStatus.PIPELINE_ABORTED:
            return PipelineAborted("not run: an earlier statement of its batch failed")
        if status not in (pq.ExecStatus.TUPLES_OK, pq.ExecStatus.COMMAND_OK):
            return psycopg.errors.error_from_result(result, encoding=self._encoding)
        if status == pq.ExecStatus.COMMAND_OK or result.ntuples == 0:
            return []
        transformer.set_pgresult(result)
        rows: list[Row] = transformer.load_rows(0, result.ntuples, tuple)
        return rows

    async def script(self, sql: str) -> None:
        """Run several statements given as one text (simple protocol, no parameters): a
        migration. Raises the first error."""
        if self.broken:
            raise psycopg.OperationalError("the connection is closed")
        pgconn = self._pgconn
        try:
            pgconn.send_query(sql.encode())
            fileno = pgconn.socket
            while pgconn.flush() != 0:
                if (await _wait(fileno, Wait.RW)) & Ready.R:
                    pgconn.consume_input()
            error: psycopg.Error | None = None
            while True:
                while pgconn.is_busy():
                    await _wait(fileno, Wait.R)
                    pgconn.consume_input()
                result = pgconn.get_result()
                if result is None:
                    break
                if result.status == pq.ExecStatus.FATAL_ERROR and error is None:
                    error = psycopg.errors.error_from_result(result, encoding=self._encoding)
        except BaseException:
            await self._abandon()
            raise
        if error is not None:
            raise error
