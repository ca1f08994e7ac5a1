"""The hub (hub.py) with recording clients: the lease carried out, fan-out, port state, input.

Clients are `RecordingClient`s (a real `HubClient`, no mock library). Where the
port matters, the hub's own keeper runs it against a real TCP far end on loopback.
"""

from __future__ import annotations

import asyncio

from structlog.testing import capture_logs

from relayd import control
from relayd.frames import binary_frame
from relayd.hub import MAX_QUEUED_HOOKS
from relayd.inputqueue import MAX_QUEUED_BREAKS
from relayd.lease import Demoted, Denied, Evicted, Granted

from .conftest import FarEnd
from .hubclient import RecordingClient, keeping, make_hub

# -- attach and detach: the lease's decisions, carried out ---------------------------------


def test_hub_spectator_attach_gets_spectator_role_and_no_decision() -> None:
    """A spectator is attached as such, takes no lease, and is told no input rate."""
    hub = make_hub()
    rita = RecordingClient("s1", "user:rita")
    assert hub.attach(rita, writer=False) is None
    assert rita.role == "spectator"
    assert hub.clients == {"s1": rita}
    assert hub.lease.holder is None
    assert hub.limits_for("spectator")["input_bytes_per_s"] == 0
    assert hub.limits_for("writer")["input_bytes_per_s"] == hub.vm.input_rate


def test_hub_first_writer_is_granted_and_others_are_told() -> None:
    """The first writer gets the lease; attached spectators hear who writes now."""
    hub = make_hub()
    rita = RecordingClient("s1", "user:rita")
    alice = RecordingClient("w1", "user:alice")
    hub.attach(rita, writer=False)
    assert isinstance(hub.attach(alice, writer=True), Granted)
    assert alice.role == "writer"
    assert hub.lease.holder == "w1"
    assert rita.notices("writer_changed") == [
        {"type": "notice", "event": "writer_changed", "writer": "user:alice"}
    ]
    assert alice.notices("writer_changed") == []


def test_hub_second_writer_under_evict_closes_first_with_4001() -> None:
    """evict: the old writer becomes a spectator, is told who took over, and is closed 4001."""
    hub = make_hub(takeover="evict")
    alice = RecordingClient("w1", "user:alice")
    bob = RecordingClient("w2", "user:bob")
    rita = RecordingClient("s1", "user:rita")
    hub.attach(alice, writer=True)
    hub.attach(rita, writer=False)
    with capture_logs() as events:
        decision = hub.attach(bob, writer=True)
    assert isinstance(decision, Evicted)
    assert (alice.role, bob.role) == ("spectator", "writer")
    assert alice.notices("writer_changed")[-1]["you"] == "evicted"
    assert alice.closed == (control.CLOSE_TAKEN_OVER, "taken over by user:bob")
    assert rita.notices("writer_changed")[-1]["writer"] == "user:bob"
    assert bob.closed is None
    assert hub.lease.holder == "w2"
    assert hub.stats.takeovers == 1
    evicted = [e for e in events if e["event"] == "writer_evicted"]
    assert evicted == [
        {
            "event": "writer_evicted",
            "audit": True,
            "log_level": "info",
            "vm": "vm-a",
            "session_id": "w1",
            "principal": "user:alice",
            "peer": "192.0.2.1",
            "region": "test",
            "by": "user:bob",
            "by_session_id": "w2",
            "by_peer": "192.0.2.1",
        }
    ]


def test_hub_second_writer_under_demote_keeps_first_as_spectator() -> None:
    """demote: the old writer stays attached as a spectator and is told so; nobody is closed."""
    hub = make_hub(takeover="demote")
    alice = RecordingClient("w1", "user:alice")
    bob = RecordingClient("w2", "user:bob")
    hub.attach(alice, writer=True)
    assert isinstance(hub.attach(bob, writer=True), Demoted)
    assert (alice.role, bob.role) == ("spectator", "writer")
    assert alice.notices("demoted") == [
        {"type": "notice", "event": "demoted", "by": "user:bob", "writer": "user:bob"}
    ]
    assert alice.closed is None
    assert set(hub.clients) == {"w1", "w2"}


def test_hub_second_writer_under_deny_is_refused_and_stays_spectator() -> None:
    """deny: check_writer predicts the refusal (HTTP 409); attached anyway, it only watches."""
    hub = make_hub(takeover="deny")
    alice = RecordingClient("w1", "user:alice")
    bob = RecordingClient("w2", "user:bob")
    hub.attach(alice, writer=True)
    assert isinstance(hub.check_writer("w2"), Denied)
    assert isinstance(hub.attach(bob, writer=True), Denied)
    assert (alice.role, bob.role) == ("writer", "spectator")
    assert hub.lease.holder == "w1"
    assert alice.messages == []


