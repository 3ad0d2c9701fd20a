"""``python -m aether``: read the settings, then serve with Hypercorn's trio worker until a signal.

``serve`` runs ``hypercorn.trio.serve`` itself, with a shutdown trigger of its own: Hypercorn's CLI
supervisor gives the application no hook between "stop accepting" and "cancel everything".

@.architecture
role: server startup
jobs: [config_loading, server_startup, signal_handling]
"""

from __future__ import annotations

import argparse
import gc
import logging
import os
import signal
import socket
import sys
import time
from collections.abc import Awaitable, Callable, Sequence
from functools import partial
from pathlib import Path
from typing import get_args
from wsgiref.handlers import format_date_time

import trio
from hypercorn.config import Config as HypercornConfig
from hypercorn.config import Sockets
from quart_trio import QuartTrio
from trio_util import move_on_when

from aether import __version__
from aether.api.dependencies import EXTENSION_KEY, AppState
from aether.app import WEBSOCKET_PATH, create_app, websocket_hub
from aether.config import (
    ConfigError,
    ProviderName,
    Settings,
    load_settings,
    unknown_environment_settings,
)
from aether.core.collection_pacing import FULL_COLLECTIONS
from aether.core.errors import StorageError
from aether.core.history.choice import generated_node_id
from aether.core.history.sqlite import prepare_database
from aether.core.models import ModelCatalog, catalog_from_settings
from aether.core.providers.oi.interpreters import agentic_path_enabled, oi_installed
from aether.core.providers.oi.profiles import load_profile
from aether.core.providers.oi.sandbox import require_sandbox
from aether.core.runtime.engine import RuntimeEngine
from aether.logs import configure_logging
from aether.server.worker import serve_app
from aether.ws.hub import CLOSE_GOING_AWAY, ClientHub

log = logging.getLogger("aether")

# After the grace period, how long cancelled streams get to send their last messages; also
# Hypercorn's own deadline for connections once it stops serving (its WebSocket ping task keeps
# a closed connection alive until the next ping).
SHUTDOWN_BACKSTOP_S = 2.0
# Young-generation threshold and the two older ones (CPython's default: 700, 10, 10).
GC_THRESHOLDS = (10_000, 50, 100)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m aether",
        description="Stream LLM chat to clients over WebSocket (/ws) and REST/SSE (/v1/chat).",
        epilog="`python -m aether chat --help` shows the terminal client. "
        "Every setting can also be set as AETHER_<NAME> in the environment or as <name> "
        "in the TOML file given with --config; flags win over the environment, which wins over "
        "the file. See the README's configuration table.",
    )
    parser.add_argument("--host", help="address to listen on (default 127.0.0.1)")
    parser.add_argument("--port", type=int, help="TCP port (default 8000; 0 picks a free one)")
    parser.add_argument("--config", type=Path, metavar="FILE", help="TOML settings file")
    parser.add_argument(
        "--provider", choices=get_args(ProviderName), help="model path (default auto)"
    )
    parser.add_argument("--llm-base-url", help="OpenAI-compatible base URL, e.g. .../v1")
    parser.add_argument("--llm-model", help="model name sent upstream")
    parser.add_argument(
        "--log-level", choices=["DEBUG", "INFO", "WARNING", "ERROR"], help="log level"
    )
    parser.add_argument(
        "--workers",
        type=int,
        help="worker processes sharing the listening socket (default 1; more need "
        "AETHER_REDIS_URL)",
    )
    # Given by the supervisor to each worker it starts: the inherited listening socket, and
    # the worker's name.
    parser.add_argument("--listen-fd", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--supervisor-fd", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--worker-id", help=argparse.SUPPRESS)
    parser.add_argument("--version", action="version", version=f"aether {__version__}")
    return parser


