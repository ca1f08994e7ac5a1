"""One-time console tickets for browsers, which cannot set headers on a WebSocket.

A ticket is 256 random bits, bound to the principal, the VM and the mode it
was issued for, valid for `TICKET_TTL` seconds and usable once. Only a hash
of each ticket is kept, so even a memory dump does not yield usable
tickets. No I/O; the clock is a parameter.
"""

from __future__ import annotations

import hashlib
import secrets
from dataclasses import dataclass

from .errors import AuthError, RateLimitedError
from .principal import Principal

TICKET_TTL = 30.0
MAX_OUTSTANDING = 10_000
MAX_PER_PRINCIPAL = 20


@dataclass(frozen=True)
class Ticket:
    """What a redeemed ticket stands for."""

    principal: Principal
    vm: str
    mode: str
    expires: float


def _key(ticket: str) -> bytes:
    return hashlib.sha256(ticket.encode("ascii", "replace")).digest()


class TicketStore:
    """Outstanding tickets, bounded in number overall and per principal."""

    def __init__(self, ttl: float = TICKET_TTL) -> None:
        self.ttl = ttl
        self._tickets: dict[bytes, Ticket] = {}

    def __len__(self) -> int:
        return len(self._tickets)

    def issue(self, principal: Principal, vm: str, mode: str, now: float) -> str:
        """A new ticket.

        Raises:
            RateLimitedError: too many outstanding tickets (overall or for this principal).
        """
        self.expire(now)
        if len(self._tickets) >= MAX_OUTSTANDING:
            raise RateLimitedError("too many outstanding tickets", code="too_many_tickets")
        mine = sum(1 for t in self._tickets.values() if t.principal.id == principal.id)
        if mine >= MAX_PER_PRINCIPAL:
            raise RateLimitedError(
                f"{principal.id} already holds {mine} unused tickets", code="too_many_tickets"
            )
        ticket = secrets.token_urlsafe(32)
        self._tickets[_key(ticket)] = Ticket(principal, vm, mode, now + self.ttl)
        return ticket

    def redeem(self, ticket: str, vm: str, now: float) -> Ticket:
        """Use a ticket once.

        Raises:
            AuthError: unknown, already used, expired, or issued for another VM.
        """
        found = self._tickets.pop(_key(ticket), None)
        if found is None:
            raise AuthError("ticket is unknown or already used", code="invalid_ticket")
        if found.expires <= now:
            raise AuthError("ticket has expired", code="ticket_expired")
        if found.vm != vm:
            raise AuthError("ticket was issued for another vm", code="invalid_ticket")
        return found

    def expire(self, now: float) -> None:
        """Forget expired tickets."""
        stale = [k for k, t in self._tickets.items() if t.expires <= now]
        for k in stale:
            del self._tickets[k]
