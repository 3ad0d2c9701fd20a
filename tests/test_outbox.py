"""The outbox and relay: coalescing while the writer lags, bounded memory, terminals that never
wait, and seqs that stay contiguous through all of it."""

from __future__ import annotations

from typing import Any

import pytest
import trio
import trio.testing

from aether.core.chat import block_delta, block_end, block_start
from aether.core.runtime.outbox import LEAD_ROUNDS, Outbox
from aether.core.runtime.relay import StreamRelay
from tests.helpers import assert_stream_invariants, content_of


async def drain(outbox: Outbox) -> list[dict[str, Any]]:
    return await outbox.get_batch()


async def test_deltas_coalesce_while_the_writer_lags() -> None:
    outbox = Outbox(max_bytes=1 << 20)
    relay = StreamRelay("r1", outbox)
    await relay.announce({"path": "echo"})
    await relay.relay_chunk(block_start())
    for token in ["a", "b", "c"]:
        await relay.relay_chunk(block_delta(token))
    await relay.relay_chunk(block_end())
    relay.finish({"role": "server", "type": "completion"})
    messages = await drain(outbox)
    assert [m["type"] for m in messages] == [
        "accepted",
        "message",
        "message",
        "message",
        "completion",
    ]
    assert messages[2]["content"] == "abc"
    assert outbox.messages_coalesced == 2
    assert assert_stream_invariants(messages)["type"] == "completion"


async def test_chunks_ready_together_reach_an_eager_writer_as_one_frame() -> None:
    # The writer takes each message the moment it can; deltas that were already waiting in the
    # channel together must still leave as one frame, not one scheduler round each.
    outbox = Outbox(max_bytes=1 << 20)
    relay = StreamRelay("r1", outbox)
    send, receive = trio.open_memory_channel[dict[str, Any]](8)
    frames: list[list[dict[str, Any]]] = []

    async def writer() -> None:
        while True:
            try:
                frames.append(await outbox.get_batch())
            except trio.EndOfChannel:
                return

    async def relay_then_finish() -> None:
        await relay.relay_stream(receive)
        outbox.finish()

    async with trio.open_nursery() as nursery:
        nursery.start_soon(writer)
        nursery.start_soon(relay_then_finish)
        send.send_nowait(block_start())
        await trio.testing.wait_all_tasks_blocked()  # the writer has sent the block's start
        for token in ["a", "b", "c", "d"]:
            send.send_nowait(block_delta(token))
        send.close()
    assert [[m.get("content") for m in batch] for batch in frames] == [[None], ["abcd"]]


async def test_a_streams_accepted_waits_a_little_for_what_follows_it() -> None:
    # ``accepted`` alone is not worth a socket write: it waits up to LEAD_ROUNDS scheduling
    # rounds for the stream's next messages, and leaves with them.
    outbox = Outbox(max_bytes=1 << 20)
    relay = StreamRelay("r1", outbox)
    batches: list[list[str]] = []

    async def writer() -> None:
        batches.append([m["type"] for m in await outbox.get_batch()])

    async with trio.open_nursery() as nursery:
        nursery.start_soon(writer)
        await trio.testing.wait_all_tasks_blocked()
        await relay.announce({"path": "echo"})
        for _ in range(LEAD_ROUNDS):
            await trio.lowlevel.checkpoint()
        await relay.relay_chunk(block_start())
    assert batches == [["accepted", "message"]]


async def test_other_messages_and_a_lone_accepted_are_not_held() -> None:
    outbox = Outbox(max_bytes=1 << 20)
    batches: list[list[str]] = []

    async def writer(count: int) -> None:
        for _ in range(count):
            batches.append([m["type"] for m in await outbox.get_batch()])

    with trio.fail_after(5):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(writer, 2)
            await trio.testing.wait_all_tasks_blocked()
            outbox.put_control({"role": "server", "type": "pong"})  # taken as the writer runs
            await trio.lowlevel.checkpoint()
            await trio.lowlevel.checkpoint()
            outbox.put_control({"role": "server", "type": "pong"})
        # Nothing follows this ``accepted``: it leaves after the rounds, alone.
        await StreamRelay("r1", outbox).announce({"path": "echo"})
        await writer(1)
    assert batches == [["pong"], ["pong"], ["accepted"]]


