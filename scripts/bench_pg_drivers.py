#!/usr/bin/env python3
"""PostgreSQL from a Trio program: Aether's own driver against the alternatives, in one run.

Starts one PostgreSQL server (``aether.testing.postgres_server``, fsync on, loopback only), makes
the history tables in a new database, and writes batches shaped like Aether's history writes
through each driver, on one connection of its own:

- ``ours``: ``aether.core.postgres.connection.PgConnection`` (libpq waited on by the event loop);
  ``run`` pipelines the batch: one round trip;
- ``psycopg-thread``: psycopg 3's synchronous connection, each batch a function run by
  ``trio.to_thread.run_sync`` (a ``CapacityLimiter`` of 1 per connection), statement after
  statement in ``conn.transaction()``: a round trip per statement;
- ``psycopg-thread-pipe``: the same in psycopg's pipeline mode (``conn.pipeline()``): one wait
  for the batch's results, as ours (though psycopg writes each statement to the socket as it is
  queued), so that what differs is mostly the thread;
- ``asyncpg``: asyncpg under trio-asyncio (``aio_as_trio``), statement after statement in
  ``conn.transaction()`` (asyncpg pipelines only one statement's many argument sets); skipped,
  and the report says why, if ``trio_asyncio`` or ``asyncpg`` cannot be imported or fail.

A batch: ``BEGIN``; for each of K chats (``--chats``, default 1 and 20): the conversation's
upsert (``INSERT ... ON CONFLICT DO UPDATE``), the user's message, the answer's ``INSERT ...
RETURNING id``; ``COMMIT``. Every batch's conversations are new.

Two loads: ``idle`` (nothing else runs) and ``busy`` (a Trio task spins ``--busy-slice-us`` of
pure Python, then ``await trio.lowlevel.checkpoint()``, forever: a loaded server, whose loop
always has work and whose thread holds the GIL). For each driver, K and load: ``--batches``
batches (fewer if ``--cell-timeout-s`` runs out; a batch under way is not cut short), split into
``--rounds`` rounds in which the drivers take turns (a noisy machine's slow spells fall on all
alike), after up to ``WARMUP_BATCHES`` unmeasured ones. Reported: write latency p50/p99/max (the
``await`` of one batch, ms), the process's CPU per batch (``time.process_time``, every thread;
idle load only, as the busy task spends the rest), and under the busy load how much of its work
the busy task still got done (``loop left %``: its iterations per second against its rate
alone); ratios against ``ours``.

Cancellation (idle load): for each driver, a batch of 20 chats whose last conversation's row is
locked by another session (``UPDATE`` in an open transaction): once the batch waits on that lock
(``pg_stat_activity``), its cancel scope is cancelled; the lock is released ``LOCK_HOLD_S``
later; then whatever of the batch reached the database is counted. Reported: how the call ended
and how long after the cancel, the batch's messages committed (must be 0), and whether the
connection still works. The thread driver is tried three ways: ``to_thread`` as is
(``abandon_on_cancel=False``: Trio waits for the thread), abandoning the thread
(``abandon_on_cancel=True``), and calling ``conn.cancel_safe()`` when cancelled.

    python scripts/bench_pg_drivers.py                  # a few minutes on 2 cores
    python scripts/bench_pg_drivers.py --batches 100 --chats 20 --json out.json

Needs PostgreSQL's server programs (Debian's ``postgresql`` package) and, for ``asyncpg``,
``pip install trio-asyncio asyncpg``.

@.architecture
role: PostgreSQL driver benchmark
jobs: [benchmarking]
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import re
import statistics
import sys
import time
from collections.abc import Awaitable, Callable, Sequence
from contextlib import nullcontext
from dataclasses import dataclass, field
from typing import Any

import psycopg
import psycopg.errors
import trio

from aether.core.history.postgres import MIGRATIONS
from aether.core.postgres.connection import PgConnection, Statement
from aether.testing.postgres_server import PostgresServer

try:
    import asyncpg  # type: ignore[import-untyped]
    import trio_asyncio  # type: ignore[import-untyped]
except ImportError as exc:  # optional: the asyncpg driver is skipped
    asyncpg = trio_asyncio = None
    ASYNCPG_MISSING = f"not installed ({exc.name})"
else:
    ASYNCPG_MISSING = ""

# The history tables, as Aether's PostgreSQL store makes them (schema version 1).
SCHEMA = MIGRATIONS[0]
CLAIM = (
    "INSERT INTO conversations (owner, id, title, created_at, updated_at) "
    "VALUES ($1, $2, $3, $4, $5) ON CONFLICT (owner, id) DO UPDATE SET "
    "updated_at = excluded.updated_at, "
    "title = CASE WHEN conversations.title = '' THEN excluded.title ELSE conversations.title END"
)
INSERT_USER = (
    "INSERT INTO messages (owner, conversation_id, role, content, status, request_id, created_at) "
    "VALUES ($1, $2, 'user', $3, 'complete', $4, $5)"
)
INSERT_ANSWER = (
    "INSERT INTO messages (owner, conversation_id, role, content, status, request_id, "
    "error_code, created_at, writer) VALUES ($1, $2, 'assistant', $3, 'streaming', $4, NULL, "
    "$5, $6) RETURNING id"
)
# The same for psycopg, whose placeholders are ``%s`` (each ``$n`` above is used once, in order).
PY_CLAIM, PY_INSERT_USER, PY_INSERT_ANSWER = (
    re.sub(r"\$\d+", "%s", sql) for sql in (CLAIM, INSERT_USER, INSERT_ANSWER)
)
OWNER = "bench"
WRITER = "bench-node/w1"
USER_TEXT = "Explain, in a few sentences, why the sky looks blue at noon and red at sunset."

DRIVERS = ("ours", "psycopg-thread", "psycopg-thread-pipe", "asyncpg")
# Unmeasured batches per driver, K and load first (fewer if they take longer than this).
WARMUP_BATCHES = 10
WARMUP_TIMEOUT_S = 5.0
# Cancellation: the batch's chats, how long the lock is held after the cancel, how long the
# batch may take to reach the lock, and how long what it left may take to settle.
CANCEL_CHATS = 20
LOCK_HOLD_S = 2.0
REACH_LOCK_TIMEOUT_S = 10.0
SETTLE_TIMEOUT_S = 5.0
# A driver that does not answer this long is reported as stuck rather than waited for.
CALL_TIMEOUT_S = 30.0


def now() -> float:
    return time.perf_counter()


def pct(values: Sequence[float], q: float) -> float:
    if not values:
        return math.nan
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


# -- the batch ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class Chat:
    conversation_id: str
    request_id: str


def new_chats(tag: str, count: int) -> list[Chat]:
    return [Chat(f"{tag}-c{i}", f"{tag}-r{i}") for i in range(count)]


def chat_params(chat: Chat, at: float) -> tuple[tuple[Any, ...], ...]:
    """The three statements' parameters for one chat."""
    c, r = chat.conversation_id, chat.request_id
    return (
        (OWNER, c, USER_TEXT[:40], at, at),
        (OWNER, c, USER_TEXT, r, at),
        (OWNER, c, "", r, at, WRITER),
    )


