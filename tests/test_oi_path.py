"""The agentic path on the real open-interpreter package, against the fake upstream."""

from __future__ import annotations

import json
import socket
from typing import Any

import httpx
import pytest
import trio

from aether.core.control.redis_plane import RedisControlPlane
from aether.core.identity import ANONYMOUS
from aether.core.providers.oi.interpreters import InterpreterManager
from aether.core.providers.oi.provider import OIProvider
from aether.testing.fake_llm import Behaviour, FakeLLM
from aether.testing.redis_server import RedisServer
from tests.helpers import (
    OI_MARKS,
    RunningServer,
    assert_stream_invariants,
    console_of,
    content_of,
    make_settings,
    needs_redis,
    oi_settings,
    running_server,
    ws_client,
)
from tests.history_backends import PostgresBackend

pytestmark = list(OI_MARKS)
DEADLINE_S = 60
# Split as a model's tokens are: the fence, the language line, the code, the closing fence.
# Prints a line every 0.1 s for a minute: code that is still running when a turn ends.
SLOW_CODE = "import time\nfor i in range(600):\n    print('tick', i)\n    time.sleep(0.1)\n"
CODE_REPLY = ("Let me compute it.\n", "```", "python\n", "print(6*7)\n", "```", "\n")


def interpreters_of(server: RunningServer) -> InterpreterManager:
    provider = server.state.engine.streamer.oi
    assert isinstance(provider, OIProvider)
    return provider.interpreters


def kinds(messages: list[dict[str, Any]]) -> list[str]:
    return [m["type"] for m in messages if m.get("start")]


async def test_text_answer_streams_over_the_agentic_path(fake_llm: FakeLLM) -> None:
    fake_llm.script(Behaviour(reply="Hello from the agent."))
    with trio.fail_after(DEADLINE_S):
        async with (
            running_server(oi_settings(fake_llm)) as server,
            ws_client(server.ws_url) as client,
        ):
            messages = await client.chat("hi", id="r1")
    assert assert_stream_invariants(messages)["type"] == "completion"
    assert messages[0]["path"] == "oi"
    assert content_of(messages).strip() == "Hello from the agent."


async def test_code_runs_only_after_approval(fake_llm: FakeLLM) -> None:
    fake_llm.script(Behaviour(reply=CODE_REPLY), Behaviour(reply="The answer is 42."))
    with trio.fail_after(DEADLINE_S):
        async with (
            running_server(oi_settings(fake_llm)) as server,
            ws_client(server.ws_url) as client,
        ):
            await client.send({"type": "chat", "id": "r1", "message": "what is 6*7?"})
            confirmation = await client.wait_for("r1", lambda m: m["type"] == "confirmation")
            assert len(fake_llm.streams) == 1  # waiting: nothing ran, nothing more was asked
            await client.answer(confirmation, approved=True)
            messages = await client.finish("r1")
    assert confirmation["content"]["content"].strip() == "print(6*7)"
    assert assert_stream_invariants(messages)["type"] == "completion"
    console = "".join(
        m.get("content", "") for m in messages if m["type"] == "console" and "content" in m
    )
    assert "42" in console
    assert "code" in kinds(messages)


async def test_denied_code_never_runs(fake_llm: FakeLLM) -> None:
    fake_llm.script(Behaviour(reply=CODE_REPLY))
    with trio.fail_after(DEADLINE_S):
        async with (
            running_server(oi_settings(fake_llm)) as server,
            ws_client(server.ws_url) as client,
        ):
            await client.send({"type": "chat", "id": "r1", "message": "what is 6*7?"})
            confirmation = await client.wait_for("r1", lambda m: m["type"] == "confirmation")
            await client.answer(confirmation, approved=False)
            messages = await client.finish("r1")
            await server.state.engine.tracker.wait_until_idle()
            await client.answer(confirmation, approved=True)
            late = await client.receive_control()
    assert assert_stream_invariants(messages)["type"] == "completion"
    assert not [m for m in messages if m["type"] == "console"]
    assert len(fake_llm.streams) == 1
    assert late["code"] == "unknown_request"


