"""Tests for relayd.throttle: the token bucket, driven by an injected clock."""

from __future__ import annotations

import math

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from relayd.throttle import TokenBucket


class Clock:
    """A clock that only moves when told to."""

    def __init__(self, now: float = 0.0) -> None:
        self.now = now

    def sleep(self, seconds: float) -> None:
        assert seconds >= 0
        self.now += seconds


def send_paced(bucket: TokenBucket, clock: Clock, total: int, chunk: int) -> float:
    """Send `total` bytes in `chunk`s as the serial writer would; returns the sum of waits."""
    waited = 0.0
    sent = 0
    while sent < total:
        n = min(chunk, total - sent)
        delay = bucket.reserve(n, clock.now)
        clock.sleep(delay)
        waited += delay
        sent += n
    return waited


@pytest.mark.parametrize(("rate", "burst"), [(0, 10), (-1, 10), (10, 0), (10, -5)])
def test_bucket_nonpositive_rate_or_burst_raises_value_error(rate: float, burst: float) -> None:
    """A bucket needs a positive rate and a positive burst."""
    with pytest.raises(ValueError, match="positive"):
        TokenBucket(rate, burst)


def test_bucket_burst_is_allowed_immediately() -> None:
    """A full burst goes at once; the next byte waits one byte-time."""
    bucket = TokenBucket(rate=100, burst=50)
    assert bucket.available(0.0) == 50
    assert bucket.reserve(50, 0.0) == 0.0
    assert bucket.available(0.0) == 0.0
    assert bucket.reserve(1, 0.0) == pytest.approx(0.01)


def test_bucket_burst_in_pieces_is_allowed_immediately() -> None:
    """A burst split into small writes at one instant never waits."""
    bucket = TokenBucket(rate=10, burst=64)
    assert all(bucket.reserve(8, 5.0) == 0.0 for _ in range(8))
    assert bucket.reserve(8, 5.0) > 0


def test_bucket_oversized_request_waits_for_its_debt() -> None:
    """A request larger than the burst waits (n - burst) / rate."""
    bucket = TokenBucket(rate=1000, burst=100)
    assert bucket.reserve(600, 0.0) == pytest.approx(0.5)


def test_bucket_debt_accumulates_across_reservations() -> None:
    """Back-to-back reservations queue: each wait is counted from the same clock."""
    bucket = TokenBucket(rate=10, burst=10)
    assert bucket.reserve(10, 0.0) == 0.0
    assert bucket.reserve(10, 0.0) == pytest.approx(1.0)
    assert bucket.reserve(10, 0.0) == pytest.approx(2.0)
    assert bucket.reserve(10, 0.5) == pytest.approx(2.5)


def test_bucket_refills_at_rate_up_to_burst() -> None:
    """Idle time refills tokens at `rate`, capped at `burst`."""
    bucket = TokenBucket(rate=10, burst=100, now=0.0)
    bucket.reserve(100, 0.0)
    assert bucket.available(2.0) == pytest.approx(20)
    assert bucket.available(5.0) == pytest.approx(50)
    assert bucket.available(1e9) == 100


def test_bucket_clock_going_backwards_adds_no_tokens() -> None:
    """A clock that steps back neither refills nor breaks the bucket."""
    bucket = TokenBucket(rate=10, burst=10, now=100.0)
    bucket.reserve(10, 100.0)
    assert bucket.available(50.0) == 0.0
    assert bucket.available(100.5) == pytest.approx(5)


def test_bucket_clock_going_backwards_takes_no_tokens() -> None:
    """A full bucket seeing an earlier time still grants a whole burst at once."""
    bucket = TokenBucket(rate=10, burst=10, now=100.0)
    assert bucket.reserve(10, 40.0) == 0.0
    assert bucket.reserve(1, 40.0) == pytest.approx(0.1)


def test_bucket_available_after_waiting_the_delay_is_zero() -> None:
    """Waiting exactly the returned delay pays the debt off, no more."""
    bucket = TokenBucket(rate=7, burst=3)
    delay = bucket.reserve(20, 1.0)
    assert delay > 0
    assert bucket.available(1.0 + delay) == pytest.approx(0, abs=1e-9)
    assert bucket.reserve(0, 1.0 + delay) == pytest.approx(0, abs=1e-9)


