"""Tests for relayd.cluster.ownership: rendezvous hashing, the decision table, and a region of
gateways simulated round by round against a model of the store's atomic operations."""

from __future__ import annotations

from dataclasses import dataclass, field

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from relayd.cluster.ownership import (
    Claim,
    Decision,
    Lease,
    Lost,
    Nothing,
    OwnershipPolicy,
    Release,
    Renew,
    RoundView,
    plan,
    preferred_owner,
    ranking,
)

gateway_ids = st.from_regex(r"[a-z][a-z0-9-]{0,8}", fullmatch=True)
gateway_sets = st.sets(gateway_ids, min_size=1, max_size=8)
VMS = [f"vm-{i}" for i in range(600)]


# --- rendezvous hashing -------------------------------------------------------------------


@given(gateway_sets, st.sampled_from(VMS))
def test_preferred_owner_any_gateways_is_one_of_them_whatever_the_order(
    gateways: set[str], vm: str
) -> None:
    """Each VM has exactly one preferred owner, a live one, independent of input order."""
    owner = preferred_owner(vm, sorted(gateways))
    assert owner in gateways
    assert preferred_owner(vm, sorted(gateways, reverse=True)) == owner
    assert ranking(vm, gateways)[0] == owner
    assert sorted(ranking(vm, gateways)) == sorted(gateways)


def test_preferred_owner_no_gateway_raises_value_error() -> None:
    """Asking with nobody live is a caller bug, said plainly."""
    with pytest.raises(ValueError, match="no gateway"):
        preferred_owner("vm-1", [])


@settings(max_examples=40, deadline=None)
@given(gateway_sets, gateway_ids)
def test_preferred_owner_gateway_joins_only_its_share_moves(
    gateways: set[str], newcomer: str
) -> None:
    """A joining gateway takes VMs only for itself, about 1/N of them; nothing else moves."""
    gateways.discard(newcomer)
    if not gateways:
        return
    before = {vm: preferred_owner(vm, gateways) for vm in VMS}
    after = {vm: preferred_owner(vm, gateways | {newcomer}) for vm in VMS}
    moved = [vm for vm in VMS if before[vm] != after[vm]]
    assert all(after[vm] == newcomer for vm in moved)
    expected = len(VMS) / (len(gateways) + 1)
    assert 0.5 * expected <= len(moved) <= 1.6 * expected


@settings(max_examples=40, deadline=None)
@given(gateway_sets.filter(lambda s: len(s) >= 2), st.data())
def test_preferred_owner_gateway_leaves_only_its_vms_move(
    gateways: set[str], data: st.DataObject
) -> None:
    """A leaving gateway's VMs spread over the others; no other VM moves."""
    gone = data.draw(st.sampled_from(sorted(gateways)))
    before = {vm: preferred_owner(vm, gateways) for vm in VMS}
    after = {vm: preferred_owner(vm, gateways - {gone}) for vm in VMS}
    assert all(before[vm] == gone for vm in VMS if before[vm] != after[vm])
    assert gone not in after.values()


@settings(max_examples=30, deadline=None)
@given(gateway_sets.filter(lambda s: len(s) >= 2))
def test_preferred_owner_many_vms_spread_evenly(gateways: set[str]) -> None:
    """Every gateway gets a fair share of 600 VMs (within a wide statistical margin)."""
    counts = dict.fromkeys(gateways, 0)
    for vm in VMS:
        counts[preferred_owner(vm, gateways)] += 1
    share = len(VMS) / len(gateways)
    assert all(0.5 * share <= n <= 1.6 * share for n in counts.values()), counts


# --- the decision table -------------------------------------------------------------------

ME, OTHER = "gw-me", "gw-other"


def vm_preferring(owner: str, among: set[str]) -> str:
    """A VM id whose preferred owner among `among` is `owner`."""
    return next(vm for vm in VMS if preferred_owner(vm, among) == owner)


