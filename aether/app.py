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
from quart_schema import QuartSchema
from quart_trio import QuartTrio
from werkzeug.exceptions import HTTPException

from aether.api.body_limits import BODY_LIMITS_KEY, BodyLimitedHTTPConnection, upload_body_limit
from aether.api.dependencies import EXTENSION_KEY, AppState
from aether.api.direct_routes import DirectRoutes
from aether.api.errors import http_error_fields
from aether.api.middleware.auth import PUBLIC_PATHS, AuthMiddleware
from aether.api.middleware.browser_guard import BrowserGuardMiddleware, BrowserPolicy
from aether.api.middleware.error_handler import ErrorHandlerMiddleware
from aether.api.middleware.forwarded import ForwardedMiddleware, proxy_networks
from aether.api.middleware.rate_limiter import RateLimiter, RateLimitMiddleware, Tier
from aether.api.middleware.response_end import ResponseEndMiddleware
from aether.api.middleware.security import SecurityHeadersMiddleware
from aether.api.responses import json_error, request_id
from aether.api.schemas import API_INFO, AetherOpenAPIProvider
from aether.api.v1.router import register_v1
from aether.api.web import PAGE_FILES_PREFIX, PAGE_PATHS
from aether.asgi import ASGIApp, Receive, Scope, Send
from aether.config import Settings
from aether.core.collection_pacing import FULL_COLLECTIONS
from aether.core.control.choice import control_plane_for
from aether.core.control.plane import ControlPlane
from aether.core.history.choice import history_store_for
from aether.core.identity import KeyRing
from aether.core.metrics import Metrics
from aether.core.runtime.engine import RuntimeEngine
from aether.core.runtime.model_paths import open_model_paths
from aether.ws.endpoint import WebSocketEndpoint
from aether.ws.hub import CLOSE_GOING_AWAY, ClientHub

log = logging.getLogger(__name__)

WEBSOCKET_PATH = "/ws"
# Where create_app keeps the WebSocket clients' hub (the REST routes never need it).
HUB_KEY = "aether.hub"


def websocket_hub(app: QuartTrio) -> ClientHub:
    hub: ClientHub = app.extensions[HUB_KEY]
    return hub


class WebSocketMount:
    """ASGI: ``/ws`` WebSocket scopes go to Aether's endpoint, everything else to Quart."""

    def __init__(self, app: Any, websocket: WebSocketEndpoint) -> None:
        self._app = app
        self._websocket = websocket

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "websocket" and scope["path"] == WEBSOCKET_PATH:
            await self._websocket(scope, receive, send)
        else:
            await self._app(scope, receive, send)


def create_app(settings: Settings, worker_id: str | None = None) -> QuartTrio:
    """The application. ``worker_id``: this process is one of a supervisor's workers, by that
    name (its answers in a shared history carry it)."""
    app = QuartTrio("aether")
    app.asgi_http_class = BodyLimitedHTTPConnection
    app.config["MAX_CONTENT_LENGTH"] = settings.max_body_bytes
    app.config[BODY_LIMITS_KEY] = upload_body_limit(settings.max_file_bytes)
    app.config["BODY_TIMEOUT"] = 30
    QuartSchema(
        app,
        openapi_path="/openapi.json",
        redoc_ui_path=None,
        scalar_ui_path=None,
        swagger_ui_path=None,
        info=API_INFO,
        openapi_provider_class=AetherOpenAPIProvider,
        security_schemes={"bearer": {"type": "http", "scheme": "bearer"}}
        if settings.auth_enabled
        else None,
        security=[{"bearer": []}] if settings.auth_enabled else None,
    )
    metrics = Metrics()
    history = history_store_for(settings, metrics, worker_id)
    engine = RuntimeEngine(
        settings, metrics, history, control_plane_for(settings, metrics, worker_id)
    )
    hub = ClientHub(metrics)
    app.extensions[EXTENSION_KEY] = AppState(settings=settings, engine=engine, metrics=metrics)
    app.extensions[HUB_KEY] = hub

    @app.before_serving
    async def start_engine() -> None:
        # The app opens the model paths and hands them to the engine, which runs chats on them.
        paths = open_model_paths(settings, engine.tracker, engine.file_chat.files, settings.history)
        await engine.start(app.nursery, paths)
        FULL_COLLECTIONS.freeze_started()

    @app.after_serving
    async def stop_engine() -> None:
        hub.close_all(CLOSE_GOING_AWAY, "server shutting down")
        engine.stop()

    @app.errorhandler(HTTPException)
    async def http_error(error: HTTPException) -> Response:
        response = json_error(*http_error_fields(error))
        allowed = getattr(error, "valid_methods", None)
        if allowed:
            response.headers["Allow"] = ", ".join(allowed)
        return response

    @app.errorhandler(Exception)
    async def unexpected_error(error: Exception) -> Response:
        log.error("request %s failed", request_id(), exc_info=error)
        return json_error(500, "internal_error", "the server failed to answer this request")

    register_v1(app)
    keys = KeyRing.from_settings(
        (key.get_secret_value() for key in settings.api_keys), settings.api_keys_file
    )
    quart_app: ASGIApp = app.asgi_app  # type: ignore[assignment]
    direct = DirectRoutes(quart_app, app.extensions[EXTENSION_KEY], app.config)
    app.asgi_app = middleware_stack(  # type: ignore[assignment,method-assign]
        WebSocketMount(direct, WebSocketEndpoint(engine, hub, settings)),
        keys,
        settings,
        metrics,
        engine.control,
    )
    return app


def middleware_stack(
    app: ASGIApp, keys: KeyRing, settings: Settings, metrics: Metrics, control: ControlPlane
) -> ASGIApp:
    """Outermost first: the client's address behind trusted proxies, the shielded response end,
    security headers, request ids and errors, the browser guard (Host, Origin, cross-site), rate
    limits, authentication."""
    public = PUBLIC_PATHS | PAGE_PATHS | ({"/metrics"} if settings.metrics_public else set())
    authenticated = AuthMiddleware(app, keys, frozenset(public), (PAGE_FILES_PREFIX,))
    limited = RateLimitMiddleware(
        authenticated,
        RateLimiter(settings.rate_limit_max_clients),
        chat=Tier("chat", settings.rate_limit_chat_per_minute, 60.0),
        default=Tier("default", settings.rate_limit_default_per_minute, 60.0),
        exempt_ips=frozenset(settings.rate_limit_exempt_ips),
        metrics=metrics,
        control=control,
    )
    guarded = BrowserGuardMiddleware(
        limited,
        BrowserPolicy(
            allowed_hosts=settings.effective_allowed_hosts,
            allowed_origins=frozenset(settings.allowed_origins),
            public_paths=PAGE_PATHS,
            public_prefixes=(PAGE_FILES_PREFIX,),
        ),
    )
    outer = ResponseEndMiddleware(SecurityHeadersMiddleware(ErrorHandlerMiddleware(guarded)))
    if not settings.trusted_proxies:
        return outer
    return ForwardedMiddleware(outer, proxy_networks(settings.trusted_proxies))
