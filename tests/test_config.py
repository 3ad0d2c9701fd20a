"""Settings: environment, TOML and flags, with one clear line for anything wrong."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import trio

from aether.config import ConfigError, load_settings, unknown_environment_settings
from tests.helpers import make_settings, running_server


def test_defaults_listen_on_loopback_with_echo() -> None:
    settings = load_settings(environ={})
    assert (settings.host, settings.port, settings.provider) == ("127.0.0.1", 8000, "auto")
    assert settings.binds_loopback_only
    assert not settings.model_configured


def test_environment_sets_every_setting() -> None:
    settings = load_settings(
        environ={
            "AETHER_HOST": "::1",
            "AETHER_PORT": "9001",
            "AETHER_PROVIDER": "http",
            "AETHER_LLM_BASE_URL": "http://127.0.0.1:11434/v1/",
            "AETHER_LLM_MODEL": "llama3",
            "AETHER_LLM_API_KEY": "sk-test",
            "AETHER_MAX_MESSAGE_BYTES": "2048",
        }
    )
    assert settings.port == 9001
    assert settings.llm_base_url == "http://127.0.0.1:11434/v1"
    assert settings.llm_api_key is not None
    assert settings.llm_api_key.get_secret_value() == "sk-test"
    assert "sk-test" not in repr(settings)
    assert settings.max_message_bytes == 2048


def test_precedence_is_file_then_environment_then_flags(tmp_path: Path) -> None:
    config = tmp_path / "aether.toml"
    config.write_text('port = 7000\nhost = "127.0.0.2"\nlog_level = "DEBUG"\n')
    settings = load_settings(
        config_file=config,
        environ={"AETHER_PORT": "7001", "AETHER_HOST": "127.0.0.3"},
        overrides={"port": 7002},
    )
    assert (settings.port, settings.host, settings.log_level) == (7002, "127.0.0.3", "DEBUG")


@pytest.mark.parametrize(
    ("environ", "expected"),
    [
        ({"AETHER_PORT": "eighty"}, "AETHER_PORT:"),
        ({"AETHER_PORT": "70000"}, "AETHER_PORT:"),
        ({"AETHER_PROVIDER": "magic"}, "AETHER_PROVIDER:"),
        ({"AETHER_LLM_BASE_URL": "localhost:1234"}, "AETHER_LLM_BASE_URL: must be an http"),
        ({"AETHER_PROVIDER": "http"}, "needs llm_base_url"),
    ],
)
def test_invalid_setting_names_the_setting(environ: dict[str, str], expected: str) -> None:
    with pytest.raises(ConfigError) as caught:
        load_settings(environ=environ)
    assert expected in str(caught.value)
    assert "\n" not in str(caught.value)


def test_unknown_toml_key_is_rejected(tmp_path: Path) -> None:
    config = tmp_path / "aether.toml"
    config.write_text("prot = 8000\n")
    with pytest.raises(ConfigError, match="unknown setting 'prot'"):
        load_settings(config_file=config, environ={})


def test_missing_or_broken_toml_file(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="file not found"):
        load_settings(config_file=tmp_path / "missing.toml", environ={})
    broken = tmp_path / "broken.toml"
    broken.write_text("port = \n")
    with pytest.raises(ConfigError, match="not valid TOML"):
        load_settings(config_file=broken, environ={})


@pytest.mark.skipif(shutil.which("ss") is None, reason="needs ss (iproute2) to read the queue")
async def test_the_server_listens_with_listen_backlog() -> None:
    # Hypercorn's own default (100) overflowed when 500 clients connected at once.
    async with running_server(make_settings(provider="echo", listen_backlog=1500)) as server:
        port = server.base_url.rsplit(":", 1)[1]
        ss = await trio.run_process(["ss", "-ltnH", f"sport = :{port}"], capture_stdout=True)
    listed = ss.stdout.decode().split()
    somaxconn = int(await trio.Path("/proc/sys/net/core/somaxconn").read_text())
    assert listed[0] == "LISTEN"
    assert int(listed[2]) == min(1500, somaxconn)


def test_an_unknown_aether_variable_is_named_with_the_closest_setting() -> None:
    warnings = unknown_environment_settings(
        {"AETHER_PROT": "9000", "AETHER_PORT": "1", "AETHER_ZZZZZZ": "x", "HOME": "/root"}
    )
    assert warnings == [
        "AETHER_PROT names no setting and is ignored: did you mean AETHER_PORT?",
        "AETHER_ZZZZZZ names no setting and is ignored",
    ]


@pytest.mark.parametrize(
    ("environ", "missing"),
    [
        ({"AETHER_LLM_BASE_URL": "http://127.0.0.1:11434/v1"}, "AETHER_LLM_MODEL"),
        ({"AETHER_LLM_MODEL": "llama3"}, "AETHER_LLM_BASE_URL"),
    ],
)
def test_half_a_model_setting_says_which_half_is_missing(
    environ: dict[str, str], missing: str
) -> None:
    with pytest.raises(ConfigError, match=f"is set but .* is not \\({missing}\\)"):
        load_settings(environ=environ)
