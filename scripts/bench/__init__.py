"""Baseline relays for scripts/bench_stream.py: the same wire protocol on other stacks.

@.architecture
role: benchmark baselines package
jobs: [benchmarking]
"""
