"""The conversation file store on its own: a batch of files is stored all or none, and with an
archive (PostgreSQL), each node's copy follows it."""

from __future__ import annotations

from pathlib import Path

import psycopg
import pytest
import trio

from aether.core.errors import FileStorageFailed
from aether.core.files import ConversationFiles
from tests.history_backends import PostgresBackend


async def test_a_failed_rename_puts_back_what_the_batch_replaced(tmp_path: Path) -> None:
    files = ConversationFiles(tmp_path, max_bytes=100, max_files=5, extensions=(".txt",))
    directory = files.directory("me", "c1")
    directory.mkdir(parents=True)
    (directory / "keep.txt").write_bytes(b"original")
    (directory / "b.txt").mkdir()  # the second file cannot be renamed onto a directory
    batch = await files.open_batch("me", "c1", ["keep.txt", "new.txt", "b.txt"])
    for data in (b"replaced", b"new", b"b"):
        upload = await batch.open_next()
        await upload.write(data)
        await upload.close()
    with pytest.raises(FileStorageFailed):
        await batch.finish()
    left = {p.name: p.read_bytes() for p in directory.iterdir() if p.is_file()}
    assert left == {"keep.txt": b"original"}
    assert [f.name for f in await files.stored("me", "c1")] == ["keep.txt"]


async def test_an_upload_the_archive_refuses_is_not_placed_either(
    tmp_path: Path, postgres: PostgresBackend
) -> None:
    store = postgres.store()
    await store.open()
    files = ConversationFiles(
        tmp_path, max_bytes=100, max_files=5, extensions=(".txt",), archive=store
    )
    try:
        # No such conversation in the history: the archive's foreign key refuses the files.
        batch = await files.open_batch("me", "c1", ["a.txt", "b.txt"])
        for data in (b"a", b"b"):
            upload = await batch.open_next()
            await upload.write(data)
            await upload.close()
        with pytest.raises(FileStorageFailed):
            await batch.finish()
        listed = await files.stored("me", "c1")
    finally:
        await store.close()
    assert listed == []
    placed = await trio.to_thread.run_sync(lambda: [p for p in tmp_path.rglob("*") if p.is_file()])
    assert placed == []


async def test_a_nodes_copy_follows_the_archive_and_keeps_what_code_wrote(
    tmp_path: Path, postgres: PostgresBackend
) -> None:
    store = postgres.store()
    await store.open()
    nodes = [
        ConversationFiles(
            tmp_path / name, max_bytes=100, max_files=5, extensions=(".txt",), archive=store
        )
        for name in ("a", "b")
    ]
    try:
        await store.claim_conversation("me", "c1", "")
        for name, data in (("one.txt", b"1"), ("two.txt", b"2")):
            upload = await nodes[0].open_upload("me", "c1", name)
            await upload.write(data)
            await upload.close()
            await upload.finish()
        first = await nodes[1].materialise("me", "c1")
        directory = nodes[1].directory("me", "c1")
        (directory / "result.txt").write_bytes(b"written by code")  # not an upload
        # Node a replaces one file; the archive loses the other (its conversation's files
        # were replaced as a whole elsewhere).
        upload = await nodes[0].open_upload("me", "c1", "one.txt")
        await upload.write(b"1 again")
        await upload.close()
        await upload.finish()
        with psycopg.connect(postgres.url, autocommit=True) as connection:
            connection.execute("DELETE FROM files WHERE name = 'two.txt'")
        second = await nodes[1].materialise("me", "c1")
        copy = {p.name: p.read_bytes() for p in directory.iterdir() if p.name[0] != "."}
    finally:
        await store.close()
    assert [(f.name, f.size) for f in first] == [("one.txt", 1), ("two.txt", 1)]
    assert [(f.name, f.size) for f in second] == [("one.txt", 7)]
    assert copy == {"one.txt": b"1 again", "result.txt": b"written by code"}