MINE = vm_preferring(ME, {ME, OTHER})
THEIRS = vm_preferring(OTHER, {ME, OTHER})


def decide_one(vm: str, lease: Lease | None, held: int | None, **kw: object) -> Decision:
    """The decision for one VM, with both gateways live."""
    view = RoundView(
        me=ME,
        now=100.0,
        live=frozenset({ME, OTHER}),
        holders={vm: lease},
        held={} if held is None else {vm: held},
        **kw,  # type: ignore[arg-type]
    )
    (decision,) = plan(view)
    return decision


TABLE: list[tuple[str, str, Lease | None, int | None, dict[str, object], Decision]] = [
    # (case, vm, lease in Redis, held token, view extras, decision)
    ("held, lease other", MINE, Lease(OTHER, 8), 7, {}, Lost(MINE, 7, Lease(OTHER, 8))),
    ("held, lease mine newer", MINE, Lease(ME, 8), 7, {}, Lost(MINE, 7, Lease(ME, 8))),
    ("held, no lease, stalled", MINE, None, 7, {"stalled": True}, Lost(MINE, 7, None)),
    ("held, preferred elsewhere", THEIRS, Lease(ME, 7), 7, {}, Release(THEIRS, 7, OTHER)),
    ("held, elsewhere, grace", THEIRS, Lease(ME, 7), 7, {"grace": True}, Renew(THEIRS, 7)),
    ("held, preferred, renew", MINE, Lease(ME, 7), 7, {}, Renew(MINE, 7)),
    (
        "held, elsewhere, not settled",
        THEIRS,
        Lease(ME, 7),
        7,
        {"settled": frozenset({ME})},
        Renew(THEIRS, 7),
    ),
    ("held, leaving", MINE, Lease(ME, 7), 7, {"leaving": True}, Release(MINE, 7, OTHER)),
    (
        "held, leaving, grace",
        MINE,
        Lease(ME, 7),
        7,
        {"leaving": True, "grace": True},
        Renew(MINE, 7),
    ),
    ("held, no lease, re-assert", MINE, None, 7, {}, Renew(MINE, 7)),
    ("held, no lease, grace", MINE, None, 7, {"grace": True}, Renew(MINE, 7)),
    ("held, stalled, lease still mine", MINE, Lease(ME, 7), 7, {"stalled": True}, Renew(MINE, 7)),
    ("not held, lease mine", MINE, Lease(ME, 9), None, {}, Release(MINE, 9, ME)),
    ("not held, lease other", MINE, Lease(OTHER, 9), None, {}, Nothing(MINE)),
    ("unheld, preferred", MINE, None, None, {}, Claim(MINE, 0)),
    ("unheld, preferred, floor", MINE, None, None, {"floors": {MINE: 41}}, Claim(MINE, 41)),
    ("unheld, preferred, grace", MINE, None, None, {"grace": True}, Nothing(MINE)),
    ("unheld, preferred, leaving", MINE, None, None, {"leaving": True}, Nothing(MINE)),
    ("unheld, second, fresh", THEIRS, None, None, {"unheld_since": {THEIRS: 99}}, Nothing(THEIRS)),
    (
        "unheld, second, waited",
        THEIRS,
        None,
        None,
        {"unheld_since": {THEIRS: 94.0}, "patience": 6.0},
        Claim(THEIRS, 0),
    ),
]


@pytest.mark.parametrize(
    ("vm", "lease", "held", "extra", "expected"),
    [case[1:] for case in TABLE],
    ids=[case[0] for case in TABLE],
)
def test_plan_each_table_row_gives_its_decision(
    vm: str, lease: Lease | None, held: int | None, extra: dict[str, object], expected: Decision
) -> None:
    """Every row of the module docstring's decision table, one case each."""
    assert decide_one(vm, lease, held, **extra) == expected


