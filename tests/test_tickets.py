"""Tickets and per-address limiters, with an injected clock."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from relayd.auth import Principal
from relayd.errors import AuthError, RateLimitedError
from relayd.ratelimit import KeyedLimiter
from relayd.tickets import MAX_PER_PRINCIPAL, TicketStore

ALICE = Principal("user:alice")


def test_ticket_redeemed_once_returns_principal_vm_and_mode() -> None:
    """A fresh ticket redeems to what it was issued for, and only once."""
    store = TicketStore()
    ticket = store.issue(ALICE, "vm-a", "spectate", now=100.0)
    found = store.redeem(ticket, "vm-a", now=101.0)
    assert (found.principal, found.vm, found.mode) == (ALICE, "vm-a", "spectate")
    with pytest.raises(AuthError) as info:
        store.redeem(ticket, "vm-a", now=101.0)
    assert info.value.code == "invalid_ticket"


def test_ticket_after_ttl_is_expired() -> None:
    """A ticket presented after its 30 s is refused as expired."""
    store = TicketStore()
    ticket = store.issue(ALICE, "vm-a", "interactive", now=0.0)
    with pytest.raises(AuthError) as info:
        store.redeem(ticket, "vm-a", now=30.0)
    assert info.value.code == "ticket_expired"


def test_ticket_for_other_vm_is_refused_and_spent() -> None:
    """A ticket is bound to its VM; trying it elsewhere also uses it up."""
    store = TicketStore()
    ticket = store.issue(ALICE, "vm-a", "interactive", now=0.0)
    with pytest.raises(AuthError):
        store.redeem(ticket, "vm-b", now=1.0)
    with pytest.raises(AuthError):
        store.redeem(ticket, "vm-a", now=1.0)


def test_tickets_per_principal_are_capped_until_they_expire() -> None:
    """A principal cannot hoard tickets; expired ones stop counting."""
    store = TicketStore()
    for _ in range(MAX_PER_PRINCIPAL):
        store.issue(ALICE, "vm-a", "interactive", now=0.0)
    with pytest.raises(RateLimitedError):
        store.issue(ALICE, "vm-a", "interactive", now=0.0)
    store.issue(ALICE, "vm-a", "interactive", now=31.0)
    assert len(store) == 1


@given(st.text(max_size=200))
def test_ticket_redeem_arbitrary_string_is_auth_error(text: str) -> None:
    """Any string that was not issued is refused with AuthError, never another exception."""
    store = TicketStore()
    store.issue(ALICE, "vm-a", "interactive", now=0.0)
    with pytest.raises(AuthError):
        store.redeem(text, "vm-a", now=1.0)


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
