"""A history database Aether cannot use stops ``python -m aether`` with one clear line."""

from __future__ import annotations

import os
import sqlite3
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path

import psycopg
import pytest
import trio

from aether.core.errors import StorageError
from aether.core.history import sqlite as sqlite_store
from aether.core.history.sqlite import MIGRATIONS, prepare_database
from aether.testing.redis_server import free_port
from tests.history_backends import PostgresBackend

DEADLINE_S = 30


def garbage(path: Path) -> str:
    path.write_bytes(b"these bytes are no database at all\n" * 200)
    return "is not a SQLite database, or it is damaged"


def directory(path: Path) -> str:
    path.mkdir()
    return "is a directory"


def empty(path: Path) -> str:
    path.touch()  # as a truncated database would be
    return "is empty (0 bytes): it may be a truncated database"


def newer_schema(path: Path) -> str:
    with sqlite3.connect(path) as db:
        db.execute("CREATE TABLE schema_version (version INTEGER NOT NULL)")
        db.execute("INSERT INTO schema_version VALUES (?)", (len(MIGRATIONS) + 7,))
    return f"has schema version {len(MIGRATIONS) + 7}, newer than this Aether"


def someone_elses(path: Path) -> str:
    with sqlite3.connect(path) as db:
        db.execute("CREATE TABLE notes (text TEXT)")
    return "is a SQLite database of something else"


@pytest.fixture
def unwritable(tmp_path: Path) -> Iterator[Callable[[Path], str]]:
    """A database file Aether may not read and write. Root ignores file modes, so as root the
    file is made immutable (which root cannot write either)."""
    made: list[Path] = []

    def make(path: Path) -> str:
        prepare_database(path)  # a good database, but out of reach
        if os.geteuid() != 0:
            path.chmod(0)
        elif subprocess.run(["chattr", "+i", str(path)], check=False).returncode != 0:
            pytest.skip("running as root, and chattr +i is not available here")
        made.append(path)
        return "permission denied"

    yield make
    for path in made:
        if os.geteuid() == 0:
            subprocess.run(["chattr", "-i", str(path)], check=False)
        path.chmod(0o600)


def snapshot(root: Path) -> list[tuple[str, int, int]]:
    """Every path under ``root``, with its size and modification time."""
    return sorted(
        (str(path), path.stat().st_size, path.stat().st_mtime_ns) for path in root.rglob("*")
    )


async def aether_exit(db_path: Path) -> subprocess.CompletedProcess[bytes]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("AETHER_")}
    env["AETHER_DB_PATH"] = str(db_path)
    with trio.fail_after(DEADLINE_S):
        return await trio.run_process(
            [sys.executable, "-m", "aether", "--port", "0"],
            env=env,
            capture_stdout=True,
            capture_stderr=True,
            check=False,
        )


@pytest.mark.parametrize(
    "make_bad_file", [garbage, directory, empty, newer_schema, someone_elses, "unwritable"]
)
async def test_a_bad_history_file_stops_the_server_with_one_line(
    make_bad_file: Callable[[Path], str] | str, tmp_path: Path, request: pytest.FixtureRequest
) -> None:
    if isinstance(make_bad_file, str):
        make_bad_file = request.getfixturevalue(make_bad_file)
        assert callable(make_bad_file)
    db_path = tmp_path / "history.sqlite3"
    problem = make_bad_file(db_path)
    before = snapshot(tmp_path)
    result = await aether_exit(db_path)
    stderr = result.stderr.decode()
    assert result.returncode == 1, stderr
    assert stderr.splitlines() == [stderr.rstrip("\n")], stderr  # one line
    assert stderr.startswith(f"aether: history database {db_path}"), stderr
    assert problem in stderr
    assert "Traceback" not in stderr
    assert snapshot(tmp_path) == before  # the file left as it was, nothing made beside it


def test_a_new_database_appears_whole_or_not_at_all(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A creation that fails part-way leaves no file behind (in particular no empty one, which
    the next start would refuse); one that succeeds leaves a database the next start opens."""
    path = tmp_path / "data" / "history.sqlite3"
    monkeypatch.setattr(sqlite_store, "MIGRATIONS", (*MIGRATIONS, "CREATE TABLE broken ("))
    with pytest.raises(StorageError, match="history database"):
        prepare_database(path)
    assert list(path.parent.iterdir()) == []
    monkeypatch.undo()
    prepare_database(path)
    assert path.stat().st_size > 0
    assert [p.name for p in path.parent.iterdir()] == [path.name]
    prepare_database(path)  # the next start
    with sqlite3.connect(path) as db:
        assert db.execute("SELECT version FROM schema_version").fetchall() == [(len(MIGRATIONS),)]
        assert db.execute("PRAGMA journal_mode").fetchone() == ("wal",)


async def test_a_postgresql_database_that_cannot_be_used_stops_the_server_with_one_line(
    postgres: PostgresBackend,
) -> None:
    """Unreachable, or of a newer schema: one line naming the database, its password left
    out, exit status 1."""
    with psycopg.connect(postgres.url, autocommit=True) as connection:
        connection.execute("CREATE TABLE schema_version (version INTEGER)")
        connection.execute("INSERT INTO schema_version VALUES (99)")
    port = free_port()  # nothing listens there
    cases = {
        f"postgresql://aether:sekret@127.0.0.1:{port}/aether": "Connection refused",
        postgres.url: "newer than this Aether",
    }
    for url, problem in cases.items():
        env = {k: v for k, v in os.environ.items() if not k.startswith("AETHER_")}
        env["AETHER_DATABASE_URL"] = url
        with trio.fail_after(DEADLINE_S):
            result = await trio.run_process(
                [sys.executable, "-m", "aether", "--port", "0"],
                env=env,
                capture_stdout=True,
                capture_stderr=True,
                check=False,
            )
        stderr = result.stderr.decode()
        assert result.returncode == 1, stderr
        assert stderr.splitlines() == [stderr.rstrip("\n")], stderr  # one line
        assert stderr.startswith("aether: history database postgresql://aether"), stderr
        assert problem in stderr
        assert "sekret" not in stderr
        assert "Traceback" not in stderr
