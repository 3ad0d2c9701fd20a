"""``python -m aether chat``: a terminal client for Aether's WebSocket protocol.

One-shot (``python -m aether chat "hello"``) or interactive (no message: one turn per line, in
one conversation, after a one-line banner naming the server, its model and path). Answers
stream to stdout as they arrive. Ctrl-C during an answer sends ``stop`` and waits for
``stopped``; a second Ctrl-C leaves at once. Code proposed on the agentic path is shown and
needs a yes before it runs. Interactive commands: ``/help``, ``/new`` (a new conversation),
``/model [NAME]`` (list the server's models, or answer with one), ``/path NAME``, ``/quit`` (or
Ctrl-D); ``//`` sends a line that starts with ``/``. A server that closes the connection while
the client waits for a line is noticed at once. A connection lost
during an answer is opened again (a few tries, within the server's resume grace) and the answer
resumed after the last message received: nothing printed twice, nothing missed.

Exit codes, for scripts: 0 the (last) answer completed; 1 it ended with an error from the server;
3 the server could not be reached or refused the connection; 130 stopped with Ctrl-C;
75 stopped by the server (shutting down: try again later).

@.architecture
role: terminal client
jobs: [terminal_client]
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import secrets
import signal
import sys
from collections.abc import Awaitable, Callable
from typing import Any, TextIO

import httpx
import trio
from trio_websocket import (
    ConnectionClosed,
    ConnectionRejected,
    HandshakeError,
    WebSocketConnection,
    connect_websocket_url,
    open_websocket_url,
)

EXIT_OK = 0
EXIT_ERROR = 1
EXIT_UNREACHABLE = 3
EXIT_TEMPFAIL = 75
EXIT_INTERRUPTED = 130
TERMINALS = {"completion", "stopped", "error"}
# Waits before each try to connect again after losing the connection mid-answer: within the
# server's resume grace (10 s by default).
RECONNECT_WAITS_S = (0.2, 0.5, 1.0, 2.0, 4.0)

# Opens a new connection to the server (its hello not yet read).
Reconnect = Callable[[], Awaitable[WebSocketConnection]]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m aether chat",
        description="Chat with an Aether server from the terminal. Ctrl-C stops an answer; "
        "a second Ctrl-C quits.",
    )
    parser.add_argument("message", nargs="*", help="the message; none: interactive, one per line")
    parser.add_argument(
        "--url",
        default=os.environ.get("AETHER_URL", "ws://127.0.0.1:8000/ws"),
        help="the server's WebSocket URL (default: $AETHER_URL or ws://127.0.0.1:8000/ws)",
    )
    parser.add_argument(
        "--token",
        default=os.environ.get("AETHER_TOKEN"),
        help="API key, if the server requires one (default: $AETHER_TOKEN)",
    )
    parser.add_argument("--conversation", help="continue this conversation")
    parser.add_argument(
        "--path", choices=["auto", "echo", "http", "oi"], default="auto", help="model path"
    )
    parser.add_argument(
        "--model", help="answer with this model (one of the server's GET /v1/models)"
    )
    return parser


class TerminalChat:
    def __init__(
        self,
        ws: WebSocketConnection,
        *,
        path: str,
        conversation_id: str | None,
        model: str | None = None,
        out: TextIO = sys.stdout,
        err: TextIO = sys.stderr,
        reconnect: Reconnect | None = None,
    ) -> None:
        self.ws = ws
        self._reconnect = reconnect
        # The request being answered: its last seq received, and how much of its text was
        # printed (a snapshot after a resume prints only the rest).
        self._last_seq = -1
        self._printed = 0
        self._stop_wanted = False
        self.path = path
        self.model = model
        self.conversation_id = conversation_id
        self._out = out
        self._err = err
        self._interrupts = 0

    async def _send(self, message: dict[str, Any]) -> None:
        await self.ws.send_message(json.dumps(message))

    async def turn(self, text: str) -> int:
        """Send one chat and show its answer; returns the exit code it deserves."""
        request_id = "t-" + secrets.token_hex(6)
        chat: dict[str, Any] = {"type": "chat", "id": request_id, "message": text}
        chat["path"] = self.path
        if self.model:
            chat["model"] = self.model
        if self.conversation_id:
            chat["conversation_id"] = self.conversation_id
        self._interrupts = 0
        self._last_seq, self._printed = -1, 0
        self._stop_wanted = False
        await self._send(chat)
        with trio.open_signal_receiver(signal.SIGINT) as interrupts:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(self._stop_on_interrupt, interrupts, request_id)
                code = await self._show_answer(request_id)
                nursery.cancel_scope.cancel()
        return code

    async def _stop_on_interrupt(self, interrupts: Any, request_id: str) -> None:
        async for _ in interrupts:
            self._interrupts += 1
            if self._interrupts > 1:
                raise KeyboardInterrupt
            self._err.write("\n[stopping; Ctrl-C again to quit]\n")
            self._err.flush()
            self._stop_wanted = True
            with contextlib.suppress(ConnectionClosed):  # else sent once resumed
                await self._send({"type": "stop", "id": request_id})

    async def _show_answer(self, request_id: str) -> int:
        in_block: str | None = None
        while True:
            try:
                message = json.loads(await self.ws.get_message())
            except ConnectionClosed:
                if not await self._resume(request_id):
                    raise
                continue
            if message.get("id") != request_id:
                if message.get("type") == "error" and message.get("id") is None:
                    ref = message.get("ref", {})
                    if ref.get("id") != request_id:
                        continue
                    if message["code"] == "resume_interrupted":
                        await self._send_resume(request_id)
                    elif ref.get("type") in ("chat", "resume"):
                        self._err.write(f"error: {message['code']}: {message['message']}\n")
                        return EXIT_ERROR
                continue
            if isinstance(message.get("seq"), int):
                self._last_seq = message["seq"]
            kind = message.get("type")
            if kind == "snapshot":
                # The answer's text up to here, standing for what the server no longer kept.
                self._out.write(str(message.get("content", ""))[self._printed :])
                self._printed = len(str(message.get("content", "")))
            elif kind == "accepted":
                self.conversation_id = message.get("conversation_id", self.conversation_id)
            elif kind == "confirmation":
                await self._confirm(message, request_id)
            elif message.get("start"):
                in_block = kind
                if kind in ("code", "console"):
                    self._out.write(f"\n```{message.get('format', '') if kind == 'code' else ''}\n")
            elif message.get("end"):
                if in_block in ("code", "console"):
                    self._out.write("\n```\n")
                in_block = None
            elif isinstance(message.get("content"), str):
                self._out.write(message["content"])
                self._out.flush()
                if kind == "message" and message.get("role") == "assistant":
                    self._printed += len(message["content"])
            if message.get("role") == "server" and kind in TERMINALS:
                self._out.write("\n")
                self._out.flush()
                return self._finish(message)

    async def _resume(self, request_id: str) -> bool:
        """The connection was lost mid-answer: connect again and resume the answer after the
        last message received. False when it cannot (no way to reconnect, or every try failed)."""
        if self._reconnect is None:
            return False
        self._err.write("\n[connection lost; resuming the answer]\n")
        self._err.flush()
        for wait_s in RECONNECT_WAITS_S:
            await trio.sleep(wait_s)
            try:
                ws = await self._reconnect()
                hello = json.loads(await ws.get_message())
            except (HandshakeError, OSError, ConnectionClosed):
                continue
            if hello.get("type") != "hello":
                continue
            previous, self.ws = self.ws, ws
            await previous.aclose()
            await self._send_resume(request_id)
            if self._stop_wanted:
                await self._send({"type": "stop", "id": request_id})
            return True
        self._err.write("error: the server could not be reached again\n")
        return False

    async def _send_resume(self, request_id: str) -> None:
        await self._send({"type": "resume", "id": request_id, "after_seq": self._last_seq})

    def _finish(self, terminal: dict[str, Any]) -> int:
        kind = terminal["type"]
        if kind == "completion":
            return EXIT_OK
        if kind == "stopped":
            self._err.write(f"[stopped: {terminal.get('reason')}]\n")
            return EXIT_INTERRUPTED if terminal.get("reason") == "stop" else EXIT_TEMPFAIL
        self._err.write(f"error: {terminal.get('code')}: {terminal.get('message')}\n")
        return EXIT_ERROR

    async def _confirm(self, message: dict[str, Any], request_id: str) -> None:
        code = message.get("content", {})
        shown = code.get("content") if isinstance(code, dict) else code
        self._err.write(f"\nThe assistant wants to run:\n{shown}\nRun it? [y/N] ")
        self._err.flush()
        answer = await trio.to_thread.run_sync(sys.stdin.readline, abandon_on_cancel=True)
        approved = answer.strip().lower() in ("y", "yes")
        await self._send(
            {
                "type": "approve",
                "id": request_id,
                "confirmation_id": message.get("confirmation_id"),
                "approved": approved,
            }
        )


async def read_line(prompt: str) -> str | None:
    sys.stderr.write(prompt)
    sys.stderr.flush()
    line: str = await trio.to_thread.run_sync(sys.stdin.readline, abandon_on_cancel=True)
    return line.rstrip("\n") if line else None


HELP = """commands:
  /help         this list
  /new          start a new conversation
  /model        list the server's models
  /model NAME   answer with that model from now on
  /path NAME    answer with another model path: auto, echo, http or oi
  /quit         leave (so does Ctrl-D)
  //text        send a message that starts with /
