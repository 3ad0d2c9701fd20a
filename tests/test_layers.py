"""The package's layers point one way: ``main -> app -> api | ws -> protocol, asgi -> core``,
and inside the core ``runtime -> providers -> history, chat``.

Read from the source (every ``import`` statement, those inside functions too), so a forbidden
dependency fails here before it becomes a knot.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parent.parent / "aether"

# module prefix -> the imports it must never make (prefixes of dotted names).
FORBIDDEN: dict[str, tuple[str, ...]] = {
    "aether.api": ("aether.ws", "aether.server", "aether.main"),
    "aether.ws": ("aether.api", "aether.server", "aether.main", "quart"),
    "aether.protocol": ("aether.api", "aether.ws", "aether.core", "trio", "quart", "hypercorn"),
    "aether.asgi": ("aether.api", "aether.ws", "quart", "hypercorn"),
    "aether.core": (
        "aether.api",
        "aether.ws",
        "aether.app",
        "aether.main",
        "aether.server",
        "aether.asgi",
        "aether.protocol",
        "quart",
        "quart_trio",
        "quart_schema",
        "hypercorn",
        "werkzeug",
    ),
    "aether.server": ("aether.ws", "aether.core", "quart"),
    # Inside the core: the runtime drives the providers, never the reverse; value objects and
    # the store sit below both.
    "aether.core.providers": ("aether.core.runtime",),
    "aether.core.history": ("aether.core.runtime", "aether.core.providers"),
    # The control plane sits below the runtime, which drives it.
    "aether.core.control": ("aether.core.runtime", "aether.core.providers", "aether.core.history"),
    "aether.core.chat": ("aether.core.runtime", "aether.core.providers", "aether.core.history"),
}


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imports_of(path: Path) -> set[str]:
    """Every module a file imports (``from x import y`` counts as ``x`` and ``x.y``)."""
    names: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module)
            names.update(f"{node.module}.{alias.name}" for alias in node.names)
    return names


def within(name: str, prefix: str) -> bool:
    return name == prefix or name.startswith(prefix + ".")


MODULES = sorted(PACKAGE.rglob("*.py"))


@pytest.mark.parametrize("path", MODULES, ids=[module_name(p) for p in MODULES])
def test_a_module_imports_nothing_its_layer_must_not(path: Path) -> None:
    module = module_name(path)
    rules = [bad for layer, bad in FORBIDDEN.items() if within(module, layer)]
    broken = sorted(
        name
        for name in imports_of(path)
        for forbidden in rules
        for prefix in forbidden
        if within(name, prefix)
    )
    assert broken == [], f"{module} imports {broken}"


def test_the_rules_name_real_layers() -> None:
    names = {module_name(path) for path in MODULES}
    for layer in FORBIDDEN:
        assert any(within(name, layer) for name in names), layer
