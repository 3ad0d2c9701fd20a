"""`python -m aether chat` end to end: a real client process against a real server."""

from __future__ import annotations

import signal
import subprocess
import sys
from typing import Any

import trio

from aether.testing.fake_llm import Behaviour, FakeLLM
from tests.helpers import (
    client_env,
    make_settings,
    needs_oi,
    oi_settings,
    run_client,
    running_server,
)

DEADLINE_S = 20


async def test_one_shot_answer_and_exit_code() -> None:
    with trio.fail_after(DEADLINE_S):
        async with running_server(make_settings(provider="echo", echo_token_delay_s=0)) as server:
            result = await run_client("--url", server.ws_url, "hello", "there")
            failed = await run_client("--url", server.ws_url, "--path", "http", "hi")
    assert result.returncode == 0, result.stderr
    assert result.stdout.decode() == "hello there\n"
    assert failed.returncode == 1
    assert "path_unavailable" in failed.stderr.decode()


async def test_interactive_turns_share_a_conversation() -> None:
    with trio.fail_after(DEADLINE_S):
        async with running_server(make_settings(provider="echo", echo_token_delay_s=0)) as server:
            result = await run_client("--url", server.ws_url, stdin=b"first line\nsecond line\n")
            store = server.state.engine.history
            assert store is not None
            conversations = await store.list_conversations("anonymous", 10, None)
            messages = await store.messages("anonymous", conversations[0].id)
    assert result.returncode == 0, result.stderr
    assert result.stdout.decode() == "first line\nsecond line\n"
    assert len(conversations) == 1
    assert [m.content for m in messages] == ["first line"] * 2 + ["second line"] * 2


async def test_ctrl_c_stops_the_answer_instead_of_killing_the_client() -> None:
    settings = make_settings(provider="echo", echo_token_delay_s=0.05)
    long_message = " ".join(f"w{i}" for i in range(400))
    with trio.fail_after(DEADLINE_S):
        async with running_server(settings) as server:
            process = await trio.lowlevel.open_process(
                [sys.executable, "-m", "aether", "chat", "--url", server.ws_url, long_message],
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                env=client_env(),
            )
            assert process.stdout is not None
            assert process.stderr is not None
            seen = b""
            while b"w3" not in seen:
                seen += await process.stdout.receive_some(4096)
            process.send_signal(signal.SIGINT)
            async for chunk in process.stdout:
                seen += chunk
            stderr = b"".join([chunk async for chunk in process.stderr])
            code = await process.wait()
            await server.state.engine.tracker.wait_until_idle()
            records = [r for r in server.state.engine.tracker._recent if r.owner == "anonymous"]
    assert code == 130
    assert b"[stopped: stop]" in stderr
    assert len(seen.split()) < 400
    assert records[-1].state == "stopped"
    assert records[-1].stop_reason == "stop"


async def test_unreachable_and_refused_servers_exit_3() -> None:
    settings: Any = make_settings(provider="echo", echo_token_delay_s=0, api_keys="k-0123456789")
    with trio.fail_after(DEADLINE_S):
        async with running_server(settings) as server:
            refused = await run_client("--url", server.ws_url, "hi")
            allowed = await run_client("--url", server.ws_url, "--token", "k-0123456789", "hi")
        unreachable = await run_client("--url", "ws://127.0.0.1:9/ws", "hi")
    assert refused.returncode == 3
    assert "--token" in refused.stderr.decode()
    assert allowed.returncode == 0
    assert allowed.stdout.decode() == "hi\n"
    assert unreachable.returncode == 3
    assert "cannot reach" in unreachable.stderr.decode()


