"""Tests for relayd.sim: the guest machine without I/O, then the guest over real sockets."""

from __future__ import annotations

import asyncio
import hashlib
from pathlib import Path

import pytest

from relayd.sim import BREAK, MAX_SEQ, GuestMachine, SimulatedGuest
from relayd.telnet import BINARY, DataReceived, TelnetCodec

TIMEOUT = 5.0
PROMPT = b"operator@vm1:~$ "


class FakeClock:
    """A monotonic clock the test moves by hand."""

    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def run_jobs(machine: GuestMachine) -> bytes:
    """Everything the machine prints until its jobs are done."""
    out = bytearray()
    while machine.busy:
        out += machine.pull()
    return bytes(out)


def booted(clock: FakeClock | None = None) -> tuple[GuestMachine, bytes]:
    machine = GuestMachine("vm1", clock=clock or FakeClock())
    machine.boot()
    return machine, run_jobs(machine)


def logged_in(clock: FakeClock | None = None) -> GuestMachine:
    machine, _ = booted(clock)
    out = machine.feed(b"operator\rrelayd\r")
    assert out.endswith(PROMPT)
    return machine


def type_line(machine: GuestMachine, line: bytes) -> bytes:
    return machine.feed(line + b"\r") + run_jobs(machine)


# Boot and login.


def test_machine_boot_prints_kernel_messages_then_login_prompt() -> None:
    """Boot shows 8250 serial messages with kernel timestamps, then the login prompt."""
    machine, out = booted()
    assert out.startswith(b"[    0.000000] Linux version")
    assert b"Serial: 8250/16550 driver" in out
    assert b"ttyS0 at I/O 0x3f8" in out
    assert out.count(b"\r\n[") >= 11
    assert out.endswith(b"\r\nvm1 login: ")
    assert not machine.logged_in


def test_machine_before_boot_ignores_input() -> None:
    """A powered-off machine prints nothing whatever it is sent."""
    machine = GuestMachine("vm1")
    assert machine.feed(b"operator\r") == b""
    assert not machine.booted


def test_machine_login_with_right_password_opens_shell() -> None:
    """The right user and password give a shell prompt; the password is never echoed."""
    machine, _ = booted()
    out = machine.feed(b"operator\r")
    assert out == b"operator\r\nPassword: "
    out = machine.feed(b"relayd\r")
    assert b"relayd" not in out
    assert out.endswith(PROMPT)
    assert machine.logged_in


def test_machine_login_with_wrong_password_says_login_incorrect() -> None:
    """A wrong password prints Login incorrect and asks for the login again."""
    machine, _ = booted()
    out = machine.feed(b"operator\r\nhunter2\r\n")
    assert b"hunter2" not in out
    assert out.endswith(b"Login incorrect\r\nvm1 login: ")
    assert not machine.logged_in


def test_machine_ctrl_d_at_login_prompt_is_ignored() -> None:
    """^D at the login prompt prints nothing and changes nothing."""
    machine, _ = booted()
    assert machine.feed(b"\x04") == b""
    assert machine.feed(b"operator\rrelayd\r").endswith(PROMPT)


# Line discipline.


def test_machine_backspace_erases_last_character() -> None:
    """DEL and BS erase with \\b \\b, and the command sees the edited line."""
    machine = logged_in()
    out = type_line(machine, b"echo hx\x7fi\x08i")
    assert b"\b \b" in out
    assert out.endswith(b"\r\nhi\r\n" + PROMPT)


def test_machine_ctrl_c_discards_line_and_prompts_again() -> None:
    """^C prints ^C and a fresh prompt; the typed line is dropped."""
    machine = logged_in()
    assert machine.feed(b"echo nope\x03") == b"echo nope^C\r\n" + PROMPT
    assert type_line(machine, b"") == b"\r\n" + PROMPT


def test_machine_crlf_is_one_enter() -> None:
    """CR LF from a terminal ends one line, not two."""
    machine = logged_in()
    assert machine.feed(b"true\r\n") == b"true\r\n" + PROMPT


def test_machine_ctrl_d_at_shell_logs_out() -> None:
    """^D on an empty shell line logs out back to the login prompt."""
    machine = logged_in()
    assert machine.feed(b"\x04").endswith(b"logout\r\n\r\nvm1 login: ")
    assert not machine.logged_in


# Commands.


@pytest.mark.parametrize(
    ("command", "expected"),
    [
        (b"echo hello  world", b"hello world\r\n"),
        (b"whoami", b"operator\r\n"),
        (b"hostname", b"vm1\r\n"),
        (b"pwd", b"/home/operator\r\n"),
        (b"true", b""),
        (b"nosuch --flag", b"-sh: nosuch: command not found\r\n"),
        (b"cat missing", b"cat: missing: No such file or directory\r\n"),
    ],
)
def test_machine_command_prints_expected_output(command: bytes, expected: bytes) -> None:
    """Each simple command prints what a Linux shell would."""
    machine = logged_in()
    assert type_line(machine, command) == command + b"\r\n" + expected + PROMPT