# -- the drivers -------------------------------------------------------------------------------


class Driver:
    name = ""

    def round_trips(self, chats: int) -> int:
        raise NotImplementedError

    async def connect(self, url: str) -> None:
        raise NotImplementedError

    async def batch(self, chats: Sequence[Chat]) -> list[int]:
        """Store the chats' starts in one transaction; the answers' ids."""
        raise NotImplementedError

    async def aclose(self) -> None:
        raise NotImplementedError


class Ours(Driver):
    name = "ours"

    def __init__(self) -> None:
        self.conn: PgConnection | None = None

    def round_trips(self, chats: int) -> int:
        return 1

    async def connect(self, url: str) -> None:
        self.conn = await PgConnection.connect(url)

    async def batch(self, chats: Sequence[Chat]) -> list[int]:
        assert self.conn is not None
        at = time.time()
        statements = [Statement("BEGIN")]
        for chat in chats:
            claim, user, answer = chat_params(chat, at)
            statements += [
                Statement(CLAIM, claim),
                Statement(INSERT_USER, user),
                Statement(INSERT_ANSWER, answer),
            ]
        statements.append(Statement("COMMIT"))
        outcomes = await self.conn.run(statements)
        failed = next((o for o in outcomes if isinstance(o, Exception)), None)
        if failed is not None:
            await self.conn.execute("ROLLBACK")
            raise failed
        return [int(rows[0][0]) for rows in outcomes[3::3] if not isinstance(rows, Exception)]

    async def aclose(self) -> None:
        if self.conn is not None:
            self.conn.close()


