"""The SQLite history store on its own: migrations, crash recovery, fresh reads."""

from __future__ import annotations

import sqlite3
import time
from pathlib import Path

import pytest
import trio

from aether.core.history.sqlite import CHECKPOINT_OVERDUE_S, MIGRATIONS, SQLiteHistoryStore
from aether.core.history.store import StorageError, UnknownConversation


async def test_reads_see_what_was_just_written(tmp_path: Path) -> None:
    store = SQLiteHistoryStore(tmp_path / "h.sqlite3")
    await store.open()
    try:
        await store.begin_turn("me", "first", "t", "r1", "hello")
        assert len(await store.messages("me", "first")) == 2
        assert await store.owner_of("first") == "me"
        # A later conversation must be visible at once to the same reader.
        await store.begin_turn("me", "second", "t", "r2", "again")
        assert await store.owner_of("second") == "me"
        assert len(await store.messages("me", "second")) == 2
        with pytest.raises(UnknownConversation):
            await store.messages("someone else", "second")
    finally:
        await store.close()


async def test_open_marks_streaming_answers_interrupted(tmp_path: Path) -> None:
    path = tmp_path / "h.sqlite3"
    store = SQLiteHistoryStore(path)
    await store.open()
    answer = await store.begin_turn("me", "c", "t", "r1", "hello")
    await store.save_answer(answer, "partial", "streaming")
    await store.close()  # as if the process died here
    store = SQLiteHistoryStore(path)
    await store.open()
    try:
        messages = await store.messages("me", "c")
    finally:
        await store.close()
    assert [(m.status, m.content) for m in messages] == [
        ("complete", "hello"),
        ("interrupted", "partial"),
    ]


async def test_a_newer_schema_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "h.sqlite3"
    with sqlite3.connect(path) as db:
        db.execute("CREATE TABLE schema_version (version INTEGER NOT NULL)")
        db.execute("INSERT INTO schema_version VALUES (?)", (len(MIGRATIONS) + 1,))
    store = SQLiteHistoryStore(path)
    with pytest.raises(StorageError, match="newer"):
        await store.open()
    await store.close()


async def test_writes_waiting_together_share_one_transaction_and_fail_alone(
    tmp_path: Path,
) -> None:
    store = SQLiteHistoryStore(tmp_path / "h.sqlite3")
    await store.open()
    try:
        await store.begin_turn("someone else", "theirs", "t", "r0", "mine, not yours")
        batches_before = store.write_batches
        outcomes: dict[str, int | Exception] = {}

        async def begin(conversation_id: str) -> None:
            try:
                outcomes[conversation_id] = await store.begin_turn(
                    "me", conversation_id, "t", f"r-{conversation_id}", "hello"
                )
            except UnknownConversation as exc:
                outcomes[conversation_id] = exc

        async with trio.open_nursery() as nursery:
            for conversation_id in ["a", "b", "theirs", "c", "d"]:
                nursery.start_soon(begin, conversation_id)
        # All five were waiting when the first took the writer: one transaction ran them all.
        assert store.write_batches - batches_before == 1
        assert isinstance(outcomes.pop("theirs"), UnknownConversation)
        for conversation_id in outcomes:
            messages = await store.messages("me", conversation_id)
            assert [(m.role, m.status) for m in messages] == [
                ("user", "complete"),
                ("assistant", "streaming"),
            ]
        assert [m.content for m in await store.messages("someone else", "theirs")] == [
            "mine, not yours",
            "",
        ]
    finally:
        await store.close()


async def test_writes_finish_within_a_round_while_the_loop_is_busy(tmp_path: Path) -> None:
    # A worker thread waited seconds for the GIL behind a busy event loop (final saves timed
    # out under load); the store's statements now run on the loop, one batch per round.
    store = SQLiteHistoryStore(tmp_path / "h.sqlite3")
    await store.open()
    rounds = 0
    writes_done = trio.Event()

    async def busy() -> None:
        nonlocal rounds
        while not writes_done.is_set():
            rounds += 1
            await trio.lowlevel.checkpoint()

    try:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(busy)
            async with trio.open_nursery() as writers:
                for index in range(100):
                    writers.start_soon(
                        store.begin_turn, "me", f"c{index}", "t", f"r{index}", "hello"
                    )
            writes_done.set()
        assert rounds <= 3
        assert len(await store.list_conversations("me", 200, None)) == 100
    finally:
        await store.close()


async def test_the_wal_is_checkpointed_off_the_event_loop(tmp_path: Path) -> None:
    store = SQLiteHistoryStore(tmp_path / "h.sqlite3")
    await store.open()
    checkpointer = store.checkpointer
    assert checkpointer is not None
    try:
        writer = store._w()
        # Commits on the loop never copy the log into the database (that waits for the disk).
        assert writer.execute("PRAGMA wal_autocheckpoint").fetchone() == (0,)
        for index in range(20):
            await store.begin_turn("me", f"c{index}", "t", f"r{index}", "x" * 4000)
        await trio.to_thread.run_sync(checkpointer.done.wait)
        assert checkpointer.checkpoints >= 1
    finally:
        await store.close()
    assert store.checkpointer is None
    assert not checkpointer._thread.is_alive()


async def test_an_overdue_checkpoint_is_taken_by_the_writer(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    # A checkpointer thread starved of the GIL must not let the log grow without bound.
    store = SQLiteHistoryStore(tmp_path / "h.sqlite3")
    await store.open()
    checkpointer = store.checkpointer
    assert checkpointer is not None
    try:
        checkpointer.last_done = time.monotonic() - CHECKPOINT_OVERDUE_S - 1
        await store.begin_turn("me", "c", "t", "r", "hello")
        assert time.monotonic() - checkpointer.last_done < CHECKPOINT_OVERDUE_S
        assert "checkpointing on the event loop (overdue)" in caplog.text
    finally:
        await store.close()
