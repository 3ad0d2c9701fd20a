"""Files a client uploads for file chat, kept per conversation.

Each conversation of each caller has a directory of its own under ``files_root``, named by a hash
of both: no client-chosen string becomes a path component except the file's own name, which is
reduced to a plain name first. A file is written as a hidden ``.part`` and renamed into place once
whole, so a failed or abandoned upload leaves nothing behind and a reader never sees half a file.
Several files sent together (``UploadBatch``) are stored all or none: every name and the count are
checked before a byte is written, and the files are renamed into place only once all are whole.
Limits: bytes per file, files per conversation, and accepted name extensions. Disk work runs in
worker threads.

Several nodes: with a ``FileArchive`` (the PostgreSQL history keeps one), the archive holds the
conversation's files and each node's directory is its copy of them. An upload is stored in the
archive before it is put in place (all the files of a batch in one transaction), listing asks
the archive, and ``materialise`` (before an agentic turn) brings the node's copy up to date: it
fetches what the archive has and the copy lacks or holds in another version, and removes what it
fetched once but the archive no longer has (``.archived.json`` records what came from the
archive, so files the turn's code wrote are left alone).

@.architecture
role: conversation file store
jobs: [file_storage, validation, cleanup]
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import secrets
import shutil
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import BinaryIO, Protocol, TypeVar

import trio

from aether.core.errors import (
    FileError,
    FileStorageFailed,
    FileTooLarge,
    FileTypeNotAllowed,
    StorageError,
    TooManyFiles,
)

log = logging.getLogger(__name__)
T = TypeVar("T")

MAX_NAME_CHARS = 100
# In a conversation's directory: the files that came from the archive, by name, with their
# SHA-256 (a hidden name: never listed, never uploaded over).
ARCHIVED_MANIFEST = ".archived.json"
_UNSAFE = re.compile(r"[^A-Za-z0-9 ._()+\-]")


async def _on_disk(fn: Callable[[], T]) -> T:
    """Run disk work in a thread; an OS error is logged and becomes FileStorageFailed."""
    try:
        return await trio.to_thread.run_sync(fn)
    except OSError as exc:
        log.error("file store: %r", exc)
        raise FileStorageFailed("the file could not be stored") from exc


@dataclass(frozen=True, slots=True)
class StoredFile:
    name: str
    size: int
    path: Path


@dataclass(frozen=True, slots=True)
class ArchivedFile:
    name: str
    size: int
    sha256: str


class FileArchive(Protocol):
    """Where a conversation's files are kept for every node. Raises StorageError."""

    async def put_files(
        self, owner: str, conversation_id: str, files: Sequence[tuple[str, bytes]]
    ) -> None:
        """Store every file (replacing one of the same name), all or none. The conversation
        exists."""

    async def archived_files(self, owner: str, conversation_id: str) -> list[ArchivedFile]:
        """The conversation's files, by name."""

    async def file_content(self, owner: str, conversation_id: str, name: str) -> bytes | None:
        """One file's bytes; None if it is not (or no longer) there."""


def file_json(stored: StoredFile) -> dict[str, object]:
    """What a client is told of a stored file (never the server's path)."""
    return {"name": stored.name, "size": stored.size}


def clean_file_name(name: str) -> str:
    """A client's file name as a plain name: its last path part, unusual characters replaced,
    no leading dots. Raises FileError when nothing usable is left."""
    base = name.replace("\\", "/").rsplit("/", 1)[-1].strip()
    base = _UNSAFE.sub("_", base).lstrip(". ")
    if len(base) > MAX_NAME_CHARS:
        stem, dot, extension = base.rpartition(".")
        keep = MAX_NAME_CHARS - len(dot + extension)
        base = stem[:keep] + dot + extension if dot and keep > 0 else base[:MAX_NAME_CHARS]
    if not base:
        raise FileError(f"{name[:64]!r} is not a usable file name")
    return base


