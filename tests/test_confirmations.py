"""An approval answers one question: the confirmation it names. A late, repeated or mistaken
approve never runs code the user did not see, and a chat message never approves anything."""

from __future__ import annotations

from typing import Any

import pytest
import trio

from aether.core.chat import Chunk
from aether.core.errors import StaleConfirmation
from aether.core.providers.oi.approval import ApprovalGate
from aether.testing.fake_llm import Behaviour, FakeLLM
from tests.helpers import (
    assert_stream_invariants,
    console_of,
    needs_oi,
    oi_settings,
    running_server,
    ws_client,
)

DEADLINE_S = 60
FIRST_CODE = ("First.\n", "```", "python\n", "print('first ran')\n", "```", "\n")
SECOND_CODE = ("Now this.\n", "```", "python\n", "print('second ran')\n", "```", "\n")


async def test_the_gate_takes_only_the_answer_that_names_its_question() -> None:
    gate = ApprovalGate()
    asked: list[Chunk] = []
    results: list[bool] = []

    async def send(question: Chunk) -> None:
        asked.append(question)

    async def ask() -> None:
        results.append(await gate.ask({"type": "confirmation"}, send))

    with pytest.raises(StaleConfirmation, match="none is"):
        gate.answer("cf-anything", True)
    async with trio.open_nursery() as nursery:
        nursery.start_soon(ask)
        await trio.testing.wait_all_tasks_blocked()
        question_id = asked[0]["confirmation_id"]
        with pytest.raises(StaleConfirmation, match="not the one"):
            gate.answer("cf-" + "0" * 16, True)
        assert gate.pending
        gate.answer(question_id, True)
    assert results == [True]
    with pytest.raises(StaleConfirmation):  # the same answer again: a double click
        gate.answer(question_id, True)
    # The next question has an id of its own.
    async with trio.open_nursery() as nursery:
        nursery.start_soon(ask)
        await trio.testing.wait_all_tasks_blocked()
        assert asked[1]["confirmation_id"] != question_id
        with pytest.raises(StaleConfirmation):
            gate.answer(question_id, True)
        gate.answer(asked[1]["confirmation_id"], False)
    assert results == [True, False]


async def test_a_cancelled_question_takes_no_late_answer() -> None:
    gate = ApprovalGate()
    asked: list[Chunk] = []

    async def send(question: Chunk) -> None:
        asked.append(question)

    async with trio.open_nursery() as nursery:
        nursery.start_soon(gate.ask, {"type": "confirmation"}, send)
        await trio.testing.wait_all_tasks_blocked()
        nursery.cancel_scope.cancel()  # the turn was stopped
    assert not gate.pending
    with pytest.raises(StaleConfirmation):
        gate.answer(asked[0]["confirmation_id"], True)


async def next_error(client: Any) -> dict[str, Any]:
    message = await client.receive_control()
    assert message["type"] == "error", message
    return message


@needs_oi
async def test_a_repeated_approve_does_not_approve_the_next_code(fake_llm: FakeLLM) -> None:
    """The first code runs and the model proposes more: the first approve, sent again (a double
    click, a retry), is refused and the second code does not run."""
    fake_llm.script(Behaviour(reply=FIRST_CODE), Behaviour(reply=SECOND_CODE))
    with trio.fail_after(DEADLINE_S):
        async with (
            running_server(oi_settings(fake_llm)) as server,
            ws_client(server.ws_url) as client,
        ):
            await client.send({"type": "chat", "id": "r1", "message": "go"})
            first = await client.wait_for("r1", lambda m: m["type"] == "confirmation")
            await client.answer(first, approved=True)
            second = await client.wait_for(
                "r1", lambda m: m["type"] == "confirmation" and m is not first
            )
            await client.answer(first, approved=True)  # the same approve, late
            stale = await next_error(client)
            mistaken = dict(second, confirmation_id="cf-0000000000000000")
            await client.answer(mistaken, approved=True)
            guessed = await next_error(client)
            ran_before_the_answer = console_of(client.messages.by_request["r1"])
            await client.answer(second, approved=False)
            messages = await client.finish("r1")
    assert first["confirmation_id"] != second["confirmation_id"]
    assert (stale["code"], stale["ref"]) == ("stale_confirmation", {"type": "approve", "id": "r1"})
    assert guessed["code"] == "stale_confirmation"
    assert "first ran" in ran_before_the_answer
    assert "second ran" not in console_of(messages)
    assert assert_stream_invariants(messages)["type"] == "completion"


@needs_oi
async def test_a_chat_message_never_approves_pending_code(fake_llm: FakeLLM) -> None:
    fake_llm.script(Behaviour(reply=FIRST_CODE), Behaviour(reply="Fine."))
    with trio.fail_after(DEADLINE_S):
        async with (
            running_server(oi_settings(fake_llm)) as server,
            ws_client(server.ws_url) as client,
        ):
            await client.send({"type": "chat", "id": "r1", "message": "go"})
            accepted = await client.wait_for("r1", lambda m: m.get("type") == "accepted")
            confirmation = await client.wait_for("r1", lambda m: m["type"] == "confirmation")
            conversation = accepted["conversation_id"]
            for text in ("y", "yes", "approve"):
                await client.send(
                    {
                        "type": "chat",
                        "id": f"r-{text}",
                        "message": text,
                        "conversation_id": conversation,
                    }
                )
            await client.send({"type": "ping"})
            await client.receive_control()  # the pong: every chat above was handled
            record = server.state.engine.tracker.get_live("r1", "anonymous")
            assert record is not None
            assert record.approval.pending_id == confirmation["confirmation_id"]
            await client.answer(confirmation, approved=False)
            first = await client.finish("r1")
            later = [await client.finish(f"r-{text}") for text in ("y", "yes", "approve")]
    assert "first ran" not in console_of(first)
    for messages in later:
        assert "first ran" not in console_of(messages)
        assert assert_stream_invariants(messages)["type"] in ("completion", "error")
