"""JSON responses shared by the REST endpoints: errors in one shape, bodies encoded once.

@.architecture
role: REST response helpers
jobs: [response_formatting]
"""

from __future__ import annotations

from typing import Any

import orjson
from quart import Response


def json_response(body: Any, status: int = 200) -> Response:
    return Response(orjson.dumps(body), status=status, mimetype="application/json")


def json_error(status: int, code: str, message: str, **extra: Any) -> Response:
    """``{"error": {"code", "message", ...}}`` with the given status."""
    return json_response({"error": {"code": code, "message": message, **extra}}, status)
