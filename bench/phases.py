"""The bench's four phases, each measuring one relay for one figure.

1. new sessions: relay CPU per session (TLS, upgrade, auth, attach, one echo, close);
2. console output: relay CPU per GB delivered, for 1 session, 50 sessions, and
   (relayd) 50 spectators of one VM;
3. keystroke round trips: 1 session, then many sessions typing at once;
4. idle sessions: PSS per 1,000 held sessions, the most held, idle CPU, and
   one typist beside them.

Each phase starts a fresh relay, warms it up, reads its CPU time from /proc
before and after the measured work, and stops it. `plan` lists the
(phase, relay, run) steps for a run; `bench/run.py` runs them.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import random
import ssl
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Callable, Coroutine
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from . import procfs
from .backend import Backend, FloodGroup
from .loadgen import (
    Conn,
    LoopLag,
    Tally,
    Target,
    bounded_gather,
    close_all,
    open_conn,
    percentile,
)
from .machine import GEN_CPU, guard_memory
from .peers import (
    HAPROXY_MAXCONN,
    ROOT,
    Haproxy,
    Peer,
    Pki,
    PyFloor,
    Relayd,
    Websockify,
    free_port,
    spawn,
    terminate,
)
from .profiling import Profiler

PHASES = ("new", "flood", "latency", "idle")
GB = 1_000_000_000
NOTE_WORDS = ("rror", "xception", "ALERT", "WARN", "warning", "failed", "out of range")
"""Words that make a relay's log line worth a note in the results."""


@dataclass(frozen=True)
class Sizes:
    """How much work each phase does."""

    new_sessions: int = 1000
    new_conc: int = 8
    new_warmup: int = 24
    flood_bytes: int = GB  # per flood phase, total delivered to clients
    flood_sessions: int = 50
    flood_timeout: float = 300.0
    lat1_rate: float = 50.0
    lat1_seconds: float = 10.0
    latn_sessions: int = 1000
    latn_rate: float = 10.0
    latn_warmup: float = 3.0
    latn_seconds: float = 15.0
    latn_sweep: tuple[int, ...] = (250, 500, 750)  # fewer typists first, shorter windows
    sweep_seconds: float = 6.0
    idle_vms: int = 100
    idle_steps: tuple[int, ...] = (1000, 2000, 5000, 10000)
    idle_steps_websockify: tuple[int, ...] = (100, 250, 500, 750, 1000, 1500, 2000, 3000)
    idle_hold: float = 20.0  # relayd's default keepalive interval
    typist_rate: float = 20.0
    open_conc: int = 100


FULL = Sizes()
QUICK = Sizes(
    new_sessions=48,
    new_warmup=8,
    flood_bytes=64 * 2**20,
    flood_timeout=60.0,
    lat1_rate=20.0,
    lat1_seconds=2.0,
    latn_sessions=100,
    latn_warmup=1.0,
    latn_seconds=3.0,
    latn_sweep=(50,),
    sweep_seconds=2.0,
    idle_vms=10,
    idle_steps=(200, 500),
    idle_steps_websockify=(50, 100),
    idle_hold=2.0,
)


@dataclass
class Ctx:
    """What every phase needs."""

    backend: Backend
    pki: Pki
    workdir: Path
    sizes: Sizes
    ssl: ssl.SSLContext
    profiler: Profiler | None = None  # py-spy or perf during measured windows; None: neither
    patient: bool = True  # wait for a quiet machine and repeat disturbed phases
    seq: int = 0
    log_notes: list[str] = field(default_factory=list)
    relayd_state_dir: Path | None = None
    relayd_limits: dict[str, Any] = field(default_factory=dict)

    def peer_dir(self, name: str) -> Path:
        """A fresh directory for one relay instance."""
        self.seq += 1
        return self.workdir / f"{self.seq:02d}-{name}"


# -- plumbing -------------------------------------------------------------------------------


def make_peer(
    ctx: Ctx, name: str, *, vms: list[tuple[str, int]], backend_port: int, **kw: Any
) -> Peer:
    """A relay instance for one phase."""
    workdir = ctx.peer_dir(name)
    if name.startswith("relayd"):
        level = "warning" if name == "relayd-quiet" else "info"
        return Relayd(
            workdir,
            ctx.pki,
            vms,
            log_level=level,
            limits=ctx.relayd_limits,
            state_dir=ctx.relayd_state_dir,
            **kw,
        )
    if name == "websockify":
        return Websockify(workdir, ctx.pki, backend_port)
    if name == "haproxy":
        return Haproxy(workdir, ctx.pki, backend_port)
    if name == "pyfloor":
        return PyFloor(workdir, ctx.pki, backend_port)
    raise ValueError(name)


