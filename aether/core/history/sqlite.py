"""The SQLite history store: one file, WAL, its statements run on the event loop's thread.

Why not a worker thread: on CPython, a thread waiting for the GIL takes it only once the
holder has kept it for a whole switch interval without letting go, and a busy Trio loop lets go
(for every socket call and every poll) far more often than that. Under load a worker thread
then waited seconds for its turn: the answers' final saves timed out (5 s) and were lost. In WAL
mode with ``synchronous = NORMAL`` a commit writes to the log without waiting for the disk, so
running the statements here costs the loop tens of microseconds per write; reads are by index.
The one step that waits for the disk, copying the log into the database (a WAL checkpoint), runs
in a thread of its own (``WALCheckpointer``): if that thread is slow to get the GIL, the log
just grows a little longer meanwhile.

Writes are batched: every write queued within one scheduling round runs in the same
transaction, each in a savepoint of its own (one write's failure undoes only that write), so
fifty chats ending at once cost one commit, not fifty. ``write_answers`` hands in a whole batch at
once (the history's answer writer: every turn's start, progress and final save of one cycle).

Error handling: every ``sqlite3.Error`` becomes ``StorageError`` (logged with its detail); a
failed transaction is rolled back, so what was stored before stays intact.

Startup: ``prepare_database`` checks the file before anything else touches it, and fails with one
``StorageError`` naming the file and the problem (a directory, no permission, empty, not a
database, a newer schema). A new database is built under a temporary name and linked into place
once its schema is written, so a file of zero bytes is never Aether's: it may be a truncated
database, and it is refused rather than silently started afresh.

@.architecture
role: SQLite history store
jobs: [history_management, schema_migration, crash_recovery]
"""

from __future__ import annotations

import contextlib
import logging
import os
import secrets
import sqlite3
import stat
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from functools import partial
from pathlib import Path
from typing import Any, Generic, TypeVar

import outcome
import trio

from aether.core.errors import StorageError, UnknownConversation
from aether.core.history.store import (
    CONVERSATION_COLUMNS,
    MESSAGE_COLUMNS,
    AnswerWrite,
    Conversation,
    MessageStatus,
    StoredMessage,
    TurnStart,
    UsageTotal,
    conversation_from_row,
    day_start,
    message_from_row,
    storable,
    usage_day,
    usage_sql,
)
from aether.core.usage import Usage

log = logging.getLogger(__name__)
T = TypeVar("T")
# The WAL checkpointer's pace: at most one checkpoint this often (while writes keep coming).
CHECKPOINT_EVERY_S = 1.0
# If its thread has not managed one for this long (starved of the GIL by a saturated loop), the
# writer checkpoints itself, so the log cannot grow without bound.
CHECKPOINT_OVERDUE_S = 30.0
# What the WAL file is cut back to when the log restarts after a checkpoint.
WAL_SIZE_LIMIT_BYTES = 64 * 2**20

USAGE_MIGRATION = """
    ALTER TABLE messages ADD COLUMN model TEXT;
    ALTER TABLE messages ADD COLUMN prompt_tokens INTEGER;
    ALTER TABLE messages ADD COLUMN completion_tokens INTEGER;
    ALTER TABLE messages ADD COLUMN usage_estimated BOOLEAN;
    CREATE TABLE usage (
        owner TEXT NOT NULL,
        day TEXT NOT NULL,
        model TEXT NOT NULL,
        turns INTEGER NOT NULL,
        prompt_tokens INTEGER NOT NULL,
        completion_tokens INTEGER NOT NULL,
        estimated_turns INTEGER NOT NULL,
        PRIMARY KEY (owner, day, model)
    )
"""

_USAGE_FOLD, _USAGE_SELECT = (
    sql.replace("$", "?") for sql in usage_sql("strftime('%Y-%m-%d', created_at, 'unixepoch')")
)

