"""The batched listener: connections queued in the kernel are accepted in one scheduling round,
not one round each (a busy loop made a burst of new connections wait seconds)."""

from __future__ import annotations

import socket

import pytest
import trio
import trio.testing

from aether.server.listener import BatchedSocketListener


class LoopRounds(trio.abc.Instrument):
    def __init__(self) -> None:
        self.rounds = 0

    def before_io_wait(self, timeout: float) -> None:
        self.rounds += 1


def listening_socket() -> socket.socket:
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    sock.listen(64)
    return sock


async def test_queued_connections_are_accepted_without_a_round_each() -> None:
    listener = BatchedSocketListener(listening_socket())
    address = listener.socket.getsockname()
    clients = [socket.create_connection(address) for _ in range(5)]
    rounds = LoopRounds()
    streams: list[trio.SocketStream] = []
    try:
        first = await listener.accept()
        streams.append(first)
        trio.lowlevel.add_instrument(rounds)
        others = [await listener.accept() for _ in range(4)]
        trio.lowlevel.remove_instrument(rounds)
        streams += others
        # Each stream is a working connection to its client.
        for index, client in enumerate(clients):
            client.sendall(b"%d" % index)
        received = sorted([await stream.receive_some(16) for stream in (first, *others)])
    finally:
        for client in clients:
            client.close()
        for stream in streams:
            await stream.aclose()
        await listener.aclose()
    assert rounds.rounds == 0
    assert received == [b"0", b"1", b"2", b"3", b"4"]


async def test_closing_wakes_a_waiting_accept_and_closes_what_was_not_handed_out() -> None:
    listener = BatchedSocketListener(listening_socket())
    address = listener.socket.getsockname()
    clients = [socket.create_connection(address) for _ in range(2)]
    try:
        stream = await listener.accept()  # the second is taken too, never handed out
        await stream.aclose()
        await listener.aclose()
        for client in clients:
            client.settimeout(5)
            assert client.recv(1) == b""  # closed by the server
    finally:
        for client in clients:
            client.close()
    with pytest.raises(trio.ClosedResourceError):
        await listener.accept()

    waiting = BatchedSocketListener(listening_socket())
    async with trio.open_nursery() as nursery:

        async def accept() -> None:
            with pytest.raises(trio.ClosedResourceError):
                await waiting.accept()

        nursery.start_soon(accept)
        await trio.testing.wait_all_tasks_blocked()
        await waiting.aclose()