Ctrl-C stops an answer; a second Ctrl-C quits.
"""
PATHS = ("auto", "echo", "http", "oi")


class ServerGone(Exception):
    """The server closed the connection while the client waited for the user."""


async def converse(
    ws: WebSocketConnection, args: argparse.Namespace, reconnect: Reconnect | None = None
) -> int:
    hello = json.loads(await ws.get_message())
    if hello.get("type") != "hello":
        sys.stderr.write("error: this does not look like an Aether server\n")
        return EXIT_UNREACHABLE
    chat = TerminalChat(
        ws,
        path=args.path,
        conversation_id=args.conversation,
        model=args.model,
        reconnect=reconnect,
    )
    try:
        return await _converse(chat, args, hello)
    finally:
        if chat.ws is not ws:  # a connection opened again after a loss
            with trio.CancelScope(shield=True):
                await chat.ws.aclose()


async def _converse(chat: TerminalChat, args: argparse.Namespace, hello: dict[str, Any]) -> int:
    if args.message:
        return await chat.turn(" ".join(args.message))
    sys.stderr.write(await banner(args, hello) + "\n")
    code = EXIT_OK
    prompt = "> " if sys.stdin.isatty() else ""
    while True:
        try:
            line = await read_line_watching(chat.ws, prompt)
        except ServerGone as gone:
            sys.stderr.write(f"\nthe server closed the connection ({gone}): bye\n")
            return EXIT_TEMPFAIL
        if line is None:
            return code
        text = line.strip()
        if text.startswith("/") and not text.startswith("//"):
            command, _, argument = text.partition(" ")
            if command == "/quit":
                return code
            sys.stderr.write(await run_command(chat, args, command, argument.strip()))
            continue
        if text:
            code = await chat.turn(line[1:] if text.startswith("//") else line)


async def run_command(
    chat: TerminalChat, args: argparse.Namespace, command: str, argument: str
) -> str:
    """Carry out an interactive command; returns what to tell the user."""
    if command == "/help":
        return HELP
    if command == "/new":
        chat.conversation_id = None
        return "[a new conversation]\n"
    if command == "/path":
        if argument not in PATHS:
            return f"/path takes one of: {', '.join(PATHS)}\n"
        chat.path = argument
        return f"[path: {argument}]\n"
    if command == "/model":
        return await choose_model(chat, args, argument)
    return f"unknown command {command}: /help lists them\n"


async def choose_model(chat: TerminalChat, args: argparse.Namespace, name: str) -> str:
    """``/model``: list the server's models; ``/model NAME``: answer with NAME from now on."""
    models = await fetch_json(args, "/v1/models")
    names = [m.get("id") for m in models.get("data", [])] if models is not None else None
    if not name:
        if not names:
            return "the server's models could not be read\n"
        current = chat.model or names[0]
        return "".join(f"{'*' if n == current else ' '} {n}\n" for n in names)
    if names is not None and name not in names:
        return f"the server has no model {name!r}: /model lists them\n"
    chat.model = name
    return f"[model: {name}]\n"


