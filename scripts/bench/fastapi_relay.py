"""Baseline: the same relay on FastAPI + uvicorn (asyncio), the stack most Python backends use.

One asyncio task per chat, cancelled on stop; httpx to the upstream; each delta its own frame.
``POST /v1/chat/stream`` serves the same chat as server-sent events. A chat that asks for
``"path": "echo"`` gets its message back token by token instead of the upstream's answer, and
``POST /v1/chat`` answers the echo as one JSON body (with ``GET /health``: the fixed costs).

    AETHER_BENCH_UPSTREAM=http://127.0.0.1:U/v1 uvicorn fastapi_relay:app --port P

@.architecture
role: FastAPI baseline relay
jobs: [benchmarking]
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import sys
from collections.abc import AsyncIterator
from pathlib import Path

import httpx
import orjson
from fastapi import FastAPI, WebSocket, WebSocketDisconnect
from fastapi.responses import StreamingResponse
from pydantic import BaseModel

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import HELLO, delta_from_line, echo_tokens, frame, upstream_body

UPSTREAM = os.environ.get("AETHER_BENCH_UPSTREAM", "http://127.0.0.1:9000/v1").rstrip("/")
app = FastAPI()
client = httpx.AsyncClient(
    timeout=60, limits=httpx.Limits(max_connections=2000, max_keepalive_connections=100)
)


async def deltas(request: dict[str, str]) -> AsyncIterator[str]:
    """The answer's content deltas: the echo of the message, or the upstream's stream."""
    if request.get("path") == "echo":
        for token in echo_tokens(request["message"]):
            yield token
        return
    body = upstream_body(request["message"], "m")
    async with client.stream("POST", UPSTREAM + "/chat/completions", json=body) as r:
        async for line in r.aiter_lines():
            content = delta_from_line(line)
            if content:
                yield content


async def run_chat(ws: WebSocket, request: dict[str, str]) -> None:
    rid = request["id"]
    seq = 2
    terminal: dict[str, str] = {"role": "server", "type": "completion"}
    await ws.send_text(frame({"role": "server", "type": "accepted"}, rid, 0))
    await ws.send_text(frame({"role": "assistant", "type": "message", "start": True}, rid, 1))
    try:
        async for content in deltas(request):
            message = {"role": "assistant", "type": "message", "content": content}
            await ws.send_text(frame(message, rid, seq))
            seq += 1
    except asyncio.CancelledError:
        terminal = {"role": "server", "type": "stopped", "reason": "stop"}
    with contextlib.suppress(Exception):
        await ws.send_text(frame({"role": "assistant", "type": "message", "end": True}, rid, seq))
        await ws.send_text(frame(terminal, rid, seq + 1))


@app.websocket("/ws")
async def websocket_endpoint(ws: WebSocket) -> None:
    await ws.accept()
    await ws.send_text(HELLO)
    tasks: dict[str, asyncio.Task[None]] = {}
    try:
        while True:
            message = orjson.loads(await ws.receive_text())
            if message["type"] == "chat":
                task = asyncio.create_task(run_chat(ws, message))
                tasks[message["id"]] = task
                task.add_done_callback(lambda _t, rid=message["id"]: tasks.pop(rid, None))
            elif message["type"] == "stop" and message["id"] in tasks:
                tasks[message["id"]].cancel()
    except WebSocketDisconnect:
        for task in tasks.values():
            task.cancel()


@app.post("/v1/chat/stream")
async def chat_stream(request: dict[str, str]) -> StreamingResponse:
    """The same chat as server-sent events, one ``data:`` line per message."""
    rid = request.get("id") or "c"

    async def events() -> AsyncIterator[str]:
        yield sse(frame({"role": "server", "type": "accepted"}, rid, 0))
        yield sse(frame({"role": "assistant", "type": "message", "start": True}, rid, 1))
        seq = 2
        async for content in deltas(request):
            message = {"role": "assistant", "type": "message", "content": content}
            yield sse(frame(message, rid, seq))
            seq += 1
        yield sse(frame({"role": "assistant", "type": "message", "end": True}, rid, seq))
        yield sse(frame({"role": "server", "type": "completion"}, rid, seq + 1))

    return StreamingResponse(events(), media_type="text/event-stream")


def sse(data: str) -> str:
    return f"data: {data}\n\n"


class ChatBody(BaseModel):
    message: str
    id: str | None = None
    path: str = "auto"


@app.get("/health")
async def health() -> dict[str, str]:
    return {"status": "ok"}


@app.post("/v1/chat")
async def chat(request: ChatBody) -> dict[str, str]:
    """The whole echo answer as JSON, like Aether's ``POST /v1/chat`` on its echo path."""
    content = "".join(echo_tokens(request.message))
    return {"id": request.id or "c", "status": "completed", "content": content}
