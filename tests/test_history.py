"""Console history end to end: the on-disk log, the console-log endpoint, restarts."""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import signal
import ssl
from collections.abc import Callable
from typing import Any

from websockets.asyncio.client import ClientConnection, connect

from relayd.consolelog import ConsoleLog

from .conftest import (
    TIMEOUT,
    FarEnd,
    gateway_process,
    http_request,
    https_exchange,
    running,
    wait_hub,
    wait_port_up,
)


async def _get(
    gw: Any, ctx: ssl.SSLContext, path: str, bearer: str
) -> tuple[int, dict[str, str], bytes]:
    return await https_exchange(gw.tls_port, ctx, http_request("GET", path, bearer=bearer))


async def test_console_log_endpoint_serves_offsets_and_headers(
    write_config: Callable[..., Any],
    far_end: FarEnd,
    client_ssl: ssl.SSLContext,
    token: Callable[..., str],
) -> None:
    """GET console-log returns held bytes by offset with Relayd-Log-Start/End; readers allowed."""
    config = write_config(vms=[{"id": "vm-a", "serial": f"tcp://127.0.0.1:{far_end.port}"}])
    output = b"".join(b"line %05d\r\n" % i for i in range(2000))
    async with running(config) as gw:
        await wait_port_up(gw, "vm-a")
        await far_end.send(output)
        await wait_hub(gw, "vm-a", lambda hub: hub.end >= len(output))
        status, headers, body = await _get(
            gw, client_ssl, "/v1/vms/vm-a/console-log", token("rita")
        )
        assert status == 200
        assert headers["content-type"] == "application/octet-stream"
        assert (headers["relayd-log-start"], headers["relayd-log-end"]) == ("0", str(len(output)))
        assert body == output
        status, headers, body = await _get(
            gw, client_ssl, "/v1/vms/vm-a/console-log?from=100&max_bytes=50", token("rita")
        )
        assert body == output[100:150]
        assert headers["relayd-data-offset"] == "100"
        status, _, _ = await _get(gw, client_ssl, "/v1/vms/vm-a/console-log?from=-1", token("rita"))
        assert status == 400
        status, _, _ = await _get(gw, client_ssl, "/v1/vms/vm-a/console-log", token("mallory"))
        assert status == 404


async def test_restart_keeps_offsets_and_replays_from_disk(
    write_config: Callable[..., Any],
    far_end: FarEnd,
    open_console: Callable[..., Any],
) -> None:
    """After a restart the log still holds the output at the same offsets; resume reads it."""
    config = write_config(
        vms=[{"id": "vm-a", "serial": f"tcp://127.0.0.1:{far_end.port}"}],
        limits={"output_buffer_bytes": 4096, "console_log_bytes": 65536, "replay_bytes": 100},
    )
    before = os.urandom(20000)
    async with running(config) as gw:
        await wait_port_up(gw, "vm-a")
        await far_end.send(before)
        await wait_hub(gw, "vm-a", lambda hub: hub.end >= len(before))
    async with running(config) as gw:
        assert gw.hubs["vm-a"].end == len(before)
        await wait_port_up(gw, "vm-a")
        # Resume far back: older than memory holds (4 KiB), so it is read from disk.
        async with open_console(gw, "vm-a", resume_from=1000) as console:
            assert console.hello["offset"] == len(before)
            assert console.hello["replay"] == len(before) - 1000
            assert await console.read_at_least(len(before) - 1000) == before[1000:]
            await far_end.send(b"after restart|")
            out = await console.expect(b"after restart|")
            assert out == before[1000:] + b"after restart|"
        async with open_console(gw, "vm-a") as fresh:
            assert fresh.hello["replay"] == 100


