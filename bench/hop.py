"""The cluster's forwarded hop: keystrokes typed to the VM's owner against through another gateway.

    .venv/bin/python -m bench.hop [--gateways 3] [--typists 1000] [--seconds 10] [--rounds 2]

Starts redis-server (a unix socket in a temporary directory) and 2 or 3
`relayd serve` processes in cluster mode on 127.0.0.2.. (lease_ttl 3 s), all
with the same VM list: 2 x typists echo VMs and `--flood-vms` flood VMs whose
serial ports are the bench's echo and flood servers (bench/backend.py). Each
gateway has its own certificate (CN = its id, serverAuth and clientAuth, from
a throwaway CA that is also `peer_ca`). Once every VM is owned (`/v1/vms` on
every gateway says `up` or `remote` for each, and the owners agree):

* **typing**: the first `typists` VMs get a session at their owner
  (`local`), the other `typists` a session at a gateway that does not own
  them (`forwarded`, relayed over a peer link). Both sets stay open; typing
  windows take turns (local, round_robin, forwarded, forwarded, round_robin,
  local, ...; `round_robin` types on every other session of each set: as many
  typists, half of them forwarded, as HAProxy round-robin makes it), each set at
  `--rate` keys/s per session as bench/phases.py's keystroke phase types.
  Per case: p50/p99 of the round trips, relay CPU per key summed over every
  relayd process, redis-server's CPU, and Redis commands per second
  (INFO commandstats) in the same window. A window with nobody typing first
  gives the idle rate: the ownership rounds and heartbeats.
* **flood**: `--flood-vms` VMs print as fast as their clients read (one
  session each, at the owner): Redis commands, appends and bytes appended
  per second, and bytes delivered per second. Bytes appended are Redis's count
  (`logmeta` field `appended`); the gateways' own counter is reported beside
  it as acknowledged: it misses every append answered after the gateway's 1 s
  deadline, stored all the same, which at full load was every one of them.

The relays and redis-server are pinned to CPU 0, this process (generator
and echo/flood servers) to CPU 1, as bench/run.py does. Results go to
bench/results/hop-<UTC>.json and a summary on stdout.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import datetime
import json
import os
import secrets
import shutil
import statistics
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from bench import machine, procfs  # noqa: E402
from bench import peers as peers_mod  # noqa: E402
from bench.backend import Backend, FloodGroup  # noqa: E402
from bench.loadgen import (  # noqa: E402
    Conn,
    Tally,
    Target,
    bounded_gather,
    client_context,
    close_all,
    open_conn,
)
from bench.peers import (  # noqa: E402
    AUDIENCE,
    ISSUER,
    NICE,
    RELAYD,
    kill_all,
    relayd_env,
    relayd_source,
    snapshot_relayd,
    spawn,
    terminate,
)
from bench.phases import type_keys  # noqa: E402

RESULTS = ROOT / "bench" / "results"
REGION = "bench"
LEASE_TTL = "3s"
SETTLE_TIMEOUT = 120.0
OPEN_CONC = 50
CLIENT_COMMANDS = frozenset(
    ("evalsha", "eval", "mget", "hgetall", "subscribe", "ping", "script|load", "info")
)
"""What relayd (and this sampler) send themselves; the rest run inside Lua scripts."""


def parse(argv: list[str] | None = None) -> argparse.Namespace:
    """The command line."""
    p = argparse.ArgumentParser(prog="python -m bench.hop", description=__doc__.split("\n\n")[0])
    p.add_argument("--gateways", type=int, default=3, choices=(2, 3))
    p.add_argument("--typists", type=int, default=1000, help="sessions per case")
    p.add_argument("--rate", type=float, default=10.0, help="keys/s per session")
    p.add_argument("--warmup", type=float, default=3.0, help="seconds typed before each window")
    p.add_argument("--seconds", type=float, default=10.0, help="measured seconds per window")
    p.add_argument("--rounds", type=int, default=2, help="windows per case (taking turns)")
    p.add_argument("--idle-seconds", type=float, default=10.0, help="window with nobody typing")
    p.add_argument("--flood-vms", type=int, default=50, help="0: no flood")
    p.add_argument("--flood-seconds", type=float, default=20.0)
    p.add_argument("--no-pin", action="store_true", help="let every process use both CPUs")
    p.add_argument("--keep", action="store_true", help="keep the gateways' logs and configs")
    p.add_argument(
        "--relayd", type=Path, default=ROOT / "relayd", help="the relayd package to run (a copy)"
    )
    return p.parse_args(argv)


# -- the region ---------------------------------------------------------------------------------


@dataclass
class Gateway:
    """One `relayd serve` in cluster mode."""

    gid: str
    host: str
    port: int
    health_port: int
    config: Path
    log: Path
    proc: Any = None

    @property
    def pid(self) -> int:
        """Its process id (taskset and nice exec it)."""
        return int(self.proc.pid)


def _free_port(host: str) -> int:
    import socket

    with socket.socket() as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


def make_pki(directory: Path, gateways: list[Gateway]) -> tuple[Path, bytes]:
    """A throwaway CA (`peer_ca`) and per gateway a certificate: CN = its id, both EKUs."""
    import trustme

    ca = trustme.CA()
    directory.mkdir(parents=True)
    ca.cert_pem.write_to_path(str(directory / "ca.crt"))
    for g in gateways:
        issued = ca.issue_cert("localhost", "127.0.0.1", g.host, common_name=g.gid)
        issued.private_key_pem.write_to_path(str(directory / f"{g.gid}.key"))
        issued.cert_chain_pems[0].write_to_path(str(directory / f"{g.gid}.crt"))
    secret = secrets.token_hex(32).encode()
    (directory / "hs256.key").write_bytes(secret)
    return directory, secret


def write_config(
    g: Gateway, pki: Path, redis_url: str, vms: list[tuple[str, int]], state: Path
) -> None:
    """The gateway's TOML: bench/peers.py's relayd settings plus `[cluster]`."""
    q = json.dumps
    limits = {
        "output_bytes_per_s": 4 * 2**30,
        "connections_per_second_per_ip": 1_000_000,
        "max_sessions_per_principal": 1_000_000,
        "max_handshakes": 0,
        "max_handshakes_per_ip": 0,
    }
    lines = [
        "[gateway]",
        f"region = {q(REGION)}",
        f"listen = {q(f'{g.host}:{g.port}')}",
        f"health_listen = {q(f'{g.host}:{g.health_port}')}",
        f"state_dir = {q(str(state))}",
        "[tls]",
        f"cert = {q(str(pki / f'{g.gid}.crt'))}",
        f"key = {q(str(pki / f'{g.gid}.key'))}",
        "[auth]",
        f"issuer = {q(ISSUER)}",
        f"audience = {q(AUDIENCE)}",
        f"hs256_secret_file = {q(str(pki / 'hs256.key'))}",
        "[limits]",
        *(f"{k} = {q(v)}" for k, v in limits.items()),
        "[cluster]",
        f"redis = {q(redis_url)}",
        f"gateway_id = {q(g.gid)}",
        f"advertise = {q(f'{g.host}:{g.port}')}",
        f"peer_ca = {q(str(pki / 'ca.crt'))}",
        f"lease_ttl = {q(LEASE_TTL)}",
        "[[subscriptions]]",
        'id = "sub-1"',
    ]
    for vm, port in vms:
        lines += ["[[vms]]", f"id = {q(vm)}", 'subscription = "sub-1"',
                  f"serial = {q(f'tcp://127.0.0.1:{port}')}"]  # fmt: skip
    lines += ["[[role_assignments]]", 'principal = "user:bench"', 'role = "contributor"',
              'scope = "/subscriptions/sub-1"']  # fmt: skip
    g.config.write_text("\n".join(lines) + "\n")


async def http_get(
    host: str, port: int, path: str, *, tls: bool = False, token: str = ""
) -> tuple[int, bytes]:
    """One GET (health listener, or the TLS listener with a bearer token)."""
    ctx = client_context() if tls else None
    reader, writer = await asyncio.open_connection(
        host, port, ssl=ctx, server_hostname="localhost" if tls else None
    )
    try:
        auth = f"Authorization: Bearer {token}\r\n" if token else ""
        writer.write(f"GET {path} HTTP/1.1\r\nHost: b\r\n{auth}Connection: close\r\n\r\n".encode())
        async with asyncio.timeout(10):
            data = await reader.read(-1)
    finally:
        writer.close()
    head, _, body = data.partition(b"\r\n\r\n")
    status = int(head.split(b" ", 2)[1]) if head.startswith(b"HTTP/") else 0
    if b"chunked" in head.lower():
        body = _unchunk(body)
    return status, body


def _unchunk(body: bytes) -> bytes:
    out, i = bytearray(), 0
    while True:
        j = body.index(b"\r\n", i)
        size = int(body[i:j].split(b";")[0], 16)
        if not size:
            return bytes(out)
        out += body[j + 2 : j + 2 + size]
        i = j + 4 + size


async def poll(probe: Callable[[], Awaitable[bool]], what: str, within: float) -> None:
    """Call `probe` every 0.2 s until true (another process has no event to wait on).

    Raises:
        TimeoutError: not true within `within` seconds.
    """
    try:
        async with asyncio.timeout(within):
            while True:
                with contextlib.suppress(OSError, ValueError, IndexError):
                    if await probe():
                        return
                await asyncio.sleep(0.2)
    except TimeoutError:
        raise TimeoutError(f"{what}: not after {within:.0f} s") from None


async def owners(gateways: list[Gateway], token: str, vm_ids: set[str]) -> dict[str, str] | None:
    """VM -> owning gateway id when every gateway sees every VM owned, and they agree."""
    seen: dict[str, str] = {}
    for g in gateways:
        status, body = await http_get(g.host, g.port, "/v1/vms", tls=True, token=token)
        if status != 200:
            return None
        for vm in json.loads(body)["vms"]:
            if vm["id"] not in vm_ids:
                continue
            if vm["port"] == "up":
                owner = g.gid
            elif vm["port"] == "remote" and vm.get("owner"):
                owner = vm["owner"]
            else:
                return None
            if seen.setdefault(vm["id"], owner) != owner:
                return None
    return seen if set(seen) == vm_ids else None


# -- measurements -------------------------------------------------------------------------------


class Sampler:
    """Relay CPU (every gateway), redis-server CPU and Redis command counts between two reads."""

    def __init__(self, gateways: list[Gateway], redis_pid: int, redis_sock: Path) -> None:
        import redis.asyncio as aioredis

        self.gateways = gateways
        self.redis_pid = redis_pid
        self.redis = aioredis.Redis(unix_socket_path=str(redis_sock))

    async def read(self) -> dict[str, Any]:
        """One reading (INFO first: its own command is counted once, before the clock)."""
        stats = await self.redis.info("commandstats")
        calls = {k.removeprefix("cmdstat_"): int(v["calls"]) for k, v in stats.items()}
        net = await self.redis.info("stats")
        return {
            "net_in": int(net["total_net_input_bytes"]),
            "t": time.perf_counter(),
            "relay": [procfs.cpu_seconds(g.pid) for g in self.gateways],
            "redis": procfs.cpu_seconds(self.redis_pid),
            "calls": calls,
        }

    async def log_appended(self, logmeta_keys: list[str]) -> int | None:
        """Bytes these VMs' shared logs ever stored, as Redis counts them (None: not counted,
        a relayd from before the count)."""
        async with self.redis.pipeline(transaction=False) as pipe:
            for key in logmeta_keys:
                pipe.hget(key, "appended")
            values = await pipe.execute()
        if all(v is None for v in values):
            return None
        return sum(int(v or 0) for v in values)

    async def metric(self, name: str) -> float:
        """A gauge or counter from every gateway's /metrics, summed (`name` may end in
        its labels: ``x_total{call="append"}``)."""
        total = 0.0
        for g in self.gateways:
            _, body = await http_get(g.host, g.health_port, "/metrics")
            for line in body.decode().splitlines():
                if line.startswith(name + " ") or line.startswith(name + "{"):
                    total += float(line.rsplit(" ", 1)[1])
        return total

    @staticmethod
    def diff(a: dict[str, Any], b: dict[str, Any]) -> dict[str, Any]:
        """Rates between two readings (the INFO calls themselves taken out)."""
        wall = b["t"] - a["t"]
        calls = {k: v - a["calls"].get(k, 0) for k, v in b["calls"].items()}
        calls["info"] = calls.get("info", 0) - 2
        calls = {k: v for k, v in calls.items() if v > 0}
        # The commands a script runs (GET, XADD, ...) are counted too; relayd itself sends
        # EVALSHA (every lease, heartbeat and append) and MGET (the leases, once a round).
        per_s = {k: round(v / wall, 1) for k, v in sorted(calls.items(), key=lambda kv: -kv[1])}
        client = sum(v for k, v in calls.items() if k in CLIENT_COMMANDS)
        relay = [y - x for x, y in zip(a["relay"], b["relay"], strict=True)]
        return {
            "window_s": round(wall, 3),
            "relay_cpu_s": round(sum(relay), 3),
            "relay_cpu_by_gateway_s": [round(r, 2) for r in relay],
            "redis_cpu_s": round(b["redis"] - a["redis"], 3),
            "redis_in_mb_per_s": round((b["net_in"] - a["net_in"]) / wall / 1e6, 2),
            "redis_commands_per_s": round(sum(calls.values()) / wall, 1),
            "redis_client_commands_per_s": round(client / wall, 1),
            "redis_calls_per_s": per_s,
        }


async def measured(
    sampler: Sampler, delay: float, seconds: float, work: Awaitable[dict[str, Any]]
) -> tuple[dict[str, Any], dict[str, Any]]:
    """Run `work` and, `delay` s into it, read the sampler for `seconds`."""

    async def window() -> dict[str, Any]:
        await asyncio.sleep(delay)
        a = await sampler.read()
        await asyncio.sleep(seconds)
        b = await sampler.read()
        return Sampler.diff(a, b)

    async with asyncio.TaskGroup() as tg:
        w = tg.create_task(window())
        r = tg.create_task(_awaited(work))
    return r.result(), w.result()


async def _awaited(work: Awaitable[dict[str, Any]]) -> dict[str, Any]:
    return await work


async def open_sessions(targets: list[Target]) -> list[Conn]:
    """Open every session (bounded concurrency).

    Raises:
        RuntimeError: one could not be opened.
    """
    tally = Tally()
    ctx = client_context()
    conns = await bounded_gather(
        [lambda t=t: open_conn(t, ctx) for t in targets], OPEN_CONC, tally, stop_on_error=True
    )
    opened = [c for c in conns if c is not None]
    if tally.failed:
        await close_all(opened)
        raise RuntimeError(f"opened {len(opened)} of {len(targets)}: {tally.first_error}")
    return opened


def target(g: Gateway, vm: str, token: str) -> Target:
    """An interactive console of `vm` through gateway `g`."""
    return Target(
        "ws",
        g.host,
        g.port,
        f"/v1/vms/{vm}/console?mode=interactive",
        (("Sec-WebSocket-Protocol", "relayd.console.v1"), ("Authorization", f"Bearer {token}")),
        expect_hello=True,
    )


async def typing(
    args: argparse.Namespace, sampler: Sampler, cases: dict[str, list[Conn]], pid: int
) -> dict[str, Any]:
    """Windows taking turns between the cases (ABBA...): each case's rounds and medians."""
    names = list(cases)
    order: list[str] = []
    for r in range(args.rounds):
        order += names if r % 2 == 0 else names[::-1]
    rounds: dict[str, list[dict[str, Any]]] = {n: [] for n in names}
    for name in order:
        conns = cases[name]
        keys, win = await measured(
            sampler,
            args.warmup,
            args.seconds,
            type_keys(conns, args.rate, args.warmup, args.seconds, pid),
        )
        for k in list(keys):  # one relayd's CPU: replaced by the sum over all of them
            if k.startswith(("relay_cpu", "cpu", "other_cpu", "foreign_cpu")):
                del keys[k]
        sent = keys["keys_sent"] * win["window_s"] / keys["seconds"]
        res = keys | win
        res["relay_cpu_per_key_us"] = round(1e6 * win["relay_cpu_s"] / max(1.0, sent), 1)
        res["redis_cpu_per_key_us"] = round(1e6 * win["redis_cpu_s"] / max(1.0, sent), 1)
        rounds[name].append(res)
        print(
            f"{name:>9}: p50 {res['p50_ms']:.2f} ms, p99 {res['p99_ms']:.2f} ms, "
            f"{res['relay_cpu_per_key_us']:.1f} µs relay CPU/key "
            f"(redis {res['redis_cpu_per_key_us']:.1f}), "
            f"Redis {res['redis_client_commands_per_s']:.0f} client cmd/s "
            f"({res['redis_commands_per_s']:.0f} with scripts'), lost {res['lost']}",
            flush=True,
        )
    out: dict[str, Any] = {}
    for name, rs in rounds.items():
        med = {
            k: round(statistics.median(r[k] for r in rs), 2)
            for k in ("p50_ms", "p99_ms", "relay_cpu_per_key_us", "redis_cpu_per_key_us",
                      "redis_commands_per_s", "redis_client_commands_per_s")
        }  # fmt: skip
        med["samples"] = sum(r["samples"] for r in rs)
        med["lost"] = sum(r["lost"] for r in rs)
        out[name] = {"median": med, "rounds": rs}
    return out


