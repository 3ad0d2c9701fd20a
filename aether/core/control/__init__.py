"""The control plane: what the workers of one Aether server share (embedded, or Redis).

@.architecture
role: control plane package
jobs: [package_metadata]
"""
