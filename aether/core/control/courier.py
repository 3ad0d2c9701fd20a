"""Courier: what a worker publishes to another's channel in one scheduling round (or while the
previous publish to it was on its way) leaves in one publish, a JSON array of the messages.

Forwarded resumes put one message per batch on the way to the worker whose client resumed,
and a publish costs the sender a round trip and both sides a parse and a dispatch whatever
its size: forwarding many streams to one worker, one publish per round instead of one per
stream is what keeps the cost per delta near an uninterrupted stream's. The receiver unpacks
an array into its messages, in order; a channel's messages keep the order they were sent in.

The first sender to a channel leads: it yields one round (what else is sent meanwhile rides
along), publishes, and tells each sender how many listeners got it. Senders that come while
it publishes wait; the first of them leads the next publish. A publish is shielded once it
has begun (it is short: Redis' command timeout bounds it), so a cancelled sender never loses
the messages of others; a sender cancelled before its message left takes it back.

@.architecture
role: control plane courier
jobs: [message_routing]
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable

import trio

from aether.core.errors import ControlPlaneUnavailable

# Publish bytes on a channel; how many listeners got them. Raises ControlPlaneUnavailable.
Publish = Callable[[str, bytes], Awaitable[int]]


class _Parcel:
    __slots__ = ("error", "lead", "message", "ready", "received")

    def __init__(self, message: bytes) -> None:
        self.message = message
        self.ready = trio.Event()
        self.lead = False  # woken to lead the next publish, not because it left
        self.received = 0
        self.error: ControlPlaneUnavailable | None = None


class Courier:
    def __init__(self, publish: Publish) -> None:
        self._publish = publish
        self._waiting: dict[str, list[_Parcel]] = {}
        self._publishing: set[str] = set()
        self.publishes = 0  # for tests and metrics

    async def send(self, channel: str, message: bytes) -> int:
        """Publish ``message`` on ``channel`` with what else is sent to it meanwhile; how
        many listeners got it. Raises ControlPlaneUnavailable."""
        parcel = _Parcel(message)
        waiting = self._waiting.setdefault(channel, [])
        waiting.append(parcel)
        if channel in self._publishing or len(waiting) > 1:
            try:
                await parcel.ready.wait()
            except BaseException:
                if parcel in waiting:  # it has not left: take it back
                    waiting.remove(parcel)
                    self._hand_over(channel, waiting)
                raise
            if not parcel.lead:
                return self._outcome(parcel)
        await self._lead(channel, waiting, parcel)
        return self._outcome(parcel)

    async def _lead(self, channel: str, waiting: list[_Parcel], parcel: _Parcel) -> None:
        self._publishing.add(channel)
        try:
            try:
                await trio.lowlevel.checkpoint()  # the round's other messages ride along
            except BaseException:
                waiting.remove(parcel)
                raise
            leaving = waiting[:]
            waiting.clear()
            with trio.CancelScope(shield=True):
                try:
                    received = await self._publish(channel, _packed(leaving))
                except ControlPlaneUnavailable as exc:
                    for each in leaving:
                        each.error = exc
                else:
                    for each in leaving:
                        each.received = received
            self.publishes += 1
            for each in leaving:
                each.ready.set()
        finally:
            self._publishing.discard(channel)
            self._hand_over(channel, waiting)

    def _hand_over(self, channel: str, waiting: list[_Parcel]) -> None:
        """The next waiting sender leads, if none does."""
        if channel in self._publishing:
            return
        if waiting:
            if not waiting[0].lead:
                waiting[0].lead = True
                waiting[0].ready.set()
        elif self._waiting.get(channel) is waiting:
            del self._waiting[channel]

    @staticmethod
    def _outcome(parcel: _Parcel) -> int:
        if parcel.error is not None:
            raise parcel.error
        return parcel.received


def _packed(parcels: list[_Parcel]) -> bytes:
    if len(parcels) == 1:
        return parcels[0].message
    return b"[" + b",".join(parcel.message for parcel in parcels) + b"]"


def unpacked(decoded: object) -> list[object]:
    """The messages a publish carried (one, or an array of them)."""
    return decoded if isinstance(decoded, list) else [decoded]
