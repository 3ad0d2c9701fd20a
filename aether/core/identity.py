"""Who is calling: the identity that owns requests and conversations.

Ownership belongs to the caller's identity, not its connection. Until API keys are configured
every caller is the same anonymous identity (and the server only listens on loopback).

@.architecture
role: caller identity
jobs: [identity_resolution]
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

ANONYMOUS = "anonymous"
# The ASGI scope key under which an authentication layer records the caller's identity.
SCOPE_IDENTITY_KEY = "aether.identity"


def identity_from_scope(scope: Mapping[str, Any]) -> str:
    identity = scope.get(SCOPE_IDENTITY_KEY)
    return identity if isinstance(identity, str) and identity else ANONYMOUS