async def banner(args: argparse.Namespace, hello: dict[str, Any]) -> str:
    """One line: the server, the model and path that will answer, how to leave."""
    version = hello.get("server_version", "?")
    described = f"Aether {version} at {args.url}"
    tools = await fetch_json(args, "/v1/tools")
    if args.model:
        described += f", answering with {args.model}"
    elif tools is not None:
        path = args.path if args.path != "auto" else tools.get("default_path", "auto")
        model = tools.get("model") if path in ("http", "oi") else None
        described += f", answering with {model} ({path} path)" if model else f", {path} path"
    return described + ". /help lists commands; /quit or Ctrl-D leaves."


async def fetch_json(args: argparse.Namespace, route: str) -> dict[str, Any] | None:
    """A JSON ``GET`` route of the server the WebSocket URL names (None if it cannot be read)."""
    base = args.url.replace("ws", "http", 1).rsplit("/ws", 1)[0]
    headers = {"authorization": f"Bearer {args.token}"} if args.token else {}
    try:
        async with httpx.AsyncClient(timeout=5.0) as client:
            response = await client.get(f"{base}{route}", headers=headers)
    except httpx.HTTPError:
        return None
    if response.status_code != 200:
        return None
    answer: dict[str, Any] = response.json()
    return answer


async def read_line_watching(ws: WebSocketConnection, prompt: str) -> str | None:
    """The user's next line (None at end of input), while watching the connection: a server
    that closes it meanwhile raises ServerGone at once, not at the next line."""
    line: str | None = None
    gone: str | None = None
    async with trio.open_nursery() as nursery:

        async def read() -> None:
            nonlocal line
            line = await read_line(prompt)
            nursery.cancel_scope.cancel()

        nursery.start_soon(read)
        try:
            while True:
                message = json.loads(await ws.get_message())
                if message.get("type") == "going_away":
                    sys.stderr.write("\n[the server is shutting down]\n")
        except ConnectionClosed as closed:
            reason = closed.reason
            gone = f"{reason.code} {reason.reason or ''}".strip() if reason else "no reason"
            nursery.cancel_scope.cancel()
    if gone is not None:
        raise ServerGone(gone)
    return line


