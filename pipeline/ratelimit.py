"""A token bucket: admission's SYN budgets, and replies an attacker could otherwise multiply (ICMP errors, resets)."""

from __future__ import annotations


class TokenBucket:
    """``rate`` tokens per second up to ``burst``, full at the start; ``take`` spends one if there is one."""

    __slots__ = ("rate", "burst", "tokens", "stamp")

    def __init__(self, rate: float, burst: float) -> None:
        self.rate = rate
        self.burst = burst
        self.tokens = float(burst)
        self.stamp = float("-inf")  # never refilled: the first take sees a full bucket

    def take(self, now: float) -> bool:
        tokens = min(self.burst, self.tokens + (now - self.stamp) * self.rate)
        self.stamp = now
        if tokens >= 1.0:
            self.tokens = tokens - 1.0
            return True
        self.tokens = tokens
        return False
