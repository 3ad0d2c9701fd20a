"""`python -m aether` as a user runs it: a real process, a real port, a real signal."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys

import httpx
import trio

from tests.helpers import fresh_db_path, ws_client


def aether_env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("AETHER_")}
    env["AETHER_DB_PATH"] = str(fresh_db_path())
    env.update(extra)
    return env


def test_help_documents_the_flags() -> None:
    result = subprocess.run(
        [sys.executable, "-m", "aether", "--help"], capture_output=True, text=True, check=True
    )
    for flag in ("--host", "--port", "--config", "--provider", "AETHER_"):
        assert flag in result.stdout


def test_invalid_setting_fails_with_one_line() -> None:
    result = subprocess.run(
        [sys.executable, "-m", "aether"],
        capture_output=True,
        text=True,
        env=aether_env(AETHER_PORT="eighty"),
        timeout=30,
    )
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1
    assert lines[0].startswith("aether: invalid configuration: AETHER_PORT:")


async def test_serves_echo_then_exits_cleanly_on_sigterm() -> None:
    with trio.fail_after(30):
        process = await trio.lowlevel.open_process(
            [sys.executable, "-m", "aether", "--port", "0"],
            stderr=subprocess.PIPE,
            env=aether_env(AETHER_ECHO_TOKEN_DELAY_S="0"),
        )
        assert process.stderr is not None
        log = b""
        try:
            while b"built-in echo model" not in log:
                chunk = await process.stderr.receive_some(4096)
                assert chunk, log.decode()
                log += chunk
            match = re.search(rb"serving on (http://127\.0\.0\.1:\d+)", log)
            assert match is not None, log.decode()
            base_url = match.group(1).decode()
            async with httpx.AsyncClient(base_url=base_url) as client:
                assert (await client.get("/ready")).json()["default_path"] == "echo"
            ws_url = base_url.replace("http", "ws", 1) + "/ws"
            async with ws_client(ws_url) as client:
                messages = await client.chat("hello echo", id="r1")
            assert "".join(m.get("content", "") for m in messages) == "hello echo"
            process.send_signal(signal.SIGTERM)
            assert await process.wait() == 0
        finally:
            if process.returncode is None:
                process.kill()
                await process.wait()
            await process.stderr.aclose()


async def test_json_logs_carry_ids_and_never_message_content() -> None:
    secret = "my-private-words-4711"
    with trio.fail_after(30):
        process = await trio.lowlevel.open_process(
            [sys.executable, "-m", "aether", "--port", "0"],
            stderr=subprocess.PIPE,
            env=aether_env(AETHER_ECHO_TOKEN_DELAY_S="0", AETHER_LOG_FORMAT="json"),
        )
        assert process.stderr is not None
        log = b""
        try:
            while b"built-in echo model" not in log:
                chunk = await process.stderr.receive_some(4096)
                assert chunk, log.decode()
                log += chunk
            match = re.search(rb"serving on (http://127\.0\.0\.1:\d+)", log)
            assert match is not None
            ws_url = match.group(1).decode().replace("http", "ws", 1) + "/ws"
            async with ws_client(ws_url) as client:
                await client.chat(secret, id="r-json")
            process.send_signal(signal.SIGTERM)
            async for chunk in process.stderr:
                log += chunk
            assert await process.wait() == 0
        finally:
            if process.returncode is None:
                process.kill()
                await process.wait()
            await process.stderr.aclose()
    events = [json.loads(line) for line in log.decode().splitlines()]
    assert all({"ts", "level", "logger", "message"} <= event.keys() for event in events)
    started = [e for e in events if e.get("request_id") == "r-json" and "started" in e["message"]]
    assert started
    assert started[0]["path"] == "echo"
    assert any(e.get("client_id") for e in events)
    assert secret not in log.decode()
