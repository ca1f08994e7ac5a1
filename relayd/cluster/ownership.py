"""Which gateway owns which VM: the ownership decisions of one round, with no I/O.

Every VM has one owning gateway at a time; only the owner opens the VM's serial
port. Ownership is a lease in Redis with a fencing token (`relayd.cluster.store`).
Each gateway runs a round every ``lease_ttl / 3``: it reads the live gateways and
the lease of every configured VM, asks `OwnershipPolicy.decide` what to do, and
carries the decisions out (store calls, opening and closing ports). This module
only decides, like `relayd.lease` does for the single writer.

Who should own a VM is rendezvous (highest-random-weight) hashing: every
gateway scores every VM with a stable hash of ``(vm, gateway)`` and the highest
score wins. All gateways compute the same answer from the same live set, the
VMs spread evenly, and when a gateway joins or leaves only the VMs it wins or
held change hands (about 1/N of them).

Decision table, per VM, first matching row wins. "t" is the token of the lease
this gateway holds locally (the VM's port is open here). "grace" runs for
``grace`` seconds after this gateway's first round, after Redis came back from
an outage of at least half a lease, and after Redis lost its data: holders
re-assert, nobody claims or hands over, so every gateway is registered before
VMs are placed and no VM moves because of an outage. "stalled": this
gateway's previous round was more than ``lease_ttl`` ago, so it may have slept
through its lease expiring, being taken, and expiring again. "settled": live
for at least ``join_delay`` as seen from here, so a gateway that crash-loops
is never handed anything. "leaving": this gateway is draining (a deploy) and
another gateway is live: it hands everything over now and claims nothing, so
its consoles move at the start of the drain rather than when it exits.

    held   lease in Redis       condition                                decision
    ----   ------------------   --------------------------------------   -----------------
    t      (VM not configured)  -                                        Release(t, None)
    t      other gw, or me/≠t   -                                        Lost(t)
    t      none                 stalled                                  Lost(t)
    t      me/t or none         leaving; no grace                        Release(t, to)
    t      me/t or none         the preferred owner is another, settled
                                gateway that took what it was handed;
                                no grace                                 Release(t, to)
    t      me/t or none         otherwise                                Renew(t)
    -      me (some token)      -                                        Release(token, to)
    -      other gw             -                                        Nothing
    -      none                 grace, or leaving                        Nothing
    -      none                 I am k-th in the VM's ranking (0: the
                                preferred owner), unheld ≥ k·patience    Claim(floor)
    -      none                 otherwise                                Nothing

- ``Renew`` on a VM whose lease is gone re-creates it with the same token if
  nobody took the VM since (the store checks the fence counter): this is how
  holders re-assert after an outage, so no VM changes owner because of one.
  If the store says no, close the port as for ``Lost``.
- ``Lost`` means: close the port now, without touching Redis.
- ``Release`` means: delete the lease if it is still ours, and close the port
  whatever the store answered (a lease left behind lapses, or is released in
  the next round); the preferred owner claims it in its next round. A lease in
  our name that no port of ours holds (a claim whose reply was lost, a previous
  run of this gateway) is released the same way, so it can be claimed cleanly.
- ``Claim(floor)``: take the lease if nobody holds it, with a token above
  ``floor``, the highest token this gateway has seen for the VM (this keeps
  tokens rising even if Redis lost its data; see the store). Open the port only
  if the store granted it.
- The ranking fallback (k > 0) keeps a VM from staying unowned when its
  preferred gateway is alive but does not claim it; ``patience`` (default two
  lease periods) is longer than the start-up grace, so a gateway that has
  just started gets its own VMs first.
- "Took what it was handed": a gateway this one released a VM to, that was
  still live but had not claimed it ``patience`` later (the VM is not in its
  configuration: a config rolled out to some gateways only), is not handed
  that VM again while it stays live with the same VM list. Without this the
  fallback claims the VM, hands it back at once and claims it again, the port
  opening and closing every few seconds and the console unusable most of the
  time. Each gateway's heartbeat carries a digest of its configured VM ids: when
  that gateway's list changes (a reload that adds the VM), it is handed the VM
  again, so a VM returns to its preferred gateway without a restart.

Safety does not rest on these rules but on the store: a claim succeeds only
where no lease exists, and every token is new, so at most one gateway holds a
VM's current token; a deposed holder's renewals and console-log appends are
refused. The rules give liveness (every VM owned), balance, and stability
(no VM moves because of a Redis outage).
"""

