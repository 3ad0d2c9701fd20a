"""A resume routed between workers, its two sides wired through memory instead of Redis, on the
autojump clock: one batch in flight until the client has room, probes that find the asker gone,
and a stream that breaks off (a batch lost, an owner fallen silent) ends with
``resume_interrupted``, never a silent gap."""

from __future__ import annotations

from typing import Any

import orjson
import pytest
import trio
import trio.testing

from aether.core.control.resume_routing import IncomingStream, OutgoingStream
from aether.core.runtime.outbox import Outbox
from aether.core.runtime.resumed_streams import AttachedStream, RemoteAttachment

PROBE_S = 1.0
LOST_AFTER_S = 3.0


class HeldRequest:
    """The owner's request, attached to the forwarding outbox."""

    def __init__(self, outbox: Outbox) -> None:
        self.outbox = outbox
        self.detached = False
        self.finished = False

    def sends_to(self, outbox: Outbox) -> bool:
        return not self.detached and outbox is self.outbox

    def detach(self) -> None:
        self.detached = True


def delta(seq: int, text: str) -> dict[str, Any]:
    return {"role": "assistant", "type": "message", "content": text, "id": "r1", "seq": seq}


class Wire:
    """Both workers' channels, in memory: what each side published, delivered in order."""

    def __init__(self) -> None:
        self.to_asker: list[dict[str, Any]] = []
        self.to_owner: list[dict[str, Any]] = []
        self.asker_listens = True
        self.incoming: IncomingStream | None = None
        self.outgoing: OutgoingStream | None = None

    async def publish(self, channel: str, message: bytes) -> int:
        await trio.lowlevel.checkpoint()
        decoded = orjson.loads(message)
        if not self.asker_listens:
            return 0
        self.to_asker.append(decoded)
        if self.incoming is not None and decoded["op"] in ("stream", "probe"):
            self.incoming.receive(decoded)
        return 1

    def tell_owner(self, worker: str, message: dict[str, Any]) -> None:
        self.to_owner.append(message)
        if self.outgoing is not None:
            if message["op"] == "ack":
                self.outgoing.acked(message["through"])
            elif message["op"] == "detach":
                self.outgoing.scope.cancel()


def routed(
    wire: Wire, client_budget: int = 1 << 20, window_bytes: int = 1 << 16
) -> tuple[Outbox, HeldRequest, Outbox, RemoteAttachment, IncomingStream, OutgoingStream]:
    owner_outbox = Outbox(1 << 20)
    held = HeldRequest(owner_outbox)
    source = AttachedStream("r1", owner_outbox, held)
    client_outbox = Outbox(client_budget)
    sink = RemoteAttachment("r1", client_outbox)
    incoming = IncomingStream("c1", "r1", sink, wire.tell_owner, lambda call: None, LOST_AFTER_S)
    incoming.owner_worker = "a"
    outgoing = OutgoingStream("c1", source, "aether:control:b", "a", window_bytes)
    wire.incoming, wire.outgoing = incoming, outgoing
    sink.routed = incoming
    return owner_outbox, held, client_outbox, sink, incoming, outgoing


async def test_a_window_of_bytes_is_in_flight_until_the_client_has_room(
    autojump_clock: Any,
) -> None:
    wire = Wire()
    owner, _held, client, _sink, incoming, outgoing = routed(
        wire, client_budget=100, window_bytes=256
    )
    async with trio.open_nursery() as nursery:
        nursery.start_soon(outgoing.forward, wire.publish, b'{"op": "reply"}', PROBE_S)
        nursery.start_soon(incoming.keep)
        owner.put_nowait(delta(0, "x" * 200), 200)  # over the window and the client's budget
        await trio.testing.wait_all_tasks_blocked()
        assert [m["op"] for m in wire.to_asker if m.get("op") == "stream"] == ["stream"]
        owner.put_nowait(delta(1, "second"), 6)
        await trio.sleep(5 * PROBE_S)  # the client reads nothing: no ack, no second batch
        assert sum(1 for m in wire.to_asker if m.get("op") == "stream") == 1
        assert not any(m["op"] == "ack" for m in wire.to_owner)
        assert [m["seq"] for m in client.take_all()] == [0]  # the client reads: room
        await trio.testing.wait_all_tasks_blocked()
        assert [m["op"] for m in wire.to_owner] == ["ack"]
        assert [m["seq"] for m in client.take_all()] == [1]
        owner.put_final([{"role": "server", "type": "completion", "id": "r1", "seq": 2}])
        await trio.testing.wait_all_tasks_blocked()
        assert [m["type"] for m in client.take_all()] == ["completion"]
    assert incoming.done
    assert wire.to_asker[-1]["end"] is True