class ConversationFiles:
    def __init__(
        self,
        root: Path,
        *,
        max_bytes: int,
        max_files: int,
        extensions: tuple[str, ...],
        archive: FileArchive | None = None,
    ) -> None:
        self.root = root
        self.max_bytes = max_bytes
        self.max_files = max_files
        self.extensions = frozenset(extensions)
        self.archive = archive

    def directory(self, owner: str, conversation_id: str) -> Path:
        digest = hashlib.sha256(f"{owner}\0{conversation_id}".encode()).hexdigest()[:32]
        return self.root / digest

    def check(self, name: str, size: int | None = None) -> str:
        """The cleaned name, if a file of that name (and size, when known) may be uploaded."""
        cleaned = clean_file_name(name)
        extension = Path(cleaned).suffix.lower()
        if extension not in self.extensions:
            allowed = ", ".join(sorted(self.extensions))
            raise FileTypeNotAllowed(
                f"files of type {extension or '(none)'!r} are not accepted; accepted: {allowed}"
            )
        if size is not None and size > self.max_bytes:
            raise FileTooLarge(f"files are limited to {self.max_bytes} bytes")
        return cleaned

    async def stored(self, owner: str, conversation_id: str) -> list[StoredFile]:
        """The conversation's files (the archive's, with the paths of this node's copies)."""
        directory = self.directory(owner, conversation_id)
        if self.archive is None:
            return await _on_disk(lambda: self._list(directory))
        archived = await self._archived(owner, conversation_id)
        return [StoredFile(file.name, file.size, directory / file.name) for file in archived]

    async def materialise(self, owner: str, conversation_id: str) -> list[StoredFile]:
        """Bring this node's copy of the conversation's files up to date (with an archive), and
        return them: what a turn that opens them calls first."""
        directory = self.directory(owner, conversation_id)
        if self.archive is None:
            return await _on_disk(lambda: self._list(directory))
        archive = self.archive
        archived = await self._archived(owner, conversation_id)
        manifest = await _on_disk(lambda: _read_manifest(directory))
        wanted = {file.name: file for file in archived}
        for name in set(manifest) - set(wanted):
            await _on_disk(partial((directory / name).unlink, missing_ok=True))
            del manifest[name]
        for file in archived:
            target = directory / file.name
            if manifest.get(file.name) == file.sha256 and await _on_disk(target.is_file):
                continue
            try:
                content = await archive.file_content(owner, conversation_id, file.name)
            except StorageError as exc:
                raise FileStorageFailed("the conversation's files could not be fetched") from exc
            if content is None:  # deleted meanwhile
                continue
            await _on_disk(partial(_write_whole, directory, file.name, content))
            manifest[file.name] = file.sha256
        await _on_disk(lambda: _write_manifest(directory, manifest))
        return [StoredFile(file.name, file.size, directory / file.name) for file in archived]

    async def _archived(self, owner: str, conversation_id: str) -> list[ArchivedFile]:
        assert self.archive is not None
        try:
            return await self.archive.archived_files(owner, conversation_id)
        except StorageError as exc:
            raise FileStorageFailed("the conversation's files could not be listed") from exc

    def _publisher(self, owner: str, conversation_id: str) -> Publish | None:
        """What stores a finished upload's files in the archive before they are put in place."""
        archive = self.archive
        if archive is None:
            return None
        directory = self.directory(owner, conversation_id)

        async def publish(uploads: Sequence[Upload]) -> None:
            contents = await _on_disk(lambda: [(u.name, u._part.read_bytes()) for u in uploads])
            try:
                await archive.put_files(owner, conversation_id, contents)
            except StorageError as exc:
                raise FileStorageFailed("the file could not be stored") from exc

            def record() -> None:
                manifest = _read_manifest(directory)
                for name, content in contents:
                    manifest[name] = hashlib.sha256(content).hexdigest()
                _write_manifest(directory, manifest)

            await _on_disk(record)

        return publish

    async def _count_held(self, owner: str, conversation_id: str) -> set[str]:
        """The names the conversation holds (for the per-conversation limit)."""
        return {stored.name for stored in await self.stored(owner, conversation_id)}

    @staticmethod
    def _list(directory: Path) -> list[StoredFile]:
        if not directory.is_dir():
            return []
        return sorted(
            (
                StoredFile(path.name, path.stat().st_size, path)
                for path in directory.iterdir()
                if path.is_file() and not path.name.startswith(".")
            ),
            key=lambda stored: stored.name,
        )

    def _check_room(self, held: set[str], names: Sequence[str]) -> None:
        """Raise TooManyFiles unless ``names`` fit beside what the conversation holds (a name it
        holds already is replaced, so it takes no more room)."""
        if len(names) > self.max_files or len(held.union(names)) > self.max_files:
            raise TooManyFiles(f"a conversation may hold at most {self.max_files} files")

    async def open_upload(self, owner: str, conversation_id: str, name: str) -> Upload:
        """Start writing a file; ``Upload.finish`` puts it in place, ``abort`` drops it."""
        cleaned = self.check(name)
        directory = self.directory(owner, conversation_id)
        self._check_room(await self._count_held(owner, conversation_id), [cleaned])
        return await _open_part(
            directory, cleaned, self.max_bytes, self._publisher(owner, conversation_id)
        )

    async def open_batch(
        self, owner: str, conversation_id: str, names: Sequence[str]
    ) -> UploadBatch:
        """Check every name and that all the files fit, before any is written; the files are
        then written one after another (``UploadBatch.open_next``)."""
        cleaned = [self.check(name) for name in names]
        directory = self.directory(owner, conversation_id)
        self._check_room(await self._count_held(owner, conversation_id), cleaned)
        return UploadBatch(
            directory, cleaned, self.max_bytes, self._publisher(owner, conversation_id)
        )

    async def delete_conversation(self, owner: str, conversation_id: str) -> None:
        directory = self.directory(owner, conversation_id)
        await _on_disk(lambda: shutil.rmtree(directory, ignore_errors=True))


