"""Test helpers: protocol invariants, in-memory and real-socket WebSocket clients, servers."""

from __future__ import annotations

import atexit
import json
import os
import re
import shutil
import ssl
import subprocess
import sys
import tempfile
import uuid
from collections import defaultdict
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from importlib.util import find_spec
from pathlib import Path
from typing import Any, TypeVar

import pytest
import trio
import trustme
from trio_websocket import WebSocketConnection, open_websocket_url
from wsproto.events import Message

from aether.api.dependencies import EXTENSION_KEY, AppState
from aether.app import create_app, websocket_hub
from aether.config import Settings, load_settings
from aether.main import serve
from aether.testing.fake_llm import FakeLLM
from aether.testing.redis_server import redis_server_available
from aether.ws.hub import ClientHub

TERMINALS = {"completion", "stopped", "error"}


_DB_DIR: Path | None = None


def fresh_db_path() -> Path:
    """A new database file in a directory removed when the test process exits."""
    global _DB_DIR
    if _DB_DIR is None:
        _DB_DIR = Path(tempfile.mkdtemp(prefix="aether-tests-"))
        atexit.register(shutil.rmtree, _DB_DIR, True)
    return _DB_DIR / f"{uuid.uuid4().hex}.sqlite3"


# Code the model writes runs in bubblewrap's sandbox (scripts/test installs it).
NEEDS_BWRAP = pytest.mark.skipif(
    shutil.which("bwrap") is None, reason="bubblewrap (bwrap) is not installed"
)
# Tests of the agentic path run the real open-interpreter package, whose Jupyter kernel libraries
# warn (deprecations, zmq sockets closed by the GC): warnings turned into errors would break the
# kernel itself. Its approved code runs in the sandbox (the default): without bwrap, they are
# skipped too.
OI_MARKS = (
    pytest.mark.skipif(find_spec("interpreter") is None, reason="the oi extra is not installed"),
    NEEDS_BWRAP,
    pytest.mark.filterwarnings("ignore::DeprecationWarning"),
    # Importing it imports python-multipart's old module name, which warns since 0.0.34.
    pytest.mark.filterwarnings("ignore::PendingDeprecationWarning"),
    pytest.mark.filterwarnings("ignore::ResourceWarning"),
    pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning"),
    pytest.mark.usefixtures("collect_garbage_after"),
)
T = TypeVar("T")


def needs_oi(test: T) -> T:
    """Mark one test as a test of the agentic path (see ``OI_MARKS``)."""
    for mark in OI_MARKS:
        test = mark(test)
    return test


def oi_settings(fake: FakeLLM, **overrides: Any) -> Settings:
    """Settings for the agentic path against the fake upstream."""
    return make_settings(
        provider="oi", llm_base_url=fake.base_url, llm_model="fake-model", **overrides
    )


def http_settings(fake: FakeLLM, **overrides: Any) -> Settings:
    """Settings for the HTTP path against the fake upstream."""
    return make_settings(
        provider="http", llm_base_url=fake.base_url, llm_model="fake-model", **overrides
    )


def make_settings(**overrides: Any) -> Settings:
    db_path = fresh_db_path()
    base: dict[str, Any] = {
        "host": "127.0.0.1",
        "port": 0,
        "log_level": "DEBUG",
        "db_path": str(db_path),
        "files_dir": str(db_path.with_name(db_path.stem + "-files")),
        # A vanished client's chats stop at once, unless a test is about resuming them.
        "resume_grace_s": 0,
    }
    base.update(overrides)
    return load_settings(environ={}, overrides=base)


def console_of(messages: list[dict[str, Any]]) -> str:
    """The output the request's code printed (its ``console`` blocks' text)."""
    return "".join(str(m.get("content", "")) for m in messages if m["type"] == "console")


def assert_stream_invariants(messages: list[dict[str, Any]]) -> dict[str, Any]:
    """One request's messages: ids match, seq rises by one from 0, blocks are closed before the
    single terminal, and nothing follows it. Returns the terminal."""
    assert messages, "no messages"
    request_id = messages[0]["id"]
    open_block: tuple[str, str] | None = None
    for seq, message in enumerate(messages):
        assert message["id"] == request_id, message
        assert message["seq"] == seq, (seq, message)
        if message.get("start"):
            assert open_block is None, f"block started inside another: {message}"
            open_block = (message["role"], message["type"])
        elif message.get("end"):
            assert open_block == (message["role"], message["type"]), message
            open_block = None
        elif "content" in message and message["type"] == "message":
            assert open_block == (message["role"], message["type"]), "delta outside a block"
        if message["type"] in TERMINALS and message["role"] == "server":
            assert seq == len(messages) - 1, f"messages after the terminal: {messages[seq:]}"
            assert open_block is None, "terminal sent with a block still open"
    terminal = messages[-1]
    assert terminal["role"] == "server", terminal
    assert terminal["type"] in TERMINALS, terminal
    return terminal


