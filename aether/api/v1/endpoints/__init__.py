"""REST v1 endpoints, one module per resource.

@.architecture
role: REST endpoints package
jobs: [package_metadata]
"""