class PsycopgThread(Driver):
    """psycopg's blocking connection, each batch run in a worker thread. ``cancel``: what a
    cancellation does: ``wait`` (``abandon_on_cancel=False``, Trio's default), ``abandon``
    (``abandon_on_cancel=True``) or ``cancel-safe`` (wait, and ``conn.cancel_safe()`` from
    another thread when cancelled)."""

    def __init__(self, *, pipeline: bool, cancel: str = "wait") -> None:
        self.pipeline = pipeline
        self.cancel = cancel
        self.name = "psycopg-thread-pipe" if pipeline else "psycopg-thread"
        self.conn: psycopg.Connection[Any] | None = None
        self.limiter = trio.CapacityLimiter(1)

    def round_trips(self, chats: int) -> int:
        return 1 if self.pipeline else 3 * chats + 2

    async def connect(self, url: str) -> None:
        self.conn = await trio.to_thread.run_sync(
            lambda: psycopg.connect(url, autocommit=True), limiter=self.limiter
        )

    def _write(self, chats: Sequence[Chat]) -> list[int]:
        conn = self.conn
        assert conn is not None
        at = time.time()
        if not self.pipeline:
            ids = []
            with conn.transaction():
                for chat in chats:
                    claim, user, answer = chat_params(chat, at)
                    conn.execute(PY_CLAIM, claim)
                    conn.execute(PY_INSERT_USER, user)
                    row = conn.execute(PY_INSERT_ANSWER, answer).fetchone()
                    assert row is not None
                    ids.append(int(row[0]))
            return ids
        cursors = []
        with conn.pipeline(), conn.transaction():
            for chat in chats:
                claim, user, answer = chat_params(chat, at)
                conn.execute(PY_CLAIM, claim)
                conn.execute(PY_INSERT_USER, user)
                cursors.append(conn.execute(PY_INSERT_ANSWER, answer))
        return [int(row[0]) for row in (cursor.fetchone() for cursor in cursors) if row]

    async def batch(self, chats: Sequence[Chat]) -> list[int]:
        if self.cancel != "cancel-safe":
            return await trio.to_thread.run_sync(
                self._write,
                chats,
                limiter=self.limiter,
                abandon_on_cancel=self.cancel == "abandon",
            )
        return await self._batch_cancel_safe(chats)

    async def _batch_cancel_safe(self, chats: Sequence[Chat]) -> list[int]:
        """Wait for the thread; if cancelled meanwhile, ask the server to cancel the batch's
        statement (``cancel_safe``, from another thread), so the thread's call fails, its
        transaction is rolled back, and the Cancelled goes on."""
        conn = self.conn
        assert conn is not None
        state = {"done": False, "cancel_sent": False}

        async def cancel_when_cancelled() -> None:
            try:
                await trio.sleep_forever()
            finally:
                if not state["done"]:
                    state["cancel_sent"] = True
                    with trio.CancelScope(shield=True):
                        await trio.to_thread.run_sync(conn.cancel_safe)

        ids: list[int] = []
        async with trio.open_nursery() as nursery:
            nursery.start_soon(cancel_when_cancelled)
            try:
                with trio.CancelScope(shield=True):
                    ids = await trio.to_thread.run_sync(self._write, chats, limiter=self.limiter)
            except psycopg.errors.QueryCanceled:
                if not state["cancel_sent"]:
                    raise  # not ours: the Cancelled of the watcher carries ours
            finally:
                state["done"] = True
                nursery.cancel_scope.cancel()
        return ids

    async def aclose(self) -> None:
        if self.conn is not None:
            with trio.move_on_after(5):
                await trio.to_thread.run_sync(self.conn.close, abandon_on_cancel=True)


