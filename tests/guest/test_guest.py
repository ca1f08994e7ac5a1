"""relayd in front of a real Linux guest under QEMU, through the real websockets client.

The guest is the stock Debian kernel with a busybox initramfs
(tests/guest/build-guest.sh): busybox init, a real `getty -L 115200 ttyS0
vt100`, busybox `login` against /etc/shadow, and ash. Every wait is on
output with a deadline; nothing sleeps to synchronize.

What a real guest does that the simulated one does not, and these tests
live with: QEMU drops ttyS0 output while no client is connected; ash asks
for the cursor position (ESC[6n) after each prompt and nobody answers; the
telnet chardev negotiates on connect and doubles 0xFF; a pty drops BREAK;
a boot takes seconds under TCG.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import hashlib
import random
import time
from collections.abc import Callable
from typing import Any

import pytest

from ..conftest import TIMEOUT, Console, running, wait_hub, wait_port_up
from .conftest import BOOT_TIMEOUT, GuestPool
from .qemu import GuestImage, GuestVM

pytestmark = pytest.mark.guest

VM = "guest"
LOGIN = b"login: "
PASSWORD = b"Password: "
FLOOD_LINES = 200_000
PASTE_BYTES = 32 * 1024


class Shell:
    """Drives the guest's getty, login and shell through one relayd console."""

    def __init__(self, console: Console, image: GuestImage) -> None:
        self.console = console
        self.image = image

    def mark(self) -> int:
        """An output position: what comes after it is new (replayed bytes never are)."""
        return max(len(self.console.output), int(self.console.hello.get("replay", 0)))

    async def wait(
        self, *markers: bytes, since: int | None = None, within: float = TIMEOUT
    ) -> bytes:
        """Read until one of `markers` appears after `since`; returns the output after `since`."""
        start = self.mark() if since is None else since
        output = self.console.output
        try:
            async with asyncio.timeout(within):
                while not any(m in output[start:] for m in markers):
                    # Console.read_at_least gives up after TIMEOUT of silence; keep
                    # reading until our own deadline (a boot can be quiet for a while).
                    with contextlib.suppress(TimeoutError):
                        await self.console.read_at_least(len(output) + 1)
        except TimeoutError:
            tail = bytes(output[max(start, len(output) - 600) :])
            raise TimeoutError(f"none of {markers} within {within:g}s; tail: {tail!r}") from None
        return bytes(output[start:])

    async def type(self, line: bytes, *markers: bytes, within: float = TIMEOUT) -> bytes:
        """Type a line (and Enter) and wait for a marker in what follows."""
        since = self.mark()
        await self.console.send(line + b"\r")
        return await self.wait(*markers, since=since, within=within)

    async def to_login_prompt(self) -> None:
        """From getty, login or a shell left by an earlier test: a fresh `login:`."""
        out = await self.type(b"", LOGIN, PASSWORD, self.image.prompt, within=3 * TIMEOUT)
        if LOGIN in out:
            return
        if PASSWORD in out:  # a user name was pending: fail this login (busybox waits 3 s)
            await self.type(b"", LOGIN, within=3 * TIMEOUT)
        else:
            await self.type(b"exit", LOGIN)

    async def login(self) -> None:
        """Log the test account in with its password; ends at the shell prompt."""
        await self.to_login_prompt()
        await self.type(self.image.user.encode(), PASSWORD)
        await self.type(self.image.password.encode(), self.image.prompt, within=2 * TIMEOUT)

    async def run(self, command: bytes, expect: bytes, *, within: float = TIMEOUT) -> bytes:
        """Run a command; wait for `expect` (which must not occur in the echoed command)."""
        assert expect not in command
        return await self.type(command, expect, within=within)


def guest_config(vm: GuestVM, **extra: Any) -> dict[str, Any]:
    """The `[[vms]]` entry for the guest."""
    return {"id": VM, "serial": vm.serial_url, **extra}


