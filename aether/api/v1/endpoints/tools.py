"""``GET /v1/tools``: what this server offers (the seed's tool catalog).

Model paths and which one ``auto`` takes; whether code can run and whether it needs approval;
file chat and its limits; web search. What is absent says why.

@.architecture
role: tool catalog endpoint
jobs: [tool_catalog_generation]
"""

from __future__ import annotations

from quart import Blueprint, Response
from quart_schema import document

from aether.api.dependencies import app_state
from aether.api.responses import json_response
from aether.api.schemas import ToolCatalog, errors
from aether.core.providers.oi import web_search

blueprint = Blueprint("tools", __name__)


@blueprint.get("/v1/tools")
@document(responses={200: (ToolCatalog, None), **errors()})
async def tools() -> Response:
    state = app_state()
    streamer = state.engine.streamer
    paths = streamer.available_paths
    default = streamer.catalog.default
    profile = streamer.oi.interpreters.profile if streamer.oi is not None else None
    code = "oi" in paths
    settings = state.settings
    file_reason = state.engine.file_chat.unavailable_reason
    search_reason = web_search.unavailable_reason(settings, code)
    return json_response(
        {
            "paths": paths,
            "default_path": streamer.default_path,
            "default_reason": streamer.catalog.default_reason,
            "model": default.name if default.upstream is not None else None,
            "code_execution": {
                "available": code,
                "requires_approval": code and not state.settings.oi_auto_run,
                "profile": profile.name if profile is not None else None,
            },
            "web_search": {"available": search_reason is None, "reason": search_reason},
            "file_chat": {
                "available": file_reason is None,
                "reason": file_reason,
                "max_file_bytes": settings.max_file_bytes,
                "max_files_per_conversation": settings.max_files_per_conversation,
                "file_types": list(settings.file_types),
            },
        }
    )
