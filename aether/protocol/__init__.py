"""The wire protocol both transports speak: message models, ids and their validation.

The WebSocket endpoint and the REST routes import it; it imports neither of them, nor Trio or
Quart: what a client may send is decided by pure functions over its bytes.

@.architecture
role: wire protocol package
jobs: [package_metadata]
"""
