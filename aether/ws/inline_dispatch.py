"""InlineDispatch: a connection's frames handled in the server's reading task, within the
connection's lifetime.

With the server's ``RECEIVE_INLINE`` extension, a frame is handled by the task that read it off
the socket: no hop through the receive channel to the application's task, which cost a
scheduling round per frame (a burst of stops waited for it). That task belongs to the server,
not to the connection's nursery, so this object gives the handling what the nursery gave it:

- the connection's end cancels the frame being handled (``guard`` runs in the nursery and
  cancels it as the nursery is cancelled), and the nursery does not close while a frame is
  being handled, so a handler never starts a task into a closed nursery;
- once the connection is closing, frames still arriving are dropped;
- an exception a handler raises ends the connection and is raised by the endpoint, as it was
  when frames were handled in the endpoint's task.

A handler never waits on the client's socket (it queues replies in the outbox; the endpoint
sends them from the reading task only when the socket takes them at once, and leaves them to the
writer otherwise), so handling in the reading task cannot hold up the reading of a ``stop``
behind a client that does not read.

@.architecture
role: WebSocket inline dispatch
jobs: [connection_management, message_routing]
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable

import trio

from aether.asgi import Message


class InlineDispatch:
    def __init__(
        self, handle: Callable[[Message], Awaitable[None]], connection_scope: trio.CancelScope
    ) -> None:
        self._handle = handle
        self._connection_scope = connection_scope
        self._accepting = True
        self._current: trio.CancelScope | None = None
        self._idle = trio.Event()
        self._idle.set()
        self.failure: BaseException | None = None

    async def __call__(self, message: Message) -> None:
        """Handle one frame (the server's ``on_message``, in its reading task)."""
        if not self._accepting:
            return
        self._idle = idle = trio.Event()
        try:
            with trio.CancelScope() as self._current:
                await self._handle(message)
        except Exception as exc:  # ends the connection; the endpoint raises it
            self._accepting = False
            self.failure = exc
            self._connection_scope.cancel()
        finally:
            self._current = None
            idle.set()

    async def guard(self) -> None:
        """Run in the connection's nursery: when the nursery is cancelled, stop taking frames,
        cancel the one being handled and hold the nursery open until its handling is over."""
        try:
            await trio.sleep_forever()
        finally:
            self._accepting = False
            if self._current is not None:
                self._current.cancel()
            with trio.CancelScope(shield=True):
                await self._idle.wait()
