"""Fixtures for the real-guest tests: one booted QEMU VM per chardev kind, shared.

A boot takes seconds under TCG, so each kind of VM is booted once for the
tests/guest package, and all the kinds the selected tests need are started
together at the first request (on 2 cores, parallel boots end sooner than a
queue of them). Each VM is killed by pid when the package's last test has
run, whatever happened, so no idle guest competes with the rest of the suite.
A test that needs a fresh guest (the kill-and-boot test) restarts the same
VM object; the pool boots it again for the next test if a failure left it dead.

The image is built with tests/guest/build-guest.sh when missing. Without
QEMU (and without root to install it) the tests are skipped, unless
RELAYD_GUEST_REQUIRED=1 (`make test-guest`, `make test`) makes that a failure.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from .qemu import (
    KINDS,
    GuestImage,
    GuestUnavailableError,
    GuestVM,
    Kind,
    choose_accel,
    ensure_image,
)

BOOT_TIMEOUT = float(os.environ.get("RELAYD_GUEST_BOOT_TIMEOUT", "120"))
_boot_times: dict[str, list[float]] = {}


@pytest.fixture(scope="session")
def guest_image() -> GuestImage:
    """The built guest image (built now if missing)."""
    try:
        return ensure_image()
    except GuestUnavailableError as exc:
        if os.environ.get("RELAYD_GUEST_REQUIRED") == "1":
            pytest.fail(f"real-guest tests required but unavailable: {exc}")
        pytest.skip(f"no real guest: {exc}")


class GuestPool:
    """The session's VMs, one per chardev kind, booted on first use."""

    def __init__(self, image: GuestImage, accel: str, root: Path) -> None:
        self.image = image
        self.accel = accel
        self.root = root
        self.vms: dict[str, GuestVM] = {}
        self._booted: set[str] = set()

    def start(self, kind: Kind) -> GuestVM:
        """Start the VM of `kind` if it is not running (does not wait for the boot)."""
        vm = self.vms.get(kind)
        if vm is None:
            vm = self.vms[kind] = GuestVM(self.image, kind, self.root / kind, accel=self.accel)
        if not vm.alive:
            self._booted.discard(kind)
            vm.start()
        return vm

    def get(self, kind: Kind) -> GuestVM:
        """The VM of `kind`, booted to its login prompt (nobody connected to ttyS0)."""
        vm = self.start(kind)
        if kind not in self._booted:
            vm.wait_for_login(BOOT_TIMEOUT)
            _boot_times.setdefault(kind, []).append(vm.boot_seconds[-1])
            self._booted.add(kind)
        return vm

    def record_boot(self, kind: str, seconds: float) -> None:
        """A boot a test waited for itself (shown in the summary)."""
        _boot_times.setdefault(kind, []).append(seconds)

    def kill_all(self) -> None:
        """SIGKILL every QEMU by pid."""
        for vm in self.vms.values():
            vm.kill()


def _kinds_needed(session: pytest.Session) -> list[Kind]:
    """The VM kinds the selected tests use, in the order they first appear."""
    needed: list[Kind] = []
    for item in session.items:
        names = getattr(item, "fixturenames", ())
        kinds = [k for k in KINDS if f"{k}_vm" in names]
        callspec = getattr(item, "callspec", None)
        if "guest_vm" in names and callspec is not None and callspec.params.get("guest_vm"):
            kinds.append(callspec.params["guest_vm"])
        needed += [k for k in kinds if k not in needed]
    return needed


@pytest.fixture(scope="package")
def guest_pool(guest_image: GuestImage, request: pytest.FixtureRequest) -> Iterator[GuestPool]:
    """Start every VM the selected tests need, at once; kill them all at the end."""
    # Short path: unix socket names are limited to 107 bytes.
    root = Path(tempfile.mkdtemp(prefix="relayd-guest-"))
    pool = GuestPool(guest_image, choose_accel(guest_image), root)
    try:
        for kind in _kinds_needed(request.session):
            pool.start(kind)
        yield pool
    finally:
        pool.kill_all()
        shutil.rmtree(root, ignore_errors=True)


@pytest.fixture(params=KINDS)
def guest_vm(request: pytest.FixtureRequest, guest_pool: GuestPool) -> GuestVM:
    """Each kind of ttyS0 chardev in turn."""
    return guest_pool.get(request.param)


@pytest.fixture
def telnet_vm(guest_pool: GuestPool) -> GuestVM:
    """The guest with ttyS0 on QEMU's telnet server."""
    return guest_pool.get("telnet")


@pytest.fixture
def tcp_vm(guest_pool: GuestPool) -> GuestVM:
    """The guest with ttyS0 on a raw TCP chardev."""
    return guest_pool.get("tcp")


@pytest.fixture
def unix_vm(guest_pool: GuestPool) -> GuestVM:
    """The guest with ttyS0 on a unix-socket chardev."""
    return guest_pool.get("unix")


@pytest.fixture
def pty_vm(guest_pool: GuestPool) -> GuestVM:
    """The guest with ttyS0 on a pty."""
    return guest_pool.get("pty")


def pytest_terminal_summary(terminalreporter: pytest.TerminalReporter) -> None:
    """How long the guests took to reach `login:` (QEMU start to prompt)."""
    if _boot_times:
        times = ", ".join(
            f"{kind} {' + '.join(f'{t:.1f}' for t in ts)} s" for kind, ts in _boot_times.items()
        )
        terminalreporter.write_line(f"real-guest boots to login: {times}")
