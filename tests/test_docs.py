"""The README stays true to the code."""

from __future__ import annotations

import re
import shlex
import shutil
from pathlib import Path

import pytest
import trio

from aether.config import Settings, load_settings
from tests.helpers import make_settings, running_server

README = Path(__file__).resolve().parent.parent / "README.md"


def test_configuration_table_lists_every_setting() -> None:
    rows = re.findall(r"^\| `([a-z_]+)` \| `(AETHER_[A-Z_]+)` \|", README.read_text(), re.M)
    assert [name for name, _ in rows] == list(Settings.model_fields)
    assert all(env == "AETHER_" + name.upper() for name, env in rows)


def test_quickstart_shows_the_two_commands() -> None:
    text = README.read_text()
    assert "scripts/serve" in text
    assert "scripts/test" in text


async def test_the_quickstarts_curl_commands_work() -> None:
    """Each ``curl`` line of the README, run as written against a server on a free port."""
    if shutil.which("curl") is None:
        pytest.skip("curl is not installed")
    commands = re.findall(r"^(curl .+)$", README.read_text(), re.M)
    assert commands
    with trio.fail_after(30):
        async with running_server(make_settings(provider="echo", echo_token_delay_s=0)) as server:
            address = server.base_url.removeprefix("http://").replace("127.0.0.1", "localhost")
            for command in commands:
                argv = [*shlex.split(command.replace("localhost:8000", address)), "--fail"]
                result = await trio.run_process(argv, capture_stdout=True, capture_stderr=True)
                assert b"hello" in result.stdout, (command, result.stdout, result.stderr)


DEPLOY = README.parent / "deploy"


def _env_file(path: Path) -> dict[str, str]:
    pairs = (
        line.split("=", 1)
        for line in path.read_text().splitlines()
        if line.strip() and not line.lstrip().startswith("#")
    )
    return {name.strip(): value.strip() for name, value in pairs}


@pytest.mark.parametrize("node", ["a", "b"])
def test_the_shipped_node_settings_load_and_match_nginx(node: str, tmp_path: Path) -> None:
    """deploy/env's files are what a node of deploy/systemd's unit reads: they must load as
    settings, and each node's port must be one nginx's upstream lists."""
    environ = {
        **_env_file(DEPLOY / "env" / "common.env"),
        **_env_file(DEPLOY / "env" / f"{node}.env"),
    }
    keys = tmp_path / "keys"
    keys.write_text("frontend:k-0123456789abcdef\n")
    environ["AETHER_API_KEYS_FILE"] = str(keys)  # /etc/aether/keys on a real machine
    settings = load_settings(environ=environ)
    unit = (DEPLOY / "systemd" / "aether@.service").read_text()
    upstream = re.findall(
        r"server 127\.0\.0\.1:(\d+)", (DEPLOY / "nginx" / "aether.conf").read_text()
    )
    assert settings.database_url is not None
    assert settings.redis_url is not None
    assert settings.node_id == node
    assert settings.trusted_proxies == ("127.0.0.1",)
    assert str(settings.port) in upstream
    assert "EnvironmentFile=/etc/aether/%i.env" in unit
