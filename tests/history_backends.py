"""The two history stores, for tests that must hold for both: a backend is one database, and
``store()`` opens a new store on it (as a new process would)."""

from __future__ import annotations

import contextlib
import secrets
import sqlite3
from pathlib import Path
from typing import Any

import psycopg

from aether.core.history.postgres import PostgresHistoryStore
from aether.core.history.sqlite import SQLiteHistoryStore


class SQLiteBackend:
    name = "sqlite"

    def __init__(self, path: Path) -> None:
        self.path = path

    def store(self, writer: str | None = None) -> SQLiteHistoryStore:
        return SQLiteHistoryStore(self.path, writer)

    @property
    def settings(self) -> dict[str, Any]:
        """Settings that put a server's history here."""
        return {"db_path": str(self.path)}

    @property
    def environment(self) -> dict[str, str]:
        return {"AETHER_DB_PATH": str(self.path)}

    def answer_statuses(self) -> dict[str, str]:
        """Each stored answer's status, by request id."""
        with contextlib.closing(sqlite3.connect(self.path)) as connection:
            rows = connection.execute(
                "SELECT request_id, status FROM messages WHERE role = 'assistant'"
            ).fetchall()
        return dict(rows)


class PostgresBackend:
    name = "postgresql"

    def __init__(self, url: str) -> None:
        self.url = url

    def store(self, writer: str | None = None, lease_s: float = 10.0) -> PostgresHistoryStore:
        return PostgresHistoryStore(
            self.url, writer or f"test/{secrets.token_hex(4)}", lease_s=lease_s
        )

    @property
    def settings(self) -> dict[str, Any]:
        return {"database_url": self.url}

    @property
    def environment(self) -> dict[str, str]:
        return {"AETHER_DATABASE_URL": self.url}

    def answer_statuses(self) -> dict[str, str]:
        """Each stored answer's status, by request id."""
        with psycopg.connect(self.url) as connection:
            rows = connection.execute(
                "SELECT request_id, status FROM messages WHERE role = 'assistant'"
            ).fetchall()
        return dict(rows)

    def expire_leases(self) -> None:
        """Every writer's lease ends now, as if its period had passed since its last renewal."""
        with psycopg.connect(self.url, autocommit=True) as connection:
            connection.execute("UPDATE writers SET expires_at = now() - interval '1 second'")


HistoryBackend = SQLiteBackend | PostgresBackend