async def test_login_run_a_command_and_exit_back_to_login(
    guest_vm: GuestVM, write_config: Callable[..., Any], open_console: Callable[..., Any]
) -> None:
    """Over each chardev kind: login, password, a command's real output, exit, login again."""
    image = guest_vm.image
    async with running(write_config(vms=[guest_config(guest_vm)])) as gw:
        await wait_port_up(gw, VM)
        async with open_console(gw, VM) as console:
            assert console.hello["role"] == "writer"
            shell = Shell(console, image)
            await shell.login()
            out = await shell.run(b"uname -sr; echo hello-$((6*7))", b"hello-42")
            assert f"Linux {image.kernel_version}\r\n".encode() in out
            # busybox ash asks the terminal where the cursor is after each prompt.
            assert image.prompt + b"\x1b[6n" in console.output
            out = await shell.run(b"id -un; exit", LOGIN)
            assert f"\r\n{image.user}\r\n".encode() in out
            assert f"{image.hostname} {LOGIN.decode()}".encode() in out


async def test_sysrq_help_over_telnet_reaches_the_kernel(
    telnet_vm: GuestVM, write_config: Callable[..., Any], open_console: Callable[..., Any]
) -> None:
    """SysRq h through telnet:// (IAC BRK, then h): the kernel prints its help line."""
    async with running(write_config(vms=[guest_config(telnet_vm)])) as gw:
        await wait_port_up(gw, VM)
        async with open_console(gw, VM) as console:
            shell = Shell(console, telnet_vm.image)
            since = shell.mark()
            await console.send({"type": "sysrq", "key": "h"})
            await shell.wait(b"sysrq: HELP", since=since)
            out = await shell.wait(b"show-registers(p)", since=since)
            assert b"sysrq: HELP : loglevel(0-9) reboot(b)" in out
            assert not [c for c in console.controls if c.get("type") == "error"]


@pytest.mark.parametrize("guest_vm", ["tcp", "pty"], indirect=True)
async def test_sysrq_through_break_command_where_the_medium_has_no_break(
    guest_vm: GuestVM, write_config: Callable[..., Any], open_console: Callable[..., Any]
) -> None:
    """Raw TCP cannot carry a BREAK and a pty drops it: `unsupported`, until break_command
    (QMP chardev-send-break on the VM's monitor) makes SysRq h reach the kernel."""
    async with running(write_config(vms=[guest_config(guest_vm)])) as gw:
        await wait_port_up(gw, VM)
        async with open_console(gw, VM) as console:
            await console.send({"type": "sysrq", "key": "h"})
            assert (await console.control(type="error"))["code"] == "unsupported"
    config = write_config(vms=[guest_config(guest_vm, break_command=guest_vm.break_command)])
    async with running(config) as gw:
        await wait_port_up(gw, VM)
        async with open_console(gw, VM) as console:
            shell = Shell(console, guest_vm.image)
            since = shell.mark()
            await console.send({"type": "sysrq", "key": "h"})
            await shell.wait(b"sysrq: HELP", since=since)
            assert not [c for c in console.controls if c.get("event") == "break_failed"]


async def test_paste_of_32_kib_arrives_intact_in_the_guest(
    telnet_vm: GuestVM, write_config: Callable[..., Any], open_console: Callable[..., Any]
) -> None:
    """32 KiB of every byte value (IAC, CR, NUL, ^C...) pasted into `head -c | md5sum` on a
    raw tty: paced by relayd, IAC-escaped on the telnet wire, and the guest's md5sum agrees."""
    paste = random.Random(42).randbytes(PASTE_BYTES)  # noqa: S311 - test data, not secrets
    assert set(paste) == set(range(256))
    async with running(write_config(vms=[guest_config(telnet_vm)])) as gw:
        await wait_port_up(gw, VM)
        async with open_console(gw, VM) as console:
            shell = Shell(console, telnet_vm.image)
            await shell.login()
            since = shell.mark()
            await shell.run(
                f"stty raw -echo; echo RE''ADY; head -c {PASTE_BYTES} | md5sum; stty sane".encode(),
                b"READY",
            )
            started = time.monotonic()
            await console.send(paste)
            digest = hashlib.md5(paste).hexdigest().encode()  # noqa: S324 - what md5sum prints
            # At the line rate (115200 baud: 11520 bytes/s) this takes about 3 s.
            await shell.wait(digest + b"  -", since=since, within=6 * TIMEOUT)
            assert time.monotonic() - started >= PASTE_BYTES / (115200 / 10) * 0.8
            await shell.wait(telnet_vm.image.prompt, since=since)
            assert not [c for c in console.controls if c.get("type") == "error"]


