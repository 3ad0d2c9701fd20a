"""A fake OpenAI-compatible model server: real HTTP on loopback, scriptable, instrumented.

Tests and benchmarks point Aether's HTTP path at it. It speaks ``POST /v1/chat/completions``
(streaming SSE with ``data: [DONE]``, and non-streaming JSON) and ``GET /v1/models``, on raw
Trio sockets with h11, so that it can also misbehave the way real upstreams do: answer 4xx/5xx,
stay silent before the first token, reset the TCP connection mid-stream, send malformed SSE, or
end without ``[DONE]``.

Every streamed completion leaves a ``StreamRecord``: when it started, how many tokens it sent,
and **when the client closed it**, so a test can assert that a stop reached the upstream.

    fake = FakeLLM(Behaviour(tokens=50, delay_s=0.01))
    port = await nursery.start(fake.serve)
    fake.script(Behaviour(status=503))          # the next request fails, later ones don't
    record = await fake.wait_for_stream(0)
    await record.closed.wait()

It also answers ``GET /search?q=...&format=json`` as a SearxNG-style search API would (with
``search_results``, recording each query in ``searches``), for the agentic path's web search.

Run standalone: ``python -m aether.testing.fake_llm --port 9000 --tokens 200 --delay-ms 20``.
``GET /_fake/streams`` returns the records as JSON for out-of-process callers.

@.architecture
role: fake upstream model server
jobs: [test_support, stream_generation]
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import re
import socket
import ssl
import struct
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Any, Literal
from urllib.parse import parse_qs

import h11
import orjson
import trio

log = logging.getLogger(__name__)

# reset: TCP RST mid-stream; malformed: an event that is not JSON; no_done: the body ends with
# neither [DONE] nor a finish_reason; error_event: an {"error": ...} event; unterminated: the
# last event (with finish_reason) lacks its blank line and no [DONE] follows: still a whole answer.
Failure = Literal["reset", "malformed", "no_done", "error_event", "unterminated"]
MAX_REQUEST_BYTES = 1024 * 1024
READ_CHUNK = 65536


@dataclass(frozen=True)
class Behaviour:
    """How the fake answers one completion request."""

    tokens: int = 20
    delay_s: float = 0.0
    first_token_delay_s: float = 0.0
    # Before the response's headers (a server still queueing the request).
    headers_delay_s: float = 0.0
    status: int = 200
    failure: Failure | None = None
    fail_after: int = 0
    # A fixed answer instead of "tok0 tok1 ...": a string streamed in pieces of ``piece_chars``,
    # or a tuple of the exact pieces (as a model's tokens would split it).
    reply: str | tuple[str, ...] | None = None
    piece_chars: int = 8
    # Code the model proposes after ``reply``: (language, code). Asked with ``tools``, as an
    # OpenAI tool call of ``execute`` (its arguments streamed in pieces); without, as a fenced
    # block in the text.
    code: tuple[str, str] | None = None

    def __post_init__(self) -> None:
        if isinstance(self.reply, str):
            text = self.reply
            pieces = tuple(
                text[i : i + self.piece_chars] for i in range(0, len(text), self.piece_chars)
            )
            object.__setattr__(self, "reply", pieces)
        if self.reply is not None:
            object.__setattr__(self, "tokens", len(self.reply))
        elif self.code is not None:
            object.__setattr__(self, "reply", ())
            object.__setattr__(self, "tokens", 0)

    def token(self, index: int) -> str:
        if self.reply is not None:
            return self.reply[index]
        return f"tok{index} "


@dataclass(eq=False)
class StreamRecord:
    """One streamed completion as the fake saw it (times are ``trio.current_time()``)."""

    index: int
    request: dict[str, Any]
    started_at: float
    tokens_sent: int = 0
    finished_at: float | None = None
    client_closed_at: float | None = None
    outcome: str = "streaming"
    closed: trio.Event = field(default_factory=trio.Event)
    # time.monotonic() at the client's close: comparable across processes (benchmarks).
    client_closed_monotonic: float | None = None

    def as_json(self) -> dict[str, Any]:
        return {
            "index": self.index,
            "started_at": self.started_at,
            "tokens_sent": self.tokens_sent,
            "finished_at": self.finished_at,
            "client_closed_at": self.client_closed_at,
            "outcome": self.outcome,
            "client_closed_monotonic": self.client_closed_monotonic,
            "last_user_message": self.last_user_message,
        }

    @property
    def last_user_message(self) -> str | None:
        """The text of the request's last message (benchmarks tag streams with it)."""
        messages = self.request.get("messages") or [{}]
        content = messages[-1].get("content") if isinstance(messages[-1], dict) else None
        return content[:128] if isinstance(content, str) else None


