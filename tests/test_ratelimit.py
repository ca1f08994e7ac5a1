"""Tests for relayd.ratelimit: per-address keys (IPv6 by /64), buckets, handshake slots."""

from __future__ import annotations

import ipaddress

from hypothesis import given
from hypothesis import strategies as st

from relayd.ratelimit import HandshakeSlots, KeyedLimiter, address_key

v6_networks = st.integers(0, 2**64 - 1)
v6_hosts = st.integers(0, 2**64 - 1)


def _v6(network: int, host: int) -> str:
    return str(ipaddress.IPv6Address((network << 64) | host))


@given(v6_networks, v6_hosts, v6_hosts)
def test_address_key_ipv6_addresses_of_one_64_share_a_key(network: int, a: int, b: int) -> None:
    """One /64 is one subscriber (RFC 6177 hands out at least that): one key for all of it."""
    assert address_key(_v6(network, a)) == address_key(_v6(network, b))


@given(v6_networks, v6_networks, v6_hosts)
def test_address_key_ipv6_addresses_of_two_64s_differ(n1: int, n2: int, host: int) -> None:
    """Different /64s are different keys."""
    if n1 != n2:
        assert address_key(_v6(n1, host)) != address_key(_v6(n2, host))


@given(st.integers(0, 2**32 - 1), st.integers(0, 2**32 - 1))
def test_address_key_ipv4_is_the_whole_address(a: int, b: int) -> None:
    """IPv4 addresses are scarce: each is its own key."""
    ka, kb = address_key(str(ipaddress.IPv4Address(a))), address_key(str(ipaddress.IPv4Address(b)))
    assert (ka == kb) == (a == b)


def test_address_key_leaves_what_is_not_an_address_alone() -> None:
    """A unix-socket peer ("-") or another label keys as itself."""
    assert address_key("-") == "-"


def test_keyed_limiter_counts_an_ipv6_64_as_one_address() -> None:
    """Cycling through addresses of one /64 does not escape the per-address rate."""
    limiter = KeyedLimiter(1, 2)
    for host in range(2):
        limiter.hit(f"2001:db8::{host + 1}", 0.0)
    assert limiter.retry_after("2001:db8::ffff", 0.0) > 0
    assert limiter.retry_after("2001:db8:0:1::1", 0.0) == 0


def test_handshake_slots_refuse_past_the_per_address_cap_and_the_total() -> None:
    """Per-address and global caps, both freed on leave."""
    slots = HandshakeSlots()
    assert slots.enter("a", max_total=3, max_per_key=2)
    assert slots.enter("a", max_total=3, max_per_key=2)
    assert not slots.enter("a", max_total=3, max_per_key=2)
    assert slots.enter("b", max_total=3, max_per_key=2)
    assert not slots.enter("c", max_total=3, max_per_key=2)
    slots.leave("a")
    assert slots.enter("c", max_total=3, max_per_key=2)
    assert (slots.total, slots.held("a"), slots.held("c")) == (3, 1, 1)


@given(
    st.lists(
        st.tuples(st.booleans(), st.sampled_from("abcd"), st.sampled_from([None, "x"])),
        max_size=60,
    ),
    st.integers(0, 5),
    st.integers(0, 3),
)
def test_handshake_slots_never_exceed_their_caps_and_empty_when_all_leave(
    ops: list[tuple[bool, str, str | None]], max_total: int, max_per_key: int
) -> None:
    """Any sequence of arrivals (some through a proxy, keyed later) and departures."""
    slots = HandshakeSlots()
    held: list[str | None] = []
    for arrive, key, via_proxy in ops:
        if arrive:
            first = None if via_proxy else key
            if slots.enter(first, max_total=max_total, max_per_key=max_per_key):
                if first is None:
                    if slots.assign(key, max_per_key=max_per_key):
                        held.append(key)
                    else:
                        slots.leave(None)
                else:
                    held.append(key)
        elif held:
            slots.leave(held.pop(0))
        assert max_total == 0 or slots.total <= max_total
        if max_per_key:
            assert all(slots.held(k) <= max_per_key for k in "abcd")
    for key in held:
        slots.leave(key)
    assert slots.total == 0
    assert all(slots.held(k) == 0 for k in "abcd")
