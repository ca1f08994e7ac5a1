"""The single-writer lease of one console.

At most one session holds a console's write lease. When a newcomer asks for
it while it is held, the VM's ``takeover`` policy decides:

    policy   holder?   decision               newcomer     old holder
    ------   -------   --------------------   ----------   ------------------------
    any      none      Granted                writer       -
    any      self      Granted                writer       -
    evict    other     Evicted(previous)      writer       notice, close 4001
    demote   other     Demoted(previous)      writer       notice, stays as spectator
    deny     other     Denied(holder)         refused      keeps writing (HTTP 409)

The lease only decides; the hub carries the decision out. No I/O.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

TakeoverPolicy = Literal["evict", "demote", "deny"]


@dataclass(frozen=True)
class Granted:
    """The newcomer holds the lease; nobody was displaced."""


@dataclass(frozen=True)
class Evicted:
    """The newcomer holds the lease; `previous` must be closed with 4001."""

    previous: str


@dataclass(frozen=True)
class Demoted:
    """The newcomer holds the lease; `previous` stays on as a spectator."""

    previous: str


@dataclass(frozen=True)
class Denied:
    """`holder` keeps the lease; the newcomer is refused."""

    holder: str


Decision = Granted | Evicted | Demoted | Denied


class WriterLease:
    """Who may write to one console, and what happens on contention."""

    def __init__(self, policy: TakeoverPolicy = "evict") -> None:
        self.policy: TakeoverPolicy = policy
        self.holder: str | None = None

    def check(self, session_id: str) -> Decision:
        """What `acquire` would decide, without changing anything."""
        if self.holder is None or self.holder == session_id:
            return Granted()
        if self.policy == "evict":
            return Evicted(self.holder)
        if self.policy == "demote":
            return Demoted(self.holder)
        return Denied(self.holder)

    def acquire(self, session_id: str) -> Decision:
        """Ask for the lease; on anything but `Denied` the caller now holds it."""
        decision = self.check(session_id)
        if not isinstance(decision, Denied):
            self.holder = session_id
        return decision

    def release(self, session_id: str) -> bool:
        """Give the lease back; False if `session_id` did not hold it."""
        if self.holder != session_id:
            return False
        self.holder = None
        return True
