"""JSON responses shared by the REST endpoints: errors in one shape, bodies encoded once.

@.architecture
role: REST response helpers
jobs: [response_formatting]
"""

from __future__ import annotations

from typing import Any

import orjson
from quart import Response, has_request_context, request

from aether.asgi import REQUEST_ID_KEY


def request_id() -> str | None:
    """The current request's id (set by the error handling middleware)."""
    if not has_request_context():
        return None
    value = request.scope.get(REQUEST_ID_KEY)
    return value if isinstance(value, str) else None


def json_response(body: Any, status: int = 200) -> Response:
    return Response(orjson.dumps(body), status=status, mimetype="application/json")


def error_body(code: str, message: str, request_id: str | None, **extra: Any) -> dict[str, Any]:
    """Every REST error's JSON: ``{"error": {"code", "message", "request_id", ...}}``."""
    return {"error": {"code": code, "message": message, "request_id": request_id, **extra}}


def json_error(status: int, code: str, message: str, **extra: Any) -> Response:
    """``error_body`` as a response with the given status."""
    return json_response(error_body(code, message, request_id(), **extra), status)
