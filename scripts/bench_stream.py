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
    python scripts/bench_stream.py --workloads stop --stop-streams 50,500 --repeat 5
    python scripts/bench_stream.py --workloads capacity,paced,stop --workers 2 --servers aether
    python scripts/bench_stream.py --workloads capacity,paced,stop --servers aether,aether-pg

``--workers N`` adds ``aether-Nw`` (``python -m aether --workers N`` with a redis-server the
benchmark starts) to the capacity, paced and stop workloads: server CPU sums the supervisor and
its workers, and ``redis cmds/chat`` counts the commands Redis ran per chat.

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
from trio_websocket import ConnectionClosed, HandshakeError, open_websocket_url

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
WORKERS_WORKLOADS = ("capacity", "paced", "stop", "stop-rest")
# Aether's own REST stop route: no baseline has one.
AETHER_ONLY_WORKLOADS = ("stop-rest",)
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
    return {"model": "m", "messages": [{"role": "user", "content": message}]}


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


def add_derived(rows: list[dict[str, Any]], paced_rate: float) -> None:
    """Figures computed from a row: the gap a paced stream's server adds over the pace, its
    CPU as a percentage of one core, and how many streams completed."""
    for row in rows:
        row["gap_added_p99_ms"] = row.get("gap_p99_ms", math.nan) - 1000 / paced_rate
        row["server_cpu_pct"] = row.get("server_cpu_share", math.nan) * 100
        row["completed"] = row.get("terminals", {}).get("completion", 0)


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
WORST_OF_ROUNDS = {"chunks_after_terminal", "failed", "upstream_left_open"}


def combined(summaries: list[dict[str, Any]]) -> dict[str, Any]:
    """One row for several rounds of a server: the median of each figure (the worst of the
    counts that must stay zero); ``rounds`` says how many."""
    row = dict(summaries[0])
    for key, value in row.items():
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            values = [summary[key] for summary in summaries]
            row[key] = max(values) if key in WORST_OF_ROUNDS else statistics.median(values)
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
        help=f"comma-separated, from {', '.join(STREAM_WORKLOADS)}, stop-rest, chat-cost",
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
        "capacity, paced and stop workloads",
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