class TCPTunedConfig(HypercornConfig):
    """Hypercorn's config, with TCP options on the listening sockets (accepted connections
    inherit them). Hypercorn sends under a shielded cancel scope, so a send to a peer that
    stopped reading, or vanished without a FIN or RST, cannot be cancelled: the kernel ends it.

    - ``TCP_USER_TIMEOUT``: data unacknowledged (or a zero window) for this long aborts the
      connection, so a stuck send fails instead of waiting for TCP's own ~15 minutes.
    - TCP keepalive: an idle connection whose peer vanished is found and closed.

    It also formats the ``Date`` header once a second, not once per response.
    """

    user_timeout_s: float = 30.0
    keepalive_s: float = 30.0
    _date_second = -1
    _date_value = b""

    def response_headers(self, protocol: str) -> list[tuple[bytes, bytes]]:
        if self.include_server_header or self.alt_svc_headers or self._quic_addresses:
            return super().response_headers(protocol)  # what Aether never configures
        if not self.include_date_header:
            return []
        now = int(time.time())
        if now != self._date_second:
            self._date_second = now
            self._date_value = format_date_time(now).encode("ascii")
        return [(b"date", self._date_value)]

    def create_sockets(self) -> Sockets:
        sockets = super().create_sockets()
        for sock in [*sockets.insecure_sockets, *sockets.secure_sockets]:
            tune_tcp_socket(sock, self.user_timeout_s, self.keepalive_s)
        return sockets


def tune_tcp_socket(sock: socket.socket, user_timeout_s: float, keepalive_s: float) -> None:
    if sock.family not in (socket.AF_INET, socket.AF_INET6):
        return
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1)
    if hasattr(socket, "TCP_KEEPIDLE"):  # Linux; other systems keep their defaults
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPIDLE, int(keepalive_s))
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPINTVL, max(1, int(keepalive_s) // 3))
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPCNT, 3)
    if hasattr(socket, "TCP_USER_TIMEOUT"):
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_USER_TIMEOUT, int(user_timeout_s * 1000))


def hypercorn_config(settings: Settings, listen_fd: int | None = None) -> HypercornConfig:
    """Hypercorn's config for the settings; ``listen_fd``: serve on that inherited listening
    socket (a supervisor's worker) rather than binding one."""
    config = TCPTunedConfig()
    config.user_timeout_s = settings.slow_client_timeout_s
    config.keepalive_s = settings.tcp_keepalive_s
    # Hypercorn's default (100) overflows when hundreds of clients connect at once (all of them
    # reconnecting after a restart, say): the kernel then drops or resets the surplus.
    config.backlog = settings.listen_backlog
    host = f"[{settings.host}]" if ":" in settings.host else settings.host
    config.bind = [f"{host}:{settings.port}" if listen_fd is None else f"fd://{listen_fd}"]
    if settings.tls_certfile is not None and settings.tls_keyfile is not None:
        config.certfile = str(settings.tls_certfile)
        config.keyfile = str(settings.tls_keyfile)
    config.websocket_max_message_size = settings.max_frame_bytes
    # HTTP/1.1 only: see aether.server.protocol for why HTTP/2 is refused.
    config.alpn_protocols = ["http/1.1"]
    config.include_server_header = False
    # Hypercorn's own deadline for open connections once it stops listening; `drain` ends them
    # well before it, unless a send is stuck on a peer that stopped reading.
    config.graceful_timeout = settings.shutdown_grace_s + 2 * SHUTDOWN_BACKSTOP_S
    config.accesslog = None
    config.errorlog = logging.getLogger("hypercorn.error")
    return config


