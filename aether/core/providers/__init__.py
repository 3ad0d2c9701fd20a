"""Model paths: each provider turns a ChatRequest into LMC chunks sent into a channel.

@.architecture
role: providers package
jobs: [package_metadata]
"""
