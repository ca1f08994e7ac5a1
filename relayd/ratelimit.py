"""Per-key token buckets (per source address), bounded in memory.

Keys whose bucket has refilled completely carry no information and are
pruned, so an attacker cycling addresses cannot grow the table without
bound beyond `max_keys` (past which new keys are refused outright: failing
closed under a flood is the safe side for a console gateway). No I/O.
"""

from __future__ import annotations

from .throttle import TokenBucket


class KeyedLimiter:
    """Allow `burst` events at once and `rate` per second after, per key."""

    def __init__(self, rate: float, burst: float, *, max_keys: int = 100_000) -> None:
        self.rate = rate
        self.burst = burst
        self.max_keys = max_keys
        self._buckets: dict[str, TokenBucket] = {}

    def __len__(self) -> int:
        return len(self._buckets)

    def retry_after(self, key: str, now: float) -> float:
        """Seconds until one more event is allowed for `key` (0 when allowed now)."""
        bucket = self._buckets.get(key)
        if bucket is None:
            return 0.0 if len(self._buckets) < self.max_keys else 1.0
        available = bucket.available(now)
        return 0.0 if available >= 1 else (1 - available) / self.rate

    def hit(self, key: str, now: float) -> None:
        """Record one event for `key`."""
        bucket = self._buckets.get(key)
        if bucket is None:
            if len(self._buckets) >= self.max_keys:
                self.prune(now)
                if len(self._buckets) >= self.max_keys:
                    return
            bucket = self._buckets[key] = TokenBucket(self.rate, self.burst, now=now)
        bucket.reserve(1, now)

    def prune(self, now: float) -> None:
        """Drop keys whose bucket is full again."""
        full = [k for k, b in self._buckets.items() if b.available(now) >= self.burst]
        for k in full:
            del self._buckets[k]