async def test_stop_closes_the_model_stream_and_the_loop_stays_responsive(
    fake_llm: FakeLLM,
) -> None:
    fake_llm.script(Behaviour(reply="word " * 2000, piece_chars=5, delay_s=0.01))
    with trio.fail_after(DEADLINE_S):
        async with (
            running_server(oi_settings(fake_llm)) as server,
            ws_client(server.ws_url) as client,
            httpx.AsyncClient(base_url=server.base_url) as rest,
        ):
            await client.send({"type": "chat", "id": "r1", "message": "talk"})
            await client.wait_for("r1", lambda m: m.get("content"))
            started = trio.current_time()
            health = await rest.get("/health")
            probe_s = trio.current_time() - started
            stop_at = trio.current_time()
            await client.send({"type": "stop", "id": "r1"})
            messages = await client.finish("r1")
            record = fake_llm.streams[0]
            await record.closed.wait()
            closed_after = trio.current_time() - stop_at
            while_stopping = await rest.get("/health")
            await server.state.engine.tracker.wait_until_idle()
    terminal = assert_stream_invariants(messages)
    assert (terminal["type"], terminal["reason"]) == ("stopped", "stop")
    assert record.outcome == "client_closed"
    assert closed_after < 0.5
    assert health.status_code == while_stopping.status_code == 200
    assert probe_s < 0.5


@pytest.mark.parametrize("mode", ["on", "off"])  # code as a tool call, or in fences
async def test_stop_while_waiting_for_approval_ends_the_turn_without_running_code(
    fake_llm: FakeLLM, mode: str
) -> None:
    fake_llm.script(Behaviour(reply=CODE_REPLY))
    with trio.fail_after(DEADLINE_S):
        async with (
            running_server(oi_settings(fake_llm, oi_function_calling=mode)) as server,
            ws_client(server.ws_url) as client,
        ):
            await client.send({"type": "chat", "id": "r1", "message": "what is 6*7?"})
            await client.wait_for("r1", lambda m: m["type"] == "confirmation")
            await client.send({"type": "stop", "id": "r1"})
            messages = await client.finish("r1")
            await server.state.engine.tracker.wait_until_idle()
    terminal = assert_stream_invariants(messages)
    assert (terminal["type"], terminal["reason"]) == ("stopped", "stop")
    assert not [m for m in messages if m["type"] == "console"]
    assert len(fake_llm.streams) == 1


async def test_disconnect_while_waiting_for_approval_leaves_nothing_behind(
    fake_llm: FakeLLM,
) -> None:
    fake_llm.script(Behaviour(reply=CODE_REPLY))
    with trio.fail_after(DEADLINE_S):
        async with running_server(oi_settings(fake_llm)) as server:
            async with ws_client(server.ws_url) as client:
                await client.send({"type": "chat", "id": "r1", "message": "what is 6*7?"})
                await client.wait_for("r1", lambda m: m["type"] == "confirmation")
            await server.state.engine.tracker.wait_until_idle()
            record = server.state.engine.tracker.get("r1", "anonymous")
    assert record is not None
    assert (record.state, record.stop_reason) == ("stopped", "disconnect")


async def test_conversations_get_their_own_interpreters(fake_llm: FakeLLM) -> None:
    fake_llm.default = Behaviour(reply="ok.")
    with trio.fail_after(DEADLINE_S):
        async with (
            running_server(oi_settings(fake_llm)) as server,
            ws_client(server.ws_url) as client,
        ):
            await client.send(
                {"type": "chat", "id": "a1", "message": "alpha", "conversation_id": "ca"}
            )
            await client.send(
                {"type": "chat", "id": "b1", "message": "bravo", "conversation_id": "cb"}
            )
            first = [await client.finish("a1"), await client.finish("b1")]
            await client.chat("alpha again", id="a2", conversation_id="ca")
    assert all(assert_stream_invariants(m)["type"] == "completion" for m in first)
    by_last = {
        s.request["messages"][-1]["content"]: s.request["messages"] for s in fake_llm.streams
    }
    later = [m["content"] for m in by_last["alpha again"] if m["role"] == "user"]
    # The second turn of conversation "ca" carries its own first turn, and nothing of "cb".
    assert any("alpha" in text for text in later[:-1])
    assert not any("bravo" in str(m.get("content")) for m in by_last["alpha again"])


async def test_tool_catalog_says_what_the_server_offers(fake_llm: FakeLLM) -> None:
    with trio.fail_after(DEADLINE_S):
        async with (
            running_server(oi_settings(fake_llm)) as server,
            httpx.AsyncClient(base_url=server.base_url) as rest,
        ):
            catalog = (await rest.get("/v1/tools")).json()
        echo_only = make_settings(provider="echo")
        async with (
            running_server(echo_only) as server,
            httpx.AsyncClient(base_url=server.base_url) as rest,
        ):
            plain = (await rest.get("/v1/tools")).json()
    assert catalog["paths"] == ["auto", "echo", "http", "oi"]
    assert catalog["default_path"] == "oi"
    assert catalog["code_execution"] == {
        "available": True,
        "requires_approval": True,
        "profile": None,
    }
    assert catalog["web_search"]["available"] is False
    assert "AETHER_SEARCH_URL" in catalog["web_search"]["reason"]
    assert catalog["file_chat"]["available"] is True
    assert ".csv" in catalog["file_chat"]["file_types"]
    assert plain["paths"] == ["auto", "echo"]
    assert plain["code_execution"]["available"] is False


