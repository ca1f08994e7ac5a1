"""Bandwidth end to end through real TLS into real ptys: pacing, pastes, slow clients, logout."""

from __future__ import annotations

import asyncio
import base64
import json
import os
import resource
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from .conftest import TIMEOUT, FarEnd, running, wait_hub, wait_port_up


class PtyFarEnd:
    """The 'VM' side of a pty: records what relayd wrote, with the time of each read."""

    def __init__(self, master: int) -> None:
        self.master = master
        self.received = bytearray()
        self.reads: list[tuple[float, int]] = []
        self._changed = asyncio.Event()
        loop = asyncio.get_running_loop()
        loop.add_reader(master, self._on_readable)

    def _on_readable(self) -> None:
        try:
            data = os.read(self.master, 65536)
        except (BlockingIOError, OSError):
            return
        self.received += data
        self.reads.append((time.monotonic(), len(self.received)))
        self._changed.set()

    async def wait_for(self, predicate: Callable[[bytes], bool], *, slow: bool = False) -> bytes:
        """Wait until what arrived satisfies `predicate` (`slow`: allow a paced transfer)."""
        async with asyncio.timeout(TIMEOUT * 3 if slow else TIMEOUT):
            while not predicate(bytes(self.received)):
                self._changed.clear()
                await self._changed.wait()
        return bytes(self.received)

    def close(self) -> None:
        """Stop watching the master."""
        asyncio.get_running_loop().remove_reader(self.master)


async def test_64k_paste_arrives_byte_exact_and_paced_at_line_rate(
    write_config: Callable[..., Any],
    open_console: Callable[..., Any],
    pty_pair: Callable[[], tuple[int, Path]],
) -> None:
    """A 64 KiB paste reaches a real pty intact, never faster than the configured rate allows."""
    master, link = pty_pair()
    rate = 32768
    config = write_config(vms=[{"id": "vm-tty", "serial": str(link), "input_bytes_per_s": rate}])
    lines = base64.encodebytes(os.urandom(48 * 1024)).replace(b"\n", b"\r")
    paste = lines[: 64 * 1024]
    async with running(config) as gw:
        await wait_port_up(gw, "vm-tty")
        far = PtyFarEnd(master)
        try:
            async with open_console(gw, "vm-tty") as console:
                assert console.hello["limits"]["input_bytes_per_s"] == rate
                sent_at = time.monotonic()
                await console.send(paste)
                got = await far.wait_for(lambda b: len(b) >= len(paste), slow=True)
        finally:
            far.close()
    assert got == paste
    burst = rate // 10 + rate // 50  # the bucket's burst plus one chunk in flight
    for at, total in far.reads:
        assert total <= burst + rate * (at - sent_at) + 1, (at - sent_at, total)
    assert len(far.reads) > 10  # it came in many paced writes, not one


async def test_break_sent_mid_paste_is_not_stuck_behind_it(
    write_config: Callable[..., Any], far_end: FarEnd, open_console: Callable[..., Any]
) -> None:
    """On telnet://, IAC BRK and its SysRq key arrive while the paste is still being paced."""
    config = write_config(
        vms=[{"id": "vm-t", "serial": f"telnet://127.0.0.1:{far_end.port}", "baud": 115200}]
    )
    paste = base64.encodebytes(os.urandom(24 * 1024))[: 32 * 1024]
    async with running(config) as gw:
        await wait_port_up(gw, "vm-t")
        async with open_console(gw, "vm-t") as console:
            await console.send(paste)
            await console.send({"type": "sysrq", "key": "s"})
            got = await far_end.wait_received(lambda b: paste[-64:] in b)
    at = got.index(b"\xff\xf3s")
    payload = got.replace(b"\xff\xf3s", b"")
    assert paste in payload
    assert at < len(got) - len(paste) // 2, "the BREAK waited behind the paste"


async def test_message_over_max_paste_bytes_is_refused_with_nothing_written(
    write_config: Callable[..., Any], far_end: FarEnd, open_console: Callable[..., Any]
) -> None:
    """65,537 bytes with the default 64 KiB limit: paste_too_long names the limit, port sees 0."""
    config = write_config(vms=[{"id": "vm-a", "serial": f"tcp://127.0.0.1:{far_end.port}"}])
    async with running(config) as gw:
        await wait_port_up(gw, "vm-a")
        async with open_console(gw, "vm-a") as console:
            await console.send(b"p" * 65537)
            error = await console.control(type="error")
            assert error["code"] == "paste_too_long"
            assert error["limit"] == 65536
            assert "65537" in error["message"]
            await console.send(b"ok")
            await far_end.wait_received(lambda b: b == b"ok")
        assert gw.hubs["vm-a"].stats.pastes_refused == 1