def test_machine_uname_a_names_the_sim_kernel() -> None:
    """uname -a reports Linux, the hostname, the sim kernel and x86_64 GNU/Linux."""
    out = type_line(logged_in(), b"uname -a")
    assert b"\r\nLinux vm1 6.1.0-sim " in out
    assert b" x86_64 GNU/Linux\r\n" in out


def test_machine_exit_returns_to_login_prompt() -> None:
    """exit logs out; the next line is a login name again."""
    machine = logged_in()
    assert type_line(machine, b"exit").endswith(b"logout\r\n\r\nvm1 login: ")
    assert not machine.logged_in


def test_machine_seq_streams_numbers_in_bounded_chunks() -> None:
    """seq output comes as a job in chunks, each far smaller than the whole."""
    machine = logged_in()
    assert machine.feed(b"seq 100000\r") == b"seq 100000\r\n"
    chunks = []
    while machine.busy:
        chunks.append(machine.pull())
    out = b"".join(chunks)
    assert out.startswith(b"1\r\n2\r\n")
    assert out.endswith(b"\r\n99999\r\n100000\r\n" + PROMPT)
    assert max(len(c) for c in chunks) < 64 * 1024


def test_machine_seq_range_is_capped() -> None:
    """seq A B prints A..B, and a huge count stops at the cap."""
    machine = logged_in()
    assert type_line(machine, b"seq 3 5") == b"seq 3 5\r\n3\r\n4\r\n5\r\n" + PROMPT
    machine.feed(b"seq 99999999999\r")
    first = machine.pull()
    assert first.startswith(b"1\r\n")
    machine.discard()
    assert not machine.busy
    assert MAX_SEQ == 10_000_000


def test_machine_ctrl_c_interrupts_a_flood() -> None:
    """^C during seq stops it and prints a prompt."""
    machine = logged_in()
    machine.feed(b"seq 10000000\r")
    machine.pull()
    assert machine.feed(b"\x03") == b"^C\r\n" + PROMPT
    assert not machine.busy


def test_machine_keys_typed_during_a_job_run_after_it() -> None:
    """Type-ahead during seq is read by the shell once seq is done."""
    machine = logged_in()
    machine.feed(b"seq 2\recho next\r")
    assert run_jobs(machine) == b"1\r\n2\r\n" + PROMPT + b"echo next\r\nnext\r\n" + PROMPT


def test_machine_cat_to_file_then_md5sum_matches_pasted_data() -> None:
    """Lines pasted into cat > FILE until ^D land in the file, as md5sum and wc show."""
    machine = logged_in()
    paste = b"".join(b"line %d of the paste\r" % i for i in range(200))
    machine.feed(b"cat > data.txt\r")
    machine.feed(paste + b"\x04")
    content = paste.replace(b"\r", b"\n")
    assert machine.read_file("data.txt") == content
    digest = hashlib.md5(content, usedforsecurity=False).hexdigest().encode()
    assert type_line(machine, b"md5sum data.txt").endswith(
        b"\r\n" + digest + b"  data.txt\r\n" + PROMPT
    )
    assert b"\r\n%d data.txt\r\n" % len(content) in type_line(machine, b"wc -c data.txt")
    assert b"data.txt" in type_line(machine, b"ls")


# Magic SysRq.


def test_machine_break_then_h_prints_sysrq_help_and_eats_the_key() -> None:
    """BREAK then h prints the SysRq help line; the h is neither echoed nor typed."""
    machine = logged_in()
    assert machine.feed(BREAK) == b""
    out = machine.feed(b"h")
    assert b"] sysrq: HELP : loglevel(0-9) reboot(b) crash(c)" in out
    assert type_line(machine, b"") == b"\r\n" + PROMPT


def test_machine_break_then_s_prints_emergency_sync() -> None:
    """BREAK then s prints the Emergency Sync messages."""
    machine = logged_in()
    machine.feed(BREAK)
    assert b"sysrq: Emergency Sync\r\n" in machine.feed(b"s")


def test_machine_break_then_b_reboots_and_logs_out() -> None:
    """BREAK then b prints Resetting, boots again and ends at a login prompt."""
    machine = logged_in()
    machine.feed(BREAK)
    out = machine.feed(b"b") + run_jobs(machine)
    assert b"sysrq: Resetting\r\n" in out
    assert b"Serial: 8250/16550 driver" in out
    assert out.endswith(b"vm1 login: ")
    assert not machine.logged_in


def test_machine_key_long_after_break_is_typed_normally() -> None:
    """A key more than 5 s after the BREAK is ordinary input."""
    clock = FakeClock()
    machine = logged_in(clock)
    machine.feed(BREAK)
    clock.now += 6
    assert machine.feed(b"h") == b"h"


def test_machine_break_during_password_still_reaches_sysrq() -> None:
    """SysRq works at any point, and its key does not end up in the password."""
    machine, _ = booted()
    machine.feed(b"operator\r")
    machine.feed(BREAK)
    assert b"sysrq: Show Memory" in machine.feed(b"m")
    assert machine.feed(b"relayd\r").endswith(PROMPT)


# Over sockets.


