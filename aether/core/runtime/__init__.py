"""The runtime: engine, streamer, request tracker, relay and outbox.

@.architecture
role: runtime package
jobs: [package_metadata]
"""
