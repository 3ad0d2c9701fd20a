"""Aggregates the v1 blueprints into the application.

@.architecture
role: router aggregation
jobs: [router_aggregation]
"""

from __future__ import annotations

from quart import Quart

from aether.api import web
from aether.api.v1.endpoints import (
    asyncapi,
    chat,
    conversations,
    files,
    health,
    openai_compat,
    tools,
    usage,
)


def register_v1(app: Quart) -> None:
    app.register_blueprint(web.blueprint)
    app.register_blueprint(health.blueprint)
    app.register_blueprint(chat.blueprint)
    app.register_blueprint(conversations.blueprint)
    app.register_blueprint(files.blueprint)
    app.register_blueprint(openai_compat.blueprint)
    app.register_blueprint(tools.blueprint)
    app.register_blueprint(usage.blueprint)
    app.register_blueprint(asyncapi.blueprint)