class Asyncpg(Driver):
    """asyncpg on trio-asyncio's asyncio loop (which runs inside Trio's)."""

    name = "asyncpg"

    def __init__(self) -> None:
        self.conn: Any = None

    def round_trips(self, chats: int) -> int:
        return 3 * chats + 2

    async def connect(self, url: str) -> None:
        assert asyncpg is not None
        assert trio_asyncio is not None
        self.conn = await trio_asyncio.aio_as_trio(asyncpg.connect)(url)

    async def _write(self, chats: Sequence[Chat]) -> list[int]:
        """The batch, on the asyncio side."""
        conn = self.conn
        at = time.time()
        ids = []
        async with conn.transaction():
            for chat in chats:
                claim, user, answer = chat_params(chat, at)
                await conn.execute(CLAIM, *claim)
                await conn.execute(INSERT_USER, *user)
                ids.append(int(await conn.fetchval(INSERT_ANSWER, *answer)))
        return ids

    async def batch(self, chats: Sequence[Chat]) -> list[int]:
        assert trio_asyncio is not None
        ids: list[int] = await trio_asyncio.aio_as_trio(self._write)(chats)
        return ids

    async def aclose(self) -> None:
        if self.conn is not None and trio_asyncio is not None:
            with trio.move_on_after(5):
                await trio_asyncio.aio_as_trio(self.conn.close)()


def new_driver(name: str, cancel: str = "wait") -> Driver:
    if name == "ours":
        return Ours()
    if name == "psycopg-thread":
        return PsycopgThread(pipeline=False, cancel=cancel)
    if name == "psycopg-thread-pipe":
        return PsycopgThread(pipeline=True, cancel=cancel)
    if name == "asyncpg":
        return Asyncpg()
    raise ValueError(name)


# -- the measurements --------------------------------------------------------------------------


class Busy:
    """The busy load: pure-Python work in slices, a checkpoint after each."""

    def __init__(self, slice_s: float) -> None:
        self.slice_s = slice_s
        self.iterations = 0

    async def run(self) -> None:
        while True:
            end = time.perf_counter() + self.slice_s
            while time.perf_counter() < end:
                pass
            self.iterations += 1
            await trio.lowlevel.checkpoint()

    async def rate_alone(self, seconds: float = 1.0) -> float:
        """Its iterations per second while nothing else runs."""
        before, started = self.iterations, now()
        await trio.sleep(seconds)
        return (self.iterations - before) / (now() - started)


@dataclass
class Cell:
    driver: str
    chats: int
    load: str
    round_trips: int
    latencies_ms: list[float] = field(default_factory=list)
    cpu_s: float = 0.0
    busy_iterations: int = 0
    wall_s: float = 0.0


class Tags:
    """Conversation ids no batch has used."""

    def __init__(self) -> None:
        self.count = 0

    def __call__(self, prefix: str) -> str:
        self.count += 1
        return f"{prefix}-{self.count}"


async def measure_round(
    driver: Driver, cell: Cell, count: int, deadline: float, busy: Busy | None, tags: Tags
) -> None:
    """``count`` batches of the cell (fewer if the deadline passes), one after another."""
    iterations = busy.iterations if busy else 0
    started, cpu = now(), time.process_time()
    for _ in range(count):
        if now() > deadline:
            break
        chats = new_chats(tags(f"{cell.driver}-{cell.load}-{cell.chats}"), cell.chats)
        begun = now()
        ids = await driver.batch(chats)
        cell.latencies_ms.append((now() - begun) * 1000)
        if len(ids) != cell.chats:
            raise RuntimeError(f"{driver.name}: {len(ids)} ids for {cell.chats} chats")
    cell.cpu_s += time.process_time() - cpu
    cell.wall_s += now() - started
    cell.busy_iterations += (busy.iterations if busy else 0) - iterations