async def test_web_search_is_a_function_the_agent_can_call(fake_llm: FakeLLM) -> None:
    fake_llm.search_results = [
        {"title": "Notes on structured concurrency", "url": "https://example.org/n", "content": "x"}
    ]
    code = 'print(web_search("structured concurrency")[0]["title"])\n'
    fake_llm.script(
        Behaviour(reply=("Searching.\n", "```", "python\n", code, "```", "\n")),
        Behaviour(reply="Found it."),
    )
    settings = oi_settings(fake_llm, search_url=fake_llm.search_url, search_results=3)
    with trio.fail_after(DEADLINE_S):
        async with (
            running_server(settings) as server,
            ws_client(server.ws_url) as client,
            httpx.AsyncClient(base_url=server.base_url) as rest,
        ):
            catalog = (await rest.get("/v1/tools")).json()
            await client.send({"type": "chat", "id": "r1", "message": "search it"})
            await client.approve_when_asked("r1")
            messages = await client.finish("r1")
    assert catalog["web_search"] == {"available": True, "reason": None}
    system = fake_llm.streams[0].request["messages"][0]
    assert system["role"] == "system"
    assert "web_search(query)" in system["content"]
    assert fake_llm.searches == ["structured concurrency"]
    console = console_of(messages)
    assert "Notes on structured concurrency" in console
    assert assert_stream_invariants(messages)["type"] == "completion"


async def test_control_strings_in_a_message_cannot_turn_on_auto_run(fake_llm: FakeLLM) -> None:
    fake_llm.script(Behaviour(reply=CODE_REPLY))
    with trio.fail_after(DEADLINE_S):
        async with (
            running_server(oi_settings(fake_llm)) as server,
            ws_client(server.ws_url) as client,
        ):
            message = "{AUTO_RUN_ON} %auto_run true %%auto_run on -y what is 6*7?"
            await client.send({"type": "chat", "id": "r1", "message": message})
            confirmation = await client.wait_for("r1", lambda m: m["type"] == "confirmation")
            await client.send({"type": "stop", "id": "r1"})
            messages = await client.finish("r1")
    assert confirmation["role"] == "computer"
    assert assert_stream_invariants(messages)["type"] == "stopped"
    assert not [m for m in messages if m["type"] == "console"]  # the code never ran


async def test_stop_while_code_runs_interrupts_it(fake_llm: FakeLLM) -> None:
    slow = (
        "import time\nfor i in range(600):\n    print('tick', i, flush=True)\n    time.sleep(0.1)\n"
    )
    quick = "print('next turn ran')\n"
    fake_llm.script(
        Behaviour(reply=("Counting.\n", "```", "python\n", slow, "```", "\n")),
        Behaviour(reply=("Again.\n", "```", "python\n", quick, "```", "\n")),
        Behaviour(reply="Done."),
    )
    with trio.fail_after(DEADLINE_S):
        async with (
            running_server(oi_settings(fake_llm)) as server,
            ws_client(server.ws_url) as client,
        ):
            await client.send(
                {"type": "chat", "id": "r1", "message": "count", "conversation_id": "k"}
            )
            await client.approve_when_asked("r1")
            await client.wait_for("r1", lambda m: "tick 2" in str(m.get("content", "")))
            await client.send({"type": "stop", "id": "r1"})
            stopped = await client.finish("r1")
            # The kernel is free again: the conversation's next code runs at once.
            with trio.fail_after(20):
                await client.send(
                    {"type": "chat", "id": "r2", "message": "again", "conversation_id": "k"}
                )
                await client.approve_when_asked("r2")
                second = await client.finish("r2")
    assert assert_stream_invariants(stopped)["type"] == "stopped"
    console = console_of(second)
    assert "next turn ran" in console
    assert "tick" not in console