@needs_oi
async def test_the_client_asks_before_code_runs(fake_llm: FakeLLM) -> None:
    code = ("Let me compute it.\n", "```", "python\n", "print(6*7)\n", "```", "\n")
    fake_llm.script(Behaviour(reply=code), Behaviour(reply="It is 42."), Behaviour(reply=code))
    with trio.fail_after(60):
        async with running_server(oi_settings(fake_llm)) as server:
            yes = await run_client("--url", server.ws_url, "6*7?", stdin=b"y\n")
            no = await run_client("--url", server.ws_url, "6*7 again?", stdin=b"n\n")
    assert yes.returncode == 0, yes.stderr
    assert "Run it? [y/N]" in yes.stderr.decode()
    assert "print(6*7)" in yes.stderr.decode()
    assert "42" in yes.stdout.decode().split("print(6*7)")[-1]  # the output, after the code
    assert "It is 42." in yes.stdout.decode()
    assert no.returncode == 0, no.stderr
    assert "Run it? [y/N]" in no.stderr.decode()
    assert "42" not in no.stdout.decode().split("print(6*7)")[-1]


async def test_interactive_banner_and_commands() -> None:
    settings = make_settings(provider="echo", echo_token_delay_s=0)
    script = (
        b"/help\nhello\n/new\nagain\n/path nope\n/path echo\n//slash\n/dance\n/quit\nnot sent\n"
    )
    with trio.fail_after(DEADLINE_S):
        async with running_server(settings) as server:
            result = await run_client("--url", server.ws_url, stdin=script)
            store = server.state.engine.history
            assert store is not None
            conversations = await store.list_conversations("anonymous", 10, None)
    stderr = result.stderr.decode()
    assert result.returncode == 0, stderr
    assert f"Aether 0.1.0 at {server.ws_url}, echo path." in stderr.splitlines()[0]
    assert "/new          start a new conversation" in stderr
    assert "/path takes one of: auto, echo, http, oi" in stderr
    assert "[path: echo]" in stderr
    assert "unknown command /dance: /help lists them" in stderr
    assert result.stdout.decode() == "hello\nagain\n/slash\n"
    assert len(conversations) == 2  # /new began the second


async def test_a_server_that_goes_away_while_the_client_waits_is_noticed() -> None:
    settings = make_settings(provider="echo", echo_token_delay_s=0, shutdown_grace_s=0)
    with trio.fail_after(DEADLINE_S):
        async with running_server(settings) as server:
            process = await trio.lowlevel.open_process(
                [sys.executable, "-m", "aether", "chat", "--url", server.ws_url],
                stdin=subprocess.PIPE,
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                env=client_env(),
            )
            assert process.stderr is not None
            seen = b""
            while b"/quit or Ctrl-D leaves" not in seen:
                seen += await process.stderr.receive_some(4096)
            server.stop()  # the user has typed nothing
            async for chunk in process.stderr:
                seen += chunk
            code = await process.wait()
    assert code == 75, seen
    assert b"the server closed the connection (1001 server shutting down): bye" in seen


async def test_an_answer_cut_by_a_lost_connection_is_resumed_whole(fake_llm: FakeLLM) -> None:
    numbered = "".join(f"w{index:03d} " for index in range(150))
    fake_llm.script(Behaviour(reply=numbered, piece_chars=5, delay_s=0.01))
    settings = make_settings(
        provider="http", llm_base_url=fake_llm.base_url, llm_model="fake-model", resume_grace_s=10
    )
    with trio.fail_after(DEADLINE_S):
        async with running_server(settings) as server:
            process = await trio.lowlevel.open_process(
                [sys.executable, "-m", "aether", "chat", "--url", server.ws_url, "count"],
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                env=client_env(),
            )
            assert process.stdout is not None
            assert process.stderr is not None
            printed = b""
            while b"w020" not in printed:
                printed += await process.stdout.receive_some(4096)
            # Every WebSocket dropped mid-answer, as a restart or a network would.
            server.hub.close_all(1012, "restarting")
            async for chunk in process.stdout:
                printed += chunk
            said = b"".join([chunk async for chunk in process.stderr])
            code = await process.wait()
    assert code == 0, said
    assert b"[connection lost; resuming the answer]" in said
    assert printed.decode() == numbered + "\n"  # nothing missed, nothing twice
    assert fake_llm.streams[0].outcome == "completed"