def test_plan_held_vm_left_config_is_released_to_nobody() -> None:
    """A VM held here but no longer configured is released, with no one to hand it to."""
    view = RoundView(me=ME, now=0.0, live=frozenset({ME}), holders={}, held={"gone": 3})
    assert plan(view) == (Release("gone", 3, None),)


def test_plan_me_missing_from_live_still_ranks_me() -> None:
    """A round before this gateway's heartbeat is visible does not hand everything away."""
    view = RoundView(
        me=ME, now=0.0, live=frozenset({OTHER}), holders={MINE: Lease(ME, 1)}, held={MINE: 1}
    )
    assert plan(view) == (Renew(MINE, 1),)


def test_plan_leaving_with_no_other_gateway_keeps_its_vms() -> None:
    """The region's last gateway drains: nobody could take its VMs, so it renews them."""
    view = RoundView(
        me=ME,
        now=0.0,
        live=frozenset({ME}),
        holders={MINE: Lease(ME, 1)},
        held={MINE: 1},
        leaving=True,
    )
    assert plan(view) == (Renew(MINE, 1),)


def test_plan_leaving_with_no_other_gateway_claims_an_unheld_vm() -> None:
    """The gateway it handed its VMs to died (or drains too, its heartbeat gone) during the
    drain: with nobody else to take them, the draining gateway is the region and claims
    them, so its own clients, relayed since the hand-over, get their console back instead
    of 1001 when their move's wait runs out ("leaving" needs another live gateway)."""
    view = RoundView(me=ME, now=0.0, live=frozenset(), holders={MINE: None}, held={}, leaving=True)
    assert plan(view) == (Claim(MINE, 0),)


# --- the policy's memory ------------------------------------------------------------------


def test_policy_round_after_long_sleep_is_stalled_and_drops_lapsed_leases() -> None:
    """A gateway that missed a whole lease period does not re-assert what Redis no longer shows."""
    policy = OwnershipPolicy(ME, lease_ttl=3.0)
    assert policy.decide(0.0, {ME}, {MINE: Lease(ME, 5)}, {MINE: 5}) == (Renew(MINE, 5),)
    assert policy.decide(10.0, {ME}, {MINE: None}, {MINE: 5}) == (Lost(MINE, 5, None),)


def test_policy_after_outage_grace_holds_back_claims_then_claims() -> None:
    """After Redis was out for a lease period, unheld VMs are claimed only once grace ends."""
    policy = OwnershipPolicy(ME, lease_ttl=3.0)
    policy.decide(0.0, {ME}, {MINE: None}, {MINE: 1})
    for t in (1.0, 2.0, 3.0, 4.0):
        policy.failed(t)
    assert policy.in_grace(5.0) is False
    assert policy.decide(5.0, {ME}, {MINE: None, THEIRS: None}, {MINE: 1}) == (
        Renew(MINE, 1),
        Nothing(THEIRS),
    )
    assert policy.in_grace(7.9)
    assert policy.decide(8.1, {ME}, {MINE: Lease(ME, 1), THEIRS: None}, {MINE: 1}) == (
        Renew(MINE, 1),
        Claim(THEIRS, 0),
    )


def test_policy_short_blip_starts_no_grace() -> None:
    """One failed round (shorter than half a lease) does not delay claims."""
    policy = OwnershipPolicy(ME, lease_ttl=3.0)
    policy.decide(0.0, {ME}, {MINE: None}, {})
    policy.decide(3.5, {ME}, {MINE: None}, {})
    policy.failed(4.0)
    assert policy.decide(5.0, {ME}, {MINE: None}, {}) == (Claim(MINE, 0),)


def test_policy_start_up_is_grace_then_claims_own_vms() -> None:
    """A gateway that just started claims nothing for a lease period, so the region's
    gateways are all registered before VMs are placed."""
    policy = OwnershipPolicy(ME, lease_ttl=3.0)
    assert policy.in_grace(0.0) is False
    assert policy.decide(0.0, {ME}, {MINE: None}, {}) == (Nothing(MINE),)
    assert policy.decide(2.0, {ME}, {MINE: None}, {}) == (Nothing(MINE),)
    assert policy.decide(3.0, {ME}, {MINE: None}, {}) == (Claim(MINE, 0),)


