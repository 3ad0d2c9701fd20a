"""Conversations that last: context, statuses, retrieval, ownership, restarts and crashes."""

from __future__ import annotations

import os
import signal
import sqlite3

import httpx
import trio

from aether.api.v1.endpoints.chat import AnswerCollector
from aether.testing.fake_llm import Behaviour, FakeLLM
from tests.helpers import (
    aether_process,
    assert_stream_invariants,
    content_of,
    http_settings,
    make_settings,
    running_server,
    ws_client,
)
from tests.history_backends import HistoryBackend, PostgresBackend, SQLiteBackend

DEADLINE_S = 15


async def test_follow_up_turns_send_the_conversation_as_context(
    fake_llm: FakeLLM, history_backend: HistoryBackend
) -> None:
    fake_llm.default = Behaviour(tokens=3)
    with trio.fail_after(DEADLINE_S):
        async with (
            running_server(http_settings(fake_llm, **history_backend.settings)) as server,
            ws_client(server.ws_url) as client,
        ):
            first = await client.chat("first question", id="r1")
            conversation_id = first[0]["conversation_id"]
            second = await client.chat("second question", id="r2", conversation_id=conversation_id)
    assert conversation_id.startswith("c-")
    assert second[0]["conversation_id"] == conversation_id
    assert assert_stream_invariants(second)["type"] == "completion"
    assert fake_llm.streams[1].request["messages"] == [
        {"role": "user", "content": "first question"},
        {"role": "assistant", "content": "tok0 tok1 tok2 "},
        {"role": "user", "content": "second question"},
    ]


async def test_a_turn_does_not_wait_for_another_still_streaming_in_its_conversation(
    fake_llm: FakeLLM, history_backend: HistoryBackend
) -> None:
    # The first answer never ends by itself; the second must stream regardless.
    fake_llm.script(Behaviour(tokens=10_000, delay_s=0.05), Behaviour(tokens=2))
    with trio.fail_after(DEADLINE_S):
        async with (
            running_server(http_settings(fake_llm, **history_backend.settings)) as server,
            ws_client(server.ws_url) as client,
        ):
            await client.send(
                {"type": "chat", "id": "long", "message": "one", "conversation_id": "conv-c"}
            )
            await client.wait_for("long", lambda m: m.get("content"))
            second = await client.chat("two", id="short", conversation_id="conv-c")
            assert "long" in [r.id for r in server.state.engine.tracker.live()]
            await client.send({"type": "stop", "id": "long"})
            stopped = await client.finish("long")
    assert assert_stream_invariants(second)["type"] == "completion"
    assert assert_stream_invariants(stopped)["type"] == "stopped"
    # The second turn's context holds the first question but no answer still being written.
    assert fake_llm.streams[1].request["messages"][-1] == {"role": "user", "content": "two"}


async def test_each_answer_is_stored_with_its_status(
    fake_llm: FakeLLM, history_backend: HistoryBackend
) -> None:
    fake_llm.script(
        Behaviour(tokens=3), Behaviour(tokens=10_000, delay_s=0.01), Behaviour(status=503)
    )
    with trio.fail_after(DEADLINE_S):
        async with (
            running_server(http_settings(fake_llm)) as server,
            ws_client(server.ws_url) as client,
            httpx.AsyncClient(base_url=server.base_url) as rest,
        ):
            done = await client.chat("one", id="r1", conversation_id="conv-1")
            await client.send(
                {"type": "chat", "id": "r2", "message": "two", "conversation_id": "conv-1"}
            )
            await client.wait_for("r2", lambda m: m.get("content"))
            await client.send({"type": "stop", "id": "r2"})
            stopped = await client.finish("r2")
            await client.chat("three", id="r3", conversation_id="conv-1")
            await server.state.engine.tracker.wait_until_idle()
            history = await rest.get("/v1/chat/history", params={"conversation_id": "conv-1"})
            await client.send({"type": "history", "conversation_id": "conv-1"})
            over_ws = await client.receive_control()
    messages = history.json()["messages"]
    assert [(m["role"], m["status"], m["request_id"]) for m in messages] == [
        ("user", "complete", "r1"),
        ("assistant", "complete", "r1"),
        ("user", "complete", "r2"),
        ("assistant", "stopped", "r2"),
        ("user", "complete", "r3"),
        ("assistant", "error", "r3"),
    ]
    assert messages[1]["content"] == content_of(done)
    assert messages[3]["content"] == content_of(stopped)  # exactly what the user saw
    assert messages[5]["error_code"] == "upstream_http_error"
    assert over_ws["type"] == "history"
    assert over_ws["messages"] == messages


