"""ResumableChats: the chats a client may come back for (``resume``), by owner and request id.

A running chat whose client is gone stays for the resume grace: unless a client attached to its
outlet meanwhile, it is stopped (reason ``disconnect``) when the grace ends. An ended chat stays
for the retention, replayable to its terminal. Both are queues in the order their deadlines
fall, each run by one task (not a task per chat, nothing woken when a client comes back). Only
the outlet is kept: the turn, its recorder and its provider go when the chat ends.

Resource handling: ``run`` lives in the engine's nursery and runs the two queues; cancelling it
(the engine stops) ends them, and the chats are stopped by the engine's own drain.

@.architecture
role: resumable chats
jobs: [lifecycle_tracking, cancellation_management]
"""

from __future__ import annotations

import logging
from collections import deque
from collections.abc import Callable
from typing import Generic, TypeVar

import trio

from aether.core.errors import UnknownRequest
from aether.core.runtime.outbox import Outbox
from aether.core.runtime.outlet import RequestOutlet

log = logging.getLogger(__name__)
Key = tuple[str, str]  # (owner, request id)
T = TypeVar("T")


class _Deadlines(Generic[T]):
    """Items due a fixed delay after they came, so in the order they came: one task hands
    each to ``on_due`` when its time comes (not a sleeping task per item)."""

    def __init__(self, delay_s: float, on_due: Callable[[T], None]) -> None:
        self._delay_s = delay_s
        self._on_due = on_due
        self._items: deque[tuple[float, T]] = deque()
        self._added = trio.Event()

    def add(self, item: T) -> None:
        self._items.append((trio.current_time() + self._delay_s, item))
        self._added.set()

    async def run(self) -> None:
        while True:
            while not self._items:
                await self._added.wait()
                self._added = trio.Event()
            due_at, item = self._items[0]
            await trio.sleep_until(due_at)
            self._items.popleft()
            self._on_due(item)


class ResumableChats:
    def __init__(
        self, grace_s: float, retention_s: float, stop: Callable[[str, str], None]
    ) -> None:
        self._grace_s = grace_s
        self._stop = stop  # (owner, request id): stop that chat, reason disconnect
        self._outlets: dict[Key, RequestOutlet] = {}
        # Detached chats, with how many times each had been detached then; ended chats.
        self._graces = _Deadlines[tuple[Key, RequestOutlet, int]](grace_s, self._grace_over)
        self._ended = _Deadlines[tuple[Key, RequestOutlet]](retention_s, self._forget)

    def __len__(self) -> int:
        return len(self._outlets)

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Stop detached chats as their grace runs out, forget ended ones as their retention
        does."""
        async with trio.open_nursery() as nursery:
            nursery.start_soon(self._graces.run)
            nursery.start_soon(self._ended.run)
            task_status.started()

    def add(self, key: Key, outlet: RequestOutlet) -> None:
        self._outlets[key] = outlet

    def ended(self, key: Key, outlet: RequestOutlet) -> None:
        """The chat has ended: replayable for the retention, then forgotten."""
        self._ended.add((key, outlet))

    def _forget(self, item: tuple[Key, RequestOutlet]) -> None:
        key, outlet = item
        if self._outlets.get(key) is outlet:  # not a new chat of that id
            del self._outlets[key]

    def detached(self, key: Key) -> None:
        """The chat's client is gone: stop the chat after the grace unless one comes back."""
        outlet = self._outlets.get(key)
        if outlet is not None and not outlet.finished:
            self._graces.add((key, outlet, outlet.detachments))

    def _grace_over(self, item: tuple[Key, RequestOutlet, int]) -> None:
        key, outlet, detachments = item
        # A client came back (and perhaps left again: then its own grace runs), or it ended.
        if outlet.attached or outlet.finished or outlet.detachments != detachments:
            return
        log.info("request %s: no client came back in %.0f s", key[1], self._grace_s)
        self._stop(*key)

    def resume(
        self, owner: str, request_id: str, after_seq: int, outbox: Outbox
    ) -> RequestOutlet | None:
        """Send the chat's messages after ``after_seq`` to ``outbox``, then its live stream.
        None: the chat has ended and ``after_seq`` is its terminal's (nothing to send).
        Raises UnknownRequest for an id the caller has no resumable chat of."""
        outlet = self._outlets.get((owner, request_id))
        if outlet is None:
            raise UnknownRequest(f"no resumable request with id {request_id!r}")
        if outlet.finished and after_seq >= outlet.last_seq:
            return None
        outlet.attach(outbox, after_seq)
        return outlet
