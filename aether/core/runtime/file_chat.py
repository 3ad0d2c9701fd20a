"""File chat: a caller uploads files to a conversation, then chats about them on the agentic path.

The rules both transports share live here: file chat needs the agentic path (only Open
Interpreter can open a file) and conversation history (which records a caller's conversations);
conversation ids are per caller, so an upload goes to the caller's own conversation of that id,
which the upload creates if needed; files are listed and deleted with their conversation. Open
Interpreter learns of them in the turn's message (see ``providers.oi.provider.describe_files``).

@.architecture
role: file chat service
jobs: [file_storage, authorization]
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

from aether.core.errors import FilesUnavailable, UnknownConversation
from aether.core.files import ConversationFiles, StoredFile, Upload, UploadBatch
from aether.core.history.store import HistoryStore


class FileChat:
    def __init__(
        self,
        files: ConversationFiles,
        history: HistoryStore | None,
        agentic_path_available: Callable[[], bool],
    ) -> None:
        self.files = files
        self._history = history
        self._agentic = agentic_path_available

    @property
    def unavailable_reason(self) -> str | None:
        if self._history is None:
            return "file chat needs conversation history (AETHER_HISTORY)"
        if not self._agentic():
            return "file chat needs the agentic path (the open-interpreter extra and a model)"
        return None

    def _require(self) -> HistoryStore:
        reason = self.unavailable_reason
        if reason is not None or self._history is None:
            raise FilesUnavailable(reason or "file chat is not available")
        return self._history

    async def open_upload(
        self, owner: str, conversation_id: str, name: str, size: int | None = None
    ) -> Upload:
        """Check the name and size, and start writing the file."""
        self._require()
        self.files.check(name, size)
        return await self.files.open_upload(owner, conversation_id, name)

    async def finish_upload(self, owner: str, conversation_id: str, upload: Upload) -> StoredFile:
        """Put the file in place; the caller's conversation is created if it was new."""
        history = self._require()
        try:
            await history.claim_conversation(owner, conversation_id, "")
        except BaseException:
            await upload.abort()
            raise
        return await upload.finish()

    async def open_batch(
        self, owner: str, conversation_id: str, names: Sequence[str]
    ) -> UploadBatch:
        """Check every name and that all the files fit, before any is written."""
        self._require()
        return await self.files.open_batch(owner, conversation_id, names)

    async def finish_batch(
        self, owner: str, conversation_id: str, batch: UploadBatch
    ) -> list[StoredFile]:
        """Put every file of the batch in place, or (on any failure) none of them."""
        history = self._require()
        try:
            await history.claim_conversation(owner, conversation_id, "")
        except BaseException:
            await batch.abort()
            raise
        return await batch.finish()

    async def stored(self, owner: str, conversation_id: str) -> list[StoredFile]:
        history = self._require()
        if not await history.has_conversation(owner, conversation_id):
            raise UnknownConversation(f"no conversation with id {conversation_id!r}")
        return await self.files.stored(owner, conversation_id)

    async def delete_conversation(self, owner: str, conversation_id: str) -> None:
        """Delete the conversation's files (its history is deleted by the store)."""
        await self.files.delete_conversation(owner, conversation_id)
