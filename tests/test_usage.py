"""Token usage: each turn's tokens (the upstream's counts, else estimated), stopped and failed
turns included, in the terminal message, the history, the OpenAI face and ``GET /v1/usage``."""

from __future__ import annotations

import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import httpx
import openai
import pytest
import trio

from aether.core.history.store import usage_day
from aether.testing.fake_llm import Behaviour, FakeLLM
from tests.helpers import assert_stream_invariants, make_settings, running_server, ws_client
from tests.history_backends import HistoryBackend

DEADLINE_S = 30
ALICE, BOB = "alice-key", "bob-key"


def usage_settings(fake: FakeLLM, **overrides: Any) -> Any:
    return make_settings(
        provider="http", llm_base_url=fake.base_url, llm_model="fake-model", **overrides
    )


def today() -> str:
    return usage_day(time.time())


@asynccontextmanager
async def serving(settings: Any) -> AsyncIterator[tuple[Any, httpx.AsyncClient]]:
    """A server, a WebSocket client and a REST client of it."""
    async with (
        running_server(settings) as server,
        ws_client(server.ws_url) as client,
        httpx.AsyncClient(base_url=server.base_url) as rest,
    ):
        yield client, rest


async def stopped_at_seq(client: Any, request_id: str, seq: int) -> list[dict[str, Any]]:
    """A chat in conversation ``c``, stopped once its stream reached ``seq``; its messages."""
    await client.send(
        {"type": "chat", "id": request_id, "message": "go on", "conversation_id": "c"}
    )
    await client.wait_for(request_id, lambda m: len(m.get("content", "")) > 0)
    await client.wait_for(request_id, lambda m: m.get("seq", 0) >= seq)
    await client.send({"type": "stop", "id": request_id})
    return await client.finish(request_id)


async def test_a_turn_reports_the_upstreams_counts_and_they_add_up_per_day_and_model(
    fake_llm: FakeLLM, history_backend: HistoryBackend
) -> None:
    fake_llm.script(
        Behaviour(tokens=3, delay_s=0), Behaviour(tokens=5, delay_s=0), Behaviour(tokens=7)
    )
    settings = usage_settings(fake_llm, **history_backend.settings)
    with trio.fail_after(DEADLINE_S):
        async with serving(settings) as (client, rest):
            first = await client.chat("hi there", id="u1", conversation_id="c1")
            second = await client.chat("and again", id="u2", conversation_id="c1")
            deleted = await rest.delete("/v1/conversations/c1")
            await client.chat("hi there", id="u3", conversation_id="c2")
            usage = (await rest.get("/v1/usage")).json()
    assert fake_llm.streams[0].request["stream_options"] == {"include_usage": True}
    # The fake counts a word of the prompt as a token: no estimate would say 2.
    assert first[-1]["usage"] == {
        "prompt_tokens": 2,
        "completion_tokens": 3,
        "total_tokens": 5,
        "estimated": False,
    }
    # The follow-up's prompt is the conversation: "hi there", "tok0 tok1 tok2 ", "and again".
    assert (second[-1]["usage"]["prompt_tokens"], second[-1]["usage"]["completion_tokens"]) == (
        7,
        5,
    )
    assert deleted.status_code == 204
    # The deleted conversation's two turns still count, beside the third's.
    assert usage["usage"] == [
        {
            "day": today(),
            "model": "fake-model",
            "turns": 3,
            "prompt_tokens": 11,
            "completion_tokens": 15,
            "total_tokens": 26,
            "estimated_turns": 0,
        }
    ]
    assert usage["total"]["total_tokens"] == 26
    assert usage["since"] <= today()