async def test_a_closed_interpreter_comes_back_with_the_stored_conversation(
    fake_llm: FakeLLM,
) -> None:
    fake_llm.default = Behaviour(reply="ok.")
    with trio.fail_after(DEADLINE_S):
        async with (
            running_server(oi_settings(fake_llm, oi_max_interpreters=1)) as server,
            ws_client(server.ws_url) as client,
        ):
            await client.chat("alpha", id="a1", conversation_id="ca")
            await client.chat("bravo", id="b1", conversation_id="cb")  # closes ca's interpreter
            await client.chat("alpha again", id="a2", conversation_id="ca")
    sent = fake_llm.streams[-1].request["messages"]
    turns = [(m["role"], m["content"].strip()) for m in sent if m["role"] != "system"]
    assert turns == [("user", "alpha"), ("assistant", "ok."), ("user", "alpha again")]


async def test_sse_streams_the_agentic_path_and_rest_approves_its_code(fake_llm: FakeLLM) -> None:
    fake_llm.script(Behaviour(reply=CODE_REPLY), Behaviour(reply="The answer is 42."))
    events: list[dict[str, Any]] = []
    answers: dict[str, httpx.Response] = {}
    with trio.fail_after(DEADLINE_S):
        async with (
            running_server(oi_settings(fake_llm)) as server,
            httpx.AsyncClient(base_url=server.base_url, timeout=DEADLINE_S) as rest,
        ):
            body = {"message": "what is 6*7?", "id": "s1", "path": "oi"}
            async with rest.stream("POST", "/v1/chat/stream", json=body) as response:
                async for line in response.aiter_lines():
                    if not line.startswith("data: "):
                        continue
                    events.append(json.loads(line[6:]))
                    if events[-1]["type"] == "confirmation":
                        url = "/v1/chat/s1/approve"
                        named = {"confirmation_id": events[-1]["confirmation_id"]}
                        answers["bad"] = await rest.post(url, json={**named, "approved": "yes"})
                        answers["unnamed"] = await rest.post(url, json={"approved": True})
                        answers["ok"] = await rest.post(url, json={**named, "approved": True})
                        answers["again"] = await rest.post(url, json={**named, "approved": True})
                        answers["unknown"] = await rest.post(
                            "/v1/chat/nope/approve", json={**named, "approved": True}
                        )
    assert answers["bad"].status_code == 400
    assert answers["unnamed"].status_code == 400
    assert answers["ok"].status_code == 202
    assert answers["ok"].json() == {"id": "s1", "approved": True}
    assert answers["again"].status_code == 409
    assert answers["again"].json()["error"]["code"] == "stale_confirmation"
    assert answers["unknown"].status_code == 404
    assert assert_stream_invariants(events)["type"] == "completion"
    console = "".join(str(e.get("content", "")) for e in events if e["type"] == "console")
    assert "42" in console


async def test_stop_before_the_first_token_closes_the_model_stream(fake_llm: FakeLLM) -> None:
    fake_llm.script(Behaviour(reply="late", first_token_delay_s=30))
    with trio.fail_after(DEADLINE_S):
        async with (
            running_server(oi_settings(fake_llm)) as server,
            ws_client(server.ws_url) as client,
        ):
            await client.send({"type": "chat", "id": "r1", "message": "hi"})
            record = await fake_llm.wait_for_stream(0)
            await client.send({"type": "stop", "id": "r1"})
            messages = await client.finish("r1")
            await record.closed.wait()
            await server.state.engine.tracker.wait_until_idle()
    assert assert_stream_invariants(messages)["type"] == "stopped"
    assert record.tokens_sent == 0
    assert record.outcome == "client_closed"


@pytest.mark.parametrize("state", ["before_first_token", "mid_text", "code_running"])
async def test_a_client_that_leaves_stops_its_turn_in_any_state(
    fake_llm: FakeLLM, state: str
) -> None:
    first = {
        "before_first_token": Behaviour(reply="late", first_token_delay_s=30),
        "mid_text": Behaviour(reply="word " * 2000, piece_chars=5, delay_s=0.01),
        "code_running": Behaviour(reply=("Counting.\n", "```", "python\n", SLOW_CODE, "```")),
    }[state]
    quick = "print('next turn ran')\n"
    fake_llm.script(
        first,
        Behaviour(reply=("Again.\n", "```", "python\n", quick, "```", "\n")),
        Behaviour(reply="Done."),
    )
    chat = {"type": "chat", "id": "r1", "message": "go", "conversation_id": "k"}
    with trio.fail_after(DEADLINE_S):
        async with running_server(oi_settings(fake_llm)) as server:
            async with ws_client(server.ws_url) as client:
                await client.send(chat)
                if state == "before_first_token":
                    await fake_llm.wait_for_stream(0)
                elif state == "mid_text":
                    await client.wait_for("r1", lambda m: m.get("content"))
                else:
                    await client.approve_when_asked("r1")
                    await client.wait_for("r1", lambda m: "tick 2" in str(m.get("content", "")))
            await fake_llm.streams[0].closed.wait()
            await server.state.engine.tracker.wait_until_idle()
            record = server.state.engine.tracker.get("r1", ANONYMOUS)
            # The conversation goes on from a new connection, its kernel free at once.
            async with ws_client(server.ws_url) as client:
                with trio.fail_after(20):
                    await client.send({**chat, "id": "r2", "message": "again"})
                    await client.approve_when_asked("r2")
                    second = await client.finish("r2")
    assert record is not None
    assert (record.state, record.stop_reason) == ("stopped", "disconnect")
    console = console_of(second)
    assert "next turn ran" in console
    assert "tick" not in console


