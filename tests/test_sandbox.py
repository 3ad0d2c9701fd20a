"""Approved code runs in a bubblewrap sandbox: the server's secrets, other conversations' files
and the network stay out of its reach, while its own directory is there to read and write."""

from __future__ import annotations

import itertools
import json
import logging
import os
import queue
import re
import shutil
import subprocess
import sys
import tempfile
import threading
import uuid
from collections.abc import Iterator
from pathlib import Path
from types import SimpleNamespace
from typing import Any, TypeVar

import httpx
import pytest
import trio

from aether.config import ConfigError, load_settings
from aether.core.providers.oi.kernel import settle_kernels
from aether.core.providers.oi.sandbox import (
    WORKSPACE,
    Sandbox,
    SandboxUnavailable,
    probe,
    require_sandbox,
    sandbox_environment,
    spawn,
)
from aether.testing.fake_llm import Behaviour, FakeLLM
from tests.helpers import (
    NEEDS_BWRAP,
    OI_MARKS,
    WSClient,
    aether_process,
    assert_stream_invariants,
    console_of,
    fresh_db_path,
    make_settings,
    needs_oi,
    oi_settings,
    running_server,
    ws_client,
)

DEADLINE_S = 60
T = TypeVar("T")
BWRAP = shutil.which("bwrap")
CHECKOUT = Path(__file__).resolve().parent.parent
# Put in the server's environment before it starts: code must never see them.
SECRETS = {
    "AETHER_LLM_API_KEY": "sk-upstream-secret-3141",
    "AETHER_API_KEYS": "k-server-secret-2718",
    "SOME_TOKEN": "tok-secret-1618",
}
ALICE = "k-alice-0123456789"
BOB = "k-bob-0123456789"


def needs_oi_but_not_bwrap(test: T) -> T:
    for mark in OI_MARKS:
        if mark is not NEEDS_BWRAP:
            test = mark(test)
    return test


def code_reply(language: str, code: str) -> Behaviour:
    # Split as a model's tokens are: OI needs the fences as tokens of their own. (OI also
    # deletes the language's name from the code's first chunk: the code must not contain it.)
    return Behaviour(reply=("Trying.\n", "```", f"{language}\n", code, "```", "\n"))


def bearer(key: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}


async def approved_console(client: WSClient, message: str, **fields: Any) -> str:
    """Chat, approve the code the model writes, and return what it printed."""
    request_id = f"r-{uuid.uuid4().hex[:8]}"
    await client.send({"type": "chat", "id": request_id, "message": message, **fields})
    await client.approve_when_asked(request_id)
    messages = await client.finish(request_id)
    assert assert_stream_invariants(messages)["type"] == "completion"
    return console_of(messages)


@pytest.fixture
def server_secrets(monkeypatch: pytest.MonkeyPatch) -> dict[str, str]:
    for name, value in SECRETS.items():
        monkeypatch.setenv(name, value)
    return SECRETS


@pytest.fixture
def data_dir() -> Iterator[Path]:
    """The server's data (database, keys, uploads) outside /tmp, which the sandbox replaces
    with its own: under /var/tmp, as a data directory would be, so what hides it is that the
    sandbox does not mount it."""
    base = "/var/tmp" if os.path.isdir("/var/tmp") else None
    path = Path(tempfile.mkdtemp(prefix="aether-sandbox-test-", dir=base))
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


@pytest.fixture
def home_marker() -> Iterator[Path]:
    """A file in the server's home directory."""
    path = Path.home() / f".aether-sandbox-test-{uuid.uuid4().hex}"
    path.write_text("in the server's home")
    try:
        yield path
    finally:
        path.unlink(missing_ok=True)


def sandboxed_settings(fake: FakeLLM, data: Path, **overrides: Any) -> Any:
    keys = data / "keys"
    keys.write_text(f"alice:{ALICE}\nbob:{BOB}\n")
    return oi_settings(
        fake,
        db_path=str(data / "history.sqlite3"),
        files_dir=str(data / "files"),
        api_keys_file=str(keys),
        **overrides,
    )


