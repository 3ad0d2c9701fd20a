"""What a single connection can do to the server, over real sockets: HTTP/2 in any form, a
connection whose handling fails, WebSocket frames that cannot be parsed, and malformed requests
that Hypercorn answers itself."""

from __future__ import annotations

import logging
import struct
from pathlib import Path
from typing import Any

import h2.config
import h2.connection
import h2.events
import httpx
import pytest
import trio
from wsproto.events import CloseConnection

from aether.server.protocol import HTTP1Connection
from aether.server.worker import AetherTCPServer
from aether.testing.fake_llm import FakeLLM
from tests.helpers import (
    RawWebSocket,
    assert_stream_invariants,
    http_settings,
    running_server,
    tls_certificate,
    ws_client,
)

DEADLINE_S = 10
SECURITY_HEADERS = ("x-content-type-options", "x-frame-options", "referrer-policy", "cache-control")


def address(base_url: str) -> tuple[str, int]:
    host, port = base_url.removeprefix("http://").rsplit(":", 1)
    return host, int(port)


async def read_response_head(stream: trio.abc.Stream, limit_s: float = 5.0) -> str:
    """The head of the response the server sends (status line and headers), lower-cased."""
    received = b""
    with trio.fail_after(limit_s):
        while b"\r\n\r\n" not in received:
            data = await stream.receive_some(65536)
            assert data, f"closed after {received!r}"
            received += data
    return received.split(b"\r\n\r\n", 1)[0].decode("latin-1").lower()


async def h2_post_past_the_window(host: str, port: int, preface_via_upgrade: bool) -> bytes:
    """An HTTP/2 POST whose body (2 MB) goes past the 64 KiB flow-control window and past the
    body limit, sent with prior knowledge or after an ``Upgrade: h2c``. Returns what the server
    sent back before closing."""
    stream = await trio.open_tcp_stream(host, port)
    async with stream:
        received = b""
        if preface_via_upgrade:
            await stream.send_all(
                b"GET /health HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: Upgrade, HTTP2-Settings"
                b"\r\nUpgrade: h2c\r\nHTTP2-Settings: AAMAAABkAAQAAP__\r\n\r\n"
            )
            while b"\r\n\r\n" not in received:
                received += await stream.receive_some(65536)
            if not received.startswith(b"HTTP/1.1 101"):
                return received
        connection = h2.connection.H2Connection(h2.config.H2Configuration(client_side=True))
        connection.initiate_connection()
        stream_id = connection.get_next_available_stream_id()
        connection.send_headers(
            stream_id,
            [
                (":method", "POST"),
                (":path", "/v1/chat"),
                (":scheme", "http"),
                (":authority", f"{host}:{port}"),
                ("content-type", "application/json"),
            ],
        )
        body, sent = b"x" * 2_000_000, 0
        with trio.move_on_after(3):
            while sent < len(body):
                size = min(
                    connection.local_flow_control_window(stream_id),
                    connection.max_outbound_frame_size,
                    len(body) - sent,
                )
                if size > 0:
                    connection.send_data(stream_id, body[sent : sent + size])
                    sent += size
                await stream.send_all(connection.data_to_send())
                if size > 0:
                    continue
                data = await stream.receive_some(65536)
                if not data:
                    break
                received += data
                connection.receive_data(data)
        with trio.move_on_after(1):
            while data := await stream.receive_some(65536):
                received += data
        return received


@pytest.mark.parametrize("via_upgrade", [False, True], ids=["prior-knowledge", "h2c-upgrade"])
async def test_an_http2_request_is_refused_and_the_server_keeps_serving(
    fake_llm: FakeLLM, via_upgrade: bool
) -> None:
    with trio.fail_after(DEADLINE_S + 5):
        async with running_server(http_settings(fake_llm)) as server:
            host, port = address(server.base_url)
            answer = await h2_post_past_the_window(host, port, via_upgrade)
            async with ws_client(server.ws_url) as client:
                messages = await client.chat("still here?", id="after-h2")
    if via_upgrade:
        # The Upgrade is ignored: the request is answered in HTTP/1.1.
        assert answer.startswith(b"HTTP/1.1 200"), answer[:200]
    else:
        assert answer.startswith(b"HTTP/1.1 505"), answer[:200]
        assert b"x-content-type-options: nosniff" in answer
    assert assert_stream_invariants(messages)["type"] == "completion"


