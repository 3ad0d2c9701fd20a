"""File chat: files uploaded over the WebSocket or REST, kept per conversation, for the agent."""

from __future__ import annotations

import json
from typing import Any

import httpx
import trio

from aether.core.files import ARCHIVED_MANIFEST
from aether.core.identity import ANONYMOUS
from aether.testing.fake_llm import Behaviour, FakeLLM
from tests.helpers import (
    OI_MARKS,
    WSClient,
    assert_stream_invariants,
    console_of,
    make_settings,
    oi_settings,
    running_server,
    ws_client,
)
from tests.history_backends import HistoryBackend, PostgresBackend

pytestmark = list(OI_MARKS)
DEADLINE_S = 60
DATA = b"city,population\nLyon,522250\nNantes,320732\n"


async def send_file(
    client: WSClient, name: str, data: bytes, frames: int = 2, **fields: Any
) -> dict[str, Any]:
    await client.send({"type": "file", "name": name, "size": len(data), **fields})
    step = max(1, -(-len(data) // frames))
    for start in range(0, len(data), step):
        await client.ws.send_message(data[start : start + step])
    return await client.receive_control()


async def test_a_file_sent_over_the_websocket_is_opened_by_the_agent(fake_llm: FakeLLM) -> None:
    with trio.fail_after(DEADLINE_S):
        async with (
            running_server(oi_settings(fake_llm)) as server,
            ws_client(server.ws_url) as client,
        ):
            stored = await send_file(client, "../../etc/cities.csv", DATA, conversation_id="c-f1")
            files = server.state.engine.file_chat.files
            path = (await files.stored(ANONYMOUS, "c-f1"))[0].path
            # The code runs in the sandbox, where the conversation's directory is /workspace.
            code = "print(open('/workspace/cities.csv').read().splitlines()[1])\n"
            fake_llm.script(
                Behaviour(reply=("Reading it.\n", "```", "python\n", code, "```", "\n")),
                Behaviour(reply="Lyon comes first."),
            )
            await client.send(
                {"type": "chat", "id": "r1", "message": "first city?", "conversation_id": "c-f1"}
            )
            await client.approve_when_asked("r1")
            messages = await client.finish("r1")
    assert stored == {
        "role": "server",
        "type": "file",
        "id": None,
        "conversation_id": "c-f1",
        "name": "cities.csv",  # the path the client gave is not kept
        "size": len(DATA),
    }
    assert path.read_bytes() == DATA
    assert path.name == "cities.csv"
    told = fake_llm.streams[0].request["messages"][-1]["content"]
    assert "in the directory /workspace:" in told
    assert "cities.csv" in told
    assert told.endswith("first city?")
    assert assert_stream_invariants(messages)["type"] == "completion"
    console = console_of(messages)
    assert "Lyon,522250" in console


async def test_upload_limits_give_clear_errors_and_the_connection_lives_on(
    fake_llm: FakeLLM,
) -> None:
    settings = oi_settings(fake_llm, max_file_bytes=1024, max_files_per_conversation=2)
    with trio.fail_after(DEADLINE_S):
        async with (
            running_server(settings) as server,
            ws_client(server.ws_url) as client,
        ):
            await client.ws.send_message(b"stray bytes")
            stray = await client.receive_control()
            await client.send({"type": "file", "name": "big.csv", "size": 4096})
            too_large = await client.receive_control()
            await client.send({"type": "file", "name": "tool.exe", "size": 10})
            wrong_type = await client.receive_control()
            await client.ws.send_message(b"0123456789")  # the refused file's bytes: dropped
            await client.send({"type": "file", "name": "a.txt", "size": 3, "conversation_id": "x"})
            await client.ws.send_message(b"abcdef")  # more than announced
            overflow = await client.receive_control()
            for name in ("a.txt", "b.txt"):
                assert (await send_file(client, name, b"ok", conversation_id="x"))["type"] == "file"
            third = await send_file(client, "c.txt", b"no", frames=1, conversation_id="x")
            replaced = await send_file(client, "a.txt", b"new", frames=1, conversation_id="x")
            await client.send({"type": "ping"})
            pong = await client.receive_control()
            listed = await server.state.engine.file_chat.stored(ANONYMOUS, "x")
    assert too_large["code"] == "file_too_large"
    assert too_large["ref"] == {"type": "file", "name": "big.csv"}
    assert wrong_type["code"] == "file_type_not_allowed"
    assert ".csv" in wrong_type["message"]
    assert stray["code"] == "binary_not_supported"
    assert overflow["code"] == "upload_size_mismatch"
    assert third["code"] == "too_many_files"
    assert (replaced["type"], replaced["size"]) == ("file", 3)
    assert pong["type"] == "pong"
    assert [(f.name, f.size) for f in listed] == [("a.txt", 3), ("b.txt", 2)]


async def test_files_belong_to_their_conversation_and_caller(
    fake_llm: FakeLLM, history_backend: HistoryBackend
) -> None:
    """Conversation ids are per caller: Alice's "c1" and Bob's "c1" each hold their own files,
    over REST and the WebSocket, and neither caller sees the other's."""
    keys = "k-alice-0123456789,k-bob-0123456789"
    alice = {"Authorization": "Bearer k-alice-0123456789"}
    bob = {"Authorization": "Bearer k-bob-0123456789"}
    with trio.fail_after(DEADLINE_S):
        async with (
            running_server(
                oi_settings(fake_llm, api_keys=keys, **history_backend.settings)
            ) as server,
            httpx.AsyncClient(base_url=server.base_url) as rest,
        ):
            upload = await rest.post(
                "/v1/conversations/c1/files",
                files=[("file", ("notes.txt", b"secret plans")), ("file", ("b.md", b"# b"))],
                headers=alice,
            )
            other_conversation = await rest.post(
                "/v1/conversations/c1-2/files", files=[("file", ("x.txt", b"x"))], headers=alice
            )
            bob_before = await rest.get("/v1/conversations/c1/files", headers=bob)
            bob_nobody = await rest.get("/v1/conversations/nobody/files", headers=bob)
            bob_upload = await rest.post(
                "/v1/conversations/c1/files",
                files=[("file", ("notes.txt", b"bob's notes"))],
                headers=bob,
            )
            async with ws_client(
                server.ws_url, subprotocols=["aether.v2", "bearer.k-bob-0123456789"]
            ) as bob_ws:
                bob_ws_upload = await send_file(bob_ws, "ws.txt", b"over ws", conversation_id="c1")
            mine = await rest.get("/v1/conversations/c1/files", headers=alice)
            his = await rest.get("/v1/conversations/c1/files", headers=bob)
            second = await rest.get("/v1/conversations/c1-2/files", headers=alice)
            deleted = await rest.delete("/v1/conversations/c1", headers=alice)
            files = server.state.engine.file_chat.files
            left = sorted(
                p.read_bytes()
                for p in files.root.rglob("*")
                if p.is_file() and p.name != ARCHIVED_MANIFEST
            )
            his_after = await rest.get("/v1/conversations/c1/files", headers=bob)
    assert upload.status_code == 201
    assert upload.json() == {
        "conversation_id": "c1",
        "files": [{"name": "notes.txt", "size": 12}, {"name": "b.md", "size": 3}],
    }
    assert other_conversation.status_code == 201
    # Alice's "c1" answers Bob exactly as an id nobody has.
    assert bob_before.status_code == bob_nobody.status_code == 404
    assert bob_before.json()["error"]["code"] == bob_nobody.json()["error"]["code"]
    assert bob_upload.status_code == 201
    assert (bob_ws_upload["type"], bob_ws_upload["conversation_id"]) == ("file", "c1")
    assert mine.json()["files"] == [{"name": "b.md", "size": 3}, {"name": "notes.txt", "size": 12}]
    assert his.json()["files"] == [
        {"name": "notes.txt", "size": 11},
        {"name": "ws.txt", "size": 7},
    ]
    assert second.json()["files"] == [{"name": "x.txt", "size": 1}]
    assert deleted.status_code == 204
    # Alice's deleted conversation took its files with it; Bob's "c1" kept his.
    assert left == [b"bob's notes", b"over ws", b"x"]
    assert his_after.json()["files"] == his.json()["files"]


async def test_rest_upload_limits(fake_llm: FakeLLM, history_backend: HistoryBackend) -> None:
    settings = oi_settings(fake_llm, max_file_bytes=1024, **history_backend.settings)
    with trio.fail_after(DEADLINE_S):
        async with (
            running_server(settings) as server,
            httpx.AsyncClient(base_url=server.base_url) as rest,
        ):
            url = "/v1/conversations/c-1/files"
            over = await rest.post(url, files=[("file", ("a.txt", b"x" * 2000))])
            far_over = await rest.post(url, files=[("file", ("a.txt", b"x" * 200_000))])
            wrong_type = await rest.post(url, files=[("file", ("run.sh.exe", b"x"))])
            not_multipart = await rest.post(url, json={"file": "a.txt"})
            nothing = await rest.post(url, files=[("other", ("a.txt", b"x"))])
            listed = await rest.get(url)
    assert (over.status_code, over.json()["error"]["code"]) == (413, "file_too_large")
    assert far_over.status_code == 413
    assert (wrong_type.status_code, wrong_type.json()["error"]["code"]) == (
        415,
        "file_type_not_allowed",
    )
    assert not_multipart.status_code == 400
    assert "multipart" in not_multipart.text
    assert nothing.status_code == 400
    assert listed.status_code == 404  # nothing was stored, so no conversation was created


async def test_a_multi_file_upload_is_all_or_nothing(
    fake_llm: FakeLLM, history_backend: HistoryBackend
) -> None:
    """Too many files, a refused type, one file too large: each request fails whole, and the
    conversation's files are exactly as before (a file it would have replaced included)."""
    settings = oi_settings(
        fake_llm, max_file_bytes=1024, max_files_per_conversation=3, **history_backend.settings
    )
    failing = {
        "too_many_files": [("a.txt", b"new"), ("b.txt", b"new"), ("c.txt", b"new")],
        "file_type_not_allowed": [("keep.txt", b"replaced"), ("tool.exe", b"x")],
        "file_too_large": [
            ("keep.txt", b"replaced"),
            ("big.txt", b"x" * 2000),
            ("after.txt", b"never"),
        ],
    }
    outcomes: dict[str, tuple[int, str]] = {}
    before: dict[str, Any] = {}
    after: dict[str, Any] = {}
    on_disk: dict[str, dict[str, bytes]] = {}
    with trio.fail_after(DEADLINE_S):
        async with (
            running_server(settings) as server,
            httpx.AsyncClient(base_url=server.base_url) as rest,
        ):
            files = server.state.engine.file_chat.files
            for code, parts in failing.items():
                url = f"/v1/conversations/c-{code}/files"
                await rest.post(url, files=[("file", ("keep.txt", b"original"))])
                before[code] = (await rest.get(url)).json()
                refused = await rest.post(url, files=[("file", part) for part in parts])
                outcomes[code] = (refused.status_code, refused.json()["error"]["code"])
                after[code] = (await rest.get(url)).json()
                directory = files.directory(ANONYMOUS, f"c-{code}")
                on_disk[code] = {
                    p.name: p.read_bytes()
                    for p in directory.iterdir()
                    if p.name != ARCHIVED_MANIFEST
                }
            new_conversation = await rest.post(
                "/v1/conversations/c-new/files",
                files=[("file", ("a.txt", b"a")), ("file", ("big.txt", b"x" * 2000))],
            )
            not_created = await rest.get("/v1/conversations/c-new/files")
            url = "/v1/conversations/c-file_too_large/files"
            whole = await rest.post(
                url, files=[("file", ("keep.txt", b"new")), ("file", ("a.txt", b"a"))]
            )
            listed = (await rest.get(url)).json()["files"]
    assert outcomes == {
        "too_many_files": (409, "too_many_files"),
        "file_type_not_allowed": (415, "file_type_not_allowed"),
        "file_too_large": (413, "file_too_large"),
    }
    for code in failing:
        assert before[code]["files"] == [{"name": "keep.txt", "size": 8}]
        assert after[code] == before[code], code
        assert on_disk[code] == {"keep.txt": b"original"}, code  # no hidden part left either
    assert new_conversation.status_code == 413
    assert not_created.status_code == 404
    assert whole.status_code == 201
    assert listed == [{"name": "a.txt", "size": 1}, {"name": "keep.txt", "size": 3}]


async def test_a_connection_closed_mid_upload_leaves_no_file(fake_llm: FakeLLM) -> None:
    with trio.fail_after(DEADLINE_S):
        async with running_server(oi_settings(fake_llm)) as server:
            async with ws_client(server.ws_url) as client:
                await client.send(
                    {"type": "file", "name": "half.csv", "size": 100, "conversation_id": "c-h"}
                )
                await client.ws.send_message(b"only part of it")
                await client.send({"type": "ping"})
                await client.receive_control()  # the frame was taken before the pong
            await server.hub.wait_until_empty()  # the connection's clean-up is over
            root = server.state.engine.file_chat.files.root
            leftovers = [p.name for p in root.rglob("*") if p.is_file()]
            history = server.state.engine.history
            assert history is not None
            created = await history.has_conversation(ANONYMOUS, "c-h")
    assert leftovers == []
    assert not created


async def test_file_chat_needs_the_agentic_path() -> None:
    with trio.fail_after(DEADLINE_S):
        async with (
            running_server(make_settings(provider="echo")) as server,
            ws_client(server.ws_url) as client,
            httpx.AsyncClient(base_url=server.base_url) as rest,
        ):
            await client.send({"type": "file", "name": "a.txt", "size": 1})
            refused = await client.receive_control()
            catalog = (await rest.get("/v1/tools")).json()
    assert refused["code"] == "files_unavailable"
    assert "agentic" in refused["message"]
    assert catalog["file_chat"]["available"] is False
    assert json.dumps(catalog["file_chat"]["reason"])


async def test_a_file_uploaded_to_one_node_is_opened_by_a_turn_on_another(
    fake_llm: FakeLLM, postgres: PostgresBackend
) -> None:
    """Two nodes share PostgreSQL, each with a disk of its own: a file sent to node A is in
    the sandbox of a turn on node B; replaced on B, A's next turn reads the new version;
    deleted with its conversation, a later conversation of the same id on A has no file."""
    nodes = [oi_settings(fake_llm, **postgres.settings) for _ in range(2)]
    code = "print(open('/workspace/cities.csv').read().splitlines()[1])\n"
    listing = "import os; print([n for n in os.listdir('/workspace') if n[0] != '.'])\n"
    fake_llm.script(
        Behaviour(reply=("Reading it.\n", "```", "python\n", code, "```", "\n")),
        Behaviour(reply="Done."),
        Behaviour(reply=("Reading it.\n", "```", "python\n", code, "```", "\n")),
        Behaviour(reply="Done."),
        Behaviour(reply=("Listing.\n", "```", "python\n", listing, "```", "\n")),
        Behaviour(reply="Done."),
    )
    with trio.fail_after(DEADLINE_S):
        async with (
            running_server(nodes[0]) as a,
            running_server(nodes[1]) as b,
            httpx.AsyncClient(base_url=a.base_url) as rest_a,
            httpx.AsyncClient(base_url=b.base_url) as rest_b,
        ):
            assert a.state.engine.file_chat.files.root != b.state.engine.file_chat.files.root
            sent = await rest_a.post(
                "/v1/conversations/c-shared/files", files=[("file", ("cities.csv", DATA))]
            )
            listed_on_b = await rest_b.get("/v1/conversations/c-shared/files")
            async with ws_client(b.ws_url) as client:
                on_b = await chat_approved(client, "r1", "c-shared")
            replaced = await rest_b.post(
                "/v1/conversations/c-shared/files",
                files=[("file", ("cities.csv", b"city\nParis,2102650\n"))],
            )
            async with ws_client(a.ws_url) as client:
                on_a = await chat_approved(client, "r2", "c-shared")
            deleted = await rest_b.delete("/v1/conversations/c-shared")
            async with ws_client(a.ws_url) as client:
                after_delete = await chat_approved(client, "r3", "c-shared")
    assert sent.status_code == replaced.status_code == 201
    assert listed_on_b.json()["files"] == [{"name": "cities.csv", "size": len(DATA)}]
    assert "Lyon,522250" in console_of(on_b)
    assert "Paris,2102650" in console_of(on_a)
    assert deleted.status_code == 204
    assert "cities.csv" not in console_of(after_delete)
    assert "[]" in console_of(after_delete)


async def chat_approved(client: WSClient, request_id: str, conversation_id: str) -> list[Any]:
    await client.send(
        {"type": "chat", "id": request_id, "message": "go", "conversation_id": conversation_id}
    )
    await client.approve_when_asked(request_id)
    messages = await client.finish(request_id)
    assert assert_stream_invariants(messages)["type"] == "completion"
    return messages