# Each migration runs once, in order, in one transaction; the schema's version is their count.
MIGRATIONS: tuple[str, ...] = (
    """
    CREATE TABLE conversations (
        id TEXT PRIMARY KEY,
        owner TEXT NOT NULL,
        title TEXT NOT NULL,
        created_at REAL NOT NULL,
        updated_at REAL NOT NULL
    );
    CREATE INDEX conversations_by_owner ON conversations (owner, updated_at DESC);
    CREATE TABLE messages (
        id INTEGER PRIMARY KEY AUTOINCREMENT,
        conversation_id TEXT NOT NULL REFERENCES conversations (id) ON DELETE CASCADE,
        role TEXT NOT NULL CHECK (role IN ('user', 'assistant')),
        content TEXT NOT NULL,
        status TEXT NOT NULL
            CHECK (status IN ('streaming', 'complete', 'stopped', 'error', 'interrupted')),
        request_id TEXT,
        error_code TEXT,
        created_at REAL NOT NULL
    );
    CREATE INDEX messages_by_conversation ON messages (conversation_id, id);
    """,
    # 2: conversation ids are per owner. SQLite cannot change a primary key in place: build the
    # new tables, copy the rows, drop the old ones, rename the new ones into place (renaming the
    # new tables, never the old ones, keeps every foreign key pointing at the final names).
    # Messages gain their conversation's owner, for the composite foreign key; message ids and
    # the AUTOINCREMENT counter are kept, so no id is ever handed out twice.
    """
    CREATE TABLE conversations_v2 (
        owner TEXT NOT NULL,
        id TEXT NOT NULL,
        title TEXT NOT NULL,
        created_at REAL NOT NULL,
        updated_at REAL NOT NULL,
        PRIMARY KEY (owner, id)
    );
    INSERT INTO conversations_v2 (owner, id, title, created_at, updated_at)
        SELECT owner, id, title, created_at, updated_at FROM conversations;
    CREATE TABLE messages_v2 (
        id INTEGER PRIMARY KEY AUTOINCREMENT,
        owner TEXT NOT NULL,
        conversation_id TEXT NOT NULL,
        role TEXT NOT NULL CHECK (role IN ('user', 'assistant')),
        content TEXT NOT NULL,
        status TEXT NOT NULL
            CHECK (status IN ('streaming', 'complete', 'stopped', 'error', 'interrupted')),
        request_id TEXT,
        error_code TEXT,
        created_at REAL NOT NULL,
        FOREIGN KEY (owner, conversation_id)
            REFERENCES conversations (owner, id) ON DELETE CASCADE
    );
    INSERT INTO messages_v2 (id, owner, conversation_id, role, content, status, request_id,
            error_code, created_at)
        SELECT m.id, c.owner, m.conversation_id, m.role, m.content, m.status, m.request_id,
            m.error_code, m.created_at
        FROM messages AS m JOIN conversations AS c ON c.id = m.conversation_id;
    DELETE FROM sqlite_sequence WHERE name = 'messages_v2';
    INSERT INTO sqlite_sequence (name, seq)
        SELECT 'messages_v2', seq FROM sqlite_sequence WHERE name = 'messages';
    DROP TABLE messages;
    DROP TABLE conversations;
    ALTER TABLE conversations_v2 RENAME TO conversations;
    ALTER TABLE messages_v2 RENAME TO messages;
    CREATE INDEX conversations_by_owner ON conversations (owner, updated_at DESC);
    CREATE INDEX messages_by_conversation ON messages (owner, conversation_id, id);
    """,
    # Version 3: which worker writes an answer, so that answers a dead worker left streaming
    # are marked interrupted without touching the other workers' (null: a single process).
    """
    ALTER TABLE messages ADD COLUMN writer TEXT;
    CREATE INDEX messages_streaming ON messages (writer) WHERE status = 'streaming';
    """,
    # Version 4: token usage. Each answer keeps its model and its turn's counts; the totals by
    # caller, day and model are kept apart, so that deleting a conversation leaves them.
    USAGE_MIGRATION,
)