class ShutdownSignals:
    """SIGINT and SIGTERM, for the whole life of the server: the first begins a graceful
    shutdown (``requested``), a second cuts its grace period short (``hurried``): every chat is
    stopped at once, and still gets its terminal message. Later ones are only logged."""

    def __init__(self) -> None:
        self.requested = trio.Event()
        self.hurried = trio.Event()

    async def watch(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        with trio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:
            task_status.started()
            async for signum in signals:
                name = signal.Signals(signum).name
                if not self.requested.is_set():
                    log.info("received %s: shutting down", name)
                    self.requested.set()
                elif not self.hurried.is_set():
                    log.warning("received %s again: stopping every chat now", name)
                    self.hurried.set()
                else:
                    log.warning("received %s: already stopping every chat", name)

    async def on_end_of_file(self, fd: int) -> None:
        """Shut down as on a signal once ``fd`` (a pipe whose other end the supervisor holds)
        reads end-of-file: the supervisor is gone."""
        await trio.lowlevel.wait_readable(fd)
        if not self.requested.is_set():
            log.warning("the supervisor is gone: shutting down")
            self.requested.set()


def describe_security(settings: Settings) -> None:
    if not settings.auth_enabled:
        log.warning(
            "no API keys configured: the server is unauthenticated and listens on loopback only "
            "(set AETHER_API_KEYS to serve other machines)"
        )
    else:
        log.info("API keys required on every route but /health, /ready and the web page")
    hosts = settings.effective_allowed_hosts
    log.info(
        "answering to the host names %s (AETHER_ALLOWED_HOSTS)",
        "* (any)" if "*" in hosts else ", ".join(sorted(hosts)),
    )


def describe_models(catalog: ModelCatalog) -> None:
    default = catalog.default
    log.info(
        "default: model %s on the %s path, because %s",
        default.name,
        default.default_path,
        catalog.default_reason,
    )
    if default.upstream is None:
        log.warning(
            "using the built-in echo model: answers repeat the message. To use a real model, set "
            "AETHER_LLM_BASE_URL (an OpenAI-compatible API, e.g. http://127.0.0.1:11434/v1) and "
            "AETHER_LLM_MODEL, and optionally AETHER_LLM_API_KEY"
        )
    for model in catalog:
        if model.upstream is not None:
            log.info(
                "model %s%s: %s at %s, on the %s path",
                model.name,
                " (default)" if model is default else "",
                model.upstream.model,
                model.upstream.base_url,
                " or ".join(model.paths),
            )


async def drain(
    engine: RuntimeEngine, hub: ClientHub, settings: Settings, hurried: trio.Event
) -> None:
    """Give running chats the grace period (until ``hurried``), stop the rest, then close every
    WebSocket (1001)."""
    live = engine.live_count
    if live:
        log.info("giving %d running chats %.1f s to finish", live, settings.shutdown_grace_s)
        idle = False
        async with move_on_when(hurried.wait):
            idle = await engine.wait_idle(settings.shutdown_grace_s)
        if not idle:
            stopped = engine.stop_all("shutdown")
            log.info("stopping %d chats still running", stopped)
            # Let each send its block end and `stopped` before the sockets close.
            await engine.wait_idle(SHUTDOWN_BACKSTOP_S)
    hub.close_all(CLOSE_GOING_AWAY, "server shutting down")


async def serve(
    settings: Settings,
    *,
    shutdown_trigger: Callable[[], Awaitable[None]],
    hurried: trio.Event | None = None,
    app: QuartTrio | None = None,
    listen_fd: int | None = None,
    task_status: trio.TaskStatus[list[str]] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Serve until ``shutdown_trigger`` returns, then shut down gracefully; once ``hurried`` is
    set, running chats are stopped without waiting for the rest of the grace period.

    ``task_status.started`` receives the bound URLs (``http://127.0.0.1:PORT``), so a caller that
    asked for port 0 learns the port. ``app`` is ``create_app(settings)`` unless given.
    """
    app = app or create_app(settings)
    state: AppState = app.extensions[EXTENSION_KEY]
    hub = websocket_hub(app)
    hurried = hurried if hurried is not None else trio.Event()

    async def shutdown() -> None:
        """Hypercorn stops listening when this returns: return at once, drain in the app."""
        await shutdown_trigger()
        state.engine.begin_drain()
        hub.broadcast(
            {"role": "server", "type": "going_away", "grace_s": settings.shutdown_grace_s}
        )
        app.nursery.start_soon(drain, state.engine, hub, settings, hurried)

    async with trio.open_nursery() as nursery:
        binds: list[str] = await nursery.start(
            partial(
                serve_app, app, hypercorn_config(settings, listen_fd), shutdown_trigger=shutdown
            )
        )
        for bind in binds:
            ws = bind.replace("http", "ws", 1) + WEBSOCKET_PATH
            log.info("serving on %s (WebSocket %s)", bind, ws)
        describe_models(state.engine.streamer.catalog)
        describe_security(settings)
        task_status.started(binds)
    log.info("stopped")


def tune_garbage_collector() -> None:
    """Fewer, cheaper cyclic collections for a server holding thousands of live objects per
    connection. With CPython's defaults (700, 10, 10) a burst of 500 chats spent much of its
    time in collections that scanned every connection's objects; the modules and app loaded
    at start are frozen out of the scans, and the young generation collects less often.
    Measured (500 chats started at once, no history): time to first token p50 630 -> 430 ms;
    capacity at 500 streams 29k -> 33k deltas/s.

    A full collection then waits for some 50 million allocations, so what closed connections
    leave in reference cycles would wait as long: full collections are paced by WebSocket
    closes instead (``aether.core.collection_pacing``: its docstring has the cost)."""
    gc.freeze()
    gc.set_threshold(*GC_THRESHOLDS)
    FULL_COLLECTIONS.enable()


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["chat"]:
        from aether.client.terminal import main as chat_main

        return chat_main(argv[1:])
    args = build_parser().parse_args(argv)
    overrides = {
        "host": args.host,
        "port": args.port,
        "provider": args.provider,
        "llm_base_url": args.llm_base_url,
        "llm_model": args.llm_model,
        "log_level": args.log_level,
        "workers": args.workers,
    }
    try:
        settings = load_settings(config_file=args.config, overrides=overrides)
        catalog_from_settings(settings, os.environ, oi_installed())  # each model servable
        if agentic_path_enabled(settings):
            require_sandbox(settings)
            if settings.oi_profile is not None:
                load_profile(settings.oi_profile)  # read and checked before anything starts
    except ConfigError as exc:
        print(f"aether: invalid configuration: {exc}", file=sys.stderr)
        return 2
    configure_logging(settings.log_level, settings.log_format, args.worker_id)
    for warning in unknown_environment_settings(os.environ):
        log.warning("%s", warning)
    supervising = settings.workers > 1 and args.listen_fd is None
    if settings.node_id is None:
        # One name for the whole node: the supervisor's workers inherit it.
        settings = settings.model_copy(update={"node_id": generated_node_id()})
        os.environ["AETHER_NODE_ID"] = str(settings.node_id)
    if settings.history and args.listen_fd is None:
        # Checked before serving: a bad database is one line here, not a failed app startup.
        try:
            if settings.database_url is None:
                prepare_database(settings.db_path)
            else:
                from aether.core.history.postgres import prepare_schema

                trio.run(prepare_schema, settings.database_url)
                log.info("node %s, history in PostgreSQL", settings.node_id)
        except StorageError as exc:
            print(f"aether: {exc.message}", file=sys.stderr)
            return 1
    if supervising:
        from aether.supervisor import supervise

        return supervise(settings, argv, hypercorn_config(settings))
    tune_garbage_collector()
    trio.run(serve_until_signalled, settings, args.listen_fd, args.worker_id, args.supervisor_fd)
    return 0


async def serve_until_signalled(
    settings: Settings,
    listen_fd: int | None = None,
    worker_id: str | None = None,
    supervisor_fd: int | None = None,
) -> None:
    signals = ShutdownSignals()
    async with trio.open_nursery() as nursery:
        await nursery.start(signals.watch)
        if supervisor_fd is not None:
            nursery.start_soon(signals.on_end_of_file, supervisor_fd)
        await serve(
            settings,
            shutdown_trigger=signals.requested.wait,
            hurried=signals.hurried,
            app=create_app(settings, worker_id),
            listen_fd=listen_fd,
        )
        nursery.cancel_scope.cancel()