@pytest.mark.parametrize(
    ("rate", "burst", "total", "chunk"),
    [
        (11520, 256, 65536, 1),
        (11520, 256, 65536, 100),
        (11520, 256, 65536, 4096),
        (1000, 1000, 1_000_000, 333),
        (3.5, 2, 500, 7),
    ],
)
def test_bucket_long_run_rate_equals_rate(
    rate: float, burst: float, total: int, chunk: int
) -> None:
    """A paced paste of N bytes takes (N - burst) / rate seconds in all, whatever the chunking."""
    clock = Clock()
    bucket = TokenBucket(rate, burst)
    waited = send_paced(bucket, clock, total, chunk)
    assert waited == pytest.approx((total - burst) / rate, rel=1e-6)
    assert clock.now == pytest.approx(waited)


@given(
    rate=st.floats(0.5, 1e6),
    burst=st.floats(1, 1e5),
    chunks=st.lists(st.integers(1, 5000), min_size=1, max_size=40),
)
@settings(max_examples=100)
def test_bucket_paced_sender_never_finishes_early(
    rate: float, burst: float, chunks: list[int]
) -> None:
    """A sender that obeys every wait takes at least (N - burst) / rate, and no more."""
    clock = Clock()
    bucket = TokenBucket(rate, burst)
    for n in chunks:
        clock.sleep(bucket.reserve(n, clock.now))
    expected = max(0.0, (sum(chunks) - burst) / rate)
    assert clock.now >= expected * (1 - 1e-9) - 1e-9
    # Time only advances to pay debt, so the bucket never refills past zero: exact.
    assert clock.now == pytest.approx(expected, rel=1e-6, abs=1e-9)


steps = st.lists(
    st.tuples(st.integers(0, 5000), st.floats(0, 10, allow_nan=False)), min_size=1, max_size=40
)


@given(rate=st.floats(1, 1e5), burst=st.floats(1, 1e4), steps=steps)
@settings(max_examples=200)
def test_bucket_cumulative_bytes_never_exceed_burst_plus_rate_times_t(
    rate: float, burst: float, steps: list[tuple[int, float]]
) -> None:
    """Bytes sent by time t, each at its reserve time plus delay, never exceed burst + rate*t."""
    now = 0.0
    bucket = TokenBucket(rate, burst, now=now)
    sends: list[tuple[float, int]] = []
    for n, step in steps:
        now += step
        delay = bucket.reserve(n, now)
        assert delay >= 0
        sends.append((now + delay, n))
    cumulative = 0
    previous = -math.inf
    for when, n in sends:
        assert when >= previous - 1e-9, "reservations are served in order"
        previous = when
        cumulative += n
        slack = 1e-9 * max(1.0, burst + rate * when)
        assert cumulative <= burst + rate * when + slack


@given(
    rate=st.floats(0.1, 1e5),
    burst=st.floats(1, 1e4),
    steps=st.lists(
        st.tuples(st.integers(0, 5000), st.floats(0, 1e4, allow_nan=False)), max_size=40
    ),
)
@settings(max_examples=200)
def test_bucket_available_never_exceeds_burst(
    rate: float, burst: float, steps: list[tuple[int, float]]
) -> None:
    """However long the bucket idles between reservations, available stays within [0, burst]."""
    now = 0.0
    bucket = TokenBucket(rate, burst)
    assert bucket.available(now) == burst
    for n, step in steps:
        now += step
        assert 0.0 <= bucket.available(now) <= burst
        bucket.reserve(n, now)
        assert 0.0 <= bucket.available(now) <= burst


@settings(max_examples=300)
@given(
    steps=st.lists(
        st.tuples(st.integers(1, 200), st.floats(0, 2, allow_nan=False)), min_size=1, max_size=40
    )
)
def test_take_is_available_then_reserve_in_one_step(steps: list[tuple[int, float]]) -> None:
    """`take` grants exactly when `available` would have allowed it, and costs the same."""
    one, two = TokenBucket(rate=300, burst=500), TokenBucket(rate=300, burst=500)
    now = 0.0
    for n, dt in steps:
        now += dt
        allowed = two.available(now) >= n
        if allowed:
            two.reserve(n, now)
        assert one.take(n, now) is allowed
        assert one.available(now) == pytest.approx(two.available(now))
