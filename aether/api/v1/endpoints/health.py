"""Liveness and readiness probes, and the Prometheus metrics.

``/health`` answers while the process serves at all; ``/ready`` only once the engine has started
(and a model path is configured), so a load balancer sends chats only where they can run.

@.architecture
role: health endpoints
jobs: [health_monitoring, observability]
"""

from __future__ import annotations

from quart import Blueprint, Response

from aether import __version__
from aether.api.dependencies import app_state
from aether.api.responses import json_response
from aether.core.metrics import CONTENT_TYPE_LATEST

blueprint = Blueprint("health", __name__)


@blueprint.get("/health")
async def health() -> Response:
    return json_response({"status": "ok", "version": __version__})


@blueprint.get("/metrics")
async def metrics() -> Response:
    state = app_state()
    return Response(state.metrics.exposition(), content_type=CONTENT_TYPE_LATEST)


@blueprint.get("/ready")
async def ready() -> Response:
    engine = app_state().engine
    if not engine.started:
        return json_response({"status": "starting"}, 503)
    return json_response(
        {
            "status": "ready",
            "default_path": engine.streamer.default_path,
            "live_requests": engine.tracker.live_count,
        }
    )