PYTHON_PROBE = """\
import json, os, socket

def read(path):
    try:
        with open(path, "rb") as f:
            return "read: " + f.read(40).decode(errors="replace")
    except OSError as e:
        return type(e).__name__

def listing(path):
    try:
        return "listed: " + ",".join(sorted(os.listdir(path)))
    except OSError as e:
        return type(e).__name__

def write(path):
    try:
        with open(path, "w") as f:
            f.write("planted")
        return "written"
    except OSError as e:
        return type(e).__name__

def connect(port):
    try:
        socket.create_connection(("127.0.0.1", port), timeout=5).close()
        return "connected"
    except OSError as e:
        return type(e).__name__

def seen(values):
    texts = list(os.environ.values())
    for pid in filter(str.isdigit, os.listdir("/proc")):
        for name in ("environ", "cmdline"):
            texts.append(read("/proc/%s/%s" % (pid, name)))
    return [v for v in values if any(v in text for text in texts)]

found = {
    "variables": sorted(os.environ),
    "secrets_seen": seen(SECRET_VALUES),
    "home": os.environ.get("HOME"),
    "cwd": os.getcwd(),
    "database": read(DATABASE),
    "keys_file": read(KEYS_FILE),
    "bobs_file": read(BOBS_FILE),
    "other_conversation_file": read(OTHER_FILE),
    "files_root": listing(FILES_ROOT),
    "server_home": read(HOME_MARKER),
    "checkout": read(CHECKOUT_README),
    "beside_database": write(BESIDE_DATABASE),
    "own_file": read("/workspace/mine.txt"),
    "own_write": write("/workspace/result.txt"),
    "network": connect(PORT),
}
print("PROBE" + json.dumps(found))
"""


def python_probe(**names: object) -> str:
    assignments = "".join(f"{name} = {value!r}\n" for name, value in names.items())
    return assignments + PYTHON_PROBE


def probe_result(console: str) -> dict[str, Any]:
    line = next(line for line in console.splitlines() if line.startswith("PROBE"))
    result: dict[str, Any] = json.loads(line.removeprefix("PROBE"))
    return result


async def upload(rest: httpx.AsyncClient, key: str, conversation: str, name: str) -> None:
    response = await rest.post(
        f"/v1/conversations/{conversation}/files",
        files=[("file", (name, f"{name} of {key[:7]}".encode()))],
        headers=bearer(key),
    )
    assert response.status_code == 201, response.text


@needs_oi
async def test_approved_python_reaches_only_its_own_directory(
    fake_llm: FakeLLM, server_secrets: dict[str, str], data_dir: Path, home_marker: Path
) -> None:
    settings = sandboxed_settings(fake_llm, data_dir)
    with trio.fail_after(DEADLINE_S):
        async with running_server(settings) as server:
            files = server.state.engine.file_chat.files
            async with httpx.AsyncClient(base_url=server.base_url) as rest:
                await upload(rest, ALICE, "c-alice", "mine.txt")
                await upload(rest, ALICE, "c-alice-2", "other.txt")
                await upload(rest, BOB, "c-bob", "bobs.txt")
            code = python_probe(
                SECRET_VALUES=list(server_secrets.values()),
                DATABASE=str(settings.db_path),
                KEYS_FILE=str(settings.api_keys_file),
                BOBS_FILE=str(files.directory("bob", "c-bob") / "bobs.txt"),
                OTHER_FILE=str(files.directory("alice", "c-alice-2") / "other.txt"),
                FILES_ROOT=str(files.root),
                HOME_MARKER=str(home_marker),
                CHECKOUT_README=str(CHECKOUT / "README.md"),
                BESIDE_DATABASE=str(data_dir / "planted.txt"),
                PORT=fake_llm.port,
            )
            fake_llm.script(code_reply("python", code), Behaviour(reply="Done."))
            headers = [(b"authorization", f"Bearer {ALICE}".encode())]
            async with ws_client(server.ws_url, extra_headers=headers) as client:
                console = await approved_console(client, "look around", conversation_id="c-alice")
            own_directory = files.directory("alice", "c-alice")
    found = probe_result(console)
    assert found["secrets_seen"] == []
    assert not [name for name in found["variables"] if name.startswith("AETHER_")]
    assert "SOME_TOKEN" not in found["variables"]
    assert (found["home"], found["cwd"]) == (WORKSPACE, WORKSPACE)
    for escape in (
        "database",
        "keys_file",
        "bobs_file",
        "other_conversation_file",
        "files_root",
        "server_home",
        "checkout",
        "beside_database",
    ):
        assert found[escape] in ("FileNotFoundError", "PermissionError", "OSError"), (
            escape,
            found[escape],
        )
    assert found["network"] != "connected"
    assert found["own_file"] == "read: mine.txt of k-alice"
    assert found["own_write"] == "written"
    assert (own_directory / "result.txt").read_text() == "planted"
    assert not (data_dir / "planted.txt").exists()