async def test_guest_output_with_0xff_over_telnet_arrives_as_printed(
    telnet_vm: GuestVM, write_config: Callable[..., Any], open_console: Callable[..., Any]
) -> None:
    """Binary on the console (`cat` of the wrong file): 0xFF bytes arrive as printed, and the
    console keeps working after them."""
    async with running(write_config(vms=[guest_config(telnet_vm)])) as gw:
        await wait_port_up(gw, VM)
        async with open_console(gw, VM) as console:
            shell = Shell(console, telnet_vm.image)
            await shell.login()
            out = await shell.run(b"printf 'ff:\\377\\376:end\\n'", telnet_vm.image.prompt)
            assert b"ff:\xff\xfe:end\r\n" in out
            out = await shell.run(
                b"printf 'sb:\\377\\372:end\\n'; echo after-$((6*7))", b"after-42"
            )
            assert b"sb:\xff\xfa:end\r\n" in out


async def test_flood_of_200000_lines_reaches_the_writer_intact(
    tcp_vm: GuestVM, write_config: Callable[..., Any], open_console: Callable[..., Any]
) -> None:
    """`seq 1 200000` in the guest: every line arrives, in order, with no output gap."""
    async with running(write_config(vms=[guest_config(tcp_vm)])) as gw:
        await wait_port_up(gw, VM)
        async with open_console(gw, VM) as console:
            shell = Shell(console, tcp_vm.image)
            await shell.login()
            out = await shell.run(
                f"seq 1 {FLOOD_LINES}; echo FLOOD-$((40+2))-END".encode(),
                b"FLOOD-42-END",
                within=BOOT_TIMEOUT,
            )
    first = out.index(b"\r\n1\r\n2\r\n") + 2
    lines = out[first : out.index(b"FLOOD-42-END")].split(b"\r\n")
    assert lines[-1] == b""
    assert lines[:-1] == [str(n).encode() for n in range(1, FLOOD_LINES + 1)]
    assert not [c for c in console.controls if c.get("event") == "output_gap"]


async def test_vm_killed_and_booted_again_sends_port_down_then_up_and_works(
    unix_vm: GuestVM,
    guest_pool: GuestPool,
    write_config: Callable[..., Any],
    open_console: Callable[..., Any],
) -> None:
    """QEMU is SIGKILLed: port_down. Booted again on the same socket: port_up, the new boot
    scrolls by live, and the console logs in again."""
    image = unix_vm.image
    async with running(write_config(vms=[guest_config(unix_vm)])) as gw:
        await wait_port_up(gw, VM)
        async with open_console(gw, VM) as console:
            shell = Shell(console, image)
            await shell.login()
            await asyncio.to_thread(unix_vm.kill)
            await console.control(type="notice", event="port_down", vm=VM)
            since = shell.mark()
            started = time.monotonic()
            # The socket is listening before QEMU runs, so relayd is connected for the boot.
            await asyncio.to_thread(functools.partial(unix_vm.start, watch=False))
            await console.control(type="notice", event="port_up", vm=VM)
            out = await shell.wait(LOGIN, since=since, within=BOOT_TIMEOUT)
            guest_pool.record_boot("unix (reboot)", time.monotonic() - started)
            assert b"relayd-guest: init done" in out
            await shell.login()
            await shell.run(b"echo back-$((6*7))", b"back-42")
        assert gw.hubs[VM].stats.reconnects >= 1