async def test_a_delta_already_taken_is_not_extended() -> None:
    outbox = Outbox(max_bytes=1 << 20)
    relay = StreamRelay("r1", outbox)
    await relay.relay_chunk(block_start())
    await relay.relay_chunk(block_delta("a"))
    first = await drain(outbox)
    await relay.relay_chunk(block_delta("b"))
    relay.finish({"role": "server", "type": "completion"})
    second = await drain(outbox)
    assert [m.get("content") for m in first + second] == [None, "a", "b", None, None]
    assert [m["seq"] for m in first + second] == [0, 1, 2, 3, 4]


async def test_interleaved_requests_coalesce_separately() -> None:
    outbox = Outbox(max_bytes=1 << 20)
    a, b = StreamRelay("a", outbox), StreamRelay("b", outbox)
    for relay in (a, b):
        await relay.relay_chunk(block_start())
    for token in ["1", "2"]:
        await a.relay_chunk(block_delta(token))
        await b.relay_chunk(block_delta(token.upper() + "!"))
    messages = await drain(outbox)
    by_id = {rid: [m for m in messages if m["id"] == rid] for rid in ("a", "b")}
    assert content_of(by_id["a"]) == "12"
    assert content_of(by_id["b"]) == "1!2!"


async def test_relay_waits_when_over_budget_and_a_stop_still_ends_it(
    autojump_clock: Any,
) -> None:
    outbox = Outbox(max_bytes=1024)
    relay = StreamRelay("r1", outbox)
    await relay.relay_chunk(block_start())
    await relay.relay_chunk(block_delta("x" * 2000))
    with trio.CancelScope() as scope:
        scope.deadline = trio.current_time() + 5
        await relay.relay_chunk(block_delta("more"))  # blocks: nobody reads
    assert scope.cancelled_caught
    assert trio.current_time() == 5
    relay.finish({"role": "server", "type": "stopped", "reason": "stop"})  # never blocks
    messages = await drain(outbox)
    assert assert_stream_invariants(messages)["type"] == "stopped"
    assert content_of(messages) == "x" * 2000


async def test_reading_makes_room_for_a_waiting_relay() -> None:
    outbox = Outbox(max_bytes=1024)
    relay = StreamRelay("r1", outbox)
    await relay.relay_chunk(block_start())
    await relay.relay_chunk(block_delta("x" * 2000))
    async with trio.open_nursery() as nursery:
        nursery.start_soon(relay.relay_chunk, block_end())
        await trio.testing.wait_all_tasks_blocked()
        assert outbox.pending_messages == 2
        first = await drain(outbox)
    relay.finish({"role": "server", "type": "completion"})
    rest = await drain(outbox)
    assert assert_stream_invariants(first + rest)["type"] == "completion"


async def test_control_messages_are_bounded() -> None:
    outbox = Outbox(max_bytes=1024, max_control_messages=3)
    assert all(outbox.put_control({"type": "pong"}) for _ in range(3))
    assert not outbox.put_control({"type": "pong"})
    assert len(await drain(outbox)) == 3
    assert outbox.put_control({"type": "pong"})


async def test_closed_outbox_refuses_stream_messages() -> None:
    outbox = Outbox(max_bytes=1024)
    outbox.close()
    relay = StreamRelay("r1", outbox)
    with pytest.raises(trio.BrokenResourceError):
        await relay.relay_chunk(block_start())
    relay.finish({"role": "server", "type": "completion"})  # dropped, no error
    assert outbox.pending_messages == 0


async def test_a_relay_waiting_for_room_queues_nothing_once_sealed() -> None:
    """A stop seals the turn while its relay waits for room: the chunk it was about to queue
    must not follow the terminal, whichever task runs first once room is made."""
    outbox = Outbox(max_bytes=1024)
    relay = StreamRelay("r1", outbox)
    await relay.relay_chunk(block_start())
    await relay.relay_chunk(block_delta("x" * 1024))  # past the limit: the next one waits
    async with trio.open_nursery() as nursery:
        nursery.start_soon(relay.relay_chunk, block_delta("late"))
        await trio.testing.wait_all_tasks_blocked()
        assert outbox.stalled.value
        relay.finish({"role": "server", "type": "stopped", "reason": "stop"})
        first = await drain(outbox)  # makes room: the waiting relay wakes
    messages = first
    assert [m.get("content") for m in messages if "content" in m] == ["x" * 1024]
    assert messages[-1]["type"] == "stopped"
    assert assert_stream_invariants(messages)["type"] == "stopped"
    assert outbox.pending_messages == 0
