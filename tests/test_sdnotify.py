"""Tests for relayd.sdnotify: notifications received on a real unix datagram socket."""

from __future__ import annotations

import asyncio
import errno
import os
import socket
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from structlog.testing import capture_logs

from relayd.sdnotify import Notifier

TIMEOUT = 5.0
MakeNotifier = Callable[[], Notifier]


@pytest.fixture(autouse=True)
def clean_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    """Start each test as if outside systemd, whatever the runner's own environment holds."""
    for name in ("NOTIFY_SOCKET", "WATCHDOG_USEC", "WATCHDOG_PID"):
        monkeypatch.delenv(name, raising=False)


@pytest.fixture
def receiver(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[socket.socket]:
    """systemd's end: a non-blocking datagram socket bound in tmp_path, named in NOTIFY_SOCKET."""
    path = tmp_path / "notify.sock"
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
        sock.bind(str(path))
        sock.setblocking(False)
        monkeypatch.setenv("NOTIFY_SOCKET", str(path))
        yield sock


@pytest.fixture
def abstract_receiver(monkeypatch: pytest.MonkeyPatch) -> Iterator[socket.socket]:
    """The same in the abstract namespace, named `@...` in NOTIFY_SOCKET as systemd does."""
    name = f"relayd-test-{uuid.uuid4().hex}"
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
        sock.bind("\0" + name)
        sock.setblocking(False)
        monkeypatch.setenv("NOTIFY_SOCKET", "@" + name)
        yield sock


@pytest.fixture
def make_notifier() -> Iterator[Callable[[], Notifier]]:
    """`make_notifier()` reads the environment as set so far; every notifier is closed after."""
    made: list[Notifier] = []

    def make() -> Notifier:
        made.append(Notifier.from_environment())
        return made[-1]

    yield make
    for notifier in made:
        notifier.close()


async def receive(sock: socket.socket) -> bytes:
    """One datagram, or TimeoutError."""
    async with asyncio.timeout(TIMEOUT):
        return await asyncio.get_running_loop().sock_recv(sock, 4096)


async def test_notify_ready_and_status_arrive_in_one_datagram(
    receiver: socket.socket, make_notifier: MakeNotifier
) -> None:
    """READY=1 and STATUS reach NOTIFY_SOCKET as newline-separated lines of one datagram."""
    notifier = make_notifier()
    assert notifier.enabled
    assert notifier.notify("READY=1", "STATUS=serving 3 vms")
    assert await receive(receiver) == b"READY=1\nSTATUS=serving 3 vms"
    assert notifier.notify("STOPPING=1")
    assert await receive(receiver) == b"STOPPING=1"


async def test_notify_abstract_socket_receives_ready(
    abstract_receiver: socket.socket, make_notifier: MakeNotifier
) -> None:
    """An `@name` NOTIFY_SOCKET is reached in the abstract namespace."""
    assert make_notifier().notify("READY=1")
    assert await receive(abstract_receiver) == b"READY=1"


async def test_notify_after_close_opens_a_new_socket(
    receiver: socket.socket, make_notifier: MakeNotifier
) -> None:
    """close releases the socket without turning the notifier off."""
    notifier = make_notifier()
    notifier.close()
    notifier.close()
    assert notifier.notify("STATUS=again")
    assert await receive(receiver) == b"STATUS=again"


async def test_watchdog_first_ping_does_not_wait_an_interval(
    receiver: socket.socket, make_notifier: MakeNotifier, monkeypatch: pytest.MonkeyPatch
) -> None:
    """WATCHDOG=1 goes out at once: with a two-hour WATCHDOG_USEC (pings an hour apart)
    it still arrives within the test's bound on any wait, which no host misses by an hour."""
    monkeypatch.setenv("WATCHDOG_USEC", str(2 * 3600 * 1_000_000))
    monkeypatch.setenv("WATCHDOG_PID", str(os.getpid()))
    notifier = make_notifier()
    assert notifier.watchdog_interval == pytest.approx(3600.0)
    task = asyncio.create_task(notifier.watchdog())
    try:
        assert await receive(receiver) == b"WATCHDOG=1"
    finally:
        task.cancel()
        await asyncio.wait([task])


async def test_watchdog_pings_arrive_at_half_the_watchdog_interval(
    receiver: socket.socket, make_notifier: MakeNotifier, monkeypatch: pytest.MonkeyPatch
) -> None:
    """With WATCHDOG_USEC=200000, WATCHDOG=1 comes every 0.1 s: never sooner, so four pings
    take at least three intervals after the watchdog started (a lower bound, which a slow
    host only makes easier; the pace itself is `watchdog_interval`)."""
    monkeypatch.setenv("WATCHDOG_USEC", "200000")
    monkeypatch.setenv("WATCHDOG_PID", str(os.getpid()))
    notifier = make_notifier()
    assert notifier.watchdog_interval == pytest.approx(0.1)
    loop = asyncio.get_running_loop()
    start = loop.time()
    task = asyncio.create_task(notifier.watchdog())
    try:
        for _ in range(4):
            assert await receive(receiver) == b"WATCHDOG=1"
        took = loop.time() - start
    finally:
        task.cancel()
        await asyncio.wait([task])
    assert took >= 3 * 0.1 - 0.001, took  # the loop's timers may fire a clock tick early


async def test_watchdog_pid_of_another_process_disables_the_watchdog(
    receiver: socket.socket, make_notifier: MakeNotifier, monkeypatch: pytest.MonkeyPatch
) -> None:
    """WATCHDOG_PID naming another process means the pings are not ours to send."""
    monkeypatch.setenv("WATCHDOG_USEC", "200000")
    monkeypatch.setenv("WATCHDOG_PID", str(os.getpid() + 1))
    notifier = make_notifier()
    assert notifier.enabled
    assert notifier.watchdog_interval is None
    async with asyncio.timeout(TIMEOUT):
        await notifier.watchdog()  # returns at once instead of looping
    with pytest.raises(BlockingIOError):
        receiver.recv(4096)


async def test_watchdog_without_watchdog_usec_returns_at_once(
    receiver: socket.socket, make_notifier: MakeNotifier
) -> None:
    """No WATCHDOG_USEC, no watchdog: the task ends instead of pinging."""
    notifier = make_notifier()
    assert notifier.watchdog_interval is None
    async with asyncio.timeout(TIMEOUT):
        await notifier.watchdog()


@pytest.mark.parametrize("value", ["0", "-5", "soon"])
def test_watchdog_usec_invalid_is_ignored_and_logged(
    receiver: socket.socket,
    make_notifier: MakeNotifier,
    monkeypatch: pytest.MonkeyPatch,
    value: str,
) -> None:
    """A WATCHDOG_USEC that is not a positive integer disables the watchdog, with a log line."""
    monkeypatch.setenv("WATCHDOG_USEC", value)
    with capture_logs() as events:
        notifier = make_notifier()
    assert notifier.enabled
    assert notifier.watchdog_interval is None
    assert [e["event"] for e in events] == ["sd_watchdog_ignored"]
    assert value in events[0]["error"]


async def test_notifier_without_notify_socket_is_disabled(
    make_notifier: MakeNotifier, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Outside systemd every call is a silent no-op, even with WATCHDOG_USEC set."""
    monkeypatch.setenv("WATCHDOG_USEC", "200000")
    with capture_logs() as events:
        notifier = make_notifier()
        assert not notifier.enabled
        assert notifier.watchdog_interval is None
        assert notifier.notify("READY=1") is False
        async with asyncio.timeout(TIMEOUT):
            await notifier.watchdog()
    assert events == []


def test_notify_to_missing_socket_returns_false_and_logs(
    tmp_path: Path, make_notifier: MakeNotifier, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A NOTIFY_SOCKET that names no socket fails loudly in the log, not with an exception."""
    missing = tmp_path / "gone.sock"
    monkeypatch.setenv("NOTIFY_SOCKET", str(missing))
    notifier = make_notifier()
    with capture_logs() as events:
        assert notifier.notify("READY=1") is False
    assert len(events) == 1
    assert events[0]["event"] == "sd_notify_failed"
    assert events[0]["log_level"] == "warning"
    assert events[0]["socket"] == str(missing)
    assert f"[Errno {errno.ENOENT}]" in events[0]["error"]


def test_notify_line_with_newline_returns_false_and_logs(
    receiver: socket.socket, make_notifier: MakeNotifier
) -> None:
    """A line with a newline would smuggle in another assignment, so nothing is sent."""
    notifier = make_notifier()
    with capture_logs() as events:
        assert notifier.notify("STATUS=vm", "STATUS=x\nREADY=1") is False
    assert [e["event"] for e in events] == ["sd_notify_failed"]
    with pytest.raises(BlockingIOError):
        receiver.recv(4096)


def test_notify_full_receiver_queue_returns_false_and_logs(
    receiver: socket.socket, make_notifier: MakeNotifier
) -> None:
    """A receiver that stopped reading makes sendto fail with EAGAIN: logged, never blocking."""
    receiver.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    notifier = make_notifier()
    with capture_logs() as events:
        for _ in range(100_000):
            if not notifier.notify("STATUS=" + "x" * 1000):
                break
    assert [e["event"] for e in events] == ["sd_notify_failed"]
    assert f"[Errno {errno.EAGAIN}]" in events[0]["error"]


def test_notify_unencodable_text_returns_false_and_logs(
    receiver: socket.socket, make_notifier: MakeNotifier
) -> None:
    """Text that cannot be encoded is a logged failure, not an exception in the caller."""
    notifier = make_notifier()
    with capture_logs() as events:
        assert notifier.notify("STATUS=\udcff") is False
    assert [e["event"] for e in events] == ["sd_notify_failed"]


@pytest.mark.parametrize("value", ["relative.sock", "vsock:2:1234"])
def test_notify_socket_unsupported_address_disables_and_logs(
    make_notifier: MakeNotifier, monkeypatch: pytest.MonkeyPatch, value: str
) -> None:
    """An address that is neither absolute nor abstract is refused once, at start-up."""
    monkeypatch.setenv("NOTIFY_SOCKET", value)
    with capture_logs() as events:
        notifier = make_notifier()
        assert notifier.notify("READY=1") is False
    assert not notifier.enabled
    assert [e["event"] for e in events] == ["sd_notify_failed"]
    assert value in events[0]["error"]


def test_notifier_nonpositive_watchdog_interval_raises_value_error() -> None:
    """A watchdog interval must be positive; None is how it is turned off."""
    with pytest.raises(ValueError, match="positive"):
        Notifier("/run/systemd/notify", watchdog_interval=0)