StreamUsage = Literal["sent", "ignored", "refused"]
_FENCE = re.compile(r"^```(\w*)\n(.*?)^```", re.MULTILINE | re.DOTALL)


def _fenced_code(reply: tuple[str, ...]) -> tuple[tuple[str, ...], tuple[str, str]] | None:
    """A reply's first fenced block as (language, code), and the reply's pieces before it."""
    text = "".join(reply)
    match = _FENCE.search(text)
    if match is None:
        return None
    before: list[str] = []
    length = 0
    for piece in reply:
        if length + len(piece) >= match.start():
            before.append(piece[: match.start() - length])
            break
        before.append(piece)
        length += len(piece)
    return tuple(p for p in before if p), (match.group(1) or "python", match.group(2))


class _ClientGone(Exception):
    pass


class FakeLLM:
    def __init__(
        self,
        default: Behaviour | None = None,
        *,
        model: str = "fake-model",
        ssl_context: ssl.SSLContext | None = None,
        stream_usage: StreamUsage = "sent",
        tools: Literal["supported", "refused"] = "supported",
    ) -> None:
        self.default = default or Behaviour()
        # What it does with ``stream_options.include_usage``: sends the stream's token counts
        # in a last chunk (as OpenAI), ignores the field, or refuses it with a 400 (as some
        # older servers do with a field they do not know).
        self.stream_usage = stream_usage
        # Whether it takes OpenAI's ``tools`` (a server without function calling answers 400).
        self.tools = tools
        # With a server context, it speaks HTTPS (an upstream with a certificate of its own).
        self.ssl_context = ssl_context
        self.model = model
        self.port: int | None = None
        self.streams: list[StreamRecord] = []
        self.requests_seen = 0
        # The Authorization header of each chat completion request, in order (None: none).
        self.authorizations: list[str | None] = []
        self._scripted: deque[Behaviour] = deque()
        self._stream_started = trio.lowlevel.ParkingLot()
        # The SearxNG-style search API it also serves: what it answers, and the queries it got.
        self.search_results: list[dict[str, str]] = []
        self.searches: list[str] = []

    @property
    def base_url(self) -> str:
        if self.port is None:
            raise RuntimeError("the fake LLM is not serving yet")
        scheme = "https" if self.ssl_context is not None else "http"
        return f"{scheme}://127.0.0.1:{self.port}/v1"

    @property
    def search_url(self) -> str:
        return self.base_url.removesuffix("/v1") + "/search"

    def script(self, *behaviours: Behaviour) -> None:
        """Queue behaviours for the next requests, in order; then the default applies again."""
        self._scripted.extend(behaviours)

    async def wait_for_stream(self, index: int) -> StreamRecord:
        """Wait until the ``index``-th streamed completion (from 0) has started."""
        while len(self.streams) <= index:
            await self._stream_started.park()
        return self.streams[index]

    async def serve(
        self, host: str = "127.0.0.1", port: int = 0, *, task_status: Any = trio.TASK_STATUS_IGNORED
    ) -> None:
        tcp = await trio.open_tcp_listeners(port, host=host)
        self.port = tcp[0].socket.getsockname()[1]
        listeners: list[Any] = list(tcp)
        if self.ssl_context is not None:
            listeners = [
                trio.SSLListener(listener, self.ssl_context, https_compatible=True)
                for listener in tcp
            ]
        log.info("fake LLM listening on %s", self.base_url)
        await trio.serve_listeners(self._handle_connection, listeners, task_status=task_status)

    async def _handle_connection(self, stream: trio.SocketStream) -> None:
        connection = h11.Connection(h11.SERVER)
        try:
            while True:
                request, body = await self._read_request(connection, stream)
                if request is None:
                    return
                keep_open = await self._respond(connection, stream, request, body)
                if not keep_open or connection.our_state is not h11.DONE:
                    return
                connection.start_next_cycle()
        except (_ClientGone, trio.BrokenResourceError, trio.ClosedResourceError):
            pass
        except h11.RemoteProtocolError:
            pass
        finally:
            with trio.CancelScope(shield=True):
                await stream.aclose()

    async def _read_request(
        self, connection: h11.Connection, stream: trio.SocketStream
    ) -> tuple[h11.Request | None, bytes]:
        request: h11.Request | None = None
        body = bytearray()
        while True:
            event = connection.next_event()
            if event is h11.NEED_DATA:
                data = await stream.receive_some(READ_CHUNK)
                connection.receive_data(bytes(data))
                continue
            if isinstance(event, h11.Request):
                request = event
            elif isinstance(event, h11.Data):
                body += event.data
                if len(body) > MAX_REQUEST_BYTES:
                    raise _ClientGone
            elif isinstance(event, h11.EndOfMessage):
                return request, bytes(body)
            elif isinstance(event, h11.ConnectionClosed):
                return None, b""

    async def _send(
        self, connection: h11.Connection, stream: trio.SocketStream, event: Any
    ) -> None:
        data = connection.send(event)
        if data:
            await stream.send_all(data)

    async def _send_json(
        self, connection: h11.Connection, stream: trio.SocketStream, status: int, body: Any
    ) -> None:
        payload = orjson.dumps(body)
        headers = [("content-type", "application/json"), ("content-length", str(len(payload)))]
        await self._send(connection, stream, h11.Response(status_code=status, headers=headers))
        await self._send(connection, stream, h11.Data(data=payload))
        await self._send(connection, stream, h11.EndOfMessage())

    async def _respond(
        self,
        connection: h11.Connection,
        stream: trio.SocketStream,
        request: h11.Request,
        body: bytes,
    ) -> bool:
        method = request.method.decode()
        target = request.target.decode().split("?", 1)[0]
        if method == "GET" and target == "/v1/models":
            models = {"object": "list", "data": [{"id": self.model, "object": "model"}]}
            await self._send_json(connection, stream, 200, models)
            return True
        if method == "GET" and target == "/search":
            query = parse_qs(request.target.decode().partition("?")[2])
            self.searches.append(query.get("q", [""])[0])
            answer = {"query": self.searches[-1], "results": self.search_results}
            await self._send_json(connection, stream, 200, answer)
            return True
        if method == "GET" and target == "/_fake/streams":
            await self._send_json(connection, stream, 200, [s.as_json() for s in self.streams])
            return True
        if method != "POST" or target != "/v1/chat/completions":
            error = {"error": {"message": f"no route {method} {target}", "type": "not_found"}}
            await self._send_json(connection, stream, 404, error)
            return True
        self.requests_seen += 1
        self.authorizations.append(
            next((v.decode() for n, v in request.headers if n == b"authorization"), None)
        )
        behaviour = self._scripted.popleft() if self._scripted else self.default
        try:
            payload = orjson.loads(body)
        except orjson.JSONDecodeError:
            payload = None
        if not isinstance(payload, dict) or not isinstance(payload.get("messages"), list):
            error = {"error": {"message": "messages is required", "type": "invalid_request"}}
            await self._send_json(connection, stream, 400, error)
            return True
        if "tools" in payload and self.tools == "refused":
            error = {"error": {"message": "tools are not supported", "type": "invalid"}}
            await self._send_json(connection, stream, 400, error)
            return True
        if "stream_options" in payload and self.stream_usage == "refused":
            error = {"error": {"message": "unknown field stream_options", "type": "invalid"}}
            await self._send_json(connection, stream, 400, error)
            return True
        if behaviour.status >= 400:
            await trio.sleep(behaviour.first_token_delay_s)
            error = {"error": {"message": "scripted failure", "type": "server_error"}}
            await self._send_json(connection, stream, behaviour.status, error)
            return True
        if not payload.get("stream"):
            content = "".join(behaviour.token(i) for i in range(behaviour.tokens))
            await trio.sleep(behaviour.first_token_delay_s + behaviour.delay_s * behaviour.tokens)
            await self._send_json(connection, stream, 200, self._completion(content))
            return True
        return await self._stream(connection, stream, payload, behaviour)

    def _completion(self, content: str) -> dict[str, Any]:
        return {
            "id": "chatcmpl-fake",
            "object": "chat.completion",
            "created": 0,
            "model": self.model,
            "choices": [
                {
                    "index": 0,
                    "message": {"role": "assistant", "content": content},
                    "finish_reason": "stop",
                }
            ],
        }

    async def _send_code(
        self,
        connection: h11.Connection,
        stream: trio.SocketStream,
        record: StreamRecord,
        code: tuple[str, str],
    ) -> str:
        """Propose ``code``: a tool call when the request offers tools, else a fenced block.
        Returns the finish reason."""
        language, source = code
        if not record.request.get("tools"):
            fenced = f"```{language}\n{source}\n```\n"
            await self._send(connection, stream, h11.Data(data=self._chunk({"content": fenced})))
            return "stop"
        call = {"index": 0, "id": "call_1", "type": "function"}
        opened = {"tool_calls": [{**call, "function": {"name": "execute", "arguments": ""}}]}
        await self._send(connection, stream, h11.Data(data=self._chunk(opened)))
        arguments = orjson.dumps({"language": language, "code": source}).decode()
        for start in range(0, len(arguments), 8):
            piece = {"index": 0, "function": {"arguments": arguments[start : start + 8]}}
            await self._send(
                connection, stream, h11.Data(data=self._chunk({"tool_calls": [piece]}))
            )
        return "tool_calls"

    def _usage_chunk(self, record: StreamRecord) -> bytes:
        """OpenAI's last chunk when asked for usage: no choices, the stream's token counts (the
        prompt's: one per word of its messages, a count no estimate would give)."""
        words = sum(
            len(str(message.get("content", "")).split())
            for message in record.request.get("messages", [])
            if isinstance(message, dict)
        )
        usage = {
            "prompt_tokens": words,
            "completion_tokens": record.tokens_sent,
            "total_tokens": words + record.tokens_sent,
        }
        chunk = {"id": "chatcmpl-fake", "object": "chat.completion.chunk", "created": 0}
        return (
            b"data: "
            + orjson.dumps({**chunk, "model": self.model, "choices": [], "usage": usage})
            + b"\n\n"
        )

    def _chunk(self, delta: dict[str, Any], finish_reason: str | None = None) -> bytes:
        chunk = {
            "id": "chatcmpl-fake",
            "object": "chat.completion.chunk",
            "created": 0,
            "model": self.model,
            "choices": [{"index": 0, "delta": delta, "finish_reason": finish_reason}],
        }
        return b"data: " + orjson.dumps(chunk) + b"\n\n"

    async def _stream(
        self,
        connection: h11.Connection,
        stream: trio.SocketStream,
        payload: dict[str, Any],
        behaviour: Behaviour,
    ) -> bool:
        record = StreamRecord(len(self.streams), payload, trio.current_time())
        self.streams.append(record)
        self._stream_started.unpark_all()
        completed = False
        try:
            async with trio.open_nursery() as nursery:
                # A client that closes its connection is noticed at once, even between tokens.
                nursery.start_soon(self._watch_for_close, stream, record, nursery.cancel_scope)
                completed = await self._send_stream(connection, stream, record, behaviour)
                nursery.cancel_scope.cancel()
        except* (trio.BrokenResourceError, trio.ClosedResourceError):
            self._note_client_closed(record)
        finally:
            record.finished_at = trio.current_time()
            if record.outcome == "streaming":
                record.outcome = "completed" if completed else "failed"
            record.closed.set()
        return completed

    def _note_client_closed(self, record: StreamRecord) -> None:
        if record.client_closed_at is None:
            record.client_closed_at = trio.current_time()
            record.client_closed_monotonic = time.monotonic()
            record.outcome = "client_closed"

    async def _watch_for_close(
        self, stream: trio.SocketStream, record: StreamRecord, scope: trio.CancelScope
    ) -> None:
        try:
            data = await stream.receive_some(READ_CHUNK)
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            data = b""
        if not data:
            self._note_client_closed(record)
            scope.cancel()

    async def _send_stream(
        self,
        connection: h11.Connection,
        stream: trio.SocketStream,
        record: StreamRecord,
        behaviour: Behaviour,
    ) -> bool:
        await trio.sleep(behaviour.headers_delay_s)
        headers = [("content-type", "text/event-stream"), ("cache-control", "no-cache")]
        await self._send(connection, stream, h11.Response(status_code=200, headers=headers))
        await trio.sleep(behaviour.first_token_delay_s)
        await self._send(connection, stream, h11.Data(data=self._chunk({"role": "assistant"})))
        token, tokens, code = behaviour.token, behaviour.tokens, behaviour.code
        if record.request.get("tools") and code is None and isinstance(behaviour.reply, tuple):
            # Offered tools, a model proposes the code of its answer as a tool call: the text
            # before the fence streams as it is, the call ends its answer.
            split = _fenced_code(behaviour.reply)
            if split is not None:
                before, code = split
                tokens = len(before)

                def token(index: int) -> str:
                    return before[index]

        for index in range(tokens):
            if behaviour.failure is not None and index == behaviour.fail_after:
                await self._fail(connection, stream, record, behaviour.failure)
                return behaviour.failure in ("no_done", "unterminated")
            if index:
                await trio.sleep(behaviour.delay_s)
            chunk = self._chunk({"content": token(index)})
            await self._send(connection, stream, h11.Data(data=chunk))
            record.tokens_sent += 1
        finish = "stop"
        if code is not None:
            finish = await self._send_code(connection, stream, record, code)
        await self._send(connection, stream, h11.Data(data=self._chunk({}, finish)))
        options = record.request.get("stream_options")
        if (
            self.stream_usage == "sent"
            and isinstance(options, dict)
            and options.get("include_usage")
        ):
            await self._send(connection, stream, h11.Data(data=self._usage_chunk(record)))
        await self._send(connection, stream, h11.Data(data=b"data: [DONE]\n\n"))
        await self._send(connection, stream, h11.EndOfMessage())
        return True

    async def _fail(
        self,
        connection: h11.Connection,
        stream: trio.SocketStream,
        record: StreamRecord,
        failure: Failure,
    ) -> None:
        record.outcome = f"failed: {failure}"
        if failure == "reset":
            # SO_LINGER 0 makes close() send RST: the peer sees "connection reset".
            raw = (
                stream.transport_stream.socket
                if isinstance(stream, trio.SSLStream)
                else stream.socket
            )
            raw.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            raw.close()
            return
        if failure == "malformed":
            await self._send(connection, stream, h11.Data(data=b"data: {not json\n\n"))
        elif failure == "error_event":
            error = b'data: {"error": {"message": "overloaded", "type": "server_error"}}\n\n'
            await self._send(connection, stream, h11.Data(data=error))
        elif failure == "unterminated":
            last = self._chunk({"content": "end."}, "stop").rstrip(b"\n")
            await self._send(connection, stream, h11.Data(data=last))
        await self._send(connection, stream, h11.EndOfMessage())


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="python -m aether.testing.fake_llm",
        description="A fake OpenAI-compatible streaming model server on loopback.",
    )
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=9000)
    parser.add_argument("--tokens", type=int, default=20, help="tokens per answer")
    parser.add_argument("--delay-ms", type=float, default=0.0, help="pause between tokens")
    parser.add_argument("--first-token-delay-ms", type=float, default=0.0)
    parser.add_argument(
        "--reply-piece",
        action="append",
        help="answer with these pieces, in order, instead of tokens (repeat the flag)",
    )
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    fake = FakeLLM(
        Behaviour(
            tokens=args.tokens,
            delay_s=args.delay_ms / 1000,
            first_token_delay_s=args.first_token_delay_ms / 1000,
            reply=tuple(args.reply_piece) if args.reply_piece else None,
        )
    )
    with contextlib.suppress(KeyboardInterrupt):
        trio.run(fake.serve, args.host, args.port)


if __name__ == "__main__":
    main()