async def test_resume_past_the_end_after_the_log_was_lost_says_offsets_are_reused(
    write_config: Callable[..., Any],
    far_end: FarEnd,
    open_console: Callable[..., Any],
) -> None:
    """The console log is gone between two runs (state_dir wiped): offsets start again, so a
    client resuming at its old position holds bytes at offsets the gateway hands out anew.
    It is told (`offsets_reused`, the offsets it holds that will carry other bytes), and the
    stream goes on at the new end, as the hello says: nothing printed since is skipped."""
    config = write_config(vms=[{"id": "vm-a", "serial": f"tcp://127.0.0.1:{far_end.port}"}])
    async with running(config) as gw:
        await wait_port_up(gw, "vm-a")
        await far_end.send(b"before the wipe|" * 10)
        await wait_hub(gw, "vm-a", lambda hub: hub.end >= 160)
    shutil.rmtree(config.gateway.state_dir / "consolelog")
    async with running(config) as gw:
        await wait_port_up(gw, "vm-a")
        await far_end.send(b"new|")
        await wait_hub(gw, "vm-a", lambda hub: hub.end == 4)
        async with open_console(gw, "vm-a", resume_from=160) as console:
            assert (console.hello["offset"], console.hello["replay"]) == (4, 0)
            reused = await console.control(type="notice", event="offsets_reused")
            assert (reused["first"], reused["last"], reused["bytes"]) == (4, 159, 156)
            await far_end.send(b"after|")
            assert await console.expect(b"after|") == b"after|"
            assert not [c for c in console.controls if c.get("event") == "output_gap"]


async def test_unreadable_log_on_resume_skips_to_memory_with_exact_gap(
    write_config: Callable[..., Any],
    far_end: FarEnd,
    open_console: Callable[..., Any],
) -> None:
    """When the on-disk log cannot be read, the client is told what it misses, never misled."""
    config = write_config(
        vms=[{"id": "vm-a", "serial": f"tcp://127.0.0.1:{far_end.port}"}],
        limits={"output_buffer_bytes": 4096, "console_log_bytes": 65536},
    )
    before = os.urandom(20000)
    async with running(config) as gw:
        await wait_port_up(gw, "vm-a")
        await far_end.send(before)
        hub = gw.hubs["vm-a"]
        await wait_hub(gw, "vm-a", lambda hub: hub.end >= len(before))
        assert hub.log is not None
        hub.log.flush()
        segment = sorted(hub.log.directory.glob("*.seg"))[0]
        with segment.open("r+b") as f:  # a bad sector under the oldest output
            f.seek(64)
            f.write(bytes(b ^ 0xFF for b in f.read(64)))
        ring_start = hub.ring.start
        assert ring_start > 1000
        async with open_console(gw, "vm-a", resume_from=1000) as console:
            gap = await console.control(type="notice", event="output_gap")
            assert (gap["first"], gap["last"]) == (1000, ring_start - 1)
            assert await console.read_at_least(len(before) - ring_start) == before[ring_start:]


async def _read_by_offset(
    ws: ClientConnection, at: int, until: bytes
) -> tuple[dict[int, int], list[tuple[int, int]]]:
    """Read a resumed console until `until` shows: each byte by its offset, and the gaps."""
    got: dict[int, int] = {}
    gaps: list[tuple[int, int]] = []
    tail = b""
    async with asyncio.timeout(TIMEOUT):
        while until not in tail:
            message = await ws.recv()
            if isinstance(message, bytes):
                for i, byte in enumerate(message):
                    got[at + i] = byte
                at += len(message)
                tail = (tail + message)[-len(until) - 64 :]
            elif (notice := json.loads(message)).get("event") == "output_gap":
                assert notice["first"] == at
                gaps.append((notice["first"], notice["last"]))
                at = notice["last"] + 1
    return got, gaps


async def test_resume_across_a_kill_9_gets_a_gap_never_other_bytes_at_an_offset(
    write_config: Callable[..., Any],
    far_end: FarEnd,
    client_ssl: ssl.SSLContext,
    token: Callable[..., str],
) -> None:
    """A gateway killed before its log flush loses that output; a client that saw it and
    resumes after the restart is told it is gone (output_gap), never shown new output there."""
    config = write_config(vms=[{"id": "vm-a", "serial": f"tcp://127.0.0.1:{far_end.port}"}])
    bearer = {"Authorization": f"Bearer {token('rita')}"}
    seen = b"printed just before the crash\r\n"

    def console(port: int, query: str) -> Any:
        return connect(
            f"wss://localhost:{port}/v1/vms/vm-a/console?mode=spectate{query}",
            ssl=client_ssl,
            subprotocols=["relayd.console.v1"],  # type: ignore[list-item]
            additional_headers=bearer,
        )

    async with gateway_process(config) as first, console(first.port, "") as ws:
        start = json.loads(await ws.recv())["offset"]
        await far_end.send(seen)
        got, _ = await _read_by_offset(ws, start, seen)
        # Killed at once: the log is written within 0.5-1 s of new output, not yet.
        first.proc.send_signal(signal.SIGKILL)
        await first.proc.wait()
    await far_end.stop()
    await far_end.start(far_end.port)
    async with gateway_process(config) as second:
        await far_end.connected()
        async with console(second.port, f"&from={start}") as ws:
            assert json.loads(await ws.recv())["type"] == "hello"
            await far_end.send(b"after the restart|")
            again, gaps = await _read_by_offset(ws, start, b"after the restart|")
    for offset, byte in got.items():
        if offset in again:
            assert again[offset] == byte, f"offset {offset} now holds other output"
        else:
            assert any(lo <= offset <= hi for lo, hi in gaps)


