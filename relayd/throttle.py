"""A token bucket: how long to wait before sending n more bytes.

No I/O: the clock is a parameter, so pacing is testable without time passing.
"""

from __future__ import annotations


class TokenBucket:
    """Rate limiter allowing `burst` bytes at once and `rate` bytes per second after."""

    def __init__(self, rate: float, burst: float, *, now: float = 0.0) -> None:
        if rate <= 0 or burst <= 0:
            raise ValueError("rate and burst must be positive")
        self.rate = float(rate)
        self.burst = float(burst)
        self._tokens = float(burst)
        self._last = now

    def _refill(self, now: float) -> None:
        if now > self._last:
            self._tokens = min(self.burst, self._tokens + (now - self._last) * self.rate)
            self._last = now

    def reserve(self, n: int, now: float) -> float:
        """Take `n` bytes' worth of tokens; returns seconds to wait before sending them.

        Tokens may go negative: the debt is the wait, so callers never busy-loop.
        """
        self._refill(now)
        self._tokens -= n
        return 0.0 if self._tokens >= 0 else -self._tokens / self.rate

    def take(self, n: int, now: float) -> bool:
        """Take `n` bytes' worth if they are there now; False (and nothing taken) if not.

        One refill instead of `available` then `reserve`: the keystroke path asks
        this twice per key (input pacing, output cap).
        """
        if now > self._last:
            self._tokens = min(self.burst, self._tokens + (now - self._last) * self.rate)
            self._last = now
        if self._tokens < n:
            return False
        self._tokens -= n
        return True

    def available(self, now: float) -> float:
        """Bytes that could be sent right now without waiting."""
        self._refill(now)
        return max(0.0, self._tokens)