async def measure(
    drivers: list[Driver], args: argparse.Namespace, tags: Tags
) -> list[dict[str, Any]]:
    rows: list[dict[str, Any]] = []
    for load in args.loads:
        async with trio.open_nursery() as nursery:
            busy = None
            alone = math.nan
            if load == "busy":
                busy = Busy(args.busy_slice_us / 1e6)
                nursery.start_soon(busy.run)
                alone = await busy.rate_alone()
            for chats in args.chats:
                cells = {d.name: Cell(d.name, chats, load, d.round_trips(chats)) for d in drivers}
                for driver in drivers:
                    warmup = Cell(driver.name, chats, load, 0)
                    deadline = now() + WARMUP_TIMEOUT_S
                    await measure_round(driver, warmup, WARMUP_BATCHES, deadline, busy, tags)
                per_round = math.ceil(args.batches / args.rounds)
                for _ in range(args.rounds):
                    for driver in drivers:  # the drivers take turns
                        print(f"{load:5} chats={chats:<3} {driver.name}", file=sys.stderr)
                        deadline = now() + args.cell_timeout_s / args.rounds
                        await measure_round(
                            driver, cells[driver.name], per_round, deadline, busy, tags
                        )
                rows += [summary(cell, alone) for cell in cells.values()]
            nursery.cancel_scope.cancel()
    return rows


def summary(cell: Cell, busy_alone: float) -> dict[str, Any]:
    batches = len(cell.latencies_ms)
    left = math.nan
    if cell.load == "busy" and cell.wall_s:
        left = cell.busy_iterations / cell.wall_s / busy_alone * 100
    return {
        "driver": cell.driver,
        "chats": cell.chats,
        "load": cell.load,
        "batches": batches,
        "round_trips": cell.round_trips,
        "p50_ms": pct(cell.latencies_ms, 0.5),
        "p99_ms": pct(cell.latencies_ms, 0.99),
        "max_ms": max(cell.latencies_ms) if batches else math.nan,
        "mean_ms": statistics.fmean(cell.latencies_ms) if batches else math.nan,
        # Under the busy load the process's CPU is mostly the busy task's: not the driver's.
        "cpu_ms_per_batch": cell.cpu_s / batches * 1000
        if batches and cell.load == "idle"
        else math.nan,
        "loop_left_pct": left,
    }


# -- cancellation ------------------------------------------------------------------------------


def described(exc: BaseException) -> str:
    """An exception by its class names (a group's leaves), e.g. ``Cancelled``."""
    if isinstance(exc, BaseExceptionGroup):
        return "+".join(sorted({described(leaf) for leaf in exc.exceptions}))
    return type(exc).__name__


async def scalar(admin: PgConnection, sql: str, *params: object) -> Any:
    rows = await admin.execute(sql, params)
    return rows[0][0]


async def until(check: Callable[[], Awaitable[Any]], want: bool = True) -> None:
    """Poll ``check`` (another process's state) until it is truthy (or falsy)."""
    while True:
        if bool(await check()) == want:
            return
        await trio.sleep(0.005)


