"""The history stores on their own: the contract both hold (the tests that take
``history_backend`` run against SQLite and PostgreSQL), and SQLite's own migrations, WAL and
batching."""

from __future__ import annotations

import contextlib
import sqlite3
import time
from pathlib import Path
from typing import cast

import pytest
import trio

from aether.core.errors import StorageError, UnknownConversation
from aether.core.history import sqlite as sqlite_store
from aether.core.history.sqlite import (
    CHECKPOINT_OVERDUE_S,
    MIGRATIONS,
    SQLiteHistoryStore,
    mark_interrupted,
)
from aether.core.history.store import AnswerWrite, MessageStatus, TurnStart
from tests.history_backends import HistoryBackend


async def test_reads_see_what_was_just_written(history_backend: HistoryBackend) -> None:
    store = history_backend.store()
    await store.open()
    try:
        await store.begin_turn("me", "first", "t", "r1", "hello")
        assert len(await store.messages("me", "first")) == 2
        assert await store.has_conversation("me", "first")
        # A later conversation must be visible at once to the same reader.
        await store.begin_turn("me", "second", "t", "r2", "again")
        assert await store.has_conversation("me", "second")
        assert len(await store.messages("me", "second")) == 2
        assert not await store.has_conversation("someone else", "second")
        with pytest.raises(UnknownConversation):
            await store.messages("someone else", "second")
    finally:
        await store.close()


