"""A second real OpenAI-compatible client against Aether: the `llm` command-line tool (Simon
Willison's), through its `llm openai endpoint` command, run as its users run it, a process of
its own. It lists the server's models, streams an answer, and a Ctrl-C mid-answer closes its
connection, which stops the chat and closes the upstream stream."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import trio

from aether.testing.fake_llm import Behaviour, FakeLLM
from tests.helpers import http_settings, running_server

LLM = shutil.which("llm", path=str(Path(sys.executable).parent))
pytestmark = pytest.mark.skipif(LLM is None, reason="the `llm` tool is not installed (dev extra)")
DEADLINE_S = 30


def llm_env(home: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("AETHER_", "OPENAI_"))}
    env["LLM_USER_PATH"] = str(home)  # its keys, logs and settings: a directory of the test's
    return env


async def run_llm(home: Path, *args: str) -> subprocess.CompletedProcess[bytes]:
    assert LLM is not None
    return await trio.run_process(
        [LLM, "openai", "endpoint", *args],
        capture_stdout=True,
        capture_stderr=True,
        check=False,
        env=llm_env(home),
    )


async def test_llm_lists_the_models_and_streams_an_answer(
    fake_llm: FakeLLM, tmp_path: Path
) -> None:
    fake_llm.script(Behaviour(tokens=5))
    with trio.fail_after(DEADLINE_S):
        async with running_server(http_settings(fake_llm)) as server:
            base = server.base_url + "/v1"
            models = await run_llm(tmp_path, base, "--models")
            answer = await run_llm(tmp_path, base, "-m", "fake-model", "hello there")
    assert models.returncode == 0, models.stderr
    assert models.stdout.decode().split() == ["fake-model"]
    assert answer.returncode == 0, answer.stderr
    assert answer.stdout.decode().strip() == "tok0 tok1 tok2 tok3 tok4"
    request: dict[str, Any] = fake_llm.streams[0].request
    assert request["messages"][-1] == {"role": "user", "content": "hello there"}


async def test_ctrl_c_in_llm_stops_the_chat_and_its_upstream(
    fake_llm: FakeLLM, tmp_path: Path
) -> None:
    assert LLM is not None
    fake_llm.script(Behaviour(tokens=2000, delay_s=0.01))
    with trio.fail_after(DEADLINE_S):
        async with running_server(http_settings(fake_llm)) as server:
            process = await trio.lowlevel.open_process(
                [LLM, "openai", "endpoint", server.base_url + "/v1", "-m", "fake-model", "go"],
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                env=llm_env(tmp_path),
            )
            assert process.stdout is not None
            printed = b""
            while b"tok5 " not in printed:
                printed += await process.stdout.receive_some(4096)
            interrupted_at = trio.current_time()
            process.send_signal(signal.SIGINT)
            await process.wait()
            record = fake_llm.streams[0]
            await record.closed.wait()
            await server.state.engine.tracker.wait_until_idle()
    assert record.outcome == "client_closed"
    assert record.client_closed_at is not None
    assert record.client_closed_at - interrupted_at < 2.0
    assert record.tokens_sent < 2000