def content_of(messages: list[dict[str, Any]]) -> str:
    return "".join(
        m["content"]
        for m in messages
        if m["type"] == "message" and m["role"] == "assistant" and "content" in m
    )


class StreamCollector:
    """Sorts a client's incoming messages by request id; keeps control messages apart."""

    def __init__(self) -> None:
        self.by_request: dict[str, list[dict[str, Any]]] = defaultdict(list)
        self.control: list[dict[str, Any]] = []

    def add(self, message: dict[str, Any]) -> None:
        if message.get("id") is None:
            self.control.append(message)
        else:
            self.by_request[message["id"]].append(message)

    def finished(self, request_id: str) -> bool:
        messages = self.by_request.get(request_id)
        return (
            bool(messages)
            and messages[-1]["type"] in TERMINALS
            and messages[-1]["role"] == ("server")
        )


class WSClient:
    """A trio-websocket client speaking Aether's protocol."""

    def __init__(self, ws: WebSocketConnection, hello: dict[str, Any]) -> None:
        self.ws = ws
        self.hello = hello
        self.messages = StreamCollector()

    async def send(self, message: dict[str, Any] | str) -> None:
        await self.ws.send_message(message if isinstance(message, str) else json.dumps(message))

    async def receive(self) -> dict[str, Any]:
        message: dict[str, Any] = json.loads(await self.ws.get_message())
        self.messages.add(message)
        return message

    async def receive_control(self) -> dict[str, Any]:
        """The next message that belongs to no request (errors about frames, pong)."""
        before = len(self.messages.control)
        while len(self.messages.control) == before:
            await self.receive()
        return self.messages.control[before]

    async def wait_for(self, request_id: str, predicate: Any) -> dict[str, Any]:
        for message in self.messages.by_request.get(request_id, []):
            if predicate(message):
                return message
        while True:
            message = await self.receive()
            if message.get("id") == request_id and predicate(message):
                return message

    async def finish(self, request_id: str) -> list[dict[str, Any]]:
        """Read until the request's terminal; return all of its messages."""
        while not self.messages.finished(request_id):
            await self.receive()
        return self.messages.by_request[request_id]

    async def approve_when_asked(self, request_id: str) -> dict[str, Any]:
        """Wait for the request's code ``confirmation``, approve it, and return it."""
        confirmation = await self.wait_for(request_id, lambda m: m["type"] == "confirmation")
        await self.answer(confirmation, approved=True)
        return confirmation

    async def answer(self, confirmation: dict[str, Any], *, approved: bool) -> None:
        """Approve or deny the code of ``confirmation``, naming it as the protocol asks."""
        await self.send(
            {
                "type": "approve",
                "id": confirmation["id"],
                "confirmation_id": confirmation["confirmation_id"],
                "approved": approved,
            }
        )

    async def streaming(self, request_id: str, message: str, **fields: Any) -> dict[str, Any]:
        """Start a chat and return its first content: it is running."""
        await self.send({"type": "chat", "id": request_id, "message": message, **fields})
        return await self.wait_for(request_id, lambda m: m.get("content"))

    async def chat(self, message: str, **fields: Any) -> list[dict[str, Any]]:
        request_id = fields.setdefault("id", f"t{id(fields)}")
        await self.send({"type": "chat", "message": message, **fields})
        return await self.finish(request_id)


@asynccontextmanager
async def ws_client(url: str, **kwargs: Any) -> AsyncIterator[WSClient]:
    # Each client in its own nursery (trio-websocket#184 can lose a Cancelled into it).
    async with trio.open_nursery() as nursery, open_websocket_url(url, **kwargs) as ws:
        try:
            hello = json.loads(await ws.get_message())
            assert hello["type"] == "hello", hello
            yield WSClient(ws, hello)
            nursery.cancel_scope.cancel()
        finally:
            # trio-websocket 0.12.2's client never closes its TCP stream when the server closed
            # the WebSocket first (its reader stops at EOF without closing, and aclose() returns
            # early on a closed connection): close it here so the socket is not leaked.
            if ws.closed is not None:
                with trio.CancelScope(shield=True):
                    await ws._stream.aclose()


