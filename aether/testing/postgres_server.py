"""A real PostgreSQL server on a free loopback port, for tests and benchmarks of the PostgreSQL
history store.

``PostgresServer.start`` makes a new cluster in a temporary directory (``initdb``, trust
authentication for its one user, loopback only) and starts it with ``pg_ctl start --wait``;
``stop`` is a fast shutdown, ``crash`` an immediate one (a crash, recovered from at the next
start), ``restart`` a stop and a start
on the same port and data. The methods block (``pg_ctl`` waits for the server): a session-wide
fixture calls them directly, a Trio test through ``trio.to_thread.run_sync``. Each test takes a
database of its own (``create_database``), so the cluster is made once per test session.

``fsync`` is off unless asked for: a test's data need not survive the machine. PostgreSQL
refuses to run as root; as root, the server runs as the ``postgres`` user Debian's packages
create.

@.architecture
role: test PostgreSQL server
jobs: [test_support]
"""

from __future__ import annotations

import glob
import os
import pwd
import shutil
import subprocess
import tempfile
from pathlib import Path

import psycopg

from aether.testing.redis_server import free_port

USER = "aether"
START_TIMEOUT_S = 30


def _bin_dir() -> Path | None:
    """Where the server's programs are: Debian's newest version, else on PATH."""

    def version(path: str) -> int:
        part = Path(path).parts[-3]
        return int(part) if part.isdigit() else 0

    versions = sorted(glob.glob("/usr/lib/postgresql/*/bin/pg_ctl"), key=version)
    if versions:
        return Path(versions[-1]).parent
    found = shutil.which("pg_ctl")
    return Path(found).resolve().parent if found else None


def _server_user() -> pwd.struct_passwd | None:
    try:
        return pwd.getpwnam("postgres")
    except KeyError:
        return None


def postgres_available() -> bool:
    return _bin_dir() is not None and (os.geteuid() != 0 or _server_user() is not None)


class PostgresServer:
    def __init__(self, *, fsync: bool = False) -> None:
        bin_dir = _bin_dir()
        if bin_dir is None:
            raise RuntimeError("PostgreSQL's programs (initdb, pg_ctl) are not installed")
        self._bin = bin_dir
        self._fsync = fsync
        self.port = free_port()
        self.directory = Path(tempfile.mkdtemp(prefix="aether-postgres-"))
        self._data = self.directory / "data"
        self._log = self.directory / "server.log"
        self._user = _server_user() if os.geteuid() == 0 else None
        self._databases = 0
        self.running = False

    def url(self, database: str = "postgres") -> str:
        return f"postgresql://{USER}@127.0.0.1:{self.port}/{database}"

    def _run(self, *command: str) -> None:
        result = subprocess.run(
            [str(self._bin / command[0]), *command[1:]],
            capture_output=True,
            cwd=self.directory,
            user=None if self._user is None else self._user.pw_uid,
            group=None if self._user is None else self._user.pw_gid,
            check=False,
            timeout=START_TIMEOUT_S * 2,
        )
        if result.returncode != 0:
            log = self._log.read_text(errors="replace") if self._log.exists() else ""
            raise RuntimeError(
                f"{command[0]} {command[1] if len(command) > 1 else ''} failed:\n"
                f"{result.stderr.decode(errors='replace')}\n{log}"
            )

    def start(self) -> None:
        """Make the cluster (the first time) and start the server; returns once it accepts
        connections."""
        if not self._data.exists():
            if self._user is not None:
                os.chown(self.directory, self._user.pw_uid, self._user.pw_gid)
            self._run(
                "initdb", "--pgdata", str(self._data), "--username", USER, "--auth", "trust",
                "--encoding", "UTF8", "--locale", "C", "--no-sync",
            )  # fmt: skip
        options = (
            f"-p {self.port} -c listen_addresses=127.0.0.1 "
            f"-c unix_socket_directories={self.directory} "
            f"-c fsync={'on' if self._fsync else 'off'} -c max_connections=300"
        )
        self._run(
            "pg_ctl", "start", "--pgdata", str(self._data), "--log", str(self._log),
            "--options", options, "--wait", "--timeout", str(START_TIMEOUT_S),
        )  # fmt: skip
        self.running = True

    def stop(self) -> None:
        """Fast shutdown: open sessions are ended, their transactions rolled back."""
        if self.running:
            self.running = False
            self._run("pg_ctl", "stop", "--pgdata", str(self._data), "--mode", "fast", "--wait")

    def crash(self) -> None:
        """An immediate shutdown: every server process aborts, as in a crash (no checkpoint;
        the next start recovers from the log)."""
        if self.running:
            self.running = False
            self._run(
                "pg_ctl", "stop", "--pgdata", str(self._data), "--mode", "immediate", "--wait"
            )

    def restart(self) -> None:
        self.stop()
        self.start()

    def close(self) -> None:
        """Stop the server and remove its files."""
        try:
            self.stop()
        finally:
            shutil.rmtree(self.directory, ignore_errors=True)

    def create_database(self) -> str:
        """A new, empty database; its URL."""
        self._databases += 1
        name = f"test_{self._databases}"
        with psycopg.connect(self.url(), autocommit=True) as connection:
            connection.execute(f"CREATE DATABASE {name}")
        return self.url(name)
