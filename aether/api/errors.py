"""The HTTP status of every error code, in one table, for every REST route.

A route that catches an ``AetherError`` answers ``error_response(exc)``; a chat that ended with
an ``error`` terminal answers with ``status_for(code)``; so the same failure has the same status
whichever route met it.

@.architecture
role: REST error statuses
jobs: [error_classification, response_formatting]
"""

from __future__ import annotations

from quart import Response
from werkzeug.exceptions import HTTPException

from aether.api.responses import json_error
from aether.core.errors import AetherError

HTTP_STATUS: dict[str, int] = {
    "invalid_request": 400,
    "invalid_file": 400,
    "unknown_request": 404,
    "unknown_conversation": 404,
    "path_unavailable": 404,  # this server has no such model path
    "unknown_model": 404,
    "files_unavailable": 404,
    "history_unavailable": 404,
    "duplicate_request": 409,
    "stale_confirmation": 409,
    "too_many_files": 409,
    "file_too_large": 413,
    "file_type_not_allowed": 415,
    "too_many_requests": 429,
    "internal_error": 500,
    "provider_error": 502,
    "upstream_unavailable": 502,
    "upstream_http_error": 502,
    "upstream_disconnected": 502,
    "upstream_protocol_error": 502,
    "shutting_down": 503,
    "control_plane_unavailable": 503,
    "storage_error": 503,
    "upstream_timeout": 504,
}


def status_for(code: str) -> int:
    """The HTTP status of an error code (500 for one this table does not know)."""
    return HTTP_STATUS.get(code, 500)


def http_error_fields(error: HTTPException) -> tuple[int, str, str]:
    """The status, code and message of an HTTP error werkzeug describes (404, 405, 413, ...)."""
    code = (error.name or "error").lower().replace(" ", "_")
    return error.code or 500, code, error.description or error.name


def error_response(exc: AetherError) -> Response:
    return json_error(status_for(exc.code), exc.code, exc.message)