APPENDED = "relayd_cluster_log_appended_bytes_total"
FAILED_APPENDS = 'relayd_cluster_redis_errors_total{call="append"}'


def flood_rates(
    window_s: float, delivered: int, stored: int | None, acknowledged: float, failed: float
) -> dict[str, Any]:
    """The flood's figures from what changed in the window (bytes, and failed appends).

    Appended is what Redis stored (`stored`), not what the gateways saw acknowledged.
    """
    return {
        "delivered_mb_per_s": round(delivered / window_s / 1e6, 2),
        "appended_mb_per_s": None if stored is None else round(stored / window_s / 1e6, 2),
        "acknowledged_mb_per_s": round(acknowledged / window_s / 1e6, 2),
        "failed_appends": int(failed),
    }


async def flood(
    args: argparse.Namespace,
    sampler: Sampler,
    backend: Backend,
    targets: list[Target],
    logmeta_keys: list[str],
) -> dict[str, Any]:
    """`--flood-vms` VMs printing as fast as their clients read: Redis and bytes per second."""
    conns = await open_sessions(targets)
    groups: list[FloodGroup] = backend.new_groups(len(conns), 1 << 50)
    try:
        for c, g in zip(conns, groups, strict=True):
            g.clients = [c]
            c.sink = lambda _n, g=g: g.progress()
            c.send_input(f"F{g.gid}\n".encode())
        async with asyncio.timeout(30):
            await asyncio.gather(*(g.attached for g in groups))
        for g in groups:
            g.start()
        await asyncio.sleep(2.0)
        acked0, failed0 = await sampler.metric(APPENDED), await sampler.metric(FAILED_APPENDS)
        stored0 = await sampler.log_appended(logmeta_keys)
        rx0 = sum(c.rx for c in conns)
        a = await sampler.read()
        await asyncio.sleep(args.flood_seconds)
        b = await sampler.read()
        rx1 = sum(c.rx for c in conns)
        stored1 = await sampler.log_appended(logmeta_keys)
        acked1, failed1 = await sampler.metric(APPENDED), await sampler.metric(FAILED_APPENDS)
    finally:
        backend.drop_groups(groups)
        await close_all(conns)
    res = Sampler.diff(a, b)
    stored = None if stored0 is None or stored1 is None else stored1 - stored0
    res |= flood_rates(res["window_s"], rx1 - rx0, stored, acked1 - acked0, failed1 - failed0)
    res["relay_cpu_per_gb_s"] = round(res["relay_cpu_s"] / max(1e-9, (rx1 - rx0) / 1e9), 2)
    res["vms"] = len(conns)
    print(
        f"flood {len(conns)} VMs: {res['delivered_mb_per_s']} MB/s delivered, "
        f"{res['appended_mb_per_s']} MB/s appended ({res['acknowledged_mb_per_s']} acknowledged "
        f"to the gateways, {res['failed_appends']} failed appends); "
        f"Redis {res['redis_calls_per_s']}",
        flush=True,
    )
    return res