from __future__ import annotations

import functools
import hashlib
from collections.abc import Iterable, Mapping
from dataclasses import dataclass

__all__ = [
    "Claim",
    "Decision",
    "Lease",
    "Lost",
    "Nothing",
    "OwnershipPolicy",
    "Release",
    "Renew",
    "RoundView",
    "plan",
    "preferred_owner",
    "ranking",
]


@dataclass(frozen=True)
class Lease:
    """A VM's lease as Redis has it: the holding gateway and its fencing token."""

    gateway: str
    token: int


@dataclass(frozen=True)
class Claim:
    """Take the unheld VM's lease with a token above `floor`; open the port if it is granted."""

    vm: str
    floor: int


@dataclass(frozen=True)
class Renew:
    """Extend (or re-create, if nobody took the VM since) our lease; keep the port open."""

    vm: str
    token: int


@dataclass(frozen=True)
class Release:
    """Delete our lease and close the port; `to` should own it (None: the VM left the config)."""

    vm: str
    token: int
    to: str | None


@dataclass(frozen=True)
class Lost:
    """Our token was superseded or may have been: close the port at once, touch nothing."""

    vm: str
    token: int
    holder: Lease | None


@dataclass(frozen=True)
class Nothing:
    """Nothing to do for this VM this round."""

    vm: str


Decision = Claim | Renew | Release | Lost | Nothing


