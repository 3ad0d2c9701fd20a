"""The conversation file store on its own: a batch of files is stored all or none."""

from __future__ import annotations

from pathlib import Path

import pytest

from aether.core.errors import FileStorageFailed
from aether.core.files import ConversationFiles


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