async def test_takeover_leaves_the_guest_session_logged_in(
    telnet_vm: GuestVM, write_config: Callable[..., Any], open_console: Callable[..., Any]
) -> None:
    """on_detach = none (default): bob takes over alice's shell as she left it."""
    image = telnet_vm.image
    async with running(write_config(vms=[guest_config(telnet_vm)])) as gw:
        await wait_port_up(gw, VM)
        async with open_console(gw, VM, user="alice") as alice:
            shell = Shell(alice, image)
            await shell.login()
            await shell.type(b"WHO=alice-shell", image.prompt)
            async with open_console(gw, VM, user="bob") as bob:
                assert bob.hello["role"] == "writer"
                assert bob.hello["previous_session_logged_out"] is False
                code, _ = await alice.closed()
                assert code == 4001
                out = await Shell(bob, image).run(b"echo still-$WHO", b"still-alice-shell")
                assert LOGIN not in out


async def test_takeover_with_on_detach_logs_the_guest_session_out(
    telnet_vm: GuestVM, write_config: Callable[..., Any], open_console: Callable[..., Any]
) -> None:
    """on_detach = send:^U exit CR: alice's shell exits as bob takes over; bob gets login:."""
    image = telnet_vm.image
    config = write_config(vms=[guest_config(telnet_vm, on_detach="send:\\x15exit\\r")])
    async with running(config) as gw:
        await wait_port_up(gw, VM)
        async with open_console(gw, VM, user="alice") as alice:
            shell = Shell(alice, image)
            await shell.login()
            await alice.send(b"echo half-typed")  # no Enter: ^U must clear it
            await shell.wait(b"half-typed")
            async with open_console(gw, VM, user="bob") as bob:
                assert bob.hello["previous_session_logged_out"] is True
                bob_shell = Shell(bob, image)
                await bob_shell.wait(LOGIN, since=bob_shell.mark())
                await bob_shell.login()


async def test_output_while_nobody_is_attached_is_kept_for_the_next_client(
    pty_vm: GuestVM, write_config: Callable[..., Any], open_console: Callable[..., Any]
) -> None:
    """QEMU drops ttyS0 output while no client holds the port; relayd holds it, so what the
    guest prints between sessions is in the console log and replayed."""
    image = pty_vm.image
    async with running(write_config(vms=[guest_config(pty_vm)])) as gw:
        await wait_port_up(gw, VM)
        async with open_console(gw, VM) as console:
            shell = Shell(console, image)
            await shell.login()
            await console.send(b"sleep 1; echo while-$((6*7))-away\r")
            await shell.wait(b"sleep 1; echo")
        hub = gw.hubs[VM]
        await wait_hub(gw, VM, lambda h: b"while-42-away" in h.read(h.start, h.end - h.start))
        async with open_console(gw, VM, user="bob") as console:
            replay = await console.read_at_least(console.hello["replay"])
            assert b"while-42-away" in replay
        assert hub.stats.reconnects == 0


async def test_reset_command_shows_the_boot_from_its_first_line(
    tcp_vm: GuestVM, write_config: Callable[..., Any], open_console: Callable[..., Any]
) -> None:
    """An owner's reset (QMP system_reset) reboots the guest; relayd stays connected, so the
    whole boot scrolls by from `Linux version` on: where a GRUB menu would be caught."""
    image = tcp_vm.image
    config = write_config(
        vms=[guest_config(tcp_vm, reset_command=tcp_vm.qmp_hook("system_reset"))],
        roles=[("user:olga", "owner", "/subscriptions/sub-1")],
    )
    async with running(config) as gw:
        await wait_port_up(gw, VM)
        async with open_console(gw, VM, user="olga") as console:
            shell = Shell(console, image)
            since = shell.mark()
            await console.send({"type": "reset"})
            result = await console.control(type="notice", event="hook_result")
            assert result["ok"] is True
            out = await shell.wait(LOGIN, since=since, within=BOOT_TIMEOUT)
            assert out.index(b"Linux version") < out.index(b"relayd-guest: init done")
            assert not [c for c in console.controls if c.get("event") == "port_down"]
            await shell.login()