def _connect(path: Path) -> sqlite3.Connection:
    connection = sqlite3.connect(path, check_same_thread=False, isolation_level=None)
    connection.execute("PRAGMA journal_mode = WAL")
    # The log restarts from its beginning after a complete checkpoint, but keeps the size it
    # grew to under load unless told otherwise: a burst left it at gigabytes for good.
    connection.execute(f"PRAGMA journal_size_limit = {WAL_SIZE_LIMIT_BYTES}")
    # NORMAL in WAL mode survives a crash of the process (not of the machine's power).
    connection.execute("PRAGMA synchronous = NORMAL")
    connection.execute("PRAGMA foreign_keys = ON")
    connection.execute("PRAGMA busy_timeout = 5000")
    return connection


@contextmanager
def _transaction(
    connection: sqlite3.Connection, lock_waits: list[float] | None = None
) -> Iterator[None]:
    """One write transaction: all of it is stored, or (on any error) none of it. How long
    taking the write lock took is appended to ``lock_waits``."""
    started = time.perf_counter()
    connection.execute("BEGIN IMMEDIATE")
    if lock_waits is not None:
        lock_waits.append(time.perf_counter() - started)
    try:
        yield
        connection.execute("COMMIT")
    except BaseException:
        if connection.in_transaction:
            connection.execute("ROLLBACK")
        raise


class _WriteJob(Generic[T]):
    """One write waiting for the writer; ``result`` is set once it ran (or its batch failed)."""

    __slots__ = ("fn", "result")

    def __init__(self, fn: Callable[[sqlite3.Connection], T]) -> None:
        self.fn = fn
        self.result: outcome.Outcome[T] | None = None


def _run_batch(writer: Callable[[], sqlite3.Connection], jobs: list[_WriteJob[Any]]) -> float:
    """Run every job in one transaction, each in its own savepoint. Returns how long taking the
    write lock took (another process's transaction holds it meanwhile)."""
    connection = writer()
    lock_waits: list[float] = []
    try:
        with _transaction(connection, lock_waits):
            for job in jobs:
                connection.execute("SAVEPOINT job")
                job.result = outcome.capture(job.fn, connection)
                if isinstance(job.result, outcome.Error):
                    connection.execute("ROLLBACK TO job")
                connection.execute("RELEASE job")
    except sqlite3.Error as exc:
        # The commit failed: nothing of the batch is stored, whatever each job returned.
        for job in jobs:
            job.result = outcome.Error(exc)
    return sum(lock_waits)


def _read(connection: sqlite3.Connection, sql: str, args: tuple[Any, ...]) -> list[Any]:
    """Every row of a query. Reads must consume their cursor: a half-read cursor keeps its read
    transaction open, and the connection keeps answering from that old snapshot (seen as a
    conversation "not found" right after it was stored)."""
    return connection.execute(sql, args).fetchall()


def _claim(
    db: sqlite3.Connection, owner: str, conversation_id: str, title: str, now: float
) -> None:
    """Create the owner's conversation, or touch it if it exists."""
    # A conversation claimed by a file upload gets its title from its first message.
    db.execute(
        "INSERT INTO conversations (owner, id, title, created_at, updated_at) "
        "VALUES (?, ?, ?, ?, ?) ON CONFLICT (owner, id) DO UPDATE SET "
        "updated_at = excluded.updated_at, "
        "title = CASE WHEN title = '' THEN excluded.title ELSE title END",
        (owner, conversation_id, storable(title), now, now),
    )