def test_policy_newcomer_is_handed_vms_only_once_settled() -> None:
    """A holder keeps a VM its preferred newcomer should own until the newcomer has been
    live for join_delay (two leases); one that vanishes before that starts over."""
    policy = OwnershipPolicy(ME, lease_ttl=3.0)
    held = {THEIRS: 5}
    holders = {THEIRS: Lease(ME, 5)}
    policy.decide(0.0, {ME}, holders, held)
    assert policy.decide(4.0, {ME, OTHER}, holders, held) == (Renew(THEIRS, 5),)
    assert policy.decide(5.0, {ME}, holders, held) == (Renew(THEIRS, 5),)
    assert policy.decide(6.0, {ME, OTHER}, holders, held) == (Renew(THEIRS, 5),)
    assert policy.decide(11.9, {ME, OTHER}, holders, held) == (Renew(THEIRS, 5),)
    assert policy.decide(12.0, {ME, OTHER}, holders, held) == (Release(THEIRS, 5, OTHER),)


def test_policy_data_lost_starts_grace_and_floor_is_highest_token_seen() -> None:
    """Redis losing its data starts grace; later claims ask for tokens above those seen."""
    policy = OwnershipPolicy(ME, lease_ttl=3.0)
    policy.decide(0.0, {ME, OTHER}, {MINE: Lease(OTHER, 40)}, {})
    assert policy.decide(1.0, {ME}, {MINE: None}, {}, data_lost=True) == (Nothing(MINE),)
    assert policy.decide(4.5, {ME}, {MINE: None}, {}) == (Claim(MINE, 40),)
    policy.claimed(MINE, 77)
    assert policy.decide(5.5, {ME}, {MINE: None}, {}) == (Claim(MINE, 77),)


# --- a region simulated against a model of the store --------------------------------------

TTL = 3.0
ROUND = TTL / 3


@dataclass
class ModelStore:
    """The store's atomic operations, as its Lua scripts define them, on a simulated clock."""

    leases: dict[str, tuple[Lease, float]] = field(default_factory=dict)
    fences: dict[str, int] = field(default_factory=dict)
    beats: dict[str, float] = field(default_factory=dict)
    issued: dict[str, list[int]] = field(default_factory=dict)
    dataset: int = 0

    def lose_data(self) -> None:
        """Redis restarted empty: leases, fence counters and heartbeats are gone."""
        self.leases.clear()
        self.fences.clear()
        self.beats.clear()
        self.dataset += 1

    def lease(self, vm: str, now: float) -> Lease | None:
        entry = self.leases.get(vm)
        return entry[0] if entry is not None and entry[1] > now else None

    def claim(self, vm: str, gw: str, floor: int, now: float) -> int | None:
        if self.lease(vm, now) is not None:
            return None
        # A missing counter starts from the server clock in ms, as the Lua script does.
        token = max(self.fences.get(vm, int(now * 1000)), floor) + 1
        self.fences[vm] = token
        self.leases[vm] = (Lease(gw, token), now + TTL)
        self.issued.setdefault(vm, []).append(token)
        return token

    def renew(self, vm: str, gw: str, token: int, now: float) -> bool:
        current = self.lease(vm, now)
        if current is None and self.fences.get(vm, 0) <= token:
            self.fences[vm] = token
        elif current != Lease(gw, token):
            return False
        self.leases[vm] = (Lease(gw, token), now + TTL)
        return True

    def release(self, vm: str, gw: str, token: int, now: float) -> None:
        if self.lease(vm, now) == Lease(gw, token):
            del self.leases[vm]

    def live(self, now: float) -> set[str]:
        return {gw for gw, until in self.beats.items() if until > now}


