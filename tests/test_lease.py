"""Tests for relayd.lease: the single-writer lease and its takeover policies."""

from __future__ import annotations

import pytest
from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import (
    Bundle,
    RuleBasedStateMachine,
    initialize,
    invariant,
    precondition,
    rule,
)

from relayd.auth import Principal
from relayd.config import LimitsConfig, VmConfig
from relayd.hub import ConsoleHub
from relayd.lease import (
    Decision,
    Demoted,
    Denied,
    Evicted,
    Granted,
    TakeoverPolicy,
    WriterLease,
)

POLICIES: tuple[TakeoverPolicy, ...] = ("evict", "demote", "deny")


def test_lease_default_policy_is_evict() -> None:
    """A lease built without a policy evicts, as DESIGN.md's default says."""
    lease = WriterLease()
    assert lease.policy == "evict"
    assert lease.holder is None


@pytest.mark.parametrize("policy", POLICIES)
def test_acquire_without_holder_is_granted(policy: TakeoverPolicy) -> None:
    """Any policy grants a free lease, and the caller then holds it."""
    lease = WriterLease(policy)
    assert lease.acquire("a") == Granted()
    assert lease.holder == "a"


@pytest.mark.parametrize("policy", POLICIES)
def test_acquire_by_holder_is_granted_again(policy: TakeoverPolicy) -> None:
    """The holder re-acquiring (a reconnect of the same session) is a plain grant."""
    lease = WriterLease(policy)
    lease.acquire("a")
    assert lease.acquire("a") == Granted()
    assert lease.holder == "a"


def test_acquire_evict_with_holder_evicts_previous() -> None:
    """evict: the newcomer holds the lease and the decision names the old holder."""
    lease = WriterLease("evict")
    lease.acquire("a")
    assert lease.acquire("b") == Evicted("a")
    assert lease.holder == "b"


def test_acquire_demote_with_holder_demotes_previous() -> None:
    """demote: the newcomer holds the lease and the old holder is named for demotion."""
    lease = WriterLease("demote")
    lease.acquire("a")
    assert lease.acquire("b") == Demoted("a")
    assert lease.holder == "b"


def test_acquire_deny_with_holder_is_denied_and_holder_kept() -> None:
    """deny: the newcomer is refused, the decision names the holder, nothing changes."""
    lease = WriterLease("deny")
    lease.acquire("a")
    assert lease.acquire("b") == Denied("a")
    assert lease.holder == "a"


def test_acquire_evict_chain_names_each_previous_holder() -> None:
    """Successive takeovers each name the holder they displaced."""
    lease = WriterLease("evict")
    decisions = [lease.acquire(s) for s in ("a", "b", "c", "a")]
    assert decisions == [Granted(), Evicted("a"), Evicted("b"), Evicted("c")]
    assert lease.holder == "a"


@pytest.mark.parametrize(
    ("policy", "expected"),
    [("evict", Evicted("a")), ("demote", Demoted("a")), ("deny", Denied("a"))],
)
def test_check_with_holder_predicts_without_changing(
    policy: TakeoverPolicy, expected: Decision
) -> None:
    """check returns what acquire would decide and leaves the holder alone."""
    lease = WriterLease(policy)
    lease.acquire("a")
    assert lease.check("b") == expected
    assert lease.holder == "a"
    assert lease.check("a") == Granted()


def test_check_without_holder_is_granted_and_takes_nothing() -> None:
    """check on a free lease is Granted but does not acquire it."""
    lease = WriterLease("deny")
    assert lease.check("a") == Granted()
    assert lease.holder is None


def test_release_by_holder_frees_the_lease() -> None:
    """The holder releasing returns True and the next newcomer gets a plain grant."""
    lease = WriterLease("deny")
    lease.acquire("a")
    assert lease.release("a") is True
    assert lease.holder is None
    assert lease.acquire("b") == Granted()


@pytest.mark.parametrize("policy", POLICIES)
def test_release_by_non_holder_returns_false_and_keeps_holder(policy: TakeoverPolicy) -> None:
    """A session that does not hold the lease cannot release it."""
    lease = WriterLease(policy)
    lease.acquire("a")
    assert lease.release("b") is False
    assert lease.holder == "a"


def test_release_when_free_returns_false() -> None:
    """Releasing a free lease (e.g. twice) returns False."""
    lease = WriterLease()
    assert lease.release("a") is False
    lease.acquire("a")
    assert lease.release("a") is True
    assert lease.release("a") is False


def test_release_by_evicted_session_keeps_new_holder() -> None:
    """A displaced writer closing late must not free the newcomer's lease."""
    lease = WriterLease("evict")
    lease.acquire("a")
    lease.acquire("b")
    assert lease.release("a") is False
    assert lease.holder == "b"