class RunningServer:
    def __init__(self, base_url: str, stop: trio.Event, state: AppState, hub: ClientHub) -> None:
        self.base_url = base_url
        self.ws_url = base_url.replace("http", "ws", 1) + "/ws"
        self.state = state
        self.hub = hub
        self._stop = stop

    def stop(self) -> None:
        self._stop.set()


@asynccontextmanager
async def running_server(
    settings: Settings, quart_config: dict[str, Any] | None = None
) -> AsyncIterator[RunningServer]:
    """Aether under Hypercorn on 127.0.0.1, port 0; stopped (gracefully) on exit."""
    stop = trio.Event()
    app = create_app(settings)
    app.config.update(quart_config or {})
    async with trio.open_nursery() as nursery:
        binds = await nursery.start(
            lambda task_status: serve(
                settings, shutdown_trigger=stop.wait, app=app, task_status=task_status
            )
        )
        server = RunningServer(binds[0], stop, app.extensions[EXTENSION_KEY], websocket_hub(app))
        try:
            yield server
        finally:
            stop.set()


async def raw_websocket_close_code(ws_url: str, frame: str) -> int:
    """Send one text frame on a bare wsproto connection and return the server's close code.

    A bare client, because trio-websocket's leaks its socket when the server closes first
    with 1009; here the test owns and closes the socket itself.
    """
    from wsproto.events import CloseConnection

    client = await RawWebSocket.connect(ws_url)
    async with client.stream:
        await client.stream.send_all(client.ws.send(Message(data=frame)))
        while True:
            data = await client.stream.receive_some(65536)
            if not data:
                raise AssertionError("the server closed the TCP stream without a close frame")
            client.ws.receive_data(data)
            for event in client.ws.events():
                if isinstance(event, CloseConnection):
                    return event.code


async def websocket_handshake_status(
    ws_url: str,
    headers: list[tuple[bytes, bytes]] | None = None,
    subprotocols: list[str] | None = None,
    connect_to: tuple[str, int] | None = None,
) -> int:
    """The HTTP status a WebSocket handshake gets (101 when accepted), on a bare wsproto client.
    ``connect_to`` is the address to connect to when the URL's host is only a name to send.

    A bare client, because trio-websocket's leaks its socket when a handshake is refused.
    """
    from urllib.parse import urlsplit

    from wsproto import ConnectionType, WSConnection
    from wsproto.events import AcceptConnection, RejectConnection, Request

    parts = urlsplit(ws_url)
    assert parts.hostname is not None
    assert parts.port is not None
    stream = await trio.open_tcp_stream(*(connect_to or (parts.hostname, parts.port)))
    async with stream:
        ws = WSConnection(ConnectionType.CLIENT)
        request = Request(
            host=parts.netloc,
            target=parts.path,
            extra_headers=headers or [],
            subprotocols=subprotocols or [],
        )
        await stream.send_all(ws.send(request))
        while True:
            data = await stream.receive_some(65536)
            if not data:
                raise AssertionError("the server closed the TCP stream during the handshake")
            ws.receive_data(data)
            for event in ws.events():
                if isinstance(event, AcceptConnection):
                    return 101
                if isinstance(event, RejectConnection):
                    return event.status_code


class RawWebSocket:
    """A bare wsproto client on a socket the test controls: it can stop reading, or vanish
    with a TCP reset, which trio-websocket's client cannot do."""

    def __init__(self, stream: trio.SocketStream, ws: Any) -> None:
        self.stream = stream
        self.ws = ws

    @classmethod
    async def connect(
        cls, ws_url: str, receive_buffer: int | None = None, *, deflate: bool = False
    ) -> RawWebSocket:
        """``deflate`` offers permessage-deflate, as browsers do."""
        import socket
        from urllib.parse import urlsplit

        from wsproto import ConnectionType, WSConnection
        from wsproto.events import AcceptConnection, Request
        from wsproto.extensions import PerMessageDeflate

        parts = urlsplit(ws_url)
        sock = trio.socket.socket()
        if receive_buffer is not None:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, receive_buffer)
        await sock.connect((parts.hostname, parts.port))
        stream = trio.SocketStream(sock)
        ws = WSConnection(ConnectionType.CLIENT)
        extensions = [PerMessageDeflate()] if deflate else []
        await stream.send_all(
            ws.send(Request(host=parts.netloc, target=parts.path, extensions=extensions))
        )
        while True:
            ws.receive_data(await stream.receive_some(65536))
            if any(isinstance(event, AcceptConnection) for event in ws.events()):
                return cls(stream, ws)

    async def send(self, message: dict[str, Any]) -> None:
        from wsproto.events import Message

        await self.stream.send_all(self.ws.send(Message(data=json.dumps(message))))

    def reset(self) -> None:
        """Vanish: close with SO_LINGER 0, so the server gets a TCP RST."""
        import socket
        import struct

        self.stream.socket.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        self.stream.socket.close()

    async def aclose(self) -> None:
        await self.stream.aclose()