@dataclass
class Gateway:
    """One simulated gateway: its policy, its open ports, and when its next round is."""

    gw_id: str
    policy: OwnershipPolicy
    held: dict[str, int] = field(default_factory=dict)
    next_round: float = 0.0
    frozen_until: float = 0.0
    dataset: int = 0
    leaving: bool = False

    def run_round(self, store: ModelStore, vms: list[str], now: float, outage: bool) -> None:
        if outage:
            self.policy.failed(now)
            return
        if self.leaving:
            store.beats.pop(self.gw_id, None)
        else:
            store.beats[self.gw_id] = now + TTL
        holders = {vm: store.lease(vm, now) for vm in vms}
        data_lost, self.dataset = store.dataset != self.dataset, store.dataset
        decisions = self.policy.decide(
            now,
            store.live(now),
            holders,
            dict(self.held),
            data_lost=data_lost,
            leaving=self.leaving,
        )
        for d in decisions:
            if isinstance(d, Claim):
                token = store.claim(d.vm, self.gw_id, d.floor, now)
                if token is not None:
                    self.policy.claimed(d.vm, token)
                    self.held[d.vm] = token
            elif isinstance(d, Renew):
                if not store.renew(d.vm, self.gw_id, d.token, now):
                    del self.held[d.vm]
            elif isinstance(d, Release):
                store.release(d.vm, self.gw_id, d.token, now)
                self.held.pop(d.vm, None)
            elif isinstance(d, Lost):
                del self.held[d.vm]


class Region:
    """Gateways and a store on one simulated clock; events are drawn by Hypothesis."""

    def __init__(self, gateway_ids: list[str], vms: list[str]) -> None:
        self.now = 0.0
        self.vms = vms
        self.store = ModelStore()
        self.gateways: dict[str, Gateway] = {}
        self.outage_until = -1.0
        self.missing: dict[str, set[str]] = {}  # VMs left out of a gateway's config
        for i, gw in enumerate(gateway_ids):
            self.start(gw, offset=i * 0.17)

    def start(self, gw: str, offset: float = 0.0) -> None:
        self.gateways[gw] = Gateway(
            gw, OwnershipPolicy(gw, TTL), next_round=self.now + offset, dataset=self.store.dataset
        )

    def kill(self, gw: str) -> None:
        """kill -9: the process and its ports are gone; Redis keeps its keys until they expire."""
        del self.gateways[gw]

    def advance(self, seconds: float) -> None:
        """Run every round due within `seconds`, in time order, checking after each."""
        end = self.now + seconds
        while True:
            due = [g for g in self.gateways.values() if g.next_round <= end]
            if not due:
                break
            g = min(due, key=lambda g: (g.next_round, g.gw_id))
            self.now = max(self.now, g.next_round)
            g.next_round = self.now + ROUND
            if self.now < g.frozen_until:
                continue
            vms = [vm for vm in self.vms if vm not in self.missing.get(g.gw_id, set())]
            g.run_round(self.store, vms, self.now, outage=self.now < self.outage_until)
            self.check_after_round(g)
        self.now = end

    def check_after_round(self, g: Gateway) -> None:
        """Safety: what a gateway holds after its own round is exactly its lease in the store."""
        if self.now < self.outage_until:
            return
        for vm, token in g.held.items():
            assert self.store.lease(vm, self.now) == Lease(g.gw_id, token), (vm, g.gw_id)
        for vm, tokens in self.store.issued.items():
            assert tokens == sorted(set(tokens)), f"{vm}: tokens not strictly rising: {tokens}"
        # No two running gateways hold the same VM under a token the store still honours.
        for vm in self.vms:
            current = [
                gw.gw_id
                for gw in self.gateways.values()
                if vm in gw.held and self.store.fences.get(vm) == gw.held[vm]
            ]
            assert len(current) <= 1, (vm, current)

    def owners(self) -> dict[str, list[str]]:
        return {vm: [g.gw_id for g in self.gateways.values() if vm in g.held] for vm in self.vms}

    def assert_settled(self) -> None:
        """Liveness and balance: each VM held by exactly its preferred running gateway."""
        running = set(self.gateways)
        for vm, holders in self.owners().items():
            assert holders == [preferred_owner(vm, running)], (vm, holders)
            lease = self.store.lease(vm, self.now)
            assert lease is not None
            assert lease.gateway == holders[0]


