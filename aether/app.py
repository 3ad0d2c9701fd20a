"""The application factory: ``create_app(settings)`` returns the QuartTrio app Hypercorn serves.

The REST routes are Quart blueprints; ``/ws`` is Aether's own ASGI WebSocket endpoint, mounted
in front of Quart (see ``aether.ws.endpoint``); the engine runs in the app's lifespan nursery.

@.architecture
role: application factory
jobs: [application_creation, lifecycle_management, routing_registration, dependency_injection]
"""

from __future__ import annotations

import logging
from typing import Any

from quart import Response
from quart_trio import QuartTrio
from werkzeug.exceptions import HTTPException

from aether.api.dependencies import EXTENSION_KEY, AppState
from aether.api.responses import json_error
from aether.api.v1.router import register_v1
from aether.config import Settings
from aether.core.runtime.engine import RuntimeEngine
from aether.ws.endpoint import WebSocketEndpoint
from aether.ws.hub import CLOSE_GOING_AWAY, ClientHub

log = logging.getLogger(__name__)

WEBSOCKET_PATH = "/ws"


class WebSocketMount:
    """ASGI: ``/ws`` WebSocket scopes go to Aether's endpoint, everything else to Quart."""

    def __init__(self, app: Any, websocket: WebSocketEndpoint) -> None:
        self._app = app
        self._websocket = websocket

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] == "websocket" and scope["path"] == WEBSOCKET_PATH:
            await self._websocket(scope, receive, send)
        else:
            await self._app(scope, receive, send)


def create_app(settings: Settings) -> QuartTrio:
    app = QuartTrio("aether")
    app.config["MAX_CONTENT_LENGTH"] = settings.max_body_bytes
    app.config["BODY_TIMEOUT"] = 30
    app.json.sort_keys = False  # type: ignore[attr-defined]
    engine = RuntimeEngine(settings)
    hub = ClientHub()
    app.extensions[EXTENSION_KEY] = AppState(settings=settings, engine=engine, hub=hub)

    @app.before_serving
    async def start_engine() -> None:
        await engine.start(app.nursery)

    @app.after_serving
    async def stop_engine() -> None:
        hub.close_all(CLOSE_GOING_AWAY, "server shutting down")
        engine.stop()

    @app.errorhandler(HTTPException)
    async def http_error(error: HTTPException) -> Response:
        code = (error.name or "error").lower().replace(" ", "_")
        return json_error(error.code or 500, code, error.description or error.name)

    register_v1(app)
    app.asgi_app = WebSocketMount(app.asgi_app, WebSocketEndpoint(engine, hub, settings))  # type: ignore[assignment,method-assign]
    return app