async def test_turns_of_one_conversation_take_its_interpreter_one_at_a_time(
    fake_llm: FakeLLM,
) -> None:
    fake_llm.default = Behaviour(reply="ok.")
    with trio.fail_after(DEADLINE_S):
        async with (
            running_server(oi_settings(fake_llm)) as server,
            ws_client(server.ws_url) as client,
        ):
            for request_id in ("t1", "t2"):
                await client.send(
                    {
                        "type": "chat",
                        "id": request_id,
                        "message": request_id,
                        "conversation_id": "k",
                    }
                )
            done = [await client.finish("t1"), await client.finish("t2")]
            created = interpreters_of(server).created
    assert [assert_stream_invariants(m)["type"] for m in done] == ["completion", "completion"]
    assert created == 1
    # The second turn ran after the first, on the same interpreter: it carries the first.
    second = [(m["role"], m["content"].strip()) for m in fake_llm.streams[1].request["messages"]]
    assert second[1:] == [("user", "t1"), ("assistant", "ok."), ("user", "t2")]


async def test_a_deleted_conversation_takes_its_interpreter_with_it(fake_llm: FakeLLM) -> None:
    fake_llm.default = Behaviour(reply="ok.")
    with trio.fail_after(DEADLINE_S):
        async with (
            running_server(oi_settings(fake_llm)) as server,
            ws_client(server.ws_url) as client,
            httpx.AsyncClient(base_url=server.base_url) as rest,
        ):
            interpreters = interpreters_of(server)
            first = await client.chat("remember: blue", id="t1", conversation_id="k")
            deleted = await rest.delete("/v1/conversations/k")
            open_after_delete = interpreters.open_count
            second = await client.chat("what did I say?", id="t2", conversation_id="k")
            created = interpreters.created
    assert [assert_stream_invariants(m)["type"] for m in (first, second)] == ["completion"] * 2
    assert deleted.status_code == 204
    assert open_after_delete == 0
    assert created == 2
    # The new conversation of that id starts afresh: the deleted one is not its context.
    second_request = [m["content"].strip() for m in fake_llm.streams[1].request["messages"]]
    assert "remember: blue" not in " ".join(second_request)


async def test_a_conversation_deleted_mid_turn_loses_its_interpreter_when_the_turn_ends(
    fake_llm: FakeLLM,
) -> None:
    fake_llm.script(Behaviour(reply=("Counting.\n", "```", "python\n", SLOW_CODE, "```", "\n")))
    with trio.fail_after(DEADLINE_S):
        async with (
            running_server(oi_settings(fake_llm)) as server,
            ws_client(server.ws_url) as client,
            httpx.AsyncClient(base_url=server.base_url) as rest,
        ):
            interpreters = interpreters_of(server)
            await client.send(
                {"type": "chat", "id": "a", "message": "count", "conversation_id": "A"}
            )
            await client.approve_when_asked("a")
            await client.wait_for("a", lambda m: "tick 1" in str(m.get("content", "")))
            deleted = await rest.delete("/v1/conversations/A")
            open_while_running = interpreters.open_count
            await client.send({"type": "stop", "id": "a"})
            stopped = await client.finish("a")
            await server.state.engine.tracker.wait_until_idle()
            open_after = interpreters.open_count
    assert deleted.status_code == 204
    assert open_while_running == 1  # the running turn keeps it
    assert assert_stream_invariants(stopped)["type"] == "stopped"
    assert open_after == 0


