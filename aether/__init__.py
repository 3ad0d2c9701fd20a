"""Aether: a Trio server that streams LLM chat over WebSocket and SSE, with deterministic stop.

@.architecture
role: package root
jobs: [package_metadata]
"""

__version__ = "0.1.0"
# 2: every code confirmation has a confirmation_id, which an approve must name.
PROTOCOL_VERSION = 2

__all__ = ["PROTOCOL_VERSION", "__version__"]
