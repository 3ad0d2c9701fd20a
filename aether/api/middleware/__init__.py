"""Pure ASGI middleware wrapped around the whole application.

@.architecture
role: middleware package
jobs: [package_metadata]
"""
