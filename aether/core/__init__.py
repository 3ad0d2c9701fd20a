"""Aether's transport-free core: the runtime engine, providers and request tracking.

Nothing under ``aether.core`` imports Quart, the WebSocket layer or the REST API.

@.architecture
role: core package
jobs: [package_metadata]
"""