async def test_a_client_that_keeps_up_costs_no_acknowledgements(autojump_clock: Any) -> None:
    """Within the window nothing waits and nothing is acknowledged: one publish per batch."""
    wire = Wire()
    owner, _held, client, _sink, incoming, outgoing = routed(wire)
    received: list[dict[str, Any]] = []
    async with trio.open_nursery() as nursery:
        nursery.start_soon(outgoing.forward, wire.publish, b'{"op": "reply"}', PROBE_S)
        nursery.start_soon(incoming.keep)
        for seq in range(200):
            owner.put_nowait(delta(seq, f"token {seq} "), 10)
            await trio.sleep(0.05)
            received += client.take_all()
        owner.put_final([{"role": "server", "type": "completion", "id": "r1", "seq": 200}])
        await trio.testing.wait_all_tasks_blocked()
        received += client.take_all()
    assert [m["seq"] for m in received] == list(range(201))
    assert sum(1 for m in wire.to_asker if m["op"] == "stream") == 201
    assert wire.to_owner == []


async def test_a_batch_lost_on_the_way_ends_the_stream_with_a_notice(autojump_clock: Any) -> None:
    wire = Wire()
    _owner, _held, client, sink, incoming, _outgoing = routed(wire)
    batch = {"op": "stream", "from": "a", "end": False, "ack": False}
    incoming.receive({**batch, "n": 0, "messages": [delta(0, "a")], "through": 65})
    incoming.receive({**batch, "n": 2, "messages": [delta(2, "c")], "through": 195})
    received = client.take_all()
    assert [m.get("seq") for m in received] == [0, None]
    notice = received[-1]
    assert (notice["code"], notice["id"], notice["ref"]) == (
        "resume_interrupted",
        None,
        {"type": "resume", "id": "r1"},
    )
    assert wire.to_owner == [{"op": "detach", "call": "c1"}]
    assert not sink.sends_to(client)


async def test_an_owner_that_falls_silent_ends_the_stream_at_the_lost_time(
    autojump_clock: Any,
) -> None:
    wire = Wire()
    _owner, _held, client, _sink, incoming, _outgoing = routed(wire)
    started = trio.current_time()
    await incoming.keep()
    assert trio.current_time() - started == pytest.approx(LOST_AFTER_S)
    assert [m["code"] for m in client.take_all()] == ["resume_interrupted"]


async def test_a_probe_nobody_hears_detaches_the_request(autojump_clock: Any) -> None:
    """The asking worker is gone: the owner's first probe finds no listener, and the request
    is detached (its resume grace starts)."""
    wire = Wire()
    owner, held, _client, _sink, _incoming, outgoing = routed(wire)
    started = trio.current_time()
    async with trio.open_nursery() as nursery:
        nursery.start_soon(outgoing.forward, wire.publish, b'{"op": "reply"}', PROBE_S)
        await trio.testing.wait_all_tasks_blocked()
        wire.asker_listens = False
    assert trio.current_time() - started == pytest.approx(PROBE_S)
    assert held.detached
    assert owner.closed


async def test_a_client_that_leaves_the_asker_detaches_the_request(autojump_clock: Any) -> None:
    wire = Wire()
    owner, held, _client, sink, _incoming, outgoing = routed(wire)
    async with trio.open_nursery() as nursery:
        nursery.start_soon(outgoing.forward, wire.publish, b'{"op": "reply"}', PROBE_S)
        await trio.testing.wait_all_tasks_blocked()
        sink.detach()  # the transport's doing, when its client goes
    assert wire.to_owner == [{"op": "detach", "call": "c1"}]
    assert held.detached
    assert owner.closed
