"""RequestTracker: the live requests, each with its own CancelScope, owner, state and audit trail.

``cancel_request`` *is* the stop: it seals the request's turn (its terminal is queued at once)
and cancels its scope, so the producer and relay stop at their next checkpoint. Nothing polls a
flag. Requests are keyed by (owner, id): a caller can
only see and stop its own requests, from any of its connections.

@.architecture
role: request tracker
jobs: [audit_trail, cancellation_management, cleanup, lifecycle_tracking, state_querying]
"""

from __future__ import annotations

import logging
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Literal

import trio

from aether.core.chat import StopReason
from aether.core.errors import DuplicateRequest, UnknownRequest
from aether.core.providers.oi.approval import ApprovalGate

log = logging.getLogger(__name__)

RequestState = Literal["running", "completed", "stopped", "error"]
RECENT_REQUESTS_KEPT = 1000


@dataclass(eq=False)
class RequestRecord:
    """One request's lifecycle. ``events`` is its audit trail of (time, event) pairs."""

    id: str
    owner: str
    path: str
    cancel_scope: trio.CancelScope = field(default_factory=trio.CancelScope)
    state: RequestState = "running"
    stop_reason: StopReason | None = None
    cancel_requested_at: float | None = None
    started_at: float = field(default_factory=trio.current_time)
    ended_at: float | None = None
    events: list[tuple[float, str]] = field(default_factory=list)
    approval: ApprovalGate = field(default_factory=ApprovalGate)
    # Called by a stop before the scope is cancelled: the turn queues its terminal at once.
    on_stop: Callable[[], None] | None = None

    def note(self, event: str) -> None:
        self.events.append((trio.current_time(), event))


class RequestTracker:
    def __init__(self, recent_kept: int = RECENT_REQUESTS_KEPT) -> None:
        self._live: dict[tuple[str, str], RequestRecord] = {}
        self._live_by_owner: dict[str, int] = {}
        self._recent: deque[RequestRecord] = deque(maxlen=recent_kept)
        self._request_ended = trio.lowlevel.ParkingLot()

    def start_request(self, request_id: str, owner: str, path: str) -> RequestRecord:
        key = (owner, request_id)
        if key in self._live:
            raise DuplicateRequest(f"request {request_id!r} is already running")
        record = RequestRecord(request_id, owner, path)
        record.note("started")
        self._live[key] = record
        self._live_by_owner[owner] = self._live_by_owner.get(owner, 0) + 1
        log.info(
            "request %s started (owner=%s path=%s)",
            request_id,
            owner,
            path,
            extra={"request_id": request_id, "owner": owner, "path": path},
        )
        return record

    def cancel_request(
        self, request_id: str, owner: str, reason: StopReason = "stop"
    ) -> RequestRecord:
        """Cancel a live request's scope. Raises UnknownRequest if it is not live for ``owner``."""
        record = self._live.get((owner, request_id))
        if record is None:
            raise UnknownRequest(f"no running request with id {request_id!r}")
        if record.stop_reason is None:
            record.stop_reason = reason
            record.cancel_requested_at = trio.current_time()
            record.note(f"cancel requested ({reason})")
            log.info(
                "request %s cancel requested (%s)",
                request_id,
                reason,
                extra={"request_id": request_id, "reason": reason},
            )
        if record.on_stop is not None:
            record.on_stop()
        # The terminal is queued (``on_stop``): the scope is cancelled in the next scheduling
        # round, so that the writers woken by this round's stops send their ``stopped`` before
        # the cancelled producers and turns unwind (Trio runs a round's tasks in no set order:
        # cancelled at once, a burst of stops interleaved its cleanup with the writes).
        trio.lowlevel.current_trio_token().run_sync_soon(record.cancel_scope.cancel)
        return record

    def cancel_all(self, reason: StopReason) -> int:
        """Cancel every live request (server shutdown). Returns how many were cancelled."""
        records = list(self._live.values())
        for record in records:
            self.cancel_request(record.id, record.owner, reason)
        return len(records)

    def end_request(self, record: RequestRecord, state: RequestState) -> None:
        record.state = state
        record.ended_at = trio.current_time()
        record.note(state)
        if self._live.get((record.owner, record.id)) is record:
            del self._live[(record.owner, record.id)]
            remaining = self._live_by_owner[record.owner] - 1
            if remaining:
                self._live_by_owner[record.owner] = remaining
            else:
                del self._live_by_owner[record.owner]
        self._recent.append(record)
        self._request_ended.unpark_all()
        log.info(
            "request %s %s after %.3f s%s",
            record.id,
            state,
            record.ended_at - record.started_at,
            f" ({record.stop_reason})" if state == "stopped" else "",
            extra={
                "request_id": record.id,
                "state": state,
                "duration_s": round(record.ended_at - record.started_at, 6),
            },
        )

    def get_live(self, request_id: str, owner: str) -> RequestRecord | None:
        return self._live.get((owner, request_id))

    def get(self, request_id: str, owner: str) -> RequestRecord | None:
        """A live request, or else the most recent finished one with that id and owner."""
        record = self._live.get((owner, request_id))
        if record is not None:
            return record
        for past in reversed(self._recent):
            if past.id == request_id and past.owner == owner:
                return past
        return None

    def live(self, owner: str | None = None) -> list[RequestRecord]:
        return [r for r in self._live.values() if owner is None or r.owner == owner]

    async def wait_until_idle(self) -> None:
        """Return once no request is live."""
        await trio.lowlevel.checkpoint()
        while self._live:
            await self._request_ended.park()

    def live_count_for(self, owner: str) -> int:
        return self._live_by_owner.get(owner, 0)

    @property
    def live_count(self) -> int:
        return len(self._live)