async def test_listing_paging_and_deleting_conversations(
    fake_llm: FakeLLM, history_backend: HistoryBackend
) -> None:
    fake_llm.default = Behaviour(tokens=1)
    with trio.fail_after(DEADLINE_S):
        async with (
            running_server(http_settings(fake_llm)) as server,
            httpx.AsyncClient(base_url=server.base_url) as rest,
        ):
            for index in range(5):
                answer = await rest.post(
                    "/v1/chat", json={"message": f"topic {index}", "conversation_id": f"k{index}"}
                )
                assert answer.json()["conversation_id"] == f"k{index}"
            first = (await rest.get("/v1/conversations", params={"limit": 3})).json()
            second = (
                await rest.get(
                    "/v1/conversations", params={"limit": 3, "before": first["next_before"]}
                )
            ).json()
            deleted = await rest.delete("/v1/conversations/k4")
            again = await rest.delete("/v1/conversations/k4")
            gone = await rest.get("/v1/chat/history", params={"conversation_id": "k4"})
            bad_limit = await rest.get("/v1/conversations", params={"limit": 0})
    assert [c["id"] for c in first["conversations"]] == ["k4", "k3", "k2"]
    assert [c["id"] for c in second["conversations"]] == ["k1", "k0"]
    assert second["next_before"] is None
    assert first["conversations"][0]["title"] == "topic 4"
    assert deleted.status_code == 204
    assert again.status_code == 404
    assert gone.status_code == 404
    assert bad_limit.status_code == 400


KEY_A, KEY_B = "key-a-0123456789", "key-b-0123456789"
ALICE, BOB = {"Authorization": f"Bearer {KEY_A}"}, {"Authorization": f"Bearer {KEY_B}"}


async def test_conversation_ids_are_per_caller(
    fake_llm: FakeLLM, history_backend: HistoryBackend
) -> None:
    """Alice's "c1" and Bob's "c1" are two conversations, over REST and the WebSocket: each
    works, each sees only its own, and neither can tell that the other's exists."""
    fake_llm.default = Behaviour(tokens=1)
    settings = http_settings(fake_llm, api_keys=f"{KEY_A},{KEY_B}", **history_backend.settings)
    with trio.fail_after(DEADLINE_S):
        async with (
            running_server(settings) as server,
            httpx.AsyncClient(base_url=server.base_url) as rest,
        ):

            async def chat(headers: dict[str, str], message: str) -> httpx.Response:
                body = {"message": message, "conversation_id": "c1"}
                return await rest.post("/v1/chat", json=body, headers=headers)

            async def history(headers: dict[str, str], conversation_id: str) -> httpx.Response:
                params = {"conversation_id": conversation_id}
                return await rest.get("/v1/chat/history", params=params, headers=headers)

            alice_first = await chat(ALICE, "alice 1")
            bob_first = await chat(BOB, "bob 1")  # Alice holds "c1": Bob gets his own
            async with (
                ws_client(server.ws_url, subprotocols=["aether.v2", f"bearer.{KEY_A}"]) as alice,
                ws_client(server.ws_url, subprotocols=["aether.v2", f"bearer.{KEY_B}"]) as bob,
            ):
                alice_second = await alice.chat("alice 2", id="a2", conversation_id="c1")
                bob_second = await bob.chat("bob 2", id="b2", conversation_id="c1")
                await bob.send({"type": "history", "conversation_id": "c1"})
                bob_ws_history = await bob.receive_control()
                await alice.chat("only alice", id="a3", conversation_id="alice-only")
                await bob.send({"type": "history", "conversation_id": "alice-only"})
                bob_ws_theirs = await bob.receive_control()
                await bob.send({"type": "history", "conversation_id": "nobody"})
                bob_ws_nobody = await bob.receive_control()
            alice_history = await history(ALICE, "c1")
            bob_history = await history(BOB, "c1")
            alice_list = await rest.get("/v1/conversations", headers=ALICE)
            bob_list = await rest.get("/v1/conversations", headers=BOB)
            bob_reads_theirs = await history(BOB, "alice-only")
            bob_reads_nobody = await history(BOB, "nobody")
            bob_deletes_theirs = await rest.delete("/v1/conversations/alice-only", headers=BOB)
            bob_deletes_nobody = await rest.delete("/v1/conversations/nobody", headers=BOB)
            bob_deletes_his = await rest.delete("/v1/conversations/c1", headers=BOB)
            alice_after = await history(ALICE, "c1")
            bob_after = await history(BOB, "c1")
    assert (alice_first.status_code, alice_first.json()["conversation_id"]) == (200, "c1")
    assert (bob_first.status_code, bob_first.json()["status"]) == (200, "completed")
    assert assert_stream_invariants(alice_second)["type"] == "completion"
    assert assert_stream_invariants(bob_second)["type"] == "completion"
    # A follow-up continues the caller's own conversation, with its own context.
    contexts = [[m["content"] for m in s.request["messages"]] for s in fake_llm.streams]
    assert contexts[2] == ["alice 1", "tok0 ", "alice 2"]
    assert contexts[3] == ["bob 1", "tok0 ", "bob 2"]
    assert [m["content"] for m in alice_history.json()["messages"]] == [
        "alice 1",
        "tok0 ",
        "alice 2",
        "tok0 ",
    ]
    bob_messages = ["bob 1", "tok0 ", "bob 2", "tok0 "]
    assert [m["content"] for m in bob_history.json()["messages"]] == bob_messages
    assert [m["content"] for m in bob_ws_history["messages"]] == bob_messages
    assert sorted(c["id"] for c in alice_list.json()["conversations"]) == ["alice-only", "c1"]
    assert [c["id"] for c in bob_list.json()["conversations"]] == ["c1"]
    # Another caller's id answers exactly as an id nobody has.
    for theirs, nobody in [
        (bob_reads_theirs, bob_reads_nobody),
        (bob_deletes_theirs, bob_deletes_nobody),
    ]:
        assert theirs.status_code == nobody.status_code == 404
        theirs_error, nobody_error = theirs.json()["error"], nobody.json()["error"]
        assert theirs_error.keys() == nobody_error.keys()
        assert theirs_error["code"] == nobody_error["code"] == "unknown_conversation"
        assert theirs_error["message"].replace("alice-only", "nobody") == nobody_error["message"]
    assert bob_ws_theirs.keys() == bob_ws_nobody.keys()
    assert bob_ws_theirs["code"] == bob_ws_nobody["code"] == "unknown_conversation"
    assert bob_deletes_his.status_code == 204
    assert alice_after.json() == alice_history.json()
    assert bob_after.status_code == 404