def _weight(vm: str, gateway: str) -> int:
    # NUL cannot occur in a VM id or a gateway id (both are validated tokens),
    # so the pair is encoded unambiguously.
    digest = hashlib.blake2b(f"{vm}\0{gateway}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "big")


def ranking(vm: str, gateways: Iterable[str]) -> tuple[str, ...]:
    """The gateways in the order they should own `vm`: highest weight first, ties by id."""
    return _ranked(vm, frozenset(gateways))


@functools.lru_cache(maxsize=1 << 17)
def _ranked(vm: str, gateways: frozenset[str]) -> tuple[str, ...]:
    # Every round asks for every VM's ranking among the same gateways: hashing them
    # again each time cost a 2,000-VM gateway 10 ms of event loop per round.
    return tuple(sorted(gateways, key=lambda gw: (-_weight(vm, gw), gw)))


def preferred_owner(vm: str, gateways: Iterable[str]) -> str:
    """The gateway that should own `vm` among `gateways` (rendezvous hashing).

    Raises:
        ValueError: `gateways` is empty.
    """
    ranked = _ranked(vm, frozenset(gateways))
    if not ranked:
        raise ValueError("no gateway to own the vm")
    return ranked[0]


@dataclass(frozen=True)
class RoundView:
    """Everything one round decides on; `plan` turns it into decisions.

    Attributes:
        me: this gateway's id.
        now: the clock of the caller (monotonic seconds).
        live: gateways whose heartbeat is in Redis (`me` counts as live regardless).
        holders: every configured VM's lease in Redis, None where nobody holds it.
        held: VMs whose port is open here, with the token they were opened under.
        grace: Redis came back recently: holders re-assert, nobody claims or hands over.
        stalled: this gateway's previous round was more than a lease period ago.
        unheld_since: when each unheld VM was first seen unheld (for the fallback).
        patience: how long the k-th gateway in a VM's ranking waits (times k) before
            claiming an unheld VM that the ones before it have not claimed.
        floors: the highest token seen per VM (0 where none).
        settled: gateways that may be handed VMs (live long enough); None: all live.
        leaving: this gateway drains: it hands its VMs to the others and claims none,
            when there are others (its own heartbeat is gone, so they leave it out
            too); alone, it holds on to its VMs and claims as any gateway would.
        not_taking: per VM, a live gateway that did not claim it when it was handed
            over: it is not handed that VM again.
    """

    me: str
    now: float
    live: frozenset[str]
    holders: Mapping[str, Lease | None]
    held: Mapping[str, int]
    grace: bool = False
    stalled: bool = False
    unheld_since: Mapping[str, float] | None = None
    patience: float = 3.0
    floors: Mapping[str, int] | None = None
    settled: frozenset[str] | None = None
    leaving: bool = False
    not_taking: Mapping[str, str] | None = None


def plan(view: RoundView) -> tuple[Decision, ...]:
    """One decision per configured VM, then a Release per held VM no longer configured.

    Pure: the decision table in the module docstring, nothing else.
    """
    others = view.live - {view.me}
    leaving = view.leaving and bool(others)  # with nobody to take over, hold on
    gateways = others if leaving else view.live | {view.me}
    unheld_since = view.unheld_since or {}
    floors = view.floors or {}
    out: list[Decision] = []
    for vm, lease in view.holders.items():
        token = view.held.get(vm)
        if token is not None:
            out.append(_held(view, vm, token, lease, gateways, leaving=leaving))
        elif lease is not None:
            if lease.gateway == view.me:
                out.append(Release(vm, lease.token, preferred_owner(vm, gateways)))
            else:
                out.append(Nothing(vm))
        elif view.grace or leaving:  # leaving alone, it is the region: it claims
            out.append(Nothing(vm))
        else:
            rank = ranking(vm, gateways).index(view.me)
            waited = view.now - unheld_since.get(vm, view.now)
            if rank == 0 or waited >= rank * view.patience:
                out.append(Claim(vm, floors.get(vm, 0)))
            else:
                out.append(Nothing(vm))
    for vm, token in view.held.items():
        if vm not in view.holders:
            out.append(Release(vm, token, None))
    return tuple(out)


def _held(
    view: RoundView,
    vm: str,
    token: int,
    lease: Lease | None,
    gateways: frozenset[str],
    *,
    leaving: bool,
) -> Decision:
    if lease is not None and lease != Lease(view.me, token):
        return Lost(vm, token, lease)
    if lease is None and view.stalled:
        return Lost(vm, token, None)
    preferred = preferred_owner(vm, gateways)
    if leaving and not view.grace:
        return Release(vm, token, preferred)
    settled = view.settled is None or preferred in view.settled
    takes = (view.not_taking or {}).get(vm) != preferred
    if preferred != view.me and settled and takes and not view.grace:
        return Release(vm, token, preferred)
    return Renew(vm, token)


class OwnershipPolicy:
    """The memory a gateway keeps between rounds, and its decisions each round.

    It remembers when the previous round ran (to notice a stall), when Redis
    failed or lost its data (for the grace period), since when each gateway has
    been live, since when each VM has been unheld, and the highest token seen per
    VM. The clock is a parameter.
    """

    def __init__(
        self,
        me: str,
        lease_ttl: float,
        *,
        grace: float | None = None,
        patience: float | None = None,
        join_delay: float | None = None,
    ) -> None:
        """Args:
        me: this gateway's id.
        lease_ttl: the lease period in seconds (rounds run every third of it).
        grace: how long only holders act after start-up and after Redis returns;
            default `lease_ttl`, two or three rounds.
        patience: see `RoundView.patience`; default two lease periods.
        join_delay: how long a gateway must be seen live before VMs are handed to
            it; default two lease periods: a dead gateway's heartbeat lingers for one,
            so a gateway that dies within a lease period of starting gets nothing.
        """
        self.me = me
        self.lease_ttl = lease_ttl
        self.grace = lease_ttl if grace is None else grace
        self.patience = 2 * lease_ttl if patience is None else patience
        self.join_delay = 2 * lease_ttl if join_delay is None else join_delay
        self._first_seen: dict[str, float] = {}
        self._last_round: float | None = None
        self._failing_since: float | None = None
        self._grace_until: float | None = None
        self._unheld_since: dict[str, float] = {}
        self._floors: dict[str, int] = {}
        # VMs released to another gateway (to whom, when), until it claims them.
        self._handed: dict[str, tuple[str, float]] = {}
        # VM -> the gateway that did not take it, and that gateway's VM list digest then.
        self._not_taking: dict[str, tuple[str, str]] = {}
        #: (vm, gateway) pairs found not taken since the caller last cleared it (to log).
        self.not_taken: list[tuple[str, str]] = []

    def in_grace(self, now: float) -> bool:
        """Whether a grace period after a Redis outage or data loss is running."""
        return self._grace_until is not None and now < self._grace_until

    def stalled(self, now: float) -> bool:
        """Whether the previous round ran more than a lease period ago.

        This gateway did not run meanwhile (frozen, SIGSTOP): its leases lapsed, and
        another gateway may hold them now.
        """
        return self._last_round is not None and now - self._last_round > self.lease_ttl

    def failed(self, now: float) -> None:
        """A round could not reach Redis: ports stay as they are, nothing is decided."""
        self._last_round = now
        if self._failing_since is None:
            self._failing_since = now

    def decide(
        self,
        now: float,
        live: Iterable[str],
        holders: Mapping[str, Lease | None],
        held: Mapping[str, int],
        *,
        data_lost: bool = False,
        leaving: bool = False,
        vm_lists: Mapping[str, str] | None = None,
    ) -> tuple[Decision, ...]:
        """This round's decisions, from what Redis says and what this gateway holds.

        Args:
            now: monotonic seconds.
            live: the gateways with a heartbeat.
            holders: every configured VM's lease (None: unheld).
            held: VMs whose port is open here, with their tokens.
            data_lost: Redis came back without its data (the store's dataset id changed).
            leaving: this gateway drains (see `RoundView.leaving`).
            vm_lists: per live gateway, a digest of its configured VM ids (a change
                ends its "did not take" mark: see the module docstring).
        """
        stalled = self.stalled(now)
        # A blip shorter than half a lease cannot have let a renewed lease lapse: no grace.
        outage = self._failing_since is not None and now - self._failing_since >= self.lease_ttl / 2
        if outage or data_lost or self._last_round is None:
            self._grace_until = now + self.grace
            self._handed.clear()  # nobody could claim meanwhile: that proves nothing
        self._failing_since = None
        self._last_round = now
        live_now = frozenset(live)
        self._first_seen = {gw: self._first_seen.get(gw, now) for gw in live_now}
        settled = frozenset(
            gw for gw, since in self._first_seen.items() if now - since >= self.join_delay
        )
        for vm, lease in holders.items():
            if lease is None:
                self._unheld_since.setdefault(vm, now)
            else:
                self._unheld_since.pop(vm, None)
                self._floors[vm] = max(self._floors.get(vm, 0), lease.token)
        for vm, token in held.items():
            self._floors[vm] = max(self._floors.get(vm, 0), token)
        for vm in set(self._unheld_since) - set(holders):
            del self._unheld_since[vm]
        self._follow_handovers(now, live_now, holders, vm_lists or {})
        decisions = plan(
            RoundView(
                me=self.me,
                now=now,
                live=live_now,
                holders=holders,
                held=held,
                grace=self.in_grace(now),
                stalled=stalled,
                unheld_since=self._unheld_since,
                patience=self.patience,
                floors=self._floors,
                settled=settled,
                leaving=leaving,
                not_taking={vm: gw for vm, (gw, _) in self._not_taking.items()},
            )
        )
        for d in decisions:
            if isinstance(d, Release) and d.to is not None and d.vm in held:
                self._handed[d.vm] = (d.to, now)
        return decisions

    def _follow_handovers(
        self,
        now: float,
        live: frozenset[str],
        holders: Mapping[str, Lease | None],
        vm_lists: Mapping[str, str],
    ) -> None:
        """Note who did not claim a VM handed to it; forget it once it leaves the region
        or its VM list changes (it may have the VM now)."""
        for vm, (to, since) in list(self._handed.items()):
            lease = holders.get(vm)
            if vm not in holders or lease is not None or to not in live:
                del self._handed[vm]  # taken (by anyone), gone from the config, or gone
            elif now - since >= self.patience and not self.in_grace(now):
                del self._handed[vm]
                self._not_taking[vm] = (to, vm_lists.get(to, ""))
                self.not_taken.append((vm, to))
        for vm, (gw, digest) in list(self._not_taking.items()):
            lease = holders.get(vm)
            if (
                vm not in holders
                or gw not in live
                or (lease is not None and lease.gateway == gw)
                or vm_lists.get(gw, "") != digest
            ):
                del self._not_taking[vm]

    def claimed(self, vm: str, token: int) -> None:
        """Record the token a Claim was granted, so later floors stay above it."""
        self._floors[vm] = max(self._floors.get(vm, 0), token)
