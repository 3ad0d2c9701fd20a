"""Version 1 of the REST API.

@.architecture
role: REST v1 package
jobs: [package_metadata]
"""
