"""Interleaved A/B: relay CPU per keystroke for several relays, typed into by turns.

`bench/run.py` measures one relay after another, minutes apart; on this
host the same work takes up to 1.5x as long from one minute to the next, so
a change worth 5 µs per key is lost in the noise between runs. Here every
relay is started at once (all pinned to the relay core, idle while not typed
into), each gets its own sessions, and short typing windows take turns in
rotation, so every relay sees the same minutes of host weather. The median
over the rounds, and the ratio to the first relay, are the figures.

    python -m bench.ab [--sessions 1000] [--rounds 6] [--seconds 6]
                       [--relayd NAME=SRC_DIR ...] [--pyfloor] [--haproxy]

Without `--relayd`, the working tree's relayd/ is measured (as "relayd").
`--relayd base=/tmp/base/relayd` adds another version, e.g. a `git worktree`
of an older commit, to compare two commits in the same minutes;
`--relayd shm=relayd@/dev/shm` the same version with its console logs on tmpfs.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import statistics
import sys
import tempfile
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench import peers as peers_mod  # noqa: E402
from bench import procfs  # noqa: E402
from bench.backend import Backend  # noqa: E402
from bench.loadgen import Conn, client_context, close_all  # noqa: E402
from bench.machine import GEN_CPU  # noqa: E402
from bench.peers import NICE, kill_all, make_pki, snapshot_relayd  # noqa: E402
from bench.phases import FULL, Ctx, make_peer, open_many, running, type_keys  # noqa: E402


async def _start(
    ctx: Ctx,
    stack: contextlib.AsyncExitStack,
    name: str,
    src: Path | None,
    n: int,
    state: Path | None = None,
) -> tuple[int, list[Conn]]:
    """Start one relay with n echo VMs (relayd) and open n sessions to it."""
    relay = src is not None
    kind = "relayd" if relay else name
    vms = [(f"ab-{i:04d}", ctx.backend.echo_port) for i in range(n)] if relay else []
    if relay:
        peers_mod.RELAYD_SRC = src  # read when the process is spawned
    ctx.relayd_state_dir = state
    peer = make_peer(ctx, kind, vms=vms, backend_port=ctx.backend.echo_port)
    await stack.enter_async_context(running(ctx, peer, echo_vms=len(vms)))
    targets = [peer.target(vm) for vm, _ in vms] if relay else [peer.target()] * n
    conns, tally = await open_many(ctx, targets)
    stack.push_async_callback(close_all, conns)
    if tally.failed or len(conns) < n:
        raise RuntimeError(f"{name}: opened {len(conns)} of {n}: {tally.first_error}")
    return peer.pid, conns


async def main(args: argparse.Namespace) -> int:
    """Start every relay, then rotate typing windows among them."""
    os.sched_setaffinity(0, {GEN_CPU})
    with contextlib.suppress(OSError):
        os.setpriority(os.PRIO_PROCESS, 0, NICE)
    procfs.raise_nofile(200_000)
    workdir = Path(tempfile.mkdtemp(prefix="relayd-ab-"))
    relays: list[tuple[str, Path | None]] = []
    states: dict[str, Path] = {}
    for spec in args.relayd or [f"relayd={ROOT / 'relayd'}"]:
        if spec == "none":  # only the peers
            continue
        name, _, path = spec.partition("=")
        path, _, state = path.partition("@")
        if state:
            states[name] = Path(state) / name
        relays.append((name, snapshot_relayd(workdir / name / "src", Path(path))))
    relays += [("pyfloor", None)] if args.pyfloor else []
    relays += [("haproxy", None)] if args.haproxy else []
    sys.path.insert(0, str(relays[0][1] or ROOT))
    backend = Backend()
    await backend.start()
    ctx = Ctx(backend, make_pki(workdir / "pki"), workdir, FULL, client_context())
    results: dict[str, list[dict[str, Any]]] = {name: [] for name, _ in relays}
    try:
        async with contextlib.AsyncExitStack() as stack:
            started = {}
            for name, src in relays:
                started[name] = await _start(ctx, stack, name, src, args.sessions, states.get(name))
                print(f"{name}: {args.sessions} sessions open", flush=True)
            for r in range(args.rounds):
                order = relays[r % len(relays) :] + relays[: r % len(relays)]
                for name, _ in order:
                    pid, conns = started[name]
                    res = await type_keys(conns, args.rate, 1.0, args.seconds, pid)
                    results[name].append(res)
                    print(
                        f"round {r + 1} {name:>10}: {res['relay_cpu_per_key_us']:6.1f} µs/key, "
                        f"p99 {res['p99_ms']:7.2f} ms",
                        flush=True,
                    )
    finally:
        kill_all()
        await backend.close()
    base = statistics.median(r["relay_cpu_per_key_us"] for r in results[relays[0][0]])
    print(f"\nmedian over {args.rounds} rounds, {args.sessions} sessions x {args.rate:g} keys/s:")
    for name, _ in relays:
        cpu = statistics.median(r["relay_cpu_per_key_us"] for r in results[name])
        p99 = statistics.median(r["p99_ms"] for r in results[name])
        print(f"  {name:>10}: {cpu:6.1f} µs/key ({cpu / base:.2f}x), p99 {p99:.2f} ms")
    return 0


def parse() -> argparse.Namespace:
    """Command line."""
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--sessions", type=int, default=1000)
    p.add_argument("--rate", type=float, default=10.0, help="keys/s per session")
    p.add_argument("--rounds", type=int, default=6)
    p.add_argument("--seconds", type=float, default=6.0, help="measured seconds per window")
    p.add_argument(
        "--relayd",
        action="append",
        help="NAME=DIR[@STATE_DIR] of a relayd package (repeatable), with its state "
        "(console logs) under STATE_DIR, e.g. /dev/shm; none: no relayd",
    )
    p.add_argument("--pyfloor", action="store_true", help="add bench/pyfloor.py")
    p.add_argument("--haproxy", action="store_true", help="add HAProxy")
    return p.parse_args()


def run() -> int:
    """On uvloop, as bench/run.py: the generator's timing shapes the relay's batching."""
    try:
        import uvloop
    except ImportError:
        return asyncio.run(main(parse()))
    return uvloop.run(main(parse()))


if __name__ == "__main__":
    sys.exit(run())
