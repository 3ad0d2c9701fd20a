"""Several workers sharing one Redis: two Aether servers on two ports, one real redis-server.

Where a request lands does not matter to a client: a chat running on one worker is stopped or
approved through the other, the per-caller limit counts both, and an id no worker runs is a 404.
Redis stopped mid-stream: streams carry on, a routed stop answers 503, a local stop works, and
routing comes back by itself once Redis does.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import httpx
import pytest
import trio
import trio.testing

from aether.core.control.redis_plane import RedisControlPlane
from aether.testing.fake_llm import Behaviour, FakeLLM
from aether.testing.redis_server import RedisServer
from tests.helpers import (
    RunningServer,
    WSClient,
    assert_stream_invariants,
    console_of,
    http_settings,
    needs_oi,
    needs_redis,
    oi_settings,
    running_server,
    websocket_handshake_status,
    ws_client,
)

pytestmark = needs_redis

DEADLINE_S = 15
# Code the model proposes on the agentic path.
CODE = ("Let me.\n", "```", "python\n", "print('ran on a')\n", "```", "\n")
# A stream long enough to be stopped mid-way.
LONG = Behaviour(tokens=2000, delay_s=0.005)


@asynccontextmanager
async def two_workers(
    fake: FakeLLM, redis: RedisServer, **overrides: Any
) -> AsyncIterator[tuple[RunningServer, RunningServer]]:
    """Two servers of one Aether: one Redis, one history file."""
    settings = http_settings(fake, redis_url=redis.url, workers=2, **overrides)
    async with running_server(settings) as a, running_server(settings) as b:
        yield a, b


@asynccontextmanager
async def chat_on_a_rest_on_b(
    fake: FakeLLM, redis: RedisServer
) -> AsyncIterator[tuple[RunningServer, RunningServer, WSClient, httpx.AsyncClient]]:
    """Two workers, a WebSocket client of the first and a REST client of the second."""
    async with (
        two_workers(fake, redis) as (a, b),
        ws_client(a.ws_url) as client,
        httpx.AsyncClient(base_url=b.base_url) as rest,
    ):
        yield a, b, client, rest


def plane(server: RunningServer) -> RedisControlPlane:
    control = server.state.engine.control
    assert isinstance(control, RedisControlPlane)
    return control


async def test_a_chat_on_one_worker_is_stopped_through_the_other(
    fake_llm: FakeLLM, redis: RedisServer
) -> None:
    fake_llm.script(*[LONG] * 4)
    with trio.fail_after(DEADLINE_S):
        async with chat_on_a_rest_on_b(fake_llm, redis) as (_a, b, client, rest):
            await client.streaming("r1", "hi")
            response = await rest.post("/v1/chat/r1/stop")
            messages = await client.finish("r1")
            assert b.state.engine.tracker.get("r1", "anonymous") is None  # never ran on b
            record = await fake_llm.wait_for_stream(0)
            await record.closed.wait()  # a closed the upstream
    assert response.status_code == 202, response.text
    terminal = assert_stream_invariants(messages)
    assert terminal["type"] == "stopped"
    assert terminal["reason"] == "stop"


async def test_a_stop_frame_on_another_connection_reaches_the_other_worker(
    fake_llm: FakeLLM, redis: RedisServer
) -> None:
    fake_llm.script(*[LONG] * 4)
    with trio.fail_after(DEADLINE_S):
        async with (
            two_workers(fake_llm, redis) as (a, b),
            ws_client(a.ws_url) as chatting,
            ws_client(b.ws_url) as stopping,
        ):
            await chatting.streaming("r2", "hi")
            await stopping.send({"type": "stop", "id": "r2"})
            messages = await chatting.finish("r2")
    assert assert_stream_invariants(messages)["type"] == "stopped"


async def test_an_id_no_worker_runs_is_unknown_everywhere(
    fake_llm: FakeLLM, redis: RedisServer
) -> None:
    with trio.fail_after(DEADLINE_S):
        async with chat_on_a_rest_on_b(fake_llm, redis) as (_a, _b, client, rest):
            response = await rest.post("/v1/chat/nobody/stop")
            await client.send({"type": "stop", "id": "nobody"})
            error = await client.receive_control()
    assert response.status_code == 404
    assert response.json()["error"]["code"] == "unknown_request"
    assert error["code"] == "unknown_request"
    assert error["ref"] == {"type": "stop", "id": "nobody"}


async def test_an_approval_is_answered_by_the_worker_that_runs_the_chat(
    fake_llm: FakeLLM, redis: RedisServer
) -> None:
    # The chat on a has no pending confirmation: a's own answer (stale) comes back through b.
    fake_llm.script(*[LONG] * 4)
    with trio.fail_after(DEADLINE_S):
        async with chat_on_a_rest_on_b(fake_llm, redis) as (_a, _b, client, rest):
            await client.streaming("r3", "hi")
            response = await rest.post(
                "/v1/chat/r3/approve", json={"confirmation_id": "k1", "approved": True}
            )
            await client.send({"type": "stop", "id": "r3"})
            await client.finish("r3")
    assert response.status_code == 409, response.text
    assert response.json()["error"]["code"] == "stale_confirmation"


@needs_oi
@pytest.mark.parametrize("through", ["rest", "websocket"])
async def test_code_proposed_on_one_worker_is_approved_through_the_other(
    fake_llm: FakeLLM, redis: RedisServer, collect_garbage_after: None, through: str
) -> None:
    """The approval lands on b: as POST /v1/chat/<id>/approve, or as an `approve` frame on a
    connection of b (the caller's other tab, say)."""
    fake_llm.script(Behaviour(reply=CODE), Behaviour(reply="Done."))
    settings = oi_settings(fake_llm, redis_url=redis.url, workers=2)
    with trio.fail_after(60):
        async with (
            running_server(settings) as a,
            running_server(settings) as b,
            ws_client(a.ws_url) as client,
            ws_client(b.ws_url) as other_tab,
            httpx.AsyncClient(base_url=b.base_url) as rest,
        ):
            await client.send({"type": "chat", "id": "x1", "message": "go"})
            confirmation = await client.wait_for("x1", lambda m: m["type"] == "confirmation")
            if through == "rest":
                answer = {"confirmation_id": confirmation["confirmation_id"], "approved": True}
                approved = await rest.post("/v1/chat/x1/approve", json=answer)
                assert approved.status_code == 202, approved.text
            else:
                await other_tab.answer(confirmation, approved=True)
            messages = await client.finish("x1")
    assert "ran on a" in console_of(messages)
    assert assert_stream_invariants(messages)["type"] == "completion"


async def test_the_per_caller_limit_counts_every_worker(
    fake_llm: FakeLLM, redis: RedisServer
) -> None:
    fake_llm.script(*[LONG] * 4)
    with trio.fail_after(DEADLINE_S):
        async with (
            two_workers(fake_llm, redis, max_requests_per_caller=2) as (a, b),
            ws_client(a.ws_url) as on_a,
            ws_client(b.ws_url) as on_b,
        ):
            for request_id in ("l1", "l2"):
                await on_a.streaming(request_id, "hi")
            await on_b.send({"type": "chat", "id": "l3", "message": "hi"})
            refused = await on_b.receive_control()
            # A duplicate id is refused across workers too.
            await on_b.send({"type": "chat", "id": "l1", "message": "hi"})
            duplicate = await on_b.receive_control()
            # Once one ends, the other worker may start one.
            await on_a.send({"type": "stop", "id": "l1"})
            await on_a.finish("l1")
            await trio.testing.wait_all_tasks_blocked()  # l1's turn closed on a
            await plane(a).flush_releases()
            await on_b.streaming("l4", "hi")
            for client, request_id in ((on_a, "l2"), (on_b, "l4")):
                await client.send({"type": "stop", "id": request_id})
                await client.finish(request_id)
    assert refused["code"] == "too_many_requests", refused
    assert duplicate["code"] == "duplicate_request", duplicate


async def test_a_follow_up_on_another_worker_sees_the_whole_previous_answer(
    fake_llm: FakeLLM, redis: RedisServer
) -> None:
    """A streamed answer's final save follows its terminal: a follow-up sent at once to another
    worker waits for that save (the first worker says when), then reads the history."""
    fake_llm.script(Behaviour(tokens=5, delay_s=0.01), Behaviour(tokens=1))
    saves_held, asked = trio.Event(), trio.Event()
    with trio.fail_after(DEADLINE_S):
        async with (
            two_workers(fake_llm, redis) as (a, b),
            ws_client(a.ws_url) as on_a,
            ws_client(b.ws_url) as on_b,
        ):
            store, engine = a.state.engine.history, a.state.engine
            assert store is not None
            write_answers, wait_saved = store.write_answers, engine.wait_saved

            async def held_write(writes: Any) -> Any:
                if any(w.start is None and w.status != "streaming" for w in writes):
                    with trio.move_on_after(DEADLINE_S):  # the writer is shielded: bounded
                        await saves_held.wait()
                return await write_answers(writes)

            async def observed_wait(owner: str, conversation_id: str) -> None:
                asked.set()
                await wait_saved(owner, conversation_id)

            store.write_answers = held_write  # type: ignore[method-assign]
            engine.wait_saved = observed_wait  # type: ignore[method-assign]
            first = await on_a.chat("first question", id="f1")
            conversation_id = first[0]["conversation_id"]
            await on_b.send(
                {
                    "type": "chat",
                    "id": "f2",
                    "message": "second",
                    "conversation_id": conversation_id,
                }
            )
            await asked.wait()  # b asked a, whose save is held
            assert len(fake_llm.streams) == 1  # so b's turn has not read its context yet
            saves_held.set()
            second = await on_b.finish("f2")
    assert assert_stream_invariants(second)["type"] == "completion"
    context = [(m["role"], m["content"]) for m in fake_llm.streams[1].request["messages"]]
    assert context[-3:] == [
        ("user", "first question"),
        ("assistant", "tok0 tok1 tok2 tok3 tok4 "),
        ("user", "second"),
    ]


async def test_the_per_ip_rate_limit_counts_every_worker(
    fake_llm: FakeLLM, redis: RedisServer
) -> None:
    fake_llm.script(*[Behaviour(tokens=1)] * 6)
    with trio.fail_after(DEADLINE_S):
        async with (
            two_workers(fake_llm, redis, rate_limit_chat_per_minute=3) as (a, b),
            httpx.AsyncClient(base_url=a.base_url) as on_a,
            httpx.AsyncClient(base_url=b.base_url) as on_b,
        ):
            statuses = [
                (await client.post("/v1/chat", json={"message": "hi"})).status_code
                for client in (on_a, on_b, on_a, on_b, on_a, on_b)
            ]
            await redis.stop()
            # Redis away: each worker allows its share (3 // 2 = 1) in a bucket of its own.
            fallback = [
                (await on_a.post("/v1/chat", json={"message": "hi"})).status_code for _ in range(2)
            ]
    assert statuses == [200, 200, 200, 429, 429, 429]
    assert fallback == [200, 429]


async def test_the_per_ip_connection_limit_counts_every_worker(
    fake_llm: FakeLLM, redis: RedisServer
) -> None:
    with trio.fail_after(DEADLINE_S):
        async with two_workers(fake_llm, redis, max_connections_per_ip=2) as (a, b):
            async with ws_client(a.ws_url), ws_client(b.ws_url):
                refused = await websocket_handshake_status(a.ws_url)
            for server in (a, b):  # the connections' ends, told to Redis
                await trio.testing.wait_all_tasks_blocked()
                await plane(server).flush_releases()
            accepted = await websocket_handshake_status(b.ws_url)
    assert refused == 429
    assert accepted == 101


async def test_redis_down_mid_stream_then_back(fake_llm: FakeLLM, redis: RedisServer) -> None:
    fake_llm.script(*[LONG] * 4)
    with trio.fail_after(DEADLINE_S):
        async with chat_on_a_rest_on_b(fake_llm, redis) as (a, b, client, rest):
            await client.send({"type": "chat", "id": "d1", "message": "hi"})
            await client.streaming("d2", "hi")
            await redis.stop()
            # Routing cannot tell who runs it: 503, not a false 404.
            unavailable = await rest.post("/v1/chat/d1/stop")
            not_ready = await rest.get("/ready")
            # The stream carries on, and a stop on its own worker still works.
            count = len(client.messages.by_request["d1"])
            await client.wait_for("d1", lambda m: m["seq"] > count + 5)
            await client.send({"type": "stop", "id": "d1"})
            stopped_locally = await client.finish("d1")
            # Redis back (empty): the worker registers its running chat again by itself.
            await redis.restart()
            for server in (a, b):  # what their next lease refresh does
                await plane(server).refresh_lease()
            await plane(a).wait_subscribed()
            routed = await rest.post("/v1/chat/d2/stop")
            stopped_through_b = await client.finish("d2")
            ready = await rest.get("/ready")
    assert unavailable.status_code == 503, unavailable.text
    assert unavailable.json()["error"]["code"] == "control_plane_unavailable"
    assert not_ready.status_code == 503
    assert assert_stream_invariants(stopped_locally)["type"] == "stopped"
    assert routed.status_code == 202, routed.text
    assert assert_stream_invariants(stopped_through_b)["type"] == "stopped"
    assert ready.status_code == 200
