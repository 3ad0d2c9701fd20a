"""FileReceiver: the file a WebSocket client is sending, between its ``file`` header and its last
binary frame.

A ``file`` message announces a name and an exact size; the binary frames that follow carry the
bytes, in order, one file at a time. Other messages (chats, stops, pings) may come in between.
When the last byte has arrived the file is put in place and the client gets a ``file`` message
back; a frame that would go past the announced size, or a connection that closes early, drops
the file. A refused file gets one error, and the bytes announced for it are dropped quietly.

@.architecture
role: WebSocket file receiver
jobs: [file_storage, message_parsing]
"""

from __future__ import annotations

from typing import Any

from aether.core.errors import BinaryNotSupported, UploadInProgress, UploadSizeMismatch
from aether.core.files import Upload
from aether.core.history.turns import new_conversation_id
from aether.core.runtime.file_chat import FileChat
from aether.protocol.messages import FileMessage


class FileReceiver:
    def __init__(self, file_chat: FileChat, owner: str) -> None:
        self._file_chat = file_chat
        self._owner = owner
        self._upload: Upload | None = None
        self._conversation_id = ""
        self._remaining = 0
        # Bytes of a refused file still to come: dropped quietly (its error was already sent).
        self._discarding = 0

    @property
    def receiving(self) -> bool:
        return self._upload is not None

    async def begin(self, message: FileMessage) -> dict[str, Any] | None:
        """Start receiving the announced file; its ``file`` reply at once if it is empty."""
        if self._upload is not None:
            raise UploadInProgress(
                f"{self._upload.name!r} still has {self._remaining} bytes to come",
            )
        conversation_id = message.conversation_id or new_conversation_id()
        self._discarding = 0
        try:
            upload = await self._file_chat.open_upload(
                self._owner, conversation_id, message.name, message.size
            )
        except BaseException:
            self._discarding = message.size
            raise
        self._upload, self._conversation_id, self._remaining = upload, conversation_id, message.size
        return await self._finish() if message.size == 0 else None

    async def receive(self, data: bytes) -> dict[str, Any] | None:
        """Take one binary frame; the ``file`` reply once the file is whole."""
        upload = self._upload
        if upload is None and self._discarding:
            self._discarding = max(0, self._discarding - len(data))
            return None
        if upload is None:
            raise BinaryNotSupported(
                "binary frames carry a file announced by a 'file' message; send JSON text frames",
            )
        if len(data) > self._remaining:
            await self.abort()
            raise UploadSizeMismatch(
                f"more bytes than announced for {upload.name!r}: the file was dropped",
            )
        try:
            await upload.write(data)
        except BaseException:
            await self.abort()
            raise
        self._remaining -= len(data)
        return await self._finish() if self._remaining == 0 else None

    async def _finish(self) -> dict[str, Any]:
        upload, self._upload = self._upload, None
        assert upload is not None
        stored = await self._file_chat.finish_upload(self._owner, self._conversation_id, upload)
        return {
            "role": "server",
            "type": "file",
            "id": None,
            "conversation_id": self._conversation_id,
            "name": stored.name,
            "size": stored.size,
        }

    async def abort(self) -> None:
        upload, self._upload = self._upload, None
        if upload is not None:
            await upload.abort()