async def test_open_marks_streaming_answers_interrupted(history_backend: HistoryBackend) -> None:
    store = history_backend.store()
    await store.open()
    answer = await store.begin_turn("me", "c", "t", "r1", "hello")
    await store.save_answer(answer, "partial", "streaming")
    await store.close()  # its writer is gone, with the answer still streaming
    store = history_backend.store()
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
        answer = await store.begin_turn("me", "earlier", "t", "r0", "kept")
        batches_before = store.write_batches
        outcomes: dict[str, int | Exception] = {}

        async def begin(conversation_id: str) -> None:
            outcomes[conversation_id] = await store.begin_turn(
                "me", conversation_id, "t", f"r-{conversation_id}", "hello"
            )

        async def break_a_rule() -> None:
            try:
                await store.save_answer(answer, "lost", cast(MessageStatus, "no such status"))
            except StorageError as exc:
                outcomes["broken"] = exc

        async with trio.open_nursery() as nursery:
            for conversation_id in ["a", "b"]:
                nursery.start_soon(begin, conversation_id)
            nursery.start_soon(break_a_rule)
            for conversation_id in ["c", "d"]:
                nursery.start_soon(begin, conversation_id)
        # All five were waiting when the first took the writer: one transaction ran them all.
        assert store.write_batches - batches_before == 1
        assert isinstance(outcomes.pop("broken"), StorageError)
        for conversation_id in outcomes:
            messages = await store.messages("me", conversation_id)
            assert [(m.role, m.status) for m in messages] == [
                ("user", "complete"),
                ("assistant", "streaming"),
            ]
        assert [(m.content, m.status) for m in await store.messages("me", "earlier")] == [
            ("kept", "complete"),
            ("", "streaming"),
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


async def test_the_log_is_cut_back_once_checkpointed(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    limit = 64 * 1024
    monkeypatch.setattr(sqlite_store, "WAL_SIZE_LIMIT_BYTES", limit)
    path = tmp_path / "h.sqlite3"
    wal = path.with_name(path.name + "-wal")
    store = SQLiteHistoryStore(path)
    await store.open()
    try:
        for index in range(100):
            await store.begin_turn("me", f"c{index}", "t", f"r{index}", "x" * 4000)
        grown = wal.stat().st_size
        # Everything copied into the database; the next write starts the log over.
        store._w().execute("PRAGMA wal_checkpoint(PASSIVE)").fetchall()
        await store.begin_turn("me", "after", "t", "r-after", "x")
        after = wal.stat().st_size
    finally:
        await store.close()
    assert grown > 10 * limit
    assert after <= limit


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


async def test_conversation_ids_are_per_owner(history_backend: HistoryBackend) -> None:
    store = history_backend.store()
    await store.open()
    try:
        await store.begin_turn("alice", "c1", "alice's", "r1", "from alice")
        # Bob's "c1" is a conversation of his own: alice's does not block it, nor shows in it.
        await store.begin_turn("bob", "c1", "bob's", "r2", "from bob")
        await store.claim_conversation("bob", "c1", "ignored: it has a title")
        alice = await store.messages("alice", "c1")
        bob = await store.messages("bob", "c1")
        alice_context = await store.context("alice", "c1", 10)
        listed = {
            owner: [(c.id, c.title) for c in await store.list_conversations(owner, 10, None)]
            for owner in ("alice", "bob")
        }
        assert await store.delete_conversation("bob", "c1")
        assert not await store.delete_conversation("bob", "c1")
        alice_after = await store.messages("alice", "c1")
        with pytest.raises(UnknownConversation):
            await store.messages("bob", "c1")
    finally:
        await store.close()
    assert [m.content for m in alice] == ["from alice", ""]
    assert [m.content for m in bob] == ["from bob", ""]
    assert [m.content for m in alice_context] == ["from alice"]
    assert listed == {"alice": [("c1", "alice's")], "bob": [("c1", "bob's")]}
    assert alice_after == alice


async def test_a_write_that_fails_undoes_only_itself(history_backend: HistoryBackend) -> None:
    store = history_backend.store()
    await store.open()
    try:
        kept = await store.begin_turn("me", "earlier", "t", "r0", "kept")
        writes = [
            AnswerWrite(TurnStart("me", "a", "t", "ra", "first"), None, "", "streaming"),
            AnswerWrite(None, kept, "lost", cast(MessageStatus, "no such status")),
            AnswerWrite(TurnStart("me", "b", "t", "rb", "second"), None, "so far", "streaming"),
            AnswerWrite(None, kept, "done", "complete"),
        ]
        results = await store.write_answers(writes)
        stored = {c: await store.messages("me", c) for c in ("a", "b", "earlier")}
    finally:
        await store.close()
    assert isinstance(results[1], StorageError)
    assert results[3] == kept
    assert isinstance(results[0], int)
    assert isinstance(results[2], int)
    assert results[0] < results[2]  # in the order given
    assert [(m.content, m.status) for m in stored["a"]] == [
        ("first", "complete"),
        ("", "streaming"),
    ]
    assert [(m.id, m.content, m.status) for m in stored["b"]][1] == (
        results[2],
        "so far",
        "streaming",
    )
    assert [(m.content, m.status) for m in stored["earlier"]] == [
        ("kept", "complete"),
        ("done", "complete"),
    ]


async def test_every_text_is_stored_as_given_but_nul(history_backend: HistoryBackend) -> None:
    """PostgreSQL's text cannot hold U+0000: both stores keep U+FFFD in its place, and every
    other character as it was (quotes, backslashes, astral characters, a dollar sign as
    PostgreSQL's parameters are written)."""
    text = 'it\'s \\ "q" $1 %s 😀 \u2028 tab\tend'
    store = history_backend.store()
    await store.open()
    try:
        answer = await store.begin_turn("me", "c", "title\x00", "r1", text + "\x00!")
        await store.save_answer(answer, "\x00" + text, "complete")
        renamed = await store.rename_conversation("me", "c", "new\x00name")
        messages = await store.messages("me", "c")
        listed = await store.list_conversations("me", 10, None)
    finally:
        await store.close()
    assert [m.content for m in messages] == [text + "\ufffd!", "\ufffd" + text]
    assert renamed is not None
    assert renamed.title == "new\ufffdname"
    assert [c.title for c in listed] == ["new\ufffdname"]


async def test_context_is_the_last_finished_messages(history_backend: HistoryBackend) -> None:
    store = history_backend.store()
    await store.open()
    try:
        for index, status in enumerate(["complete", "error", "stopped", "streaming"]):
            answer = await store.begin_turn("me", "c", "t", f"r{index}", f"q{index}")
            await store.save_answer(
                answer, f"a{index}", cast(MessageStatus, status), "x" if status == "error" else None
            )
        context = await store.context("me", "c", 4)
        everything = await store.context("me", "c", 100)
        listed = await store.list_conversations("me", 10, None)
        before = await store.list_conversations("me", 10, listed[0].updated_at)
        created = await store.claim_conversation("me", "empty", "")
        empty = await store.messages("me", "empty")
    finally:
        await store.close()
    assert created is None
    assert empty == []
    assert [(m.content, m.status) for m in context] == [
        ("q1", "complete"),
        ("q2", "complete"),
        ("a2", "stopped"),
        ("q3", "complete"),
    ]
    assert [m.content for m in everything] == ["q0", "a0", "q1", "q2", "a2", "q3"]
    assert [c.id for c in listed] == ["c"]
    assert before == []


def _version_1_database(path: Path) -> None:
    """A database as schema version 1 left it: conversation ids unique across owners."""
    with contextlib.closing(sqlite3.connect(path, isolation_level=None)) as db:
        db.execute("PRAGMA foreign_keys = ON")
        db.execute("BEGIN")
        for statement in MIGRATIONS[0].split(";"):
            if statement.strip():
                db.execute(statement)
        db.execute("CREATE TABLE schema_version (version INTEGER NOT NULL)")
        db.execute("INSERT INTO schema_version VALUES (1)")
        conversations = [
            ("c1", "alice", "alice's", 1.0, 2.0),
            ("b1", "bob", "bob's", 3.0, 4.0),
            ("gone", "bob", "deleted", 5.0, 6.0),
        ]
        db.executemany("INSERT INTO conversations VALUES (?, ?, ?, ?, ?)", conversations)
        messages = [
            (1, "c1", "user", "hi", "complete", "r1", None, 1.0),
            (2, "c1", "assistant", "hello", "complete", "r1", None, 1.5),
            (3, "b1", "user", "hey", "complete", "r2", None, 3.0),
            (4, "b1", "assistant", "cut", "error", "r2", "upstream_timeout", 3.5),
            (5, "b1", "user", "again", "complete", "r3", None, 3.6),
            (6, "b1", "assistant", "half", "streaming", "r3", None, 3.7),
            (7, "gone", "user", "bye", "complete", "r4", None, 5.0),
            (8, "gone", "assistant", "", "streaming", "r4", None, 5.0),
        ]
        db.executemany("INSERT INTO messages VALUES (?, ?, ?, ?, ?, ?, ?, ?)", messages)
        db.execute("DELETE FROM conversations WHERE id = 'gone'")  # its messages go with it
        db.execute("COMMIT")


async def test_a_version_1_database_is_migrated_with_its_rows(tmp_path: Path) -> None:
    path = tmp_path / "h.sqlite3"
    _version_1_database(path)
    store = SQLiteHistoryStore(path)
    await store.open()
    try:
        alice = await store.messages("alice", "c1")
        bob = await store.messages("bob", "b1")
        conversations = await store.list_conversations("bob", 10, None)
        # The composite key: bob may now have a "c1" of his own.
        next_id = await store.begin_turn("bob", "c1", "t", "r5", "mine too")
        assert await store.delete_conversation("alice", "c1")
    finally:
        await store.close()
    assert [(m.id, m.role, m.content, m.status) for m in alice] == [
        (1, "user", "hi", "complete"),
        (2, "assistant", "hello", "complete"),
    ]
    assert [(m.id, m.content, m.status, m.error_code) for m in bob] == [
        (3, "hey", "complete", None),
        (4, "cut", "error", "upstream_timeout"),
        (5, "again", "complete", None),
        (6, "half", "interrupted", None),
    ]
    assert [(c.id, c.owner, c.title, c.created_at, c.updated_at) for c in conversations] == [
        ("b1", "bob", "bob's", 3.0, 4.0)
    ]
    assert next_id == 10  # ids 7 and 8 were handed out once: never again
    with contextlib.closing(sqlite3.connect(path)) as db:
        assert db.execute("SELECT version FROM schema_version").fetchall() == [(len(MIGRATIONS),)]
        assert db.execute("PRAGMA integrity_check").fetchall() == [("ok",)]
        assert db.execute("PRAGMA foreign_key_check").fetchall() == []
        keys = db.execute("PRAGMA foreign_key_list(messages)").fetchall()
        # (id, seq, table, from, to, on_update, on_delete, match)
        assert [(k[2], k[3], k[4], k[6]) for k in keys] == [
            ("conversations", "owner", "owner", "CASCADE"),
            ("conversations", "conversation_id", "id", "CASCADE"),
        ]
        indexes = {
            row[0] for row in db.execute("SELECT name FROM sqlite_master WHERE type='index'")
        }
        assert {
            "conversations_by_owner",
            "messages_by_conversation",
            "messages_streaming",
        } <= indexes
        # Deleting alice's conversation took its messages with it (the cascade survived).
        assert sorted(db.execute("SELECT DISTINCT owner, conversation_id FROM messages")) == [
            ("bob", "b1"),
            ("bob", "c1"),
        ]


async def test_a_workers_answers_left_streaming_are_interrupted_and_no_one_elses(
    tmp_path: Path,
) -> None:
    """Workers share one file: opening a worker's store leaves the others' streaming answers
    alone, and a dead worker's are marked by name."""
    path = tmp_path / "h.sqlite3"
    stores = {name: SQLiteHistoryStore(path, name) for name in ("w0", "w1")}
    ids = {}
    for name, store in stores.items():
        await store.open()
        ids[name] = await store.begin_turn("me", f"c-{name}", "t", f"r-{name}", "hi")
    late = SQLiteHistoryStore(path, "w2")
    await late.open()  # a worker started later: the others' answers still stream
    streaming = [m.status for name in stores for m in await late.messages("me", f"c-{name}")]
    for store in (*stores.values(), late):
        await store.close()

    assert mark_interrupted(path, "w0") == 1

    with contextlib.closing(sqlite3.connect(path)) as db:
        status = dict(db.execute("SELECT id, status FROM messages WHERE role = 'assistant'"))
    assert streaming == ["complete", "streaming", "complete", "streaming"]
    assert status == {ids["w0"]: "interrupted", ids["w1"]: "streaming"}
