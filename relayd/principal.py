"""Who a request acts for, once authenticated: the one type auth, tickets and RBAC share.

Its own module so that the pure modules which only carry a principal around
(tickets.py) do not import the token machinery (auth.py, with its clock and
JWT library). auth.py re-exports it, so `from relayd.auth import Principal`
keeps working.
"""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass(frozen=True)
class Principal:
    """An authenticated caller and the names role assignments can refer to."""

    id: str
    groups: tuple[str, ...] = ()
    amr: tuple[str, ...] = ()
    # Wall-clock time after which the credentials are no longer accepted (token exp plus
    # leeway, certificate notAfter); None: no expiry known. Not part of who it is.
    expires: float | None = field(default=None, compare=False)

    @property
    def names(self) -> tuple[str, ...]:
        """The principal itself and each of its groups, as assignment principals."""
        return (self.id, *self.groups)
