"""ResumableChats: the chats a client may come back for (``resume``), by owner and request id.

A running chat whose client is gone stays for the resume grace: a task waits for a client to
attach to its outlet, and otherwise stops the chat (reason ``disconnect``) when the grace ends.
An ended chat stays for the retention, replayable to its terminal: one task forgets them as
they expire, in the order they ended (a queue, not a task per chat). Only the outlet is kept:
the turn, its recorder and its provider go when the chat ends.

Resource handling: ``run`` lives in the engine's nursery and owns the grace tasks; cancelling it
(the engine stops) ends them, and the chats are stopped by the engine's own drain.

@.architecture
role: resumable chats
jobs: [lifecycle_tracking, cancellation_management]
"""

from __future__ import annotations

import logging
from collections import deque
from collections.abc import Callable

import trio

from aether.core.errors import UnknownRequest
from aether.core.runtime.outbox import Outbox
from aether.core.runtime.outlet import RequestOutlet

log = logging.getLogger(__name__)
Key = tuple[str, str]  # (owner, request id)


class ResumableChats:
    def __init__(
        self, grace_s: float, retention_s: float, stop: Callable[[str, str], None]
    ) -> None:
        self._grace_s = grace_s
        self._retention_s = retention_s
        self._stop = stop  # (owner, request id): stop that chat, reason disconnect
        self._outlets: dict[Key, RequestOutlet] = {}
        self._ended: deque[tuple[float, Key, RequestOutlet]] = deque()
        self._ended_added = trio.Event()
        self._nursery: trio.Nursery | None = None

    def __len__(self) -> int:
        return len(self._outlets)

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Forget ended chats as their retention runs out; host the grace tasks."""
        async with trio.open_nursery() as nursery:
            self._nursery = nursery
            task_status.started()
            try:
                while True:
                    while not self._ended:
                        await self._ended_added.wait()
                        self._ended_added = trio.Event()
                    expires_at, key, outlet = self._ended[0]
                    await trio.sleep_until(expires_at)
                    self._ended.popleft()
                    if self._outlets.get(key) is outlet:  # not a new chat of that id
                        del self._outlets[key]
            finally:
                self._nursery = None

    def add(self, key: Key, outlet: RequestOutlet) -> None:
        self._outlets[key] = outlet

    def ended(self, key: Key, outlet: RequestOutlet) -> None:
        """The chat has ended: replayable for the retention, then forgotten."""
        self._ended.append((trio.current_time() + self._retention_s, key, outlet))
        self._ended_added.set()

    def detached(self, key: Key) -> None:
        """The chat's client is gone: stop the chat after the grace unless one comes back."""
        outlet = self._outlets.get(key)
        if self._nursery is not None and outlet is not None and not outlet.finished:
            self._nursery.start_soon(self._grace, key, outlet)

    async def _grace(self, key: Key, outlet: RequestOutlet) -> None:
        with trio.move_on_after(self._grace_s):
            while not outlet.attached and not outlet.finished:
                await outlet.attached_changed.wait()
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
