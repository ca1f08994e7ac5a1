"""How long one cluster gateway's ownership round holds its event loop.

    .venv/bin/python -m bench.rounds [--vms 2000] [--rounds 20]

A round reads every VM's lease, decides, and renews what it holds: at thousands
of VMs that is milliseconds of Python, and a keystroke arriving meanwhile waits
for the longest stretch without an await. This starts a redis-server (unix
socket, temporary directory), spreads `--vms` VMs over three gateways by
rendezvous hashing (their leases claimed in Redis), and runs gateway gw-1's
node through `--rounds` rounds while a ticker task records the gaps between its
turns on the loop. Prints the CPU per round and the longest gaps (ms).
"""

from __future__ import annotations

import argparse
import asyncio
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Collection, Mapping
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from relayd.cluster.node import ClusterNode, Outbox  # noqa: E402
from relayd.cluster.ownership import preferred_owner  # noqa: E402
from relayd.cluster.store import ClusterStore  # noqa: E402
from relayd.config import VmConfig  # noqa: E402
from relayd.hub import ConsoleHub  # noqa: E402

GATEWAYS = ("gw-1", "gw-2", "gw-3")


class _Owner:
    """The node's gateway: the VMs, and no port is ever opened (gw-1 holds its share)."""

    def __init__(self, vms: dict[str, VmConfig]) -> None:
        self.vms = vms

    def configured_vms(self) -> Mapping[str, VmConfig]:
        return self.vms

    def open_hub(self, vm: VmConfig, history: tuple[int, bytes], sink: Outbox) -> ConsoleHub:
        raise AssertionError("every VM is claimed before the rounds")

    def close_hub(self, vm_id: str, reason: str) -> None:
        raise AssertionError(f"{vm_id} dropped: {reason}")

    def switches_changed(self) -> None:
        pass

    def owners_changed(self, vms: Collection[str]) -> None:
        pass


async def measure(socket_path: Path, n_vms: int, rounds: int) -> None:
    vms = {
        f"vm-{i:05d}": VmConfig(id=f"vm-{i:05d}", subscription="s", serial="tcp://127.0.0.1:1")
        for i in range(n_vms)
    }
    url = f"unix://{socket_path}?db=0"
    stores = {g: ClusterStore(url, gateway_id=g, prefix="relayd:{bench}:") for g in GATEWAYS}
    node = ClusterNode(
        _Owner(vms),
        stores["gw-1"],
        gateway_id="gw-1",
        advertise="127.0.0.1:1",
        lease_ttl=3.0,
        ring_bytes=1 << 20,
        log_bytes=1 << 20,
    )
    for gateway, store in stores.items():
        await store.heartbeat(f"{gateway}:1")
    for vm in vms:
        owner = preferred_owner(vm, GATEWAYS)
        token = await stores[owner].claim(vm)
        assert token is not None
        if owner == "gw-1":
            node.held[vm] = token
    gaps: list[float] = []
    done = asyncio.Event()

    async def ticker() -> None:
        last = time.perf_counter()
        while not done.is_set():
            await asyncio.sleep(0)
            now = time.perf_counter()
            gaps.append(now - last)
            last = now

    ticking = asyncio.create_task(ticker())
    cpu = time.process_time()
    for _ in range(rounds):
        for gateway in GATEWAYS[1:]:
            await stores[gateway].heartbeat(f"{gateway}:1")
        await node.round()
    cpu = time.process_time() - cpu
    done.set()
    await ticking
    for store in stores.values():
        await store.close()
    longest = sorted(gaps)[-5:]
    print(
        f"{n_vms} VMs, {len(node.held)} held, {node.stats.rounds} rounds: "
        f"{cpu / rounds * 1e3:.1f} ms CPU per round (with the ticker); "
        f"longest loop stalls {', '.join(f'{g * 1e3:.2f}' for g in longest)} ms"
    )


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--vms", type=int, default=2000)
    p.add_argument("--rounds", type=int, default=20)
    args = p.parse_args()
    binary = shutil.which("redis-server")
    if binary is None:
        print("redis-server is not installed", file=sys.stderr)
        return 2
    with tempfile.TemporaryDirectory(prefix="relayd-rounds-") as tmp:
        sock = Path(tmp) / "redis.sock"
        proc = subprocess.Popen(
            [binary, "--port", "0", "--unixsocket", str(sock), "--save", "", "--appendonly", "no"],
            stdout=subprocess.DEVNULL,
        )
        try:
            deadline = time.monotonic() + 10
            while not sock.exists():
                if time.monotonic() > deadline or proc.poll() is not None:
                    print("redis-server did not start", file=sys.stderr)
                    return 2
                time.sleep(0.05)
            try:
                import uvloop

                uvloop.run(measure(sock, args.vms, args.rounds))
            except ImportError:
                asyncio.run(measure(sock, args.vms, args.rounds))
        finally:
            proc.terminate()
            proc.wait()
    return 0


if __name__ == "__main__":
    sys.exit(main())
