"""The JSON body of a REST request, checked: its media type, then its fields.

A JSON route accepts only ``Content-Type: application/json`` (415 otherwise). Browsers send
``text/plain`` and form bodies across sites without asking the server first (no CORS
preflight), and a JSON body sent as ``application/json`` from another site needs the preflight
this server never grants: so the media type is part of the defence against cross-site requests,
besides the browser guard's Origin check.

@.architecture
role: JSON request bodies
jobs: [validation, csrf_protection]
"""

from __future__ import annotations

from typing import TypeVar

from pydantic import BaseModel, ValidationError
from quart import Response, request

from aether.api.responses import json_error

BodyT = TypeVar("BodyT", bound=BaseModel)

JSON_MEDIA_TYPE = "application/json"


async def read_json_body(model: type[BodyT]) -> BodyT | Response:
    """The request's JSON body as ``model``; else a 415 (not JSON) or a 400 naming the first
    field at fault."""
    if request.mimetype != JSON_MEDIA_TYPE:
        sent = request.mimetype or "none"
        return json_error(
            415,
            "unsupported_media_type",
            f"send the body as JSON with Content-Type: {JSON_MEDIA_TYPE} (got {sent})",
        )
    try:
        return model.model_validate_json(await request.get_data(as_text=False))
    except ValidationError as exc:
        first = exc.errors()[0]
        where = ".".join(str(part) for part in first["loc"]) or "body"
        return json_error(400, "invalid_request", f"{where}: {first['msg']}")