def test_policy_change_applies_to_next_acquire() -> None:
    """A reloaded takeover policy governs the next contention."""
    lease = WriterLease("deny")
    lease.acquire("a")
    assert lease.acquire("b") == Denied("a")
    lease.policy = "demote"
    assert lease.acquire("b") == Demoted("a")


class LeaseMachine(RuleBasedStateMachine):
    """Drives a lease with random acquires, releases and policy changes.

    The model is what the hub would believe from the decisions alone: the set of
    sessions it treats as writers. It must always agree with the lease.
    """

    sessions = Bundle("sessions")

    def __init__(self) -> None:
        super().__init__()
        self.lease = WriterLease()
        self.writers: set[str] = set()
        self.last_granted: str | None = None

    @initialize(policy=st.sampled_from(POLICIES))
    def start(self, policy: TakeoverPolicy) -> None:
        self.lease = WriterLease(policy)

    @rule(target=sessions, name=st.sampled_from("abcdef"))
    def new_session(self, name: str) -> str:
        return name

    @rule(session=sessions)
    def acquire(self, session: str) -> None:
        before = self.lease.holder
        predicted = self.lease.check(session)
        decision = self.lease.acquire(session)
        assert decision == predicted
        if before is None or before == session:
            assert decision == Granted()
        elif self.lease.policy == "evict":
            assert decision == Evicted(before)
        elif self.lease.policy == "demote":
            assert decision == Demoted(before)
        else:
            assert decision == Denied(before)
        if isinstance(decision, Denied):
            assert self.lease.holder == before, "deny changed the holder"
            return
        if isinstance(decision, Evicted | Demoted):
            self.writers.discard(decision.previous)
        self.writers.add(session)
        self.last_granted = session

    @rule(session=sessions)
    def release(self, session: str) -> None:
        held = self.lease.holder == session
        assert self.lease.release(session) is held
        if held:
            self.writers.discard(session)
            self.last_granted = None

    @rule(policy=st.sampled_from(POLICIES))
    def change_policy(self, policy: TakeoverPolicy) -> None:
        self.lease.policy = policy

    @precondition(lambda self: self.lease.holder is not None)
    @rule()
    def holder_reacquires(self) -> None:
        holder = self.lease.holder
        assert holder is not None
        assert self.lease.acquire(holder) == Granted()
        assert self.lease.holder == holder

    @invariant()
    def at_most_one_holder(self) -> None:
        assert len(self.writers) <= 1
        assert self.writers == ({self.lease.holder} if self.lease.holder else set())

    @invariant()
    def holder_is_last_granted(self) -> None:
        assert self.lease.holder == self.last_granted


LeaseMachine.TestCase.settings = settings(max_examples=60, stateful_step_count=30, deadline=None)
test_lease_state_machine_keeps_single_writer_invariants = LeaseMachine.TestCase


class RecordingClient:
    """A `HubClient` that records what the hub did to it; it may refuse to take a role."""

    def __init__(self, session_id: str, name: str, *, refuse: str | None = None) -> None:
        self.session_id = session_id
        self.principal = Principal(f"user:{name}")
        self.role = ""
        self.texts: list[str] = []
        self.closed: tuple[int, str] | None = None
        self._refuse = refuse

    def deliver(self, offset: int, data: bytes, frame: bytes) -> None:
        """Output is not looked at here."""

    def send_text(self, text: str) -> None:
        self.texts.append(text)

    def close(self, code: int, reason: str) -> None:
        self.closed = (code, reason)

    def set_role(self, role: str) -> None:
        if role == self._refuse:
            raise RuntimeError(f"{self.session_id} cannot become {role}")
        self.role = role

    def pause_input(self) -> None:
        """Input pacing is not looked at here."""

    def resume_input(self) -> None:
        """Input pacing is not looked at here."""


@pytest.mark.parametrize("policy", ["evict", "demote"])
def test_hub_attach_that_fails_leaves_the_old_writer_writing(policy: TakeoverPolicy) -> None:
    """All or nothing: a newcomer whose attach raises changes no lease, role, table or client."""
    vm = VmConfig(id="vm-a", subscription="sub-1", serial="tcp://127.0.0.1:1", takeover=policy)
    hub = ConsoleHub(vm, LimitsConfig())
    writer = RecordingClient("a", "alice")
    watcher = RecordingClient("w", "rita")
    hub.attach(writer, writer=True)
    hub.attach(watcher, writer=False)
    watcher.texts.clear()
    newcomer = RecordingClient("b", "bob", refuse="writer")
    with pytest.raises(RuntimeError):
        hub.attach(newcomer, writer=True)
    assert hub.lease.holder == "a"
    assert set(hub.clients) == {"a", "w"}
    assert (writer.role, writer.texts, writer.closed) == ("writer", [], None)
    assert watcher.texts == []
    assert hub.stats.takeovers == 0
