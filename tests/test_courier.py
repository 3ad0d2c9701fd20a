"""The control plane's courier: messages sent to one channel in one scheduling round, or while
the previous publish to it was on its way, leave in one publish, in order; each sender learns
how many listeners got its message; a failure reaches every sender of that publish; a sender
cancelled before its message left takes it back, and never loses another's."""

from __future__ import annotations

from typing import Any

import orjson
import pytest
import trio
import trio.testing

from aether.core.control.courier import Courier, unpacked
from aether.core.errors import ControlPlaneUnavailable


class Channels:
    """A publish that takes ``delay_s`` and records what each channel got."""

    def __init__(self, delay_s: float = 0.01, listeners: int = 1) -> None:
        self.delay_s = delay_s
        self.listeners = listeners
        self.published: list[tuple[str, list[Any]]] = []
        self.fail = False

    async def publish(self, channel: str, message: bytes) -> int:
        await trio.sleep(self.delay_s)
        if self.fail:
            raise ControlPlaneUnavailable("Redis is down")
        self.published.append((channel, unpacked(orjson.loads(message))))
        return self.listeners

    def got(self, channel: str) -> list[Any]:
        return [m for name, batch in self.published if name == channel for m in batch]


async def test_what_is_sent_in_one_round_leaves_in_one_publish(autojump_clock: Any) -> None:
    channels = Channels()
    courier = Courier(channels.publish)
    received: list[int] = []

    async def send(channel: str, number: int) -> None:
        received.append(await courier.send(channel, orjson.dumps({"n": number})))

    async with trio.open_nursery() as nursery:
        for number in range(10):
            nursery.start_soon(send, "b", number)
        nursery.start_soon(send, "c", 99)
    assert courier.publishes == 2  # one per channel
    # (Trio starts the senders in an order of its own.)
    assert sorted(m["n"] for m in channels.got("b")) == list(range(10))
    assert channels.got("c") == [{"n": 99}]
    assert received == [1] * 11


async def test_what_comes_during_a_publish_leaves_in_the_next_in_order(autojump_clock: Any) -> None:
    channels = Channels(delay_s=1.0)
    courier = Courier(channels.publish)

    async def sender(first: int) -> None:
        for number in range(first, first + 5):
            await courier.send("b", orjson.dumps(number))

    async with trio.open_nursery() as nursery:
        nursery.start_soon(sender, 0)
        await trio.sleep(0.5)  # the first publish is on its way
        nursery.start_soon(sender, 100)
    assert channels.got("b")[0] == 0
    assert sorted(channels.got("b")) == [*range(5), *range(100, 105)]
    # Each sender's messages in the order it sent them.
    got = channels.got("b")
    assert [n for n in got if n < 100] == list(range(5))
    assert [n for n in got if n >= 100] == list(range(100, 105))
    assert courier.publishes < 10


async def test_a_failed_publish_reaches_each_of_its_senders(autojump_clock: Any) -> None:
    channels = Channels()
    channels.fail = True
    courier = Courier(channels.publish)
    failures = 0

    async def send() -> None:
        nonlocal failures
        with pytest.raises(ControlPlaneUnavailable):
            await courier.send("b", b"1")
        failures += 1

    async with trio.open_nursery() as nursery:
        for _ in range(3):
            nursery.start_soon(send)
    assert failures == 3
    channels.fail = False
    assert await courier.send("b", b"2") == 1  # and the channel works again


async def test_a_cancelled_sender_takes_its_message_back_and_loses_no_others(
    autojump_clock: Any,
) -> None:
    channels = Channels(delay_s=1.0)
    courier = Courier(channels.publish)
    cancelled = trio.CancelScope()

    async def leaves_early() -> None:
        with cancelled:
            await courier.send("b", b"2")

    async with trio.open_nursery() as nursery:
        nursery.start_soon(courier.send, "b", b"1")
        await trio.testing.wait_all_tasks_blocked()  # "1" is being published
        nursery.start_soon(leaves_early)
        await trio.testing.wait_all_tasks_blocked()
        nursery.start_soon(courier.send, "b", b"3")
        await trio.testing.wait_all_tasks_blocked()
        cancelled.cancel()
    assert channels.got("b") == [1, 3]


async def test_a_leader_cancelled_mid_publish_still_delivers_everyone(
    autojump_clock: Any,
) -> None:
    channels = Channels(delay_s=1.0)
    courier = Courier(channels.publish)
    results: list[int] = []
    leader = trio.CancelScope()

    async def lead() -> None:
        with leader:
            await courier.send("b", b"1")

    async def follow() -> None:
        results.append(await courier.send("b", b"2"))

    async with trio.open_nursery() as nursery:
        nursery.start_soon(lead)
        nursery.start_soon(follow)
        await trio.sleep(0.5)  # both are in the publish on its way
        leader.cancel()
    # Both left in one publish (whichever Trio started first led it), the cancelled one's too.
    assert sorted(channels.got("b")) == [1, 2]
    assert courier.publishes == 1
    assert results == [1]
