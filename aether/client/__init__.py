"""Clients of Aether's own protocol (the terminal client).

@.architecture
role: client package
jobs: [package_metadata]
"""
