"""Idle TCP connections from one address: what they cost relayd, and whether others get in.

    python -m bench.idleflood [--connections 20000] [--processes 4]

The target (docs/THREAT_MODEL.md, issue 15 item 6): 20,000 idle TCP
connections from one address cost relayd less than 50 MB, and never stop
another address from getting a console in less than 1 s.

relayd runs as in production (`relayd serve`, pinned to CPU 0, its default
[limits]: 20 connections/s per address, 32 handshakes in flight per address,
1,024 in all) in front of one VM whose serial port is an echo server. Several
holder processes (the open-files limit is 20,000 per process) connect from
127.0.0.2, as fast as the kernel lets them, and then never send a byte nor
close. Meanwhile, and once they are all connected, a probe from 127.0.0.3
opens a console (TCP, TLS, upgrade, `hello`) again and again and times each.
relayd's resident set is read from /proc before, at the end, and at its peak.

Prints one JSON object; exits 1 when a target is missed.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import resource
import socket
import ssl
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from relayd.config import LimitsConfig

from . import procfs
from .backend import Backend
from .loadgen import client_context
from .peers import Relayd, make_pki

ROOT = Path(__file__).resolve().parent.parent
RSS_BUDGET = 50 * 2**20
CONSOLE_BUDGET = 1.0
PROBE_EVERY = 0.2
PROBE_TIMEOUT = 10.0
# relayd's own defaults, which the bench's Relayd otherwise lifts for its load generator.
LIMIT_KEYS = ("connections_per_second_per_ip", "max_handshakes", "max_handshakes_per_ip")


def _peak_rss(pid: int) -> int:
    """VmHWM of `pid`, bytes."""
    for line in (procfs.PROC / str(pid) / "status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    return 0


# -- the holder processes ---------------------------------------------------------------


async def hold(port: int, source: str, count: int) -> None:
    """Open `count` idle connections from `source`; report; report again on each stdin line."""
    loop = asyncio.get_running_loop()
    socks: list[socket.socket] = []
    failed = 0

    async def one() -> None:
        nonlocal failed
        sock = socket.socket()
        sock.setblocking(False)
        try:
            sock.bind((source, 0))
            await loop.sock_connect(sock, ("127.0.0.1", port))
        except OSError:
            sock.close()
            failed += 1
            return
        socks.append(sock)

    async with asyncio.TaskGroup() as tg:
        for _ in range(count):
            tg.create_task(one())
    _report(socks, failed)
    reader = asyncio.StreamReader()
    await loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(reader), sys.stdin)
    while await reader.readline():
        _report(socks, failed)
    for sock in socks:
        sock.close()


def _report(socks: list[socket.socket], failed: int) -> None:
    """One JSON line: connections open, closed by the server, and `failed`: reset before
    `connect()` even returned (relayd accepts and resets faster than the client looks)."""
    still, reset = 0, 0
    for sock in socks:
        try:
            data = sock.recv(1, socket.MSG_PEEK | socket.MSG_DONTWAIT)
        except BlockingIOError:
            still += 1
            continue
        except OSError:
            reset += 1
            continue
        if data:
            still += 1  # the server sent something: not idle on its side, but open
        else:
            reset += 1  # an orderly close counts as refused too
    print(json.dumps({"open": still, "closed": reset, "failed": failed}), flush=True)


# -- the probe --------------------------------------------------------------------------


async def probe(port: int, source: str, token: str, ctx: ssl.SSLContext) -> float:
    """Seconds from connect to `hello` for one console from `source`; raises on failure."""
    started = time.monotonic()
    async with asyncio.timeout(PROBE_TIMEOUT):
        reader, writer = await asyncio.open_connection(
            "127.0.0.1", port, ssl=ctx, server_hostname="localhost", local_addr=(source, 0)
        )
        try:
            writer.write(
                (
                    "GET /v1/vms/vm-1/console?mode=spectate HTTP/1.1\r\nHost: localhost\r\n"
                    f"Authorization: Bearer {token}\r\nUpgrade: websocket\r\n"
                    "Connection: Upgrade\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n"
                    "Sec-WebSocket-Version: 13\r\nSec-WebSocket-Protocol: relayd.console.v1\r\n"
                    "\r\n"
                ).encode()
            )
            head = await reader.readuntil(b"\r\n\r\n")
            if not head.startswith(b"HTTP/1.1 101"):
                raise RuntimeError(f"upgrade refused: {head.splitlines()[0]!r}")
            length = (await reader.readexactly(2))[1] & 0x7F  # the hello: a text frame
            if length >= 126:
                length = int.from_bytes(await reader.readexactly(2 if length == 126 else 8))
            if b'"hello"' not in await reader.readexactly(length):
                raise RuntimeError("the first frame is not the hello")
        finally:
            writer.close()
    return time.monotonic() - started


async def probe_until(
    done: asyncio.Event, port: int, source: str, token: str, ctx: ssl.SSLContext
) -> tuple[list[float], list[str]]:
    """Probe every `PROBE_EVERY` s until `done`; latencies and errors."""
    times: list[float] = []
    errors: list[str] = []
    while not done.is_set():
        try:
            times.append(await probe(port, source, token, ctx))
        except (OSError, TimeoutError, RuntimeError, asyncio.IncompleteReadError) as exc:
            errors.append(repr(exc))
        try:
            async with asyncio.timeout(PROBE_EVERY):
                await done.wait()
        except TimeoutError:
            pass
    return times, errors


# -- the run ----------------------------------------------------------------------------


async def _holders(
    port: int, source: str, total: int, processes: int
) -> list[asyncio.subprocess.Process]:
    each = -(-total // processes)
    procs = []
    for i in range(processes):
        count = min(each, total - i * each)
        if count <= 0:
            break
        procs.append(
            await asyncio.create_subprocess_exec(
                sys.executable,
                "-m",
                "bench.idleflood",
                "--hold",
                str(count),
                "--port",
                str(port),
                "--source",
                source,
                stdin=asyncio.subprocess.PIPE,
                stdout=asyncio.subprocess.PIPE,
                cwd=ROOT,
            )
        )
    return procs


async def _read_reports(procs: list[asyncio.subprocess.Process]) -> dict[str, int]:
    totals = {"open": 0, "closed": 0, "failed": 0}
    for proc in procs:
        assert proc.stdout is not None
        line = await proc.stdout.readline()
        for key, value in json.loads(line).items():
            totals[key] += value
    return totals


async def run(args: argparse.Namespace) -> dict[str, Any]:
    """The whole measurement; returns the report."""
    workdir = Path(tempfile.mkdtemp(prefix="relayd-idleflood-"))
    pki = make_pki(workdir / "pki")
    backend = Backend()
    await backend.start()
    defaults = LimitsConfig()
    relayd = Relayd(
        workdir / "relayd",
        pki,
        [("vm-1", backend.echo_port)],
        limits={k: getattr(defaults, k) for k in LIMIT_KEYS},
    )
    ctx = client_context()
    report: dict[str, Any] = {"connections": args.connections, "processes": args.processes}
    procs: list[asyncio.subprocess.Process] = []
    try:
        await relayd.start()
        await probe(relayd.port, args.probe_source, relayd.token, ctx)  # warm up
        rss_before = procfs.rss_kib(relayd.pid) * 1024
        connected = asyncio.Event()
        probing = asyncio.create_task(
            probe_until(connected, relayd.port, args.probe_source, relayd.token, ctx)
        )
        started = time.monotonic()
        procs = await _holders(relayd.port, args.source, args.connections, args.processes)
        first = await _read_reports(procs)
        report["connect_seconds"] = round(time.monotonic() - started, 2)
        connected.set()
        during, errors_during = await probing
        after: list[float] = []
        errors_after: list[str] = []
        for _ in range(args.probes):
            try:
                after.append(await probe(relayd.port, args.probe_source, relayd.token, ctx))
            except (OSError, TimeoutError, RuntimeError, asyncio.IncompleteReadError) as exc:
                errors_after.append(repr(exc))
        for proc in procs:
            assert proc.stdin is not None
            proc.stdin.write(b"count\n")
        held = await _read_reports(procs)
        rss_after = procfs.rss_kib(relayd.pid) * 1024
        peak = _peak_rss(relayd.pid)
        metrics = await relayd.metrics()
        probes = during + after
        report.update(
            {
                "holders_after_connecting": first,
                "holders_at_end": held,
                "relayd_rss_before": rss_before,
                "relayd_rss_after": rss_after,
                "relayd_rss_peak": peak,
                "relayd_rss_growth_peak": peak - rss_before,
                "console_seconds_during": _summary(during),
                "console_seconds_after": _summary(after),
                "console_errors": errors_during + errors_after,
                "handshake_failures": metrics.get("relayd_tls_handshake_failures_total", 0),
            }
        )
        report["pass"] = (
            report["relayd_rss_growth_peak"] < RSS_BUDGET
            and not report["console_errors"]
            and bool(probes)
            and max(probes) < CONSOLE_BUDGET
        )
    finally:
        for proc in procs:
            if proc.stdin is not None:
                proc.stdin.close()
        for proc in procs:
            await proc.wait()
        await relayd.stop()
        await backend.close()
    return report


def _summary(times: list[float]) -> dict[str, float | int]:
    if not times:
        return {"n": 0}
    return {
        "n": len(times),
        "median": round(statistics.median(times), 4),
        "max": round(max(times), 4),
    }


def main(argv: list[str] | None = None) -> int:
    """Run the bench, or (with --hold) be one holder process."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--connections", type=int, default=20_000)
    parser.add_argument("--processes", type=int, default=4)
    parser.add_argument("--source", default="127.0.0.2", help="where idle connections come from")
    parser.add_argument("--probe-source", default="127.0.0.3", help="where the probe comes from")
    parser.add_argument("--probes", type=int, default=10, help="probes after all are connected")
    parser.add_argument("--hold", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--port", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.hold is not None:
        _, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
        asyncio.run(hold(args.port, args.source, args.hold))
        return 0
    report = asyncio.run(run(args))
    print(json.dumps(report, indent=2))
    return 0 if report["pass"] else 1


if __name__ == "__main__":
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    sys.exit(main())
