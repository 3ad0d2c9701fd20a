"""The control plane: what the workers of one Aether agree on, and the embedded one-worker plane.

Every worker runs chats in its own event loop; a client's next request may land on any of them.
The control plane is what they share: which worker runs a live request (so a stop or an approval
that lands elsewhere reaches it), and how many chats each caller runs in all (the per-caller
limit is the server's, not each worker's). ``LocalControlPlane`` is the default: one worker, the
tracker is the whole truth, nothing else to run. ``RedisControlPlane``
(``core/control/redis_plane.py``) is the same contract across processes.

The engine calls ``admit`` before a chat is registered in its tracker and ``release`` once it
ended; a stop or an approval for an id its tracker does not hold goes to ``stop_elsewhere`` /
``approve_elsewhere``, and a resume of a chat it does not keep to ``resume_elsewhere`` (the owner
forwards the stream: a ``StreamSource`` there, a ``StreamSink`` here). A plane that routes to
another worker calls that worker's ``WorkerCommands`` (its engine).

@.architecture
role: control plane contract
jobs: [worker_coordination, limit_checking]
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Protocol

import trio

from aether.core.chat import Chunk, StopReason
from aether.core.errors import TooManyRequests, UnknownRequest

# A rate limit's answer: allowed, whole tokens left, seconds until the next token.
RateVerdict = tuple[bool, int, float]


class StreamSource(Protocol):
    """A resumable request's stream as this worker forwards it to a client on another."""

    @property
    def ended(self) -> bool:
        """Whether the batch that ends the stream for this client was handed out."""

    async def next_batch(self, idle_s: float) -> list[Chunk] | None:
        """The next messages; [] after ``idle_s`` with none; None once ended."""

    def close(self) -> None:
        """The client is gone (or the forwarding ended): the request runs on detached."""


class StreamSink(Protocol):
    """Where a stream forwarded from another worker goes: the resuming client's outbox."""

    def put(self, messages: list[Chunk]) -> bool:
        """Queue the messages for the client; False (nothing queued) once it is gone."""

    async def wait_for_room(self) -> None:
        """Wait until the client has read enough. Raises trio.BrokenResourceError once it is
        gone."""

    def end(self, notice: Chunk | None) -> None:
        """Nothing more comes; ``notice``: what the client is told about why."""


class RoutedStream(Protocol):
    """The asking worker's hold on a stream another worker forwards to it."""

    def detach(self) -> None:
        """The client is gone: the owner stops forwarding, its request runs on detached."""


class WorkerCommands(Protocol):
    """What another worker may ask of this one (its engine answers)."""

    def stop_local(self, request_id: str, owner: str, reason: StopReason) -> None:
        """Stop a request of this worker. Raises UnknownRequest."""

    def approve_local(
        self, request_id: str, owner: str, confirmation_id: str, approved: bool
    ) -> None:
        """Answer a code confirmation of this worker. Raises UnknownRequest, StaleConfirmation."""

    def live_requests(self) -> list[tuple[str, str]]:
        """The (owner, request id) of every chat this worker runs."""

    def resume_stream(self, owner: str, request_id: str, after_seq: int) -> StreamSource | None:
        """A resumable chat of this worker, from after ``after_seq``, for a client on another
        worker (a client attached to it is told it was taken over). None: the chat ended and
        nothing is left after ``after_seq``. Raises UnknownRequest."""

    async def wait_saved(self, owner: str, conversation_id: str) -> None:
        """Return once the conversation's last turn that told its client its terminal is saved
        (at once if none waits for its save here)."""

    async def forget_local(self, owner: str, conversation_id: str) -> None:
        """The conversation was deleted on another worker: drop what this one keeps of it (its
        interpreter, its copy of the files)."""


