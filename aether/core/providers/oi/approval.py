"""ApprovalGate: where a turn waits for the client to approve or deny code.

Each question the gate asks has an id of its own (``confirmation_id``, sent with the
``confirmation``), and an answer must name it: a late or repeated approve (a double click, a
client's retry) names a question that is no longer pending, and is refused instead of approving
code the user never saw.

@.architecture
role: approval gate
jobs: [approval_gating]
"""

from __future__ import annotations

import secrets
from collections.abc import Awaitable, Callable

import trio

from aether.core.chat import Chunk
from aether.core.errors import StaleConfirmation


def new_confirmation_id() -> str:
    return "cf-" + secrets.token_hex(8)


class ApprovalGate:
    """One pending question at a time. ``ask`` blocks the turn (not the event loop) until
    ``answer`` names that question; a stop cancels the wait like any other."""

    def __init__(self) -> None:
        self._event: trio.Event | None = None
        self._approved = False
        self.pending_id: str | None = None

    @property
    def pending(self) -> bool:
        return self.pending_id is not None

    async def ask(self, question: Chunk, send: Callable[[Chunk], Awaitable[None]]) -> bool:
        """Send ``question`` with a new ``confirmation_id`` and wait for its answer. The gate
        opens before the question leaves, so an answer that comes back at once is not lost."""
        confirmation_id = new_confirmation_id()
        self._event = event = trio.Event()
        self._approved = False
        self.pending_id = confirmation_id
        try:
            await send({**question, "confirmation_id": confirmation_id})
            await event.wait()
            return self._approved
        finally:
            self.pending_id = None

    def answer(self, confirmation_id: str, approved: bool) -> None:
        """Answer the pending question. Raises StaleConfirmation if ``confirmation_id`` is not
        the question waiting for an answer (none is, or another one is)."""
        if self.pending_id is None or self._event is None:
            raise StaleConfirmation(
                f"confirmation {confirmation_id!r} is not waiting for an answer (none is)"
            )
        if not secrets.compare_digest(confirmation_id, self.pending_id):
            raise StaleConfirmation(
                f"confirmation {confirmation_id!r} is not the one waiting for an answer"
            )
        self._approved = approved
        self.pending_id = None
        self._event.set()
