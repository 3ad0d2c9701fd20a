"""Which control plane a server runs with: Redis when ``redis_url`` is set, else the embedded
one (no Redis client is even imported).

@.architecture
role: control plane choice
jobs: [worker_coordination]
"""

from __future__ import annotations

from aether.config import Settings
from aether.core.control.plane import ControlPlane
from aether.core.metrics import Metrics


def control_plane_for(
    settings: Settings, metrics: Metrics, worker_id: str | None = None
) -> ControlPlane | None:
    """The shared control plane the settings name; None for the embedded default.
    ``worker_id``: the name its supervisor gave this worker (else one is made up)."""
    if settings.redis_url is None:
        return None
    from aether.core.control.redis_plane import RedisControlPlane

    return RedisControlPlane(
        settings.redis_url,
        settings.worker_lease_s,
        settings.workers,
        worker_id,
        metrics.control_plane_commands,
        settings.resume_retention_s,
    )
