"""Two nodes behind nginx, the way deploy/ runs them: each a ``python -m aether`` process with
its own port and disk, both sharing a real Redis and a real PostgreSQL, and Debian's nginx with
the shipped site configuration in front. Everything on loopback, started and stopped here."""

from __future__ import annotations

import re
import signal
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import httpx
import pytest
import trio
from trio_websocket import ConnectionClosed, WebSocketConnection

from aether.testing.fake_llm import Behaviour, FakeLLM
from aether.testing.nginx_server import NginxServer, nginx_available
from aether.testing.redis_server import RedisServer
from tests.helpers import AetherProcess, aether_env, aether_process, needs_redis, ws_client
from tests.history_backends import PostgresBackend

pytestmark = [
    needs_redis,
    pytest.mark.skipif(not nginx_available(), reason="nginx is not installed (scripts/test does)"),
]
DEADLINE_S = 60
LONG = Behaviour(tokens=100_000, delay_s=0.01)


@asynccontextmanager
async def nginx_in_front(nodes: list[AetherProcess]) -> AsyncIterator[NginxServer]:
    ports = [int(node.base_url.rsplit(":", 1)[1]) for node in nodes]
    nginx = NginxServer(ports)
    await trio.to_thread.run_sync(nginx.start)
    try:
        yield nginx
    finally:
        await trio.to_thread.run_sync(nginx.close)


@asynccontextmanager
async def two_nodes(
    fake_llm: FakeLLM, redis: RedisServer, postgres: PostgresBackend
) -> AsyncIterator[list[AetherProcess]]:
    common = {
        "AETHER_PROVIDER": "http",
        "AETHER_LLM_BASE_URL": fake_llm.base_url,
        "AETHER_LLM_MODEL": "fake-model",
        "AETHER_REDIS_URL": redis.url,
        "AETHER_DATABASE_URL": postgres.url,
        "AETHER_TRUSTED_PROXIES": "127.0.0.1",
        "AETHER_WORKER_LEASE_S": "1",
    }
    async with (
        aether_process(aether_env(**common, AETHER_NODE_ID="node-a")) as a,
        aether_process(aether_env(**common, AETHER_NODE_ID="node-b")) as b,
    ):
        yield [a, b]


async def in_flight(node: AetherProcess) -> float:
    async with httpx.AsyncClient(base_url=node.base_url) as client:
        metrics = (await client.get("/metrics")).text
    return sum(
        float(value)
        for value in re.findall(r"^aether_requests_in_flight\{[^}]*\} ([0-9.]+)$", metrics, re.M)
    )


async def first_log(nodes: list[AetherProcess], pattern: bytes) -> AetherProcess:
    """The node whose log first shows ``pattern``."""
    found: list[AetherProcess] = []
    async with trio.open_nursery() as nursery:

        async def watch(node: AetherProcess) -> None:
            await node.wait_for_log(pattern)
            found.append(node)
            nursery.cancel_scope.cancel()

        for node in nodes:
            nursery.start_soon(watch, node)
    return found[0]


async def connection_lost(ws: WebSocketConnection) -> None:
    """Read until the connection drops (its server died)."""
    with pytest.raises(ConnectionClosed):  # noqa: PT012 - any number of frames first
        while True:
            await ws.get_message()


async def history(node: AetherProcess, conversation_id: str) -> list[dict[str, Any]]:
    async with httpx.AsyncClient(base_url=node.base_url) as client:
        answer = await client.get("/v1/chat/history", params={"conversation_id": conversation_id})
    assert answer.status_code == 200, answer.text
    messages: list[dict[str, Any]] = answer.json()["messages"]
    return messages