SIM_VMS = [f"vm-{i}" for i in range(12)]
events = st.one_of(
    st.tuples(st.just("advance"), st.floats(0.1, 4.0)),
    st.tuples(st.just("kill"), st.integers(0, 7)),
    st.tuples(st.just("start"), st.integers(0, 7)),
    st.tuples(st.just("freeze"), st.floats(0.5, 8.0)),
    st.tuples(st.just("outage"), st.floats(0.5, 30.0)),
    st.tuples(st.just("lose_data"), st.just(0.0)),
)


@settings(max_examples=80, deadline=None)
@given(
    st.lists(gateway_ids, min_size=1, max_size=4, unique=True),
    st.lists(events, max_size=25),
    st.data(),
)
def test_region_any_events_never_two_current_holders_and_settles_on_preferred(
    initial: list[str], script: list[tuple[str, float]], data: st.DataObject
) -> None:
    """Under kills, joins, freezes, outages and Redis data loss, no two gateways ever hold a
    VM's current token, tokens only rise, and once things are quiet every VM is held by its
    preferred owner, once."""
    region = Region(initial, SIM_VMS)
    pool = [*initial, "gw-x", "gw-y", "gw-z", "gw-w"]
    for kind, arg in script:
        if kind == "advance":
            region.advance(arg)
        elif kind == "kill" and len(region.gateways) > 1:
            region.kill(sorted(region.gateways)[int(arg) % len(region.gateways)])
        elif kind == "start":
            gw = pool[int(arg) % len(pool)]
            if gw not in region.gateways:
                region.start(gw)
        elif kind == "freeze":
            victim = data.draw(st.sampled_from(sorted(region.gateways)))
            region.gateways[victim].frozen_until = region.now + arg
        elif kind == "outage":
            region.outage_until = region.now + arg
        elif kind == "lose_data":
            region.store.lose_data()
    region.outage_until = min(region.outage_until, region.now)
    for g in region.gateways.values():
        g.frozen_until = min(g.frozen_until, region.now)
    region.advance(4 * TTL + 2 * ROUND * len(region.gateways))
    region.assert_settled()


def test_policy_vm_handed_to_a_gateway_that_does_not_claim_it_is_kept() -> None:
    """A VM released to its preferred owner, which stays live but does not claim it (not in
    its config), is claimed back by the fallback and then kept, not handed over again; the
    policy reports the gateway once. Once that gateway leaves the region it is forgotten."""
    policy = OwnershipPolicy(ME, lease_ttl=3.0)
    both = {ME, OTHER}
    policy.decide(0.0, both, {THEIRS: Lease(ME, 5)}, {THEIRS: 5})
    assert policy.decide(6.0, both, {THEIRS: Lease(ME, 5)}, {THEIRS: 5}) == (
        Release(THEIRS, 5, OTHER),
    )
    assert policy.decide(7.0, both, {THEIRS: None}, {}) == (Nothing(THEIRS),)
    assert policy.not_taken == []
    assert policy.decide(12.0, both, {THEIRS: None}, {}) == (Nothing(THEIRS),)
    assert policy.not_taken == [(THEIRS, OTHER)]
    policy.not_taken.clear()
    assert policy.decide(13.0, both, {THEIRS: None}, {}) == (Claim(THEIRS, 5),)
    assert policy.decide(14.0, both, {THEIRS: Lease(ME, 6)}, {THEIRS: 6}) == (Renew(THEIRS, 6),)
    assert policy.decide(60.0, both, {THEIRS: Lease(ME, 6)}, {THEIRS: 6}) == (Renew(THEIRS, 6),)
    assert policy.not_taken == []
    # OTHER restarts (it may have the VM now): out of the region, then back and settled.
    policy.decide(61.0, {ME}, {THEIRS: Lease(ME, 6)}, {THEIRS: 6})
    policy.decide(62.0, both, {THEIRS: Lease(ME, 6)}, {THEIRS: 6})
    assert policy.decide(68.0, both, {THEIRS: Lease(ME, 6)}, {THEIRS: 6}) == (
        Release(THEIRS, 6, OTHER),
    )