async def test_an_interpreter_in_use_is_not_closed_to_make_room(fake_llm: FakeLLM) -> None:
    fake_llm.script(
        Behaviour(reply=("Counting.\n", "```", "python\n", SLOW_CODE, "```", "\n")),
        Behaviour(reply="ok."),
    )
    with trio.fail_after(DEADLINE_S):
        async with (
            running_server(oi_settings(fake_llm, oi_max_interpreters=1)) as server,
            ws_client(server.ws_url) as client,
        ):
            long_chat = {"type": "chat", "id": "a", "message": "count", "conversation_id": "A"}
            await client.send(long_chat)
            await client.approve_when_asked("a")
            await client.wait_for("a", lambda m: "tick 1" in str(m.get("content", "")))
            other = await client.chat("short", id="b", conversation_id="B")  # over the cap
            ticks = "".join(str(m.get("content", "")) for m in client.messages.by_request["a"])
            after = ticks.count("tick") + 3
            # A's code still runs: its kernel was not closed to make room for B's interpreter.
            await client.wait_for("a", lambda m: f"tick {after}" in str(m.get("content", "")))
            await client.send({"type": "stop", "id": "a"})
            stopped = await client.finish("a")
    assert assert_stream_invariants(other)["type"] == "completion"
    assert assert_stream_invariants(stopped)["type"] == "stopped"


async def test_two_callers_conversations_of_the_same_id_have_separate_interpreters(
    fake_llm: FakeLLM,
) -> None:
    """Conversation ids are per caller: Alice's "c1" and Bob's "c1" are two conversations, and
    what Alice's approved code leaves in its interpreter is not Bob's to read."""
    define = ("Setting it.\n", "```", "python\n", "secret_of_alice = 4711\n", "```", "\n")
    read = ("Reading it.\n", "```", "python\n", "print(secret_of_alice)\n", "```", "\n")
    fake_llm.script(
        Behaviour(reply=define),
        Behaviour(reply="Done."),
        Behaviour(reply=read),
        Behaviour(reply="?"),
    )
    settings = oi_settings(fake_llm, api_keys="key-alice-0123456789,key-bob-0123456789")
    with trio.fail_after(DEADLINE_S):
        async with running_server(settings) as server:
            for key in ("alice", "bob"):
                async with ws_client(
                    server.ws_url, subprotocols=["aether.v2", f"bearer.key-{key}-0123456789"]
                ) as client:
                    await client.send(
                        {"type": "chat", "id": key, "message": "go", "conversation_id": "c1"}
                    )
                    await client.approve_when_asked(key)
                    outputs = await client.finish(key)
    assert "4711" not in console_of(outputs)  # Bob's turn: a fresh interpreter
    assert "NameError" in console_of(outputs)


@needs_redis
async def test_an_interpreter_follows_turns_taken_on_another_node(
    fake_llm: FakeLLM, postgres: PostgresBackend, redis: RedisServer
) -> None:
    """Two nodes share the history and Redis: a conversation's turns go where its requests
    land. The interpreter kept on node A learns of the turn taken on B before its next turn;
    and when the conversation is deleted on B, A's interpreter goes too (B tells every worker),
    so the conversation begun anew under that id starts afresh."""
    fake_llm.default = Behaviour(reply="ok.")
    settings = oi_settings(fake_llm, redis_url=redis.url, **postgres.settings)
    with trio.fail_after(DEADLINE_S):
        async with (
            running_server(settings) as a,
            running_server(settings) as b,
            ws_client(a.ws_url) as on_a,
            ws_client(b.ws_url) as on_b,
            httpx.AsyncClient(base_url=b.base_url) as rest_b,
        ):
            await on_a.chat("remember: blue", id="t1", conversation_id="k")
            await on_b.chat("remember: red", id="t2", conversation_id="k")
            await on_a.chat("which colours?", id="t3", conversation_id="k")
            deleted = await rest_b.delete("/v1/conversations/k")
            plane = a.state.engine.control
            assert isinstance(plane, RedisControlPlane)
            await plane.wait_forgotten(ANONYMOUS, "k")
            open_on_a = interpreters_of(a).open_count
            await on_a.chat("anything?", id="t4", conversation_id="k")
            created_on_a = interpreters_of(a).created

    def told(index: int) -> str:
        return " ".join(str(m["content"]) for m in fake_llm.streams[index].request["messages"])

    assert "remember: blue" in told(2)
    assert "remember: red" in told(2)
    assert deleted.status_code == 204
    assert open_on_a == 0
    assert "remember" not in told(3)
    assert created_on_a == 2


