"""Cluster timings: cross-gateway takeover and failover after `kill -9`, on real processes.

    .venv/bin/python -m bench.cluster [--takeovers 100] [--kills 20] [--restarts 10]

The region is tests/cluster/harness.py's: redis-server, three `relayd serve`
processes (lease_ttl 3 s) and HAProxy running docs/haproxy-relayd.cfg, over
QEMU-like serial ends (one client at a time). Nothing is pinned: the numbers
include whatever else the machine runs, so read them as upper bounds.

- **takeover**: a writer attached through one gateway, a newcomer through
  another (every ordered pair in turn, so most hops are forwarded). Timed from
  the newcomer's connect to the later of: the old writer's 4001 close, and the
  newcomer's first keystroke reaching the port. Target ≤ 200 ms p99.
- **failover**: a writer attached through HAProxy to a VM; its owner is
  killed with SIGKILL. Timed from the kill to the writer, reconnecting through
  HAProxy with `?from=` its last offset (retrying every 50 ms while nothing
  answers or the port is down), having a keystroke reach the port. The killed
  gateway is started again and the region left to settle before the next
  kill. Target ≤ 5 s p99.
- **deploy**: a writer attached through one gateway to a VM another owns; the
  owner is restarted cleanly (SIGTERM, drain, start again, and the region
  left to settle: the VM moves away and back). The writer must stay connected
  throughout. Timed from the SIGTERM to its keystroke, sent as soon as it is
  told `port_down` (and held while the VM moves), reaching the port.

Results go to bench/results/cluster-<timestamp>.json and a markdown table on
stdout (for docs/benchmarks.md).
"""

from __future__ import annotations

import argparse
import asyncio
import datetime
import itertools
import json
import math
import secrets
import ssl
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import trustme
from websockets.exceptions import ConnectionClosed, InvalidHandshake

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from tests.cluster.harness import (  # noqa: E402
    LB,
    LEASE_TTL,
    VM_IDS,
    Region,
    gateway_certificates,
    gateway_config,
)
from tests.cluster.processes import START_TIMEOUT, Cluster, SerialEnd  # noqa: E402
from tests.conftest import Console  # noqa: E402

RESULTS = ROOT / "bench" / "results"
RETRY_S = 0.05


def percentile(values: list[float], q: float) -> float:
    """Nearest-rank percentile (q in 0..100) of a non-empty list."""
    ordered = sorted(values)
    rank = max(1, min(len(ordered), math.ceil(q / 100 * len(ordered))))
    return ordered[rank - 1]


def summary(values: list[float]) -> dict[str, float]:
    """p50/p99/max/mean in milliseconds."""
    ms = [v * 1000 for v in values]
    return {
        "n": len(ms),
        "p50_ms": round(statistics.median(ms), 1),
        "p99_ms": round(percentile(ms, 99), 1),
        "max_ms": round(max(ms), 1),
        "mean_ms": round(statistics.fmean(ms), 1),
    }


async def start_region(directory: Path) -> Region:
    """The test region, certificates from a throwaway CA."""
    ca = trustme.CA()
    pki = directory / "pki"
    pki.mkdir()
    ca.cert_pem.write_to_path(str(pki / "ca.crt"))
    (pki / "hs256.key").write_text(secrets.token_hex(32))
    ends = {vm: SerialEnd(vm) for vm in VM_IDS}
    for end in ends.values():
        await end.start()
    cluster = Cluster(directory, python=sys.executable)
    certs = gateway_certificates(ca, cluster, pki)
    cluster.write_configs(
        lambda g: gateway_config(
            g,
            cluster=cluster,
            ends=ends,
            cert=certs[g.gateway_id][0],
            key=certs[g.gateway_id][1],
            ca=pki / "ca.crt",
            secret=pki / "hs256.key",
        )
    )
    await cluster.start()
    ctx = ssl.create_default_context(cafile=str(pki / "ca.crt"))
    return Region(cluster, ends, ctx, (pki / "hs256.key").read_bytes().strip())


async def stop_region(region: Region) -> None:
    """Everything the region started, stopped and reaped."""
    await region.cluster.close()
    for end in region.ends.values():
        await end.close()


async def one_takeover(region: Region, vm: str, first: Any, second: Any, n: int) -> float:
    """Seconds from the newcomer's connect to: old writer closed 4001 and new input at the port."""
    end = region.ends[vm]
    async with region.console(first, vm, user="alice") as old:
        marker = f"takeover-{n}-{secrets.token_hex(4)}".encode()
        started = time.perf_counter()
        async with region.console(second, vm, user="bob") as new:
            await new.send(marker + b"\r")
            closed, _ = await asyncio.gather(old.closed(), end.wait_received(marker, START_TIMEOUT))
            done = time.perf_counter()
            if closed[0] != 4001:
                raise AssertionError(f"old writer closed with {closed}, not 4001")
    return done - started


async def bench_takeovers(region: Region, count: int) -> list[float]:
    """`count` takeovers across every ordered pair of gateways, on one VM."""
    vm = "vm-0"
    await region.wait_settled()
    pairs = itertools.cycle(itertools.permutations(region.gateways, 2))
    times = []
    for n in range(count):
        first, second = next(pairs)
        times.append(await one_takeover(region, vm, first, second, n))
    return times


