"""``GET /asyncapi.json``: the WebSocket protocol as an AsyncAPI 3 document (public, as
``/openapi.json`` is), generated from the protocol's models (``aether/protocol/asyncapi.py``).

@.architecture
role: protocol description route
jobs: [routing_registration]
"""

from __future__ import annotations

from quart import Blueprint, Response
from quart_schema import hide

from aether import __version__
from aether.api.responses import json_response
from aether.protocol.asyncapi import asyncapi_document

blueprint = Blueprint("asyncapi", __name__)


@blueprint.get("/asyncapi.json")
@hide
async def asyncapi() -> Response:
    return json_response(asyncapi_document(__version__))