def _read_manifest(directory: Path) -> dict[str, str]:
    try:
        loaded = json.loads((directory / ARCHIVED_MANIFEST).read_text())
    except FileNotFoundError:
        return {}
    except ValueError:
        log.warning("%s: unreadable, fetching every file again", directory / ARCHIVED_MANIFEST)
        return {}
    return {str(name): str(digest) for name, digest in dict(loaded).items()}


def _write_whole(directory: Path, name: str, content: bytes) -> None:
    """Write a file under a hidden name, then rename it into place: never seen half-written."""
    directory.mkdir(parents=True, exist_ok=True)
    part = directory / f".{secrets.token_hex(8)}.part"
    try:
        part.write_bytes(content)
        part.replace(directory / name)
    finally:
        part.unlink(missing_ok=True)


def _write_manifest(directory: Path, manifest: dict[str, str]) -> None:
    if manifest or (directory / ARCHIVED_MANIFEST).exists():
        _write_whole(directory, ARCHIVED_MANIFEST, json.dumps(manifest).encode())


Publish = Callable[[Sequence["Upload"]], Awaitable[None]]


async def _open_part(
    directory: Path, name: str, max_bytes: int, publish: Publish | None = None
) -> Upload:
    part = directory / f".{secrets.token_hex(8)}.part"

    def create() -> BinaryIO:
        directory.mkdir(parents=True, exist_ok=True)
        return part.open("wb")

    handle = await _on_disk(create)
    return Upload(handle, part, directory / name, max_bytes, publish)