def _begin_turn(
    db: sqlite3.Connection,
    start: TurnStart,
    content: str,
    status: MessageStatus,
    error_code: str | None,
    writer: str | None = None,
    usage: Usage | None = None,
) -> int:
    """Store a turn: its conversation (claimed), the user's message and the answer as given."""
    now = time.time()
    _claim(db, start.owner, start.conversation_id, start.title, now)
    db.execute(
        "INSERT INTO messages (owner, conversation_id, role, content, status, "
        "request_id, created_at) VALUES (?, ?, 'user', ?, 'complete', ?, ?)",
        (start.owner, start.conversation_id, storable(start.user_text), start.request_id, now),
    )
    prompt, completion, estimated = _usage_columns(usage)
    cursor = db.execute(
        "INSERT INTO messages (owner, conversation_id, role, content, status, request_id, "
        "error_code, created_at, writer, model, prompt_tokens, completion_tokens, "
        "usage_estimated) VALUES (?, ?, 'assistant', ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
        (
            start.owner,
            start.conversation_id,
            storable(content),
            status,
            start.request_id,
            error_code,
            now,
            writer,
            start.model,
            prompt,
            completion,
            estimated,
        ),
    )
    message_id = cursor.lastrowid
    assert message_id is not None
    return message_id


def _usage_columns(usage: Usage | None) -> tuple[int | None, int | None, bool | None]:
    if usage is None:
        return None, None, None
    return usage.prompt_tokens, usage.completion_tokens, usage.estimated


def _save_answer(
    db: sqlite3.Connection,
    message_id: int,
    content: str,
    status: MessageStatus,
    error_code: str | None,
    usage: Usage | None = None,
) -> None:
    if usage is None:
        db.execute(
            "UPDATE messages SET content = ?, status = ?, error_code = ? WHERE id = ?",
            (storable(content), status, error_code, message_id),
        )
    else:
        db.execute(
            "UPDATE messages SET content = ?, status = ?, error_code = ?, prompt_tokens = ?, "
            "completion_tokens = ?, usage_estimated = ? WHERE id = ?",
            (storable(content), status, error_code, *_usage_columns(usage), message_id),
        )


def _write_answer(writer: str | None, write: AnswerWrite, db: sqlite3.Connection) -> int:
    if write.start is not None:
        return _begin_turn(
            db, write.start, write.content, write.status, write.error_code, writer, write.usage
        )
    assert write.message_id is not None
    _save_answer(db, write.message_id, write.content, write.status, write.error_code, write.usage)
    return write.message_id


def prepare_database(path: Path) -> None:
    """Check the history database file, create it if there is none, and bring its schema up to
    date. Raises StorageError, with a message that names the file and the problem."""
    if not _check_file(path):
        _create(path)
    try:
        # mode=rw: never creates the file (that is ``_create``'s job).
        uri = path.absolute().as_uri() + "?mode=rw"
        with contextlib.closing(sqlite3.connect(uri, uri=True, isolation_level=None)) as connection:
            connection.execute("PRAGMA busy_timeout = 5000")
            # Read first: a database that is not Aether's is left exactly as it was.
            version = _schema_version(connection, path)
            connection.execute("PRAGMA journal_mode = WAL")
            _migrate(connection, path, version)
    except sqlite3.Error as exc:
        raise StorageError(_describe(path, exc)) from exc


def _check_file(path: Path) -> bool:
    """Whether the database exists; raises StorageError if the file cannot be one of ours."""
    try:
        info = path.stat()
    except FileNotFoundError:
        return False
    except OSError as exc:
        raise StorageError(f"history database {path}: {exc.strerror}") from exc
    if stat.S_ISDIR(info.st_mode):
        raise StorageError(f"history database {path} is a directory, not a database file")
    if not stat.S_ISREG(info.st_mode):
        raise StorageError(f"history database {path} is not a regular file")
    if not os.access(path, os.R_OK | os.W_OK):
        raise StorageError(
            f"history database {path}: permission denied (Aether must be able to read and write it)"
        )
    if info.st_size == 0:
        raise StorageError(
            f"history database {path} is empty (0 bytes): it may be a truncated database. "
            "Restore it, or move it away to start a new history"
        )
    return True