async def read_until(
    reader: asyncio.StreamReader, codec: TelnetCodec | None, marker: bytes
) -> bytes:
    """Console output up to and including `marker`, answering telnet negotiation."""
    seen = bytearray()
    async with asyncio.timeout(TIMEOUT):
        while marker not in seen:
            raw = await reader.read(65536)
            if not raw:
                raise AssertionError(f"connection closed before {marker!r}; got {bytes(seen)!r}")
            if codec is None:
                seen += raw
            else:
                seen += b"".join(e.data for e in codec.receive(raw) if isinstance(e, DataReceived))
    return bytes(seen)


async def test_guest_over_telnet_boots_logs_in_and_answers_sysrq() -> None:
    """Over loopback telnet: boot, login, echo hi, then IAC BRK h gives the SysRq help."""
    async with SimulatedGuest("vm1") as guest:
        port = await guest.start()
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        codec = TelnetCodec()
        try:
            writer.write(codec.initial())
            out = await read_until(reader, codec, b"vm1 login: ")
            assert b"ttyS0 at I/O 0x3f8" in out
            writer.write(codec.data_to_send() + codec.encode(b"operator\r"))
            await read_until(reader, codec, b"Password: ")
            writer.write(codec.encode(b"relayd\r"))
            await read_until(reader, codec, PROMPT)
            writer.write(codec.encode(b"echo hi\r"))
            assert b"\r\nhi\r\n" in await read_until(reader, codec, PROMPT)
            writer.write(codec.brk() + codec.encode(b"h"))
            await read_until(reader, codec, b"sysrq: HELP")
            assert codec.remote_enabled(BINARY)
            assert codec.local_enabled(BINARY)
        finally:
            writer.close()
            await writer.wait_closed()


async def test_guest_new_connection_replaces_old_and_keeps_session(tmp_path: Path) -> None:
    """A second client takes the console over; the first is dropped; the login survives."""
    async with SimulatedGuest("vm1") as guest:
        path = str(tmp_path / "vm1.sock")
        await guest.start_unix(path)
        reader1, writer1 = await asyncio.open_unix_connection(path)
        await read_until(reader1, None, b"vm1 login: ")
        writer1.write(b"operator\rrelayd\r")
        await read_until(reader1, None, PROMPT)
        reader2, writer2 = await asyncio.open_unix_connection(path)
        async with asyncio.timeout(TIMEOUT):
            await reader1.read()  # returns at EOF: the first client was dropped
        writer2.write(b"whoami\r")
        assert b"\r\noperator\r\n" in await read_until(reader2, None, PROMPT)
        writer1.close()
        writer2.close()
    assert not Path(path).exists()  # noqa: ASYNC240 - one stat in a test


async def test_guest_exclusive_newcomer_waits_unserved_until_first_hangs_up() -> None:
    """Like QEMU: with exclusive=True a second client gets nothing until the first leaves."""
    async with SimulatedGuest("vm1", telnet=False, exclusive=True) as guest:
        port = await guest.start()
        reader1, writer1 = await asyncio.open_connection("127.0.0.1", port)
        await read_until(reader1, None, b"vm1 login: ")
        writer1.write(b"operator\rrelayd\r")
        await read_until(reader1, None, PROMPT)
        reader2, writer2 = await asyncio.open_connection("127.0.0.1", port)
        writer2.write(b"whoami\r")
        # The first client still has the console, and its echo proves the machine saw
        # nothing from the second (whose keys would have come before this line's).
        writer1.write(b"echo first\r")
        assert b"\r\nfirst\r\n" + PROMPT in await read_until(reader1, None, b"first\r\n" + PROMPT)
        writer1.close()
        await writer1.wait_closed()
        # Now the second is served, from its first byte: its queued keys reach the
        # still logged-in shell, and nothing was sent to it while it waited.
        out = await read_until(reader2, None, b"operator\r\n" + PROMPT)
        assert out == b"whoami\r\noperator\r\n" + PROMPT
        writer2.close()
        await writer2.wait_closed()


async def test_guest_flood_is_backpressured_and_interruptible(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """seq 10000000 to a client that stops reading does not run ahead of it; ^C ends it."""
    async with SimulatedGuest("vm1", telnet=False) as guest:
        produced = 0
        pull = guest.machine.pull

        def counting_pull() -> bytes:
            nonlocal produced
            chunk = pull()
            produced += len(chunk)
            return chunk

        monkeypatch.setattr(guest.machine, "pull", counting_pull)
        port = await guest.start()
        reader, writer = await asyncio.open_connection("127.0.0.1", port, limit=1024)
        await read_until(reader, None, b"vm1 login: ")
        writer.write(b"operator\rrelayd\rseq 10000000\r")
        await read_until(reader, None, b"\r\n1000\r\n")
        # We stop reading. An unthrottled producer would make ~60 MB in these turns of
        # the loop; a backpressured one stops once the socket buffers are full.
        for _ in range(2000):
            await asyncio.sleep(0)
        assert guest.machine.busy
        assert produced < 32 * 1024 * 1024
        writer.write(b"\x03")
        await read_until(reader, None, b"^C\r\n" + PROMPT)
        writer.close()
