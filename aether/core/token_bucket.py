"""A token bucket: ``limit`` tokens, refilled evenly over ``window_s``. Pure: the caller gives
the time, so the same code serves per-IP HTTP limits and per-connection message limits, and is
tested without a clock.

@.architecture
role: token bucket
jobs: [limit_checking]
"""

from __future__ import annotations


class TokenBucket:
    __slots__ = ("limit", "refill_per_s", "tokens", "updated")

    def __init__(self, limit: int, window_s: float, now: float) -> None:
        self.limit = limit
        self.refill_per_s = limit / window_s
        self.tokens = float(limit)
        self.updated = now

    def take(self, now: float) -> tuple[bool, int, float]:
        """Take one token: (allowed, whole tokens left, seconds until the next token)."""
        self.tokens = min(self.limit, self.tokens + (now - self.updated) * self.refill_per_s)
        self.updated = now
        if self.tokens >= 1:
            self.tokens -= 1
            return True, int(self.tokens), 0.0
        return False, 0, (1 - self.tokens) / self.refill_per_s
