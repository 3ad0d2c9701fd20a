"""Test support shipped with Aether: the fake OpenAI-compatible upstream server.

@.architecture
role: testing package
jobs: [package_metadata]
"""
