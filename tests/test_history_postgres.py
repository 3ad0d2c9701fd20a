"""The PostgreSQL history store's own behaviour, against a real server: leases and the sweep,
migrations by several nodes at once, a restarted or stopped server, and writes cut short.
(What both stores do is in test_history_store.py and test_history.py.)"""

from __future__ import annotations

import logging
import os

import httpx
import psycopg
import pytest
import trio

from aether.core.errors import StorageError
from aether.core.history import postgres as postgres_store
from aether.core.history.postgres import MIGRATIONS, PostgresHistoryStore, shown_url
from aether.core.history.store import AnswerWrite, TurnStart
from aether.core.postgres.batching import ReadBatcher
from aether.core.postgres.connection import PgConnection, Statement
from aether.core.postgres.pool import PgPool
from aether.testing.fake_llm import Behaviour, FakeLLM
from aether.testing.postgres_server import PostgresServer, postgres_available
from tests.helpers import http_settings, running_server, ws_client
from tests.history_backends import PostgresBackend

pytestmark = pytest.mark.skipif(
    not postgres_available(), reason="PostgreSQL is not installed (scripts/test installs it)"
)
DEADLINE_S = 20


def _statuses(url: str) -> dict[str, str]:
    with psycopg.connect(url) as connection:
        rows = connection.execute(
            "SELECT writer, status FROM messages WHERE role = 'assistant'"
        ).fetchall()
    return dict(rows)


async def test_a_sweep_marks_only_the_answers_of_writers_whose_lease_expired(
    postgres: PostgresBackend,
) -> None:
    alive, dead = postgres.store("node-a/w0"), postgres.store("node-b/w0")
    for store in (alive, dead):
        await store.open()
        await store.begin_turn("me", f"c-{store.writer}", "t", f"r-{store.writer}", "hi")
    # Both leases run: a third node starting now touches neither answer.
    late = postgres.store("node-c/w0")
    await late.open()
    assert late.swept == 0
    # node-b dies (no close: its lease stays until it runs out).
    with psycopg.connect(postgres.url, autocommit=True) as connection:
        connection.execute(
            "UPDATE writers SET expires_at = now() - interval '1 second' WHERE id = 'node-b/w0'"
        )
    assert await late.sweep() == 1
    assert await late.sweep() == 0
    for store in (alive, late):
        await store.close()
    assert _statuses(postgres.url) == {"node-a/w0": "streaming", "node-b/w0": "interrupted"}


async def test_a_running_store_sweeps_a_dead_writers_answers_within_two_lease_periods(
    postgres: PostgresBackend, monkeypatch: pytest.MonkeyPatch
) -> None:
    lease_s = 0.5
    dead = postgres.store("dead/w0", lease_s=lease_s)
    await dead.open()
    await dead.begin_turn("me", "c", "t", "r1", "hi")  # then it dies: it renews no more
    survivor = postgres.store("alive/w0", lease_s=lease_s)
    await survivor.open()
    await survivor.begin_turn("me", "mine", "t", "r2", "hi")
    swept = trio.Event()
    sweep = survivor.sweep

    async def sweep_and_tell() -> int:
        count = await sweep()
        if count:
            swept.set()
        return count

    monkeypatch.setattr(survivor, "sweep", sweep_and_tell)
    started = trio.current_time()
    async with trio.open_nursery() as nursery:
        nursery.start_soon(survivor.maintain)
        with trio.fail_after(DEADLINE_S):
            await swept.wait()
        nursery.cancel_scope.cancel()
    elapsed = trio.current_time() - started
    await survivor.close()
    assert _statuses(postgres.url) == {"dead/w0": "interrupted", "alive/w0": "streaming"}
    # The survivor renewed its own lease all along, so its answer was never touched; the dead
    # writer's was marked once its lease ran out, at the survivor's next sweep: within two lease
    # periods (and a second for a loaded machine's scheduling).
    assert elapsed < 2 * lease_s + 1.0


async def test_nodes_starting_together_migrate_the_schema_once(
    postgres: PostgresBackend, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="aether.core.history.postgres")
    stores = [postgres.store(f"node-{index}/w0") for index in range(4)]
    async with trio.open_nursery() as nursery:
        for store in stores:
            nursery.start_soon(store.open)
    answers = [await store.begin_turn("me", store.writer, "t", "r", "hi") for store in stores]
    for store in stores:
        await store.close()
    assert caplog.text.count("history schema migrated to version") == len(MIGRATIONS)
    assert len(set(answers)) == 4
    with psycopg.connect(postgres.url) as connection:
        assert connection.execute("SELECT version FROM schema_version").fetchall() == [
            (len(MIGRATIONS),)
        ]


async def test_a_newer_schema_is_refused(postgres: PostgresBackend) -> None:
    with psycopg.connect(postgres.url, autocommit=True) as connection:
        connection.execute("CREATE TABLE schema_version (version INTEGER)")
        connection.execute("INSERT INTO schema_version VALUES (%s)", (len(MIGRATIONS) + 1,))
    store = postgres.store()
    with pytest.raises(StorageError, match="newer"):
        await store.open()
    await store.close()