def test_policy_vm_kept_from_a_gateway_is_handed_again_when_its_vm_list_changes() -> None:
    """The gateway that did not take a VM reloads a config that has it (its VM list digest
    changes): the VM goes back to it without a restart. Its digest unchanged, it stays."""
    policy = OwnershipPolicy(ME, lease_ttl=3.0)
    both = {ME, OTHER}
    before = {ME: "mine", OTHER: "without-the-vm"}
    policy.decide(0.0, both, {THEIRS: Lease(ME, 5)}, {THEIRS: 5}, vm_lists=before)
    policy.decide(6.0, both, {THEIRS: Lease(ME, 5)}, {THEIRS: 5}, vm_lists=before)
    policy.decide(7.0, both, {THEIRS: None}, {}, vm_lists=before)
    policy.decide(12.0, both, {THEIRS: None}, {}, vm_lists=before)
    assert policy.not_taken == [(THEIRS, OTHER)]
    assert policy.decide(13.0, both, {THEIRS: None}, {}, vm_lists=before) == (Claim(THEIRS, 5),)
    held = {THEIRS: Lease(ME, 6)}
    assert policy.decide(20.0, both, held, {THEIRS: 6}, vm_lists=before) == (Renew(THEIRS, 6),)
    after = {ME: "mine", OTHER: "with-the-vm"}
    assert policy.decide(21.0, both, held, {THEIRS: 6}, vm_lists=after) == (
        Release(THEIRS, 6, OTHER),
    )


@settings(max_examples=20, deadline=None)
@given(st.lists(gateway_ids, min_size=2, max_size=4, unique=True), st.integers(0, 11))
def test_region_vm_missing_from_its_preferred_gateways_config_is_owned_and_stays(
    initial: list[str], which: int
) -> None:
    """A VM that its preferred gateway does not have configured (a config rolled out to some
    gateways only) is owned by another and stays there: claimed at most twice in a minute,
    not claimed, handed back and claimed again every few seconds."""
    vm = SIM_VMS[which]
    region = Region(initial, SIM_VMS)
    region.missing[preferred_owner(vm, initial)] = {vm}
    region.advance(60.0)
    holders = region.owners()[vm]
    assert len(holders) == 1
    assert len(region.store.issued[vm]) <= 2, region.store.issued[vm]


@settings(max_examples=40, deadline=None)
@given(st.lists(gateway_ids, min_size=2, max_size=4, unique=True), st.floats(1.0, 120.0))
def test_region_redis_outage_no_vm_changes_owner(initial: list[str], outage: float) -> None:
    """However long Redis is away, every VM keeps its owner and its token through it."""
    region = Region(initial, SIM_VMS)
    region.advance(4 * TTL)
    region.assert_settled()
    before = {g.gw_id: dict(g.held) for g in region.gateways.values()}
    region.outage_until = region.now + outage
    region.advance(outage + 3 * TTL)
    assert {g.gw_id: dict(g.held) for g in region.gateways.values()} == before
    region.assert_settled()


