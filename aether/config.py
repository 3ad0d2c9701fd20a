"""Aether's settings: one typed, validated object built from defaults, a TOML file, the environment
and command-line flags, in that order of precedence (later wins).

Every setting ``name`` is read from the TOML key ``name`` and from the environment variable
``AETHER_NAME``. Unknown TOML keys and invalid values are rejected with one line that names the
setting, so a typo fails at startup instead of being silently ignored.

@.architecture
role: configuration
jobs: [config_loading, validation]
"""

from __future__ import annotations

import difflib
import ipaddress
import json
import os
import re
import tomllib
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Literal
from urllib.parse import urlsplit

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    SecretStr,
    ValidationError,
    field_validator,
    model_validator,
)

from aether.protocol.messages import MODEL_NAME_PATTERN

ENV_PREFIX = "AETHER_"

ProviderName = Literal["auto", "echo", "http", "oi"]
LogLevel = Literal["DEBUG", "INFO", "WARNING", "ERROR"]


class ConfigError(Exception):
    """A setting is missing, malformed or unknown. The message is one line naming the setting."""


# Documents, data, code and images a model can work on; no executables.
_FILE_TYPES = ".txt .md .csv .tsv .json .jsonl .xml .yaml .yml .toml .ini .log .py .js .ts .html "
_FILE_TYPES += ".css .sql .pdf .png .jpg .jpeg .gif .webp .xlsx .xls .docx .pptx .zip"
DEFAULT_FILE_TYPES = tuple(_FILE_TYPES.split())
# The names a browser uses for this machine's loopback: the Host allow-list's default.
LOOPBACK_HOSTS = ("localhost", "127.0.0.1", "::1")
_HOST_NAME = re.compile(
    r"[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?(\.[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?)*"
)


def default_db_path() -> Path:
    """``$XDG_DATA_HOME/aether/history.sqlite3``, else under ``~/.local/share``."""
    base = os.environ.get("XDG_DATA_HOME") or str(Path.home() / ".local" / "share")
    return Path(base) / "aether" / "history.sqlite3"


ModelPath = Literal["http", "oi"]
_MODEL_NAME = re.compile(MODEL_NAME_PATTERN)
_ENV_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")
# The built-in model's name, as clients name it.
ECHO_MODEL = "aether-echo"


def _checked_url(value: str) -> str:
    parts = urlsplit(value)
    if parts.scheme not in ("http", "https") or not parts.netloc:
        raise ValueError("must be an http:// or https:// URL")
    return value.rstrip("/")


