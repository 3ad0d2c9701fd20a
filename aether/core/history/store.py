"""The history store interface: what the engine and the transports need, nothing more, so that a
server database can replace SQLite without touching them.

Conversation ids are per owner: every method takes the owner, and the store keys conversations by
(owner, id). Two callers may each have a conversation "c1"; each sees only its own, and neither
can learn that the other's exists.

@.architecture
role: history store interface
jobs: [schema_definition, history_management]
"""

from __future__ import annotations

import calendar
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Literal, Protocol

from aether.core.errors import StorageError
from aether.core.files import FileArchive
from aether.core.usage import Usage

MessageStatus = Literal["streaming", "complete", "stopped", "error", "interrupted"]


@dataclass(frozen=True, slots=True)
class Conversation:
    id: str
    owner: str
    created_at: float
    updated_at: float
    title: str


@dataclass(frozen=True, slots=True)
class StoredMessage:
    id: int
    conversation_id: str
    role: Literal["user", "assistant"]
    content: str
    status: MessageStatus
    request_id: str | None
    created_at: float
    error_code: str | None = None
    # An answer's model and its turn's token usage, once its final status is stored.
    model: str | None = None
    usage: Usage | None = None


@dataclass(frozen=True, slots=True)
class TurnStart:
    """What a turn's start stores: the owner's conversation (created if new) and the user's
    message."""

    owner: str
    conversation_id: str
    title: str
    request_id: str
    user_text: str
    model: str | None = None  # the model that answers


@dataclass(frozen=True, slots=True)
class AnswerWrite:
    """One answer's write in a batch. With ``start``, the turn is stored in this step: the user's
    message and the answer as it stands are inserted together. Else the stored answer
    ``message_id`` gets this content and status."""

    start: TurnStart | None
    message_id: int | None
    content: str
    status: MessageStatus
    error_code: str | None = None
    usage: Usage | None = None  # with a final status: the turn's token usage


@dataclass(frozen=True, slots=True)
class UsageTotal:
    """A caller's turns of one model on one day (UTC), and their tokens."""

    day: str  # YYYY-MM-DD
    model: str
    turns: int
    prompt_tokens: int
    completion_tokens: int
    estimated_turns: int  # of ``turns``, those whose counts are estimated


def usage_sql(day_of: str) -> tuple[str, str]:
    """The two statements of token usage, for a store whose SQL names the UTC day of an answer
    as ``day_of`` (an expression over ``created_at``); $n placeholders (SQLite reads ?n).

    Each answer holds its own usage (its model and counts, in the row the final save writes:
    no other write per turn). A conversation's answers fold their usage into ``usage``, the
    totals by caller, day and model, when the conversation is deleted (the first statement,
    ``$1`` the owner, ``$2`` the conversation), so that deleting it leaves them. The caller's
    usage (the second, ``$1`` the owner, ``$2`` the first day, ``$3`` that day's start as a
    time) is both, added up."""
    fold = (
        "INSERT INTO usage (owner, day, model, turns, prompt_tokens, completion_tokens, "
        f"estimated_turns) SELECT owner, {day_of}, model, count(*), sum(prompt_tokens), "
        "sum(completion_tokens), sum(CASE WHEN usage_estimated THEN 1 ELSE 0 END) FROM messages "
        "WHERE owner = $1 AND conversation_id = $2 AND prompt_tokens IS NOT NULL "
        f"AND model IS NOT NULL GROUP BY owner, {day_of}, model "
        "ON CONFLICT (owner, day, model) DO UPDATE SET turns = usage.turns + excluded.turns, "
        "prompt_tokens = usage.prompt_tokens + excluded.prompt_tokens, "
        "completion_tokens = usage.completion_tokens + excluded.completion_tokens, "
        "estimated_turns = usage.estimated_turns + excluded.estimated_turns"
    )
    select = (
        "SELECT day, model, CAST(sum(turns) AS BIGINT), CAST(sum(prompt_tokens) AS BIGINT), "
        "CAST(sum(completion_tokens) AS BIGINT), CAST(sum(estimated_turns) AS BIGINT) FROM ("
        "SELECT day, model, turns, prompt_tokens, completion_tokens, estimated_turns "
        "FROM usage WHERE owner = $1 AND day >= $2 "
        f"UNION ALL SELECT {day_of}, model, 1, prompt_tokens, completion_tokens, "
        "CASE WHEN usage_estimated THEN 1 ELSE 0 END FROM messages WHERE owner = $1 "
        "AND role = 'assistant' AND prompt_tokens IS NOT NULL AND model IS NOT NULL "
        "AND created_at >= $3"
        ") AS turns GROUP BY day, model ORDER BY day, model"
    )
    return fold, select


