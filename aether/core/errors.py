"""Every exception the core raises, in one hierarchy, so transports map them in one place.

    AetherError                    ``code`` is stable and goes to the client; ``message`` is safe
    ├── ProviderError              a model path failed
    │   ├── UpstreamUnavailable    connection refused / DNS / connect timeout / TLS
    │   ├── UpstreamHTTPError      the upstream answered 4xx/5xx
    │   ├── UpstreamTimeout        no first token (or no next chunk) in time
    │   ├── UpstreamDisconnected   the upstream dropped the stream mid-way
    │   └── UpstreamProtocolError  the upstream spoke something that is not OpenAI SSE
    ├── PathUnavailable            the requested path is not configured
    ├── UnknownModel               a chat named a model this server does not serve
    ├── UnknownRequest             stop/lookup of an id that is not live for this caller
    ├── DuplicateRequest           a live request already has that id
    ├── StaleConfirmation          an answer to a code confirmation that is not the pending one
    ├── TooManyRequests            the caller already runs as many chats as it may
    ├── ShuttingDown               the server is draining and starts no new chat
    ├── ControlPlaneUnavailable    the workers' control plane (Redis) cannot be reached
    ├── StorageError               the history store failed; what was stored is intact
    ├── UnknownConversation        the caller has no conversation of that id
    ├── FilesUnavailable           file chat needs history and the agentic path
    ├── FileError                  a file a client sends was refused
    │   ├── FileTooLarge
    │   ├── FileTypeNotAllowed
    │   ├── TooManyFiles
    │   └── FileStorageFailed      the disk failed (code ``storage_error``)
    └── UploadError                a WebSocket file transfer went wrong
        ├── UploadInProgress       a second file announced before the first arrived
        ├── UploadSizeMismatch     more bytes than announced
        └── BinaryNotSupported     a binary frame no ``file`` message announced

The HTTP status of each code is one table in ``aether.api.errors``.

@.architecture
role: core error hierarchy
jobs: [error_classification]
"""

from __future__ import annotations


class AetherError(Exception):
    """Base of Aether's errors. ``code`` is stable; ``message`` is safe to show a client."""

    code = "internal_error"

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message


class ProviderError(AetherError):
    code = "provider_error"


class UpstreamUnavailable(ProviderError):
    code = "upstream_unavailable"


class UpstreamHTTPError(ProviderError):
    code = "upstream_http_error"

    def __init__(self, message: str, status: int) -> None:
        super().__init__(message)
        self.status = status


class UpstreamTimeout(ProviderError):
    code = "upstream_timeout"


class UpstreamDisconnected(ProviderError):
    code = "upstream_disconnected"


class UpstreamProtocolError(ProviderError):
    code = "upstream_protocol_error"


class PathUnavailable(AetherError):
    code = "path_unavailable"


class UnknownModel(AetherError):
    code = "unknown_model"


class UnknownRequest(AetherError):
    code = "unknown_request"


class DuplicateRequest(AetherError):
    code = "duplicate_request"


class StaleConfirmation(AetherError):
    code = "stale_confirmation"


class TooManyRequests(AetherError):
    code = "too_many_requests"


class ShuttingDown(AetherError):
    code = "shutting_down"


class StorageError(AetherError):
    """The history store failed (disk full, database locked, ...). Nothing stored is lost."""

    code = "storage_error"


class UnknownConversation(AetherError):
    code = "unknown_conversation"


class FilesUnavailable(AetherError):
    code = "files_unavailable"


class FileError(AetherError):
    code = "invalid_file"


class FileTooLarge(FileError):
    code = "file_too_large"


class FileTypeNotAllowed(FileError):
    code = "file_type_not_allowed"


class TooManyFiles(FileError):
    code = "too_many_files"


class FileStorageFailed(FileError):
    code = "storage_error"


class UploadError(AetherError):
    code = "upload_error"


class UploadInProgress(UploadError):
    code = "upload_in_progress"


class UploadSizeMismatch(UploadError):
    code = "upload_size_mismatch"


class BinaryNotSupported(UploadError):
    code = "binary_not_supported"


class ControlPlaneUnavailable(AetherError):
    """The workers' shared control plane (Redis) cannot be reached: a stop or an approval for
    another worker's request cannot be routed."""

    code = "control_plane_unavailable"
