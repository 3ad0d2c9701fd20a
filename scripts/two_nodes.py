"""Two Aether nodes behind nginx on this machine, to try several nodes out (or to test a
frontend against them) without installing services.

Starts, all on loopback and on free ports: a Redis (``redis-server``, no persistence), a
PostgreSQL cluster in a temporary directory (Debian's ``postgresql`` programs), two nodes
(``python -m aether``, each with its own port, node id and files directory, ``--workers`` as
given), and nginx with ``deploy/nginx/aether.conf`` in front of them. Prints the address to use,
then runs until Ctrl-C, and stops everything it started (the temporary cluster and files go
too). The nodes inherit this shell's ``AETHER_*`` settings (a model, API keys), except those
this script sets: the Redis and database URLs, ports, node ids, trusted proxies, files.

    python scripts/two_nodes.py --workers 2

For a real deployment (services that survive a reboot), see the README's "Deploying".

@.architecture
role: local two-node launcher
jobs: [test_support]
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import trio

from aether.testing.nginx_server import NginxServer, nginx_available
from aether.testing.postgres_server import PostgresServer, postgres_available
from aether.testing.redis_server import RedisServer, redis_server_available

SERVING = re.compile(rb"serving on http://127\.0\.0\.1:(\d+)")


async def start_node(
    name: str, environment: dict[str, str], nursery: trio.Nursery
) -> tuple[trio.Process, int]:
    """Start a node; return it and its port once it serves. Its log goes on to this terminal."""
    process = await trio.lowlevel.open_process(
        [sys.executable, "-m", "aether", "--port", "0"],
        env=environment,
        stderr=subprocess.PIPE,
    )
    assert process.stderr is not None
    log = b""
    while (match := SERVING.search(log)) is None:
        chunk = await process.stderr.receive_some(4096)
        if not chunk:
            raise RuntimeError(f"node {name} did not start:\n{log.decode(errors='replace')}")
        log += chunk
    sys.stderr.buffer.write(log)

    async def relay() -> None:
        assert process.stderr is not None
        async for chunk in process.stderr:
            sys.stderr.buffer.write(chunk)
            sys.stderr.flush()

    nursery.start_soon(relay)
    return process, int(match.group(1))


async def run(workers: int) -> None:
    missing = [
        what
        for what, present in (
            ("redis-server", redis_server_available()),
            ("PostgreSQL (Debian's postgresql)", postgres_available()),
            ("nginx", nginx_available()),
        )
        if not present
    ]
    if missing:
        sys.exit(f"two_nodes: not installed: {', '.join(missing)}")
    files = Path(tempfile.mkdtemp(prefix="aether-nodes-"))
    database = PostgresServer(fsync=True)
    redis = RedisServer()
    processes: list[trio.Process] = []
    nginx: NginxServer | None = None
    try:
        await trio.to_thread.run_sync(database.start)
        async with trio.open_nursery() as nursery:
            await nursery.start(redis.run)
            base = {k: v for k, v in os.environ.items() if k not in EXCLUDED}
            ports = []
            for name in ("a", "b"):
                environment = {
                    **base,
                    "AETHER_REDIS_URL": redis.url,
                    "AETHER_DATABASE_URL": database.url(),
                    "AETHER_NODE_ID": f"node-{name}",
                    "AETHER_WORKERS": str(workers),
                    "AETHER_TRUSTED_PROXIES": "127.0.0.1",
                    "AETHER_FILES_DIR": str(files / name),
                }
                process, port = await start_node(name, environment, nursery)
                processes.append(process)
                ports.append(port)
            nginx = NginxServer(ports)
            await trio.to_thread.run_sync(nginx.start)
            print(
                f"\ntwo nodes (127.0.0.1:{ports[0]}, 127.0.0.1:{ports[1]}) behind nginx: "
                f"open {nginx.url}/ (WebSocket {nginx.ws_url}); Ctrl-C stops everything\n",
                file=sys.stderr,
                flush=True,
            )
            await trio.sleep_forever()
    finally:
        with trio.CancelScope(shield=True):
            if nginx is not None:
                await trio.to_thread.run_sync(nginx.close)
            for process in processes:
                if process.returncode is None:
                    process.terminate()  # a node drains its chats, then exits
            for process in processes:
                await process.wait()
            await trio.to_thread.run_sync(database.close)
            shutil.rmtree(files, ignore_errors=True)


EXCLUDED = {
    "AETHER_REDIS_URL",
    "AETHER_DATABASE_URL",
    "AETHER_NODE_ID",
    "AETHER_WORKERS",
    "AETHER_PORT",
    "AETHER_HOST",
    "AETHER_TRUSTED_PROXIES",
    "AETHER_FILES_DIR",
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--workers", type=int, default=1, help="worker processes per node")
    args = parser.parse_args()
    try:
        trio.run(run, args.workers)
    except* KeyboardInterrupt:
        print("two_nodes: everything stopped", file=sys.stderr)


if __name__ == "__main__":
    main()
