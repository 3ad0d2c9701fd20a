"""The history's one answer writer: starts, progress and final saves of every turn, batched.

Virtual time (MockClock, autojump) and a real SQLite store; ``write_batches`` counts the store's
transactions."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
import trio
import trio.testing

from aether.core.errors import AetherError
from aether.core.history.recorder import FLUSH_INTERVAL_S, TurnRecorder
from aether.core.history.sqlite import SQLiteHistoryStore
from aether.core.history.store import TurnStart
from aether.core.history.writer import AnswerWriter
from aether.core.identity import ANONYMOUS
from tests.helpers import assert_stream_invariants, content_of, make_settings
from tests.memory_ws import MemoryServer


@pytest.fixture
async def store(tmp_path: Path) -> AsyncIterator[SQLiteHistoryStore]:
    store = SQLiteHistoryStore(tmp_path / "h.sqlite3")
    await store.open()
    try:
        yield store
    finally:
        await store.close()


@pytest.fixture
async def writer(store: SQLiteHistoryStore, nursery: trio.Nursery) -> AnswerWriter:
    writer = AnswerWriter(store)
    nursery.start_soon(writer.run)
    return writer


def recorder(writer: AnswerWriter, index: int = 0) -> TurnRecorder:
    return TurnRecorder(writer, TurnStart("me", f"c{index}", "title", f"r{index}", "question"))


def no_failure(error: AetherError) -> None:
    raise AssertionError(f"the start failed: {error}")


async def stored(store: SQLiteHistoryStore, index: int = 0) -> list[tuple[str, str, str]]:
    return [(m.role, m.status, m.content) for m in await store.messages("me", f"c{index}")]


async def test_a_turn_that_ends_before_its_start_is_stored_is_one_transaction(
    autojump_clock: Any, store: SQLiteHistoryStore, writer: AnswerWriter
) -> None:
    turn = recorder(writer)
    batches = store.write_batches
    turn.begin(no_failure)
    turn.transcript += ["an ", "answer"]
    await turn.await_start("complete", None)
    await turn.finish("complete")
    assert store.write_batches - batches == 1
    assert turn.saved.is_set()
    assert await stored(store) == [
        ("user", "complete", "question"),
        ("assistant", "complete", "an answer"),
    ]


async def test_a_turn_stopped_before_its_start_is_stored_is_one_transaction(
    autojump_clock: Any, store: SQLiteHistoryStore, writer: AnswerWriter
) -> None:
    turn = recorder(writer)
    batches = store.write_batches
    turn.begin(no_failure)
    turn.transcript.append("cut sh")
    await turn.finish("stopped")  # a stop: no wait for the start, the final save goes with it
    assert store.write_batches - batches == 1
    assert await stored(store) == [
        ("user", "complete", "question"),
        ("assistant", "stopped", "cut sh"),
    ]


async def test_a_stop_after_the_answer_outran_its_start_stores_stopped(
    autojump_clock: Any, store: SQLiteHistoryStore, writer: AnswerWriter
) -> None:
    """The turn asked for ``complete`` with its start; a stop then said ``stopped``: the stored
    status is what the client was told last."""
    turn = recorder(writer)
    turn.begin(no_failure)
    turn.transcript.append("whole")
    with trio.CancelScope() as scope:
        scope.cancel()  # the stop arrives while the turn waits for its start
        await turn.await_start("complete", None)
    await turn.finish("stopped")
    assert await stored(store) == [
        ("user", "complete", "question"),
        ("assistant", "stopped", "whole"),
    ]


async def test_progress_is_saved_every_second_in_one_batch_for_all_turns(
    autojump_clock: Any, store: SQLiteHistoryStore, writer: AnswerWriter
) -> None:
    turns = [recorder(writer, index) for index in range(20)]
    for turn in turns:
        turn.begin(no_failure)
    for turn in turns:
        await turn.begun.wait()
    started = trio.current_time()
    assert started < 0.001  # within a scheduling round or two, not a timer's tick
    batches = store.write_batches
    await trio.sleep(FLUSH_INTERVAL_S / 10)  # the text comes between the writer's ticks
    for second in range(1, 4):
        for quarter in range(4):
            for turn in turns:
                turn.transcript.append(f"{second}.{quarter} ")
            await trio.sleep(FLUSH_INTERVAL_S / 4)
        await trio.testing.wait_all_tasks_blocked()
        # One progress batch a second for all twenty turns, with all the text so far.
        assert store.write_batches - batches == second
        for index, turn in enumerate(turns):
            assert (await stored(store, index))[1] == (
                "assistant",
                "streaming",
                "".join(turn.transcript),
            )
    # Nothing new: no batch.
    await trio.sleep(3 * FLUSH_INTERVAL_S)
    assert store.write_batches - batches == 3
    for turn in turns:
        turn.transcript.append("end")
    async with trio.open_nursery() as ending:
        for turn in turns:
            ending.start_soon(turn.finish, "complete")
    assert store.write_batches - batches == 4  # twenty final saves, one transaction
    assert (await stored(store, 7))[1] == ("assistant", "complete", "".join(turns[7].transcript))


async def test_a_failed_start_is_reported_to_the_turn_once(
    autojump_clock: Any, store: SQLiteHistoryStore, writer: AnswerWriter
) -> None:
    failures: list[AetherError] = []
    turn = recorder(writer)
    connection = store._writer
    assert connection is not None
    connection.close()  # a real sqlite3 error
    turn.begin(failures.append)
    turn.transcript.append("lost")
    await turn.await_start("complete", None)
    await turn.finish("error", "storage_error")
    assert [failure.code for failure in failures] == ["storage_error"]
    assert turn.failure is failures[0]
    assert turn.saved.is_set()


async def test_a_start_that_fails_mid_stream_ends_the_chat_with_storage_error_at_once(
    autojump_clock: Any, nursery: trio.Nursery, tmp_path: Path
) -> None:
    """The echo model's first token comes after a second: the error terminal comes before it,
    and the producer is stopped."""
    path = tmp_path / "h.sqlite3"
    settings = make_settings(provider="echo", echo_token_delay_s=1.0, db_path=str(path))
    store = SQLiteHistoryStore(path)
    server = MemoryServer(settings, nursery, store)
    await server.start()
    ws = await server.connect()
    connection = store._writer
    assert connection is not None
    connection.close()
    await ws.send({"type": "chat", "id": "r1", "message": "one two three"})
    messages = await ws.finish("r1")
    terminal = assert_stream_invariants(messages)
    assert (terminal["type"], terminal["code"]) == ("error", "storage_error")
    assert content_of(messages) == ""
    assert trio.current_time() < 1.0
    await server.engine.tracker.wait_until_idle()
    assert server.engine.tracker.get("r1", ANONYMOUS) is not None


async def test_shutdown_stores_every_final_save_queued_before_it(
    autojump_clock: Any, nursery: trio.Nursery, tmp_path: Path
) -> None:
    path = tmp_path / "h.sqlite3"
    settings = make_settings(provider="echo", echo_token_delay_s=1.0, db_path=str(path))
    server = MemoryServer(settings, nursery, SQLiteHistoryStore(path))
    async with trio.open_nursery() as engine_nursery:
        await server.engine.start(engine_nursery)
        ws = await server.connect()
        for index in range(5):
            await ws.send(
                {"type": "chat", "id": f"r{index}", "message": "one two", "conversation_id": "c"}
            )
        await trio.sleep(1.5)  # each has streamed "one"
        server.engine.stop()  # every chat stops, and queues its final save, as the engine stops
    # The engine has stopped and closed the store; a new one reads what was stored.
    reopened = SQLiteHistoryStore(path)
    await reopened.open()
    try:
        messages = await reopened.messages(ANONYMOUS, "c")
    finally:
        await reopened.close()
    assert [(m.role, m.status, m.content) for m in messages if m.role == "assistant"] == [
        ("assistant", "stopped", "one")
    ] * 5


async def test_a_closing_writer_stores_what_was_queued_and_then_refuses(
    autojump_clock: Any, store: SQLiteHistoryStore, nursery: trio.Nursery
) -> None:
    writer = AnswerWriter(store)
    turns = [recorder(writer, index) for index in range(3)]
    async with trio.open_nursery() as ending:
        for turn in turns:
            turn.begin(no_failure)
            turn.transcript.append("done")
            ending.start_soon(turn.finish, "complete")
        await trio.testing.wait_all_tasks_blocked()
        writer.close()  # the engine stops before the writer stored any of them
        nursery.start_soon(writer.run)
    finished_at = trio.current_time()
    late = recorder(writer, 3)
    failures: list[AetherError] = []
    late.begin(failures.append)
    await late.finish("complete")
    assert finished_at < 0.001  # stored, not given up on after FINAL_SAVE_TIMEOUT_S
    assert [await stored(store, index) for index in range(3)] == [
        [("user", "complete", "question"), ("assistant", "complete", "done")]
    ] * 3
    assert [failure.code for failure in failures] == ["storage_error"]
    assert late.saved.is_set()
    assert not await store.has_conversation("me", "c3")