async def test_a_conversation_is_renamed_by_its_owner_only(
    fake_llm: FakeLLM, history_backend: HistoryBackend
) -> None:
    fake_llm.default = Behaviour(tokens=1)
    settings = http_settings(fake_llm, api_keys=f"{KEY_A},{KEY_B}", **history_backend.settings)
    with trio.fail_after(DEADLINE_S):
        async with (
            running_server(settings) as server,
            httpx.AsyncClient(base_url=server.base_url) as rest,
        ):

            async def rename(headers: dict[str, str], body: object) -> httpx.Response:
                return await rest.patch("/v1/conversations/c1", json=body, headers=headers)

            await rest.post(
                "/v1/chat", json={"message": "hi", "conversation_id": "c1"}, headers=ALICE
            )
            before = (await rest.get("/v1/conversations", headers=ALICE)).json()
            renamed = await rename(ALICE, {"title": "  Trip to Lyon "})
            after = (await rest.get("/v1/conversations", headers=ALICE)).json()
            by_bob = await rename(BOB, {"title": "mine now"})
            refused = [
                await rename(ALICE, body)
                for body in ({"title": ""}, {"title": "   "}, {"title": "x" * 201}, {"name": "t"})
            ]
            not_json = await rest.patch(
                "/v1/conversations/c1",
                content=b"title=t",
                headers={**ALICE, "content-type": "text/plain"},
            )
            at_the_end = (await rest.get("/v1/conversations", headers=ALICE)).json()
    assert before["conversations"][0]["title"] == "hi"
    assert renamed.status_code == 200
    assert renamed.json()["title"] == "Trip to Lyon"
    assert after["conversations"][0] == renamed.json()
    # A rename is not activity: the conversation keeps its place in the list.
    assert renamed.json()["updated_at"] == before["conversations"][0]["updated_at"]
    assert by_bob.status_code == 404
    assert by_bob.json()["error"]["code"] == "unknown_conversation"
    assert [r.status_code for r in refused] == [400, 400, 400, 400]
    assert not_json.status_code == 415
    assert at_the_end["conversations"][0]["title"] == "Trip to Lyon"


def test_an_unknown_conversation_ending_a_rest_chat_is_a_404() -> None:
    collector = AnswerCollector("r1")
    collector.add({"type": "error", "code": "unknown_conversation", "message": "no such"})
    status, _body = collector.answer()
    assert status == 404