class ControlPlane(Protocol):
    @property
    def shared(self) -> bool:
        """Whether other workers may run this server's chats."""

    @property
    def reachable(self) -> bool:
        """Whether the plane answers (readiness): always, for the embedded one."""

    async def run(
        self, commands: WorkerCommands, *, task_status: trio.TaskStatus[None] = ...
    ) -> None:
        """Serve other workers' commands until cancelled."""

    async def admit(
        self, owner: str, request_id: str, limit: int, conversation_id: str | None = None
    ) -> str | None:
        """Count a new chat of ``owner`` (of ``conversation_id``, with history). Raises
        TooManyRequests when the caller already runs ``limit`` chats on the whole server,
        DuplicateRequest when a worker runs that id. Returns the other worker whose turn of
        the conversation may not be saved yet (``await_saved`` waits for it), or None."""

    def release(
        self,
        owner: str,
        request_id: str,
        conversation_id: str | None = None,
        *,
        retained: bool = False,
    ) -> None:
        """The chat ended, its answer saved (or it was never registered after ``admit``).
        ``retained``: this worker keeps it for a resume, for the resume retention. Never
        blocks."""

    async def await_saved(self, worker: str, owner: str, conversation_id: str) -> None:
        """Wait until ``worker`` has saved its turn of the conversation, if that turn told its
        client its terminal; a follow-up then sees the whole answer. Gives up (logged) when
        the worker cannot be asked: the follow-up runs on what the history holds."""

    async def take_token(self, bucket: str, limit: int, window_s: float) -> RateVerdict | None:
        """Take a token from the server's ``bucket`` (``limit`` tokens, refilled over
        ``window_s``): (allowed, whole tokens left, seconds until the next). None: this worker
        is the whole server, its own buckets decide."""

    async def connection_opened(self, ip: str, limit: int) -> bool | None:
        """Count a connection from ``ip`` if the server has fewer than ``limit`` from it.
        None: this worker is the whole server, its own count decides."""

    def connection_closed(self, ip: str) -> None:
        """A connection counted by ``connection_opened`` closed. Never blocks."""

    async def stop_elsewhere(self, request_id: str, owner: str, reason: StopReason) -> None:
        """Stop a request this worker does not run. Raises UnknownRequest when no worker runs
        it, ControlPlaneUnavailable when the plane cannot tell."""

    def conversation_deleted(self, owner: str, conversation_id: str) -> None:
        """Tell every other worker that the conversation was deleted (``forget_local``). Never
        blocks; a worker that misses it (Redis down) keeps an interpreter that the next turn's
        stored history corrects."""

    async def approve_elsewhere(
        self, request_id: str, owner: str, confirmation_id: str, approved: bool
    ) -> None:
        """Answer another worker's code confirmation. Raises as ``approve_local`` does, and
        ControlPlaneUnavailable."""

    async def resume_elsewhere(
        self, request_id: str, owner: str, after_seq: int, sink: StreamSink
    ) -> RoutedStream | None:
        """Resume a chat another worker runs or keeps: it forwards the messages after
        ``after_seq`` and then the live stream into ``sink``. None: the chat ended and nothing
        is left. Raises UnknownRequest when no worker keeps it, ControlPlaneUnavailable."""


class LocalControlPlane:
    """One worker: its tracker knows every live request (``live_count_for``: how many chats
    a caller runs)."""

    shared = False
    reachable = True

    def __init__(self, live_count_for: Callable[[str], int]) -> None:
        self._live_count_for = live_count_for

    async def run(
        self,
        commands: WorkerCommands,
        *,
        task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED,
    ) -> None:
        task_status.started()
        await trio.sleep_forever()

    async def admit(
        self, owner: str, request_id: str, limit: int, conversation_id: str | None = None
    ) -> str | None:
        # No checkpoint: a transport admits and starts a chat in one step. A duplicate id is
        # the tracker's to refuse (``start_request``); a follow-up waits for this worker's
        # own previous turn in the history (``TurnHistory``).
        if self._live_count_for(owner) >= limit:
            raise TooManyRequests(f"at most {limit} chats may run at once for one caller")
        return None

    def release(
        self,
        owner: str,
        request_id: str,
        conversation_id: str | None = None,
        *,
        retained: bool = False,
    ) -> None:
        pass

    async def await_saved(self, worker: str, owner: str, conversation_id: str) -> None:
        pass

    async def take_token(self, bucket: str, limit: int, window_s: float) -> RateVerdict | None:
        return None

    async def connection_opened(self, ip: str, limit: int) -> bool | None:
        return None

    def connection_closed(self, ip: str) -> None:
        pass

    async def stop_elsewhere(self, request_id: str, owner: str, reason: StopReason) -> None:
        raise UnknownRequest(f"no running request with id {request_id!r}")

    def conversation_deleted(self, owner: str, conversation_id: str) -> None:
        pass

    async def approve_elsewhere(
        self, request_id: str, owner: str, confirmation_id: str, approved: bool
    ) -> None:
        raise UnknownRequest(f"no running request with id {request_id!r}")

    async def resume_elsewhere(
        self, request_id: str, owner: str, after_seq: int, sink: StreamSink
    ) -> RoutedStream | None:
        raise UnknownRequest(f"no resumable request with id {request_id!r}")
