"""ApprovalGate: where a turn waits for the client to approve or deny code.

@.architecture
role: approval gate
jobs: [approval_gating]
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable

import trio


class ApprovalGate:
    """One pending question at a time. ``wait`` blocks the turn (not the event loop) until
    ``answer``; a stop cancels the wait like any other."""

    def __init__(self) -> None:
        self._event: trio.Event | None = None
        self._approved = False

    @property
    def pending(self) -> bool:
        return self._event is not None and not self._event.is_set()

    async def ask(self, send_question: Callable[[], Awaitable[None]]) -> bool:
        """Send the question and wait for its answer. The gate opens before the question
        leaves, so an answer that comes back at once is not lost."""
        self._event = trio.Event()
        self._approved = False
        await send_question()
        await self._event.wait()
        return self._approved

    def answer(self, approved: bool) -> bool:
        """Give the answer; False if nothing was waiting for one."""
        if not self.pending or self._event is None:
            return False
        self._approved = approved
        self._event.set()
        return True