async def test_a_websocket_chat_on_one_node_is_stopped_through_nginx_on_the_other(
    fake_llm: FakeLLM, redis: RedisServer, postgres: PostgresBackend
) -> None:
    fake_llm.script(LONG, Behaviour(tokens=3), Behaviour(tokens=2))
    with trio.fail_after(DEADLINE_S):
        async with two_nodes(fake_llm, redis, postgres) as nodes, nginx_in_front(nodes) as nginx:
            async with (
                ws_client(nginx.ws_url) as client,
                httpx.AsyncClient(base_url=nginx.url) as rest,
            ):
                await client.send(
                    {"type": "chat", "id": "long", "message": "go", "conversation_id": "conv-n"}
                )
                await client.wait_for("long", lambda m: "tok3 " in m.get("content", ""))
                # nginx hands new requests to the nodes in turn: this one goes to the node
                # that does not hold the WebSocket, which routes the stop through Redis.
                stop = await rest.post("/v1/chat/long/stop")
                stopped = await client.finish("long")
            owner = await first_log(nodes, rb"stop of request long asked by worker")
            other = nodes[1 - nodes.index(owner)]
            await other.wait_for_log(rb"stop of request long done by worker")
            # History is one: what the owner wrote, the other node reads; and a follow-up on
            # the other node sees the first answer whole.
            seen = [await history(node, "conv-n") for node in nodes]
            async with httpx.AsyncClient(base_url=owner.base_url) as direct:
                first = await direct.post(
                    "/v1/chat", json={"message": "first", "conversation_id": "conv-n"}
                )
            async with httpx.AsyncClient(base_url=other.base_url) as direct:
                follow_up = await direct.post(
                    "/v1/chat", json={"message": "and then?", "conversation_id": "conv-n"}
                )
    assert stop.status_code == 202, stop.text
    assert stopped[-1]["type"] == "stopped"
    assert seen[0] == seen[1]
    assert [(m["role"], m["status"]) for m in seen[0]] == [
        ("user", "complete"),
        ("assistant", "stopped"),
    ]
    assert first.status_code == follow_up.status_code == 200
    context = fake_llm.streams[2].request["messages"]
    assert context[-3:] == [
        {"role": "user", "content": "first"},
        {"role": "assistant", "content": "tok0 tok1 tok2 "},
        {"role": "user", "content": "and then?"},
    ]


async def test_a_node_killed_loses_only_its_own_streams_and_its_answers_are_marked(
    fake_llm: FakeLLM, redis: RedisServer, postgres: PostgresBackend
) -> None:
    fake_llm.script(LONG, LONG, Behaviour(tokens=2))
    with trio.fail_after(DEADLINE_S):
        async with two_nodes(fake_llm, redis, postgres) as nodes, nginx_in_front(nodes) as nginx:
            async with ws_client(nginx.ws_url) as doomed:
                await doomed.send(
                    {"type": "chat", "id": "d1", "message": "go", "conversation_id": "c-dead"}
                )
                await doomed.wait_for("d1", lambda m: "tok3 " in m.get("content", ""))
                # Wait for a periodic save of the answer (once a second), then kill its node.
                running = [await in_flight(node) for node in nodes]
                victim = nodes[running.index(1.0)]
                survivor = nodes[1 - nodes.index(victim)]
                async with ws_client(survivor.ws_url) as bystander:
                    await bystander.send(
                        {"type": "chat", "id": "s1", "message": "go", "conversation_id": "c-live"}
                    )
                    await bystander.wait_for("s1", lambda m: "tok3 " in m.get("content", ""))
                    await doomed.wait_for("d1", lambda m: "tok150 " in m.get("content", ""))
                    victim.process.send_signal(signal.SIGKILL)
                    await connection_lost(doomed.ws)
                    # The client reconnects through nginx: it lands on the node still alive.
                    async with ws_client(nginx.ws_url) as back:
                        again = await back.chat("still there?", id="d2")
                    # The survivor's own stream never noticed.
                    await bystander.wait_for("s1", lambda m: "tok300 " in m.get("content", ""))
                    await bystander.send({"type": "stop", "id": "s1"})
                    await bystander.finish("s1")
            # Within two lease periods (1 s here) the survivor's sweep marks the dead node's
            # answer, and only it.
            await survivor.wait_for_log(rb"1 answers of expired writers marked interrupted")
            dead = await history(survivor, "c-dead")
            live = await history(survivor, "c-live")
    assert again[-1]["type"] == "completion"
    assert [(m["role"], m["status"]) for m in dead] == [
        ("user", "complete"),
        ("assistant", "interrupted"),
    ]
    assert dead[1]["content"].startswith("tok0 tok1 ")
    assert [m["status"] for m in live] == ["complete", "stopped"]