@settings(max_examples=30, deadline=None)
@given(st.lists(gateway_ids, min_size=2, max_size=4, unique=True), gateway_ids)
def test_region_gateway_joins_only_its_share_changes_hands(
    initial: list[str], newcomer: str
) -> None:
    """A new gateway takes over exactly the VMs it is preferred for; the rest stay put."""
    if newcomer in initial:
        return
    region = Region(initial, SIM_VMS)
    region.advance(4 * TTL)
    before = {vm: holders[0] for vm, holders in region.owners().items()}
    region.start(newcomer)
    region.advance(4 * TTL)
    region.assert_settled()
    after = {vm: holders[0] for vm, holders in region.owners().items()}
    assert all(after[vm] == newcomer for vm in SIM_VMS if before[vm] != after[vm])


@settings(max_examples=30, deadline=None)
@given(st.lists(gateway_ids, min_size=2, max_size=4, unique=True), st.data())
def test_region_owner_killed_its_vms_owned_again_within_two_leases(
    initial: list[str], data: st.DataObject
) -> None:
    """kill -9 of a gateway: its VMs are held by survivors within 2 lease periods."""
    region = Region(initial, SIM_VMS)
    region.advance(4 * TTL)
    victim = data.draw(st.sampled_from(initial))
    region.kill(victim)
    region.advance(TTL + 2 * ROUND)
    region.assert_settled()


@settings(max_examples=40, deadline=None)
@given(st.lists(gateway_ids, min_size=2, max_size=4, unique=True))
def test_region_redis_loses_data_holders_keep_their_vms(initial: list[str]) -> None:
    """Redis restarting empty: every holder re-asserts its VMs; nothing changes hands."""
    region = Region(initial, SIM_VMS)
    region.advance(4 * TTL)
    before = {g.gw_id: dict(g.held) for g in region.gateways.values()}
    region.store.lose_data()
    region.advance(3 * TTL)
    assert {g.gw_id: dict(g.held) for g in region.gateways.values()} == before
    region.assert_settled()


@settings(max_examples=30, deadline=None)
@given(st.lists(gateway_ids, min_size=2, max_size=4, unique=True))
def test_region_cold_start_every_vm_claimed_once(initial: list[str]) -> None:
    """A region whose gateways start together places each VM once: no VM is claimed by
    one gateway and then handed to another."""
    region = Region(initial, SIM_VMS)
    region.advance(4 * TTL)
    region.assert_settled()
    assert all(len(tokens) == 1 for tokens in region.store.issued.values())
    assert len(region.store.issued) == len(SIM_VMS)


@settings(max_examples=30, deadline=None)
@given(st.lists(gateway_ids, min_size=2, max_size=4, unique=True), gateway_ids)
def test_region_crash_looping_gateway_moves_nothing(initial: list[str], looper: str) -> None:
    """A gateway that keeps dying soon after starting is never handed a VM."""
    if looper in initial:
        return
    region = Region(initial, SIM_VMS)
    region.advance(4 * TTL)
    before = {vm: holders[0] for vm, holders in region.owners().items()}
    for _ in range(5):
        region.start(looper)
        region.advance(1.5)
        region.kill(looper)
        region.advance(TTL + 0.1)
        assert {vm: holders[0] for vm, holders in region.owners().items()} == before


@given(st.lists(gateway_ids, min_size=2, max_size=4, unique=True), st.data())
def test_region_draining_gateway_hands_everything_over_within_two_rounds(
    initial: list[str], data: st.DataObject
) -> None:
    """A gateway that starts leaving (a deploy) while still running: within two lease
    periods every VM is held by its preferred owner among the others, the leaver holds
    nothing, and no VM ever has two holders on the way."""
    region = Region(initial, SIM_VMS)
    region.advance(4 * TTL)
    region.assert_settled()
    leaver = data.draw(st.sampled_from(initial))
    region.gateways[leaver].leaving = True
    region.advance(2 * TTL)
    assert region.gateways[leaver].held == {}
    rest = set(initial) - {leaver}
    for vm, holders in region.owners().items():
        assert holders == [preferred_owner(vm, rest)], (vm, holders)