SHELL_PROBE = """\
if env | grep -q -e AETHER_ -e SOME_TOKEN; then echo ENV:leaked; else echo ENV:clean; fi
if cat /proc/[0-9]*/environ | grep -q -a '{secret}'; then echo PROC:leaked; else echo PROC:clean; fi
if head -c 1 '{database}' >/dev/null; then echo DB:read; else echo DB:denied; fi
if head -c 1 '{keys}' >/dev/null; then echo KEYS:read; else echo KEYS:denied; fi
if head -c 1 '{bobs}' >/dev/null; then echo BOB:read; else echo BOB:denied; fi
if echo planted > '{beside}'; then echo BESIDE:written; else echo BESIDE:denied; fi
if (exec 3<>/dev/tcp/127.0.0.1/{port}); then echo NET:connected; else echo NET:denied; fi
if grep -q mine /workspace/mine.txt; then echo OWN:read; else echo OWN:denied; fi
if echo made-here > /workspace/made.txt; then echo OWNWRITE:written; else echo OWNWRITE:denied; fi
"""


@needs_oi
async def test_an_approved_shell_block_is_sandboxed_too(
    fake_llm: FakeLLM, server_secrets: dict[str, str], data_dir: Path
) -> None:
    settings = sandboxed_settings(fake_llm, data_dir)
    with trio.fail_after(DEADLINE_S):
        async with running_server(settings) as server:
            files = server.state.engine.file_chat.files
            async with httpx.AsyncClient(base_url=server.base_url) as rest:
                await upload(rest, ALICE, "c-alice", "mine.txt")
                await upload(rest, BOB, "c-bob", "bobs.txt")
            code = SHELL_PROBE.format(
                secret=server_secrets["AETHER_LLM_API_KEY"],
                database=settings.db_path,
                keys=settings.api_keys_file,
                bobs=files.directory("bob", "c-bob") / "bobs.txt",
                beside=data_dir / "planted.txt",
                port=fake_llm.port,
            )
            fake_llm.script(code_reply("shell", code), Behaviour(reply="Done."))
            headers = [(b"authorization", f"Bearer {ALICE}".encode())]
            async with ws_client(server.ws_url, extra_headers=headers) as client:
                console = await approved_console(client, "look around", conversation_id="c-alice")
            own_directory = files.directory("alice", "c-alice")
    results = dict(re.findall(r"^([A-Z]+):(\w+)$", console, re.MULTILINE))
    assert results == {
        "ENV": "clean",
        "PROC": "clean",
        "DB": "denied",
        "KEYS": "denied",
        "BOB": "denied",
        "BESIDE": "denied",
        "NET": "denied",
        "OWN": "read",
        "OWNWRITE": "written",
    }
    assert (own_directory / "made.txt").read_text() == "made-here\n"
    assert not (data_dir / "planted.txt").exists()