async def test_tls_offers_only_http_1_1(fake_llm: FakeLLM, tmp_path: Path) -> None:
    certfile, keyfile, client_context = tls_certificate(tmp_path)
    client_context.set_alpn_protocols(["h2", "http/1.1"])
    settings = http_settings(fake_llm, tls_certfile=str(certfile), tls_keyfile=str(keyfile))
    with trio.fail_after(DEADLINE_S):
        async with running_server(settings) as server:
            host, port = address(server.base_url.replace("https", "http", 1))
            tcp = await trio.open_tcp_stream(host, port)
            tls = trio.SSLStream(tcp, client_context, server_hostname=host)
            async with tls:
                await tls.do_handshake()
                negotiated = tls.selected_alpn_protocol()
    assert negotiated == "http/1.1"


async def test_a_connection_that_fails_is_closed_and_the_server_keeps_serving(
    fake_llm: FakeLLM, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    handle = HTTP1Connection.handle

    async def fail_on_boom(self: HTTP1Connection, event: Any) -> None:
        if b"/boom" in getattr(event, "data", b""):
            raise KeyError("a bug in the protocol")
        await handle(self, event)

    monkeypatch.setattr(HTTP1Connection, "handle", fail_on_boom)
    with trio.fail_after(DEADLINE_S):
        async with running_server(http_settings(fake_llm)) as server:
            async with httpx.AsyncClient(base_url=server.base_url) as client:
                with pytest.raises(httpx.RemoteProtocolError):
                    await client.get("/boom")
                health = await client.get("/health")
            async with ws_client(server.ws_url) as ws:
                messages = await ws.chat("still here?", id="after-boom")
    assert health.status_code == 200
    assert assert_stream_invariants(messages)["type"] == "completion"
    failures = [r for r in caplog.records if "failed and was closed" in r.getMessage()]
    assert len(failures) == 1
    assert failures[0].levelno == logging.ERROR


def client_frame(opcode: int, payload: bytes, *, masked: bool = True, fin: bool = True) -> bytes:
    """One WebSocket frame as a client sends it (masked unless told otherwise)."""
    head = bytes([(0x80 if fin else 0) | opcode])
    mask_bit = 0x80 if masked else 0
    if len(payload) < 126:
        head += bytes([mask_bit | len(payload)])
    else:
        head += bytes([mask_bit | 126]) + struct.pack("!H", len(payload))
    if not masked:
        return head + payload
    key = b"\x01\x02\x03\x04"
    return head + key + bytes(b ^ key[i % 4] for i, b in enumerate(payload))


@pytest.mark.parametrize(
    ("frame", "expected_code"),
    [
        (client_frame(0x1, b"caf\xc3"), 1007),  # text that is not UTF-8
        (client_frame(0x3, b"x"), 1002),  # a reserved opcode
        (client_frame(0x1, b'{"type": "ping"}', masked=False), 1002),
        (client_frame(0x8, struct.pack("!H", 999)), 1002),  # an invalid close code
    ],
    ids=["invalid-utf8", "reserved-opcode", "unmasked", "invalid-close-code"],
)
async def test_a_frame_that_cannot_be_parsed_gets_the_close_code_rfc_6455_asks_for(
    fake_llm: FakeLLM, frame: bytes, expected_code: int
) -> None:
    with trio.fail_after(DEADLINE_S):
        async with running_server(http_settings(fake_llm)) as server:
            client = await RawWebSocket.connect(server.ws_url)
            async with client.stream:
                await client.stream.send_all(frame)
                codes = []
                while data := await client.stream.receive_some(65536):
                    client.ws.receive_data(data)
                    codes += [e.code for e in client.ws.events() if isinstance(e, CloseConnection)]
                    if codes:
                        break
    assert codes == [expected_code]


@pytest.mark.parametrize(
    ("request_bytes", "status"),
    [
        (b"GET / HTTP/1.1\r\nHost: 127.0.0.1\r\nno colon here\r\n\r\n", 400),
        # a header block that is still not finished after 16 KiB
        (b"GET / HTTP/1.1\r\nHost: 127.0.0.1\r\nX-Big: " + b"a" * 20_000, 431),
        (b"POST /v1/chat HTTP/1.1\r\nHost: 127.0.0.1\r\nTransfer-Encoding: gzip\r\n\r\n", 501),
        (
            b"GET /ws HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: Upgrade\r\n"
            b"Upgrade: websocket\r\nSec-WebSocket-Version: 13\r\n\r\n",  # no key
            400,
        ),
    ],
    ids=["malformed-header", "headers-too-large", "unknown-transfer-encoding", "bad-handshake"],
)
async def test_responses_hypercorn_makes_itself_carry_the_security_headers(
    fake_llm: FakeLLM, request_bytes: bytes, status: int
) -> None:
    with trio.fail_after(DEADLINE_S):
        async with running_server(http_settings(fake_llm)) as server:
            stream = await trio.open_tcp_stream(*address(server.base_url))
            async with stream:
                await stream.send_all(request_bytes)
                head = await read_response_head(stream)
    assert head.startswith(f"http/1.1 {status} "), head
    for name in SECURITY_HEADERS:
        assert f"\r\n{name}: " in head, (name, head)
    assert "\r\nserver:" not in head


async def test_a_tls_error_response_also_carries_hsts(fake_llm: FakeLLM, tmp_path: Path) -> None:
    certfile, keyfile, client_context = tls_certificate(tmp_path)
    settings = http_settings(fake_llm, tls_certfile=str(certfile), tls_keyfile=str(keyfile))
    with trio.fail_after(DEADLINE_S):
        async with running_server(settings) as server:
            host, port = address(server.base_url.replace("https", "http", 1))
            tls = trio.SSLStream(
                await trio.open_tcp_stream(host, port), client_context, server_hostname=host
            )
            async with tls:
                await tls.send_all(b"GET / HTTP/1.1\r\nHost: 127.0.0.1\r\nno colon\r\n\r\n")
                head = await read_response_head(tls)
    assert head.startswith("http/1.1 400 "), head
    assert "\r\nstrict-transport-security: " in head


async def test_a_request_whose_body_never_comes_gets_408_with_the_security_headers(
    fake_llm: FakeLLM,
) -> None:
    with trio.fail_after(DEADLINE_S):
        async with running_server(
            http_settings(fake_llm), quart_config={"BODY_TIMEOUT": 0.2}
        ) as server:
            stream = await trio.open_tcp_stream(*address(server.base_url))
            async with stream:
                await stream.send_all(
                    b"POST /v1/chat HTTP/1.1\r\nHost: 127.0.0.1\r\n"
                    b"Content-Type: application/json\r\nContent-Length: 100\r\n\r\n{"
                )
                head = await read_response_head(stream)
    assert head.startswith("http/1.1 408 "), head
    for name in SECURITY_HEADERS:
        assert f"\r\n{name}: " in head, (name, head)


async def test_a_response_of_declared_length_goes_out_in_one_write(
    fake_llm: FakeLLM, monkeypatch: pytest.MonkeyPatch
) -> None:
    writes: list[bytes] = []
    write_now = AetherTCPServer._write_now

    def counted(self: AetherTCPServer, data: bytes) -> bytes | memoryview:
        writes.append(bytes(data))
        return write_now(self, data)

    monkeypatch.setattr(AetherTCPServer, "_write_now", counted)
    with trio.fail_after(DEADLINE_S):
        async with (
            running_server(http_settings(fake_llm)) as server,
            httpx.AsyncClient(base_url=server.base_url) as client,
        ):
            await client.get("/health")
            writes.clear()
            response = await client.get("/health")
    assert response.status_code == 200
    assert len(writes) == 1, writes
    assert writes[0].startswith(b"HTTP/1.1 200 ")
    assert writes[0].endswith(response.content)
