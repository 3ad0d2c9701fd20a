"""A real ``redis-server`` on a free loopback port, for tests and benchmarks of several workers.

``RedisServer.run`` starts Debian's ``redis-server`` (no persistence, its files in a temporary
directory), reports started once the server logs that it accepts connections, and stops it when
cancelled. ``restart`` stops and starts it on the same port, empty, as a restarted Redis without
persistence is: what the fault tests need.

@.architecture
role: test Redis server
jobs: [test_support]
"""

from __future__ import annotations

import shutil
import socket
import subprocess
import tempfile
from pathlib import Path

import trio

READY_LINE = b"Ready to accept connections"
START_TIMEOUT_S = 10.0


def redis_server_available() -> bool:
    return shutil.which("redis-server") is not None


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port: int = probe.getsockname()[1]
        return port


class RedisServer:
    def __init__(self) -> None:
        self.port = free_port()
        self._directory = Path(tempfile.mkdtemp(prefix="aether-redis-"))
        self._process: trio.Process | None = None
        self.log = b""

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Serve until cancelled."""
        try:
            await self.start()
            task_status.started()
            await trio.sleep_forever()
        finally:
            with trio.CancelScope(shield=True):
                await self.stop()
            shutil.rmtree(self._directory, ignore_errors=True)

    async def start(self) -> None:
        if self._process is not None:
            raise RuntimeError("redis-server is running already")
        command = [
            "redis-server",
            "--port", str(self.port),
            "--bind", "127.0.0.1",
            "--save", "",
            "--appendonly", "no",
            "--dir", str(self._directory),
        ]  # fmt: skip
        process = await trio.lowlevel.open_process(
            command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT
        )
        self._process = process
        assert process.stdout is not None
        with trio.fail_after(START_TIMEOUT_S):
            while READY_LINE not in self.log:
                chunk = await process.stdout.receive_some(4096)
                if not chunk:
                    await self.stop()
                    raise RuntimeError(f"redis-server did not start:\n{self.log.decode()}")
                self.log += chunk

    async def stop(self) -> None:
        process, self._process = self._process, None
        if process is None:
            return
        if process.returncode is None:
            process.terminate()
        await process.wait()
        if process.stdout is not None:
            await process.stdout.aclose()

    async def restart(self) -> None:
        """Stop, then start again on the same port: empty, as Redis without persistence is."""
        await self.stop()
        self.log = b""
        await self.start()