@needs_oi
async def test_languages_that_would_run_outside_the_sandbox_are_not_offered(
    fake_llm: FakeLLM, monkeypatch: pytest.MonkeyPatch
) -> None:
    # OI runs "apt install" (and sudo) itself, on the server, once the code is approved.
    ran_on_server: list[Any] = []
    real_run = subprocess.run

    def recording_run(args: Any, *rest: Any, **kwargs: Any) -> Any:
        if isinstance(args, list) and args and args[0] in ("apt", "sudo"):
            ran_on_server.append(args)
            return subprocess.CompletedProcess(args, 0)
        return real_run(args, *rest, **kwargs)

    monkeypatch.setattr(subprocess, "run", recording_run)
    fake_llm.script(
        code_reply("javascript", "console.log('outside')\n"),
        Behaviour(reply="No JavaScript then."),
        code_reply("shell", "apt install cowsay\n"),
        Behaviour(reply="Done."),
    )
    with trio.fail_after(DEADLINE_S):
        async with (
            running_server(oi_settings(fake_llm)) as server,
            ws_client(server.ws_url) as client,
        ):
            await client.send(
                {"type": "chat", "id": "r1", "message": "run javascript", "conversation_id": "c"}
            )
            asked = await client.wait_for(
                "r1", lambda m: m["type"] in ("confirmation", "completion", "error")
            )
            assert asked["type"] == "completion"  # no confirmation: there is nothing to run
            javascript = console_of(client.messages.by_request["r1"])
            install = await approved_console(client, "install it", conversation_id="c")
    assert "`javascript` disabled or not supported." in javascript
    assert ran_on_server == []
    assert "Failed to install package cowsay." in install


@needs_oi
async def test_the_network_setting_lets_sandboxed_code_connect(fake_llm: FakeLLM) -> None:
    code = (
        "import socket\n"
        f"socket.create_connection(('127.0.0.1', {fake_llm.port}), timeout=5).close()\n"
        "print('connected')\n"
    )
    fake_llm.script(code_reply("python", code), Behaviour(reply="Done."))
    with trio.fail_after(DEADLINE_S):
        async with (
            running_server(oi_settings(fake_llm, oi_sandbox_network=True)) as server,
            ws_client(server.ws_url) as client,
        ):
            console = await approved_console(client, "connect")
    assert "connected" in console


@needs_oi
async def test_two_callers_conversations_of_one_name_get_their_own_sandboxes(
    fake_llm: FakeLLM, tmp_path: Path
) -> None:
    # Without history, conversation ids are the callers' own: each may have a "c1".
    keys = tmp_path / "keys"
    keys.write_text(f"alice:{ALICE}\nbob:{BOB}\n")
    settings = oi_settings(fake_llm, history=False, api_keys_file=str(keys))
    alice_code = "left = 'alice-value'\nopen('note.txt', 'w').write('alice')\nprint('set')\n"
    bob_code = (
        "import os\n"
        "print(globals().get('left', 'no variable of alice'))\n"
        "print(os.path.exists('/workspace/note.txt') and 'note of alice' or 'no note of alice')\n"
    )
    fake_llm.script(
        code_reply("python", alice_code),
        Behaviour(reply="Set."),
        code_reply("python", bob_code),
        Behaviour(reply="Done."),
    )
    consoles = []
    with trio.fail_after(DEADLINE_S):
        async with running_server(settings) as server:
            for key in (ALICE, BOB):
                headers = [(b"authorization", f"Bearer {key}".encode())]
                async with ws_client(server.ws_url, extra_headers=headers) as client:
                    consoles.append(await approved_console(client, "go", conversation_id="c1"))
            alice_directory = server.state.engine.file_chat.files.directory("alice", "c1")
            written = (alice_directory / "note.txt").read_text()
            root = server.state.engine.file_chat.files.root
        left = list(root.iterdir())
    assert "set" in consoles[0]
    assert written == "alice"
    assert "no variable of alice" in consoles[1]
    assert "no note of alice" in consoles[1]
    assert left == []  # without history, a sandbox's directory goes with its interpreter