async def test_history_survives_a_restart(
    fake_llm: FakeLLM, history_backend: HistoryBackend
) -> None:
    fake_llm.default = Behaviour(tokens=2)
    settings = http_settings(fake_llm, **history_backend.settings)
    with trio.fail_after(DEADLINE_S):
        async with (
            running_server(settings) as server,
            ws_client(server.ws_url) as client,
        ):
            await client.chat("remember me", id="r1", conversation_id="keep")
        async with running_server(settings) as server:
            async with httpx.AsyncClient(base_url=server.base_url) as rest:
                history = await rest.get("/v1/chat/history", params={"conversation_id": "keep"})
            async with ws_client(server.ws_url) as client:
                await client.chat("and now?", id="r2", conversation_id="keep")
    assert [m["content"] for m in history.json()["messages"]] == ["remember me", "tok0 tok1 "]
    assert fake_llm.streams[1].request["messages"][0] == {"role": "user", "content": "remember me"}


async def test_a_storage_failure_is_an_error_and_the_server_keeps_serving(
    fake_llm: FakeLLM,
) -> None:
    fake_llm.default = Behaviour(tokens=2)
    with trio.fail_after(DEADLINE_S):
        async with (
            running_server(http_settings(fake_llm)) as server,
            ws_client(server.ws_url) as client,
        ):
            store = server.state.engine.history
            assert store is not None
            writer = store._writer  # break the store under the engine: a real sqlite3 error
            assert writer is not None
            writer.close()
            failed = await client.chat("hi", id="r1")
            await client.send({"type": "ping"})
            pong = await client.receive_control()
    terminal = assert_stream_invariants(failed)
    assert (terminal["type"], terminal["code"]) == ("error", "storage_error")
    assert "sqlite" not in terminal["message"].lower()
    assert "Error" not in terminal["message"]
    assert pong["type"] == "pong"


async def test_a_killed_server_leaves_consistent_history(
    fake_llm: FakeLLM, history_backend: HistoryBackend
) -> None:
    """kill -9 mid-stream, then restart: completed answers are whole, the interrupted one keeps
    the text saved so far, and the database passes its integrity check."""
    fake_llm.script(Behaviour(tokens=3), Behaviour(tokens=100_000, delay_s=0.01))
    env = {k: v for k, v in os.environ.items() if not k.startswith("AETHER_")}
    env.update(
        history_backend.environment,
        AETHER_PROVIDER="http",
        AETHER_LLM_BASE_URL=fake_llm.base_url,
        AETHER_LLM_MODEL="fake-model",
    )
    with trio.fail_after(30):
        async with aether_process(env) as server, ws_client(server.ws_url) as client:
            await client.chat("finished", id="r1", conversation_id="crash")
            await client.send(
                {"type": "chat", "id": "r2", "message": "long", "conversation_id": "crash"}
            )
            # Wait until a periodic save has stored part of the answer, then kill -9.
            await client.wait_for("r2", lambda m: "tok150 " in m.get("content", ""))
            server.process.send_signal(signal.SIGKILL)
            assert await server.process.wait() == -signal.SIGKILL
        if isinstance(history_backend, PostgresBackend):
            # The dead server's lease would run out within its period; the next start's sweep
            # then marks its answers (the sweep and the lease are tested on their own).
            history_backend.expire_leases()
        settings = make_settings(provider="echo", **history_backend.settings)
        async with (
            running_server(settings) as server,
            httpx.AsyncClient(base_url=server.base_url) as rest,
        ):
            history = await rest.get("/v1/chat/history", params={"conversation_id": "crash"})
    messages = history.json()["messages"]
    assert [(m["role"], m["status"]) for m in messages] == [
        ("user", "complete"),
        ("assistant", "complete"),
        ("user", "complete"),
        ("assistant", "interrupted"),
    ]
    assert messages[1]["content"] == "tok0 tok1 tok2 "
    assert messages[3]["content"].startswith("tok0 tok1 ")
    if isinstance(history_backend, SQLiteBackend):
        with sqlite3.connect(history_backend.path) as db:
            assert db.execute("PRAGMA integrity_check").fetchone() == ("ok",)


async def test_query_parameters_the_schema_calls_invalid_get_a_400(fake_llm: FakeLLM) -> None:
    """Found by schemathesis: ``before=9%0D`` (a number and a carriage return) was read as 9,
    and a parameter given twice silently by its first value."""
    queries = [
        "before=9%0D",
        "before=1&before=2",
        "before=nan",
        "before=inf",
        "before=1_000",
        "limit=%205",
        "limit=2.5",
        "limit=1&limit=2",
    ]
    with trio.fail_after(DEADLINE_S):
        async with (
            running_server(http_settings(fake_llm)) as server,
            httpx.AsyncClient(base_url=server.base_url) as rest,
        ):
            answers = [(await rest.get(f"/v1/conversations?{q}")).status_code for q in queries]
            valid = (await rest.get("/v1/conversations?limit=5&before=1.5e9")).status_code
            twice = await rest.get("/v1/chat/history?conversation_id=a&conversation_id=b")
    assert answers == [400] * len(queries)
    assert valid == 200
    assert twice.status_code == 400