def _create(path: Path) -> None:
    """A new database, built under a temporary name and linked into place once its schema is
    written: a half-made (or empty) database is never found at ``path``."""
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise StorageError(f"history database {path}: {exc.strerror}") from exc
    building = path.with_name(f".{path.name}.{secrets.token_hex(4)}.new")
    try:
        # The default rollback journal writes everything into the file itself; WAL mode is
        # switched on last, and closing leaves no log beside the file.
        with contextlib.closing(sqlite3.connect(building, isolation_level=None)) as connection:
            _migrate(connection, path, 0)
            connection.execute("PRAGMA journal_mode = WAL")
        try:
            os.link(building, path)  # never replaces: a database made meanwhile wins
        except FileExistsError:
            pass
        except OSError:
            os.replace(building, path)  # a file system without hard links
    except sqlite3.Error as exc:
        raise StorageError(_describe(path, exc)) from exc
    except OSError as exc:
        raise StorageError(f"history database {path}: {exc.strerror}") from exc
    finally:
        with contextlib.suppress(OSError):
            building.unlink(missing_ok=True)


def _describe(path: Path, exc: sqlite3.Error) -> str:
    """One line for an operator: what is wrong with the database file."""
    name = getattr(exc, "sqlite_errorname", "")
    if name in ("SQLITE_NOTADB", "SQLITE_CORRUPT"):
        return f"history database {path} is not a SQLite database, or it is damaged ({exc})"
    if name.startswith("SQLITE_READONLY"):
        return f"history database {path} cannot be written ({exc})"
    if name.startswith("SQLITE_CANTOPEN"):
        return f"history database {path} cannot be opened ({exc}): check the directory's rights"
    return f"history database {path}: {exc}"


def _schema_version(connection: sqlite3.Connection, path: Path) -> int:
    """The database's schema version (0 for a new one); StorageError if it is not Aether's."""
    tables = {row[0] for row in connection.execute("SELECT name FROM sqlite_master")}
    row = None
    if "schema_version" in tables:
        row = connection.execute("SELECT version FROM schema_version").fetchone()
    version = int(row[0]) if row else 0
    if version == 0 and tables - {"schema_version"}:
        raise StorageError(
            f"history database {path} is a SQLite database of something else (it has tables "
            "but no Aether schema version)"
        )
    if version > len(MIGRATIONS):
        raise StorageError(
            f"history database {path} has schema version {version}, newer than this Aether "
            f"({len(MIGRATIONS)}): run a newer Aether, or use another db_path"
        )
    return version


def _migrate(connection: sqlite3.Connection, path: Path, version: int) -> None:
    """Run the migrations after ``version``, each in one transaction."""
    if version == len(MIGRATIONS):
        return
    connection.execute("CREATE TABLE IF NOT EXISTS schema_version (version INTEGER NOT NULL)")
    # A migration may rebuild a table others refer to: foreign keys are off while it runs
    # (they cannot be switched inside a transaction) and checked before it commits.
    connection.execute("PRAGMA foreign_keys = OFF")
    try:
        for number, migration in enumerate(MIGRATIONS[version:], version + 1):
            with _transaction(connection):
                for statement in migration.split(";"):
                    if statement.strip():
                        connection.execute(statement)
                if connection.execute("PRAGMA foreign_key_check").fetchall():
                    raise StorageError(
                        f"migrating the history database to schema version {number} "
                        "broke a foreign key; nothing was changed"
                    )
                connection.execute("DELETE FROM schema_version")
                connection.execute("INSERT INTO schema_version (version) VALUES (?)", (number,))
            log.info("history schema migrated to version %d", number)
    finally:
        connection.execute("PRAGMA foreign_keys = ON")