async def test_stalled_spectator_while_vm_prints_8mib_isolated_and_memory_bounded(
    write_config: Callable[..., Any],
    far_end: FarEnd,
    open_console: Callable[..., Any],
    stalled_spectator: Callable[..., Any],
) -> None:
    """A spectator that never reads: the writer gets all 8 MiB, the log holds it, memory is flat."""
    config = write_config(
        vms=[{"id": "vm-a", "serial": f"tcp://127.0.0.1:{far_end.port}"}],
        limits={
            "console_log_bytes": 16 * 2**20,
            "output_buffer_bytes": 2**20,
            "output_bytes_per_s": 2**30,
        },
    )
    payload = os.urandom(8 * 2**20)
    async with running(config) as gw:
        await wait_port_up(gw, "vm-a")
        async with (
            stalled_spectator(gw, "vm-a") as rita,
            open_console(gw, "vm-a", user="alice") as writer,
        ):
            rss_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
            await far_end.send(payload)
            assert await writer.read_at_least(len(payload)) == payload
            rss_after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
            await wait_hub(gw, "vm-a", lambda hub: hub.end == len(payload))
            hub = gw.hubs["vm-a"]
            assert hub.read(0, len(payload)) == payload  # the on-disk log holds it all
            stalled = next(s for s in gw.sessions.values() if s.principal.id == "user:rita")
            # Nothing was buffered for the stalled client beyond its transport's high-water
            # mark, and it fell out of the 1 MiB live buffer...
            assert stalled.transport.get_write_buffer_size() <= 2 * 262144 + 65536
            assert stalled.cursor < hub.ring.start
            # ...so when it reads again it is told exactly what it skipped.
            gap = None
            async with asyncio.timeout(TIMEOUT):
                while gap is None:
                    message = await rita.recv()
                    if isinstance(message, str) and '"output_gap"' in message:
                        gap = json.loads(message)
            assert gap["last"] + 1 >= hub.ring.start
            assert hub.stats.output_gaps == 1
    # The whole test process (client and server) grew by far less than the 8 MiB flood
    # times the number of clients: output is held once, in the ring and on disk.
    assert rss_after - rss_before < 48 * 1024  # KiB


async def test_on_detach_send_logs_the_writer_out_when_displaced(
    write_config: Callable[..., Any],
    open_console: Callable[..., Any],
    pty_pair: Callable[[], tuple[int, Path]],
) -> None:
    """on_detach = send:... writes the bytes when the writer is evicted; the next hello says so."""
    master, link = pty_pair()
    config = write_config(
        vms=[{"id": "vm-tty", "serial": str(link), "on_detach": "send:\\x04exit\\r"}]
    )
    async with running(config) as gw:
        await wait_port_up(gw, "vm-tty")
        far = PtyFarEnd(master)
        try:
            async with open_console(gw, "vm-tty", user="alice") as alice:
                assert alice.hello["previous_session_logged_out"] is None
                await alice.send(b"whoami\r")
                await far.wait_for(lambda b: b"whoami\r" in b)
                async with open_console(gw, "vm-tty", user="bob") as bob:
                    assert bob.hello["previous_session_logged_out"] is True
                    await far.wait_for(lambda b: b.endswith(b"\x04exit\r"))
        finally:
            far.close()
    assert bytes(far.received) == b"whoami\r\x04exit\r"


async def test_on_detach_hangup_drops_dtr_on_a_tty(
    write_config: Callable[..., Any],
    open_console: Callable[..., Any],
    pty_pair: Callable[[], tuple[int, Path]],
) -> None:
    """on_detach = hangup: when the writer leaves, relayd drops DTR (the hub's hangup runs)."""
    master, link = pty_pair()
    config = write_config(vms=[{"id": "vm-tty", "serial": str(link), "on_detach": "hangup"}])
    async with running(config) as gw:
        await wait_port_up(gw, "vm-tty")
        async with open_console(gw, "vm-tty", user="alice") as alice:
            await alice.send(b"x")
        await wait_hub(gw, "vm-tty", lambda hub: hub.lease.holder is None)
        async with open_console(gw, "vm-tty", user="bob") as bob:
            assert bob.hello["previous_session_logged_out"] is True
            # The port survived the DTR drop and still carries input.
            await bob.send(b"y")
        os.set_blocking(master, True)
        assert os.read(master, 16) in (b"xy", b"x")
