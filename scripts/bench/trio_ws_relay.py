"""Baseline: a minimal relay on bare trio-websocket, no framework (the ceiling of this stack).

One nursery per connection, one cancel scope per chat, httpx to the upstream. It sends each
delta as its own frame, straight from the chat task.

    python scripts/bench/trio_ws_relay.py --port P --upstream http://127.0.0.1:U/v1

@.architecture
role: trio-websocket baseline relay
jobs: [benchmarking]
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import httpx
import orjson
import trio
from trio_websocket import ConnectionClosed, WebSocketConnection, WebSocketRequest, serve_websocket

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import HELLO, delta_from_line, frame, upstream_body


async def run_chat(
    ws: WebSocketConnection,
    client: httpx.AsyncClient,
    url: str,
    request: dict[str, str],
    scopes: dict[str, trio.CancelScope],
) -> None:
    rid = request["id"]
    seq = 0
    terminal: dict[str, str] = {"role": "server", "type": "completion"}
    with trio.CancelScope() as scope:
        scopes[rid] = scope
        try:
            await ws.send_message(frame({"role": "server", "type": "accepted"}, rid, seq))
            seq += 1
            await ws.send_message(
                frame({"role": "assistant", "type": "message", "start": True}, rid, seq)
            )
            seq += 1
            async with client.stream("POST", url, json=upstream_body(request["message"], "m")) as r:
                async for line in r.aiter_lines():
                    content = delta_from_line(line)
                    if content:
                        message = {"role": "assistant", "type": "message", "content": content}
                        await ws.send_message(frame(message, rid, seq))
                        seq += 1
        except ConnectionClosed:
            return
    scopes.pop(rid, None)
    if scope.cancelled_caught:
        terminal = {"role": "server", "type": "stopped", "reason": "stop"}
    try:
        await ws.send_message(
            frame({"role": "assistant", "type": "message", "end": True}, rid, seq)
        )
        await ws.send_message(frame(terminal, rid, seq + 1))
    except ConnectionClosed:
        pass


async def main(port: int, upstream: str) -> None:
    url = upstream.rstrip("/") + "/chat/completions"
    limits = httpx.Limits(max_connections=2000, max_keepalive_connections=100)
    async with httpx.AsyncClient(timeout=60, limits=limits) as client:

        async def handler(request: WebSocketRequest) -> None:
            ws = await request.accept()
            scopes: dict[str, trio.CancelScope] = {}
            async with trio.open_nursery() as nursery:
                try:
                    await ws.send_message(HELLO)
                    while True:
                        message = orjson.loads(await ws.get_message())
                        if message["type"] == "chat":
                            nursery.start_soon(run_chat, ws, client, url, message, scopes)
                        elif message["type"] == "stop" and message["id"] in scopes:
                            scopes[message["id"]].cancel()
                except ConnectionClosed:
                    nursery.cancel_scope.cancel()

        await serve_websocket(
            handler, "127.0.0.1", port, ssl_context=None, max_message_size=1 << 20
        )


if __name__ == "__main__":
    parser = argparse.ArgumentParser()
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--upstream", required=True)
    args = parser.parse_args()
    trio.run(main, args.port, args.upstream)
