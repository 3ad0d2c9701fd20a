"""`POST /v1/chat/completions` with the official `openai` package as the client."""

from __future__ import annotations

from typing import Any

import httpx
import openai
import pytest
import trio

from aether.testing.fake_llm import Behaviour, FakeLLM
from tests.helpers import make_settings, running_server

DEADLINE_S = 15
KEY = "sk-aether-test-0123456789"


def settings_for(fake: FakeLLM, **overrides: Any) -> Any:
    return make_settings(
        provider="http",
        llm_base_url=fake.base_url,
        llm_model="served-model",
        api_keys=KEY,
        **overrides,
    )


def client_for(base_url: str) -> openai.AsyncOpenAI:
    return openai.AsyncOpenAI(
        base_url=base_url + "/v1", api_key=KEY, max_retries=0, http_client=httpx.AsyncClient()
    )


async def test_non_streaming_completion(fake_llm: FakeLLM) -> None:
    fake_llm.script(Behaviour(tokens=3))
    with trio.fail_after(DEADLINE_S):
        async with running_server(settings_for(fake_llm)) as server:
            client = client_for(server.base_url)
            completion = await client.chat.completions.create(
                model="served-model",
                messages=[
                    {"role": "system", "content": "be brief"},
                    {"role": "user", "content": "earlier"},
                    {"role": "assistant", "content": "noted"},
                    {"role": "user", "content": "now"},
                ],
            )
            await client.close()
    assert completion.choices[0].message.content == "tok0 tok1 tok2 "
    assert completion.choices[0].finish_reason == "stop"
    assert completion.model == "served-model"
    assert fake_llm.streams[0].request["messages"] == [
        {"role": "system", "content": "be brief"},
        {"role": "user", "content": "earlier"},
        {"role": "assistant", "content": "noted"},
        {"role": "user", "content": "now"},
    ]


async def test_streaming_completion(fake_llm: FakeLLM) -> None:
    fake_llm.script(Behaviour(tokens=5))
    with trio.fail_after(DEADLINE_S):
        async with running_server(settings_for(fake_llm)) as server:
            client = client_for(server.base_url)
            stream = await client.chat.completions.create(
                model="", messages=[{"role": "user", "content": "hi"}], stream=True
            )
            deltas, finishes = [], []
            async for chunk in stream:
                deltas.append(chunk.choices[0].delta.content or "")
                finishes.append(chunk.choices[0].finish_reason)
            await client.close()
    assert "".join(deltas) == "tok0 tok1 tok2 tok3 tok4 "
    assert finishes[-1] == "stop"
    assert chunk.model == "served-model"  # no model named: the default answers, and says so


async def test_closing_the_stream_stops_the_generation(fake_llm: FakeLLM) -> None:
    fake_llm.script(Behaviour(tokens=100_000, delay_s=0.01))
    with trio.fail_after(DEADLINE_S):
        async with running_server(settings_for(fake_llm)) as server:
            client = client_for(server.base_url)
            stream = await client.chat.completions.create(
                model="served-model", messages=[{"role": "user", "content": "go"}], stream=True
            )
            async for chunk in stream:
                if chunk.choices[0].delta.content:
                    break
            await stream.close()
            await client.close()
            await fake_llm.streams[0].closed.wait()
    assert fake_llm.streams[0].outcome == "client_closed"
    assert fake_llm.streams[0].tokens_sent < 100_000


async def test_upstream_failure_and_bad_requests_are_api_errors(fake_llm: FakeLLM) -> None:
    fake_llm.script(Behaviour(status=500))
    with trio.fail_after(DEADLINE_S):
        async with running_server(settings_for(fake_llm)) as server:
            client = client_for(server.base_url)
            with pytest.raises(openai.APIStatusError) as failed:
                await client.chat.completions.create(
                    model="served-model", messages=[{"role": "user", "content": "hi"}]
                )
            with pytest.raises(openai.BadRequestError) as bad:
                await client.chat.completions.create(
                    model="x", messages=[{"role": "assistant", "content": "no user turn"}]
                )
            unauthorized = openai.AsyncOpenAI(
                base_url=server.base_url + "/v1",
                api_key="wrong",
                max_retries=0,
                http_client=httpx.AsyncClient(),
            )
            with pytest.raises(openai.AuthenticationError):
                await unauthorized.chat.completions.create(
                    model="x", messages=[{"role": "user", "content": "hi"}]
                )
            await client.close()
            await unauthorized.close()
    assert failed.value.status_code == 502
    assert "upstream" in failed.value.message
    assert bad.value.status_code == 400


async def test_the_sdk_lists_the_served_model_and_an_unknown_one_is_not_found(
    fake_llm: FakeLLM,
) -> None:
    with trio.fail_after(DEADLINE_S):
        async with running_server(settings_for(fake_llm)) as server:
            client = client_for(server.base_url)
            listed = [model.id async for model in client.models.list()]
            served = await client.models.retrieve("served-model")
            with pytest.raises(openai.NotFoundError) as missing:
                await client.models.retrieve("no-such-model")
            await client.close()
    assert listed == ["served-model"]
    assert (served.id, served.object, served.owned_by) == ("served-model", "model", "aether")
    assert missing.value.status_code == 404
    assert missing.value.code == "model_not_found"


async def test_a_completion_naming_an_unknown_model_is_model_not_found(fake_llm: FakeLLM) -> None:
    with trio.fail_after(DEADLINE_S):
        async with running_server(settings_for(fake_llm)) as server:
            client = client_for(server.base_url)
            failures = []
            for stream in (False, True):
                with pytest.raises(openai.NotFoundError) as missing:
                    await client.chat.completions.create(
                        model="gpt-4o-mini",
                        messages=[{"role": "user", "content": "hi"}],
                        stream=stream,
                    )
                failures.append(missing.value)
            await client.close()
    for failure in failures:
        assert failure.status_code == 404
        assert failure.code == "model_not_found"
        assert "gpt-4o-mini" in failure.message
    assert fake_llm.streams == []  # never answered by another model
