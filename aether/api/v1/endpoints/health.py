"""Liveness and readiness probes, and the Prometheus metrics.

``/health`` answers while the process serves at all; ``/ready`` only once the engine has started
(and a model path is configured), so a load balancer sends chats only where they can run.

@.architecture
role: health endpoints
jobs: [health_monitoring, observability]
"""

from __future__ import annotations

from quart import Blueprint, Response
from quart_schema import document, hide, security_scheme

from aether import __version__
from aether.api.dependencies import app_state
from aether.api.responses import json_response
from aether.api.schemas import ErrorResponse, Health, Ready
from aether.core.metrics import CONTENT_TYPE_LATEST

blueprint = Blueprint("health", __name__)


@blueprint.get("/health")
@document(responses={200: (Health, None), 500: (ErrorResponse, None)})
@security_scheme([])
async def health() -> Response:
    return json_response({"status": "ok", "version": __version__})


@blueprint.get("/metrics")
@hide
async def metrics() -> Response:
    state = app_state()
    return Response(state.metrics.exposition(), content_type=CONTENT_TYPE_LATEST)


@blueprint.get("/ready")
@document(responses={200: (Ready, None), 503: (Ready, None), 500: (ErrorResponse, None)})
@security_scheme([])
async def ready() -> Response:
    engine = app_state().engine
    if not engine.started:
        return json_response({"status": "starting"}, 503)
    if not engine.control.reachable:
        return json_response({"status": "control_plane_unavailable"}, 503)
    return json_response(
        {
            "status": "ready",
            "default_path": engine.streamer.default_path,
            "live_requests": engine.live_count,
        }
    )
