"""Hypercorn's trio worker as Aether runs it: HTTP/1.1 only, and one connection's failure is that
connection's alone.

@.architecture
role: HTTP server package
jobs: [package_metadata]
"""
