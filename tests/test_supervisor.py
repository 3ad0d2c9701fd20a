"""`python -m aether --workers N` as a user runs it: real worker processes on one socket, a real
redis-server, real signals (SIGKILL to a worker, SIGTERM to the supervisor)."""

from __future__ import annotations

import os
import re
import signal
import socket
import subprocess
import sys
from contextlib import AsyncExitStack
from pathlib import Path

import httpx
import pytest
import trio
from trio_websocket import ConnectionClosed

from aether.supervisor import Supervisor
from aether.testing.redis_server import RedisServer
from tests.helpers import (
    AetherProcess,
    WSClient,
    aether_env,
    aether_process,
    make_settings,
    needs_redis,
    ws_client,
)
from tests.history_backends import HistoryBackend

pytestmark = needs_redis

# Enough connections that both workers get chats: the kernel hands each to one of them.
MAX_CONNECTIONS = 24
LONG_MESSAGE = "word " * 4000


async def chats_on_both_workers(
    server: AetherProcess, clients: AsyncExitStack
) -> dict[str, tuple[str, WSClient]]:
    """Long chats, each on a connection of its own, until each worker runs at least one:
    request id -> (the worker that runs it, from the log; its client)."""
    chats: dict[str, tuple[str, WSClient]] = {}
    for index in range(MAX_CONNECTIONS):
        client = await clients.enter_async_context(ws_client(server.ws_url))
        request_id = f"k{index}"
        await client.streaming(request_id, LONG_MESSAGE)
        [started] = await server.wait_for_log(
            rb"\[(w\d-\w+)\] \S+: request " + request_id.encode() + rb" started"
        )
        chats[request_id] = (started.group(1).decode(), client)
        if len({worker for worker, _ in chats.values()}) == 2:
            return chats
    raise AssertionError("one worker got every connection")


async def read_until_closed(client: WSClient) -> None:
    while True:
        await client.receive()