async def run(args: argparse.Namespace) -> int:
    headers = [(b"authorization", f"Bearer {args.token}".encode())] if args.token else []
    code = EXIT_UNREACHABLE
    try:
        # Its own nursery: trio-websocket can lose a Cancelled into its caller's (#184). The
        # connections opened again after a loss live in it too.
        async with (
            trio.open_nursery() as connections,
            open_websocket_url(args.url, extra_headers=headers, subprotocols=["aether.v2"]) as ws,
        ):

            async def reconnect() -> WebSocketConnection:
                return await connect_websocket_url(
                    connections, args.url, extra_headers=headers, subprotocols=["aether.v2"]
                )

            code = await converse(ws, args, reconnect)
            connections.cancel_scope.cancel()
    except* ConnectionRejected as refused:
        status = getattr(refused.exceptions[0], "status_code", None)
        reason = {401: "a valid --token is required", 403: "this origin is not allowed"}
        explained = reason.get(status or 0, "see the server's log")
        sys.stderr.write(f"error: the server refused the connection ({status}): {explained}\n")
    except* (HandshakeError, OSError) as failed:
        cause = failed.exceptions[0].__cause__ or failed.exceptions[0]
        sys.stderr.write(f"error: cannot reach {args.url}: {cause}\n")
    except* ConnectionClosed:
        sys.stderr.write("error: the server closed the connection\n")
    return code


def main(argv: list[str]) -> int:
    args = build_parser().parse_args(argv)
    try:
        return trio.run(run, args)
    except* KeyboardInterrupt:
        # A second Ctrl-C during an answer, or one at the prompt.
        sys.stderr.write("\n")
    return EXIT_INTERRUPTED