class AetherProcess:
    """A real ``python -m aether --port 0`` process, its stderr log and its URLs. The log is
    read all along (a server whose log fills the pipe would block on its next line)."""

    def __init__(self, process: trio.Process, log: bytes, base_url: str) -> None:
        self.process = process
        self.log = log
        self.base_url = base_url
        self.ws_url = base_url.replace("http", "ws", 1) + "/ws"
        self._log_ended = trio.Event()
        self._log_grew = trio.Event()

    async def keep_reading_log(self) -> None:
        assert self.process.stderr is not None
        try:
            async for chunk in self.process.stderr:
                self.log += chunk
                self._log_grew.set()
                self._log_grew = trio.Event()
        finally:
            self._log_ended.set()
            self._log_grew.set()

    async def wait_for_log(self, pattern: bytes, count: int = 1) -> list[re.Match[bytes]]:
        """Wait until the log has ``count`` matches of the regular expression ``pattern``."""
        while True:
            matches = list(re.finditer(pattern, self.log))
            if len(matches) >= count:
                return matches
            assert not self._log_ended.is_set(), self.log.decode()
            await self._log_grew.wait()

    async def read_log_to_end(self) -> bytes:
        """The whole log, once the process closed its stderr (it exited)."""
        await self._log_ended.wait()
        return self.log


needs_redis = pytest.mark.skipif(
    not redis_server_available(), reason="redis-server is not installed (scripts/test installs it)"
)


def aether_env(**extra: str) -> dict[str, str]:
    """This process's environment without its AETHER_ settings, a fresh history file, and
    ``extra``: what a ``python -m aether`` under test runs with."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("AETHER_")}
    env["AETHER_DB_PATH"] = str(fresh_db_path())
    env["AETHER_RESUME_GRACE_S"] = "0"  # as make_settings: a vanished client's chats stop
    env.update(extra)
    return env


@asynccontextmanager
async def aether_process(
    env: dict[str, str], ready_marker: bytes = b"serving on"
) -> AsyncIterator[AetherProcess]:
    """Start Aether as a process on a free port; wait for ``ready_marker`` in its log; on exit,
    kill it if it is still running."""
    import subprocess
    import sys

    process = await trio.lowlevel.open_process(
        [sys.executable, "-m", "aether", "--port", "0"], stderr=subprocess.PIPE, env=env
    )
    assert process.stderr is not None
    try:
        log = b""
        while ready_marker not in log or b"serving on" not in log:
            chunk = await process.stderr.receive_some(4096)
            assert chunk, log.decode()
            log += chunk
        match = re.search(rb"serving on (http://127\.0\.0\.1:\d+)", log)
        assert match is not None, log.decode()
        server = AetherProcess(process, log, match.group(1).decode())
        async with trio.open_nursery() as nursery:
            nursery.start_soon(server.keep_reading_log)
            try:
                yield server
            finally:
                if process.returncode is None:
                    process.kill()
                    await process.wait()
    finally:
        if process.returncode is None:
            process.kill()
            await process.wait()
        await process.stderr.aclose()


def tls_certificate(directory: Path) -> tuple[Path, Path, ssl.SSLContext]:
    """A certificate for 127.0.0.1 from a throwaway CA: (certfile, keyfile, a client context
    that trusts that CA)."""
    ca = trustme.CA()
    cert = ca.issue_cert("127.0.0.1")
    certfile, keyfile = directory / "cert.pem", directory / "key.pem"
    cert.private_key_pem.write_to_path(str(keyfile))
    cert.cert_chain_pems[0].write_to_path(str(certfile))
    client_context = ssl.create_default_context()
    ca.configure_trust(client_context)
    return certfile, keyfile, client_context


def client_env() -> dict[str, str]:
    """The environment of ``python -m aether chat``: the test's, without Aether's settings."""
    return {k: v for k, v in os.environ.items() if not k.startswith("AETHER_")}


async def run_client(*args: str, stdin: bytes = b"") -> subprocess.CompletedProcess[bytes]:
    """``python -m aether chat`` with ``args``, run to its end."""
    return await trio.run_process(
        [sys.executable, "-m", "aether", "chat", *args],
        stdin=stdin,
        capture_stdout=True,
        capture_stderr=True,
        check=False,
        env=client_env(),
    )