def test_hub_writer_detach_releases_lease_and_tells_others() -> None:
    """A leaving writer frees the lease and the others hear so; detaching twice does nothing."""
    hub = make_hub()
    alice = RecordingClient("w1", "user:alice")
    rita = RecordingClient("s1", "user:rita")
    hub.attach(alice, writer=True)
    hub.attach(rita, writer=False)
    hub.detach(alice)
    assert hub.lease.holder is None
    assert hub.clients == {"s1": rita}
    assert rita.notices("writer_changed")[-1] == {
        "type": "notice",
        "event": "writer_changed",
        "writer": None,
    }
    hub.detach(alice)
    assert len(rita.notices("writer_changed")) == 1
    assert isinstance(hub.check_writer("w9"), Granted)


def test_hub_spectator_detach_keeps_the_writer() -> None:
    """A spectator leaving changes nothing for the writer."""
    hub = make_hub()
    alice = RecordingClient("w1", "user:alice")
    rita = RecordingClient("s1", "user:rita")
    hub.attach(alice, writer=True)
    hub.attach(rita, writer=False)
    hub.detach(rita)
    assert hub.lease.holder == "w1"
    assert alice.messages == []


# -- output: fan-out that never waits on a client -------------------------------------------


def test_hub_publish_hands_one_frame_to_every_client_at_its_offset() -> None:
    """Each chunk is framed once and the same frame goes to every client, with its offset."""
    hub = make_hub()
    alice = RecordingClient("w1", "user:alice")
    rita = RecordingClient("s1", "user:rita")
    hub.attach(alice, writer=True)
    hub.attach(rita, writer=False)
    hub.publish(b"abc")
    hub.publish(b"defg")
    assert [(o, d) for o, d, _ in alice.deliveries] == [(0, b"abc"), (3, b"defg")]
    for (_, data, frame), (_, _, theirs) in zip(alice.deliveries, rita.deliveries, strict=True):
        assert frame is theirs
        assert frame == binary_frame(data)
    assert (hub.start, hub.end) == (0, 7)
    assert hub.read(0, 100) == b"abcdefg"
    assert hub.stats.bytes_from_port == 7


def test_hub_publish_goes_on_past_a_client_that_takes_nothing() -> None:
    """A client that keeps nothing holds no one back; the ring keeps what it missed."""
    hub = make_hub()
    slow = RecordingClient("s1", "user:rita")
    slow.take_output = False
    fast = RecordingClient("s2", "user:sam")
    hub.attach(slow, writer=False)
    hub.attach(fast, writer=False)
    chunks = [bytes([65 + i % 26]) * 1000 for i in range(500)]
    for chunk in chunks:
        hub.publish(chunk)
    output = b"".join(chunks)
    assert bytes(fast.output) == output
    assert slow.output == b""
    # The slow client's cursor is still 0; it catches up from the ring, as far as it holds.
    held = hub.read(0, len(output))
    assert held == output[hub.start :]
    assert len(held) == min(len(output), hub.limits.output_buffer_bytes)


# -- the port: state told to clients, input written and bounded -----------------------------


async def test_hub_port_up_and_down_are_told_to_clients(far_end: FarEnd) -> None:
    """Clients hear port_up when the keeper opens the port and port_down when it is lost."""
    hub = make_hub(f"tcp://127.0.0.1:{far_end.port}")
    rita = RecordingClient("s1", "user:rita")
    hub.attach(rita, writer=False)
    async with keeping(hub):
        assert await rita.notice("port_up") == {"type": "notice", "event": "port_up", "vm": "vm-a"}
        await far_end.send(b"login: ")
        await rita.wait_for(lambda: rita.output == b"login: ")
        await far_end.stop()
        await rita.notice("port_down", vm="vm-a")
        assert not hub.port_up


async def test_hub_submit_on_an_idle_line_reaches_the_port(far_end: FarEnd) -> None:
    """A writer's keystrokes reach the serial port in order and are counted."""
    hub = make_hub(f"tcp://127.0.0.1:{far_end.port}")
    alice = RecordingClient("w1", "user:alice")
    hub.attach(alice, writer=True)
    async with keeping(hub):
        for key in (b"l", b"s", b"\r"):
            hub.submit(alice, key)
        await far_end.wait_received(lambda got: got == b"ls\r")
        assert hub.stats.bytes_to_port == 3
        assert alice.pauses == 0