@needs_oi_but_not_bwrap
async def test_without_the_sandbox_the_model_is_told_the_real_directory(
    fake_llm: FakeLLM, caplog: pytest.LogCaptureFixture
) -> None:
    fake_llm.script(Behaviour(reply="Noted."))
    with trio.fail_after(DEADLINE_S):
        async with running_server(oi_settings(fake_llm, oi_sandbox="none")) as server:
            async with httpx.AsyncClient(base_url=server.base_url) as rest:
                response = await rest.post(
                    "/v1/conversations/c-n/files", files=[("file", ("a.txt", b"a"))]
                )
                assert response.status_code == 201
            async with ws_client(server.ws_url) as client:
                await client.chat("what is there?", id="r1", conversation_id="c-n")
            directory = server.state.engine.file_chat.files.directory("anonymous", "c-n")
    told = fake_llm.streams[0].request["messages"][-1]["content"]
    assert f"in the directory {directory}:" in told
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert any("AETHER_OI_SANDBOX=none" in w and "UNSANDBOXED" in w for w in warnings)


# The sandbox's command line, environment and start, without Open Interpreter.


def sandbox_for(**overrides: Any) -> Sandbox:
    settings = make_settings(llm_base_url="http://127.0.0.1:9/v1", llm_model="m", **overrides)
    return Sandbox.from_settings(settings, "/usr/bin/bwrap", environ={"LANG": "C.UTF-8"})


def pairs(argv: list[str], option: str) -> list[tuple[str, str]]:
    return [(argv[i + 1], argv[i + 2]) for i, arg in enumerate(argv) if arg == option]


def test_the_command_line_shows_the_system_read_only_and_only_the_workspace_writable() -> None:
    sandbox = sandbox_for()
    workspace = Path("/srv/files/0123abcd")
    argv = sandbox.argv(workspace, ["python3", "-c", "pass"])
    assert argv[0] == "/usr/bin/bwrap"
    options = set(argv)
    assert {"--unshare-all", "--die-with-parent", "--new-session", "--clearenv"} <= options
    assert "--share-net" not in options
    assert argv[argv.index("--cap-drop") + 1] == "ALL"
    assert argv[-4:] == ["--", "python3", "-c", "pass"]
    assert pairs(argv, "--bind") == [(str(workspace), WORKSPACE)]
    assert argv[argv.index("--chdir") + 1] == WORKSPACE
    read_only = [source for source, _ in pairs(argv, "--ro-bind") if source != "/dev/null"]
    assert "/" not in read_only
    assert {"/usr", "/etc", sys.prefix} <= set(read_only)
    hidden = [str(Path.home()), str(CHECKOUT)]
    assert not [s for s in read_only if any(Path(h).is_relative_to(s) for h in hidden)]
    steps = set(itertools.pairwise(argv))
    assert {("--dev", "/dev"), ("--proc", "/proc"), ("--tmpfs", "/tmp")} <= steps
    runtime = Path("/tmp/aether-kernel-x")
    with_runtime = sandbox.argv(workspace, ["true"], runtime_dir=runtime)
    assert pairs(with_runtime, "--bind") == [
        (str(runtime), str(runtime)),
        (str(workspace), WORKSPACE),
    ]


def test_the_network_is_shared_only_when_asked_or_for_web_search() -> None:
    assert not sandbox_for().network
    assert sandbox_for(oi_sandbox_network=True).network
    assert sandbox_for(search_url="http://127.0.0.1:8888/search").network
    assert "--share-net" in sandbox_for(oi_sandbox_network=True).argv(Path("/w"), ["true"])


