#!/usr/bin/env python3
"""`make run-cluster`: `make run` as a region: Redis, three gateways and HAProxy in front.

The three simulated VMs of `relayd demo` (exclusive, like QEMU: one client at
a time, so two gateways holding one VM's port would show), redis-server on
loopback, three `relayd serve` processes with a `[cluster]` section
(127.0.0.2, .3 and .4, the dev CA as `peer_ca`) and HAProxy on the `make run`
address running docs/haproxy-relayd.cfg (TCP passthrough, round-robin, PROXY
v2). Prints the `relayd demo` lines, with `web:` on HAProxy, then one
`gateway:` line per gateway, and runs until Ctrl-C or SIGTERM; then it stops
HAProxy, drains the gateways, stops Redis and the VMs, and waits for each.
State, configs and logs go to .relayd-demo-cluster/.

    .venv/bin/python scripts/run-cluster.py [--certs certs/dev] [--listen 127.0.0.1:8443]
"""

from __future__ import annotations

import argparse
import asyncio
import signal
import ssl
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from relayd.certs import init_dev_pki  # noqa: E402 - after the path setup
from relayd.demo import (  # noqa: E402
    GUEST_PASSWORD,
    GUEST_USER,
    VM_IDS,
    config_text,
    summary_lines,
    write_demo_token,
)
from relayd.sim import SimulatedGuest  # noqa: E402
from tests.cluster.processes import (  # noqa: E402
    LB_SOURCE,
    Cluster,
    GatewayProcess,
    ProcessGoneError,
    toml_document,
)

GATEWAYS = 3
LEASE_TTL = "3s"


def _address(text: str) -> tuple[str, int]:
    host, _, port = text.rpartition(":")
    if not host or not port.isdigit():
        raise argparse.ArgumentTypeError(f"expected HOST:PORT, not {text!r}")
    return host, int(port)


async def run(certs: Path, state: Path, listen: tuple[str, int]) -> None:
    """Start the region, print how to reach it, and stop it all on SIGINT/SIGTERM."""
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    cluster = Cluster(
        state,
        size=GATEWAYS,
        python=sys.executable,
        frontend_host=listen[0],
        frontend_port=listen[1],
    )
    # The gateways listen on 127.0.0.2.. and present the dev server certificate
    # to clients and peers alike: it must name those addresses.
    pki = init_dev_pki(certs, names=[g.host for g in cluster.gateways])
    guests = [
        SimulatedGuest(vm_id, user=GUEST_USER, password=GUEST_PASSWORD, exclusive=True)
        for vm_id in VM_IDS
    ]
    try:
        ports = [await guest.start("127.0.0.1", 0) for guest in guests]

        def render(gateway: GatewayProcess) -> str:
            cluster_section = toml_document(
                [
                    (
                        "cluster",
                        {
                            "redis": cluster.redis.url,
                            "gateway_id": gateway.gateway_id,
                            "advertise": gateway.advertise,
                            "peer_ca": pki.ca_cert.resolve(),
                            "lease_ttl": LEASE_TTL,
                        },
                    )
                ]
            )
            return config_text(
                pki_dir=pki.directory.resolve(),
                state_dir=cluster.state_dir(gateway).resolve(),
                listen=gateway.advertise,
                health_listen=f"{gateway.host}:{gateway.health_port}",
                ports=ports,
                gateway_extra=f'trusted_proxies = ["{LB_SOURCE}/32"]\ndrain_seconds = "2s"\n',
                sections=cluster_section,
                generated_by="scripts/run-cluster.py",
            )

        cluster.write_configs(render)
        await cluster.start()
        token, token_file = write_demo_token(pki, state)
        # Ready for a person: every VM owned, and every gateway knows by whom.
        await cluster.wait_routed(ssl.create_default_context(cafile=pki.ca_cert), token)
        first = cluster.gateways[0]
        lines = summary_lines(
            base=f"https://{listen[0]}:{listen[1]}",
            token=token,
            token_file=token_file,
            pki=pki,
            config_path=first.config_path,
            health=f"http://{first.host}:{first.health_port}/readyz",
        )
        lines += [
            f"gateway: {g.gateway_id} https://{g.advertise}/ "
            f"health http://{g.host}:{g.health_port}/readyz pid {g.pid} log {g.log_path}"
            for g in cluster.gateways
        ]
        print("\n".join(lines), flush=True)
        await stop.wait()
    finally:
        await cluster.close()
        for guest in guests:
            await guest.close()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.remove_signal_handler(sig)


def _leaves(group: BaseExceptionGroup[BaseException]) -> list[BaseException]:
    return [
        leaf
        for exc in group.exceptions
        for leaf in (_leaves(exc) if isinstance(exc, BaseExceptionGroup) else [exc])
    ]


def main() -> int:
    """Parse the arguments and run until a signal; 1 when a process would not start."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--certs", type=Path, default=ROOT / "certs" / "dev")
    parser.add_argument("--state-dir", type=Path, default=ROOT / ".relayd-demo-cluster")
    parser.add_argument("--listen", type=_address, default=("127.0.0.1", 8443))
    args = parser.parse_args()
    args.state_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
    failed: list[BaseException] = []
    try:
        asyncio.run(run(args.certs, args.state_dir.resolve(), args.listen))
    except* (ProcessGoneError, TimeoutError) as group:
        failed += _leaves(group)
    for exc in failed:
        print(f"run-cluster: {exc}", file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