async def test_a_fence_the_upstream_sends_in_one_chunk_gives_the_code_as_written(
    fake_llm: FakeLLM,
) -> None:
    # Servers that send several tokens per event cut a model's answer like this; the code also
    # names its own language, which must stay in it.
    batched = ("Let me compute that.\n\n", "```python\n", "print('python', 6*7)\n", "```\n")
    fake_llm.script(Behaviour(reply=batched), Behaviour(reply="It is 42."))
    with trio.fail_after(DEADLINE_S):
        async with (
            running_server(oi_settings(fake_llm, oi_function_calling="off")) as server,
            ws_client(server.ws_url) as client,
        ):
            await client.send({"type": "chat", "id": "r1", "message": "what is 6*7?"})
            confirmation = await client.wait_for("r1", lambda m: m["type"] == "confirmation")
            await client.answer(confirmation, approved=True)
            messages = await client.finish("r1")
    assert confirmation["content"]["content"] == "print('python', 6*7)\n"
    assert assert_stream_invariants(messages)["type"] == "completion"
    console = "".join(
        m.get("content", "") for m in messages if m["type"] == "console" and "content" in m
    )
    assert "python 42" in console
    text = "".join(m.get("content", "") for m in messages if m["type"] == "message")
    assert text.startswith("Let me compute that.")


FAILURES = {
    "refused": None,
    "http 500": Behaviour(status=500),
    "http 401": Behaviour(status=401),
    "reset mid-answer": Behaviour(tokens=50, failure="reset", fail_after=3),
    "not json": Behaviour(tokens=50, failure="malformed", fail_after=3),
    "error event": Behaviour(tokens=50, failure="error_event", fail_after=3),
    "no first token": Behaviour(tokens=3, first_token_delay_s=3),
    "silent mid-answer": Behaviour(tokens=3, delay_s=3),
}


@pytest.mark.parametrize("failure", sorted(FAILURES))
async def test_an_upstream_failure_is_named_as_on_the_http_path(
    fake_llm: FakeLLM,
    failure: str,
    caplog: pytest.LogCaptureFixture,
    capfd: pytest.CaptureFixture[str],
) -> None:
    behaviour = FAILURES[failure]
    base_url = fake_llm.base_url
    if behaviour is None:
        with socket.socket() as unused:  # a port nothing listens on
            unused.bind(("127.0.0.1", 0))
            base_url = f"http://127.0.0.1:{unused.getsockname()[1]}/v1"
    answers = {}
    timeouts = {"llm_read_timeout_s": 1.0, "llm_first_token_timeout_s": 1.0}
    with trio.fail_after(DEADLINE_S), caplog.at_level("INFO"):
        for path in ("http", "oi"):
            if behaviour is not None:
                fake_llm.script(behaviour)
            settings = make_settings(
                provider=path, llm_base_url=base_url, llm_model="fake-model", **timeouts
            )
            async with (
                running_server(settings) as server,
                httpx.AsyncClient(base_url=server.base_url, timeout=DEADLINE_S) as rest,
            ):
                answer = await rest.post("/v1/chat", json={"message": "hi", "id": f"r-{path}"})
            answers[path] = (answer.status_code, answer.json()["error"])
    assert answers["oi"] == answers["http"]
    assert answers["oi"][1]["code"].startswith("upstream_")
    # One line says what failed, with the request's id; no traceback.
    said = [r for r in caplog.records if "r-oi" in r.getMessage() and r.levelname != "DEBUG"]
    failed = [r for r in said if answers["oi"][1]["code"] in r.getMessage()]
    assert len(failed) == 1, [r.getMessage() for r in said]
    assert "Traceback" not in caplog.text
    printed = capfd.readouterr()
    for text in (caplog.text, printed.out, printed.err):
        assert "\x1b[" not in text  # no terminal colours from LiteLLM
        assert "Provider List" not in text


async def test_the_openai_face_names_the_agentic_paths_model(fake_llm: FakeLLM) -> None:
    fake_llm.script(Behaviour(reply="Hello."))
    with trio.fail_after(DEADLINE_S):
        async with (
            running_server(oi_settings(fake_llm)) as server,
            httpx.AsyncClient(base_url=server.base_url, timeout=DEADLINE_S) as rest,
        ):
            body = {"model": "", "messages": [{"role": "user", "content": "hi"}]}
            answer = await rest.post("/v1/chat/completions", json=body)
    assert answer.status_code == 200, answer.text
    assert answer.json()["model"] == "fake-model"
    assert answer.json()["choices"][0]["message"]["content"].strip() == "Hello."


