"""Resume: a client that lost its connection comes back (``resume``, ``after_seq``) and gets
every message of its request it had not received, once, in order, then the live stream. The
chat runs on meanwhile, for the grace; then it is stopped with reason ``disconnect``."""

from __future__ import annotations

from typing import Any

import pytest
import trio
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests.helpers import assert_stream_invariants, make_settings
from tests.memory_ws import MemoryServer, MemoryWebSocket

MESSAGE = "one two three four five six seven eight"
GRACE_S = 10.0


@pytest.fixture
async def server(nursery: trio.Nursery) -> MemoryServer:
    settings = make_settings(provider="echo", echo_token_delay_s=1.0, resume_grace_s=GRACE_S)
    server = MemoryServer(settings, nursery)
    await server.start()
    return server


async def connected(server: MemoryServer) -> MemoryWebSocket:
    return await server.connect()  # its hello read


async def received_through(ws: MemoryWebSocket, request_id: str, seq: int) -> None:
    while not any(m.get("seq", -1) >= seq for m in ws.messages.by_request.get(request_id, [])):
        await ws.receive()


async def uninterrupted(server: MemoryServer) -> list[dict[str, Any]]:
    ws = await connected(server)
    await ws.send({"type": "chat", "id": "whole", "message": MESSAGE})
    return await ws.finish("whole")


