"""ModelCatalog: the models a client can name, the paths that serve each, and its upstream.

A server answers with the models of its configuration: the one-model shorthand (``llm_model`` at
``llm_base_url``, served on the HTTP path and, with the ``oi`` extra, the agentic path), the
``[[models]]`` tables (each on the one path it names), and the built-in echo model (listed only
when it is the default; its path stays for ``path: "echo"``). A chat names a model, a path, both
or neither:

- neither: the default model on its default path (the shorthand's, else the first table's, else
  echo; ``provider`` picks the shorthand's path, or ``echo`` makes echo the default);
- a path only: the first model served on it (the default model first);
- a model: that model, on its own path or on the one asked if it serves it. A name the catalog
  does not know is ``UnknownModel``, never another model in its place.

Keys are read once, from the environment variables the tables name (``api_key_env``).

@.architecture
role: model catalog
jobs: [config_loading, path_selection, validation]
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field, replace

from aether.config import ECHO_MODEL, ConfigError, Settings
from aether.core.chat import PathName
from aether.core.errors import PathUnavailable, UnknownModel


@dataclass(frozen=True)
class Upstream:
    """Where a model is served: an OpenAI-compatible API."""

    base_url: str
    model: str  # its name upstream
    api_key: str | None = field(default=None, repr=False)


@dataclass(frozen=True)
class ServedModel:
    name: str
    paths: tuple[PathName, ...]  # the first is the one a chat gets unless it asks
    upstream: Upstream | None  # None: the built-in echo model
    # Whether clients see and name it. The echo model beside real ones is not (a model list
    # in a chat UI should not offer it), but its path stays there for ``path: "echo"``.
    listed: bool = True

    @property
    def default_path(self) -> PathName:
        return self.paths[0]


ECHO = ServedModel(ECHO_MODEL, ("echo",), None)


class ModelCatalog:
    def __init__(self, models: Sequence[ServedModel], default_reason: str = "") -> None:
        """``models``: the default first; ``default_reason``: why it is (for the startup log
        and ``GET /v1/tools``: a user who installed the agentic extra for the tests should not
        be surprised that code execution is on)."""
        if not models:
            raise ValueError("a catalog needs a model")
        self._models = {model.name: model for model in models}
        self.default = models[0]
        self.default_reason = default_reason

    def __iter__(self) -> Iterator[ServedModel]:
        """Every model, the unlisted too."""
        return iter(self._models.values())

    @property
    def listed(self) -> list[ServedModel]:
        """The models clients can name, the default first."""
        return [model for model in self if model.listed]

    def __contains__(self, name: object) -> bool:
        model = self._models.get(name) if isinstance(name, str) else None
        return model is not None and model.listed

    @property
    def paths(self) -> list[PathName]:
        """Every path some model is served on, in the order the models first name them."""
        found: list[PathName] = []
        for model in self:
            found.extend(path for path in model.paths if path not in found)
        return found

    def get(self, name: str) -> ServedModel:
        model = self._models.get(name)
        if model is not None and model.listed:
            return model
        raise UnknownModel(f"no model named {name!r} on this server (GET /v1/models lists them)")

    def resolve(self, name: str | None, path: PathName) -> tuple[ServedModel, PathName]:
        """The model and path a chat asking for ``name`` (None: any) on ``path`` gets.
        Raises UnknownModel, or PathUnavailable when no model it may get serves the path."""
        if name is not None:
            model = self.get(name)
            if path == "auto":
                return model, model.default_path
            if path not in model.paths:
                served = " or ".join(model.paths)
                raise PathUnavailable(f"the model {name!r} is served on the {served} path")
            return model, path
        if path == "auto":
            return self.default, self.default.default_path
        for model in self:
            if path in model.paths:
                return model, path
        if path == "http":
            raise PathUnavailable("the http path needs a model: set AETHER_LLM_BASE_URL")
        raise PathUnavailable(f"the {path} path is not available on this server")


def catalog_from_settings(
    settings: Settings, environ: Mapping[str, str], agentic: bool
) -> ModelCatalog:
    """The catalog ``settings`` describe; ``agentic``: the Open Interpreter extra is there.
    Raises ConfigError for a model table that cannot be served as written."""
    models: list[ServedModel] = []
    if settings.llm_base_url is not None and settings.llm_model is not None:
        key = settings.llm_api_key.get_secret_value() if settings.llm_api_key else None
        agentic_first = settings.provider == "oi" or (settings.provider == "auto" and agentic)
        paths: tuple[PathName, ...] = ("http", "oi") if agentic else ("http",)
        if agentic_first:
            paths = ("oi", "http")
        models.append(
            ServedModel(
                settings.llm_model, paths, Upstream(settings.llm_base_url, settings.llm_model, key)
            )
        )
    for index, entry in enumerate(settings.models):
        where = f"models[{index}] ({entry.name!r})"
        if entry.path == "oi" and not agentic:
            raise ConfigError(f"{where}: path 'oi' needs the open-interpreter extra")
        key = None
        if entry.api_key_env is not None:
            key = environ.get(entry.api_key_env)
            if not key:
                raise ConfigError(f"{where}: api_key_env {entry.api_key_env} is not set")
        models.append(
            ServedModel(entry.name, (entry.path,), Upstream(entry.base_url, entry.model, key))
        )
    reason = _default_reason(settings, agentic)
    if settings.provider == "echo" or not models:
        models.insert(0, ECHO)
    else:
        models.append(replace(ECHO, listed=False))
        if settings.provider in ("http", "oi"):
            # The default is the first model served on the path ``provider`` names.
            wanted = settings.provider
            first = next((m for m in models if wanted in m.paths), None)
            if first is None:
                raise ConfigError(f"provider {wanted!r}: no model is served on the {wanted} path")
            if first.default_path != wanted:
                first = ServedModel(
                    first.name, (wanted, *(p for p in first.paths if p != wanted)), first.upstream
                )
            models = [first, *(m for m in models if m.name != first.name)]
    return ModelCatalog(models, reason)


def _default_reason(settings: Settings, agentic: bool) -> str:
    """Why the default model answers on its path, in a sentence that says how to change it."""
    provider = settings.provider
    if provider == "echo":
        return "AETHER_PROVIDER=echo"
    if settings.llm_model is None and not settings.models:
        return "no model is configured (AETHER_LLM_BASE_URL and AETHER_LLM_MODEL name one)"
    if provider in ("http", "oi"):
        return f"AETHER_PROVIDER={provider}"
    if settings.llm_model is None:
        return "the first of models names its path"
    if agentic:
        return (
            "AETHER_PROVIDER=auto and the open-interpreter extra is installed: the model's code "
            "runs once approved (AETHER_PROVIDER=http for chat alone)"
        )
    return "AETHER_PROVIDER=auto without the open-interpreter extra"
