"""Conversation history: the store interface, its SQLite implementation and the per-turn
recorder that saves a streaming answer as it goes.

@.architecture
role: history package
jobs: [package_metadata]
"""
