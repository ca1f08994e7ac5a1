"""Per-address token buckets (ratelimit.py), with an injected clock."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from relayd.ratelimit import KeyedLimiter


def test_limiter_allows_burst_then_waits_at_rate() -> None:
    """burst events pass at once; the next waits 1/rate seconds."""
    limiter = KeyedLimiter(rate=2.0, burst=3)
    for _ in range(3):
        assert limiter.retry_after("10.0.0.1", 0.0) == 0
        limiter.hit("10.0.0.1", 0.0)
    assert limiter.retry_after("10.0.0.1", 0.0) == pytest.approx(0.5)
    assert limiter.retry_after("10.0.0.2", 0.0) == 0
    assert limiter.retry_after("10.0.0.1", 0.5) == 0


@given(st.lists(st.tuples(st.integers(0, 50), st.floats(0, 5)), max_size=200))
def test_limiter_table_stays_within_max_keys(events: list[tuple[int, float]]) -> None:
    """However many addresses hit it, the table never holds more than max_keys."""
    limiter = KeyedLimiter(rate=1.0, burst=2, max_keys=10)
    now = 0.0
    for key, step in events:
        now += step
        limiter.hit(str(key), now)
        assert len(limiter) <= 10


def test_limiter_full_table_refuses_new_keys_until_pruned() -> None:
    """Past max_keys a new address must wait (fail closed); refilled keys make room again."""
    limiter = KeyedLimiter(rate=1.0, burst=2, max_keys=2)
    limiter.hit("a", 0.0)
    limiter.hit("b", 0.0)
    assert limiter.retry_after("c", 0.0) == 1.0
    limiter.hit("c", 0.0)  # no room, and nothing refilled to prune: not recorded
    assert len(limiter) == 2
    limiter.hit("c", 1.0)  # a and b are full again: pruned, c gets a bucket
    assert len(limiter) == 1
    assert limiter.retry_after("c", 1.0) == 0


def test_limiter_prune_keeps_keys_still_refilling() -> None:
    """prune forgets only keys whose bucket is full again: those still hold a debt."""
    limiter = KeyedLimiter(rate=1.0, burst=2)
    limiter.hit("idle", 0.0)
    limiter.hit("busy", 0.0)
    limiter.hit("busy", 0.5)
    limiter.prune(1.2)
    assert len(limiter) == 1
    assert limiter.retry_after("busy", 1.2) == 0  # 1.2 tokens back: one more is allowed