async def test_the_agentic_path_is_imported_and_warmed_before_the_server_is_ready(
    fake_llm: FakeLLM, caplog: pytest.LogCaptureFixture
) -> None:
    with trio.fail_after(DEADLINE_S), caplog.at_level("INFO"):
        async with (
            running_server(oi_settings(fake_llm)) as server,
            httpx.AsyncClient(base_url=server.base_url) as rest,
        ):
            ready = await rest.get("/ready")
            prepared = interpreters_of(server).prepared
            asked = fake_llm.requests_seen
    assert ready.status_code == 200
    assert prepared  # before the first chat: it waits for no import
    assert asked == 0  # the warm-up asked no model
    assert "agentic path ready in" in caplog.text


async def test_a_stop_before_the_models_headers_closes_the_connection_at_once(
    fake_llm: FakeLLM,
) -> None:
    # The upstream would send its headers only after the test's deadline: a stop that waited
    # for them (as Open Interpreter's call does) fails it.
    fake_llm.script(Behaviour(tokens=3, headers_delay_s=120))
    with trio.fail_after(DEADLINE_S):
        async with (
            running_server(oi_settings(fake_llm)) as server,
            ws_client(server.ws_url) as client,
        ):
            await client.send({"type": "chat", "id": "r1", "message": "hi"})
            upstream = await fake_llm.wait_for_stream(0)
            await client.send({"type": "stop", "id": "r1"})
            messages = await client.finish("r1")
            await upstream.closed.wait()
            # The turn's thread ends too: the request stops being live.
            await server.state.engine.tracker.wait_until_idle()
    assert assert_stream_invariants(messages)["type"] == "stopped"
    assert upstream.outcome == "client_closed"
    assert upstream.tokens_sent == 0


@pytest.mark.parametrize(
    ("mode", "upstream_tools", "asked_with_tools"),
    [
        ("auto", "supported", [True, True]),
        ("on", "supported", [True, True]),
        ("off", "supported", [False, False]),
        ("auto", "refused", [True, False, False]),  # refused once, then fences
    ],
)
async def test_code_comes_as_a_tool_call_or_in_fences_as_the_mode_and_upstream_say(
    mode: str,
    upstream_tools: Any,
    asked_with_tools: list[bool],
    nursery: trio.Nursery,
    caplog: pytest.LogCaptureFixture,
) -> None:
    fake = FakeLLM(tools=upstream_tools)
    await nursery.start(fake.serve)
    proposal = Behaviour(reply="Let me compute it.\n", code=("python", "print(6*7)"))
    fake.script(*([proposal] * (2 if upstream_tools == "refused" else 1)))
    fake.script(Behaviour(reply="It is 42."))
    with trio.fail_after(DEADLINE_S), caplog.at_level("INFO"):
        async with (
            running_server(oi_settings(fake, oi_function_calling=mode)) as server,
            ws_client(server.ws_url) as client,
        ):
            await client.send({"type": "chat", "id": "r1", "message": "what is 6*7?"})
            confirmation = await client.wait_for("r1", lambda m: m["type"] == "confirmation")
            await client.answer(confirmation, approved=True)
            messages = await client.finish("r1")
    assert confirmation["content"]["content"].strip() == "print(6*7)"
    assert assert_stream_invariants(messages)["type"] == "completion"
    console = "".join(m.get("content", "") for m in messages if m["type"] == "console")
    assert "42" in console
    text = "".join(m.get("content", "") for m in messages if m["type"] == "message")
    assert text.startswith("Let me compute it.")  # said once, the refused attempt relayed nothing
    assert text.count("Let me compute it.") == 1
    requests = [bool(s.request.get("tools")) for s in fake.streams]
    if upstream_tools == "refused":
        requests = [True, *requests]  # the refused request never streamed
    assert requests == asked_with_tools
    refusals = [r for r in caplog.records if "refused tool calls" in r.getMessage()]
    assert len(refusals) == (1 if upstream_tools == "refused" else 0)


async def test_tool_calls_on_an_upstream_that_refuses_them_is_an_error(
    nursery: trio.Nursery,
) -> None:
    fake = FakeLLM(tools="refused")
    await nursery.start(fake.serve)
    with trio.fail_after(DEADLINE_S):
        async with (
            running_server(oi_settings(fake, oi_function_calling="on")) as server,
            ws_client(server.ws_url) as client,
        ):
            messages = await client.chat("hi", id="r1")
    terminal = assert_stream_invariants(messages)
    assert (terminal["type"], terminal["code"]) == ("error", "upstream_http_error")
