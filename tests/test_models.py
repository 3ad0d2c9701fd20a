"""Several models: ``[[models]]`` in the config file beside the one-model shorthand, a chat naming
its ``model`` on every transport, and ``GET /v1/models`` listing them."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest
import trio

from aether.config import ConfigError, load_settings
from aether.core.errors import PathUnavailable, UnknownModel
from aether.core.models import catalog_from_settings
from aether.testing.fake_llm import Behaviour, FakeLLM
from tests.helpers import (
    assert_stream_invariants,
    content_of,
    make_settings,
    needs_oi,
    oi_settings,
    run_client,
    running_server,
    ws_client,
)

DEADLINE_S = 30
SECOND_KEY = "sk-second-model-key"


def write_config(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "aether.toml"
    path.write_text(text)
    return path


def test_model_tables_are_read_from_the_config_file(tmp_path: Path) -> None:
    config = write_config(
        tmp_path,
        """
[[models]]
name = "small"
base_url = "http://127.0.0.1:11434/v1/"
model = "qwen2.5:0.5b"

[[models]]
name = "big"
base_url = "https://api.example.com/v1"
model = "gpt-4o"
api_key_env = "EXAMPLE_KEY"
path = "oi"
""",
    )
    settings = load_settings(config_file=config, environ={})
    small, big = settings.models
    assert (small.name, small.base_url, small.model, small.path) == (
        "small",
        "http://127.0.0.1:11434/v1",
        "qwen2.5:0.5b",
        "http",
    )
    assert (big.name, big.api_key_env, big.path) == ("big", "EXAMPLE_KEY", "oi")


def test_model_tables_can_come_from_the_environment_as_json() -> None:
    tables = [{"name": "m1", "base_url": "http://127.0.0.1:9/v1", "model": "up"}]
    settings = load_settings(environ={"AETHER_MODELS": json.dumps(tables)})
    assert [m.name for m in settings.models] == ["m1"]


@pytest.mark.parametrize(
    ("models", "error"),
    [
        ('[{"name": "a", "base_url": "http://h/v1", "model": "x"}] * 2', "two models are named"),
        ('[{"name": "has space", "base_url": "http://h/v1", "model": "x"}]', "letters, digits"),
        ('[{"name": "aether-echo", "base_url": "http://h/v1", "model": "x"}]', "built-in"),
        ('[{"name": "a", "base_url": "ftp://h", "model": "x"}]', "http:// or https://"),
        ('[{"name": "a", "base_url": "http://h/v1"}]', "[0].model: Field required"),
        ('[{"name": "a", "base_url": "http://h/v1", "model": "x", "key": "k"}]', "[0].key: Extra"),
        (
            '[{"name": "a", "base_url": "http://h/v1", "model": "x", "path": "echo"}]',
            "[0].path: Input",
        ),
        ("not json", "JSON list"),
    ],
)
def test_a_bad_model_table_is_refused_with_a_line_naming_it(models: str, error: str) -> None:
    tables = models
    if models.endswith("* 2"):
        tables = json.dumps(json.loads(models.removesuffix(" * 2")) * 2)
    with pytest.raises(ConfigError) as refused:
        load_settings(environ={"AETHER_MODELS": tables})
    assert "AETHER_MODELS" in str(refused.value)
    assert error in str(refused.value)


def test_a_table_named_like_the_shorthand_model_is_refused() -> None:
    tables = [{"name": "m", "base_url": "http://127.0.0.1:9/v1", "model": "up"}]
    with pytest.raises(ConfigError, match="name it once"):
        load_settings(
            environ={
                "AETHER_MODELS": json.dumps(tables),
                "AETHER_LLM_BASE_URL": "http://127.0.0.1:9/v1",
                "AETHER_LLM_MODEL": "m",
            }
        )


def test_a_key_variable_that_is_not_set_is_a_startup_error() -> None:
    tables = [{"name": "m", "base_url": "http://h/v1", "model": "up", "api_key_env": "NO_SUCH"}]
    settings = load_settings(environ={"AETHER_MODELS": json.dumps(tables)})
    with pytest.raises(ConfigError, match="api_key_env NO_SUCH is not set"):
        catalog_from_settings(settings, {}, agentic=False)
    catalog = catalog_from_settings(settings, {"NO_SUCH": "sk-1"}, agentic=False)
    assert catalog.get("m").upstream is not None
    assert catalog.get("m").upstream.api_key == "sk-1"  # type: ignore[union-attr]
    assert "sk-1" not in repr(catalog.get("m"))


def test_an_oi_table_without_the_extra_is_a_startup_error() -> None:
    tables = [{"name": "m", "base_url": "http://h/v1", "model": "up", "path": "oi"}]
    settings = load_settings(environ={"AETHER_MODELS": json.dumps(tables)})
    with pytest.raises(ConfigError, match="needs the open-interpreter extra"):
        catalog_from_settings(settings, {}, agentic=False)


def two_model_settings(**overrides: Any) -> Any:
    return make_settings(
        llm_base_url="http://127.0.0.1:9/v1",
        llm_model="first",
        models=[
            {"name": "second", "base_url": "http://127.0.0.1:8/v1", "model": "up-2"},
            {"name": "agent", "base_url": "http://127.0.0.1:7/v1", "model": "up-3", "path": "oi"},
        ],
        **overrides,
    )


def test_which_model_and_path_a_chat_gets() -> None:
    catalog = catalog_from_settings(two_model_settings(), {}, agentic=True)
    assert [m.name for m in catalog.listed] == ["first", "second", "agent"]  # echo unlisted
    assert catalog.default.name == "first"

    def resolved(model: str | None, path: Any) -> tuple[str, str]:
        served, chosen = catalog.resolve(model, path)
        return served.name, chosen

    assert resolved(None, "auto") == ("first", "oi")  # with the extra, the shorthand's default
    assert resolved(None, "http") == ("first", "http")
    assert resolved(None, "echo") == ("aether-echo", "echo")  # the path stays
    assert resolved("second", "auto") == ("second", "http")
    assert resolved("agent", "auto") == ("agent", "oi")
    assert resolved("first", "http") == ("first", "http")
    with pytest.raises(PathUnavailable, match="'second' is served on the http path"):
        catalog.resolve("second", "oi")
    with pytest.raises(UnknownModel, match="no model named 'gpt-4o'"):
        catalog.resolve("gpt-4o", "auto")
    with pytest.raises(UnknownModel):
        catalog.resolve("aether-echo", "auto")  # unlisted beside real models


def test_provider_picks_the_default_among_the_models() -> None:
    http_first = catalog_from_settings(two_model_settings(provider="http"), {}, agentic=True)
    assert (http_first.default.name, http_first.default.default_path) == ("first", "http")
    echo_first = catalog_from_settings(two_model_settings(provider="echo"), {}, agentic=True)
    assert echo_first.default.name == "aether-echo"
    assert echo_first.listed[0].name == "aether-echo"  # the default is listed
    only_tables = make_settings(
        models=[{"name": "t", "base_url": "http://127.0.0.1:8/v1", "model": "up"}]
    )
    assert catalog_from_settings(only_tables, {}, agentic=False).default.name == "t"
    assert [m.name for m in catalog_from_settings(make_settings(), {}, False).listed] == [
        "aether-echo"
    ]


@pytest.fixture
async def second_llm(nursery: trio.Nursery) -> FakeLLM:
    """Another upstream, for the second model."""
    fake = FakeLLM(Behaviour(tokens=3, delay_s=0), model="up-2")
    await nursery.start(fake.serve)
    return fake


def served_settings(first: FakeLLM, second: FakeLLM, **overrides: Any) -> Any:
    return make_settings(
        provider="http",
        llm_base_url=first.base_url,
        llm_model="first",
        models=[
            {
                "name": "second",
                "base_url": second.base_url,
                "model": "up-2",
                "api_key_env": "AETHER_TEST_SECOND_KEY",
            }
        ],
        **overrides,
    )


@pytest.fixture(autouse=True)
def second_key(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("AETHER_TEST_SECOND_KEY", SECOND_KEY)


async def test_a_websocket_chat_names_its_model(fake_llm: FakeLLM, second_llm: FakeLLM) -> None:
    fake_llm.script(Behaviour(tokens=2, delay_s=0))
    with trio.fail_after(DEADLINE_S):
        async with (
            running_server(served_settings(fake_llm, second_llm)) as server,
            ws_client(server.ws_url) as client,
        ):
            named = await client.chat("hi", id="r1", model="second")
            default = await client.chat("hi", id="r2")
            await client.send({"type": "chat", "id": "r3", "message": "hi", "model": "gpt-4o"})
            refused = await client.receive()
    assert assert_stream_invariants(named)["type"] == "completion"
    assert (named[0]["type"], named[0]["model"], named[0]["path"]) == ("accepted", "second", "http")
    assert content_of(named) == "tok0 tok1 tok2 "
    assert default[0]["model"] == "first"
    assert [s.request["model"] for s in second_llm.streams] == ["up-2"]
    assert [s.request["model"] for s in fake_llm.streams] == ["first"]
    assert second_llm.authorizations == [f"Bearer {SECOND_KEY}"]
    assert fake_llm.authorizations == [None]  # each model's own key, no other
    assert (refused["type"], refused["code"]) == ("error", "unknown_model")
    assert refused["ref"] == {"type": "chat", "id": "r3"}
    assert "gpt-4o" in refused["message"]
    assert len(fake_llm.streams) + len(second_llm.streams) == 2  # r3 asked nobody


async def test_rest_sse_and_openai_routes_name_their_model(
    fake_llm: FakeLLM, second_llm: FakeLLM
) -> None:
    with trio.fail_after(DEADLINE_S):
        async with running_server(served_settings(fake_llm, second_llm)) as server:
            async with httpx.AsyncClient(base_url=server.base_url) as rest:
                answer = await rest.post("/v1/chat", json={"message": "hi", "model": "second"})
                unknown = await rest.post("/v1/chat", json={"message": "hi", "model": "nope"})
                events = await rest.post(
                    "/v1/chat/stream", json={"message": "hi", "model": "second"}
                )
                unknown_events = await rest.post(
                    "/v1/chat/stream", json={"message": "hi", "model": "nope"}
                )
                invalid = await rest.post("/v1/chat", json={"message": "hi", "model": "a b"})
            client = openai.AsyncOpenAI(
                base_url=server.base_url + "/v1",
                api_key="unused",
                max_retries=0,
                http_client=httpx.AsyncClient(),
            )
            listed = [model.id async for model in client.models.list()]
            completion = await client.chat.completions.create(
                model="second", messages=[{"role": "user", "content": "hi"}]
            )
            await client.close()
    assert answer.status_code == 200, answer.text
    assert (answer.json()["model"], answer.json()["content"]) == ("second", "tok0 tok1 tok2 ")
    assert unknown.status_code == 404
    assert unknown.json()["error"]["code"] == "unknown_model"
    assert events.status_code == 200
    assert '"model":"second"' in events.text.replace(" ", "")
    assert unknown_events.status_code == 404
    assert unknown_events.json()["error"]["code"] == "unknown_model"
    assert invalid.status_code == 400
    assert listed == ["first", "second"]
    assert (completion.model, completion.choices[0].message.content) == (
        "second",
        "tok0 tok1 tok2 ",
    )
    assert [s.request["model"] for s in second_llm.streams] == ["up-2"] * 3
    assert fake_llm.streams == []


@needs_oi
async def test_a_conversation_can_change_model_on_the_agentic_path(
    fake_llm: FakeLLM, second_llm: FakeLLM
) -> None:
    fake_llm.script(Behaviour(reply="From the first."))
    second_llm.script(Behaviour(reply="From the second."))
    settings = oi_settings(
        fake_llm,
        models=[
            {
                "name": "second",
                "base_url": second_llm.base_url,
                "model": "up-2",
                "api_key_env": "AETHER_TEST_SECOND_KEY",
                "path": "oi",
            }
        ],
    )
    with trio.fail_after(DEADLINE_S):
        async with running_server(settings) as server, ws_client(server.ws_url) as client:
            first = await client.chat("hi", id="r1", conversation_id="c1")
            second = await client.chat("and you?", id="r2", conversation_id="c1", model="second")
    assert (first[0]["model"], first[0]["path"]) == ("fake-model", "oi")
    assert (second[0]["model"], second[0]["path"]) == ("second", "oi")
    assert content_of(first).strip() == "From the first."
    assert content_of(second).strip() == "From the second."
    assert second_llm.streams[0].request["model"] == "up-2"
    assert second_llm.authorizations == [f"Bearer {SECOND_KEY}"]
    # The same interpreter: the second model got the conversation's first turn as context.
    contents = [m.get("content") for m in second_llm.streams[0].request["messages"]]
    assert "hi" in contents


async def test_the_terminal_client_takes_a_model(fake_llm: FakeLLM, second_llm: FakeLLM) -> None:
    fake_llm.script(Behaviour(tokens=2, delay_s=0))
    script = b"/model\n/model nope\nfirst\n/model second\nsecond\n/quit\n"
    with trio.fail_after(DEADLINE_S):
        async with running_server(served_settings(fake_llm, second_llm)) as server:
            one_shot = await run_client("--url", server.ws_url, "--model", "second", "hi")
            unknown = await run_client("--url", server.ws_url, "--model", "gpt-4o", "hi")
            interactive = await run_client("--url", server.ws_url, stdin=script)
    assert one_shot.returncode == 0, one_shot.stderr
    assert one_shot.stdout.decode() == "tok0 tok1 tok2 \n"
    assert unknown.returncode == 1
    assert "unknown_model" in unknown.stderr.decode()
    said = interactive.stderr.decode()
    assert interactive.returncode == 0, said
    assert "/model NAME   answer with that model from now on" not in said  # no /help asked
    assert "* first\n  second\n" in said  # the list, the current one marked
    assert "the server has no model 'nope': /model lists them" in said
    assert "[model: second]" in said
    assert interactive.stdout.decode() == "tok0 tok1 \ntok0 tok1 tok2 \n"
    assert [s.request["model"] for s in second_llm.streams] == ["up-2", "up-2"]
    assert [s.request["model"] for s in fake_llm.streams] == ["first"]
