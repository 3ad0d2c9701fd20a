"""The WebSocket transport: wire protocol, hub, message handling and the ASGI endpoint.

@.architecture
role: websocket package
jobs: [package_metadata]
"""
