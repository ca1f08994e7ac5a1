"""One-time console tickets, with an injected clock."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from relayd.errors import AuthError, RateLimitedError
from relayd.principal import Principal
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
