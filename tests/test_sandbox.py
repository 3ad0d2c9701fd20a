"""The bubblewrap sandbox for approved code: its command line, environment and start."""

from __future__ import annotations

import itertools
import json
import shutil
import subprocess
import sys
import threading
from pathlib import Path
from typing import Any

import pytest

from aether.config import ConfigError, load_settings
from aether.core.runtime.sandbox import (
    WORKSPACE,
    Sandbox,
    SandboxUnavailable,
    probe,
    require_sandbox,
    sandbox_environment,
    spawn,
)
from tests.helpers import NEEDS_BWRAP, make_settings

BWRAP = shutil.which("bwrap")
CHECKOUT = Path(__file__).resolve().parent.parent


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