class WALCheckpointer:
    """A thread that checkpoints the WAL when asked, at most every ``CHECKPOINT_EVERY_S``, on a
    connection of its own (PASSIVE: it never blocks the writer or the readers)."""

    def __init__(self, path: Path) -> None:
        self._path = path
        self._wanted = threading.Event()
        self._closing = threading.Event()
        self.checkpoints = 0
        self.done = threading.Event()  # set after each checkpoint (tests wait on it)
        self.last_done = time.monotonic()
        self._thread = threading.Thread(target=self._run, name="aether-wal-checkpoint")
        self._thread.daemon = True
        self._thread.start()

    def request(self) -> None:
        self._wanted.set()

    @property
    def overdue(self) -> bool:
        return time.monotonic() - self.last_done > CHECKPOINT_OVERDUE_S

    def _run(self) -> None:
        connection = _connect(self._path)
        try:
            while True:
                self._wanted.wait()
                if self._closing.is_set():
                    return
                self._wanted.clear()
                try:
                    connection.execute("PRAGMA wal_checkpoint(PASSIVE)").fetchall()
                except sqlite3.Error as exc:
                    log.warning("history store %s: checkpoint failed: %r", self._path, exc)
                self.checkpoints += 1
                self.last_done = time.monotonic()
                self.done.set()
                if self._closing.wait(CHECKPOINT_EVERY_S):
                    return
        finally:
            connection.close()

    def close(self) -> None:
        """Stop the thread (it may finish a checkpoint first)."""
        self._closing.set()
        self._wanted.set()
        self._thread.join()


def mark_interrupted(path: Path, writer: str | None = None) -> int:
    """Mark the answers left ``streaming`` as ``interrupted`` (their writer is gone): every one,
    or those of ``writer`` (a worker that died while others write on). Returns how many."""
    sql = "UPDATE messages SET status = 'interrupted' WHERE status = 'streaming'"
    args: tuple[str, ...] = ()
    if writer is not None:
        sql, args = sql + " AND writer = ?", (writer,)
    connection = _connect(path)
    try:
        with _transaction(connection):
            return connection.execute(sql, args).rowcount
    finally:
        connection.close()


