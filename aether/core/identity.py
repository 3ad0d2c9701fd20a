"""Who is calling: the identity that owns requests and conversations.

Ownership belongs to the caller's identity (its API key), not its connection: a caller sees and
stops its own requests from any of its connections. Without configured keys every caller is the
same anonymous identity, and the server only listens on loopback.

@.architecture
role: caller identity
jobs: [identity_resolution]
"""

from __future__ import annotations

import hashlib
import hmac
from collections.abc import Iterable
from pathlib import Path

ANONYMOUS = "anonymous"


def _digest(secret: str) -> bytes:
    return hashlib.sha256(secret.encode()).digest()


class KeyRing:
    """The configured API keys, each with the identity it stands for.

    A key is compared by its SHA-256 digest with ``hmac.compare_digest`` against every key, with
    no early exit, so the time taken says nothing about which key (or how much of one) matched.
    """

    def __init__(self, keys: Iterable[tuple[str, str]]) -> None:
        self._keys = [(_digest(key), name) for name, key in keys]

    @classmethod
    def from_settings(cls, keys: Iterable[str], keys_file: Path | None) -> KeyRing:
        named = [(cls.default_name(key), key) for key in keys]
        if keys_file is not None:
            named += cls.parse_file(keys_file.read_text())
        return cls(named)

    @staticmethod
    def default_name(key: str) -> str:
        return "key-" + hashlib.sha256(key.encode()).hexdigest()[:12]

    @classmethod
    def parse_file(cls, text: str) -> list[tuple[str, str]]:
        """Lines of ``key`` or ``name:key``; blank lines and ``#`` comments are skipped."""
        named = []
        for raw in text.splitlines():
            line = raw.strip()
            if not line or line.startswith("#"):
                continue
            name, sep, key = line.partition(":")
            named.append((name.strip(), key.strip()) if sep else (cls.default_name(line), line))
        return named

    @property
    def enabled(self) -> bool:
        return bool(self._keys)

    def __len__(self) -> int:
        return len(self._keys)

    def identify(self, token: str) -> str | None:
        """The identity of a presented key, or None when it matches no key."""
        presented = _digest(token)
        found: str | None = None
        for digest, name in self._keys:
            if hmac.compare_digest(presented, digest):
                found = name
        return found