class ModelEntry(BaseModel):
    """One model a client can name: a ``[[models]]`` table of the config file."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    name: str = Field(description="What clients call it (the chat's and OpenAI's ``model``).")
    base_url: str = Field(description="Base URL of its OpenAI-compatible API.")
    model: str = Field(description="Its name upstream.")
    api_key_env: str | None = Field(
        None, description="The environment variable holding its bearer key (none: no key)."
    )
    path: ModelPath = Field("http", description="http, or oi (Open Interpreter runs code).")

    @field_validator("name")
    @classmethod
    def _check_name(cls, value: str) -> str:
        if not _MODEL_NAME.match(value):
            raise ValueError(
                "must be 1 to 128 letters, digits or . _ : / @ + -, starting with a letter or digit"
            )
        if value == ECHO_MODEL:
            raise ValueError(f"{ECHO_MODEL!r} is the built-in model's name")
        return value

    @field_validator("model")
    @classmethod
    def _check_model(cls, value: str) -> str:
        if not value.strip():
            raise ValueError("must not be empty")
        return value

    @field_validator("base_url")
    @classmethod
    def _check_base_url(cls, value: str) -> str:
        return _checked_url(value)

    @field_validator("api_key_env")
    @classmethod
    def _check_api_key_env(cls, value: str | None) -> str | None:
        if value is not None and not _ENV_NAME.fullmatch(value):
            raise ValueError("must be an environment variable's name, e.g. OPENAI_API_KEY")
        return value


class Settings(BaseModel):
    """All of Aether's settings: field names are TOML keys, ``AETHER_<NAME>`` the env vars."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    host: str = Field("127.0.0.1", description="Address to listen on.")
    port: int = Field(
        8000, ge=0, le=65535, description="TCP port to listen on (0 picks a free one)."
    )
    tls_certfile: Path | None = Field(
        None, description="PEM certificate (chain) to serve HTTPS and WSS; needs tls_keyfile."
    )
    tls_keyfile: Path | None = Field(None, description="PEM private key for tls_certfile.")
    log_level: LogLevel = Field("INFO", description="Log level: DEBUG, INFO, WARNING or ERROR.")
    log_format: Literal["text", "json"] = Field(
        "text", description="Log lines as text, or as JSON objects (one per line)."
    )

    provider: ProviderName = Field(
        "auto", description="Model path: echo (built in), http (OpenAI-compatible) or auto."
    )
    llm_base_url: str | None = Field(
        None, description="Base URL of an OpenAI-compatible API, e.g. http://127.0.0.1:11434/v1."
    )
    llm_model: str | None = Field(None, description="Model name sent upstream.")
    llm_api_key: SecretStr | None = Field(None, description="Bearer key for the upstream API.")
    models: tuple[ModelEntry, ...] = Field(
        (),
        description="More models clients can name: [[models]] tables (name, base_url, model, "
        "api_key_env, path), or a JSON list in the environment. The first is the default, "
        "unless llm_model is set too.",
    )
    llm_connect_timeout_s: float = Field(10.0, gt=0, description="Upstream connect timeout.")
    llm_first_token_timeout_s: float = Field(
        60.0, gt=0, description="Longest wait for the upstream's first token."
    )
    llm_read_timeout_s: float = Field(
        60.0, gt=0, description="Longest silence between upstream chunks once streaming."
    )
    llm_max_connections: int = Field(
        1000, ge=1, description="Most concurrent upstream connections."
    )
    llm_transport: Literal["aether", "httpx"] = Field(
        "aether",
        description="HTTP path transport: aether (HTTP/1.1, least CPU per chunk) or httpx "
        "(httpx's own, HTTP/2 where offered). Proxy variables (HTTPS_PROXY, NO_PROXY) apply "
        "to both.",
    )
    llm_ca_file: Path | None = Field(
        None, description="PEM bundle of the CAs upstream certificates are checked against."
    )
    oi_auto_run: bool = Field(
        False, description="Run the agentic path's code without asking the client (dangerous)."
    )
    oi_context_window: int = Field(8000, ge=1000, description="Agentic path: model context size.")
    oi_max_tokens: int = Field(1000, ge=16, description="Agentic path: longest model answer.")
    oi_function_calling: Literal["auto", "on", "off"] = Field(
        "auto",
        description="Agentic path: the model proposes code as OpenAI tool calls (on), as "
        "markdown code fences (off), or tool calls until its upstream refuses them (auto).",
    )
    oi_max_interpreters: int = Field(
        16,
        ge=1,
        description="Agentic path: interpreters kept at once (one per conversation; each that "
        "ran code holds a Python kernel process of about 110 MiB); the least recent is closed.",
    )
    oi_sandbox: Literal["bwrap", "none"] = Field(
        "bwrap",
        description="Agentic path: run approved code in a bubblewrap sandbox (bwrap), or 'none': "
        "with the server's rights, environment and files (dangerous).",
    )
    oi_sandbox_network: bool = Field(
        False,
        description="Agentic path: let sandboxed code use the network (on anyway with "
        "search_url, for web search).",
    )
    oi_profile: Path | None = Field(
        None,
        description="Agentic path: an Open Interpreter profile (.yaml, .yml, .json or .py) "
        "applied to every interpreter; the server's policy (approval, offline, sandbox, model) "
        "is applied after it.",
    )
    search_url: str | None = Field(
        None,
        description="Agentic path: a SearxNG-style search API (GET ?q=...&format=json) that "
        "gives Open Interpreter a web_search() function.",
    )
    search_results: int = Field(5, ge=1, le=50, description="Results web_search() returns.")
    echo_token_delay_s: float = Field(
        0.02, ge=0, description="Pause between tokens of the built-in echo model."
    )

    max_message_bytes: int = Field(
        64 * 1024, ge=64, description="Largest WebSocket message handled; larger gets an error."
    )
    max_frame_bytes: int = Field(
        1024 * 1024, ge=1024, description="Hard WebSocket message limit; larger closes with 1009."
    )
    max_body_bytes: int = Field(1024 * 1024, ge=1024, description="Largest REST request body.")
    outbox_max_bytes: int = Field(
        1024 * 1024, ge=1024, description="Unsent bytes buffered per client before backpressure."
    )
    max_requests_per_connection: int = Field(
        16, ge=1, description="Most chats running at once on one WebSocket."
    )
    resume_grace_s: float = Field(
        10.0,
        ge=0,
        le=3600,
        description="How long a WebSocket chat whose client vanished keeps running, for the "
        "client to come back and resume it (0: stop it at once).",
    )
    resume_retention_s: float = Field(
        300.0, ge=0, le=86400, description="How long a finished chat can still be resumed."
    )
    resume_log_max_bytes: int = Field(
        1024 * 1024,
        ge=1024,
        description="What a resumable chat keeps of its messages; a resume from before that "
        "gets the text so far as one snapshot message.",
    )
    max_messages_per_second: int = Field(
        20, ge=1, description="WebSocket messages a client may send per second (burst: 2 s)."
    )
    max_connections_per_ip: int = Field(
        64, ge=1, description="Most WebSocket connections open at once from one IP."
    )
    max_requests_per_caller: int = Field(
        32, ge=1, description="Most chats one caller (API key) runs at once, on all transports."
    )
    slow_client_timeout_s: float = Field(
        30.0,
        gt=0,
        description="A client that keeps its stream waiting this long is disconnected (1013).",
    )
    ws_keepalive_s: float = Field(
        20.0, gt=0, description="Idle time after which a WebSocket gets a keepalive message."
    )
    sse_heartbeat_s: float = Field(
        15.0, gt=0, description="Idle time after which an SSE stream gets a comment heartbeat."
    )
    tcp_keepalive_s: float = Field(
        30.0, ge=1, description="Idle time before TCP keepalive probes look for vanished peers."
    )
    listen_backlog: int = Field(
        2048,
        ge=1,
        description="Connections the kernel may queue before the server accepts them.",
    )
    shutdown_grace_s: float = Field(
        10.0, ge=0, description="On SIGTERM/SIGINT, time given to in-flight streams to finish."
    )
    workers: int = Field(
        1,
        ge=1,
        le=64,
        description="Worker processes sharing the listening socket; more than 1 needs redis_url.",
    )
    redis_url: str | None = Field(
        None,
        description="Redis the workers share as their control plane, e.g. "
        "redis://127.0.0.1:6379/0 (stops, approvals and limits across workers).",
    )
    worker_lease_s: float = Field(
        10.0,
        ge=1,
        le=300,
        description="A worker that stops refreshing its lease in Redis this long is dead: its "
        "chats count no more.",
    )

    history: bool = Field(
        True, description="Keep conversation history (in SQLite, or PostgreSQL with database_url)."
    )
    database_url: str | None = Field(
        None,
        description="PostgreSQL for the history, shared by several nodes, e.g. "
        "postgresql://aether:secret@127.0.0.1:5432/aether (default: SQLite at db_path).",
    )
    database_pool_size: int = Field(
        8, ge=1, le=100, description="Connections each worker opens to PostgreSQL at most."
    )
    node_id: str | None = Field(
        None,
        min_length=1,
        max_length=64,
        pattern=r"^[A-Za-z0-9._-]+$",
        description="This node's name among several sharing Redis and PostgreSQL (default: "
        "the host name and a random part, logged at start).",
    )
    db_path: Path = Field(
        default_factory=lambda: default_db_path(),
        description="The history database file (default: in the per-user data directory).",
    )
    history_context_messages: int = Field(
        40, ge=0, description="Earlier messages of a conversation sent to the model as context."
    )
    files_dir: Path | None = Field(
        None,
        description="Where uploaded files are kept, per conversation (default: 'files' beside "
        "db_path).",
    )
    max_file_bytes: int = Field(
        10 * 1024 * 1024, ge=1024, description="Largest file a client may upload for file chat."
    )
    max_files_per_conversation: int = Field(
        20, ge=1, description="Most files one conversation may hold."
    )
    file_types: tuple[str, ...] = Field(
        DEFAULT_FILE_TYPES,
        description="File name extensions accepted for upload (comma-separated).",
    )

    api_keys: tuple[SecretStr, ...] = Field(
        (), description="API keys (comma-separated): callers must present one as a Bearer token."
    )
    api_keys_file: Path | None = Field(
        None, description="File of API keys, one per line, optionally 'name:key'."
    )
    allowed_hosts: tuple[str, ...] = Field(
        (),
        description="Host names (or addresses) clients may reach the server by, comma-separated; "
        "other Host headers get 421. '*' answers any (only with API keys). Default: localhost, "
        "127.0.0.1, ::1 and the listening address.",
    )
    allowed_origins: tuple[str, ...] = Field(
        (),
        description="Web page origins (https://chat.example.com) allowed to use the API and the "
        "WebSocket besides the server's own pages (comma-separated).",
    )

    metrics_public: bool = Field(
        False, description="Serve /metrics without an API key (for a scraper inside the network)."
    )
    rate_limit_chat_per_minute: int = Field(
        60, ge=1, description="Chats started per minute per IP (REST chats and WebSocket opens)."
    )
    rate_limit_default_per_minute: int = Field(
        600, ge=1, description="Other API requests per minute per IP (health is exempt)."
    )
    rate_limit_exempt_ips: tuple[str, ...] = Field(
        (), description="Client IPs never rate limited (comma-separated)."
    )
    rate_limit_max_clients: int = Field(
        10_000, ge=100, description="Most client IPs tracked at once (least recent forgotten)."
    )
    trusted_proxies: tuple[str, ...] = Field(
        (),
        description="Reverse proxies (addresses or networks, comma-separated) whose "
        "X-Forwarded-For names the client, for per-IP limits and logs.",
    )

    @field_validator(
        "api_keys",
        "allowed_hosts",
        "allowed_origins",
        "rate_limit_exempt_ips",
        "trusted_proxies",
        "file_types",
        mode="before",
    )
    @classmethod
    def _split_list(cls, value: Any) -> Any:
        if isinstance(value, str):
            return tuple(item.strip() for item in value.split(",") if item.strip())
        return value

    @field_validator("trusted_proxies")
    @classmethod
    def _check_proxies(cls, value: tuple[str, ...]) -> tuple[str, ...]:
        for entry in value:
            try:
                ipaddress.ip_network(entry, strict=False)
            except ValueError:
                raise ValueError(
                    f"{entry!r} is not an address or network like 10.0.0.0/8"
                ) from None
        return value

    @field_validator("allowed_origins")
    @classmethod
    def _check_origins(cls, value: tuple[str, ...]) -> tuple[str, ...]:
        for origin in value:
            parts = urlsplit(origin)
            if parts.scheme not in ("http", "https") or not parts.netloc or parts.path:
                raise ValueError(f"{origin!r} is not an origin like https://chat.example.com")
        return tuple(origin.lower() for origin in value)

    @field_validator("allowed_hosts")
    @classmethod
    def _check_hosts(cls, value: tuple[str, ...]) -> tuple[str, ...]:
        hosts = []
        for host in value:
            name = host.strip().lower().rstrip(".")
            if name.startswith("[") and name.endswith("]"):
                name = name[1:-1]
            if name != "*" and not _HOST_NAME.fullmatch(name) and not _is_ip(name):
                raise ValueError(f"{host!r} is not a host name or address (no scheme, no port)")
            hosts.append(name)
        return tuple(hosts)

    @field_validator("file_types")
    @classmethod
    def _check_file_types(cls, value: tuple[str, ...]) -> tuple[str, ...]:
        for extension in value:
            if not extension.startswith(".") or len(extension) < 2 or "/" in extension:
                raise ValueError(f"{extension!r} is not a file name extension like .csv")
        return tuple(extension.lower() for extension in value)

    @property
    def files_root(self) -> Path:
        return self.files_dir if self.files_dir is not None else self.db_path.parent / "files"

    @field_validator("redis_url")
    @classmethod
    def _check_redis_url(cls, value: str | None) -> str | None:
        if value is not None and urlsplit(value).scheme not in ("redis", "rediss", "unix"):
            raise ValueError("must be a redis://, rediss:// or unix:// URL")
        return value

    @field_validator("database_url")
    @classmethod
    def _check_database_url(cls, value: str | None) -> str | None:
        if value is not None and urlsplit(value).scheme not in ("postgresql", "postgres"):
            raise ValueError("must be a postgresql:// URL")
        return value

    @field_validator("llm_base_url", "search_url")
    @classmethod
    def _check_url(cls, value: str | None) -> str | None:
        return None if value is None else _checked_url(value)

    @field_validator("models", mode="before")
    @classmethod
    def _parse_models(cls, value: Any) -> Any:
        if isinstance(value, str):  # AETHER_MODELS: the same tables as a JSON list
            try:
                return json.loads(value)
            except json.JSONDecodeError as exc:
                raise ValueError(f"must be a JSON list of model tables: {exc}") from None
        return value

    @field_validator("models")
    @classmethod
    def _check_models(cls, value: tuple[ModelEntry, ...]) -> tuple[ModelEntry, ...]:
        names = [entry.name for entry in value]
        for name in names:
            if names.count(name) > 1:
                raise ValueError(f"two models are named {name!r}")
        return value

    @field_validator("host")
    @classmethod
    def _check_host(cls, value: str) -> str:
        if not value or any(c.isspace() for c in value):
            raise ValueError("must be a host name or IP address")
        return value

    @model_validator(mode="after")
    def _check_provider(self) -> Settings:
        if self.provider in ("http", "oi") and not self.model_configured:
            missing = "llm_base_url" if self.llm_base_url is None else "llm_model"
            raise ValueError(
                f"provider {self.provider!r} needs {missing} (AETHER_{missing.upper()})"
            )
        if (self.llm_base_url is None) != (self.llm_model is None):
            given, missing = (
                ("llm_base_url", "llm_model")
                if self.llm_model is None
                else ("llm_model", "llm_base_url")
            )
            raise ValueError(
                f"{given} is set but {missing} is not (AETHER_{missing.upper()}): a model needs "
                "both, the built-in echo model neither"
            )
        if self.llm_model is not None and not self.llm_model.strip():
            raise ValueError("llm_model must not be empty")
        if self.llm_model is not None and self.llm_model in {m.name for m in self.models}:
            raise ValueError(
                f"llm_model {self.llm_model!r} is also the name of one of models: name it once"
            )
        if self.max_message_bytes > self.max_frame_bytes:
            raise ValueError("max_message_bytes must not exceed max_frame_bytes")
        if self.workers > 1 and self.redis_url is None:
            raise ValueError(
                f"{self.workers} workers need a control plane: set AETHER_REDIS_URL "
                "(e.g. redis://127.0.0.1:6379/0)"
            )
        if (self.tls_certfile is None) != (self.tls_keyfile is None):
            raise ValueError("tls_certfile and tls_keyfile go together")
        for name, path in (("tls_certfile", self.tls_certfile), ("tls_keyfile", self.tls_keyfile)):
            if path is not None and not path.is_file():
                raise ValueError(f"{name} {path} is not a readable file")
        if self.oi_profile is not None and not self.oi_profile.is_file():
            raise ValueError(f"oi_profile {self.oi_profile} is not a readable file")
        if self.llm_ca_file is not None and not self.llm_ca_file.is_file():
            raise ValueError(f"llm_ca_file {self.llm_ca_file} is not a readable file")
        if self.api_keys_file is not None and not self.api_keys_file.is_file():
            raise ValueError(f"api_keys_file {self.api_keys_file} is not a readable file")
        if not self.auth_enabled and not self.binds_loopback_only:
            raise ValueError(
                f"refusing to listen on {self.host} without API keys: anyone who can reach it "
                "could use the model. Set AETHER_API_KEYS (or AETHER_API_KEYS_FILE), or listen "
                "on 127.0.0.1"
            )
        if "*" in self.allowed_hosts and not self.auth_enabled:
            raise ValueError(
                "allowed_hosts '*' needs API keys: without them any web page could reach this "
                "server through a name it points at 127.0.0.1 (DNS rebinding)"
            )
        if not self.allowed_hosts and _is_wildcard(self.host):
            raise ValueError(
                f"listening on {self.host}, the server cannot tell which names clients use to "
                "reach it: set AETHER_ALLOWED_HOSTS to them (e.g. chat.example.com,10.0.0.5), or "
                "to * to answer any Host header"
            )
        return self

    @property
    def effective_allowed_hosts(self) -> frozenset[str]:
        """``allowed_hosts``, or by default the loopback names and the listening address."""
        if self.allowed_hosts:
            return frozenset(self.allowed_hosts)
        return frozenset({*LOOPBACK_HOSTS, self.host.lower().strip("[]")})

    @property
    def auth_enabled(self) -> bool:
        return bool(self.api_keys) or self.api_keys_file is not None

    @property
    def model_configured(self) -> bool:
        """True when an upstream model is configured (base URL and model name)."""
        return self.llm_base_url is not None and self.llm_model is not None

    @property
    def binds_loopback_only(self) -> bool:
        """True when ``host`` can only be reached from this machine."""
        if self.host == "localhost":
            return True
        try:
            return ipaddress.ip_address(self.host).is_loopback
        except ValueError:
            return False