async def cancel_check(
    label: str, driver: Driver, url: str, admin: PgConnection, tags: Tags
) -> dict[str, Any]:
    """Cancel a batch while it waits for a row lock; what it left in the database."""
    tag = tags(f"cancel-{label}")
    chats = new_chats(tag, CANCEL_CHATS)
    locked = chats[-1].conversation_id
    await admin.execute(
        "INSERT INTO conversations (owner, id, title, created_at, updated_at) "
        "VALUES ($1, $2, 'locked', 0, 0)",
        (OWNER, locked),
    )
    locker = await PgConnection.connect(url)
    await locker.execute("BEGIN")
    await locker.execute(
        "UPDATE conversations SET title = 'held' WHERE owner = $1 AND id = $2", (OWNER, locked)
    )
    row: dict[str, Any] = {"driver": label, "ended": "still running", "ended_after_ms": math.nan}
    scope = trio.CancelScope()
    cancelled_at = math.nan

    async def call() -> None:
        with scope:
            try:
                await driver.batch(chats)
                row["ended"] = "returned its ids"
            except BaseException as exc:
                row["ended"] = f"raised {described(exc)}"
                raise
            finally:
                row["ended_after_ms"] = (now() - cancelled_at) * 1000

    async def release() -> None:
        await trio.sleep(LOCK_HOLD_S)
        await locker.execute("ROLLBACK")

    with trio.move_on_after(CALL_TIMEOUT_S):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(call)
            with trio.fail_after(REACH_LOCK_TIMEOUT_S):
                waiting = "SELECT count(*) FROM pg_stat_activity WHERE wait_event_type = 'Lock'"
                await until(lambda: scalar(admin, waiting))
            cancelled_at = now()
            scope.cancel()
            nursery.start_soon(release)
    locker.close()
    # Let whatever the driver left running end: its thread, or its session.
    with trio.move_on_after(SETTLE_TIMEOUT_S):
        if isinstance(driver, PsycopgThread):
            async with driver.limiter:  # held until the thread is done, abandoned or not
                pass
        busy = (
            "SELECT count(*) FROM pg_stat_activity WHERE datname = current_database() "
            "AND state <> 'idle' AND pid <> pg_backend_pid()"
        )
        await until(lambda: scalar(admin, busy), want=False)
    row["messages_committed"] = await scalar(
        admin, "SELECT count(*) FROM messages WHERE request_id LIKE $1", f"{tag}-r%"
    )
    row["conversations_committed"] = await scalar(
        admin,
        "SELECT count(*) FROM conversations WHERE id LIKE $1 AND title <> 'locked'",
        f"{tag}-c%",
    )
    row["of"] = f"{2 * CANCEL_CHATS} messages, {CANCEL_CHATS - 1} conversations"
    try:
        with trio.fail_after(5):
            await driver.batch(new_chats(tags(f"{tag}-after"), 1))
        row["connection_after"] = "works"
    except Exception as exc:
        row["connection_after"] = f"{described(exc)}: {str(exc)[:60]}"
    return row


async def cancel_checks(
    names: list[str], url: str, admin: PgConnection, tags: Tags
) -> list[dict[str, Any]]:
    rows = []
    variants = []
    for name in names:
        if name.startswith("psycopg-thread"):
            variants += [(f"{name} ({mode})", name, mode) for mode in THREAD_CANCEL_MODES]
        else:
            variants.append((name, name, "wait"))
    for label, name, mode in variants:
        print(f"cancel {label}", file=sys.stderr)
        driver = new_driver(name, mode)
        await driver.connect(url)
        try:
            rows.append(await cancel_check(label, driver, url, admin, tags))
        finally:
            await driver.aclose()
    return rows


THREAD_CANCEL_MODES = ("wait", "abandon", "cancel-safe")


# -- the report --------------------------------------------------------------------------------


def fmt(value: Any, digits: int = 1) -> str:
    if isinstance(value, float):
        return "-" if math.isnan(value) else f"{value:,.{digits}f}"
    return str(value)


COLUMNS = [
    ("driver", "driver", 0),
    ("chats/batch", "chats", 0),
    ("load", "load", 0),
    ("batches", "batches", 0),
    ("round trips/batch", "round_trips", 0),
    ("p50 ms", "p50_ms", 2),
    ("p99 ms", "p99_ms", 2),
    ("max ms", "max_ms", 2),
    ("p99 / ours", "p99_vs_ours", 2),
    ("cpu ms/batch", "cpu_ms_per_batch", 3),
    ("cpu / ours", "cpu_vs_ours", 2),
    ("loop left %", "loop_left_pct", 0),
]
CANCEL_COLUMNS = [
    ("driver", "driver", 0),
    ("how the call ended", "ended", 0),
    ("ended after cancel ms", "ended_after_ms", 0),
    ("messages committed", "messages_committed", 0),
    ("conversations committed", "conversations_committed", 0),
    ("of", "of", 0),
    ("connection after", "connection_after", 0),
]


def add_ratios(rows: list[dict[str, Any]]) -> None:
    for row in rows:
        ours = next(
            (
                r
                for r in rows
                if r["driver"] == "ours" and r["chats"] == row["chats"] and r["load"] == row["load"]
            ),
            None,
        )
        for key, ratio in (("p99_ms", "p99_vs_ours"), ("cpu_ms_per_batch", "cpu_vs_ours")):
            row[ratio] = row[key] / ours[key] if ours and ours[key] else math.nan