# -- the run ------------------------------------------------------------------------------------


async def main(args: argparse.Namespace) -> int:
    """Start the region, measure, write the results, stop everything."""
    relay_cpu = "0,1" if args.no_pin else peers_mod.RELAY_CPU
    if not args.no_pin:
        os.sched_setaffinity(0, {machine.GEN_CPU})
    with contextlib.suppress(OSError):
        os.setpriority(os.PRIO_PROCESS, 0, NICE)
    procfs.raise_nofile(200_000)
    work = Path(tempfile.mkdtemp(prefix="relayd-hop-"))
    src = snapshot_relayd(work / "src", args.relayd)
    peers_mod.RELAYD_SRC = src
    sys.path.insert(0, str(src))
    from relayd.auth import issue_token
    from relayd.cluster.store import key_prefix

    n = args.typists
    names = [f"gw-{i + 1}" for i in range(args.gateways)]
    gateways = [
        Gateway(gid, f"127.0.0.{i + 2}", 0, 0, work / f"{gid}.toml", work / f"{gid}.log")
        for i, gid in enumerate(names)
    ]
    for g in gateways:
        g.port, g.health_port = _free_port(g.host), _free_port(g.host)
    pki, secret = make_pki(work / "pki", gateways)
    token = issue_token(secret, issuer=ISSUER, audience=AUDIENCE, sub="bench", ttl=6 * 3600)
    backend = Backend()
    await backend.start()
    echo_vms = [f"e-{i:05d}" for i in range(2 * n)]
    flood_vms = [f"flood-{i:02d}" for i in range(args.flood_vms)]
    vms = [(v, backend.echo_port) for v in echo_vms] + [(v, backend.flood_port) for v in flood_vms]
    results: dict[str, Any] = {
        "machine": machine.describe() | relayd_source(src),
        "args": vars(args),
        "lease_ttl": LEASE_TTL,
    }
    sock = work / "redis.sock"
    redis_proc = spawn(
        ["redis-server", "--port", "0", "--unixsocket", str(sock), "--unixsocketperm", "700",
         "--save", "", "--appendonly", "no", "--dir", str(work)],
        work / "redis.log", cpu=relay_cpu,
    )  # fmt: skip
    sampler: Sampler | None = None
    try:
        await poll(lambda: _true(sock.exists()), "redis-server's socket", 10)
        for g in gateways:
            write_config(g, pki, f"unix://{sock}?db=0", vms, work / f"{g.gid}-state")
            g.proc = spawn(
                [str(RELAYD), "--log-level", "info", "serve", "--config", str(g.config)],
                g.log, cpu=relay_cpu, env=relayd_env(),
            )  # fmt: skip
        for g in gateways:
            await poll(lambda g=g: _ready(g), f"{g.gid} /readyz (log {g.log})", 60)
        t0 = time.perf_counter()
        owned: dict[str, str] = {}

        async def settled() -> bool:
            nonlocal owned
            if backend.echo_conns < len(echo_vms) or backend.flood_conns < len(flood_vms):
                return False
            owned = await owners(gateways, token, set(echo_vms) | set(flood_vms)) or {}
            return bool(owned)

        await poll(settled, f"every VM owned ({backend.echo_conns} echo ports)", SETTLE_TIMEOUT)
        by_gw = {g.gid: g for g in gateways}
        share = {g.gid: sum(1 for o in owned.values() if o == g.gid) for g in gateways}
        results["settle_s"] = round(time.perf_counter() - t0, 1)
        results["owned_by_gateway"] = share
        print(f"{len(owned)} VMs owned after {results['settle_s']} s: {share}", flush=True)
        sampler = Sampler(gateways, redis_proc.pid, sock)

        def other(vm: str) -> Gateway:
            i = next(k for k, g in enumerate(gateways) if g.gid == owned[vm])
            return gateways[(i + 1) % len(gateways)]

        local_t = [target(by_gw[owned[v]], v, token) for v in echo_vms[:n]]
        fwd_t = [target(other(v), v, token) for v in echo_vms[n:]]
        t0 = time.perf_counter()
        local = await open_sessions(local_t)
        t1 = time.perf_counter()
        forwarded = await open_sessions(fwd_t)
        t2 = time.perf_counter()
        results["open_s"] = {"local": round(t1 - t0, 1), "forwarded": round(t2 - t1, 1)}
        print(f"sessions open: {results['open_s']}", flush=True)
        try:
            await asyncio.sleep(2.0)
            a = await sampler.read()
            await asyncio.sleep(args.idle_seconds)
            results["idle"] = Sampler.diff(a, await sampler.read())
            idle = results["idle"]
            print(
                f"idle: relays {idle['relay_cpu_s'] / idle['window_s']:.2f} core, "
                f"Redis {idle['redis_calls_per_s']}",
                flush=True,
            )
            # The issue's shape: as many typists, every other one through another gateway
            # (what HAProxy round-robin over 3 gateways gives about half the time).
            round_robin = [
                local[i] if i % 2 == 0 else forwarded[i]
                for i in range(min(len(local), len(forwarded)))
            ]
            cases = {"local": local, "round_robin": round_robin, "forwarded": forwarded}
            results["typing"] = await typing(args, sampler, cases, gateways[0].pid)
        finally:
            await close_all(local + forwarded)
        if flood_vms:
            await asyncio.sleep(1.0)
            results["flood"] = await flood(
                args,
                sampler,
                backend,
                [target(by_gw[owned[v]], v, token) for v in flood_vms],
                [f"{key_prefix(REGION)}logmeta:{v}" for v in flood_vms],
            )
    finally:
        if sampler is not None:
            await sampler.redis.aclose()
        for g in gateways:
            if g.proc is not None:
                await terminate(g.proc)
        await terminate(redis_proc)
        kill_all()
        await backend.close()
        if args.keep:
            print(f"logs and configs kept in {work}")
        else:
            shutil.rmtree(work, ignore_errors=True)
    RESULTS.mkdir(parents=True, exist_ok=True)
    stamp = datetime.datetime.now(datetime.UTC).strftime("%Y%m%dT%H%M%SZ")
    out = RESULTS / f"hop-{stamp}.json"
    out.write_text(json.dumps(results, indent=2, default=str))
    print(f"results: {out}")
    summary(results)
    return 0


