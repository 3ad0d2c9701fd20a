"""`python -m aether` as a user runs it: a real process, a real port, a real signal."""

from __future__ import annotations

import json
import signal
import sqlite3
import subprocess
import sys
import time
from wsgiref.handlers import format_date_time

import httpx
import pytest
import trio

from aether.main import hypercorn_config
from tests.helpers import aether_env, aether_process, fresh_db_path, make_settings, ws_client


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
    env = aether_env(AETHER_ECHO_TOKEN_DELAY_S="0")
    with trio.fail_after(30):
        async with aether_process(env, b"built-in echo model") as server:
            async with httpx.AsyncClient(base_url=server.base_url) as client:
                assert (await client.get("/ready")).json()["default_path"] == "echo"
            async with ws_client(server.ws_url) as client:
                messages = await client.chat("hello echo", id="r1")
            assert "".join(m.get("content", "") for m in messages) == "hello echo"
            server.process.send_signal(signal.SIGTERM)
            assert await server.process.wait() == 0


async def test_json_logs_carry_ids_and_never_message_content() -> None:
    secret = "my-private-words-4711"
    env = aether_env(AETHER_ECHO_TOKEN_DELAY_S="0", AETHER_LOG_FORMAT="json")
    with trio.fail_after(30):
        async with aether_process(env) as server:
            async with ws_client(server.ws_url) as client:
                await client.chat(secret, id="r-json")
            server.process.send_signal(signal.SIGTERM)
            log = await server.read_log_to_end()
            assert await server.process.wait() == 0
    events = [json.loads(line) for line in log.decode().splitlines()]
    assert all({"ts", "level", "logger", "message"} <= event.keys() for event in events)
    started = [e for e in events if e.get("request_id") == "r-json" and "started" in e["message"]]
    assert started
    assert started[0]["path"] == "echo"
    assert any(e.get("client_id") for e in events)
    assert secret not in log.decode()


async def test_a_second_signal_stops_every_chat_at_once_with_its_terminal() -> None:
    """The first SIGTERM gives running chats the grace period (here 60 s); a second one stops
    them now: each client still gets its block end and `stopped`, then 1001, the answer is
    stored as stopped with what was sent, and the process exits 0."""
    db_path = fresh_db_path()
    env = aether_env(
        AETHER_DB_PATH=str(db_path), AETHER_ECHO_TOKEN_DELAY_S="0.05", AETHER_SHUTDOWN_GRACE_S="60"
    )
    with trio.fail_after(30):
        async with aether_process(env) as server:
            async with ws_client(server.ws_url) as client:
                await client.send({"type": "chat", "id": "long", "message": "word " * 2000})
                await client.wait_for("long", lambda m: m.get("content"))
                server.process.send_signal(signal.SIGTERM)
                going_away = await client.receive_control()
                assert going_away["type"] == "going_away"
                server.process.send_signal(signal.SIGTERM)
                messages = await client.finish("long")
                received = "".join(m.get("content", "") for m in messages)
            log = await server.read_log_to_end()
            assert await server.process.wait() == 0
    assert messages[-1]["type"] == "stopped"
    assert messages[-1]["reason"] == "shutdown"
    assert messages[-2].get("end") is True
    assert b"stopping every chat now" in log
    with sqlite3.connect(db_path) as db:
        rows = db.execute(
            "SELECT status, content FROM messages WHERE role = 'assistant' AND request_id = 'long'"
        ).fetchall()
    assert rows == [("stopped", received)]


async def test_a_mistyped_variable_is_named_in_the_log() -> None:
    env = aether_env(AETHER_PROT="9000")
    with trio.fail_after(30):
        async with aether_process(env) as server:
            server.process.send_signal(signal.SIGTERM)
            log = await server.read_log_to_end()
            assert await server.process.wait() == 0
    assert b"AETHER_PROT names no setting and is ignored: did you mean AETHER_PORT?" in log


def test_the_date_header_is_the_current_second_formatted_once(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    config = hypercorn_config(make_settings())
    now = [1_000_000.2]
    monkeypatch.setattr(time, "time", lambda: now[0])
    first = config.response_headers("h11")
    now[0] = 1_000_000.9
    same_second = config.response_headers("h11")
    now[0] = 1_000_001.0
    next_second = config.response_headers("h11")
    assert first == same_second == [(b"date", format_date_time(1_000_000).encode())]
    assert next_second == [(b"date", format_date_time(1_000_001).encode())]
