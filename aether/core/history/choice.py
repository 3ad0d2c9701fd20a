"""Which history store a server keeps: PostgreSQL when ``database_url`` is set (several nodes
share it), else the SQLite file at ``db_path``; none without ``history``. The PostgreSQL driver
is imported only when it is used.

@.architecture
role: history store choice
jobs: [history_management]
"""

from __future__ import annotations

import secrets
import socket

from aether.config import Settings
from aether.core.history.sqlite import SQLiteHistoryStore
from aether.core.history.store import HistoryStore
from aether.core.metrics import Metrics


def generated_node_id() -> str:
    """A node name for a node not given one: its host name and a random part."""
    host = "".join(c if c.isalnum() or c in "._-" else "-" for c in socket.gethostname())
    return f"{host[:48] or 'node'}-{secrets.token_hex(3)}"


def writer_name(settings: Settings, worker_id: str | None) -> str:
    """The name a process writes its answers to PostgreSQL under: its node's and its own.
    Unique to the process's life (worker ids are, else a random part): a restarted process must
    not inherit its predecessor's lease."""
    return f"{settings.node_id or generated_node_id()}/{worker_id or secrets.token_hex(4)}"


def history_store_for(
    settings: Settings, metrics: Metrics, worker_id: str | None = None
) -> HistoryStore | None:
    """The store the settings name. ``worker_id``: this process is one of a supervisor's
    workers, by that name (its answers carry it)."""
    if not settings.history:
        return None
    if settings.database_url is None:
        return SQLiteHistoryStore(settings.db_path, worker_id, metrics.observe_commit)
    from aether.core.history.postgres import PostgresHistoryStore

    return PostgresHistoryStore(
        settings.database_url,
        writer_name(settings, worker_id),
        lease_s=settings.worker_lease_s,
        pool_size=settings.database_pool_size,
        on_commit=metrics.observe_commit,
    )
