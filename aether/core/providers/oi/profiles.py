"""OIProfile: an Open Interpreter profile (``oi_profile``) applied to every interpreter before
Aether's own policy.

A profile shapes how the model behaves (its custom instructions, languages, system message
additions, any attribute of the interpreter), as Open Interpreter's profiles do: YAML or JSON
(attributes, nested as the interpreter's are) or Python (run with ``interpreter`` in scope).
Aether reads it itself rather than through Open Interpreter's loader, which can ask on the
terminal to migrate an old profile, sleeps two seconds over a ``system_message``, fetches URLs
and renames files in its own directory. It is read and checked once at startup (a bad one stops
it, naming the file), then applied to each new interpreter; the server's policy is applied
after it (code runs only once approved unless the operator set ``oi_auto_run``, offline, no
telemetry, the sandbox, the turn's model), so a profile cannot switch a guard off.

@.architecture
role: Open Interpreter profiles
jobs: [config_loading, oi_initialization]
"""

from __future__ import annotations

import ast
import json
from dataclasses import dataclass
from pathlib import Path
from types import CodeType
from typing import Any

from aether.config import ConfigError

# Keys of Open Interpreter's profile files that are about the file, not the interpreter.
FILE_KEYS = ("version", "wtf")


@dataclass(frozen=True)
class OIProfile:
    path: Path
    attributes: dict[str, Any] | None = None  # YAML or JSON
    script: CodeType | None = None  # Python

    @property
    def name(self) -> str:
        return self.path.name

    def apply(self, interpreter: Any) -> None:
        if self.script is not None:
            scope: dict[str, Any] = {"interpreter": interpreter}
            exec(self.script, scope, scope)
        if self.attributes is not None:
            attributes = dict(self.attributes)
            languages = (attributes.get("computer") or {}).get("languages")
            if languages is not None:
                # As Open Interpreter: the languages named, of those it has.
                wanted = {str(name).lower() for name in languages}
                interpreter.computer.languages = [
                    language
                    for language in interpreter.computer.languages
                    if language.name.lower() in wanted
                ]
                attributes["computer"] = {
                    k: v for k, v in attributes["computer"].items() if k != "languages"
                }
            _set(interpreter, attributes)


def _set(target: Any, attributes: dict[str, Any]) -> None:
    for key, value in attributes.items():
        if isinstance(value, dict):
            _set(getattr(target, key), value)
        else:
            setattr(target, key, value)


def load_profile(path: Path) -> OIProfile:
    """The profile at ``path``, read and checked. Raises ConfigError naming the file."""
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise ConfigError(f"oi_profile {path}: {exc.strerror or exc}") from None
    suffix = path.suffix.lower()
    try:
        if suffix == ".py":
            tree = _WithoutOwnInterpreter().visit(ast.parse(text, str(path)))
            return OIProfile(path, script=compile(tree, str(path), "exec"))
        if suffix == ".json":
            data = json.loads(text)
        elif suffix in (".yaml", ".yml"):
            import yaml

            data = yaml.safe_load(text)
        else:
            raise ConfigError(f"oi_profile {path}: a profile is a .yaml, .yml, .json or .py file")
    except (SyntaxError, ValueError) as exc:
        raise ConfigError(f"oi_profile {path}: {exc}") from None
    except Exception as exc:  # YAML's errors
        if exc.__class__.__module__.startswith("yaml"):
            raise ConfigError(f"oi_profile {path}: not valid YAML: {exc}") from None
        raise
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigError(f"oi_profile {path}: a profile is a mapping of settings")
    return OIProfile(path, attributes={k: v for k, v in data.items() if k not in FILE_KEYS})


class _WithoutOwnInterpreter(ast.NodeTransformer):
    """A Python profile makes its own interpreter (``from interpreter import interpreter``,
    ``interpreter = OpenInterpreter()``), as Open Interpreter's loader expects: those lines go,
    and the script works on the one it is given."""

    def visit_ImportFrom(self, node: ast.ImportFrom) -> ast.AST | None:
        if node.module == "interpreter":
            kept = [alias for alias in node.names if alias.name != "interpreter"]
            if not kept:
                return None
            node.names = kept
        return node

    def visit_Assign(self, node: ast.Assign) -> ast.AST | None:
        target = node.targets[0]
        value = node.value
        if (
            isinstance(target, ast.Name)
            and target.id == "interpreter"
            and isinstance(value, ast.Call)
            and isinstance(value.func, ast.Name)
            and value.func.id == "OpenInterpreter"
        ):
            return None
        return node
