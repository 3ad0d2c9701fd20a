"""WebSocket conformance: the Autobahn test cases (via ``kosoku``) against an echo endpoint
served as Aether serves (its Hypercorn worker, settings and middleware stack).

The echo endpoint exists only here; it receives exactly what Aether's own endpoint receives
(plain ASGI under the same middleware and limits). Performance and compression groups (9, 12,
13) are excluded.
"""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path
from typing import Any

import pytest
import trio

from aether.app import middleware_stack
from aether.core.control.plane import LocalControlPlane
from aether.core.identity import KeyRing
from aether.core.metrics import Metrics
from aether.main import hypercorn_config
from aether.server.worker import serve_app
from tests.helpers import make_settings

KOSOKU = shutil.which("kosoku") or str(Path(sys.executable).parent / "kosoku")
pytestmark = pytest.mark.skipif(
    not Path(KOSOKU).exists(), reason="kosoku is not installed (pip install -e '.[dev]')"
)


async def echo(scope: Any, receive: Any, send: Any) -> None:
    if scope["type"] == "lifespan":
        while True:
            event = await receive()
            await send({"type": event["type"] + ".complete"})
            if event["type"] == "lifespan.shutdown":
                return
    if scope["type"] != "websocket":
        await send({"type": "http.response.start", "status": 404, "headers": []})
        await send({"type": "http.response.body", "body": b""})
        return
    await receive()  # websocket.connect
    await send({"type": "websocket.accept"})
    while True:
        event = await receive()
        if event["type"] == "websocket.disconnect":
            return
        if event.get("text") is not None:
            await send({"type": "websocket.send", "text": event["text"]})
        else:
            await send({"type": "websocket.send", "bytes": event.get("bytes") or b""})


def read_outcomes(report_dir: Path, stderr: str) -> dict[str, str]:
    """Case id -> Autobahn behaviour, from kosoku's index.json."""
    reports = list(report_dir.rglob("index.json"))
    assert reports, stderr[-2000:]
    index = json.loads(reports[0].read_text())
    return {
        case: verdict["behavior"] for agent in index.values() for case, verdict in agent.items()
    }


async def test_autobahn_cases_pass(tmp_path: Path) -> None:
    settings = make_settings(provider="echo", rate_limit_exempt_ips="127.0.0.1")
    app = middleware_stack(echo, KeyRing([]), settings, Metrics(), LocalControlPlane(lambda _: 0))
    config = hypercorn_config(settings)
    stop = trio.Event()
    with trio.fail_after(600):
        async with trio.open_nursery() as nursery:
            binds = await nursery.start(
                lambda task_status: serve_app(
                    app, config, shutdown_trigger=stop.wait, task_status=task_status
                )
            )
            url = binds[0].replace("http", "ws", 1)
            argv = [KOSOKU, url.removeprefix("ws://"), "-p", "4", "-o", str(tmp_path)]
            for group in ("9.*", "12.*", "13.*"):
                argv += ["-x", group]
            result = await trio.run_process(
                argv, capture_stdout=True, capture_stderr=True, check=False
            )
            stop.set()
    outcomes = read_outcomes(tmp_path, result.stderr.decode())
    failed = {
        case: b for case, b in outcomes.items() if b not in ("OK", "NON-STRICT", "INFORMATIONAL")
    }
    assert len(outcomes) > 200
    assert failed == {}, failed
    assert result.returncode == 0, result.stdout.decode()[-2000:]