class SQLiteHistoryStore:
    """``writer`` names this process among several sharing the file (a worker id): its answers
    carry it, and opening the store leaves the other writers' streaming answers alone (the
    supervisor marks a dead worker's). Without it, this process is the only writer: opening
    marks every answer left streaming as interrupted."""

    def __init__(
        self,
        path: Path,
        writer: str | None = None,
        on_commit: Callable[[float, float], None] | None = None,
    ) -> None:
        self.path = path
        self.writer = writer
        # Told how long each write batch held the event loop and, of that, how long it waited
        # for the write lock (another worker's transaction on the same file), in seconds.
        self._on_commit = on_commit
        self._writer: sqlite3.Connection | None = None
        self._reader: sqlite3.Connection | None = None
        self._pending_writes: list[_WriteJob[Any]] = []
        self.write_batches = 0  # transactions that ran writes
        self.checkpointer: WALCheckpointer | None = None

    async def _run(self, fn: Callable[[], T]) -> T:
        """Run a read (or open/close) after a checkpoint, mapping SQLite's errors."""
        await trio.lowlevel.checkpoint()
        try:
            return fn()
        except sqlite3.Error as exc:
            log.error("history store %s: %r", self.path, exc)
            raise StorageError("the history store failed; the answer was not stored") from exc

    async def _write(self, fn: Callable[[sqlite3.Connection], T]) -> T:
        """Run ``fn`` in a write transaction of its own (a savepoint of a shared batch)."""
        job: _WriteJob[T] = _WriteJob(fn)
        await self._submit([job])
        return self._result(job)

    async def _submit(self, jobs: list[_WriteJob[Any]], gather: bool = True) -> None:
        """Queue ``jobs`` and return once they ran, each in a savepoint of the same batch; with
        ``gather``, after a scheduling round in which other writes may join them."""
        if not jobs:
            return
        self._pending_writes.extend(jobs)
        try:
            # One scheduling round: the other writes of this round join the batch. The first
            # task back runs them all; the others find their results set. Without it, a
            # cancellation checkpoint only (the batch takes the writes queued so far).
            if gather:
                await trio.lowlevel.checkpoint()
            else:
                await trio.lowlevel.checkpoint_if_cancelled()
        except BaseException:
            for job in jobs:
                if job.result is None and job in self._pending_writes:
                    self._pending_writes.remove(job)  # cancelled before any batch took it
            raise
        if jobs[0].result is None:
            batch, self._pending_writes = self._pending_writes, []
            self.write_batches += 1
            try:
                started = time.perf_counter()
                lock_wait = _run_batch(self._w, batch)
                if self._on_commit is not None:
                    self._on_commit(time.perf_counter() - started, lock_wait)
                self._after_commit()
            finally:
                for taken in batch:
                    if taken.result is None:  # the batch never ran (store closed)
                        taken.result = outcome.Error(
                            sqlite3.ProgrammingError("the history store is not open")
                        )

    def _result(self, job: _WriteJob[T]) -> T:
        assert job.result is not None
        try:
            return job.result.unwrap()
        except sqlite3.Error as exc:
            log.error("history store %s: %r", self.path, exc)
            raise StorageError("the history store failed; the answer was not stored") from exc

    def _w(self) -> sqlite3.Connection:
        if self._writer is None:
            raise StorageError("the history store is not open")
        return self._writer

    def _r(self) -> sqlite3.Connection:
        if self._reader is None:
            raise StorageError("the history store is not open")
        return self._reader

    def _after_commit(self) -> None:
        checkpointer = self.checkpointer
        if checkpointer is None:
            return
        if checkpointer.overdue:
            log.warning("history store %s: checkpointing on the event loop (overdue)", self.path)
            with contextlib.suppress(sqlite3.Error):
                self._w().execute("PRAGMA wal_checkpoint(PASSIVE)").fetchall()
            checkpointer.last_done = time.monotonic()
        checkpointer.request()

    async def open(self) -> None:
        def open_sync() -> int:
            prepare_database(self.path)
            interrupted = mark_interrupted(self.path) if self.writer is None else 0
            self._writer = _connect(self.path)
            # Commits never checkpoint (that waits for the disk); the checkpointer does.
            self._writer.execute("PRAGMA wal_autocheckpoint = 0")
            self._reader = _connect(self.path)
            return interrupted

        interrupted = await self._run(open_sync)
        self.checkpointer = WALCheckpointer(self.path)
        if self.writer is None:
            log.info(
                "history in %s (%d answers left streaming marked interrupted)",
                self.path,
                interrupted,
            )
        else:
            log.info("history in %s, shared with the other workers", self.path)

    @property
    def files_archive(self) -> None:
        """Uploaded files stay on this machine's disk."""
        return None

    async def maintain(self) -> None:
        """Nothing to keep up: the WAL checkpointer is a thread of its own."""

    async def close(self) -> None:
        def close_sync() -> None:
            for connection in (self._reader, self._writer):
                if connection is not None:
                    connection.close()
            self._reader = self._writer = None

        checkpointer, self.checkpointer = self.checkpointer, None
        if checkpointer is not None:
            with trio.CancelScope(shield=True):
                await trio.to_thread.run_sync(checkpointer.close)
        close_sync()  # the last connection to close checkpoints what is left
        await trio.lowlevel.checkpoint()

    async def has_conversation(self, owner: str, conversation_id: str) -> bool:
        def run() -> bool:
            return bool(
                _read(
                    self._r(),
                    "SELECT 1 FROM conversations WHERE owner = ? AND id = ?",
                    (owner, conversation_id),
                )
            )

        return await self._run(run)

    async def context(self, owner: str, conversation_id: str, limit: int) -> list[StoredMessage]:
        def run() -> list[StoredMessage]:
            rows = _read(
                self._r(),
                f"SELECT {MESSAGE_COLUMNS} FROM messages WHERE owner = ? AND conversation_id = ? "
                "AND content != '' AND status IN ('complete', 'stopped', 'interrupted') "
                "ORDER BY id DESC LIMIT ?",
                (owner, conversation_id, limit),
            )
            return [message_from_row(row) for row in reversed(rows)]

        return await self._run(run)

    async def claim_conversation(self, owner: str, conversation_id: str, title: str) -> None:
        await self._write(lambda db: _claim(db, owner, conversation_id, title, time.time()))

    async def begin_turn(
        self, owner: str, conversation_id: str, title: str, request_id: str, user_text: str
    ) -> int:
        start = TurnStart(owner, conversation_id, title, request_id, user_text)
        return await self._write(
            lambda db: _begin_turn(db, start, "", "streaming", None, self.writer)
        )

    async def save_answer(
        self,
        message_id: int,
        content: str,
        status: MessageStatus,
        error_code: str | None = None,
    ) -> None:
        await self._write(lambda db: _save_answer(db, message_id, content, status, error_code))

    async def write_answers(self, writes: Sequence[AnswerWrite]) -> list[int | StorageError]:
        jobs = [_WriteJob(partial(_write_answer, self.writer, write)) for write in writes]
        with contextlib.suppress(StorageError):  # the store is closed: each job says so
            # The answer writer has gathered its batch already: no round to wait for others.
            await self._submit(jobs, gather=False)
        results: list[int | StorageError] = []
        for job in jobs:
            try:
                results.append(self._result(job))
            except StorageError as exc:
                results.append(exc)
        return results

    async def list_conversations(
        self, owner: str, limit: int, before: float | None
    ) -> list[Conversation]:
        def run() -> list[Conversation]:
            rows = (
                self._r()
                .execute(
                    f"SELECT {CONVERSATION_COLUMNS} FROM conversations WHERE owner = ? "
                    "AND updated_at < ? ORDER BY updated_at DESC, id LIMIT ?",
                    (owner, before if before is not None else float("inf"), limit),
                )
                .fetchall()
            )
            return [conversation_from_row(row) for row in rows]

        return await self._run(run)

    async def messages(self, owner: str, conversation_id: str) -> list[StoredMessage]:
        def run() -> list[StoredMessage]:
            db = self._r()
            found = _read(
                db,
                "SELECT 1 FROM conversations WHERE owner = ? AND id = ?",
                (owner, conversation_id),
            )
            if not found:
                raise UnknownConversation(f"no conversation with id {conversation_id!r}")
            rows = _read(
                db,
                f"SELECT {MESSAGE_COLUMNS} FROM messages WHERE owner = ? AND conversation_id = ? "
                "ORDER BY id",
                (owner, conversation_id),
            )
            return [message_from_row(row) for row in rows]

        return await self._run(run)

    async def rename_conversation(
        self, owner: str, conversation_id: str, title: str
    ) -> Conversation | None:
        def run(db: sqlite3.Connection) -> Conversation | None:
            rows = db.execute(
                f"UPDATE conversations SET title = ? WHERE owner = ? AND id = ? "
                f"RETURNING {CONVERSATION_COLUMNS}",
                (storable(title), owner, conversation_id),
            ).fetchall()  # consumed whole: a statement left running would block the commit
            return conversation_from_row(rows[0]) if rows else None

        return await self._write(run)

    async def usage(self, owner: str, since: float) -> list[UsageTotal]:
        first_day = usage_day(since)

        def run() -> list[UsageTotal]:
            rows = _read(self._r(), _USAGE_SELECT, (owner, first_day, day_start(first_day)))
            return [UsageTotal(*row) for row in rows]

        return await self._run(run)

    async def delete_conversation(self, owner: str, conversation_id: str) -> bool:
        def run(db: sqlite3.Connection) -> bool:
            db.execute(_USAGE_FOLD, (owner, conversation_id))  # its usage stays counted
            cursor = db.execute(
                "DELETE FROM conversations WHERE owner = ? AND id = ?", (owner, conversation_id)
            )
            return cursor.rowcount > 0

        return await self._write(run)