async def test_stopped_and_failed_turns_count_what_the_model_generated(
    fake_llm: FakeLLM, history_backend: HistoryBackend
) -> None:
    fake_llm.script(
        Behaviour(tokens=10_000, delay_s=0.01),
        Behaviour(tokens=50, delay_s=0, failure="reset", fail_after=5),
    )
    settings = usage_settings(fake_llm, **history_backend.settings)
    with trio.fail_after(DEADLINE_S):
        async with serving(settings) as (client, rest):
            stopped = await stopped_at_seq(client, "s1", 5)
            failed = await client.chat("again", id="f1", conversation_id="c")
            history = (await rest.get("/v1/chat/history", params={"conversation_id": "c"})).json()
            usage = (await rest.get("/v1/usage")).json()
    stop = assert_stream_invariants(stopped)
    fail = assert_stream_invariants(failed)
    assert (stop["type"], fail["type"]) == ("stopped", "error")
    streamed = "".join(m.get("content", "") for m in stopped if m.get("type") == "message")
    # Estimated: the upstream's count never came. Four characters a token, rounded up.
    assert stop["usage"]["estimated"] is True
    assert stop["usage"]["completion_tokens"] == -(-len(streamed) // 4) > 0
    assert fail["usage"]["estimated"] is True
    assert fail["usage"]["completion_tokens"] == -(-len("tok0 tok1 tok2 tok3 tok4 ") // 4)
    assert [m["status"] for m in history["messages"]] == [
        "complete",
        "stopped",
        "complete",
        "error",
    ]
    assert usage["total"]["turns"] == 2
    assert usage["total"]["estimated_turns"] == 2
    assert usage["total"]["completion_tokens"] == (
        stop["usage"]["completion_tokens"] + fail["usage"]["completion_tokens"]
    )


@pytest.mark.parametrize("upstream", ["ignored", "refused"])
async def test_an_upstream_without_counts_gets_an_estimate(
    upstream: Any, nursery: trio.Nursery
) -> None:
    fake = FakeLLM(Behaviour(tokens=3, delay_s=0), stream_usage=upstream)
    await nursery.start(fake.serve)
    with trio.fail_after(DEADLINE_S):
        async with (
            running_server(usage_settings(fake)) as server,
            ws_client(server.ws_url) as client,
        ):
            first = await client.chat("hi there", id="e1")
            second = await client.chat("hi there", id="e2")
    for messages in (first, second):
        terminal = assert_stream_invariants(messages)
        assert terminal["type"] == "completion"
        # "hi there": 2 tokens and 4 for the message; "tok0 tok1 tok2 ": 15 characters.
        assert terminal["usage"] == {
            "prompt_tokens": 6,
            "completion_tokens": 4,
            "total_tokens": 10,
            "estimated": True,
        }
    asked = ["stream_options" in stream.request for stream in fake.streams]
    if upstream == "ignored":
        assert asked == [True, True]
    else:  # refused once with a 400, asked again without; not asked any more
        assert fake.requests_seen == 3
        assert asked == [False, False]


async def test_the_history_shows_each_answers_model_and_usage(
    fake_llm: FakeLLM, history_backend: HistoryBackend
) -> None:
    fake_llm.script(
        Behaviour(tokens=3, delay_s=0),
        Behaviour(tokens=10_000, delay_s=0.01),
        Behaviour(tokens=50, delay_s=0, failure="reset", fail_after=2),
    )
    settings = usage_settings(fake_llm, **history_backend.settings)
    with trio.fail_after(DEADLINE_S):
        async with serving(settings) as (client, rest):
            done = await client.chat("hi there", id="h1", conversation_id="c")
            stopped = await stopped_at_seq(client, "h2", 3)
            failed = await client.chat("again", id="h3", conversation_id="c")
            page = (await rest.get("/v1/chat/history", params={"conversation_id": "c"})).json()
            await client.send({"type": "history", "conversation_id": "c"})
            answer = await client.receive_control()
    terminals = [assert_stream_invariants(turn) for turn in (done, stopped, failed)]
    assert [t["type"] for t in terminals] == ["completion", "stopped", "error"]
    messages = page["messages"]
    assert [m["role"] for m in messages] == ["user", "assistant"] * 3
    # An answer names its model and shows its turn's usage as its terminal told it; a user's
    # message has neither.
    for user, answer_row, terminal in zip(messages[::2], messages[1::2], terminals, strict=True):
        assert user.keys().isdisjoint({"model", "usage"})
        assert answer_row["model"] == "fake-model"
        assert answer_row["usage"] == terminal["usage"]
    assert messages[1]["usage"]["estimated"] is False
    assert messages[3]["usage"]["estimated"] is True
    # The WebSocket's history answer shows the same.
    assert answer["type"] == "history"
    assert answer["messages"] == messages


async def test_usage_is_per_caller_and_checks_its_query(fake_llm: FakeLLM) -> None:
    fake_llm.default = Behaviour(tokens=2, delay_s=0)
    settings = usage_settings(fake_llm, api_keys=f"{ALICE},{BOB}")
    with trio.fail_after(DEADLINE_S):
        async with (
            running_server(settings) as server,
            httpx.AsyncClient(base_url=server.base_url) as rest,
        ):
            for key in (ALICE, ALICE, BOB):
                answer = await rest.post(
                    "/v1/chat",
                    json={"message": "hello"},
                    headers={"authorization": f"Bearer {key}"},
                )
                assert answer.status_code == 200
            alice = await rest.get("/v1/usage", headers={"authorization": f"Bearer {ALICE}"})
            bob = await rest.get("/v1/usage?days=1", headers={"authorization": f"Bearer {BOB}"})
            bad = await rest.get("/v1/usage?days=0", headers={"authorization": f"Bearer {BOB}"})
            worse = await rest.get("/v1/usage?days=x", headers={"authorization": f"Bearer {BOB}"})
    assert alice.json()["total"]["turns"] == 2
    assert bob.json()["total"]["turns"] == 1
    assert bob.json()["since"] == today()
    assert (bad.status_code, worse.status_code) == (400, 400)


async def test_usage_needs_the_history() -> None:
    with trio.fail_after(DEADLINE_S):
        async with (
            running_server(make_settings(provider="echo", history=False)) as server,
            httpx.AsyncClient(base_url=server.base_url) as rest,
        ):
            answer = await rest.get("/v1/usage")
    assert answer.status_code == 404
    assert answer.json()["error"]["code"] == "history_unavailable"


async def test_the_openai_face_returns_usage(fake_llm: FakeLLM) -> None:
    fake_llm.default = Behaviour(tokens=3, delay_s=0)
    with trio.fail_after(DEADLINE_S):
        async with running_server(usage_settings(fake_llm)) as server:
            client = openai.AsyncOpenAI(
                base_url=server.base_url + "/v1",
                api_key="unused",
                max_retries=0,
                http_client=httpx.AsyncClient(),
            )
            messages: Any = [{"role": "user", "content": "count to three"}]
            whole = await client.chat.completions.create(model="fake-model", messages=messages)
            asked = await client.chat.completions.create(
                model="fake-model",
                messages=messages,
                stream=True,
                stream_options={"include_usage": True},
            )
            chunks = [chunk async for chunk in asked]
            plain = await client.chat.completions.create(
                model="fake-model", messages=messages, stream=True
            )
            plain_chunks = [chunk async for chunk in plain]
            await client.close()
    assert whole.usage is not None
    assert (whole.usage.prompt_tokens, whole.usage.completion_tokens) == (3, 3)
    assert whole.usage.total_tokens == 6
    assert chunks[-1].choices == []
    assert chunks[-1].usage is not None
    assert (chunks[-1].usage.prompt_tokens, chunks[-1].usage.completion_tokens) == (3, 3)
    assert all(chunk.usage is None for chunk in chunks[:-1])
    assert all(chunk.usage is None for chunk in plain_chunks)
