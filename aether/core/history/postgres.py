"""The PostgreSQL history store: the history of several nodes, one server database.

Same contract as the SQLite store (``HistoryStore``; the store tests run against both). Its
statements go through ``aether.core.postgres`` (libpq driven by the event loop, no threads): a
read is one round trip on a pooled connection; a batch of the answer writer (every start,
progress and final save of one cycle) is one round trip too, ``BEGIN``, its statements and
``COMMIT`` pipelined. A write of the batch that fails (its statement is refused) aborts the
transaction: it is rolled back and sent again without that write, so one bad write undoes only
itself, as a savepoint does in SQLite.

Crash marking by lease: each store (a process) writes its answers under a writer id of its own
(node id, worker id, and a random part: a restarted process is a new writer) and keeps a lease
row in ``writers`` alive, ``lease_s`` long, renewed every third of it on the database's clock.
Every store sweeps, at open and once per lease period: answers left ``streaming`` whose writer's
lease has expired become ``interrupted``. So a node killed with ``kill -9`` has its answers marked
within one to two lease periods by any node still running, and a node never marks the answers of
another that is alive.

Schema: created and migrated at open, one transaction holding an advisory lock, so nodes that
start together migrate once (the others wait for the lock, then find the schema current).

Errors: a failed statement, a lost connection or an operation slower than
``OPERATION_TIMEOUT_S`` is a ``StorageError`` (logged when the database goes from working to
failing, and again when it works again); a later call opens a new connection, so a restarted
server is recovered from by itself.

Text: PostgreSQL's text cannot hold U+0000. Both stores replace it with U+FFFD
(``store.storable``), so the contract is the same.

@.architecture
role: PostgreSQL history store
jobs: [history_management, schema_migration, crash_recovery]
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import math
import time
from collections.abc import Awaitable, Callable, Sequence
from typing import TypeVar
from urllib.parse import parse_qsl, urlencode, urlsplit

import psycopg
import trio

from aether.core.errors import StorageError, UnknownConversation
from aether.core.files import ArchivedFile, FileArchive
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
from aether.core.postgres.batching import ReadBatcher
from aether.core.postgres.connection import PgConnection, Row, Statement
from aether.core.postgres.pool import PgPool

log = logging.getLogger(__name__)
T = TypeVar("T")

# A statement (or batch) that takes longer fails: its connection is closed, which rolls it back.
OPERATION_TIMEOUT_S = 5.0
# The advisory lock key the schema migrations hold (any constant: "aether" in ASCII).
MIGRATION_LOCK = 0x616574686572

MIGRATIONS: tuple[str, ...] = (
    """
    CREATE TABLE conversations (
        owner TEXT NOT NULL,
        id TEXT NOT NULL,
        title TEXT NOT NULL,
        created_at DOUBLE PRECISION NOT NULL,
        updated_at DOUBLE PRECISION NOT NULL,
        PRIMARY KEY (owner, id)
    );
    CREATE INDEX conversations_by_owner ON conversations (owner, updated_at DESC);
    CREATE TABLE messages (
        id BIGINT GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
        owner TEXT NOT NULL,
        conversation_id TEXT NOT NULL,
        role TEXT NOT NULL CHECK (role IN ('user', 'assistant')),
        content TEXT NOT NULL,
        status TEXT NOT NULL
            CHECK (status IN ('streaming', 'complete', 'stopped', 'error', 'interrupted')),
        request_id TEXT,
        error_code TEXT,
        created_at DOUBLE PRECISION NOT NULL,
        writer TEXT,
        FOREIGN KEY (owner, conversation_id)
            REFERENCES conversations (owner, id) ON DELETE CASCADE
    );
    CREATE INDEX messages_by_conversation ON messages (owner, conversation_id, id);
    CREATE INDEX messages_streaming ON messages (writer) WHERE status = 'streaming';
    CREATE TABLE writers (
        id TEXT PRIMARY KEY,
        expires_at TIMESTAMPTZ NOT NULL
    );
    """,
    # 2: uploaded files, so that any node can run a conversation's next agentic turn; they go
    # with their conversation.
    """
    CREATE TABLE files (
        owner TEXT NOT NULL,
        conversation_id TEXT NOT NULL,
        name TEXT NOT NULL,
        size BIGINT NOT NULL,
        sha256 TEXT NOT NULL,
        content BYTEA NOT NULL,
        stored_at DOUBLE PRECISION NOT NULL,
        PRIMARY KEY (owner, conversation_id, name),
        FOREIGN KEY (owner, conversation_id)
            REFERENCES conversations (owner, id) ON DELETE CASCADE
    );
    """,
    # 3: token usage. Each answer keeps its model and its turn's counts; the totals by caller,
    # day and model are kept apart, so that deleting a conversation leaves them.
    """
    ALTER TABLE messages ADD COLUMN model TEXT;
    ALTER TABLE messages ADD COLUMN prompt_tokens BIGINT;
    ALTER TABLE messages ADD COLUMN completion_tokens BIGINT;
    ALTER TABLE messages ADD COLUMN usage_estimated BOOLEAN;
    CREATE TABLE usage (
        owner TEXT NOT NULL,
        day TEXT NOT NULL,
        model TEXT NOT NULL,
        turns BIGINT NOT NULL,
        prompt_tokens BIGINT NOT NULL,
        completion_tokens BIGINT NOT NULL,
        estimated_turns BIGINT NOT NULL,
        PRIMARY KEY (owner, day, model)
    );
    """,
)


_CLAIM = (
    "INSERT INTO conversations (owner, id, title, created_at, updated_at) "
    "VALUES ($1, $2, $3, $4, $4) ON CONFLICT (owner, id) DO UPDATE SET "
    "updated_at = excluded.updated_at, "
    "title = CASE WHEN conversations.title = '' THEN excluded.title ELSE conversations.title END"
)
_INSERT_USER = (
    "INSERT INTO messages (owner, conversation_id, role, content, status, request_id, created_at) "
    "VALUES ($1, $2, 'user', $3, 'complete', $4, $5)"
)
_INSERT_ANSWER = (
    "INSERT INTO messages (owner, conversation_id, role, content, status, request_id, "
    "error_code, created_at, writer, model, prompt_tokens, completion_tokens, usage_estimated) "
    "VALUES ($1, $2, 'assistant', $3, $4, $5, $6, $7, $8, $9, $10, $11, $12) RETURNING id"
)
_SAVE_ANSWER = "UPDATE messages SET content = $1, status = $2, error_code = $3 WHERE id = $4"
_SAVE_ANSWER_USAGE = (
    "UPDATE messages SET content = $1, status = $2, error_code = $3, prompt_tokens = $5, "
    "completion_tokens = $6, usage_estimated = $7 WHERE id = $4"
)
_USAGE_FOLD, _USAGE_SELECT = usage_sql(
    "to_char(to_timestamp(created_at) AT TIME ZONE 'UTC', 'YYYY-MM-DD')"
)
# Deleting a conversation folds its answers' usage into the totals first, in one statement.
_DELETE_CONVERSATION = (
    f"WITH folded AS ({_USAGE_FOLD}) "
    "DELETE FROM conversations WHERE owner = $1 AND id = $2 RETURNING 1"
)
_SWEEP = (
    "UPDATE messages SET status = 'interrupted' WHERE status = 'streaming' AND NOT EXISTS "
    "(SELECT 1 FROM writers WHERE writers.id = messages.writer AND expires_at > now())"
)
_RENEW = (
    "INSERT INTO writers (id, expires_at) VALUES ($1, now() + make_interval(secs => $2)) "
    "ON CONFLICT (id) DO UPDATE SET expires_at = excluded.expires_at"
)
_FORGET_EXPIRED = "DELETE FROM writers WHERE expires_at < now() - make_interval(secs => $1)"


def shown_url(url: str) -> str:
    """The database URL without its password (in the user part or the query), for logs."""
    parts = urlsplit(url)
    shown = url
    if parts.password is not None:
        shown = shown.replace(f":{parts.password}@", ":***@", 1)
    if "password" in dict(parse_qsl(parts.query)):
        query = [
            (name, "***" if name == "password" else value)
            for name, value in parse_qsl(parts.query, keep_blank_values=True)
        ]
        shown = shown.split("?", 1)[0] + "?" + urlencode(query, safe="*")
    return shown


async def migrate(connection: PgConnection, shown: str) -> None:
    """Create or migrate the schema, in one transaction under the advisory lock: a node that
    starts meanwhile waits, then finds the schema current."""
    await connection.execute("BEGIN")
    try:
        await connection.execute("SELECT pg_advisory_xact_lock($1)", (MIGRATION_LOCK,))
        await connection.script("CREATE TABLE IF NOT EXISTS schema_version (version INTEGER)")
        rows = await connection.execute("SELECT version FROM schema_version")
        version = int(rows[0][0]) if rows else 0
        if version > len(MIGRATIONS):
            raise StorageError(
                f"history database {shown} has schema version {version}, newer than this "
                f"Aether ({len(MIGRATIONS)}): run a newer Aether"
            )
        for number, migration in enumerate(MIGRATIONS[version:], version + 1):
            await connection.script(migration)
            await connection.execute("DELETE FROM schema_version")
            await connection.execute("INSERT INTO schema_version (version) VALUES ($1)", (number,))
            log.info("history schema migrated to version %d", number)
        await connection.execute("COMMIT")
    except BaseException:
        connection.close()  # rolls the transaction back
        raise


async def prepare_schema(url: str) -> None:
    """Check that the database answers, and bring its schema up to date (before a server or
    its workers start). Raises StorageError, with a message that names the database."""
    shown = shown_url(url)
    try:
        with trio.fail_after(OPERATION_TIMEOUT_S * 2):
            connection = await PgConnection.connect(url)
            try:
                await migrate(connection, shown)
            finally:
                connection.close()
    except (psycopg.Error, OSError) as exc:
        # libpq's messages run over several lines (a hint after the error): one line here.
        raise StorageError(f"history database {shown}: {' '.join(str(exc).split())}") from exc
    except trio.TooSlowError as exc:
        raise StorageError(f"history database {shown} did not answer in time") from exc


def described(exc: BaseException | list[Row]) -> str:
    """An error for the logs: its class, SQLSTATE and primary message, never its detail (which
    quotes the rows: users' messages)."""
    if isinstance(exc, psycopg.Error):
        return f"{type(exc).__name__} [{exc.sqlstate or '-'}]: {exc.diag.message_primary or exc}"
    return repr(exc)


async def interrupt_writer(url: str, writer: str) -> int:
    """A writer known to be dead (its supervisor saw it die): mark its answers left streaming
    ``interrupted`` now, rather than when its lease runs out, and end its lease. How many."""
    connection = await PgConnection.connect(url)
    try:
        with trio.fail_after(OPERATION_TIMEOUT_S):
            marked, _ = await connection.run(
                [
                    Statement(
                        "UPDATE messages SET status = 'interrupted' "
                        "WHERE status = 'streaming' AND writer = $1 RETURNING id",
                        (writer,),
                    ),
                    Statement("DELETE FROM writers WHERE id = $1", (writer,)),
                ]
            )
    finally:
        connection.close()
    if isinstance(marked, psycopg.Error):
        raise marked
    return len(marked)


def _statements(write: AnswerWrite, writer: str, now: float) -> list[Statement]:
    """The statements of one answer's write; the last one's rows hold the answer's id when
    the write starts a turn."""
    content = storable(write.content)
    usage = write.usage
    if write.start is None:
        assert write.message_id is not None
        saved = (content, write.status, write.error_code, write.message_id)
        if usage is None:
            return [Statement(_SAVE_ANSWER, saved)]
        counts = (usage.prompt_tokens, usage.completion_tokens, usage.estimated)
        return [Statement(_SAVE_ANSWER_USAGE, (*saved, *counts))]
    start: TurnStart = write.start
    prompt = completion = estimated = None
    if usage is not None:
        prompt, completion, estimated = (
            usage.prompt_tokens,
            usage.completion_tokens,
            usage.estimated,
        )
    return [
        Statement(_CLAIM, (start.owner, start.conversation_id, storable(start.title), now)),
        Statement(
            _INSERT_USER,
            (start.owner, start.conversation_id, storable(start.user_text), start.request_id, now),
        ),
        Statement(
            _INSERT_ANSWER,
            (
                start.owner,
                start.conversation_id,
                content,
                write.status,
                start.request_id,
                write.error_code,
                now,
                writer,
                start.model,
                prompt,
                completion,
                estimated,
            ),
        ),
    ]


class PostgresHistoryStore:
    def __init__(
        self,
        url: str,
        writer: str,
        *,
        lease_s: float = 10.0,
        pool_size: int = 8,
        on_commit: Callable[[float, float], None] | None = None,
    ) -> None:
        self.url = url
        self.writer = writer
        self.lease_s = lease_s
        self._pool = PgPool(url, pool_size)
        # Half the connections at most for batched reads: the answer writer and the lease
        # always find one.
        self._batcher = ReadBatcher(self._pool, max(1, pool_size // 2), OPERATION_TIMEOUT_S)
        # Told how long each write batch took (round trip included) and 0 for the lock wait
        # (PostgreSQL's row locks are not a file lock), in seconds.
        self._on_commit = on_commit
        self._failing = False
        self.write_batches = 0
        self.swept = 0  # answers this store has marked interrupted

    # -- plumbing ---------------------------------------------------------------------------

    async def _call(self, fn: Callable[[PgConnection], Awaitable[T]]) -> T:
        """Run ``fn`` on a pooled connection within the operation timeout, mapping failures to
        StorageError."""
        try:
            with trio.fail_after(OPERATION_TIMEOUT_S):
                async with self._pool.connection() as connection:
                    result = await fn(connection)
        except (psycopg.Error, OSError, trio.TooSlowError) as exc:
            self._failed(exc)
            raise StorageError("the history store failed; the answer was not stored") from exc
        self._worked()
        return result

    def _worked(self) -> None:
        if self._failing:
            self._failing = False
            log.warning("history database %s works again", self._shown_url)

    def _failed(self, exc: BaseException) -> None:
        if not self._failing:
            self._failing = True
            log.error("history database %s failed: %s", self._shown_url, described(exc))
        else:
            log.debug("history database %s failed again: %s", self._shown_url, described(exc))

    @property
    def _shown_url(self) -> str:
        return shown_url(self.url)

    async def _execute(self, sql: str, *params: object) -> list[Row]:
        """One statement on a connection of its own (a write, a lease)."""

        async def run(connection: PgConnection) -> list[Row]:
            return await connection.execute(sql, params)

        return await self._call(run)

    async def _reads(self, *statements: Statement) -> list[list[Row]]:
        """Reads, in a round trip shared with the other reads of this round; each one's rows.
        Raises StorageError."""
        try:
            outcomes = await self._batcher.run(statements)
        except (psycopg.Error, OSError, trio.TooSlowError) as exc:
            self._failed(exc)
            raise StorageError("the history store failed") from exc
        rows: list[list[Row]] = []
        for outcome in outcomes:
            if isinstance(outcome, psycopg.Error):
                self._failed(outcome)
                raise StorageError("the history store failed") from outcome
            rows.append(outcome)
        self._worked()
        return rows

    async def _read(self, sql: str, *params: object) -> list[Row]:
        (rows,) = await self._reads(Statement(sql, params))
        return rows

    # -- lifecycle --------------------------------------------------------------------------

    async def open(self) -> None:
        await self._call(lambda connection: migrate(connection, self._shown_url))
        await self._renew_lease()
        swept = await self.sweep()
        log.info(
            "history in PostgreSQL %s as writer %s (%d answers of expired writers marked "
            "interrupted)",
            self._shown_url,
            self.writer,
            swept,
        )

    async def maintain(self) -> None:
        """Keep this writer's lease, and sweep the expired writers' answers, until cancelled."""
        next_sweep = trio.current_time() + self.lease_s
        while True:
            await trio.sleep(self.lease_s / 3)
            try:
                await self._renew_lease()
                if trio.current_time() >= next_sweep:
                    next_sweep = trio.current_time() + self.lease_s
                    await self.sweep()
            except StorageError:
                pass  # logged; the next round tries again

    async def _renew_lease(self) -> None:
        await self._execute(_RENEW, self.writer, self.lease_s)

    async def sweep(self) -> int:
        """Mark the answers of writers whose lease has expired ``interrupted``; how many."""

        async def run(connection: PgConnection) -> int:
            rows = await connection.execute(_SWEEP + " RETURNING id")
            # Leases expired for long are of writers that are gone for good.
            await connection.execute(_FORGET_EXPIRED, (self.lease_s * 100,))
            return len(rows)

        swept = await self._call(run)
        if swept:
            log.warning("%d answers of expired writers marked interrupted", swept)
        self.swept += swept
        return swept

    async def close(self) -> None:
        # Every answer of this writer is final now: its lease can go.
        with (
            trio.CancelScope(shield=True),
            trio.move_on_after(OPERATION_TIMEOUT_S),
            contextlib.suppress(StorageError),
        ):
            await self._execute("DELETE FROM writers WHERE id = $1", self.writer)
        self._pool.close()

    # -- reads ------------------------------------------------------------------------------

    async def has_conversation(self, owner: str, conversation_id: str) -> bool:
        rows = await self._read(
            "SELECT 1 FROM conversations WHERE owner = $1 AND id = $2", owner, conversation_id
        )
        return bool(rows)

    async def context(self, owner: str, conversation_id: str, limit: int) -> list[StoredMessage]:
        rows = await self._read(
            f"SELECT {MESSAGE_COLUMNS} FROM messages WHERE owner = $1 AND conversation_id = $2 "
            "AND content != '' AND status IN ('complete', 'stopped', 'interrupted') "
            "ORDER BY id DESC LIMIT $3",
            owner,
            conversation_id,
            limit,
        )
        return [message_from_row(row) for row in reversed(rows)]

    async def list_conversations(
        self, owner: str, limit: int, before: float | None
    ) -> list[Conversation]:
        rows = await self._read(
            f"SELECT {CONVERSATION_COLUMNS} FROM conversations WHERE owner = $1 "
            "AND updated_at < $2 ORDER BY updated_at DESC, id LIMIT $3",
            owner,
            before if before is not None else math.inf,
            limit,
        )
        return [conversation_from_row(row) for row in rows]

    async def messages(self, owner: str, conversation_id: str) -> list[StoredMessage]:
        found, rows = await self._reads(
            Statement(
                "SELECT 1 FROM conversations WHERE owner = $1 AND id = $2",
                (owner, conversation_id),
            ),
            Statement(
                f"SELECT {MESSAGE_COLUMNS} FROM messages WHERE owner = $1 "
                "AND conversation_id = $2 ORDER BY id",
                (owner, conversation_id),
            ),
        )
        if not found:
            raise UnknownConversation(f"no conversation with id {conversation_id!r}")
        return [message_from_row(row) for row in rows]

    # -- writes -----------------------------------------------------------------------------

    async def claim_conversation(self, owner: str, conversation_id: str, title: str) -> None:
        await self._execute(_CLAIM, owner, conversation_id, storable(title), time.time())

    async def begin_turn(
        self, owner: str, conversation_id: str, title: str, request_id: str, user_text: str
    ) -> int:
        start = TurnStart(owner, conversation_id, title, request_id, user_text)
        (result,) = await self.write_answers([AnswerWrite(start, None, "", "streaming")])
        if isinstance(result, StorageError):
            raise result
        return result

    async def save_answer(
        self,
        message_id: int,
        content: str,
        status: MessageStatus,
        error_code: str | None = None,
    ) -> None:
        (result,) = await self.write_answers(
            [AnswerWrite(None, message_id, content, status, error_code)]
        )
        if isinstance(result, StorageError):
            raise result

    async def write_answers(self, writes: Sequence[AnswerWrite]) -> list[int | StorageError]:
        results: list[int | StorageError | None] = [None] * len(writes)
        started = time.perf_counter()

        async def run(connection: PgConnection) -> None:
            left = list(range(len(writes)))
            while left:
                now = time.time()
                statements = [Statement("BEGIN")]
                owners: list[int] = []  # the write each statement belongs to
                for index in left:
                    batch = _statements(writes[index], self.writer, now)
                    statements += batch
                    owners += [index] * len(batch)
                statements.append(Statement("COMMIT"))
                outcomes = await connection.run(statements)
                failed = next(
                    (n for n, outcome in enumerate(outcomes) if isinstance(outcome, Exception)),
                    None,
                )
                if failed is None:
                    for position, index in enumerate(owners, 1):
                        rows = outcomes[position]
                        assert not isinstance(rows, Exception)
                        results[index] = rows[0][0] if rows else writes[index].message_id
                    return
                await connection.execute("ROLLBACK")
                if failed == 0 or failed > len(owners):  # BEGIN or COMMIT: the whole batch
                    raise outcomes[failed]  # type: ignore[misc]
                culprit = owners[failed - 1]
                log.error(
                    "history database %s refused a write: %s",
                    self._shown_url,
                    described(outcomes[failed]),
                )
                results[culprit] = StorageError(
                    "the history store failed; the answer was not stored"
                )
                left.remove(culprit)

        self.write_batches += 1
        try:
            await self._call(run)
        except StorageError as exc:
            results = [result if result is not None else exc for result in results]
        if self._on_commit is not None:
            self._on_commit(time.perf_counter() - started, 0.0)
        return [result if result is not None else StorageError("not stored") for result in results]

    # -- files (FileArchive) ----------------------------------------------------------------

    @property
    def files_archive(self) -> FileArchive:
        return self

    async def put_files(
        self, owner: str, conversation_id: str, files: Sequence[tuple[str, bytes]]
    ) -> None:
        now = time.time()
        statements = [Statement("BEGIN")]
        for name, content in files:
            digest = hashlib.sha256(content).hexdigest()
            statements.append(
                Statement(
                    "INSERT INTO files (owner, conversation_id, name, size, sha256, content, "
                    "stored_at) VALUES ($1, $2, $3, $4, $5, $6, $7) "
                    "ON CONFLICT (owner, conversation_id, name) DO UPDATE SET "
                    "size = excluded.size, sha256 = excluded.sha256, "
                    "content = excluded.content, stored_at = excluded.stored_at",
                    (owner, conversation_id, name, len(content), digest, content, now),
                )
            )
        statements.append(Statement("COMMIT"))

        async def run(connection: PgConnection) -> None:
            outcomes = await connection.run(statements)
            failure = next((o for o in outcomes if isinstance(o, psycopg.Error)), None)
            if failure is not None:
                await connection.execute("ROLLBACK")
                raise failure

        await self._call(run)

    async def archived_files(self, owner: str, conversation_id: str) -> list[ArchivedFile]:
        rows = await self._read(
            "SELECT name, size, sha256 FROM files WHERE owner = $1 AND conversation_id = $2 "
            "ORDER BY name",
            owner,
            conversation_id,
        )
        return [ArchivedFile(name, size, digest) for name, size, digest in rows]

    async def file_content(self, owner: str, conversation_id: str, name: str) -> bytes | None:
        rows = await self._read(
            "SELECT content FROM files WHERE owner = $1 AND conversation_id = $2 AND name = $3",
            owner,
            conversation_id,
            name,
        )
        return bytes(rows[0][0]) if rows else None

    async def rename_conversation(
        self, owner: str, conversation_id: str, title: str
    ) -> Conversation | None:
        rows = await self._execute(
            f"UPDATE conversations SET title = $1 WHERE owner = $2 AND id = $3 "
            f"RETURNING {CONVERSATION_COLUMNS}",
            storable(title),
            owner,
            conversation_id,
        )
        return conversation_from_row(rows[0]) if rows else None

    async def usage(self, owner: str, since: float) -> list[UsageTotal]:
        first_day = usage_day(since)
        rows = await self._execute(_USAGE_SELECT, owner, first_day, day_start(first_day))
        return [UsageTotal(*row) for row in rows]

    async def delete_conversation(self, owner: str, conversation_id: str) -> bool:
        rows = await self._execute(_DELETE_CONVERSATION, owner, conversation_id)
        return bool(rows)
