"""Resume across workers: two Aether servers, one real redis-server. A client whose connection
dropped comes back on the other worker (as a load balancer may send it) and gets every message
once, in order, then the live stream: over WebSocket and over server-sent events, for a running
chat and an ended one, with takeovers and a resuming client that leaves again."""

from __future__ import annotations

import json
from typing import Any

import httpx
import trio

from aether.testing.fake_llm import Behaviour, FakeLLM
from aether.testing.redis_server import RedisServer
from tests.helpers import (
    RunningServer,
    WSClient,
    assert_stream_invariants,
    content_of,
    needs_redis,
    ws_client,
)
from tests.test_resume_sse import read_all
from tests.test_workers import plane, two_workers

pytestmark = needs_redis

DEADLINE_S = 20
TOKENS = 80
WHOLE = "".join(f"tok{index} " for index in range(TOKENS))
SLOW = Behaviour(tokens=TOKENS, delay_s=0.01)
GRACE = {"resume_grace_s": 10.0}


async def received_through(client: WSClient, request_id: str, seq: int) -> list[dict[str, Any]]:
    """Read until the request's message ``seq`` (or later) came; its messages so far."""
    await client.wait_for(request_id, lambda m: m["seq"] >= seq)
    return list(client.messages.by_request[request_id])


async def dropped_after(server: RunningServer, seq: int) -> list[dict[str, Any]]:
    """Start chat ``r1`` on ``server`` and drop the connection once message ``seq`` came; what
    the client got."""
    async with ws_client(server.ws_url) as client:
        await client.send({"type": "chat", "id": "r1", "message": "go"})
        return await received_through(client, "r1", seq)


async def test_a_chat_dropped_on_one_worker_resumes_on_the_other(
    fake_llm: FakeLLM, redis: RedisServer
) -> None:
    fake_llm.script(SLOW)
    with trio.fail_after(DEADLINE_S):
        async with two_workers(fake_llm, redis, **GRACE) as (a, b):
            before = await dropped_after(a, 5)
            async with ws_client(b.ws_url) as second:
                await second.send({"type": "resume", "id": "r1", "after_seq": before[-1]["seq"]})
                after = await second.finish("r1")
            assert b.state.engine.tracker.get("r1", "anonymous") is None  # it ran on a
    assert assert_stream_invariants(before + after)["type"] == "completion"
    assert content_of(before + after) == WHOLE
    assert fake_llm.streams[0].outcome == "completed"


async def test_an_ended_chat_is_replayed_by_the_worker_that_keeps_it(
    fake_llm: FakeLLM, redis: RedisServer
) -> None:
    """Once ended (its live entry released), the chat is found by its retention key."""
    fake_llm.script(Behaviour(tokens=6))
    with trio.fail_after(DEADLINE_S):
        async with (
            two_workers(fake_llm, redis, **GRACE) as (a, b),
            httpx.AsyncClient(base_url=b.base_url) as rest,
        ):
            async with ws_client(a.ws_url) as first:
                whole = await first.chat("go", id="r1")
            await plane(a).flush_releases()
            async with ws_client(b.ws_url) as second:
                await second.send({"type": "resume", "id": "r1", "after_seq": 2})
                replayed = await second.finish("r1")
            events = await rest.get("/v1/chat/r1/events", params={"after_seq": 2})
            done = await rest.get("/v1/chat/r1/events", params={"after_seq": whole[-1]["seq"]})
    assert replayed == whole[3:]
    sse = [json.loads(line[6:]) for line in events.text.splitlines() if line[:6] == "data: "]
    assert sse == whole[3:]
    assert done.status_code == 204


async def test_a_resume_on_the_other_worker_takes_the_stream_over(
    fake_llm: FakeLLM, redis: RedisServer
) -> None:
    fake_llm.script(SLOW)
    with trio.fail_after(DEADLINE_S):
        async with (
            two_workers(fake_llm, redis, **GRACE) as (a, b),
            ws_client(a.ws_url) as first,
            ws_client(b.ws_url) as second,
        ):
            await first.send({"type": "chat", "id": "r1", "message": "go"})
            before = await received_through(first, "r1", 5)
            last = before[-1]["seq"]
            await second.send({"type": "resume", "id": "r1", "after_seq": last})
            notice = await first.receive_control()
            after = await second.finish("r1")
    assert (notice["code"], notice["ref"]) == ("resumed_elsewhere", {"type": "resume", "id": "r1"})
    got = [m for m in first.messages.by_request["r1"] if m["seq"] <= last] + after
    assert assert_stream_invariants(got)["type"] == "completion"
    assert content_of(got) == WHOLE


async def test_a_resumed_client_that_leaves_again_can_come_back_anywhere(
    fake_llm: FakeLLM, redis: RedisServer
) -> None:
    """The client on b leaves: a detaches the chat (it runs on for the grace), and the client
    comes back on a itself, after the last message b forwarded to it."""
    fake_llm.script(SLOW)
    with trio.fail_after(DEADLINE_S):
        async with two_workers(fake_llm, redis, **GRACE) as (a, b):
            part1 = await dropped_after(a, 3)
            async with ws_client(b.ws_url) as second:
                await second.send({"type": "resume", "id": "r1", "after_seq": part1[-1]["seq"]})
                part2 = await received_through(second, "r1", part1[-1]["seq"] + 10)
            async with ws_client(a.ws_url) as third:
                await third.send({"type": "resume", "id": "r1", "after_seq": part2[-1]["seq"]})
                part3 = await third.finish("r1")
    got = part1 + part2 + part3
    assert assert_stream_invariants(got)["type"] == "completion"
    assert content_of(got) == WHOLE
    assert fake_llm.streams[0].outcome == "completed"


async def test_an_event_stream_resumes_on_the_other_worker(
    fake_llm: FakeLLM, redis: RedisServer
) -> None:
    fake_llm.script(SLOW)
    with trio.fail_after(DEADLINE_S):
        async with (
            two_workers(fake_llm, redis, **GRACE) as (a, b),
            httpx.AsyncClient(base_url=b.base_url) as rest,
        ):
            before = await dropped_after(a, 5)
            async with rest.stream(
                "GET", "/v1/chat/r1/events", headers={"Last-Event-ID": str(before[-1]["seq"])}
            ) as resumed:
                assert resumed.status_code == 200
                after = await read_all(resumed)
    assert assert_stream_invariants(before + after)["type"] == "completion"
    assert content_of(before + after) == WHOLE


async def test_an_id_no_worker_keeps_cannot_be_resumed_anywhere(
    fake_llm: FakeLLM, redis: RedisServer
) -> None:
    with trio.fail_after(DEADLINE_S):
        async with (
            two_workers(fake_llm, redis, **GRACE) as (_a, b),
            ws_client(b.ws_url) as client,
            httpx.AsyncClient(base_url=b.base_url) as rest,
        ):
            await client.send({"type": "resume", "id": "nobody", "after_seq": -1})
            error = await client.receive_control()
            response = await rest.get("/v1/chat/nobody/events")
    assert (error["code"], error["ref"]) == ("unknown_request", {"type": "resume", "id": "nobody"})
    assert response.status_code == 404
