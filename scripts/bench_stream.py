#!/usr/bin/env python3
"""Streaming benchmark: Aether against the alternatives, on loopback, in one run.

Starts the fake upstream model (``python -m aether.testing.fake_llm``) and each server under test
as its own process, drives them over WebSocket from this process, and prints one table with
absolute figures and ratios against the baselines measured in the same run:

- ``aether``: ``python -m aether`` (one worker, http path, production settings);
- ``trio-websocket``: a minimal relay on bare trio-websocket (``scripts/bench/trio_ws_relay.py``);
- ``fastapi-uvicorn``: the same relay on FastAPI + uvicorn (``scripts/bench/fastapi_relay.py``);
- ``direct``: this process reading the upstream itself (the limit of relaying);
- ``aether-sse`` and ``fastapi-sse``: the first two again, chatting over server-sent events
  (``POST /v1/chat/stream``) instead of the WebSocket (capacity and paced workloads);
- ``aether-pg`` (not in the defaults): ``aether`` with its history in PostgreSQL
  (``AETHER_DATABASE_URL``) instead of SQLite. The benchmark then starts one PostgreSQL server
  for the run (``aether.testing.postgres_server``, fsync on, loopback only), gives each run of
  the server a new database of its own (dropped after it), and stops PostgreSQL at the end.
  Its server CPU figures add the CPU of PostgreSQL's processes (postmaster, the backends, the
  background writers: all that ran meanwhile), as ``aether-Nw``'s add its workers'; ``db cpu
  ms/chat`` is that part alone.

Workloads:
- ``capacity``: upstream delay 0, all streams at once: deltas/s, server CPU per delta, peak RSS,
  time to first token;
- ``paced``: every stream at a steady pace, arrivals spread over ``--paced-stagger-s``: time to
  first token (also as added over the upstream's own, read directly) and the gaps between tokens;
- ``stop``: a stop mid-stream on every stream at once: stop -> ``stopped`` latency, chunks after
  ``stopped``, stop -> upstream connection closed;
- ``stop-rest`` (Aether only, not in the defaults): the same stops sent as
  ``POST /v1/chat/<id>/stop`` on a connection of their own; with several workers, such a stop
  often lands on a worker that does not run the chat and is routed through Redis;
- ``idle``: connections that said hello and wait: server memory per connection;
- ``storm``: every stream runs, then half the clients vanish at once (socket reset, no close
  frame): how soon the server closes their upstream streams, that none is left open, that the
  other half finish, and how long the server stays busy after the last of them.
- ``resume`` (Aether only: the baselines cannot resume; not in the defaults): paced streams, all
  at once, at the paced workload's pace; once every client has ``--resume-after-tokens`` tokens,
  all drop their connection at once (socket reset, as in the storm), ``--resume-away-s`` later
  all reconnect at once and send ``resume`` after the last seq each received. Per stream: resume
  latency (``resume`` sent -> the first message after that seq), and whether it is exact (every
  seq from 0 to the terminal once, the text the upstream's whole answer); server CPU per delta
  (the deltas the upstream sent), peak RSS, and RSS per request retained after its end (the
  clients gone). Its baseline, in the same round on a server of its own: the same streams never
  dropped, ``aether (uninterrupted)``. With ``--workers N``, ``crossed workers`` counts the
  resumes that reached another worker than the chat's, ``unknown_request`` those answered that
  the chat is unknown.
- ``chat-cost`` (not in the defaults): a chat's fixed cost. Server CPU per request, over a fixed
  number of requests on keep-alive connections after a warm-up, for each route: ``GET /health``,
  ``POST /v1/chat``, ``/v1/chat/completions``, ``/v1/chat/stream`` and a chat over an open
  WebSocket; Aether runs its echo model without pauses, with and without history
  (``aether-no-history``), against a bare ASGI app on Hypercorn's trio worker
  (``hypercorn-asgi``: ``scripts/bench/hypercorn_asgi.py``) and FastAPI + uvicorn echoing the
  same chats.
Stream counts above ``--baselines-up-to`` (1000) run for Aether only (idle connections excepted).
``--repeat N`` runs every workload N times, the servers taking turns, and reports each figure's
median (the worst of the counts that must stay zero): a noisy machine's slow spells then fall on
every server alike.

    python scripts/bench_stream.py                  # defaults: a few minutes on 2 cores
    python scripts/bench_stream.py --workloads stop --stop-streams 200,1000 --json out.json
    python scripts/bench_stream.py --workloads chat-cost
    python scripts/bench_stream.py --workloads resume --resume-streams 100 --repeat 3
    python scripts/bench_stream.py --workloads resume --workers 2 --servers aether
    python scripts/bench_stream.py --workloads stop --stop-streams 50,500 --repeat 5
    python scripts/bench_stream.py --workloads capacity,paced,stop --workers 2 --servers aether
    python scripts/bench_stream.py --workloads capacity,paced,stop --servers aether,aether-pg

``--workers N`` adds ``aether-Nw`` (``python -m aether --workers N`` with a redis-server the
benchmark starts) to the capacity, paced, stop, stop-rest and resume workloads: server CPU sums
the supervisor and its workers, and ``redis cmds/chat`` counts the commands Redis ran per chat.

History writes: ``longest commit ms`` is the longest write batch of the run and ``commit p99 <=
ms`` the upper bound of the ``aether_history_commit_seconds`` bucket holding the 99th percentile
(bounds 0.2, 0.5, 1, 2, 5, 10, 25, 100, 500, 2500 ms), both from the server's /metrics. A batch
is the time it held the event loop in SQLite, its round trip (BEGIN ... COMMIT in one pipeline)
in PostgreSQL.

Needs the ``bench`` extra (``pip install -e '.[bench]'``). The client runs in this process and
shares the machine with the servers, so compare ratios, not absolute figures across machines.

@.architecture
role: streaming benchmark
jobs: [benchmarking]
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import platform
import re
import shutil
import socket
import statistics
import struct
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import h11
import httpx
import orjson
import psutil
import psycopg
import trio
from trio_websocket import (
    ConnectionClosed,
    HandshakeError,
    WebSocketConnection,
    open_websocket_url,
)

from aether.testing.postgres_server import PostgresServer
from aether.testing.redis_server import RedisServer

ROOT = Path(__file__).resolve().parent.parent
PY = sys.executable
TERMINALS = {"completion", "stopped", "error"}
# A stream that fails this way is reported as failed; anything else ends the run.
STREAM_FAILURES = (OSError, h11.ProtocolError, HandshakeError, ConnectionClosed)
SERVERS = ("aether", "trio-websocket", "fastapi-uvicorn", "direct", "aether-sse", "fastapi-sse")
# The SSE variants run the same server processes; only the client's transport differs.
PROCESS_OF = {"aether-sse": "aether", "fastapi-sse": "fastapi-uvicorn"}
SSE_WORKLOADS = ("capacity", "paced")
# The workloads run with several workers too (``--workers``).
WORKERS_WORKLOADS = ("capacity", "paced", "stop", "stop-rest", "resume")
# Aether's own REST stop route and its resume: no baseline has them.
AETHER_ONLY_WORKLOADS = ("stop-rest", "resume")
# Also measurable: Aether without conversation history (the cost of storing every answer), and
# with it in PostgreSQL.
OPTIONAL_SERVERS = ("aether-no-history", "aether-pg", "hypercorn-asgi")
STREAM_WORKLOADS = ("capacity", "paced", "stop", "idle", "storm")
# chat-cost: the servers measured by default, and the routes each of them answers.
CHAT_COST_SERVERS = ("aether", "aether-no-history", "hypercorn-asgi", "fastapi-uvicorn")
AETHER_ROUTES = ("health", "chat", "chat-completions", "chat-stream", "ws-chat")
CHAT_COST_ROUTES = {
    "aether": AETHER_ROUTES,
    "aether-no-history": AETHER_ROUTES,
    "aether-pg": AETHER_ROUTES,
    "hypercorn-asgi": ("health", "chat"),
    "fastapi-uvicorn": ("health", "chat", "chat-stream", "ws-chat"),
}
DB_DIR = Path(tempfile.mkdtemp(prefix="aether-bench-"))
# How long idle connections sit before the server's memory is read (let buffers settle).
IDLE_SETTLE_S = 1.0
# Storm: the server counts as idle again once it uses less than this share of a core over
# IDLE_WINDOW_S, sampled every CPU_SAMPLE_S; sampling goes on this long after the last stream.
IDLE_CPU_SHARE = 0.05
IDLE_WINDOW_S = 0.1
CPU_SAMPLE_S = 0.02
STORM_TAIL_S = 1.5
# chat-cost: the deadline for one route's warm-up and measured requests together.
CHAT_COST_ROUTE_TIMEOUT_S = 300
# Resume: the deadline for one stream, both its connections and the waits for the others
# together (a stream past it is failed); how long a client listens on after its terminal
# (nothing of the request may follow it).
RESUME_STREAM_TIMEOUT_S = 60
RESUME_LINGER_S = 0.2
# The points every stream of a resume run passes together, in order.
RESUME_STEPS = ("connected", "reached", "dropped", "reconnected")


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port: int = probe.getsockname()[1]
        return port


def now() -> float:
    return time.monotonic()


def pct(values: list[float], q: float) -> float:
    if not values:
        return math.nan
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


# The PostgreSQL server ``aether-pg`` keeps its history in, started by ``main`` when measured.
POSTGRES: PostgresServer | None = None


def postgres_cpu_s() -> float:
    """User and system CPU seconds of the benchmark's PostgreSQL so far: the postmaster, the
    processes it runs now, and those it has reaped (the backends of closed connections)."""
    assert POSTGRES is not None
    pid = int((POSTGRES.directory / "data" / "postmaster.pid").read_text().split()[0])
    postmaster = psutil.Process(pid)
    total = 0.0
    for child in postmaster.children():
        with contextlib.suppress(psutil.NoSuchProcess):  # a backend that just ended
            times = child.cpu_times()
            total += times.user + times.system
    own = postmaster.cpu_times()
    return float(total + own.user + own.system + own.children_user + own.children_system)


def drop_database(url: str) -> None:
    """Drop one run's database (blocking): the next run's PostgreSQL is not busy with it."""
    assert POSTGRES is not None
    name = urlsplit(url).path.lstrip("/")
    with psycopg.connect(POSTGRES.url(), autocommit=True) as connection:
        connection.execute(f"DROP DATABASE IF EXISTS {name} WITH (FORCE)")


@dataclass
class Process:
    name: str
    process: trio.Process
    port: int
    # The PostgreSQL database of its own the server keeps its history in (``aether-pg``).
    database: str | None = None

    @property
    def psutil(self) -> psutil.Process:
        return psutil.Process(self.process.pid)

    def tree(self) -> list[psutil.Process]:
        """The process and its children (a supervisor's workers)."""
        handle = self.psutil
        return [handle, *handle.children(recursive=True)]

    def db_cpu_s(self) -> float:
        """CPU seconds of the PostgreSQL server the history is in so far (0 without one)."""
        return postgres_cpu_s() if self.database is not None else 0.0

    def cpu_s(self) -> float:
        """User and system CPU seconds of the process and its children so far, and of its
        PostgreSQL server's processes if it has one."""
        own = sum(t.user + t.system for t in (p.cpu_times() for p in self.tree()))
        return own + self.db_cpu_s()

    def rss(self) -> int:
        return sum(p.memory_info().rss for p in self.tree())

    async def stop(self) -> None:
        with trio.CancelScope(shield=True):
            if self.process.returncode is None:
                self.process.terminate()
                with trio.move_on_after(10):
                    await self.process.wait()
                if self.process.returncode is None:
                    self.process.kill()
                    await self.process.wait()
            if self.database is not None:
                await trio.to_thread.run_sync(drop_database, self.database)
                self.database = None


async def wait_for_port(process: Process, timeout_s: float = 30) -> None:
    deadline = now() + timeout_s
    while now() < deadline:
        if process.process.returncode is not None:
            raise RuntimeError(f"{process.name} exited with {process.process.returncode}")
        try:
            stream = await trio.open_tcp_stream("127.0.0.1", process.port)
        except OSError:
            await trio.sleep(0.05)
            continue
        await stream.aclose()
        return
    raise RuntimeError(f"{process.name} did not listen on {process.port}")


async def start_process(name: str, argv: list[str], port: int, env: dict[str, str]) -> Process:
    child = await trio.lowlevel.open_process(
        argv, cwd=ROOT, env={**os.environ, **env}, stdout=subprocess.DEVNULL
    )
    process = Process(name, child, port)
    try:
        await wait_for_port(process)
    except BaseException:
        await process.stop()
        raise
    return process


async def start_upstream(tokens: int, delay_ms: float) -> Process:
    port = free_port()
    argv = [PY, "-m", "aether.testing.fake_llm", "--port", str(port), "--tokens", str(tokens)]
    argv += ["--delay-ms", str(delay_ms)]
    return await start_process("upstream", argv, port, {})


# ``aether-2w``: Aether with two worker processes (``--workers 2``) and Redis.
WORKERS_SERVER = re.compile(r"aether-(\d+)w")
# The Redis the several-worker servers share, started by ``main`` when one is measured.
REDIS: RedisServer | None = None
WORKERS_READY_TIMEOUT_S = 60


def workers_of(name: str) -> int:
    match = WORKERS_SERVER.fullmatch(name)
    return int(match.group(1)) if match else 1


async def redis_command(*args: str) -> Any:
    """One command to the benchmark's Redis, on a connection of its own (RESP, by hand: the
    replies used here are integers, bulk strings and arrays of them)."""
    assert REDIS is not None
    stream = await trio.open_tcp_stream("127.0.0.1", REDIS.port)
    async with stream:
        request = b"*%d\r\n" % len(args)
        for arg in args:
            request += b"$%d\r\n%s\r\n" % (len(arg.encode()), arg.encode())
        await stream.send_all(request)
        buffer = b""

        async def line() -> bytes:
            nonlocal buffer
            while b"\r\n" not in buffer:
                chunk = await stream.receive_some(65536)
                if not chunk:
                    raise ConnectionError("redis closed the connection")
                buffer += chunk
            head, buffer = buffer.split(b"\r\n", 1)
            return head

        async def reply() -> Any:
            nonlocal buffer
            head = await line()
            kind, rest = head[:1], head[1:]
            if kind == b":":
                return int(rest)
            if kind == b"+":
                return rest.decode()
            if kind == b"$":
                size = int(rest)
                if size < 0:
                    return None
                while len(buffer) < size + 2:
                    buffer += await stream.receive_some(65536)
                value, buffer = buffer[:size], buffer[size + 2 :]
                return value.decode()
            if kind == b"*":
                return [await reply() for _ in range(int(rest))]
            raise ConnectionError(f"redis answered {head!r}")

        return await reply()


async def aether_metric(process: Process, name: str) -> float:
    """One unlabelled figure of an Aether server's /metrics (all its workers'); nan if absent."""
    async with httpx.AsyncClient() as client:
        exposition = (await client.get(f"http://127.0.0.1:{process.port}/metrics")).text
    match = re.search(rf"^{name} (\S+)$", exposition, re.MULTILINE)
    return float(match.group(1)) if match else math.nan


async def commit_quantile_bound(process: Process, q: float) -> float:
    """The upper bound (seconds) of the ``aether_history_commit_seconds`` bucket that holds
    the ``q`` quantile of the server's write batches; nan without any."""
    async with httpx.AsyncClient() as client:
        exposition = (await client.get(f"http://127.0.0.1:{process.port}/metrics")).text
    pattern = r'^aether_history_commit_seconds_bucket\{le="([^"]+)"\} (\S+)$'
    buckets = sorted(
        (float(bound), float(count))
        for bound, count in re.findall(pattern, exposition, re.MULTILINE)
    )
    if not buckets or buckets[-1][1] == 0:
        return math.nan
    wanted = math.ceil(q * buckets[-1][1])
    return next(bound for bound, count in buckets if count >= wanted)


async def redis_calls(process: Process | None) -> float | None:
    """The round trips to Redis the server's workers made so far (None when the server does
    not use Redis). Redis' own command count would also count the commands its scripts run."""
    if process is None or workers_of(process.name) == 1:
        return None
    calls = await aether_metric(process, "aether_control_plane_commands_total")
    return 0.0 if math.isnan(calls) else calls


async def wait_for_workers(process: Process, workers: int) -> None:
    """Wait until every worker holds its lease in Redis and the server answers /ready (another
    process's state: polled)."""
    async with httpx.AsyncClient() as client:
        for _ in range(int(WORKERS_READY_TIMEOUT_S / 0.05)):
            leases = await redis_command("KEYS", "aether:worker:*")
            if len(leases) >= workers:
                ready = await client.get(f"http://127.0.0.1:{process.port}/ready")
                if ready.status_code == 200:
                    return
            await trio.sleep(0.05)
    raise RuntimeError(f"{process.name}: {workers} workers not ready")


async def start_server(
    name: str, upstream_url: str | None, log_level: str = "WARNING", resume_grace_s: float = 10.0
) -> Process:
    """Start a server under test; Aether without ``upstream_url`` serves its echo model."""
    port = free_port()
    workers = workers_of(name)
    name = PROCESS_OF.get(name, name)
    database = None
    if name in ("aether", "aether-no-history", "aether-pg") or workers > 1:
        argv = [PY, "-m", "aether", "--host", "127.0.0.1", "--port", str(port)]
        argv += ["--log-level", log_level]
        if upstream_url is None:
            argv += ["--provider", "echo"]
        else:
            argv += ["--provider", "http", "--llm-base-url", upstream_url]
            argv += ["--llm-model", "fake-model"]
        # Production settings, except the limits meant for many clients: here the whole load
        # comes from one address and one (anonymous) caller.
        env = {
            "AETHER_RATE_LIMIT_EXEMPT_IPS": "127.0.0.1",
            "AETHER_MAX_CONNECTIONS_PER_IP": "100000",
            "AETHER_MAX_REQUESTS_PER_CALLER": "100000",
            "AETHER_MAX_MESSAGES_PER_SECOND": "100000",
            "AETHER_ECHO_TOKEN_DELAY_S": "0",
            "AETHER_DB_PATH": str(DB_DIR / f"history-{port}.sqlite3"),
            "AETHER_HISTORY": "false" if name == "aether-no-history" else "true",
            "AETHER_RESUME_GRACE_S": str(resume_grace_s),
        }
        if name == "aether-pg":
            assert POSTGRES is not None
            database = await trio.to_thread.run_sync(POSTGRES.create_database)
            env["AETHER_DATABASE_URL"] = database
        if workers > 1:
            assert REDIS is not None
            argv += ["--workers", str(workers)]
            env["AETHER_REDIS_URL"] = REDIS.url
            # Flushed between servers, so each run's command count is its own.
            await redis_command("FLUSHDB")
    elif name == "hypercorn-asgi":
        argv = [PY, "scripts/bench/hypercorn_asgi.py", "--port", str(port)]
        env = {}
    elif name == "trio-websocket":
        argv = [PY, "scripts/bench/trio_ws_relay.py", "--port", str(port)]
        argv += ["--upstream", upstream_url or ""]
        env = {}
    elif name == "fastapi-uvicorn":
        argv = [PY, "-m", "uvicorn", "fastapi_relay:app", "--app-dir", "scripts/bench"]
        argv += ["--host", "127.0.0.1", "--port", str(port)]
        argv += ["--log-level", "warning", "--no-access-log"]
        env = {"AETHER_BENCH_UPSTREAM": upstream_url} if upstream_url else {}
    else:
        raise ValueError(name)
    try:
        process = await start_process(name, argv, port, env)
    except BaseException:
        if database is not None:
            with trio.CancelScope(shield=True):
                await trio.to_thread.run_sync(drop_database, database)
        raise
    process.database = database
    if workers > 1:
        process.name = f"aether-{workers}w"
        try:
            await wait_for_workers(process, workers)
        except BaseException:
            await process.stop()
            raise
    return process


@dataclass
class StreamResult:
    tag: str = ""
    sent_at: float = 0.0
    first_token_at: float | None = None
    token_times: list[float] = field(default_factory=list)
    tokens: int = 0
    terminal: str | None = None
    stop_sent_at: float | None = None
    stopped_at: float | None = None
    chunks_after_terminal: int = 0
    error: str | None = None
    vanished_at: float | None = None
    terminal_at: float | None = None


class Vanish(Exception):
    """This client disappears: its socket is reset under the connection."""


class Workload:
    """One client stream: connect, wait for the start signal, chat, maybe stop, read to end."""

    def __init__(
        self,
        stop_after_tokens: int | None,
        linger_s: float,
        stagger_s: float,
        vanish_after_tokens: int | None = None,
        stop_url: str | None = None,
    ) -> None:
        self.stop_after_tokens = stop_after_tokens
        # Stop over REST, on a connection of its own, at this base URL (else a `stop` frame).
        self.stop_url = stop_url
        # Every other stream (odd tags) vanishes once it has this many tokens.
        self.vanish_after_tokens = vanish_after_tokens
        self.linger_s = linger_s
        # Streams start spread evenly over this long after the signal (0: all at once).
        self.stagger_s = stagger_s
        self.streams = 1

    async def wait_turn(self, tag: str, go: trio.Event) -> None:
        await go.wait()
        if self.stagger_s:
            await trio.sleep(self.stagger_s * int(tag[1:]) / self.streams)

    async def ws_stream(
        self, url: str, tag: str, connected: Callable[[], None], go: trio.Event
    ) -> StreamResult:
        result = StreamResult()
        try:
            async with (
                trio.open_nursery() as nursery,
                open_websocket_url(url, max_message_size=1 << 22) as ws,
            ):
                await ws.get_message()  # hello
                connected()
                await self.wait_turn(tag, go)
                result.sent_at = now()
                await ws.send_message(json.dumps({"type": "chat", "id": tag, "message": tag}))
                await self._read(ws, tag, result, nursery)
        # Raised inside the connection's nursery, they come in an exception group.
        except* ConnectionClosed as group:
            closed = group.exceptions[0]
            assert isinstance(closed, ConnectionClosed)
            result.error = f"closed: {closed.reason}"
        except* Vanish:
            result.terminal = "vanished"
        return result

    async def _read(self, ws: Any, tag: str, result: StreamResult, nursery: trio.Nursery) -> None:
        vanishes = self.vanish_after_tokens is not None and int(tag[1:]) % 2 == 1
        while True:
            message = orjson.loads(await ws.get_message())
            if not self._take(message, now(), result):
                continue
            if vanishes and result.tokens >= (self.vanish_after_tokens or 0):
                result.vanished_at = now()
                reset(ws._stream.socket)
                raise Vanish
            if (
                self.stop_after_tokens is not None
                and result.stop_sent_at is None
                and result.tokens >= self.stop_after_tokens
            ):
                result.stop_sent_at = now()
                if self.stop_url is None:
                    await ws.send_message(json.dumps({"type": "stop", "id": tag}))
                else:  # beside the reading, so that `stopped` is timed when it arrives
                    nursery.start_soon(self._stop_over_rest, tag, result)
            if result.terminal is not None:
                if self.linger_s > 0:
                    # Listen a little longer: nothing of this request may follow its terminal.
                    with trio.move_on_after(self.linger_s):
                        await self._read_after_terminal(ws, result)
                return

    async def _stop_over_rest(self, tag: str, result: StreamResult) -> None:
        status = await post_lines(f"{self.stop_url}/v1/chat/{tag}/stop", {}, lambda *_: None)
        if status != 202:
            result.error = f"stop: HTTP {status}"

    @staticmethod
    def _take(message: dict[str, Any], at: float, result: StreamResult) -> bool:
        """Count one protocol message; True if it was new content or the terminal."""
        content = message.get("content")
        if isinstance(content, str) and content:
            if result.terminal is not None:
                result.chunks_after_terminal += 1
                return False
            count = content.count(" ")
            result.tokens += count
            result.token_times.extend([at] * count)
            if result.first_token_at is None:
                result.first_token_at = at
            return True
        if message.get("role") == "server" and message.get("type") in TERMINALS:
            if result.terminal is not None:
                result.chunks_after_terminal += 1
                return False
            result.terminal = message["type"]
            result.terminal_at = at
            if message["type"] == "stopped":
                result.stopped_at = at
            return True
        return False

    async def _start(self, tag: str, connected: Callable[[], None], go: trio.Event) -> StreamResult:
        """For a client with nothing to connect first: ready, wait for the turn, start."""
        result = StreamResult()
        connected()
        await self.wait_turn(tag, go)
        result.sent_at = now()
        return result

    async def sse_stream(
        self, url: str, tag: str, connected: Callable[[], None], go: trio.Event
    ) -> StreamResult:
        result = await self._start(tag, connected, go)

        def on_line(line: bytes, at: float) -> None:
            if line.startswith(b"data: "):
                self._take(orjson.loads(line[6:]), at, result)

        status = await post_lines(url, {"id": tag, "message": tag}, on_line)
        if status != 200:
            result.error = f"HTTP {status}"
        return result

    async def _read_after_terminal(self, ws: Any, result: StreamResult) -> None:
        while True:
            message = orjson.loads(await ws.get_message())
            if message.get("id") is not None:
                result.chunks_after_terminal += 1

    async def direct_stream(
        self, url: str, tag: str, connected: Callable[[], None], go: trio.Event
    ) -> StreamResult:
        result = await self._start(tag, connected, go)

        def on_line(line: bytes, at: float) -> None:
            if not line.startswith(b"data: ") or line == b"data: [DONE]":
                return
            delta = orjson.loads(line[6:])["choices"][0]["delta"].get("content")
            if delta:
                result.tokens += delta.count(" ")
                result.token_times.append(at)
                if result.first_token_at is None:
                    result.first_token_at = at

        body = {"model": "m", "messages": [{"role": "user", "content": tag}], "stream": True}
        if await post_lines(url + "/chat/completions", body, on_line) == 200:
            result.terminal = "completion"
        return result


async def post_lines(url: str, body: Any, on_line: Callable[[bytes, float], None]) -> int:
    """POST ``body`` as JSON and pass each line of the answer, with when it arrived, to
    ``on_line``; returns the status. h11 on a Trio socket: a lean client, so that the load
    client (which shares the machine) costs less per line than the servers it measures."""
    parts = urlsplit(url)
    payload = orjson.dumps(body)
    headers = [
        ("host", parts.netloc),
        ("content-type", "application/json"),
        ("content-length", str(len(payload))),
    ]
    conn = h11.Connection(h11.CLIENT)
    request = conn.send(h11.Request(method="POST", target=parts.path, headers=headers)) or b""
    request += (conn.send(h11.Data(data=payload)) or b"") + (conn.send(h11.EndOfMessage()) or b"")
    status = 0
    pending = b""
    async with await trio.open_tcp_stream(parts.hostname or "127.0.0.1", parts.port or 80) as s:
        await s.send_all(request)
        while True:
            event = conn.next_event()
            if event is h11.NEED_DATA:
                conn.receive_data(await s.receive_some(65536))
            elif isinstance(event, h11.Response):
                status = event.status_code
            elif isinstance(event, h11.Data):
                at = now()
                *lines, pending = (pending + bytes(event.data)).split(b"\n")
                for line in lines:
                    on_line(line, at)
            elif isinstance(event, h11.EndOfMessage | h11.ConnectionClosed):
                return status


async def run_streams(
    server: str, url: str, streams: int, workload: Workload
) -> tuple[list[StreamResult], float]:
    """Connect every stream, start them together, wait for all; returns results and wall time."""
    workload.streams = streams
    results: list[StreamResult] = []
    ready = 0
    all_connected = trio.Event()
    go = trio.Event()

    def connected() -> None:
        nonlocal ready
        ready += 1
        if ready == streams:
            all_connected.set()

    async def one(index: int) -> None:
        tag = f"s{index}"
        announced = False

        def connected_once() -> None:
            nonlocal announced
            if not announced:
                announced = True
                connected()

        try:
            # Each connection in its own nursery: trio-websocket#184.
            async with trio.open_nursery():
                if server == "direct":
                    result = await workload.direct_stream(url, tag, connected_once, go)
                elif server.endswith("-sse"):
                    result = await workload.sse_stream(url, tag, connected_once, go)
                else:
                    result = await workload.ws_stream(url, tag, connected_once, go)
        except* STREAM_FAILURES as group:
            # Counted in the row's terminals (a failed stream), not the end of the run.
            result = StreamResult(error=type(group.exceptions[0]).__name__)
            connected_once()
        result.tag = tag
        results.append(result)

    async with trio.open_nursery() as nursery:
        for index in range(streams):
            nursery.start_soon(one, index)
        with trio.fail_after(120):
            await all_connected.wait()
        started = now()
        go.set()
    return results, now() - started


def reset(sock: Any) -> None:
    """Close a socket the way a vanished client does: a TCP reset, no close frame."""
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    sock.close()


async def sample_cpu(process: Process | None, samples: list[tuple[float, float]]) -> None:
    if process is None:
        return
    while True:
        samples.append((now(), process.cpu_s()))
        await trio.sleep(CPU_SAMPLE_S)


def busy_after_ms(samples: list[tuple[float, float]], since: float) -> float:
    """How long after ``since`` the CPU samples show the server idle (nan if never)."""
    for i, (at, cpu) in enumerate(samples):
        if at < since:
            continue
        later = next((s for s in samples[i:] if s[0] >= at + IDLE_WINDOW_S), None)
        if later is None:
            break
        if (later[1] - cpu) / (later[0] - at) < IDLE_CPU_SHARE:
            return (at - since) * 1000
    return math.nan


async def sample_rss(process: Process | None, peak: list[int]) -> None:
    if process is None:
        return
    while True:
        peak[0] = max(peak[0], process.rss())
        await trio.sleep(0.05)


async def measure(
    server: str,
    upstream: Process,
    streams: int,
    workload: Workload,
    log_level: str,
    stop_over_rest: bool = False,
) -> dict[str, Any]:
    upstream_url = f"http://127.0.0.1:{upstream.port}/v1"
    # A vanished client's chats are measured stopping at once (the storm), as the baselines do.
    grace_s = 0.0 if workload.vanish_after_tokens is not None else 10.0
    process = (
        None if server == "direct" else await start_server(server, upstream_url, log_level, grace_s)
    )
    if stop_over_rest and process is not None:
        workload.stop_url = f"http://127.0.0.1:{process.port}"
    try:
        url = upstream_url
        if process is not None:
            url = f"ws://127.0.0.1:{process.port}/ws"
            if server.endswith("-sse"):
                url = f"http://127.0.0.1:{process.port}/v1/chat/stream"
        idle_rss = process.rss() if process else 0
        cpu_before = process.cpu_s() if process else None
        db_cpu_before = process.db_cpu_s() if process else 0.0
        redis_before = await redis_calls(process)
        upstream_cpu_before = upstream.psutil.cpu_times()
        peak = [idle_rss]
        cpu_samples: list[tuple[float, float]] = []
        async with trio.open_nursery() as nursery:
            nursery.start_soon(sample_rss, process, peak)
            nursery.start_soon(sample_cpu, process, cpu_samples)
            results, wall = await run_streams(server, url, streams, workload)
            if workload.vanish_after_tokens is not None:
                await trio.sleep(STORM_TAIL_S)
            nursery.cancel_scope.cancel()
        cpu_s = 0.0
        db_cpu_s = math.nan
        if process is not None and cpu_before is not None:
            cpu_s = process.cpu_s() - cpu_before
            if process.database is not None:
                db_cpu_s = process.db_cpu_s() - db_cpu_before
        redis_after = await redis_calls(process) if redis_before is not None else 0.0
        longest_commit_s = longest_lock_wait_s = commit_p99_bound_s = math.nan
        if process is not None and server.startswith("aether"):
            name = "aether_history_commit_longest_seconds"
            longest_commit_s = await aether_metric(process, name)
            name = "aether_history_lock_wait_longest_seconds"
            longest_lock_wait_s = await aether_metric(process, name)
            commit_p99_bound_s = await commit_quantile_bound(process, 0.99)
        up_after = upstream.psutil.cpu_times()
        upstream_cpu_s = (up_after.user - upstream_cpu_before.user) + (
            up_after.system - upstream_cpu_before.system
        )
        async with httpx.AsyncClient() as client:
            records = (await client.get(f"http://127.0.0.1:{upstream.port}/_fake/streams")).json()
    finally:
        if process is not None:
            await process.stop()
    summary = summarize(results, wall, cpu_s, upstream_cpu_s, peak[0], idle_rss, records)
    summary["server_cpu_ms_per_chat"] = cpu_s / streams * 1000
    summary["db_cpu_ms_per_chat"] = db_cpu_s / streams * 1000
    summary["longest_commit_ms"] = longest_commit_s * 1000
    summary["commit_p99_bound_ms"] = commit_p99_bound_s * 1000
    summary["longest_lock_wait_ms"] = longest_lock_wait_s * 1000
    summary["redis_cmds_per_chat"] = (
        (redis_after - redis_before) / streams if redis_before is not None else math.nan
    )
    ends = [r.terminal_at for r in results if r.terminal_at is not None]
    summary["busy_after_ms"] = busy_after_ms(cpu_samples, max(ends)) if ends else math.nan
    return summary


async def measure_idle(
    server: str, upstream: Process, connections: int, log_level: str
) -> dict[str, Any]:
    """Open ``connections`` WebSockets that wait after ``hello``; the server's RSS per one."""
    process = await start_server(server, f"http://127.0.0.1:{upstream.port}/v1", log_level)
    url = f"ws://127.0.0.1:{process.port}/ws"
    try:
        before = process.rss()
        opened = 0
        all_open = trio.Event()
        async with trio.open_nursery() as nursery:

            async def hold() -> None:
                nonlocal opened
                async with open_websocket_url(url) as ws:
                    await ws.get_message()  # hello
                    opened += 1
                    if opened == connections:
                        all_open.set()
                    await trio.sleep_forever()

            for _ in range(connections):
                nursery.start_soon(hold)
            with trio.fail_after(120):
                await all_open.wait()
            await trio.sleep(IDLE_SETTLE_S)
            after = process.rss()
            nursery.cancel_scope.cancel()
    finally:
        await process.stop()
    return {
        "streams": connections,
        "rss_before_mib": before / 2**20,
        "rss_after_mib": after / 2**20,
        "rss_per_connection_kib": (after - before) / 1024 / connections,
        "terminals": {"open": connections},
    }


class Barrier:
    """A point every stream of a run passes together: ``passed`` once each has arrived (a
    stream that failed before it arrives too, so nobody waits for it); the streams go on once
    ``released``: then too, unless ``held`` (for something to be done first, ``release``)."""

    def __init__(self, parties: int, held: bool = False) -> None:
        self.parties = parties
        self.held = held
        self.arrived = 0
        self.passed = trio.Event()
        self.released = trio.Event()
        if parties <= 0:
            self.arrive()

    def arrive(self) -> None:
        self.arrived += 1
        if self.arrived >= self.parties:
            self.passed.set()
            if not self.held:
                self.release()

    def release(self) -> None:
        self.released.set()


@dataclass
class ResumeResult:
    """One stream of the resume workload: its request's messages as the client received them,
    over both its connections."""

    tag: str
    messages: list[dict[str, Any]] = field(default_factory=list)
    # How many of the messages came before the drop, and the seq the resume asked to follow.
    kept: int | None = None
    after_seq: int | None = None
    resume_sent_at: float | None = None
    # The first message with a seq above after_seq.
    resumed_at: float | None = None
    # The error code the resume was answered with (unknown_request: another worker's chat).
    refused: str | None = None
    error: str | None = None
    # The client's port of each connection (which of the server's processes held it).
    ports: list[int] = field(default_factory=list)


def assistant_text(message: dict[str, Any]) -> str:
    """The answer text a message carries (assistant message content), else ''."""
    content = message.get("content")
    if message.get("role") == "assistant" and message.get("type") == "message":
        return content if isinstance(content, str) else ""
    return ""


def ended(messages: list[dict[str, Any]]) -> bool:
    """Whether the last message received is the request's terminal."""
    return bool(messages) and is_terminal(messages[-1])


def is_terminal(message: dict[str, Any]) -> bool:
    return message.get("role") == "server" and message.get("type") in TERMINALS


def socket_of(ws: WebSocketConnection) -> trio.socket.SocketType:
    """The TCP socket under a client's WebSocket."""
    stream = ws._stream
    assert isinstance(stream, trio.SocketStream)
    return stream.socket


async def cancel_when(event: trio.Event, scope: trio.CancelScope) -> None:
    await event.wait()
    scope.cancel()


async def linger(ws: Any, result: ResumeResult) -> None:
    """Listen on after the terminal: anything of the request that follows is kept (and makes
    the stream inexact)."""
    with trio.move_on_after(RESUME_LINGER_S):
        while True:
            message = orjson.loads(await ws.get_message())
            if message.get("id") == result.tag:
                result.messages.append(message)


async def first_connection(
    url: str,
    drop_after_tokens: int | None,
    steps: dict[str, Barrier],
    arrive: Callable[[str], None],
    result: ResumeResult,
) -> bool:
    """Chat once every stream is connected. With ``drop_after_tokens``: read on until every
    stream has that many tokens, then drop the connection (a TCP reset, no close frame) and
    return True; without, read to the terminal."""
    tag = result.tag
    tokens = 0
    dropped = False
    try:
        async with (
            trio.open_nursery() as nursery,
            open_websocket_url(url, max_message_size=1 << 22) as ws,
        ):
            await ws.get_message()  # hello
            result.ports.append(socket_of(ws).getsockname()[1])
            arrive("connected")
            await steps["connected"].released.wait()
            await ws.send_message(json.dumps({"type": "chat", "id": tag, "message": tag}))
            with trio.CancelScope() as reading:
                if drop_after_tokens is not None:
                    nursery.start_soon(cancel_when, steps["reached"].released, reading)
                while not ended(result.messages):
                    message = orjson.loads(await ws.get_message())
                    if message.get("id") != tag:
                        continue
                    result.messages.append(message)
                    tokens += assistant_text(message).count(" ")
                    if drop_after_tokens is not None and tokens >= drop_after_tokens:
                        arrive("reached")
            if ended(result.messages):  # whole before the drop: nothing to resume
                arrive("reached")
                await linger(ws, result)
                return False
            reset(socket_of(ws))
            raise Vanish
    except* Vanish:
        dropped = True
    return dropped


async def resume_connection(
    url: str, steps: dict[str, Barrier], arrive: Callable[[str], None], result: ResumeResult
) -> None:
    """Connect again and, once every stream has, resume after the last seq received; read to
    the terminal (or the refusal)."""
    tag = result.tag
    async with open_websocket_url(url, max_message_size=1 << 22) as ws:
        await ws.get_message()  # hello
        result.ports.append(socket_of(ws).getsockname()[1])
        arrive("reconnected")
        await steps["reconnected"].released.wait()
        after_seq = int(result.messages[-1]["seq"]) if result.messages else -1
        result.kept, result.after_seq = len(result.messages), after_seq
        resume = json.dumps({"type": "resume", "id": tag, "after_seq": after_seq})
        result.resume_sent_at = now()
        await ws.send_message(resume)
        while not ended(result.messages):
            message = orjson.loads(await ws.get_message())
            if message.get("id") == tag:
                if result.resumed_at is None and int(message.get("seq", -1)) > after_seq:
                    result.resumed_at = now()
                result.messages.append(message)
            elif message.get("type") == "error" and (message.get("ref") or {}).get("id") == tag:
                result.refused = str(message.get("code"))
                return
        await linger(ws, result)


async def resume_stream(
    url: str,
    drop_after_tokens: int | None,
    away_s: float,
    steps: dict[str, Barrier],
    result: ResumeResult,
) -> None:
    """One client of the resume workload: chat, maybe drop, stay away ``away_s`` once all have
    dropped, and resume; it arrives at every step whatever happens to it."""
    arrived: set[str] = set()

    def arrive(step: str) -> None:
        if step not in arrived:
            arrived.add(step)
            steps[step].arrive()

    try:
        with trio.move_on_after(RESUME_STREAM_TIMEOUT_S) as deadline:
            # Each connection in its own nursery: trio-websocket#184.
            async with trio.open_nursery():
                dropped = await first_connection(url, drop_after_tokens, steps, arrive, result)
            if dropped:
                arrive("dropped")
                await steps["dropped"].released.wait()
                await trio.sleep(away_s)  # the chats run on meanwhile: the resume replays
                async with trio.open_nursery():
                    await resume_connection(url, steps, arrive, result)
        if deadline.cancelled_caught:
            result.error = "timeout"
    except* STREAM_FAILURES as group:
        result.error = type(group.exceptions[0]).__name__
    finally:
        for step in RESUME_STEPS:
            arrive(step)


def connection_owners(process: Process) -> dict[int, int]:
    """Which of the server's processes holds each of its open TCP connections, by the peer's
    port (blocking: it reads /proc)."""
    owners: dict[int, int] = {}
    for handle in process.tree():
        with contextlib.suppress(psutil.NoSuchProcess):
            listing = getattr(handle, "net_connections", None) or handle.connections
            for connection in listing(kind="tcp"):
                if connection.raddr and connection.status == psutil.CONN_ESTABLISHED:
                    owners[connection.raddr.port] = handle.pid
    return owners


# Where the streams' connections are all open, held until noted which worker has each.
OWNERS_NOTED_AT = ("connected", "reconnected")


async def note_owners(
    process: Process, steps: dict[str, Barrier], owners: list[dict[int, int]]
) -> None:
    """Which worker holds the streams' connections, once all are connected, then once all are
    connected again; the streams wait there meanwhile."""
    for step in OWNERS_NOTED_AT:
        await steps[step].passed.wait()
        try:
            owners.append(await trio.to_thread.run_sync(connection_owners, process))
        finally:
            steps[step].release()


def crossed_workers(results: list[ResumeResult], owners: list[dict[int, int]]) -> float:
    """How many streams resumed on another worker than the one their chat started on (nan
    with one worker)."""
    if len(owners) < 2:
        return math.nan
    crossed = 0
    for r in results:
        if len(r.ports) == 2:
            first, second = owners[0].get(r.ports[0]), owners[1].get(r.ports[1])
            crossed += first is not None and second is not None and first != second
    return float(crossed)


def resume_problem(result: ResumeResult, reference: str) -> str | None:
    """What is wrong with a stream as its client put it together (None: nothing): every seq
    from 0 to the terminal once and in order (a ``snapshot`` after the resume stands for the
    seqs up to its own and replaces the text so far), one terminal, last, a completion, and
    the text of the upstream's whole answer."""
    text = ""
    due = 0
    for index, message in enumerate(result.messages):
        seq = message.get("seq")
        resumed = result.kept is not None and index >= result.kept
        if resumed and message.get("type") == "snapshot" and isinstance(seq, int) and seq >= due:
            text, due = str(message.get("content", "")), seq + 1
            continue
        if seq != due:
            where = f"message {index}, {result.kept} kept, after_seq {result.after_seq}"
            return f"seq {seq} where {due} was due ({where})"
        due += 1
        text += assistant_text(message)
    terminals = [m for m in result.messages if is_terminal(m)]
    if len(terminals) != 1 or not ended(result.messages):
        return f"{len(terminals)} terminals, the last message {result.messages[-1:]}"
    if terminals[0]["type"] != "completion":
        return f"ended with {terminals[0]}"
    if text != reference:
        at = next(
            (i for i, (a, b) in enumerate(zip(text, reference, strict=False)) if a != b),
            min(len(text), len(reference)),
        )
        return (
            f"text differs at character {at} (after_seq {result.after_seq}): "
            f"{text[at : at + 40]!r} where {reference[at : at + 40]!r} was due"
        )
    return None


def summarize_resume(
    results: list[ResumeResult],
    reference: str,
    records: list[dict[str, Any]],
    cpu_s: float,
    wall: float,
    peak_rss: int,
    idle_rss: int,
    retained_rss: int,
) -> dict[str, Any]:
    # The deltas the server relayed: what the upstream sent it (a chat it ran with nobody to
    # send to, after a refused resume, counts too).
    deltas = sum(int(record.get("tokens_sent") or 0) for record in records)
    resume_ms = [
        (r.resumed_at - r.resume_sent_at) * 1000
        for r in results
        if r.resumed_at is not None and r.resume_sent_at is not None
    ]
    terminals: dict[str, int] = {}
    problems: list[str] = []
    exact = inexact = unknown = failed = 0
    for r in results:
        # Its first terminal (anything after it makes the stream inexact, not failed).
        terminal = next((m for m in r.messages if is_terminal(m)), None)
        if r.refused == "unknown_request":
            unknown += 1
            key = "unknown_request"
        elif r.error is not None or r.refused is not None or terminal is None:
            failed += 1
            key = r.error or (f"refused: {r.refused}" if r.refused else "none")
            problems.append(f"{r.tag}: {key} (after_seq {r.after_seq})")
        else:
            key = str(terminal["type"])
            problem = resume_problem(r, reference)
            if problem is None:
                exact += 1
            else:
                inexact += 1
                problems.append(f"{r.tag}: {problem}")
        terminals[key] = terminals.get(key, 0) + 1
    streams = len(results)
    return {
        "streams": streams,
        "deltas": deltas,
        "wall_s": wall,
        "server_cpu_s": cpu_s,
        "server_cpu_us_per_delta": cpu_s / deltas * 1e6 if deltas and cpu_s else math.nan,
        "peak_rss_mib": peak_rss / 2**20,
        "retained_kib_per_request": (retained_rss - idle_rss) / 1024 / max(1, streams),
        "resumes": len(resume_ms),
        "resume_p50_ms": pct(resume_ms, 0.5),
        "resume_p99_ms": pct(resume_ms, 0.99),
        "resume_max_ms": max(resume_ms) if resume_ms else math.nan,
        "after_seq_p50": pct([float(r.after_seq) for r in results if r.after_seq is not None], 0.5),
        "exact": exact,
        "inexact": inexact,
        "unknown_request": unknown,
        "failed": failed,
        "problems": problems[:10],
        "terminals": terminals,
    }


async def upstream_records(upstream: Process) -> list[dict[str, Any]]:
    async with httpx.AsyncClient() as client:
        records: list[dict[str, Any]] = (
            await client.get(f"http://127.0.0.1:{upstream.port}/_fake/streams")
        ).json()
    return records


async def upstream_answer(upstream: Process) -> str:
    """The whole answer of the upstream, as a client that reads it directly gets it."""
    parts: list[str] = []

    def on_line(line: bytes, _at: float) -> None:
        if line.startswith(b"data: ") and line != b"data: [DONE]":
            delta = orjson.loads(line[6:])["choices"][0]["delta"].get("content")
            if delta:
                parts.append(delta)

    body = {"model": "m", "messages": [{"role": "user", "content": "reference"}], "stream": True}
    url = f"http://127.0.0.1:{upstream.port}/v1/chat/completions"
    with trio.fail_after(RESUME_STREAM_TIMEOUT_S):
        status = await post_lines(url, body, on_line)
    if status != 200:
        raise RuntimeError(f"upstream answered {status}")
    return "".join(parts)


async def resume_run(
    server: str,
    upstream: Process,
    streams: int,
    drop_after_tokens: int | None,
    away_s: float,
    reference: str,
    log_level: str,
) -> dict[str, Any]:
    """``streams`` chats at once on a server of their own (resume grace on, its default
    retention); with ``drop_after_tokens``, every client drops its connection at once when all
    have that many tokens, then, ``away_s`` later, all come back at once and resume."""
    process = await start_server(server, f"http://127.0.0.1:{upstream.port}/v1", log_level)
    url = f"ws://127.0.0.1:{process.port}/ws"
    try:
        records_before = len(await upstream_records(upstream))
        idle_rss = process.rss()
        peak = [idle_rss]
        # With several workers, which one holds each connection is noted where all are open.
        noting = drop_after_tokens is not None and workers_of(process.name) > 1
        steps = {
            step: Barrier(streams, held=noting and step in OWNERS_NOTED_AT) for step in RESUME_STEPS
        }
        results = [ResumeResult(f"s{index}") for index in range(streams)]
        cpu_before = process.cpu_s()
        started = now()
        owners: list[dict[int, int]] = []
        async with trio.open_nursery() as sampling:
            sampling.start_soon(sample_rss, process, peak)
            if noting:
                sampling.start_soon(note_owners, process, steps, owners)
            async with trio.open_nursery() as nursery:
                for result in results:
                    nursery.start_soon(resume_stream, url, drop_after_tokens, away_s, steps, result)
            sampling.cancel_scope.cancel()
        cpu_s = process.cpu_s() - cpu_before
        wall = now() - started
        # The ended chats stay for the retention; the clients are gone.
        await trio.sleep(IDLE_SETTLE_S)
        retained_rss = process.rss()
        records = (await upstream_records(upstream))[records_before:]
    finally:
        await process.stop()
    summary = summarize_resume(
        results, reference, records, cpu_s, wall, peak[0], idle_rss, retained_rss
    )
    summary["crossed_workers"] = crossed_workers(results, owners)
    return summary


async def measure_resume(
    server: str,
    upstream: Process,
    streams: int,
    drop_after_tokens: int,
    away_s: float,
    reference: str,
    log_level: str,
) -> tuple[dict[str, Any], dict[str, Any]]:
    """The resume workload on ``server``, then its baseline: the same streams never dropped,
    on a server of its own. Returns both; the first with its CPU per delta over the
    baseline's (the pair measured back to back)."""
    resumed = await resume_run(
        server, upstream, streams, drop_after_tokens, away_s, reference, log_level
    )
    whole = await resume_run(server, upstream, streams, None, 0.0, reference, log_level)
    resumed["cpu_vs_uninterrupted"] = (
        resumed["server_cpu_us_per_delta"] / whole["server_cpu_us_per_delta"]
    )
    return resumed, whole


@dataclass(frozen=True)
class Route:
    """One request of the chat-cost workload, and how to tell that it succeeded."""

    label: str
    method: str
    path: str
    body: Callable[[str], Any] | None = None
    ok: Callable[[bytes], bool] = lambda _body: True


def chat_body(message: str) -> dict[str, str]:
    return {"message": message, "path": "echo"}


def completions_body(message: str) -> dict[str, Any]:
    # The server's default model ("" names it on the OpenAI face).
    return {"model": "", "messages": [{"role": "user", "content": message}]}


ROUTES = {
    "health": Route("GET /health", "GET", "/health"),
    "chat": Route(
        "POST /v1/chat",
        "POST",
        "/v1/chat",
        chat_body,
        lambda body: orjson.loads(body).get("status") == "completed",
    ),
    "chat-completions": Route(
        "POST /v1/chat/completions",
        "POST",
        "/v1/chat/completions",
        completions_body,
        lambda body: bool(orjson.loads(body).get("choices")),
    ),
    "chat-stream": Route(
        "POST /v1/chat/stream",
        "POST",
        "/v1/chat/stream",
        chat_body,
        lambda body: b'"type":"completion"' in body,
    ),
    "ws-chat": Route("WS chat", "WS", "/ws"),
}


class KeepAliveClient:
    """Sequential HTTP/1.1 requests on one connection (h11 on a Trio socket, like
    ``post_lines``: the load client shares the machine with the server it measures)."""

    def __init__(self, port: int) -> None:
        self._port = port
        self._host = f"127.0.0.1:{port}"
        self._stream: trio.SocketStream | None = None
        self._conn = h11.Connection(h11.CLIENT)

    async def _connected(self) -> trio.SocketStream:
        if self._stream is None:
            self._stream = await trio.open_tcp_stream("127.0.0.1", self._port)
            self._conn = h11.Connection(h11.CLIENT)
        return self._stream

    async def request(self, method: str, path: str, body: Any) -> tuple[int, bytes]:
        """Send one request and read its whole answer; returns the status and the body."""
        stream = await self._connected()
        conn = self._conn
        headers = [("host", self._host)]
        payload = b""
        if body is not None:
            payload = orjson.dumps(body)
            headers += [("content-type", "application/json")]
            headers += [("content-length", str(len(payload)))]
        data = conn.send(h11.Request(method=method, target=path, headers=headers)) or b""
        if payload:
            data += conn.send(h11.Data(data=payload)) or b""
        await stream.send_all(data + (conn.send(h11.EndOfMessage()) or b""))
        status = 0
        parts: list[bytes] = []
        while True:
            event = conn.next_event()
            if event is h11.NEED_DATA:
                conn.receive_data(await stream.receive_some(65536))
            elif isinstance(event, h11.Response):
                status = event.status_code
            elif isinstance(event, h11.Data):
                parts.append(bytes(event.data))
            elif isinstance(event, h11.EndOfMessage):
                break
            elif isinstance(event, h11.ConnectionClosed):
                raise h11.RemoteProtocolError("the server closed the connection")
        if conn.our_state is h11.DONE and conn.their_state is h11.DONE:
            conn.start_next_cycle()
        else:  # the server said Connection: close
            await self.aclose()
        return status, b"".join(parts)

    async def aclose(self) -> None:
        if self._stream is not None:
            await self._stream.aclose()
            self._stream = None


@dataclass
class CostTally:
    ok: int = 0
    failed: int = 0


async def http_requests(
    port: int, route: Route, message: str, count: int, tally: CostTally
) -> None:
    """``count`` requests of ``route``, one after another on one keep-alive connection."""
    client = KeepAliveClient(port)
    body = route.body(message) if route.body is not None else None
    try:
        for _ in range(count):
            status, answer = await client.request(route.method, route.path, body)
            if status == 200 and route.ok(answer):
                tally.ok += 1
            else:
                tally.failed += 1
    finally:
        await client.aclose()


async def ws_chats(port: int, tag: str, message: str, count: int, tally: CostTally) -> None:
    """``count`` chats, one after another, over one open WebSocket."""
    async with (
        trio.open_nursery(),  # trio-websocket#184: each connection in its own nursery
        open_websocket_url(f"ws://127.0.0.1:{port}/ws") as ws,
    ):
        await ws.get_message()  # hello
        for index in range(count):
            request_id = f"{tag}-{index}"
            chat = {"type": "chat", "id": request_id, "message": message, "path": "echo"}
            await ws.send_message(orjson.dumps(chat).decode())
            while True:
                reply = orjson.loads(await ws.get_message())
                if reply.get("id") == request_id and reply.get("type") in TERMINALS:
                    break
            if reply["type"] == "completion":
                tally.ok += 1
            else:
                tally.failed += 1


async def run_requests(
    port: int, route: Route, message: str, count: int, connections: int, tag: str
) -> CostTally:
    """``count`` requests of ``route`` spread over ``connections`` concurrent connections."""
    tally = CostTally()
    async with trio.open_nursery() as nursery:
        for index in range(connections):
            share = count // connections + (index < count % connections)
            if route.method == "WS":
                nursery.start_soon(ws_chats, port, f"{tag}{index}", message, share, tally)
            else:
                nursery.start_soon(http_requests, port, route, message, share, tally)
    return tally


async def measure_chat_cost(
    server: str, routes: tuple[str, ...], args: argparse.Namespace
) -> list[dict[str, Any]]:
    """Server CPU per request of each route: psutil's CPU times of the server process (and of
    its PostgreSQL server's, for ``aether-pg``) before and after ``--chat-cost-requests``
    requests, after ``--chat-cost-warmup`` of them."""
    process = await start_server(server, None, args.aether_log_level)
    rows: list[dict[str, Any]] = []
    try:
        handle = process.psutil
        for name in routes:
            route = ROUTES[name]
            print(f"  {route.label}", file=sys.stderr)
            count, connections = args.chat_cost_requests, args.chat_cost_connections
            with trio.fail_after(CHAT_COST_ROUTE_TIMEOUT_S):
                await run_requests(
                    process.port, route, args.chat_cost_message, args.chat_cost_warmup, 1, "w"
                )
                before = handle.cpu_times()
                db_before = process.db_cpu_s()
                started = now()
                tally = await run_requests(
                    process.port, route, args.chat_cost_message, count, connections, "m"
                )
                wall = now() - started
                after = handle.cpu_times()
                db_s = process.db_cpu_s() - db_before
            cpu_s = (after.user - before.user) + (after.system - before.system) + db_s
            rows.append(
                {
                    "workload": "chat-cost",
                    "server": server,
                    "route": route.label,
                    "requests": count,
                    "connections": connections,
                    "server_cpu_s": cpu_s,
                    "cpu_ms_per_request": cpu_s / count * 1000,
                    "wall_ms_per_request": wall / count * 1000 * connections,
                    "requests_per_s": count / wall,
                    "failed": tally.failed,
                    "terminals": {"ok": tally.ok, "failed": tally.failed},
                }
            )
    finally:
        await process.stop()
    return rows


async def run_chat_cost(args: argparse.Namespace) -> list[dict[str, Any]]:
    servers = [s for s in args.servers or CHAT_COST_SERVERS if s in CHAT_COST_ROUTES]
    rounds: dict[tuple[str, str], list[dict[str, Any]]] = {}
    for server in [s for _ in range(args.repeat) for s in servers]:
        print(f"chat-cost {server:16} requests={args.chat_cost_requests}", file=sys.stderr)
        for row in await measure_chat_cost(server, CHAT_COST_ROUTES[server], args):
            rounds.setdefault((server, row["route"]), []).append(row)
    rows = [combined(summaries) for summaries in rounds.values()]
    # Each route's rows together, in the order of ROUTES, servers in the order they ran.
    order = [route.label for route in ROUTES.values()]
    return sorted(rows, key=lambda row: order.index(row["route"]))


def summarize(
    results: list[StreamResult],
    wall: float,
    cpu_s: float,
    upstream_cpu_s: float,
    peak_rss: int,
    idle_rss: int,
    records: list[dict[str, Any]],
) -> dict[str, Any]:
    tokens = sum(r.tokens for r in results)
    ttft = [(r.first_token_at - r.sent_at) * 1000 for r in results if r.first_token_at]
    gaps: list[float] = []
    for r in results:
        gaps.extend((b - a) * 1000 for a, b in zip(r.token_times, r.token_times[1:], strict=False))
    stop_ms = [
        (r.stopped_at - r.stop_sent_at) * 1000
        for r in results
        if r.stopped_at is not None and r.stop_sent_at is not None
    ]
    closed_by_tag = {
        rec["last_user_message"]: rec["client_closed_monotonic"]
        for rec in records[-len(results) :]
        if rec.get("client_closed_monotonic") is not None
    }
    # Stop -> upstream closed, or vanish -> upstream closed.
    upstream_close_ms: list[float] = []
    cut_streams = 0
    for r in results:
        closed = closed_by_tag.get(r.tag)
        cut_at = r.stop_sent_at if r.stop_sent_at is not None else r.vanished_at
        cut_streams += cut_at is not None
        if cut_at is not None and closed is not None:
            upstream_close_ms.append((closed - cut_at) * 1000)
    terminals: dict[str, int] = {}
    for r in results:
        key = r.terminal or (r.error or "none")
        terminals[key] = terminals.get(key, 0) + 1
    return {
        "streams": len(results),
        "tokens": tokens,
        "wall_s": wall,
        "deltas_per_s": tokens / wall if wall else math.nan,
        "server_cpu_s": cpu_s,
        "server_cpu_us_per_delta": cpu_s / tokens * 1e6 if tokens and cpu_s else math.nan,
        "upstream_cpu_s": upstream_cpu_s,
        "peak_rss_mib": peak_rss / 2**20,
        "rss_per_stream_kib": (peak_rss - idle_rss) / 1024 / max(1, len(results)),
        "ttft_p50_ms": pct(ttft, 0.5),
        "ttft_p99_ms": pct(ttft, 0.99),
        "gap_p50_ms": pct(gaps, 0.5),
        "gap_p99_ms": pct(gaps, 0.99),
        "gap_max_ms": max(gaps) if gaps else math.nan,
        "stop_p50_ms": pct(stop_ms, 0.5),
        "stop_p99_ms": pct(stop_ms, 0.99),
        "stop_max_ms": max(stop_ms) if stop_ms else math.nan,
        "upstream_closed_p50_ms": pct(upstream_close_ms, 0.5),
        "upstream_closed_p99_ms": pct(upstream_close_ms, 0.99),
        "upstream_closed_max_ms": max(upstream_close_ms) if upstream_close_ms else math.nan,
        "upstream_closed_count": len(upstream_close_ms),
        "upstream_left_open": cut_streams - len(upstream_close_ms),
        "server_cpu_share": cpu_s / wall if wall and cpu_s else math.nan,
        "chunks_after_terminal": sum(r.chunks_after_terminal for r in results),
        "failed": sum(1 for r in results if r.terminal is None),
        "terminals": terminals,
    }


@dataclass(frozen=True)
class Case:
    workload: str
    streams: int
    tokens: int
    delay_ms: float
    stop_after_tokens: int | None = None
    linger_s: float = 0.0
    stagger_s: float = 0.0
    vanish_after_tokens: int | None = None


def cases(args: argparse.Namespace) -> list[Case]:
    chosen: list[Case] = []
    if "capacity" in args.workloads:
        for streams in args.capacity_streams:
            tokens = args.capacity_tokens if streams <= 50 else args.capacity_tokens_many
            chosen.append(Case("capacity", streams, tokens, 0.0))
    if "paced" in args.workloads:
        delay = 1000 / args.paced_rate
        for streams in args.paced_streams:
            chosen.append(
                Case("paced", streams, args.paced_tokens, delay, stagger_s=args.paced_stagger_s)
            )
    if "stop" in args.workloads:
        for streams in args.stop_streams:
            chosen.append(Case("stop", streams, 2000, 10.0, 10, 0.2))
    if "stop-rest" in args.workloads:
        for streams in args.stop_streams:
            chosen.append(Case("stop-rest", streams, 2000, 10.0, 10, 0.2))
    if "idle" in args.workloads:
        chosen.append(Case("idle", args.idle_connections, 1, 0.0))
    if "storm" in args.workloads:
        # At the paced workload's pace: the storm hits a server that keeps up, so what it
        # measures is the storm's own cost, not a backlog.
        delay = 1000 / args.paced_rate
        chosen.append(
            Case("storm", args.storm_streams, args.paced_tokens, delay, vanish_after_tokens=10)
        )
    if "resume" in args.workloads:
        delay = 1000 / args.paced_rate  # at the paced workload's pace, as the storm
        for streams in args.resume_streams:
            chosen.append(
                Case(
                    "resume",
                    streams,
                    args.paced_tokens,
                    delay,
                    vanish_after_tokens=args.resume_after_tokens,
                )
            )
    if "chat-cost" in args.workloads:
        chosen.append(Case("chat-cost", args.chat_cost_connections, 0, 0.0))
    return chosen


def fmt(value: Any, digits: int = 1) -> str:
    if isinstance(value, float):
        return "-" if math.isnan(value) else f"{value:,.{digits}f}"
    return str(value)


# The stop workloads' columns (a stop frame, or a REST stop).
STOP_COLUMNS = [
    ("stop p50 ms", "stop_p50_ms", 2),
    ("stop p99 ms", "stop_p99_ms", 2),
    ("stop max ms", "stop_max_ms", 2),
    ("upstream closed p99 ms", "upstream_closed_p99_ms", 2),
    ("chunks after stopped", "chunks_after_terminal", 0),
    ("redis cmds/chat", "redis_cmds_per_chat", 2),
    ("failed", "failed", 0),
]
COLUMNS: dict[str, list[tuple[str, str, int]]] = {
    "capacity": [
        ("deltas/s", "deltas_per_s", 0),
        ("cpu us/delta", "server_cpu_us_per_delta", 1),
        ("cpu ms/chat", "server_cpu_ms_per_chat", 2),
        ("db cpu ms/chat", "db_cpu_ms_per_chat", 2),
        ("redis cmds/chat", "redis_cmds_per_chat", 2),
        ("longest commit ms", "longest_commit_ms", 1),
        ("commit p99 <= ms", "commit_p99_bound_ms", 1),
        ("longest lock wait ms", "longest_lock_wait_ms", 1),
        ("peak RSS MiB", "peak_rss_mib", 1),
        ("ttft p50 ms", "ttft_p50_ms", 1),
        ("ttft p99 ms", "ttft_p99_ms", 1),
        ("failed", "failed", 0),
    ],
    "paced": [
        ("ttft p50 ms", "ttft_p50_ms", 1),
        ("ttft p99 ms", "ttft_p99_ms", 1),
        ("ttft added p50 ms", "ttft_added_p50_ms", 1),
        ("ttft added p99 ms", "ttft_added_p99_ms", 1),
        ("gap p50 ms", "gap_p50_ms", 1),
        ("gap p99 ms", "gap_p99_ms", 1),
        ("gap max ms", "gap_max_ms", 1),
        ("gap added p99 ms", "gap_added_p99_ms", 1),
        ("server cpu %", "server_cpu_pct", 0),
        ("cpu ms/chat", "server_cpu_ms_per_chat", 2),
        ("db cpu ms/chat", "db_cpu_ms_per_chat", 2),
        ("redis cmds/chat", "redis_cmds_per_chat", 2),
        ("longest commit ms", "longest_commit_ms", 1),
        ("commit p99 <= ms", "commit_p99_bound_ms", 1),
        ("longest lock wait ms", "longest_lock_wait_ms", 1),
        ("RSS/stream KiB", "rss_per_stream_kib", 1),
        ("failed", "failed", 0),
    ],
    "stop": STOP_COLUMNS,
    "stop-rest": STOP_COLUMNS,
    "idle": [
        ("RSS before MiB", "rss_before_mib", 1),
        ("RSS after MiB", "rss_after_mib", 1),
        ("RSS/connection KiB", "rss_per_connection_kib", 1),
    ],
    "storm": [
        ("vanished", "upstream_closed_count", 0),
        ("upstream closed p50 ms", "upstream_closed_p50_ms", 1),
        ("upstream closed p99 ms", "upstream_closed_p99_ms", 1),
        ("upstream closed max ms", "upstream_closed_max_ms", 1),
        ("upstream left open", "upstream_left_open", 0),
        ("others completed", "completed", 0),
        ("busy after last stream ms", "busy_after_ms", 0),
        ("failed", "failed", 0),
    ],
    "resume": [
        ("exact", "exact_of", 0),
        ("not exact", "inexact", 0),
        ("crossed workers", "crossed_workers", 0),
        ("unknown_request", "unknown_request", 0),
        ("resume p50 ms", "resume_p50_ms", 2),
        ("resume p99 ms", "resume_p99_ms", 2),
        ("resume max ms", "resume_max_ms", 2),
        ("cpu us/delta", "server_cpu_us_per_delta", 1),
        ("cpu/delta vs uninterrupted", "cpu_vs_uninterrupted", 2),
        ("peak RSS MiB", "peak_rss_mib", 1),
        ("retained KiB/request", "retained_kib_per_request", 1),
        ("failed", "failed", 0),
    ],
    "chat-cost": [
        ("requests", "requests", 0),
        ("server cpu ms/request", "cpu_ms_per_request", 3),
        ("wall ms/request", "wall_ms_per_request", 3),
        ("requests/s", "requests_per_s", 0),
        ("failed", "failed", 0),
    ],
}
RATIO_KEY = {
    "capacity": "deltas_per_s",
    "paced": "ttft_p99_ms",
    "stop": "stop_p99_ms",
    "stop-rest": "stop_p99_ms",
    "idle": "rss_per_connection_kib",
    "storm": "upstream_closed_p99_ms",
    "resume": "server_cpu_us_per_delta",
    "chat-cost": "cpu_ms_per_request",
}
# The column rows are compared within (Aether's row against the others'): streams by default.
GROUP_KEY = {"chat-cost": "route"}
# Printed under a workload's table when the server has a row in it.
SERVER_NOTES = {
    "aether-pg": "aether-pg: history in PostgreSQL (fsync on); its server CPU figures include "
    "PostgreSQL's processes (db cpu ms/chat: that part alone), its memory figures do not; a "
    "commit is a write batch's round trip.",
}
# Printed under a workload's table.
WORKLOAD_NOTES = {
    "resume": "resume: Aether only (the baselines cannot resume). Every client drops its "
    "connection (TCP reset) once all have --resume-after-tokens tokens; --resume-away-s later "
    "all reconnect and resume at once, after the last seq each received. `(uninterrupted)`: "
    "the same streams never dropped, on a server of its own in the same round (cpu/delta vs "
    "uninterrupted: that pair's ratio). resume ms: `resume` sent -> first message after "
    "after_seq, as this client sees it. exact: every seq from 0 to the terminal once, and the "
    "text of the upstream's whole answer (not exact: a server bug). crossed workers "
    "(aether-Nw): resumes that reached another worker than the chat's; unknown_request: "
    "resumes answered that the chat is unknown. retained KiB/request: RSS growth with the "
    "ended chats retained and the clients gone, over the streams (an upper bound: it includes "
    "the history's growth).",
}


def add_derived(rows: list[dict[str, Any]], paced_rate: float) -> None:
    """Figures computed from a row: the gap a paced stream's server adds over the pace, its
    CPU as a percentage of one core, and how many streams completed."""
    for row in rows:
        row["gap_added_p99_ms"] = row.get("gap_p99_ms", math.nan) - 1000 / paced_rate
        row["server_cpu_pct"] = row.get("server_cpu_share", math.nan) * 100
        row["completed"] = row.get("terminals", {}).get("completion", 0)
        if row["workload"] == "resume":
            row["exact_of"] = f"{row['exact']}/{row['streams']}"


def add_ttft_over_direct(rows: list[dict[str, Any]]) -> None:
    """Paced rows get the time to first token they add over reading the upstream directly
    (the upstream's own), at the same number of streams in the same run."""
    for row in rows:
        if row["workload"] != "paced":
            continue
        direct = next(
            (
                r
                for r in rows
                if r["workload"] == "paced"
                and r["server"] == "direct"
                and r["streams"] == row["streams"]
            ),
            None,
        )
        for q in ("p50", "p99"):
            added = math.nan if direct is None else row[f"ttft_{q}_ms"] - direct[f"ttft_{q}_ms"]
            row[f"ttft_added_{q}_ms"] = added


# Counts that must stay zero: over several rounds, the worst one is reported, not the median.
WORST_OF_ROUNDS = {
    "chunks_after_terminal",
    "failed",
    "upstream_left_open",
    "inexact",
    "unknown_request",
    "crossed_workers",  # as unknown_request, while a resume cannot cross workers
}
# Counts that must stay whole (every stream): the worst, the least, is reported.
LEAST_OF_ROUNDS = {"exact"}


def combined(summaries: list[dict[str, Any]]) -> dict[str, Any]:
    """One row for several rounds of a server: the median of each figure (the worst of the
    counts that must stay zero); ``rounds`` says how many."""
    row = dict(summaries[0])
    for key, value in row.items():
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            values = [summary[key] for summary in summaries]
            if key in WORST_OF_ROUNDS:
                row[key] = max(values)
            elif key in LEAST_OF_ROUNDS:
                row[key] = min(values)
            else:
                row[key] = statistics.median(values)
    if "problems" in row:  # every round's
        row["problems"] = [problem for summary in summaries for problem in summary["problems"]]
    row["rounds"] = len(summaries)
    return row


def render(rows: list[dict[str, Any]]) -> str:
    lines: list[str] = []
    for workload, columns in COLUMNS.items():
        selected = [row for row in rows if row["workload"] == workload]
        if not selected:
            continue
        key = RATIO_KEY[workload]
        group = GROUP_KEY.get(workload, "streams")
        header = ["server", group, *[c[0] for c in columns], f"aether / this ({key})"]
        lines += [f"\n{workload}", "| " + " | ".join(header) + " |"]
        lines.append("|" + "---|" * len(header))
        for row in selected:
            reference = "aether-sse" if row["server"].endswith("-sse") else "aether"
            same = [r for r in selected if r[group] == row[group]]
            aether = next((r for r in same if r["server"] == reference), None)
            ratio = "-"
            if aether and row[key] and not math.isnan(row[key]) and not math.isnan(aether[key]):
                ratio = f"{aether[key] / row[key]:.2f}x"
            cells = [row["server"], str(row[group])]
            cells += [fmt(row.get(name, math.nan), digits) for _, name, digits in columns]
            lines.append("| " + " | ".join([*cells, ratio]) + " |")
        present = {row["server"] for row in selected}
        lines += [note for server, note in SERVER_NOTES.items() if server in present]
        if workload in WORKLOAD_NOTES:
            lines.append(WORKLOAD_NOTES[workload])
    return "\n".join(lines)


async def main(args: argparse.Namespace) -> None:
    global REDIS, POSTGRES
    servers = list(args.servers or SERVERS)
    if args.workers > 1:
        several = f"aether-{args.workers}w"
        where = servers.index("aether") + 1 if "aether" in servers else len(servers)
        servers.insert(where, several)
    try:
        async with trio.open_nursery() as nursery:
            if any(workers_of(server) > 1 for server in servers):
                REDIS = RedisServer()
                await nursery.start(REDIS.run)
            if "aether-pg" in servers:
                POSTGRES = PostgresServer(fsync=True)
                await trio.to_thread.run_sync(POSTGRES.start)
            await run_cases(args, servers)
            nursery.cancel_scope.cancel()
    finally:
        if POSTGRES is not None:
            with trio.CancelScope(shield=True):
                await trio.to_thread.run_sync(POSTGRES.close)


async def run_cases(args: argparse.Namespace, servers: list[str]) -> None:
    rows: list[dict[str, Any]] = []
    for case in cases(args):
        if case.workload == "chat-cost":
            rows += await run_chat_cost(args)  # the echo model: no upstream
            continue
        upstream = await start_upstream(case.tokens, case.delay_ms)
        rounds: dict[str, list[dict[str, Any]]] = {}
        try:
            # What every resumed stream must add up to.
            reference = await upstream_answer(upstream) if case.workload == "resume" else ""
            # Rounds interleave the servers, so a slow spell of the machine falls on each alike.
            for server in [s for _ in range(args.repeat) for s in servers]:
                if server == "hypercorn-asgi":
                    continue  # it answers chat-cost's routes only
                if workers_of(server) > 1 and case.workload not in WORKERS_WORKLOADS:
                    continue
                in_aether = server.startswith("aether") and not server.endswith("-sse")
                if case.workload in AETHER_ONLY_WORKLOADS and not in_aether:
                    continue
                if case.workload in ("stop", "idle", "storm") and server == "direct":
                    continue
                if server.endswith("-sse") and case.workload not in SSE_WORKLOADS:
                    continue
                aether_only = case.workload != "idle" and case.streams > args.baselines_up_to
                if aether_only and not server.startswith("aether"):
                    continue
                print(f"{case.workload:8} {server:16} streams={case.streams}", file=sys.stderr)
                if case.workload == "resume":
                    assert case.vanish_after_tokens is not None
                    resumed, whole = await measure_resume(
                        server,
                        upstream,
                        case.streams,
                        case.vanish_after_tokens,
                        args.resume_away_s,
                        reference,
                        args.aether_log_level,
                    )
                    rounds.setdefault(server, []).append(resumed)
                    rounds.setdefault(f"{server} (uninterrupted)", []).append(whole)
                    for problem in resumed["problems"] + whole["problems"]:
                        print(f"  ! {problem}", file=sys.stderr)
                    crossed = resumed["crossed_workers"]
                    print(
                        f"  -> {json.dumps(resumed['terminals'])}"
                        + ("" if math.isnan(crossed) else f", crossed workers {crossed:.0f}")
                        + f", uninterrupted {json.dumps(whole['terminals'])}",
                        file=sys.stderr,
                    )
                    continue
                if case.workload == "idle":
                    summary = await measure_idle(
                        server, upstream, case.streams, args.aether_log_level
                    )
                else:
                    workload = Workload(
                        case.stop_after_tokens,
                        case.linger_s,
                        case.stagger_s,
                        case.vanish_after_tokens,
                    )
                    summary = await measure(
                        server,
                        upstream,
                        case.streams,
                        workload,
                        args.aether_log_level,
                        stop_over_rest=case.workload == "stop-rest",
                    )
                rounds.setdefault(server, []).append(summary)
                print(f"  -> {json.dumps(summary['terminals'])}", file=sys.stderr)
        finally:
            await upstream.stop()
        for server, summaries in rounds.items():
            rows.append({"workload": case.workload, "server": server, **combined(summaries)})
    add_ttft_over_direct(rows)
    add_derived(rows, args.paced_rate)
    table = render(rows)
    machine = f"{platform.node()}: {os.cpu_count()} cores, Python {platform.python_version()}"
    print(f"# bench_stream ({machine})\n{table}")
    if args.json:
        await trio.Path(args.json).write_text(
            json.dumps({"machine": machine, "rows": rows}, indent=2)
        )


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ints = lambda text: [int(x) for x in text.split(",")]  # noqa: E731
    parser.add_argument(
        "--servers",
        type=lambda t: t.split(","),
        help=f"comma-separated, from {', '.join(SERVERS + OPTIONAL_SERVERS)} (default: "
        f"{', '.join(SERVERS)}; for chat-cost: {', '.join(CHAT_COST_SERVERS)})",
    )
    parser.add_argument(
        "--workloads",
        type=lambda t: t.split(","),
        default=list(STREAM_WORKLOADS),
        help=f"comma-separated, from {', '.join(STREAM_WORKLOADS)}, stop-rest, resume, chat-cost",
    )
    parser.add_argument("--capacity-streams", type=ints, default=[1, 20, 50, 500])
    parser.add_argument("--capacity-tokens", type=int, default=2000, help="per stream, <= 50")
    parser.add_argument("--capacity-tokens-many", type=int, default=200, help="per stream, > 50")
    parser.add_argument("--paced-streams", type=ints, default=[50, 500, 1000])
    parser.add_argument("--paced-rate", type=float, default=20.0, help="tokens/s per stream")
    parser.add_argument("--paced-tokens", type=int, default=60)
    parser.add_argument(
        "--paced-stagger-s",
        type=float,
        default=1.0,
        help="paced streams start spread over this many seconds (0: all at once)",
    )
    parser.add_argument("--stop-streams", type=ints, default=[50, 500])
    parser.add_argument("--idle-connections", type=int, default=1000)
    parser.add_argument("--storm-streams", type=int, default=500)
    parser.add_argument("--resume-streams", type=ints, default=[100])
    parser.add_argument(
        "--resume-after-tokens",
        type=int,
        default=10,
        help="resume: every client drops its connection once all have this many tokens",
    )
    parser.add_argument(
        "--resume-away-s",
        type=float,
        default=0.5,
        help="resume: how long the clients stay away once all have dropped (the chats run on "
        "meanwhile, so the resume has that much to replay)",
    )
    parser.add_argument(
        "--baselines-up-to",
        type=int,
        default=1000,
        help="more streams than this run for Aether alone (idle connections excepted)",
    )
    parser.add_argument(
        "--workers",
        type=int,
        default=1,
        help="also run Aether with this many worker processes and a Redis (aether-Nw) in the "
        "capacity, paced, stop, stop-rest and resume workloads",
    )
    parser.add_argument("--chat-cost-requests", type=int, default=2000, help="per route")
    parser.add_argument("--chat-cost-warmup", type=int, default=200, help="per route, unmeasured")
    parser.add_argument(
        "--chat-cost-connections",
        type=int,
        default=1,
        help="keep-alive connections (or WebSockets) the requests are spread over",
    )
    parser.add_argument("--chat-cost-message", default="hello world", help="what each chat says")
    parser.add_argument(
        "--aether-log-level",
        default="WARNING",
        choices=["DEBUG", "INFO", "WARNING", "ERROR"],
        help="Aether's log level (its default is INFO)",
    )
    parser.add_argument(
        "--repeat",
        type=int,
        default=1,
        help="rounds of each stream workload, the servers interleaved; each row is the median",
    )
    parser.add_argument("--json", help="also write the rows as JSON to this file")
    return parser.parse_args(argv)


if __name__ == "__main__":
    try:
        trio.run(main, parse_args())
    finally:
        shutil.rmtree(DB_DIR, ignore_errors=True)
