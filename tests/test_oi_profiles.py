"""Open Interpreter profiles (``oi_profile``): read and checked at startup, applied to every
interpreter, and never able to switch off the server's guards."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import httpx
import pytest
import trio

from aether.config import ConfigError
from aether.core.providers.oi.interpreters import _new_interpreter
from aether.core.providers.oi.profiles import load_profile
from aether.testing.fake_llm import Behaviour, FakeLLM
from tests.helpers import OI_MARKS, make_settings, oi_settings, running_server, ws_client

pytestmark = list(OI_MARKS)
DEADLINE_S = 30
CODE_REPLY = ("Let me see.\n", "```python\n", "print(6*7)\n", "```\n")

YAML_PROFILE = """
version: 0.2.5
custom_instructions: Answer in French.
auto_run: true        # a guard: the server's setting wins
offline: false        # another
llm:
  temperature: 0.25
  model: openai/someone-elses-model
computer:
  languages: [python]
"""

PY_PROFILE = """
from interpreter import interpreter
interpreter.custom_instructions = "Be terse."
interpreter.auto_run = True
interpreter.llm.temperature = 0.5
"""


def interpreter_class() -> Any:
    from interpreter import OpenInterpreter

    return OpenInterpreter


@pytest.mark.parametrize(("suffix", "text"), [(".yaml", YAML_PROFILE), (".py", PY_PROFILE)])
def test_a_profile_shapes_the_interpreter_but_the_policy_wins(
    tmp_path: Path, suffix: str, text: str
) -> None:
    path = tmp_path / f"team{suffix}"
    path.write_text(text)
    profile = load_profile(path)
    instance = _new_interpreter(interpreter_class(), make_settings(), profile)
    assert instance.custom_instructions in ("Answer in French.", "Be terse.")
    assert instance.llm.temperature in (0.25, 0.5)
    assert instance.auto_run is False
    assert instance.offline is True
    if suffix == ".yaml":
        assert [language.name.lower() for language in instance.computer.languages] == ["python"]


@pytest.mark.parametrize(
    ("name", "text", "error"),
    [
        ("list.yaml", "- a\n- b\n", "a mapping of settings"),
        ("broken.yaml", "a: [b\n", "not valid YAML"),
        ("broken.json", "{", "Expecting"),
        ("broken.py", "def (:\n", "invalid syntax"),
        ("profile.toml", "a = 1\n", ".yaml, .yml, .json or .py"),
    ],
)
def test_a_bad_profile_is_a_startup_error_naming_the_file(
    tmp_path: Path, name: str, text: str, error: str
) -> None:
    path = tmp_path / name
    path.write_text(text)
    with pytest.raises(ConfigError) as refused:
        load_profile(path)
    assert str(path) in str(refused.value)
    assert error in str(refused.value)


async def test_the_server_applies_the_profile_and_still_asks_before_code_runs(
    fake_llm: FakeLLM, tmp_path: Path
) -> None:
    path = tmp_path / "team.yaml"
    path.write_text(YAML_PROFILE)
    fake_llm.script(Behaviour(reply=CODE_REPLY))
    with trio.fail_after(DEADLINE_S):
        async with (
            running_server(oi_settings(fake_llm, oi_profile=str(path))) as server,
            ws_client(server.ws_url) as client,
            httpx.AsyncClient(base_url=server.base_url) as rest,
        ):
            tools = (await rest.get("/v1/tools")).json()
            await client.send({"type": "chat", "id": "r1", "message": "what is 6*7?"})
            asked = await client.wait_for("r1", lambda m: m["type"] == "confirmation")
            await client.send({"type": "stop", "id": "r1"})
            await client.finish("r1")
    assert tools["code_execution"]["profile"] == "team.yaml"
    assert tools["code_execution"]["requires_approval"] is True
    assert asked["content"]["content"] == "print(6*7)\n"  # auto_run in the profile did not win
    request = fake_llm.streams[0].request
    assert "Answer in French." in request["messages"][0]["content"]
    assert request["model"] == "fake-model"  # the server's model, not the profile's
    assert request["temperature"] == 0.25