def test_several_workers_without_redis_refuse_to_start_with_one_line() -> None:
    result = subprocess.run(
        [sys.executable, "-m", "aether", "--workers", "2", "--port", "0"],
        env=aether_env(),
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert "AETHER_REDIS_URL" in lines[0]


async def test_a_killed_worker_is_replaced_and_only_its_answers_are_interrupted(
    redis: RedisServer, history_backend: HistoryBackend
) -> None:
    """The supervisor marks the dead worker's answers at once: in SQLite by its worker id, in
    PostgreSQL by its writer name (before its lease would run out)."""
    env = aether_env(
        AETHER_WORKERS="2",
        AETHER_REDIS_URL=redis.url,
        AETHER_ECHO_TOKEN_DELAY_S="0.02",
        AETHER_WORKER_LEASE_S="30",
        **history_backend.environment,
    )
    with trio.fail_after(60):
        async with aether_process(env) as server, AsyncExitStack() as clients:
            await server.wait_for_log(rb"serving on", count=2)
            chats = await chats_on_both_workers(server, clients)
            victim = chats["k0"][0]
            [spawned] = await server.wait_for_log(
                rb"worker " + victim.encode() + rb" started \(pid (\d+)\)"
            )
            os.kill(int(spawned.group(1)), signal.SIGKILL)

            # The victim's clients lose their connection; the other worker's streams go on.
            for request_id, (worker, client) in chats.items():
                if worker == victim:
                    with pytest.raises(ConnectionClosed):
                        await read_until_closed(client)
                else:
                    seen = len(client.messages.by_request[request_id])
                    await client.wait_for(request_id, lambda m, seen=seen: m["seq"] > seen + 3)
                    await client.send({"type": "stop", "id": request_id})
                    messages = await client.finish(request_id)
                    assert messages[-1]["type"] == "stopped", messages[-1]
            await server.wait_for_log(rb"answers of worker " + victim.encode() + rb" marked")
            # A new worker takes its place, and serves.
            await server.wait_for_log(rb"serving on", count=3)
            async with ws_client(server.ws_url) as late:
                await late.streaming("after", "hi")
                await late.send({"type": "stop", "id": "after"})
                await late.finish("after")

            server.process.send_signal(signal.SIGTERM)
            assert await server.process.wait() == 0
    log = server.log.decode()
    assert re.search(rf"worker {victim} \(pid \d+\) ended by itself \(signal SIGKILL\)", log)
    statuses = history_backend.answer_statuses()
    for request_id, (worker, _) in chats.items():
        assert statuses[request_id] == ("interrupted" if worker == victim else "stopped")


def completed_chats(exposition: str) -> float:
    match = re.search(
        r'^aether_requests_total\{(?=[^}]*outcome="completed")(?=[^}]*path="echo")[^}]*\} (\S+)$',
        exposition,
        re.MULTILINE,
    )
    assert match is not None, exposition
    return float(match.group(1))


async def test_metrics_count_the_chats_of_every_worker(redis: RedisServer) -> None:
    env = aether_env(AETHER_WORKERS="2", AETHER_REDIS_URL=redis.url, AETHER_ECHO_TOKEN_DELAY_S="0")
    with trio.fail_after(60):
        async with aether_process(env) as server:
            await server.wait_for_log(rb"serving on", count=2)
            workers: set[str] = set()
            chats = 0
            while len(workers) < 2 and chats < MAX_CONNECTIONS:
                request_id = f"m{chats}"
                async with httpx.AsyncClient(base_url=server.base_url) as client:  # a connection
                    response = await client.post(
                        "/v1/chat", json={"message": "hi", "id": request_id}
                    )
                assert response.status_code == 200
                chats += 1
                [ran] = await server.wait_for_log(
                    rb"\[(w\d-\w+)\] \S+: request " + request_id.encode() + rb" completed"
                )
                workers.add(ran.group(1).decode())
            assert len(workers) == 2, "one worker got every connection"
            scraped = []
            for _ in range(3):
                async with httpx.AsyncClient(base_url=server.base_url) as client:
                    scraped.append(completed_chats((await client.get("/metrics")).text))
            server.process.send_signal(signal.SIGTERM)
            assert await server.process.wait() == 0
    assert scraped == [chats] * 3


async def test_workers_drain_and_exit_when_the_supervisor_is_killed(redis: RedisServer) -> None:
    env = aether_env(AETHER_WORKERS="2", AETHER_REDIS_URL=redis.url)
    with trio.fail_after(60):
        async with aether_process(env) as server:
            await server.wait_for_log(rb"serving on", count=2)
            server.process.kill()
            # The workers write to the same log; it ends once both have exited.
            log = (await server.read_log_to_end()).decode()
    assert log.count("the supervisor is gone: shutting down") == 2
    assert len(re.findall(r"\[w\d-\w+\] aether: stopped", log)) == 2


class DyingSupervisor(Supervisor):
    """Its workers exit with status 3 as soon as they start."""

    def _command(self, worker_id: str) -> list[str]:
        return [sys.executable, "-c", "raise SystemExit(3)"]


async def test_a_worker_that_keeps_dying_young_stops_the_supervisor(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """Each death is logged and the worker started again after a pause; the fifth death in a
    row within YOUNG_S of its start stops every worker: exit 1."""
    settings = make_settings(workers=2, redis_url="redis://127.0.0.1:9/0", history=False)
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen()
        supervisor = DyingSupervisor(settings, [], listener, tmp_path)
        supervisor.restart_delay_s = supervisor.max_restart_delay_s = 0.01
        with trio.fail_after(60):
            code = await supervisor.run()
    assert code == 1
    assert supervisor.failed
    deaths = [r for r in caplog.records if "ended by itself (exit code 3)" in r.getMessage()]
    assert len(deaths) >= 5
    assert any("died 5 times" in r.getMessage() for r in caplog.records)


async def test_sigterm_drains_every_worker_and_each_chat_gets_its_terminal(
    redis: RedisServer,
) -> None:
    """As one server: the first SIGTERM tells every client `going_away` and gives running chats
    the grace period; a second stops them now, each with `stopped`; the supervisor exits 0."""
    env = aether_env(
        AETHER_WORKERS="2",
        AETHER_REDIS_URL=redis.url,
        AETHER_ECHO_TOKEN_DELAY_S="0.02",
        AETHER_SHUTDOWN_GRACE_S="60",
    )
    with trio.fail_after(60):
        async with aether_process(env) as server, AsyncExitStack() as clients:
            await server.wait_for_log(rb"serving on", count=2)
            chats = await chats_on_both_workers(server, clients)
            server.process.send_signal(signal.SIGTERM)
            for _, client in chats.values():
                going_away = await client.receive_control()
                assert going_away["type"] == "going_away"
            server.process.send_signal(signal.SIGTERM)
            ends = {
                request_id: await client.finish(request_id)
                for request_id, (_, client) in chats.items()
            }
            assert await server.process.wait() == 0
    for messages in ends.values():
        terminal = messages[-1]
        assert (terminal["type"], terminal["reason"]) == ("stopped", "shutdown")
