"""``python -m aether chat``: a terminal client for Aether's WebSocket protocol.

One-shot (``python -m aether chat "hello"``) or interactive (no message: one turn per line, in
one conversation, after a one-line banner naming the server, its model and path). Answers
stream to stdout as they arrive. Ctrl-C during an answer sends ``stop`` and waits for
``stopped``; a second Ctrl-C leaves at once. Code proposed on the agentic path is shown and
needs a yes before it runs. Interactive commands: ``/help``, ``/new`` (a new conversation),
``/path NAME``, ``/quit`` (or Ctrl-D); ``//`` sends a line that starts with ``/``. A server that
closes the connection while the client waits for a line is noticed at once.

Exit codes, for scripts: 0 the (last) answer completed; 1 it ended with an error from the server;
3 the server could not be reached or refused the connection; 130 stopped with Ctrl-C;
75 stopped by the server (shutting down: try again later).

@.architecture
role: terminal client
jobs: [terminal_client]
"""

from __future__ import annotations

import argparse
import json
import os
import secrets
import signal
import sys
from typing import Any, TextIO

import httpx
import trio
from trio_websocket import (
    ConnectionClosed,
    ConnectionRejected,
    HandshakeError,
    WebSocketConnection,
    open_websocket_url,
)

EXIT_OK = 0
EXIT_ERROR = 1
EXIT_UNREACHABLE = 3
EXIT_TEMPFAIL = 75
EXIT_INTERRUPTED = 130
TERMINALS = {"completion", "stopped", "error"}


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
    return parser


class TerminalChat:
    def __init__(
        self,
        ws: WebSocketConnection,
        *,
        path: str,
        conversation_id: str | None,
        out: TextIO = sys.stdout,
        err: TextIO = sys.stderr,
    ) -> None:
        self._ws = ws
        self.path = path
        self.conversation_id = conversation_id
        self._out = out
        self._err = err
        self._interrupts = 0

    async def _send(self, message: dict[str, Any]) -> None:
        await self._ws.send_message(json.dumps(message))

    async def turn(self, text: str) -> int:
        """Send one chat and show its answer; returns the exit code it deserves."""
        request_id = "t-" + secrets.token_hex(6)
        chat: dict[str, Any] = {"type": "chat", "id": request_id, "message": text}
        chat["path"] = self.path
        if self.conversation_id:
            chat["conversation_id"] = self.conversation_id
        self._interrupts = 0
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
            await self._send({"type": "stop", "id": request_id})

    async def _show_answer(self, request_id: str) -> int:
        in_block: str | None = None
        while True:
            message = json.loads(await self._ws.get_message())
            if message.get("id") != request_id:
                if message.get("type") == "error" and message.get("id") is None:
                    ref = message.get("ref", {})
                    if ref.get("id") == request_id and ref.get("type") == "chat":
                        self._err.write(f"error: {message['code']}: {message['message']}\n")
                        return EXIT_ERROR
                continue
            kind = message.get("type")
            if kind == "accepted":
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
            if message.get("role") == "server" and kind in TERMINALS:
                self._out.write("\n")
                self._out.flush()
                return self._finish(message)

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
  /path NAME    answer with another model path: auto, echo, http or oi
  /quit         leave (so does Ctrl-D)
  //text        send a message that starts with /
Ctrl-C stops an answer; a second Ctrl-C quits.
"""
PATHS = ("auto", "echo", "http", "oi")


class ServerGone(Exception):
    """The server closed the connection while the client waited for the user."""


async def converse(ws: WebSocketConnection, args: argparse.Namespace) -> int:
    hello = json.loads(await ws.get_message())
    if hello.get("type") != "hello":
        sys.stderr.write("error: this does not look like an Aether server\n")
        return EXIT_UNREACHABLE
    chat = TerminalChat(ws, path=args.path, conversation_id=args.conversation)
    if args.message:
        return await chat.turn(" ".join(args.message))
    sys.stderr.write(await banner(args, hello) + "\n")
    code = EXIT_OK
    prompt = "> " if sys.stdin.isatty() else ""
    while True:
        try:
            line = await read_line_watching(ws, prompt)
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
            sys.stderr.write(run_command(chat, command, argument.strip()))
            continue
        if text:
            code = await chat.turn(line[1:] if text.startswith("//") else line)


def run_command(chat: TerminalChat, command: str, argument: str) -> str:
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
    return f"unknown command {command}: /help lists them\n"


async def banner(args: argparse.Namespace, hello: dict[str, Any]) -> str:
    """One line: the server, the model and path that will answer, how to leave."""
    version = hello.get("server_version", "?")
    described = f"Aether {version} at {args.url}"
    tools = await fetch_tools(args)
    if tools is not None:
        path = args.path if args.path != "auto" else tools.get("default_path", "auto")
        model = tools.get("model") if path in ("http", "oi") else None
        described += f", answering with {model} ({path} path)" if model else f", {path} path"
    return described + ". /help lists commands; /quit or Ctrl-D leaves."


async def fetch_tools(args: argparse.Namespace) -> dict[str, Any] | None:
    """``GET /v1/tools`` of the server the WebSocket URL names (None if it cannot be read)."""
    base = args.url.replace("ws", "http", 1).rsplit("/ws", 1)[0]
    headers = {"authorization": f"Bearer {args.token}"} if args.token else {}
    try:
        async with httpx.AsyncClient(timeout=5.0) as client:
            response = await client.get(f"{base}/v1/tools", headers=headers)
    except httpx.HTTPError:
        return None
    if response.status_code != 200:
        return None
    tools: dict[str, Any] = response.json()
    return tools


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
        # Its own nursery: trio-websocket can lose a Cancelled into its caller's (#184).
        async with (
            trio.open_nursery(),
            open_websocket_url(args.url, extra_headers=headers, subprotocols=["aether.v2"]) as ws,
        ):
            code = await converse(ws, args)
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