def test_the_environment_is_built_from_an_allow_list() -> None:
    server = {
        "AETHER_LLM_API_KEY": "sk-1",
        "AETHER_API_KEYS": "k-1",
        "SOME_TOKEN": "t",
        "OPENAI_API_KEY": "sk-2",
        "DB_PASSWORD": "p",
        "AWS_SECRET_ACCESS_KEY": "s",
        "PYTHONPATH": "/srv/aether",
        "LD_PRELOAD": "/x.so",
        "HOME": "/root",
        "LANG": "de_DE.UTF-8",
        "LC_ALL": "de_DE.UTF-8",
        "TERM": "xterm",
        "https_proxy": "http://user:pass@proxy:3128",
        "HTTP_PROXY": "http://proxy:3128",
        "no_proxy": "localhost",
    }
    offline = sandbox_environment(server, network=False)
    online = sandbox_environment(server, network=True)
    assert set(offline) == {
        "PATH",
        "HOME",
        "TMPDIR",
        "LANG",
        "LC_ALL",
        "TERM",
        "PYTHONIOENCODING",
        "PYDEVD_DISABLE_FILE_VALIDATION",
        "ANSI_COLORS_DISABLED",
    }
    assert set(online) - set(offline) == {"HTTP_PROXY", "no_proxy"}  # no credentials in them
    assert (offline["HOME"], offline["LANG"]) == (WORKSPACE, "de_DE.UTF-8")
    assert "sk-" not in json.dumps(online)


def test_server_secrets_inside_a_read_only_tree_are_masked(tmp_path: Path) -> None:
    (tmp_path / "db").mkdir()
    (tmp_path / "db" / "history.sqlite3").write_text("db")
    (tmp_path / "files").mkdir()
    (tmp_path / "keys").write_text("alice:k-alice-0123456789\n")
    settings = make_settings(
        llm_base_url="http://127.0.0.1:9/v1",
        llm_model="m",
        db_path=str(tmp_path / "db" / "history.sqlite3"),
        files_dir=str(tmp_path / "files"),
        api_keys_file=str(tmp_path / "keys"),
    )
    # As if the data lay inside the Python installation, which the sandbox shows read-only.
    roots = [tmp_path, sys.base_prefix, sys.prefix]
    sandbox = Sandbox.from_settings(settings, "/usr/bin/bwrap", environ={}, python_roots=roots)
    assert str(tmp_path / "keys") in sandbox.masked_files
    assert str(tmp_path / "db" / "history.sqlite3") in sandbox.masked_files
    assert str(tmp_path / "files") in sandbox.masked_dirs
    if BWRAP is None:
        return
    sandbox = Sandbox.from_settings(settings, BWRAP, environ={}, python_roots=roots)
    workspace = tmp_path / "workspace"
    workspace.mkdir()
    shown = subprocess.run(
        sandbox.argv(workspace, ["sh", "-c", f"cat {tmp_path}/keys; ls {tmp_path}/files"]),
        env=sandbox.env,
        capture_output=True,
        text=True,
        timeout=30,
        check=True,
    )
    assert shown.stdout == ""


@NEEDS_BWRAP
def test_a_sandbox_outlives_the_thread_that_started_it(tmp_path: Path) -> None:
    # bwrap's --die-with-parent follows the thread that started it; Trio ends idle worker
    # threads, and a kernel started from one must live on.
    assert BWRAP is not None
    sandbox = Sandbox.from_settings(make_settings(), BWRAP, environ={})
    started: list[subprocess.Popen[str]] = []

    def start() -> subprocess.Popen[str]:
        return subprocess.Popen(
            sandbox.argv(tmp_path, ["sh", "-c", "echo ready; read line; echo got $line"]),
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            env=sandbox.env,
            text=True,
        )

    def worker() -> None:
        process = spawn(start)
        assert process.stdout is not None
        assert process.stdout.readline() == "ready\n"  # bwrap has set its parent-death signal
        started.append(process)

    thread = threading.Thread(target=worker)
    thread.start()
    thread.join()
    (process,) = started
    assert process.stdin is not None
    assert process.stdout is not None
    with process, process.stdin, process.stdout:
        process.stdin.write("alive\n")
        process.stdin.flush()
        assert process.stdout.readline() == "got alive\n"
        assert process.wait(timeout=10) == 0