def _is_ip(value: str) -> bool:
    try:
        ipaddress.ip_address(value)
    except ValueError:
        return False
    return True


def _is_wildcard(host: str) -> bool:
    """Whether ``host`` listens on every address (``0.0.0.0``, ``::``)."""
    try:
        return ipaddress.ip_address(host.strip("[]")).is_unspecified
    except ValueError:
        return False


def unknown_environment_settings(environ: Mapping[str, str]) -> list[str]:
    """One warning per ``AETHER_*`` variable that names no setting, with the closest name (a
    typo in the environment would otherwise be ignored without a word)."""
    known = {ENV_PREFIX + name.upper() for name in Settings.model_fields}
    warnings = []
    for name in sorted(environ):
        if not name.startswith(ENV_PREFIX) or name in known:
            continue
        close = difflib.get_close_matches(name, known, n=1, cutoff=0.6)
        hint = f": did you mean {close[0]}?" if close else ""
        warnings.append(f"{name} names no setting and is ignored{hint}")
    return warnings


def _coerce_env(raw: Mapping[str, str]) -> dict[str, Any]:
    values: dict[str, Any] = {}
    for name in Settings.model_fields:
        env_name = ENV_PREFIX + name.upper()
        if env_name in raw:
            values[name] = raw[env_name]
    return values