@contextlib.asynccontextmanager
async def running(
    ctx: Ctx, peer: Peer, *, echo_vms: int = 0, flood_vms: int = 0
) -> AsyncIterator[Peer]:
    """Start a relay, wait for relayd's hubs to connect their ports, always stop it."""
    backend = ctx.backend
    echo0, flood0 = backend.echo_conns, backend.flood_conns
    try:
        await peer.start()
        if echo_vms and not await backend.wait_echo_conns(lambda n: n >= echo0 + echo_vms, 60):
            raise RuntimeError(f"only {backend.echo_conns - echo0}/{echo_vms} VM ports connected")
        for _ in range(600):
            if backend.flood_conns >= flood0 + flood_vms:
                break
            await asyncio.sleep(0.05)
        else:
            raise RuntimeError(
                f"only {backend.flood_conns - flood0}/{flood_vms} VM ports connected"
            )
        yield peer
    finally:
        await peer.stop()
        await backend.wait_echo_conns(lambda n: n <= echo0, 10)
        ctx.log_notes += log_notes(peer.log)


def log_notes(path: Path, limit: int = 8) -> list[str]:
    """Distinct warning/error lines of a relay's log (first `limit`), for the results."""
    seen: dict[str, None] = {}
    with contextlib.suppress(OSError), path.open(errors="replace") as f:
        for line in f:
            if any(w in line for w in NOTE_WORDS):
                key = line.strip()[:240]
                seen.setdefault(key, None)
                if len(seen) >= limit:
                    break
    return [f"{path.parent.name}: {k}" for k in seen]


def _profiled(ctx: Ctx, peer: Peer, label: str) -> contextlib.AbstractAsyncContextManager[None]:
    """The profilers' window around a measurement, or nothing when the run profiles nothing."""
    if ctx.profiler is None:
        return contextlib.nullcontext()
    return ctx.profiler.window(peer, label)


async def settle(peer: Peer, seconds: float = 0.5) -> None:
    """Let the relay finish closing (websockify: until its per-client processes are gone)."""
    for _ in range(200):
        if not procfs.descendants(peer.pid):
            break
        await asyncio.sleep(0.05)
    await asyncio.sleep(seconds)


def cipher_of(conn: Conn) -> str:
    """Negotiated TLS version and cipher, to show every relay used the same."""
    if conn.transport is None:
        return ""
    obj = conn.transport.get_extra_info("ssl_object")
    c = conn.transport.get_extra_info("cipher") or (obj.cipher() if obj else None)
    return f"{c[1]} {c[0]}" if c else ""


# -- phase 1: new sessions --------------------------------------------------------------------