async def test_a_vm_id_reused_in_another_subscription_starts_a_new_history(
    write_config: Callable[..., Any],
    far_end: FarEnd,
    client_ssl: ssl.SSLContext,
    token: Callable[..., str],
    open_console: Callable[..., Any],
) -> None:
    """A log belongs to its VM's identity, not its id: vm-a of sub-2 never sees vm-a of sub-1's
    output, by replay or console-log, after a restart or a reload; vm-a back in sub-1 has it."""
    serial = f"tcp://127.0.0.1:{far_end.port}"
    roles = [
        ("user:alice", "contributor", "/subscriptions/sub-1"),
        ("user:bob", "contributor", "/subscriptions/sub-2"),
        ("user:carol", "reader", "/subscriptions/sub-1"),
        ("user:carol", "reader", "/subscriptions/sub-2"),
    ]

    def config_in(sub: str) -> Any:
        return write_config(
            vms=[{"id": "vm-a", "serial": serial, "subscription": sub}],
            subscriptions=("sub-1", "sub-2"),
            roles=roles,
        )

    secret = b"password printed for sub-1's eyes\r\n"
    async with running(config_in("sub-1")) as gw:
        await wait_port_up(gw, "vm-a")
        await far_end.send(secret)
        await wait_hub(gw, "vm-a", lambda hub: hub.end >= len(secret))
    async with running(config_in("sub-2")) as gw:
        assert gw.hubs["vm-a"].end == 0
        status, headers, body = await _get(gw, client_ssl, "/v1/vms/vm-a/console-log", token("bob"))
        assert (status, headers["relayd-log-end"], body) == (200, "0", b"")
        # And by reload, the other way: sub-1 again is the same VM, with its history; who
        # watched the other one is let go, even with a role on both.
        async with open_console(gw, "vm-a", user="carol") as carol:
            config_in("sub-1")
            assert await gw.reload()
            assert await carol.closed() == (
                4004,
                "vm identity changed in the gateway configuration",
            )
        assert gw.hubs["vm-a"].read(0, 1000) == secret
        config_in("sub-2")
        assert await gw.reload()
        assert gw.hubs["vm-a"].read(0, 1000) == b""


async def test_old_layout_logs_are_adopted_at_start_by_the_vm_with_their_id_only(
    write_config: Callable[..., Any],
    far_end: FarEnd,
    client_ssl: ssl.SSLContext,
    token: Callable[..., str],
) -> None:
    """A log kept by VM id alone (before identities) becomes the configured VM's at the first
    start; one whose VM is not configured then is never given to a VM that comes later."""
    serial = f"tcp://127.0.0.1:{far_end.port}"
    subs = ("sub-1", "sub-2")
    config = write_config(vms=[{"id": "vm-a", "serial": serial}], subscriptions=subs)
    root = config.gateway.state_dir / "consolelog"
    for vm_id in ("vm-a", "vm-gone"):
        old = ConsoleLog(root / vm_id, 65536)
        old.open()
        old.append(f"history of the old {vm_id}\r\n".encode())
        old.close()
    async with running(config) as gw:
        assert gw.hubs["vm-a"].read(0, 100) == b"history of the old vm-a\r\n"
        write_config(
            vms=[
                {"id": "vm-a", "serial": serial},
                {"id": "vm-gone", "serial": serial, "subscription": "sub-2"},
            ],
            subscriptions=subs,
        )
        assert await gw.reload()
        assert gw.hubs["vm-gone"].end == 0
    assert (root / "vm-gone").is_dir()  # left where it was, for the operator
    assert not (root / "vm-a").exists()
