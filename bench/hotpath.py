"""The relay's own Python cost per keystroke round trip, without TLS, sockets or the kernel.

`bench/run.py` measures whole-process CPU per round trip, which also holds
the kernel's TCP work, OpenSSL and uvloop, and which varies by ±10 % between
runs on a shared VM: too coarse to tell whether a change to the hot path
saved 2 µs. This drives the real `ConsoleSession` and `ConsoleHub` with
in-memory stand-ins for the client transport and the serial link (the link
echoes each keystroke back as console output, as a shell would), so what is
timed is exactly relayd's Python: the client frame through websockets, the
lease check, the write to the port, then the output through the console log,
the ring and the frame to the client. The console log is real (files under a
temporary directory) and is flushed by its own timer, as in the daemon.

    .venv/bin/python -m bench.hotpath [--keys 200000] [--sessions 1000]

Prints CPU per round trip (best of several rounds) for one line of
`docs/benchmarks.md`.
"""

from __future__ import annotations

import argparse
import asyncio
import random
import struct
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from relayd.auth import Principal
from relayd.config import LimitsConfig, VmConfig
from relayd.hub import LOG_FLUSH_MIN_SHARE, LOG_FLUSH_SECONDS, ConsoleHub
from relayd.log import configure_logging
from relayd.ports.protocol import LinkProtocol
from relayd.session import ConsoleSession

TYPING_RATE = 10.0  # keys/s per console, as in the bench's latency phase (phases.py)
# The hub flushes a console's log a random share of LOG_FLUSH_SECONDS after new output.
FLUSH_INTERVAL = LOG_FLUSH_SECONDS * (1 + LOG_FLUSH_MIN_SHARE) / 2


class _Transport:
    """The client's TLS transport: counts what would be encrypted and sent."""

    def __init__(self) -> None:
        self.sent = 0

    def write(self, data: bytes) -> None:
        self.sent += len(data)

    def set_write_buffer_limits(self, high: int | None = None, low: int | None = None) -> None:
        pass

    def close(self) -> None:
        pass

    def abort(self) -> None:
        pass


class _EchoTransport:
    """The port's socket: its far end echoes every byte at once (a shell at a prompt)."""

    def __init__(self, protocol: LinkProtocol) -> None:
        self._protocol = protocol

    def write(self, data: bytes) -> None:
        self._protocol.data_received(data)

    def is_closing(self) -> bool:
        return False


class _EchoLink:
    """A link around the real `LinkProtocol`, as the hub sees one (writer, can_break)."""

    can_break = False

    def __init__(self, publish: Callable[[bytes], None]) -> None:
        self.writer = LinkProtocol()
        self.writer.connection_made(_EchoTransport(self.writer))  # type: ignore[arg-type]
        self.writer.set_consumer(publish)


def _masked(payload: bytes) -> bytes:
    key = random.randbytes(4)
    body = bytes(b ^ key[i % 4] for i, b in enumerate(payload))
    return struct.pack("!BB", 0x82, 0x80 | len(payload)) + key + body


def _flush(hub: ConsoleHub) -> None:
    """What the hub's flush timer does (the timer itself stays armed, and finds less)."""
    assert hub.log is not None
    hub.log.flush()


def _session(hub: ConsoleHub, n: int) -> ConsoleSession:
    session = ConsoleSession(
        transport=_Transport(),  # type: ignore[arg-type]
        hub=hub,
        session_id=f"{n:08x}" + "0" * 24,
        principal=Principal("bench"),
        role="contributor",
        peer="127.0.0.1",
        region="bench",
        output_queue_bytes=1 << 20,
    )
    session.start(want_writer=True, resume_from=None)
    return session


async def measure(keys: int, sessions: int, state: Path) -> dict[str, Any]:
    """Round trips spread over `sessions` consoles, then the console-log flushes apart.

    Flush timers are not given a chance to run while keys are timed: the daemon
    flushes each typing console's log once per flush interval, whatever the key
    rate, so the flush is timed on its own and added at the bench's typing rate.
    """
    limits = LimitsConfig()
    loop = asyncio.get_running_loop()
    pairs = []
    for i in range(sessions):
        vm = VmConfig(id=f"vm{i:05d}", subscription="bench", serial="tcp://127.0.0.1:1")
        hub = ConsoleHub(vm, limits, log_dir=state)
        hub.bind_loop(loop)  # as keeper.keep_port does
        hub.port_opened(_EchoLink(hub.publish))  # type: ignore[arg-type]
        pairs.append((hub, _session(hub, i)))
    frame = _masked(b"k")
    rounds, flushes = [], []
    per_round = keys // 5
    for _ in range(5):
        start = time.process_time()
        for k in range(per_round):
            pairs[k % sessions][1].data_received(frame)
        rounds.append((time.process_time() - start) / per_round)
        for hub, _ in pairs:  # what the timers would have written
            _flush(hub)
        start = time.process_time()
        for hub, session in pairs:
            session.data_received(frame)
            _flush(hub)
        flushes.append((time.process_time() - start) / sessions - rounds[-1])
    for hub, session in pairs:
        session.connection_lost()
        hub.close_log()
    return {
        "round_trip_us": min(rounds) * 1e6,
        "flush_us": min(flushes) * 1e6,
        "rounds_us": [round(r * 1e6, 2) for r in rounds],
    }


def main() -> int:
    """Run and print."""
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--keys", type=int, default=200_000)
    p.add_argument("--sessions", type=int, default=1000)
    args = p.parse_args()
    configure_logging("warning")
    with tempfile.TemporaryDirectory() as tmp:
        try:
            import uvloop
        except ImportError:
            res = asyncio.run(measure(args.keys, args.sessions, Path(tmp)))
        else:
            res = uvloop.run(measure(args.keys, args.sessions, Path(tmp)))
    flushes_per_key = 1 / (FLUSH_INTERVAL * TYPING_RATE)
    total = res["round_trip_us"] + res["flush_us"] * min(1.0, flushes_per_key)
    print(
        f"relayd's own work per keystroke round trip ({args.sessions} consoles, no TLS, "
        f"no sockets): {res['round_trip_us']:.2f} µs (rounds {res['rounds_us']}); "
        f"one console-log flush {res['flush_us']:.2f} µs, one per {FLUSH_INTERVAL} s per "
        f"console; at {TYPING_RATE:g} keys/s: {total:.2f} µs"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