async def resume_typing(region: Region, vm: str, offset: int, marker: bytes) -> None:
    """Reconnect through HAProxy with ?from=offset until a keystroke reaches the port."""
    end = region.ends[vm]
    while True:
        try:
            async with region.console(LB, vm, query=f"from={offset}") as console:
                if console.hello.get("port") == "down":
                    await console.control(type="notice", event="port_up")
                await console.send(marker + b"\r")
                await end.wait_received(marker, 2.0)
                return
        except (OSError, TimeoutError, AssertionError, ConnectionClosed, InvalidHandshake):
            await asyncio.sleep(RETRY_S)  # the service is down: that is what is measured


async def one_failover(region: Region, vm: str, n: int) -> float:
    """Seconds from SIGKILL of the VM's owner to the resumed writer's keystroke at the port."""
    owner = (await region.wait_settled())[vm]
    console: Console
    async with region.console(owner, vm, user="alice") as console:
        await console.send(f"before-{n}\r".encode())
        await console.expect(f"before-{n}".encode())
        offset = console.hello["offset"] - console.hello["replay"] + len(console.output)
        started = time.perf_counter()
        owner.kill()
        await resume_typing(region, vm, offset, f"after-{n}-{secrets.token_hex(4)}".encode())
        done = time.perf_counter()
    await owner.wait_exit()
    await owner.start(region.cluster.python)
    await region.wait_settled()  # the rejoined gateway has its share back
    return done - started


async def bench_failovers(region: Region, count: int) -> list[float]:
    """`count` kills of whichever gateway owns the VM, each followed by its restart."""
    times = []
    for n in range(count):
        vm = VM_IDS[n % len(VM_IDS)]
        times.append(await one_failover(region, vm, n))
        print(f"failover {n + 1}/{count}: {times[-1] * 1000:.0f} ms", file=sys.stderr)
    return times


async def one_restart(region: Region, vm: str, n: int) -> float:
    """Seconds from SIGTERM of the VM's owner to a relayed writer's held keystroke at the port."""
    end = region.ends[vm]
    owner = (await region.wait_settled())[vm]
    via = region.others(owner)[0]
    async with region.console(via, vm, user="alice") as console:
        await console.send(f"before-{n}\r".encode())
        await console.expect(f"before-{n}".encode())
        marker = f"deploy-{n}-{secrets.token_hex(4)}".encode()
        started = time.perf_counter()
        stopping = asyncio.ensure_future(owner.stop())
        await console.control(type="notice", event="port_down")
        await console.send(marker + b"\r")
        await end.wait_received(marker, START_TIMEOUT)
        done = time.perf_counter()
        await stopping
        await owner.start(region.cluster.python)
        await region.wait_settled()  # the VM moves back to it: the writer follows again
        await console.send(f"back-{n}\r".encode())
        await end.wait_received(f"back-{n}".encode(), START_TIMEOUT)
        if console.ws.protocol.close_rcvd is not None:
            raise AssertionError(f"the relayed writer was closed: {console.ws.protocol.close_rcvd}")
    return done - started


async def bench_restarts(region: Region, count: int) -> list[float]:
    """`count` clean restarts of whichever gateway owns the VM."""
    times = []
    for n in range(count):
        vm = VM_IDS[n % len(VM_IDS)]
        times.append(await one_restart(region, vm, n))
        print(f"deploy {n + 1}/{count}: {times[-1] * 1000:.0f} ms", file=sys.stderr)
    return times


async def main(args: argparse.Namespace) -> int:
    """Start a region, run both measurements, write the results."""
    with tempfile.TemporaryDirectory(prefix="relayd-bench-cluster-") as tmp:
        region = await start_region(Path(tmp))
        try:
            takeovers = await bench_takeovers(region, args.takeovers)
            failovers = await bench_failovers(region, args.kills)
            restarts = await bench_restarts(region, args.restarts)
        finally:
            await stop_region(region)
    results = {
        "when": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "lease_ttl": LEASE_TTL,
        "takeover": summary(takeovers),
        "failover": summary(failovers),
        "deploy": summary(restarts),
        "raw": {"takeover_s": takeovers, "failover_s": failovers, "deploy_s": restarts},
    }
    RESULTS.mkdir(parents=True, exist_ok=True)
    stamp = datetime.datetime.now().strftime("%Y%m%d-%H%M%S")
    (RESULTS / f"cluster-{stamp}.json").write_text(json.dumps(results, indent=2))
    t, f, d = results["takeover"], results["failover"], results["deploy"]
    print("| measure | n | p50 | p99 | max | target |")
    print("|---|---|---|---|---|---|")
    print(
        f"| cross-gateway takeover | {t['n']} | {t['p50_ms']} ms | {t['p99_ms']} ms "
        f"| {t['max_ms']} ms | ≤ 200 ms p99 |"
    )
    print(
        f"| failover after kill -9 (lease_ttl {LEASE_TTL}) | {f['n']} | {f['p50_ms']} ms "
        f"| {f['p99_ms']} ms | {f['max_ms']} ms | ≤ 5 s p99 |"
    )
    print(
        f"| relayed writer's keystroke across a clean restart of the owner | {d['n']} "
        f"| {d['p50_ms']} ms | {d['p99_ms']} ms | {d['max_ms']} ms | stays connected |"
    )
    return 0


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--takeovers", type=int, default=100)
    parser.add_argument("--kills", type=int, default=20)
    parser.add_argument("--restarts", type=int, default=10)
    sys.exit(asyncio.run(main(parser.parse_args())))