class Upload:
    """One file being written. Not safe for concurrent use: one writer at a time."""

    def __init__(
        self,
        handle: BinaryIO,
        part: Path,
        target: Path,
        max_bytes: int,
        publish: Publish | None = None,
    ) -> None:
        self._handle = handle
        self._part = part
        self.target = target
        self._max_bytes = max_bytes
        self._publish = publish
        self.received = 0
        self._done = False

    @property
    def name(self) -> str:
        return self.target.name

    async def write(self, data: bytes) -> None:
        if self.received + len(data) > self._max_bytes:
            raise FileTooLarge(f"files are limited to {self._max_bytes} bytes")
        self.received += len(data)
        await _on_disk(lambda: self._handle.write(data))

    async def close(self) -> None:
        """The last byte is written: close the file, which stays hidden until ``finish``."""
        await _on_disk(self._handle.close)

    async def finish(self) -> StoredFile:
        def rename() -> None:
            self._handle.close()
            self._part.replace(self.target)  # a file of that name is replaced

        try:
            with trio.CancelScope(shield=True):
                if self._publish is not None:
                    await _on_disk(self._handle.close)
                    await self._publish([self])
                await _on_disk(rename)
        except FileStorageFailed:
            await self.abort()
            raise
        return self._placed()

    def _placed(self) -> StoredFile:
        self._done = True
        log.info("stored %s (%d bytes)", self.target, self.received)
        return StoredFile(self.target.name, self.received, self.target)

    async def abort(self) -> None:
        """Drop what was written (safe to call more than once, and after ``finish``)."""
        if self._done:
            return
        self._done = True

        def remove() -> None:
            self._handle.close()
            self._part.unlink(missing_ok=True)

        with trio.CancelScope(shield=True):
            try:
                await trio.to_thread.run_sync(remove)
            except OSError:
                log.warning("could not remove %s", self._part, exc_info=True)


class UploadBatch:
    """Files sent together, stored all or none. Each is written as a hidden ``.part``;
    ``finish`` renames them into place once all are written, and if one rename fails it puts
    back what the earlier ones replaced; ``abort`` removes every part. Until ``finish`` returns
    nothing of the batch is visible, and a file it would replace is untouched."""

    def __init__(
        self, directory: Path, names: list[str], max_bytes: int, publish: Publish | None = None
    ) -> None:
        self._directory = directory
        self.names = names
        self._max_bytes = max_bytes
        self._publish = publish
        self._uploads: list[Upload] = []

    async def open_next(self) -> Upload:
        """Start writing the next file, in the order of ``names``; ``close`` it once written."""
        name = self.names[len(self._uploads)]
        upload = await _open_part(self._directory, name, self._max_bytes)
        self._uploads.append(upload)
        return upload

    async def finish(self) -> list[StoredFile]:
        if len(self._uploads) != len(self.names):
            await self.abort()
            raise FileError("not every file of the upload was written")
        try:
            with trio.CancelScope(shield=True):
                if self._publish is not None:
                    await self._publish(self._uploads)
                await _on_disk(self._place_all)
        except FileStorageFailed:
            await self.abort()
            raise
        return [upload._placed() for upload in self._uploads]

    def _place_all(self) -> None:
        """Rename every part into place; on a failure, undo the renames already done. A file
        about to be replaced is first kept under a hidden hard link, so that it can be put
        back and is never missing meanwhile."""
        placed: list[tuple[Upload, Path | None]] = []
        try:
            for upload in self._uploads:
                kept: Path | None = None
                if upload.target.exists():
                    kept = self._directory / f".{secrets.token_hex(8)}.kept"
                    os.link(upload.target, kept)
                placed.append((upload, kept))
                upload._part.replace(upload.target)
        except OSError:
            for upload, kept in reversed(placed):
                try:
                    if kept is not None:
                        kept.replace(upload.target)
                    elif not upload._part.exists():
                        upload.target.unlink(missing_ok=True)
                except OSError:
                    log.error("could not undo the upload of %s", upload.target, exc_info=True)
            raise
        finally:
            for _, kept in placed:
                if kept is not None:
                    kept.unlink(missing_ok=True)

    async def abort(self) -> None:
        """Remove every part written so far (safe to call more than once)."""
        for upload in self._uploads:
            await upload.abort()