def table(rows: list[dict[str, Any]], columns: list[tuple[str, str, int]]) -> str:
    lines = ["| " + " | ".join(c[0] for c in columns) + " |", "|" + "---|" * len(columns)]
    for row in rows:
        cells = [fmt(row.get(key, math.nan), digits) for _, key, digits in columns]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


# -- the run -----------------------------------------------------------------------------------


async def run(args: argparse.Namespace) -> None:
    server = PostgresServer(fsync=True)
    tags = Tags()
    skipped: list[str] = []
    names = list(args.drivers)
    if "asyncpg" in names and ASYNCPG_MISSING:
        names.remove("asyncpg")
        skipped.append(f"asyncpg: {ASYNCPG_MISSING}")
    try:
        await trio.to_thread.run_sync(server.start)
        url = await trio.to_thread.run_sync(server.create_database)
        admin = await PgConnection.connect(url)
        await admin.script(SCHEMA)
        async with open_asyncio_loop(names):
            drivers: list[Driver] = []
            for name in names:
                driver = new_driver(name)
                try:
                    await driver.connect(url)
                    await driver.batch(new_chats(tags(f"check-{name}"), 2))
                except Exception as exc:
                    skipped.append(f"{name}: does not work here ({described(exc)}: {exc})")
                    await driver.aclose()
                    continue
                drivers.append(driver)
            try:
                rows = await measure(drivers, args, tags)
            finally:
                for driver in drivers:
                    await driver.aclose()
            cancels = await cancel_checks([d.name for d in drivers], url, admin, tags)
        admin.close()
    finally:
        with trio.CancelScope(shield=True):
            await trio.to_thread.run_sync(server.close)
    add_ratios(rows)
    machine = f"{platform.node()}: {os.cpu_count()} cores, Python {platform.python_version()}"
    print(f"# bench_pg_drivers ({machine}; PostgreSQL fsync on, loopback)\n")
    print(table(rows, COLUMNS))
    print(
        "\nround trips/batch: as the driver sends the batch. cpu: the whole process's "
        "(time.process_time, every thread), idle load only. loop left %: the busy task's "
        f"iterations per second ({args.busy_slice_us:g} us of pure Python, then a checkpoint) "
        "against its rate alone."
    )
    print(
        f"\ncancellation (a batch of {CANCEL_CHATS} chats waiting on a row lock, cancelled; "
        f"the lock released {LOCK_HOLD_S:g} s later)\n"
    )
    print(table(cancels, CANCEL_COLUMNS))
    for line in skipped:
        print(f"skipped: {line}")
    if args.json:
        await trio.Path(args.json).write_text(
            json.dumps(
                {"machine": machine, "rows": rows, "cancellation": cancels, "skipped": skipped},
                indent=2,
            )
        )


def open_asyncio_loop(names: list[str]) -> Any:
    """trio-asyncio's loop, around the run, when asyncpg is measured."""
    if "asyncpg" in names and trio_asyncio is not None:
        return trio_asyncio.open_loop()
    return nullcontext()


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ints = lambda text: [int(x) for x in text.split(",")]  # noqa: E731
    words = lambda text: text.split(",")  # noqa: E731
    parser.add_argument(
        "--drivers", type=words, default=list(DRIVERS), help=f"from {', '.join(DRIVERS)}"
    )
    parser.add_argument("--chats", type=ints, default=[1, 20], help="chats per batch")
    parser.add_argument("--loads", type=words, default=["idle", "busy"], help="idle, busy")
    parser.add_argument("--batches", type=int, default=300, help="measured, per cell")
    parser.add_argument("--rounds", type=int, default=3, help="the drivers take turns")
    parser.add_argument(
        "--cell-timeout-s", type=float, default=20.0, help="at most this long per cell"
    )
    parser.add_argument(
        "--busy-slice-us", type=float, default=200.0, help="the busy task's work per checkpoint"
    )
    parser.add_argument("--json", help="also write the rows as JSON to this file")
    return parser.parse_args(argv)


if __name__ == "__main__":
    trio.run(run, parse_args())