def _read_toml(path: Path) -> dict[str, Any]:
    try:
        with path.open("rb") as handle:
            data = tomllib.load(handle)
    except FileNotFoundError:
        raise ConfigError(f"--config: file not found: {path}") from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"--config: {path} is not valid TOML: {exc}") from None
    unknown = sorted(set(data) - set(Settings.model_fields))
    if unknown:
        raise ConfigError(f"{path}: unknown setting {unknown[0]!r}")
    return data


def _describe(error: ValidationError, sources: Mapping[str, str]) -> str:
    first = error.errors()[0]
    message = first["msg"]
    if message.startswith("Value error, "):
        message = message[len("Value error, ") :]
    if not first["loc"]:  # a rule across settings: its message names them
        return message
    field = str(first["loc"][0])
    where = sources.get(field, field)
    # Inside a list of tables (models): which one, and which key of it.
    where += "".join(
        f"[{part}]" if isinstance(part, int) else f".{part}" for part in first["loc"][1:]
    )
    shown = "***" if field.startswith("api_keys") or field == "llm_api_key" else first.get("input")
    return f"{where}: {message} (got {shown!r})"


def load_settings(
    *,
    config_file: Path | None = None,
    environ: Mapping[str, str] | None = None,
    overrides: Mapping[str, Any] | None = None,
) -> Settings:
    """Build the Settings from a TOML file, the environment and explicit overrides (CLI flags).

    Raises ConfigError with one line naming the offending setting.
    """
    merged: dict[str, Any] = {}
    sources: dict[str, str] = {}
    if config_file is not None:
        for key, value in _read_toml(config_file).items():
            merged[key] = value
            sources[key] = f"{config_file}: {key}"
    for key, value in _coerce_env(os.environ if environ is None else environ).items():
        merged[key] = value
        sources[key] = ENV_PREFIX + key.upper()
    for key, value in (overrides or {}).items():
        if value is not None:
            merged[key] = value
            sources[key] = "--" + key.replace("_", "-")
    try:
        # Strings from the environment need lax coercion ("8000" -> 8000); TOML values keep theirs.
        return Settings.model_validate(merged)
    except ValidationError as exc:
        raise ConfigError(_describe(exc, sources)) from None