async def test_a_write_cut_short_is_not_stored_at_all(
    postgres: PostgresBackend, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A batch interrupted in flight (here: past its timeout, as a hung server would make it)
    leaves nothing of itself, and the store works on."""
    store = postgres.store()
    await store.open()
    await store.begin_turn("me", "held", "t", "r0", "hi")
    monkeypatch.setattr(postgres_store, "OPERATION_TIMEOUT_S", 0.5)
    batch = [
        AnswerWrite(TurnStart("me", "new", "t", "r1", "first"), None, "", "streaming"),
        AnswerWrite(TurnStart("me", "held", "t", "r2", "second"), None, "", "streaming"),
    ]
    # Another session holds the "held" conversation's row: the batch's second write waits.
    with psycopg.connect(postgres.url) as holder:
        holder.execute("SELECT * FROM conversations WHERE id = 'held' FOR UPDATE")
        results = await store.write_answers(batch)
    monkeypatch.setattr(postgres_store, "OPERATION_TIMEOUT_S", 5.0)
    assert all(isinstance(result, StorageError) for result in results)
    assert not await store.has_conversation("me", "new")  # the first write was undone too
    assert [m.content for m in await store.messages("me", "held")] == ["hi", ""]
    assert await store.begin_turn("me", "new", "t", "r3", "again") > 0
    await store.close()


async def test_a_restarted_server_costs_no_request_and_a_stopped_one_is_recovered_from(
    caplog: pytest.LogCaptureFixture,
) -> None:
    # A server of its own: this test stops it.
    server = PostgresServer()
    await trio.to_thread.run_sync(server.start)
    try:
        url = server.url()
        store = PostgresHistoryStore(url, "test/w0")
        await store.open()
        await store.begin_turn("me", "c", "t", "r1", "before")
        # A restart ends every session: the pool's idle connections are stale, and dropped.
        await trio.to_thread.run_sync(server.restart)
        assert len(await store.messages("me", "c")) == 2
        await trio.to_thread.run_sync(server.stop)
        with pytest.raises(StorageError):
            await store.begin_turn("me", "c", "t", "r2", "while down")
        with pytest.raises(StorageError):
            await store.messages("me", "c")
        await trio.to_thread.run_sync(server.start)
        await store.begin_turn("me", "c", "t", "r3", "after")
        contents = [m.content for m in await store.messages("me", "c")]
        await store.close()
    finally:
        await trio.to_thread.run_sync(server.close)
    assert contents == ["before", "", "after", ""]
    # One error line when it failed, one when it worked again; not one per request.
    assert caplog.text.count("failed: OperationalError") == 1
    assert caplog.text.count("works again") == 1


async def test_a_cancelled_statement_closes_its_connection_and_the_pool_opens_another(
    postgres: PostgresBackend,
) -> None:
    pool = PgPool(postgres.url, 2)
    async with pool.connection() as connection:
        first_pid = connection.backend_pid
    with trio.move_on_after(0.2) as cancelled:
        async with pool.connection() as connection:
            await connection.execute("SELECT pg_sleep(30)")
    assert cancelled.cancelled_caught
    assert connection.broken
    async with pool.connection() as connection:
        assert await connection.execute("SELECT $1::text || '!'", ("ok",)) == [("ok!",)]
        assert connection.backend_pid != first_pid
    pool.close()
    # The server ended the cancelled session: its sleep is not still running.
    with psycopg.connect(postgres.url) as probe:
        sleeping = probe.execute(
            "SELECT count(*) FROM pg_stat_activity WHERE query = 'SELECT pg_sleep(30)'"
        ).fetchone()
    assert sleeping == (0,)


async def test_a_batch_of_statements_is_one_round_trip_and_stops_at_a_failure(
    postgres: PostgresBackend,
) -> None:
    connection = await PgConnection.connect(postgres.url)
    try:
        outcomes = await connection.run(
            [
                Statement("SELECT $1::bigint + 1, $2::float8, $3::text", (41, 0.5, None)),
                Statement("SELECT 1 / $1::int", (0,)),
                Statement("SELECT 'never run'"),
            ]
        )
        after = await connection.execute("SELECT 'still usable'")
    finally:
        connection.close()
    assert outcomes[0] == [(42, 0.5, None)]
    assert isinstance(outcomes[1], psycopg.errors.DivisionByZero)
    assert type(outcomes[2]).__name__ == "PipelineAborted"
    assert after == [("still usable",)]


async def test_a_server_whose_database_stops_answers_storage_error_then_recovers(
    fake_llm: FakeLLM,
) -> None:
    server_db = PostgresServer()
    await trio.to_thread.run_sync(server_db.start)
    fake_llm.default = Behaviour(tokens=2)
    try:
        settings = http_settings(fake_llm, database_url=server_db.url())
        with trio.fail_after(DEADLINE_S):
            async with running_server(settings) as server, ws_client(server.ws_url) as client:
                before = await client.chat("one", id="r1", conversation_id="c")
                await trio.to_thread.run_sync(server_db.stop)
                during = await client.chat("two", id="r2", conversation_id="c")
                await client.send({"type": "ping"})
                pong = await client.receive_control()
                await trio.to_thread.run_sync(server_db.start)
                after = await client.chat("three", id="r3", conversation_id="c")
                async with httpx.AsyncClient(base_url=server.base_url) as rest:
                    stored = await rest.get("/v1/chat/history", params={"conversation_id": "c"})
    finally:
        await trio.to_thread.run_sync(server_db.close)
    assert before[-1]["type"] == after[-1]["type"] == "completion"
    assert (during[-1]["type"], during[-1]["code"]) == ("error", "storage_error")
    assert pong["type"] == "pong"
    assert [m["content"] for m in stored.json()["messages"]] == [
        "one",
        "tok0 tok1 ",
        "three",
        "tok0 tok1 ",
    ]


async def test_reads_of_one_round_share_a_round_trip_and_fail_alone(
    postgres: PostgresBackend,
) -> None:
    pool = PgPool(postgres.url, 4)
    batcher = ReadBatcher(pool, leaders=2, timeout_s=5.0)
    outcomes: dict[int, object] = {}

    async def read(index: int) -> None:
        sql = "SELECT 1 / $1::int" if index == 7 else "SELECT $1::int * 2"
        (outcome,) = await batcher.run([Statement(sql, (0 if index == 7 else index,))])
        outcomes[index] = outcome

    async def read_then_give_up(scope: trio.CancelScope) -> None:
        with scope:
            await batcher.run([Statement("SELECT pg_sleep(0.2)")])

    given_up = trio.CancelScope()
    async with trio.open_nursery() as nursery:
        for index in range(300):
            nursery.start_soon(read, index)
        nursery.start_soon(read_then_give_up, given_up)
        given_up.cancel()  # before its round: withdrawn, never sent
    pool.close()
    assert batcher.batches == 1  # every read of the round in one pipeline
    assert isinstance(outcomes.pop(7), psycopg.errors.DivisionByZero)
    assert outcomes == {index: [(index * 2,)] for index in range(300) if index != 7}


async def test_the_pool_checks_idle_connections_past_descriptor_1024(
    postgres: PostgresBackend,
) -> None:
    """A loaded server holds thousands of sockets: a connection's descriptor may be past 1024,
    where select() cannot look (it raised ValueError and every history call failed)."""
    import resource

    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard != resource.RLIM_INFINITY and hard < 1100:
        pytest.skip("the descriptor limit is below 1100")
    resource.setrlimit(resource.RLIMIT_NOFILE, (max(soft, 1100), hard))
    filler = [os.dup(2) for _ in range(1030)]  # descriptors held, so the next ones are high
    try:
        pool = PgPool(postgres.url, 2)
        async with pool.connection() as connection:
            assert connection.fileno > 1024
        async with pool.connection() as again:  # the idle one, checked and lent again
            assert again is connection
            assert await again.execute("SELECT 1") == [(1,)]
        pool.close()
    finally:
        for descriptor in filler:
            os.close(descriptor)
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))


class _StepsOf(trio.abc.Instrument):
    """Counts the scheduling steps of one task: a step more is a scheduling round it spent."""

    def __init__(self, task: trio.lowlevel.Task) -> None:
        self.task = task
        self.steps = 0

    def before_task_step(self, task: trio.lowlevel.Task) -> None:
        if task is self.task:
            self.steps += 1


async def test_a_free_connection_is_lent_without_a_scheduling_round(
    postgres: PostgresBackend,
) -> None:
    """On a saturated loop a scheduling round lasts tens of milliseconds: the answer writer
    must not spend one to borrow an idle connection."""
    pool = PgPool(postgres.url, 2)
    async with pool.connection():
        pass  # opened, and back in the pool
    counter = _StepsOf(trio.lowlevel.current_task())
    trio.lowlevel.add_instrument(counter)
    try:
        async with pool.connection() as connection:
            rounds_spent = counter.steps
            assert await connection.execute("SELECT 1") == [(1,)]
    finally:
        trio.lowlevel.remove_instrument(counter)
    pool.close()
    assert rounds_spent == 0
    assert pool.opened == 1


def test_logs_name_the_database_without_its_password() -> None:
    assert shown_url("postgresql://aether:s3cret@db.example:5433/aether?sslmode=require") == (
        "postgresql://aether:***@db.example:5433/aether?sslmode=require"
    )
    assert shown_url("postgresql:///aether?host=/run/postgresql&password=s3cret") == (
        "postgresql:///aether?host=%2Frun%2Fpostgresql&password=***"
    )
    assert (
        shown_url("postgresql://aether@127.0.0.1/aether") == "postgresql://aether@127.0.0.1/aether"
    )
