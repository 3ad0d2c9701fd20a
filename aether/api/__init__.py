"""The REST transport: Quart blueprints and the helpers they share.

@.architecture
role: REST package
jobs: [package_metadata]
"""