def test_a_bwrap_that_does_not_work_is_reported_with_the_fix(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    fake = tmp_path / "bwrap"
    fake.write_text("#!/bin/sh\necho 'bwrap: No permissions to create new namespace' >&2\nexit 1\n")
    fake.chmod(0o755)
    settings = make_settings(llm_base_url="http://127.0.0.1:9/v1", llm_model="m")
    sandbox = Sandbox.from_settings(settings, str(fake), environ={})
    assert probe(sandbox) == "bwrap: No permissions to create new namespace"
    monkeypatch.setenv("PATH", str(tmp_path))
    with pytest.raises(SandboxUnavailable) as raised:
        require_sandbox(settings)
    message = str(raised.value)
    assert "No permissions to create new namespace" in message
    assert "install bubblewrap" in message
    assert "AETHER_OI_SANDBOX=none" in message
    assert isinstance(raised.value, ConfigError)
    assert require_sandbox(make_settings(oi_sandbox="none")) is None


def test_the_sandbox_settings() -> None:
    assert (make_settings().oi_sandbox, make_settings().oi_sandbox_network) == ("bwrap", False)
    assert make_settings(oi_sandbox="none", oi_sandbox_network="true").oi_sandbox_network
    with pytest.raises(ConfigError, match=r"^AETHER_OI_SANDBOX: Input should be 'bwrap' or 'none'"):
        load_settings(environ={"AETHER_OI_SANDBOX": "docker"})


def server_env(path: str, **extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("AETHER_")}
    env.update(PATH=path, AETHER_DB_PATH=str(fresh_db_path()), **extra)
    return env


@needs_oi_but_not_bwrap
async def test_only_the_agentic_path_needs_bwrap(tmp_path: Path) -> None:
    no_bwrap = str(tmp_path)  # an empty PATH
    model = {"AETHER_LLM_BASE_URL": "http://127.0.0.1:9/v1", "AETHER_LLM_MODEL": "m"}
    with trio.fail_after(30):
        refused = await trio.run_process(
            [sys.executable, "-m", "aether", "--port", "0"],
            capture_stderr=True,
            env=server_env(no_bwrap, **model),
            check=False,
        )
        async with (
            aether_process(server_env(no_bwrap), b"built-in echo model") as server,
            httpx.AsyncClient(base_url=server.base_url) as client,
        ):
            assert (await client.get("/ready")).status_code == 200
    assert refused.returncode == 2
    lines = refused.stderr.decode().strip().splitlines()
    assert len(lines) == 1, lines
    assert lines[0].startswith("aether: invalid configuration: ")
    assert "bwrap is not installed" in lines[0]
    assert "install bubblewrap" in lines[0]
    assert "AETHER_OI_SANDBOX=none" in lines[0]


def kernel_message(kind: str, parent: str, **content: str) -> dict[str, Any]:
    parent_type = "execute_request" if parent.startswith("execute") else "interrupt_request"
    return {
        "msg_type": kind,
        "content": content,
        "parent_header": {"msg_id": parent, "msg_type": parent_type},
    }


def test_a_stopped_turns_leftovers_are_all_read_before_the_next_turn() -> None:
    # A sandboxed kernel is interrupted by control messages; the second (OI's listener also
    # interrupts) can land while the first one's traceback is written, which then takes longer
    # than the quiet period, and the interrupts' own statuses come around the code's end.
    left = [
        kernel_message("status", "interrupt-1", execution_state="idle"),
        kernel_message("error", "execute-1", ename="KeyboardInterrupt"),
        kernel_message("status", "interrupt-2", execution_state="busy"),
        kernel_message("status", "interrupt-2", execution_state="idle"),
        None,  # a quiet period: the traceback is still being written
        kernel_message("stream", "execute-1", text="KeyboardInterrupt ..."),
        kernel_message("status", "execute-1", execution_state="idle"),
    ]

    def get_msg(timeout: float) -> dict[str, Any]:
        message = left.pop(0) if left else None
        if message is None:
            raise queue.Empty
        return message

    language = SimpleNamespace(
        km=object(), kc=SimpleNamespace(iopub_channel=SimpleNamespace(get_msg=get_msg))
    )
    instance = SimpleNamespace(
        computer=SimpleNamespace(terminal=SimpleNamespace(_active_languages={"python": language}))
    )
    settle_kernels(instance)
    assert left == []
