"""InlineDispatch: frames handled in the server's reading task keep the connection's lifetime."""

from __future__ import annotations

import trio
import trio.testing

from aether.asgi import Message
from aether.ws.inline_dispatch import InlineDispatch

FRAME: Message = {"type": "websocket.receive", "text": "{}"}


async def test_the_connection_ending_cancels_the_frame_being_handled() -> None:
    handling = trio.Event()
    outcome: list[str] = []

    async def handle(message: Message) -> None:
        handling.set()
        try:
            await trio.sleep_forever()
        except trio.Cancelled:
            outcome.append("cancelled")
            raise

    async with trio.open_nursery() as server:  # the server's reading task lives here
        async with trio.open_nursery() as connection:
            dispatch = InlineDispatch(handle, connection.cancel_scope)
            connection.start_soon(dispatch.guard)
            server.start_soon(dispatch, FRAME)
            await handling.wait()
            connection.cancel_scope.cancel()
        assert outcome == ["cancelled"]
        assert dispatch.failure is None


async def test_the_nursery_stays_open_until_the_frame_is_handled() -> None:
    # A handler past its last checkpoint when the connection ends may still start a task in
    # the connection's nursery: the nursery must not close under it.
    release = trio.Event()
    handling = trio.Event()
    started_after_close: list[bool] = []

    async def handle(message: Message) -> None:
        handling.set()
        with trio.CancelScope(shield=True):
            await release.wait()
        connection.start_soon(trio.sleep_forever)  # cancelled at once: the nursery is
        started_after_close.append(True)

    async with trio.open_nursery() as server, trio.open_nursery() as connection:
        dispatch = InlineDispatch(handle, connection.cancel_scope)
        connection.start_soon(dispatch.guard)
        server.start_soon(dispatch, FRAME)
        await handling.wait()
        connection.cancel_scope.cancel()
        server.start_soon(_set_when_blocked, release)
    assert started_after_close == [True]
    assert dispatch.failure is None


async def _set_when_blocked(event: trio.Event) -> None:
    await trio.testing.wait_all_tasks_blocked()
    event.set()


async def test_frames_after_the_connection_ended_are_dropped() -> None:
    handled: list[Message] = []

    async def handle(message: Message) -> None:
        handled.append(message)

    async with trio.open_nursery() as connection:
        dispatch = InlineDispatch(handle, connection.cancel_scope)
        connection.start_soon(dispatch.guard)
        await dispatch(FRAME)
        connection.cancel_scope.cancel()
    await dispatch({"type": "websocket.receive", "text": "late"})
    assert handled == [FRAME]


async def test_a_handler_error_ends_the_connection_and_is_kept_for_the_endpoint() -> None:
    async def handle(message: Message) -> None:
        raise ValueError("handler bug")

    async with trio.open_nursery() as connection:
        dispatch = InlineDispatch(handle, connection.cancel_scope)
        connection.start_soon(dispatch.guard)
        await dispatch(FRAME)  # the reading task is not the one to fail
        await trio.sleep_forever()  # ended by the connection's cancellation
    assert isinstance(dispatch.failure, ValueError)
    handled: list[Message] = []
    dispatch._handle = lambda message: _record(handled, message)
    await dispatch(FRAME)  # nothing more is handled on a failed connection
    assert handled == []


async def _record(handled: list[Message], message: Message) -> None:
    handled.append(message)
