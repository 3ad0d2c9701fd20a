"""The README stays true to the code."""

from __future__ import annotations

import re
from pathlib import Path

from aether.config import Settings

README = Path(__file__).resolve().parent.parent / "README.md"


def test_configuration_table_lists_every_setting() -> None:
    rows = re.findall(r"^\| `([a-z_]+)` \| `(AETHER_[A-Z_]+)` \|", README.read_text(), re.M)
    assert [name for name, _ in rows] == list(Settings.model_fields)
    assert all(env == "AETHER_" + name.upper() for name, env in rows)


def test_quickstart_shows_the_two_commands() -> None:
    text = README.read_text()
    assert "scripts/serve" in text
    assert "scripts/test" in text
