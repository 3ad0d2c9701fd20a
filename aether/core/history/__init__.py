"""Conversation history: the store interface, its SQLite implementation, the per-turn
recorder of a streaming answer and the engine's one writer that stores them all.

@.architecture
role: history package
jobs: [package_metadata]
"""
