"""How handlers reach the engine, the hub, the settings and the caller's identity.

The application state is kept in ``app.extensions`` under one key, so handlers depend on a typed
object instead of module globals, and each ``create_app`` call is independent (tests run many).

@.architecture
role: dependency access
jobs: [dependency_injection]
"""

from __future__ import annotations

from dataclasses import dataclass

from quart import current_app, request

from aether.asgi import identity_from_scope
from aether.config import Settings
from aether.core.metrics import Metrics
from aether.core.runtime.engine import RuntimeEngine

EXTENSION_KEY = "aether"


@dataclass(frozen=True)
class AppState:
    settings: Settings
    engine: RuntimeEngine
    metrics: Metrics


def app_state() -> AppState:
    state: AppState = current_app.extensions[EXTENSION_KEY]
    return state


def caller_identity() -> str:
    return identity_from_scope(request.scope)
