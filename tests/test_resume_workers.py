"""Resume across workers: two Aether servers, one real redis-server. A client whose connection
dropped comes back on the other worker (as a load balancer may send it) and gets every message
once, in order, then the live stream: over WebSocket and over server-sent events, for a running
chat and an ended one, with takeovers and a resuming client that leaves again."""

from __future__ import annotations

import json
from typing import Any

import httpx
import trio
from hypothesis import given, settings
from hypothesis import strategies as st

from aether.testing.fake_llm import Behaviour, FakeLLM
from aether.testing.redis_server import RedisServer
from tests.helpers import (
    TERMINALS,
    RunningServer,
    WSClient,
    assert_stream_invariants,
    content_of,
    make_settings,
    needs_redis,
    running_server,
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


TEXT = "alpha beta gamma delta epsilon zeta eta theta iota kappa lambda mu"


@settings(max_examples=8, deadline=None)
@given(
    connections=st.lists(
        st.tuples(
            st.integers(min_value=0, max_value=8),  # messages read before the drop
            st.integers(min_value=0, max_value=3),  # how many of them the client forgets
            st.booleans(),  # whether it comes back on the other worker
        ),
        min_size=1,
        max_size=4,
    )
)
async def test_a_client_dropped_at_any_points_on_any_workers_ends_with_the_whole_stream(
    connections: list[tuple[int, int, bool]],
) -> None:
    """As the single-worker property test (``test_resume.py``), with each new connection on
    either of two workers sharing a real Redis: what the client keeps in the end is the whole
    stream, each message once."""
    redis = RedisServer()
    with trio.fail_after(DEADLINE_S):
        async with trio.open_nursery() as nursery:
            await nursery.start(redis.run)
            settings_ = make_settings(
                provider="echo",
                echo_token_delay_s=0.01,
                redis_url=redis.url,
                workers=2,
                resume_grace_s=10,
            )
            async with running_server(settings_) as a, running_server(settings_) as b:
                workers = [a, b]
                on = 0
                kept: list[dict[str, Any]] = []
                async with ws_client(a.ws_url) as client:
                    await client.send({"type": "chat", "id": "r1", "message": TEXT})
                    kept += await read_some(client, 0, connections[0][0])
                after_seq = -1
                for index, (_reads, forget, other) in enumerate(connections):
                    after_seq = max((kept[-1]["seq"] if kept else -1) - forget, -1)
                    kept = [m for m in kept if m["seq"] <= after_seq]
                    on = 1 - on if other else on
                    async with ws_client(workers[on].ws_url) as client:
                        await client.send({"type": "resume", "id": "r1", "after_seq": after_seq})
                        if kept and kept[-1]["type"] in TERMINALS:
                            continue  # it has it all: nothing comes (an ended chat's resume)
                        if index + 1 < len(connections):
                            kept += await read_some(
                                client, after_seq + 1, connections[index + 1][0]
                            )
                        else:
                            kept += await client.finish("r1")
                async with ws_client(a.ws_url) as client:
                    whole = await client.chat(TEXT, id="whole")
            nursery.cancel_scope.cancel()
    assert assert_stream_invariants(kept)["type"] == "completion"
    assert content_of(kept) == content_of(whole)


async def read_some(client: WSClient, first_seq: int, count: int) -> list[dict[str, Any]]:
    """Up to ``count`` messages of ``r1`` (fewer if its terminal comes first)."""
    got: list[dict[str, Any]] = []
    while len(got) < count and not (got and got[-1]["type"] in TERMINALS):
        message = await client.receive()
        if message.get("id") == "r1":
            got.append(message)
    assert not got or got[0]["seq"] == first_seq
    return got