async def phase_new(ctx: Ctx, name: str) -> dict[str, Any]:
    """Relay CPU per session: TLS + upgrade + auth + attach + one echo + close."""
    s, backend = ctx.sizes, ctx.backend
    vms = [(f"new-{w}", backend.echo_port) for w in range(s.new_conc)]
    peer = make_peer(ctx, name, vms=vms, backend_port=backend.echo_port)
    async with running(ctx, peer, echo_vms=len(vms) if name.startswith("relayd") else 0):
        targets = [peer.target(vm) for vm, _ in vms]
        cipher = ""

        async def one(t: Target) -> None:
            nonlocal cipher
            conn = await open_conn(t, ctx.ssl)
            try:
                cipher = cipher or cipher_of(conn)
                await conn.echo(b"k")
            finally:
                await conn.close()

        async def run(total: int, tally: Tally) -> None:
            async def worker(w: int) -> None:
                for _ in range(total // s.new_conc + (w < total % s.new_conc)):
                    try:
                        await one(targets[w])
                        tally.ok += 1
                    except (OSError, ConnectionError, TimeoutError, ssl.SSLError) as exc:
                        tally.fail(exc)

            async with asyncio.TaskGroup() as tg:
                for w in range(s.new_conc):
                    tg.create_task(worker(w))

        await run(s.new_warmup, Tally())
        await settle(peer)
        tally = Tally()
        meter = procfs.Meter(peer.pid).start()
        t0 = time.perf_counter()
        async with _profiled(ctx, peer, f"new-{name}"):
            await run(s.new_sessions, tally)
            wall = time.perf_counter() - t0
            await settle(peer)
        meter.stop()
    return {
        "sessions": tally.ok,
        "errors": tally.errors,
        "first_error": tally.first_error,
        "concurrency": s.new_conc,
        "relay_cpu_s": meter.relay_cpu,
        "cpu_per_session_ms": 1e3 * meter.relay_cpu / max(1, tally.ok),
        "wall_s": wall,
        "sessions_per_s": tally.ok / wall,
        "gen_cpu_s": meter.gen_cpu,
        "tls": cipher,
        **meter.report(),
    }


# -- phase 2: console output ------------------------------------------------------------------


async def phase_flood(ctx: Ctx, name: str, mode: str) -> dict[str, Any]:
    """Relay CPU per GB delivered: 1 session, 50 sessions, or (relayd) 50 spectators of one VM."""
    s, backend = ctx.sizes, ctx.backend
    n = 1 if mode == "1" else s.flood_sessions
    fanout = mode == "fanout"
    vm_ids = ["fan-0"] if fanout else [f"flood-{i}" for i in range(n)]
    vms = [(v, backend.flood_port) for v in vm_ids] if name.startswith("relayd") else []
    peer = make_peer(ctx, name, vms=vms, backend_port=backend.flood_port)
    groups: list[FloodGroup] = []
    conns: list[Conn] = []
    async with running(ctx, peer, flood_vms=len(vms)):
        try:
            if fanout:
                (group,) = groups = backend.new_groups(1, s.flood_bytes // n)
                spectators = [peer.target("fan-0", mode="spectate")] * (n - 1)
                for t in [*spectators, peer.target("fan-0")]:
                    conns.append(await open_conn(t, ctx.ssl))
                group.clients = list(conns)
                writers = [(conns[-1], group)]
            else:
                groups = backend.new_groups(n, s.flood_bytes // n)
                tally = Tally()
                opened = await bounded_gather(
                    [lambda i=i: open_conn(peer.target(f"flood-{i}"), ctx.ssl) for i in range(n)],
                    50,
                    tally,
                )
                if tally.failed:
                    raise ConnectionError(f"opening flood sessions: {tally.first_error}")
                conns = list(opened)
                for c, g in zip(conns, groups, strict=True):
                    g.clients = [c]
                writers = list(zip(conns, groups, strict=True))
            for g in groups:
                for c in g.clients:
                    c.sink = lambda _n, g=g: g.progress()
            for c, g in writers:
                c.send_input(f"F{g.gid}\n".encode())
            async with asyncio.timeout(30):
                await asyncio.gather(*(g.attached for g in groups))
            await asyncio.sleep(0.3)
            rx0 = sum(c.rx for c in conns)
            meter = procfs.Meter(peer.pid).start()
            t0 = time.perf_counter()
            completed = True
            async with _profiled(ctx, peer, f"flood{mode}-{name}"):
                for g in groups:
                    g.start()
                try:
                    async with asyncio.timeout(s.flood_timeout):
                        await asyncio.gather(*(g.done for g in groups))
                except TimeoutError:
                    completed = False
                wall = time.perf_counter() - t0
            meter.stop()
            delivered = sum(c.rx for c in conns) - rx0
            notices = (
                sum(max(0, c.texts - 1) for c in conns) if peer.name.startswith("relayd") else 0
            )
        finally:
            await close_all(conns)
            backend.drop_groups(groups)
    return {
        "sessions": len(conns),
        "flood_sources": len(groups),
        "bytes_delivered": delivered,
        "completed": completed,
        "relay_cpu_s": meter.relay_cpu,
        "cpu_per_gb_s": meter.relay_cpu / (delivered / GB) if delivered else None,
        "wall_s": wall,
        "mb_per_s": delivered / wall / 1e6,
        "gen_cpu_s": meter.gen_cpu,
        "relayd_text_frames_after_hello": notices,
        **meter.report(),
    }


# -- phase 3: keystroke round trips -----------------------------------------------------------


@dataclass
class _Typist:
    conn: Conn
    due: float = 0.0
    sent_at: float | None = None
    handle: asyncio.TimerHandle | None = None


async def type_keys(
    conns: list[Conn], rate: float, warmup: float, seconds: float, pid: int
) -> dict[str, Any]:
    """Every session sends one key every 1/rate s (random phase) and times its echo."""
    loop = asyncio.get_running_loop()
    interval = 1.0 / rate
    samples: list[float] = []
    window = [float("inf"), float("inf")]
    counts = {"sent": 0, "skipped": 0}
    stopping = False

    def tick(t: _Typist) -> None:
        if stopping:
            return
        now = time.perf_counter()
        in_window = window[0] <= now < window[1]
        if t.sent_at is not None:
            counts["skipped"] += in_window  # previous key still unanswered
        elif t.conn.alive:
            t.sent_at = now
            counts["sent"] += in_window
            t.conn.send_input(b"k")
        t.due += interval
        t.handle = loop.call_at(t.due, tick, t)

    def make_sink(t: _Typist) -> Callable[[int], None]:
        def sink(_n: int) -> None:
            if t.sent_at is not None:
                if window[0] <= t.sent_at < window[1]:
                    samples.append(time.perf_counter() - t.sent_at)
                t.sent_at = None

        return sink

    typists = [_Typist(c) for c in conns]
    start = loop.time()
    for t in typists:
        t.conn.sink = make_sink(t)
        t.due = start + random.uniform(0, interval)
        t.handle = loop.call_at(t.due, tick, t)
    lag = LoopLag()
    # The generator's own garbage collections (a full one scans every open session's
    # objects: 30-45 ms with 1,000 sessions) would stall every key in flight and be
    # counted against the relay. Park what exists and collect nothing in the window.
    gc.collect()
    gc.freeze()
    gc.disable()
    try:
        await asyncio.sleep(warmup)
        meter = procfs.Meter(pid).start()
        lag.start()
        window[0] = time.perf_counter()
        await asyncio.sleep(seconds)
        window[1] = time.perf_counter()
        meter.stop()
        lag_stats = lag.stop()
        await asyncio.sleep(1.0)
    finally:
        gc.enable()
        gc.unfreeze()
        stopping = True
        for t in typists:
            if t.handle is not None:
                t.handle.cancel()
            t.conn.sink = None
    lost = sum(1 for t in typists if t.sent_at is not None and t.sent_at < window[1])
    s = sorted(samples)
    measured = window[1] - window[0]
    return {
        "sessions": len(conns),
        "rate_per_session": rate,
        "seconds": measured,
        "samples": len(s),
        "keys_sent": counts["sent"],
        "keys_skipped_previous_unanswered": counts["skipped"],
        "lost": lost,
        "p50_ms": percentile(s, 50) * 1e3,
        "p90_ms": percentile(s, 90) * 1e3,
        "p99_ms": percentile(s, 99) * 1e3,
        "p999_ms": percentile(s, 99.9) * 1e3,
        "max_ms": (s[-1] * 1e3) if s else None,
        "relay_cpu_s": meter.relay_cpu,
        "relay_cpu_pct_core": 100 * meter.relay_cpu / measured,
        "relay_cpu_per_key_us": 1e6 * meter.relay_cpu / max(1, counts["sent"]),
        "gen_cpu_pct_core": 100 * meter.gen_cpu / measured,
        "gen_loop_lag": lag_stats,
        **meter.report(),
    }


async def open_many(
    ctx: Ctx, targets: list[Target], *, stop_on_error: bool = True
) -> tuple[list[Conn], Tally]:
    """Open sessions (bounded concurrency, memory guard); stops at the first failure."""

    async def job(t: Target) -> Conn:
        guard_memory()
        return await open_conn(t, ctx.ssl)

    tally = Tally()
    res = await bounded_gather(
        [lambda t=t: job(t) for t in targets], ctx.sizes.open_conc, tally, stop_on_error
    )
    return [c for c in res if c is not None], tally


async def phase_latency(ctx: Ctx, name: str) -> dict[str, Any]:
    """Keystroke round trip: 1 session, then N sessions each typing `latn_rate` keys/s."""
    s, backend = ctx.sizes, ctx.backend
    n = s.latn_sessions
    relay = name.startswith("relayd")
    vms = [(f"lat-{i:04d}", backend.echo_port) for i in range(n)] if relay else []
    peer = make_peer(ctx, name, vms=vms, backend_port=backend.echo_port)
    out: dict[str, Any] = {}
    async with running(ctx, peer, echo_vms=len(vms)):
        out["vms"] = len(vms)
        out["pss_at_start_kib"] = procfs.pss_kib(peer.pid)
        conn = await open_conn(peer.target("lat-0000"), ctx.ssl)
        try:
            for _ in range(20):
                await conn.echo(b"w")
            async with _profiled(ctx, peer, f"lat1-{name}"):
                out["one"] = await type_keys([conn], s.lat1_rate, 0.5, s.lat1_seconds, peer.pid)
        finally:
            await close_all([conn])
        await settle(peer)
        targets = [peer.target(vm) for vm, _ in vms] if relay else [peer.target()] * n
        t0 = time.perf_counter()
        conns, tally = await open_many(ctx, targets)
        try:
            many: dict[str, Any] = {
                "requested": n,
                "opened": len(conns),
                "open_errors": tally.errors,
                "first_error": tally.first_error,
                "open_wall_s": time.perf_counter() - t0,
            }
            sweep = []
            for k in s.latn_sweep:
                if k < len(conns):
                    r = await type_keys(conns[:k], s.latn_rate, 2.0, s.sweep_seconds, peer.pid)
                    sweep.append({"typing": k, **r})
            out["sweep"] = sweep
            if conns:
                async with _profiled(ctx, peer, f"lat{n}-{name}"):
                    many |= await type_keys(
                        conns, s.latn_rate, s.latn_warmup, s.latn_seconds, peer.pid
                    )
                many["alive_after"] = sum(1 for c in conns if c.alive)
            many["ok"] = len(conns) == n and not tally.failed and many.get("lost", 1) == 0
            out["many"] = many
        finally:
            await close_all(conns)
    return out


# -- phase 4: idle sessions, memory and the most held ------------------------------------------


async def phase_idle(ctx: Ctx, name: str) -> dict[str, Any]:
    """Ramp idle sessions in steps; PSS at each step; stop at the first failure."""
    s, backend = ctx.sizes, ctx.backend
    relay = name.startswith("relayd")
    vms = [(f"idle-{i:03d}", backend.echo_port) for i in range(s.idle_vms)] if relay else []
    if relay:  # one more VM for the typist that times keystrokes while the rest idle
        vms.append(("typist", backend.echo_port))
    steps = s.idle_steps_websockify if name == "websockify" else s.idle_steps
    if name == "haproxy":  # its maxconn is held under the descriptor limit (see peers.py);
        # leave room for the typist.
        steps = tuple(sorted({min(step, HAPROXY_MAXCONN - 10) for step in steps}))
    echo: subprocess.Popen[bytes] | None = None
    echo_port = backend.echo_port
    if not relay:
        # A separate echo process: the relayed sessions' backend descriptors must not
        # count against this process's limit too.
        echo_port = free_port()
        code = (
            f"import sys; sys.path.insert(0, {str(ROOT)!r}); "
            f"from bench.backend import serve_echo; serve_echo({echo_port})"
        )
        echo = spawn([sys.executable, "-c", code], ctx.workdir / "echo.log", cpu=str(GEN_CPU))
        for _ in range(200):
            if procfs.listening(echo_port):
                break
            await asyncio.sleep(0.05)
    try:
        return await _idle(ctx, name, relay, vms, steps, echo_port)
    finally:
        if echo is not None:
            await terminate(echo)


async def _idle(
    ctx: Ctx,
    name: str,
    relay: bool,
    vms: list[tuple[str, int]],
    steps: tuple[int, ...],
    echo_port: int,
) -> dict[str, Any]:
    s = ctx.sizes
    peer = make_peer(ctx, name, vms=vms, backend_port=echo_port)
    conns: list[Conn] = []
    out: dict[str, Any] = {"steps": [], "vms": len(vms)}

    def target(i: int) -> Target:
        if relay:
            return peer.target(vms[i % (len(vms) - 1)][0], mode="spectate")
        return peer.target()

    async def live(c: Conn) -> None:
        if relay:
            await c.ping()  # spectators cannot type; the relay answers the ping itself
        else:
            await c.echo(b"p")  # through the relay to the backend and back

    async def check_all() -> Tally:
        tally = Tally()
        await bounded_gather([lambda c=c: live(c) for c in conns], 500, tally)
        return tally

    async with running(ctx, peer, echo_vms=len(vms)):
        try:
            await asyncio.sleep(1.0)
            pss0 = procfs.pss_kib(peer.pid)
            out["pss0_kib"] = pss0
            out["rss0_kib"] = procfs.rss_kib(peer.pid)
            failed = False
            for step in steps:
                t0 = time.perf_counter()
                new, tally = await open_many(
                    ctx, [target(len(conns) + i) for i in range(step - len(conns))]
                )
                conns += new
                t_open = time.perf_counter() - t0
                await asyncio.sleep(1.0)
                pss = procfs.pss_kib(peer.pid)
                check = await check_all()
                row = {
                    "target": step,
                    "open": len(conns),
                    "open_errors": tally.errors,
                    "first_error": tally.first_error,
                    "live_ok": check.ok,
                    "live_failed": check.failed,
                    "live_first_error": check.first_error,
                    "pss_kib": pss,
                    "processes": len(procfs.tree(peer.pid)),
                    "open_wall_s": t_open,
                }
                out["steps"].append(row)
                print(
                    f"    {name}: {len(conns)} sessions, PSS {pss / 1024:.0f} MiB, live {check.ok}",
                    flush=True,
                )
                if tally.failed or check.failed:
                    failed = True
                    break
            good = [r for r in out["steps"] if not r["open_errors"] and not r["live_failed"]]
            out["max_held"] = good[-1]["open"] if good else 0
            out["failed_at"] = None if not failed else out["steps"][-1]["target"]
            if good:
                base = next((r for r in good if r["open"] >= 1000), good[-1])
                out["pss_per_1000_mib"] = (base["pss_kib"] - pss0) / 1024 / (base["open"] / 1000)
                top = good[-1]
                out["pss_per_1000_mib_at_max"] = (
                    (top["pss_kib"] - pss0) / 1024 / (top["open"] / 1000)
                )
            if conns:
                meter = procfs.Meter(peer.pid).start()
                await asyncio.sleep(s.idle_hold)
                meter.stop()
                after = await check_all()
                out["hold"] = {
                    "seconds": s.idle_hold,
                    "sessions": len(conns),
                    "relay_cpu_s": meter.relay_cpu,
                    "cpu_pct_core_per_1000": 100
                    * meter.relay_cpu
                    / s.idle_hold
                    / (len(conns) / 1000),
                    "live_ok_after": after.ok,
                    "live_failed_after": after.failed,
                    "after_failure": failed,
                    **meter.report(),
                }
                # Then one session types while the others idle, for one keepalive interval:
                # whatever the relay does for all sessions at once shows up as a stall.
                try:
                    typist = await open_conn(peer.target("typist"), ctx.ssl)
                except (OSError, ConnectionError, TimeoutError, ssl.SSLError) as exc:
                    out["typist"] = {"error": f"{type(exc).__name__}: {exc}"[:300]}
                else:
                    try:
                        out["typist"] = await type_keys(
                            [typist], s.typist_rate, 0.5, s.idle_hold, peer.pid
                        )
                    finally:
                        await close_all([typist])
        finally:
            await close_all(conns)
    return out


# -- a run's steps ----------------------------------------------------------------------------


Step = tuple[str, str, Callable[[], Coroutine[Any, Any, dict[str, Any]]]]
"""(phase, relay, run): the result key, the relay measured, and the measurement."""


def plan(ctx: Ctx, phases: list[str], peers: list[str]) -> list[Step]:
    """The steps of a run, phase by phase, each phase for every relay it applies to.

    relayd also runs the new-session phase at `--log-level warning`
    ("relayd-quiet"), and alone the flood of 50 spectators on one VM.
    """
    steps: list[Step] = []
    for phase in phases:
        if phase == "new":
            names = [*peers, *(["relayd-quiet"] if "relayd" in peers else [])]
            steps += [("new", p, lambda p=p: phase_new(ctx, p)) for p in names]
        elif phase == "flood":
            for mode in ("1", "50", "fanout"):
                names = ["relayd"] if mode == "fanout" else peers
                steps += [
                    (f"flood_{mode}", p, lambda p=p, m=mode: phase_flood(ctx, p, m))
                    for p in names
                    if p in peers
                ]
        elif phase == "latency":
            steps += [("latency", p, lambda p=p: phase_latency(ctx, p)) for p in peers]
        elif phase == "idle":
            steps += [("idle", p, lambda p=p: phase_idle(ctx, p)) for p in peers]
    return steps
