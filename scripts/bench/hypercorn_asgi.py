"""Baseline: a bare ASGI app on Hypercorn's trio worker, no framework (the floor of Aether's stack).

``GET /health`` answers a small JSON object; ``POST /v1/chat`` reads a JSON chat body
(``{"message": ...}``) and answers the echo of it as JSON, as Aether's echo model would. What
Aether costs per request above this is its framework (Quart), its middleware and its chat.

    python scripts/bench/hypercorn_asgi.py --port P

@.architecture
role: Hypercorn ASGI baseline
jobs: [benchmarking]
"""

from __future__ import annotations

import argparse
from typing import Any

import orjson
import trio
from hypercorn.config import Config
from hypercorn.trio import serve

JSON_HEADERS = [(b"content-type", b"application/json")]


async def respond(send: Any, status: int, body: Any) -> None:
    payload = orjson.dumps(body)
    headers = [*JSON_HEADERS, (b"content-length", b"%d" % len(payload))]
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": payload})


async def read_body(receive: Any) -> bytes:
    parts: list[bytes] = []
    while True:
        message = await receive()
        parts.append(message.get("body", b""))
        if not message.get("more_body", False):
            return b"".join(parts)


async def app(scope: dict[str, Any], receive: Any, send: Any) -> None:
    if scope["type"] == "lifespan":
        while True:
            message = await receive()
            if message["type"] == "lifespan.startup":
                await send({"type": "lifespan.startup.complete"})
            elif message["type"] == "lifespan.shutdown":
                await send({"type": "lifespan.shutdown.complete"})
                return
    if scope["type"] != "http":
        return
    route = (scope["method"], scope["path"])
    if route == ("GET", "/health"):
        await respond(send, 200, {"status": "ok"})
    elif route == ("POST", "/v1/chat"):
        request = orjson.loads(await read_body(receive))
        answer = {"id": request.get("id") or "c", "status": "completed"}
        await respond(send, 200, {**answer, "content": request["message"]})
    else:
        await respond(send, 404, {"error": {"code": "not_found"}})


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--port", type=int, required=True)
    args = parser.parse_args()
    config = Config()
    config.bind = [f"127.0.0.1:{args.port}"]
    config.accesslog = None
    config.loglevel = "WARNING"
    config.include_server_header = False
    asgi_app: Any = app  # an ASGI callable; Hypercorn's own types are stricter than needed
    trio.run(serve, asgi_app, config)


if __name__ == "__main__":
    main()