async def _true(value: bool) -> bool:
    return value


async def _ready(g: Gateway) -> bool:
    if g.proc.poll() is not None:
        raise RuntimeError(f"{g.gid} exited: see {g.log}")
    status, _ = await http_get(g.host, g.health_port, "/readyz")
    return status == 200


def summary(results: dict[str, Any]) -> None:
    """The figures docs/benchmarks.md quotes."""
    t = results.get("typing", {})
    if "local" in t and "forwarded" in t:
        a, b = t["local"]["median"], t["forwarded"]["median"]
        print("| case | p50 ms | p99 ms | relay CPU µs/key | redis CPU µs/key | Redis cmd/s |")
        print("|---|---:|---:|---:|---:|---:|")
        for name in ("local", "round_robin", "forwarded"):
            if name not in t:
                continue
            m = t[name]["median"]
            cells = ("p50_ms", "p99_ms", "relay_cpu_per_key_us", "redis_cpu_per_key_us",
                     "redis_client_commands_per_s")  # fmt: skip
            print(f"| {name} | " + " | ".join(str(m[c]) for c in cells) + " |")
        print(f"hop adds p99 {b['p99_ms'] - a['p99_ms']:+.2f} ms, "
              f"{b['relay_cpu_per_key_us'] - a['relay_cpu_per_key_us']:+.1f} µs/key")  # fmt: skip
    if "idle" in results:
        print(f"idle Redis client cmd/s: {results['idle']['redis_client_commands_per_s']}")


def run(argv: list[str] | None = None) -> int:
    """On uvloop, as bench/run.py."""
    args = parse(argv)
    try:
        import uvloop
    except ImportError:
        return asyncio.run(main(args))
    return uvloop.run(main(args))


if __name__ == "__main__":
    sys.exit(run())