def day_start(day: str) -> float:
    """The time a UTC day (``YYYY-MM-DD``) starts."""
    return calendar.timegm(time.strptime(day, "%Y-%m-%d"))


def usage_day(when: float) -> str:
    """The day (UTC, ``YYYY-MM-DD``) usage at time ``when`` counts for."""
    return time.strftime("%Y-%m-%d", time.gmtime(when))


def storable(text: str) -> str:
    """Text as every store keeps it: U+0000 (which PostgreSQL's text cannot hold) becomes
    U+FFFD, the replacement character."""
    return text.replace("\x00", "\ufffd") if "\x00" in text else text


class HistoryStore(Protocol):
    @property
    def files_archive(self) -> FileArchive | None:
        """Where uploaded files are kept for every node, if the store keeps them (PostgreSQL);
        None: each node keeps its own on disk."""

    async def open(self) -> None:
        """Create or migrate the schema; mark answers left ``streaming`` as ``interrupted``
        (those whose writer is gone)."""

    async def maintain(self) -> None:
        """The store's upkeep while it is open (a shared store's lease and sweeps), until
        cancelled; returns at once if it has none."""

    async def close(self) -> None: ...

    async def has_conversation(self, owner: str, conversation_id: str) -> bool:
        """Whether ``owner`` has a conversation of that id."""

    async def context(self, owner: str, conversation_id: str, limit: int) -> list[StoredMessage]:
        """The last ``limit`` finished messages of a conversation, oldest first."""

    async def claim_conversation(self, owner: str, conversation_id: str, title: str) -> None:
        """Create the owner's conversation if it does not exist (e.g. before a file is uploaded
        to it)."""

    async def begin_turn(
        self, owner: str, conversation_id: str, title: str, request_id: str, user_text: str
    ) -> int:
        """In one transaction: create the owner's conversation if it does not exist, store the
        user's message and an empty ``streaming`` answer; return the answer's id."""

    async def save_answer(
        self,
        message_id: int,
        content: str,
        status: MessageStatus,
        error_code: str | None = None,
    ) -> None: ...

    async def write_answers(self, writes: Sequence[AnswerWrite]) -> list[int | StorageError]:
        """Every write in one transaction, each on its own (one's failure undoes only that one).
        For each: the answer's id, or the StorageError that write failed with."""

    async def list_conversations(
        self, owner: str, limit: int, before: float | None
    ) -> list[Conversation]:
        """The owner's conversations, most recently updated first, older than ``before``."""

    async def messages(self, owner: str, conversation_id: str) -> list[StoredMessage]:
        """The owner's conversation's messages in order. Raises UnknownConversation."""

    async def delete_conversation(self, owner: str, conversation_id: str) -> bool: ...

    async def rename_conversation(
        self, owner: str, conversation_id: str, title: str
    ) -> Conversation | None:
        """Give the owner's conversation a new title (its ``updated_at`` stays: a rename is not
        activity); the conversation as stored, or None if the owner has none of that id."""

    async def usage(self, owner: str, since: float) -> list[UsageTotal]:
        """The owner's token usage from the day (UTC) of ``since`` (a time) on, by day and
        model, oldest day first; deleted conversations' turns included."""


# The columns both stores select, in the order the row functions below read them.
MESSAGE_COLUMNS = (
    "id, conversation_id, role, content, status, request_id, created_at, error_code, model, "
    "prompt_tokens, completion_tokens, usage_estimated"
)
CONVERSATION_COLUMNS = "id, owner, title, created_at, updated_at"


def conversation_from_row(row: Sequence[Any]) -> Conversation:
    return Conversation(id=row[0], owner=row[1], title=row[2], created_at=row[3], updated_at=row[4])


def message_from_row(row: Sequence[Any]) -> StoredMessage:
    return StoredMessage(
        id=row[0],
        conversation_id=row[1],
        role=row[2],
        content=row[3],
        status=row[4],
        request_id=row[5],
        created_at=row[6],
        error_code=row[7],
        model=row[8],
        usage=None if row[9] is None else Usage(row[9], row[10], bool(row[11])),
    )


def message_json(message: StoredMessage) -> dict[str, object]:
    """A stored message as the API and the WebSocket show it."""
    shown: dict[str, object] = {
        "id": message.id,
        "role": message.role,
        "content": message.content,
        "status": message.status,
        "request_id": message.request_id,
        "created_at": message.created_at,
    }
    if message.error_code is not None:
        shown["error_code"] = message.error_code
    if message.model is not None:
        shown["model"] = message.model
    if message.usage is not None:
        shown["usage"] = message.usage.as_json()
    return shown


def conversation_json(conversation: Conversation) -> dict[str, object]:
    return {
        "id": conversation.id,
        "title": conversation.title,
        "created_at": conversation.created_at,
        "updated_at": conversation.updated_at,
    }