async def test_hub_input_over_a_second_of_line_time_pauses_writer_until_drained(
    far_end: FarEnd,
) -> None:
    """Past one second of line time queued, the writer is paused; drained, it is resumed."""
    # 4096 B/s: the smallest bound (4096 bytes), drained to half in about 0.4 s.
    hub = make_hub(f"tcp://127.0.0.1:{far_end.port}", input_bytes_per_s=4096)
    alice = RecordingClient("w1", "user:alice")
    hub.attach(alice, writer=True)
    paste = bytes(range(256)) * 17  # 4352 bytes
    async with keeping(hub):
        for i in range(0, len(paste), 1088):
            hub.submit(alice, paste[i : i + 1088])
        assert alice.paused
        await alice.wait_for(lambda: not alice.paused)
        assert alice.pauses == 1
        # Resumed at half the bound: all but at most 2048 bytes have been handed to the port.
        got = await far_end.wait_received(lambda got: len(got) >= len(paste) - 2048)
        assert got == paste[: len(got)]


async def test_hub_port_loss_drops_queued_input_and_resumes_writer(far_end: FarEnd) -> None:
    """Input queued for a port that goes away is dropped, and a paused writer is read again."""
    hub = make_hub(f"tcp://127.0.0.1:{far_end.port}", input_bytes_per_s=4096)
    alice = RecordingClient("w1", "user:alice")
    hub.attach(alice, writer=True)
    async with keeping(hub):
        hub.submit(alice, b"x" * 5000)
        assert alice.paused
        await far_end.stop()
        await alice.notice("port_down")
        assert not alice.paused


async def test_hub_holds_input_past_its_lease_until_the_lease_is_renewed(
    far_end: FarEnd,
) -> None:
    """Cluster mode: past the lease's local expiry (a gateway that wakes from a freeze),
    keystrokes are neither written at once nor by the keeper; a renewal lets them go."""
    hub = make_hub(f"tcp://127.0.0.1:{far_end.port}")
    alice = RecordingClient("w1", "user:alice")
    hub.attach(alice, writer=True)
    async with keeping(hub):
        loop = asyncio.get_running_loop()
        hub.lease_renewed(loop.time() - 1.0)
        hub.submit(alice, b"held")
        assert hub.stats.bytes_to_port == 0  # not written on the keystroke path
        # Output still flows (and the keeper has had its turns meanwhile).
        await far_end.send(b"output goes on\r\n")
        await alice.wait_for(lambda: b"output goes on" in alice.output)
        assert hub.input.held_bytes == 4
        assert far_end.received == b""
        hub.lease_renewed(loop.time() + 3600.0)  # far past the test: no window to miss
        await far_end.wait_received(lambda got: got == b"held")
        hub.submit(alice, b"!")  # renewed: typing goes straight to the port again
        await far_end.wait_received(lambda got: got == b"held!")


async def test_hub_writer_leaving_runs_on_detach_send(far_end: FarEnd) -> None:
    """on_detach = send:...: the bytes are written when the writer leaves, and the next is told."""
    hub = make_hub(f"tcp://127.0.0.1:{far_end.port}", on_detach="send:\\x04")
    alice = RecordingClient("w1", "user:alice")
    async with keeping(hub):
        hub.attach(alice, writer=True)
        hub.detach(alice)
        await far_end.wait_received(lambda got: got == b"\x04")
        assert hub.previous_logged_out is True


def test_hub_breaks_beyond_the_cap_are_refused_not_queued() -> None:
    """BREAKs carry no bytes for the input bound, so past MAX_QUEUED_BREAKS they are refused."""
    hub = make_hub(break_command=("true",))
    assert hub.can_break  # a break_command works on any port
    assert all(hub.submit_break() for _ in range(MAX_QUEUED_BREAKS))
    assert not hub.submit_break("b")


def test_hub_hooks_unconfigured_or_over_the_cap_are_refused() -> None:
    """An NMI without nmi_command is unsupported; past MAX_QUEUED_HOOKS resets are busy."""
    hub = make_hub(reset_command=("true",))
    owner = RecordingClient("s-owner", "user:olga")
    assert hub.submit_hook("nmi", owner) == "unsupported"
    assert [hub.submit_hook("reset", owner) for _ in range(MAX_QUEUED_HOOKS)] == [
        None
    ] * MAX_QUEUED_HOOKS
    assert hub.submit_hook("reset", owner) == "busy"


def test_hub_without_port_or_break_command_cannot_break() -> None:
    """No open port and no break_command: BREAK cannot reach the console."""
    assert not make_hub().can_break
