"""Input pacing: how close long pastes get to the serial line rate, alone and 50 at once.

Each VM's serial port is its own TCP sink here (one listener per VM) that
records when each byte arrives. A client pastes 64 KiB in one message; the
effective rate is bytes / (arrival of the last byte - time the paste was
sent). relayd paces at `baud / 10` bytes per second (11,520 B/s at 115,200
baud) with a burst of a tenth of a second, so the ideal is slightly above
100 %. The relay runs pinned to CPU 0, this generator on CPU 1; the relay's
CPU for the 50-console phase gives "CPU per paced MB/s".

Run: `.venv/bin/python -m bench.pacing [--consoles 50] [--bytes 65536]`.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

from . import procfs
from .loadgen import client_context, open_conn
from .peers import Relayd, kill_all, make_pki

BAUD = 115200
RATE = BAUD // 10


@dataclass
class Sink:
    """A VM's serial port: counts bytes and remembers when the last one came."""

    expected: int
    received: int = 0
    last: float = 0.0
    done: asyncio.Event = field(default_factory=asyncio.Event)

    def feed(self, n: int) -> None:
        self.received += n
        self.last = time.monotonic()
        if self.received >= self.expected:
            self.done.set()


async def _serve_sink(sink: Sink) -> tuple[asyncio.Server, int]:
    async def on_client(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        while data := await reader.read(65536):
            sink.feed(len(data))
        writer.close()

    server = await asyncio.start_server(on_client, "127.0.0.1", 0)
    return server, server.sockets[0].getsockname()[1]


async def run(consoles: int, nbytes: int, workdir: Path) -> dict[str, object]:
    """Paste into one console, then into `consoles` at once; returns the figures."""
    pki = make_pki(workdir / "pki")
    sinks = [Sink(nbytes) for _ in range(consoles)]
    servers = [await _serve_sink(s) for s in sinks]
    relayd = Relayd(workdir, pki, [(f"vm-{i}", port) for i, (_, port) in enumerate(servers)])
    await relayd.start()
    ctx = client_context()
    paste = (os.urandom(nbytes // 2).hex().encode())[:nbytes]
    try:
        conns = [await open_conn(relayd.target(f"vm-{i}"), ctx) for i in range(consoles)]

        async def paste_into(i: int) -> float:
            sent = time.monotonic()
            conns[i].send_input(paste)
            async with asyncio.timeout(10 * nbytes / RATE + 30):
                await sinks[i].done.wait()
            return nbytes / (sinks[i].last - sent)

        single = await paste_into(0)
        for sink in sinks:  # fresh counters for the concurrent phase
            sink.received, sink.done = 0, asyncio.Event()
        await asyncio.sleep(1.0)  # let console 0's bucket refill to its burst
        cpu0, wall0 = procfs.cpu_seconds(relayd.pid), time.monotonic()
        rates = await asyncio.gather(*(paste_into(i) for i in range(consoles)))
        cpu, wall = procfs.cpu_seconds(relayd.pid) - cpu0, time.monotonic() - wall0
        for conn in conns:
            await conn.close()
    finally:
        await relayd.stop()
        for server, _ in servers:
            server.close()
        kill_all()
    paced_mb_s = consoles * nbytes / wall / 1e6
    return {
        "line_rate_bytes_per_s": RATE,
        "paste_bytes": nbytes,
        "single_rate_percent": round(100 * single / RATE, 1),
        "consoles": consoles,
        "concurrent_min_percent": round(100 * min(rates) / RATE, 1),
        "concurrent_median_percent": round(100 * sorted(rates)[len(rates) // 2] / RATE, 1),
        "aggregate_paced_mb_per_s": round(paced_mb_s, 3),
        "relay_cpu_percent_of_core": round(100 * cpu / wall, 2),
        "relay_cpu_s_per_paced_mb": round(cpu / (consoles * nbytes / 1e6), 3),
    }


def main() -> None:
    """Command line entry."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--consoles", type=int, default=50)
    parser.add_argument("--bytes", type=int, default=65536)
    args = parser.parse_args()
    os.sched_setaffinity(0, {1})
    with tempfile.TemporaryDirectory(prefix="relayd-pacing-") as tmp:
        result = asyncio.run(run(args.consoles, args.bytes, Path(tmp)))
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