def without_id(messages: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [{k: v for k, v in m.items() if k != "id"} for m in messages]


def as_read(messages: list[dict[str, Any]]) -> list[tuple[Any, ...]]:
    """What a client makes of a stream: its blocks in order, each with its whole text, and its
    terminal. (Deltas that waited for a client are merged, as for any slow client.)"""
    shape: list[tuple[Any, ...]] = []
    for message in messages:
        if "content" in message and not message.get("start") and not message.get("end"):
            if shape and shape[-1][0] == "text":
                shape[-1] = ("text", shape[-1][1] + message["content"])
            else:
                shape.append(("text", message["content"]))
        else:
            shape.append(
                (message["role"], message["type"], message.get("start"), message.get("end"))
            )
    return shape


@pytest.mark.parametrize("dropped_after_seq", [0, 1, 2, 5, 9])
async def test_a_client_that_comes_back_gets_every_message_once(
    autojump_clock: Any, server: MemoryServer, dropped_after_seq: int
) -> None:
    first = await connected(server)
    await first.send({"type": "chat", "id": "r1", "message": MESSAGE})
    await received_through(first, "r1", dropped_after_seq)
    before = [m for m in first.messages.by_request["r1"] if m["seq"] <= dropped_after_seq]
    await first.disconnect()
    await trio.sleep(3)  # the chat runs on meanwhile
    second = await connected(server)
    await second.send({"type": "resume", "id": "r1", "after_seq": dropped_after_seq})
    after = await second.finish("r1")
    whole = await uninterrupted(server)
    assert assert_stream_invariants(before + after)["type"] == "completion"
    assert as_read(before + after) == as_read(whole)


async def test_a_chat_nobody_comes_back_for_stops_at_the_grace(
    autojump_clock: Any, server: MemoryServer
) -> None:
    await long_chat_dropped(server)
    gone_at = trio.current_time()
    await assert_stopped_at(server, gone_at + GRACE_S)


async def test_a_client_that_comes_back_and_leaves_again_gets_a_whole_new_grace(
    autojump_clock: Any, server: MemoryServer
) -> None:
    await long_chat_dropped(server)
    first_gone_at = trio.current_time()
    await trio.sleep(GRACE_S - 1)  # back just before the grace ends
    ws = await connected(server)
    await ws.send({"type": "resume", "id": "r1", "after_seq": 2})
    await received_through(ws, "r1", 3)
    await ws.disconnect()  # gone again before the first grace would have ended
    gone_again_at = trio.current_time()
    assert gone_again_at < first_gone_at + GRACE_S
    await assert_stopped_at(server, gone_again_at + GRACE_S)


async def long_chat_dropped(server: MemoryServer) -> None:
    """A long chat ``r1`` whose client drops after its message 2."""
    ws = await connected(server)
    await ws.send({"type": "chat", "id": "r1", "message": "word " * 100})
    await received_through(ws, "r1", 2)
    await ws.disconnect()


async def assert_stopped_at(server: MemoryServer, when: float) -> None:
    """``r1`` ends stopped, reason ``disconnect``, at ``when``."""
    await server.engine.tracker.wait_until_idle()
    record = server.engine.tracker.get("r1", "anonymous")
    assert record is not None
    assert (record.state, record.stop_reason) == ("stopped", "disconnect")
    assert record.ended_at == pytest.approx(when, abs=0.01)


async def test_a_second_resume_takes_the_stream_over(
    autojump_clock: Any, server: MemoryServer
) -> None:
    first = await connected(server)
    await first.send({"type": "chat", "id": "r1", "message": MESSAGE})
    await received_through(first, "r1", 3)
    second = await connected(server)
    await second.send({"type": "resume", "id": "r1", "after_seq": 3})
    after = await second.finish("r1")
    told = first.drain()
    notice = [m for m in told if m.get("code") == "resumed_elsewhere"]
    assert len(notice) == 1
    assert notice[0]["ref"] == {"type": "resume", "id": "r1"}
    assert [m["seq"] for m in after] == list(range(4, after[-1]["seq"] + 1))
    assert after[-1]["type"] == "completion"


async def test_an_unknown_or_foreign_request_cannot_be_resumed(
    autojump_clock: Any, server: MemoryServer
) -> None:
    ws = await connected(server)
    await ws.send({"type": "resume", "id": "nobody", "after_seq": 0})
    refused = await ws.receive()
    assert (refused["type"], refused["code"], refused["id"]) == ("error", "unknown_request", None)
    assert refused["ref"] == {"type": "resume", "id": "nobody"}


async def test_a_finished_chat_is_replayed_to_its_terminal(
    autojump_clock: Any, server: MemoryServer
) -> None:
    first = await connected(server)
    await first.send({"type": "chat", "id": "r1", "message": "one two"})
    whole = await first.finish("r1")
    await first.disconnect()
    second = await connected(server)
    await second.send({"type": "resume", "id": "r1", "after_seq": 1})
    replayed = await second.finish("r1")
    assert without_id(replayed) == without_id(whole[2:])


async def test_a_resume_from_before_what_was_kept_gets_the_text_as_a_snapshot(
    autojump_clock: Any, nursery: trio.Nursery
) -> None:
    settings = make_settings(
        provider="echo",
        echo_token_delay_s=1.0,
        resume_grace_s=GRACE_S,
        resume_log_max_bytes=1024,
    )
    server = MemoryServer(settings, nursery)
    await server.start()
    words = [f"word{index:03d}" for index in range(60)]
    first = await connected(server)
    await first.send({"type": "chat", "id": "r1", "message": " ".join(words)})
    # Read one by one (each delta its own message: far more than 1 KiB of them), but the
    # client remembers only up to seq 2 (say, a page that restored an old state).
    await received_through(first, "r1", 40)
    await first.disconnect()
    second = await connected(server)
    await second.send({"type": "resume", "id": "r1", "after_seq": 2})
    after = await second.finish("r1")
    snapshot = after[0]
    rest = after[1:]
    assert snapshot["type"] == "snapshot"
    assert snapshot["seq"] > 2
    assert [m["seq"] for m in after] == list(range(snapshot["seq"], after[-1]["seq"] + 1))
    # The snapshot is the answer's text so far: it replaces what the client had.
    text = snapshot["content"]
    text += "".join(m["content"] for m in rest if m["type"] == "message" and "content" in m)
    assert text.split() == words
    assert rest[-1]["type"] == "completion"


TERMINALS = {"completion", "stopped", "error"}


async def next_of(ws: MemoryWebSocket, request_id: str) -> dict[str, Any]:
    while True:
        message = await ws.receive()
        if message.get("id") == request_id:
            return message


@settings(
    max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(
    connections=st.lists(
        st.tuples(st.integers(min_value=0, max_value=8), st.integers(min_value=0, max_value=3)),
        max_size=4,
    )
)
async def test_a_client_dropped_at_any_points_ends_with_the_whole_stream(
    connections: list[tuple[int, int]],
) -> None:
    """Each connection reads some messages, then drops; the client comes back resuming after
    the last seq it kept, or after an earlier one (it forgot some: it then drops what it has
    past that seq). What it keeps in the end is the whole stream, each message once."""
    text = "alpha beta gamma delta epsilon zeta eta theta iota kappa"
    async with trio.open_nursery() as nursery:
        settings_ = make_settings(provider="echo", echo_token_delay_s=0.001, resume_grace_s=GRACE_S)
        server = MemoryServer(settings_, nursery)
        await server.start()
        ws = await server.connect()
        await ws.send({"type": "chat", "id": "r1", "message": text})
        kept: list[dict[str, Any]] = []
        for reads, forget in connections:
            for _ in range(reads):
                if kept and kept[-1]["type"] in TERMINALS:
                    break
                kept.append(await next_of(ws, "r1"))
            await ws.disconnect()
            after_seq = (kept[-1]["seq"] if kept else -1) - forget
            after_seq = max(after_seq, -1)
            kept = [m for m in kept if m["seq"] <= after_seq]
            ws = await server.connect()
            await ws.send({"type": "resume", "id": "r1", "after_seq": after_seq})
        while not kept or kept[-1]["type"] not in TERMINALS:
            kept.append(await next_of(ws, "r1"))
        whole_ws = await server.connect()
        await whole_ws.send({"type": "chat", "id": "whole", "message": text})
        whole = await whole_ws.finish("whole")
        nursery.cancel_scope.cancel()
    assert assert_stream_invariants(kept)["type"] == "completion"
    assert as_read(kept) == as_read(whole)


async def test_a_finished_chat_is_forgotten_after_the_retention(
    autojump_clock: Any, nursery: trio.Nursery
) -> None:
    settings = make_settings(
        provider="echo", echo_token_delay_s=0.1, resume_grace_s=GRACE_S, resume_retention_s=60
    )
    server = MemoryServer(settings, nursery)
    await server.start()
    ws = await connected(server)
    for request_id in ("early", "late"):
        await ws.send({"type": "chat", "id": request_id, "message": "one two"})
        await ws.finish(request_id)
        await trio.sleep(30)
    await trio.sleep(1)  # "early" ended 61 s ago, "late" 31 s ago
    await ws.send({"type": "resume", "id": "early", "after_seq": 0})
    await ws.send({"type": "resume", "id": "late", "after_seq": 0})
    refused = await ws.receive()
    while refused.get("id") == "late" or refused["type"] == "keepalive":
        refused = await ws.receive()
    replayed = await ws.finish("late")
    assert (refused["code"], refused["ref"]) == (
        "unknown_request",
        {"type": "resume", "id": "early"},
    )
    assert replayed[-1]["type"] == "completion"
    assert len(server.engine.resumable) == 1
