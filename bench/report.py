"""Turn a results dict (see run.py) into the markdown summary table.

Ratios are relayd's figure divided by the peer's: for a cost (CPU, memory,
latency) below 1 means relayd is cheaper, above 1 that it costs that many
times more. Units are decimal (1 GB = 10^9 bytes, 1 MB = 10^6 bytes).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

Getter = Callable[[dict[str, Any]], float | None]


def _get(d: dict[str, Any] | None, *keys: str) -> Any:
    for k in keys:
        if not isinstance(d, dict) or k not in d:
            return None
        d = d[k]
    return d


def _fmt(v: float | None, digits: int = 2) -> str:
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return "—"
    if isinstance(v, int) or (float(v).is_integer() and abs(v) >= 100):
        return f"{int(v):,}"
    if abs(v) >= 100:
        return f"{v:,.0f}"
    return f"{v:.{digits}f}"


def _ratio(a: float | None, b: float | None) -> str:
    if a is None or b is None or not b or math.isnan(a) or math.isnan(b):
        return "—"
    r = a / b
    return f"{r:.2f}x" if r < 10 else f"{r:.0f}x"


def _kib_to_mb(kib: float | None) -> float | None:
    return None if kib is None else kib * 1024 / 1e6


ROWS: list[tuple[str, str, str, Getter, str, Callable[[float], bool] | None]] = []


def _row(
    label: str,
    phase: str,
    getter: Getter,
    target: str = "",
    ok: Callable[[float], bool] | None = None,
    *,
    only: str = "",
) -> None:
    ROWS.append((label, phase if not only else f"{phase}|{only}", target, getter, "", ok))


_row(
    "Relay CPU per new session (ms): TLS + upgrade + auth + attach + 1 echo + close",
    "new",
    lambda r: r.get("cpu_per_session_ms"),
    "≤ 1.5",
    lambda v: v <= 1.5,
)
_row(
    "  same, relayd at --log-level warning (no per-session log lines)",
    "new",
    lambda r: r.get("cpu_per_session_ms"),
    only="relayd-quiet",
)
_row(
    "Relay CPU per GB of console output, 1 session (s)",
    "flood_1",
    lambda r: r.get("cpu_per_gb_s"),
    "≤ 1.5",
    lambda v: v <= 1.5,
)
_row(
    "Relay CPU per GB, 50 sessions, each its own source (s)",
    "flood_50",
    lambda r: r.get("cpu_per_gb_s"),
    "≤ 1.5",
    lambda v: v <= 1.5,
)
_row(
    "Relay CPU per GB delivered, 50 spectators of one VM (s)",
    "flood_fanout",
    lambda r: r.get("cpu_per_gb_s"),
    only="relayd",
)
_row(
    "Throughput, 1 session (MB/s; bound by the generator's core)",
    "flood_1",
    lambda r: r.get("mb_per_s"),
)
_row("Keystroke round trip p50, 1 session (ms)", "latency", lambda r: _get(r, "one", "p50_ms"))
_row("Keystroke round trip p99, 1 session (ms)", "latency", lambda r: _get(r, "one", "p99_ms"))
_row(
    "Sessions opened for the many-session round trip (of requested)",
    "latency",
    lambda r: _get(r, "many", "opened"),
)
_row(
    "Keystroke round trip p50, many sessions x 10 keys/s (ms)",
    "latency",
    lambda r: _get(r, "many", "p50_ms"),
)
_row(
    "Keystroke round trip p99, many sessions x 10 keys/s (ms)",
    "latency",
    lambda r: _get(r, "many", "p99_ms"),
    "≤ 5",
    lambda v: v <= 5,
)
_row(
    "Relay CPU while those sessions type (% of one core)",
    "latency",
    lambda r: _get(r, "many", "relay_cpu_pct_core"),
)
_row(
    "Relay CPU per keystroke round trip (µs)",
    "latency",
    lambda r: _get(r, "many", "relay_cpu_per_key_us"),
)
_row(
    "PSS per 1,000 idle sessions (MB), first step ≥ 1,000",
    "idle",
    lambda r: None if r.get("pss_per_1000_mib") is None else r["pss_per_1000_mib"] * 2**20 / 1e6,
    "≤ 40",
    lambda v: v <= 40,
)
_row(
    "PSS per 1,000 idle sessions at the most held (MB)",
    "idle",
    lambda r: (
        None
        if r.get("pss_per_1000_mib_at_max") is None
        else r["pss_per_1000_mib_at_max"] * 2**20 / 1e6
    ),
)
_row(
    "Most concurrent sessions held without error (ramp stops at its last step)",
    "idle",
    lambda r: r.get("max_held"),
    "≥ 10,000",
    lambda v: v >= 10000,
)
_row(
    "Idle CPU per 1,000 held sessions (% of one core)",
    "idle",
    lambda r: _get(r, "hold", "cpu_pct_core_per_1000"),
)
_row(
    "One session typing while the most are held: round trip p99 (ms)",
    "idle",
    lambda r: _get(r, "typist", "p99_ms"),
)
_row(
    "  same, slowest round trip in one keepalive interval (ms)",
    "idle",
    lambda r: _get(r, "typist", "max_ms"),
)


def table(results: dict[str, Any]) -> str:
    """The comparison table."""
    phases = results.get("phases", {})
    lines = [
        "| metric | relayd | websockify | haproxy | relayd : websockify | relayd : haproxy "
        "| target | relayd |",
        "|---|---:|---:|---:|---:|---:|---|---|",
    ]
    for label, phase_key, target, getter, _, ok in ROWS:
        phase, _, only = phase_key.partition("|")
        by_peer = phases.get(phase, {})

        def val(
            peer: str, by_peer: dict[str, Any] = by_peer, getter: Getter = getter
        ) -> float | None:
            r = by_peer.get(peer)
            if not isinstance(r, dict) or "error" in r:
                return None
            v = getter(r)
            return None if v is None else float(v)

        if only:
            v = val(only)
            cells = [_fmt(v), "", "", "", ""]
            verdict = ""
        else:
            rv, wv, hv = val("relayd"), val("websockify"), val("haproxy")
            cells = [_fmt(rv), _fmt(wv), _fmt(hv), _ratio(rv, wv), _ratio(rv, hv)]
            verdict = "" if ok is None or rv is None else ("pass" if ok(rv) else "**FAIL**")
            for name in ("relayd", "websockify", "haproxy"):
                err = _get(by_peer, name, "error")
                if err:
                    idx = {"relayd": 0, "websockify": 1, "haproxy": 2}[name]
                    cells[idx] = "error"
        lines.append(f"| {label} | " + " | ".join(cells) + f" | {target} | {verdict} |")
    return "\n".join(lines)


def sweep_table(results: dict[str, Any]) -> str:
    """Keystroke round trip against the number of sessions typing (10 keys/s each)."""
    lat = results.get("phases", {}).get("latency", {})
    peers = ("relayd", "websockify", "haproxy")
    rows: dict[int, dict[str, str]] = {}
    for peer in peers:
        r = lat.get(peer)
        if not isinstance(r, dict):
            continue
        points = list(r.get("sweep") or [])
        many = r.get("many")
        if isinstance(many, dict) and "sessions" in many:
            points.append({"typing": many["sessions"], **many})
        for pt in points:
            cell = (
                f"{_fmt(pt.get('p50_ms'))} / {_fmt(pt.get('p99_ms'))} "
                f"({_fmt(pt.get('relay_cpu_pct_core'), 0)} %)"
            )
            rows.setdefault(int(pt.get("typing", 0)), {})[peer] = cell
    if not rows:
        return ""
    lines = [
        "| sessions typing | relayd p50 / p99 ms (relay CPU) | websockify | haproxy |",
        "|---:|---|---|---|",
    ]
    for n in sorted(rows):
        cells = [rows[n].get(p, "—") for p in peers]
        lines.append(f"| {n:,} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def per_vm_kib(results: dict[str, Any]) -> float | None:
    """relayd's memory per configured VM: PSS at start with 1,000 VMs against 100."""
    phases = results.get("phases", {})
    lat = _get(phases, "latency", "relayd")
    idle = _get(phases, "idle", "relayd")
    try:
        return (lat["pss_at_start_kib"] - idle["pss0_kib"]) / (lat["vms"] - idle["vms"])
    except (KeyError, TypeError, ZeroDivisionError):
        return None


def summarize(results: dict[str, Any]) -> str:
    """Markdown: machine line, table, errors."""
    m = results.get("machine", {})
    head = (
        f"Run {m.get('date')} ({results.get('mode')}): {m.get('nproc')} CPUs "
        f"({m.get('cpu_model')}), kernel {m.get('kernel')}, Python {m.get('python')}, "
        f"{m.get('openssl')}, {m.get('haproxy', '')}, websockify {m.get('websockify', '')}."
    )
    errors = []
    for phase, by_peer in results.get("phases", {}).items():
        for peer, r in by_peer.items():
            if isinstance(r, dict) and "error" in r:
                errors.append(f"- {phase} / {peer}: {r['error']}")
            many = _get(r, "many")
            if isinstance(many, dict) and many.get("first_error"):
                errors.append(
                    f"- {phase} / {peer}: opened {many.get('opened')}/{many.get('requested')}: "
                    f"{many['first_error']}"
                )
            if phase == "idle" and isinstance(r, dict) and r.get("failed_at"):
                last = r["steps"][-1]
                why = last.get("first_error") or last.get("live_first_error")
                errors.append(f"- idle / {peer}: failed at step {r['failed_at']}: {why}")
    out = [head, "", table(results)]
    if results.get("mode") == "quick":
        out += ["", "Quick mode: the sizes are too small to judge anything against the targets."]
    sweep = sweep_table(results)
    if sweep:
        out += ["", "Keystroke round trip against load (each session 10 keys/s):", "", sweep]
    vm = per_vm_kib(results)
    if vm is not None:
        out += [
            "",
            f"relayd PSS per configured VM (1,000 VMs against 100, no sessions): "
            f"{vm * 1024 / 1e6:.2f} MB",
        ]
    speeds = [
        f"{phase}/{peer} {r['relay_cpu_speed_loop_s'][0]:.2f}→{r['relay_cpu_speed_loop_s'][1]:.2f}"
        for phase, by_peer in results.get("phases", {}).items()
        for peer, r in by_peer.items()
        if isinstance(r, dict) and r.get("relay_cpu_speed_loop_s")
    ]
    if speeds:
        out += [
            "",
            "Relay CPU speed check, a fixed Python loop before→after each phase (s; "
            "lower is faster, and CPU-per-unit figures scale with it): " + ", ".join(speeds),
        ]
    if errors:
        out += ["", "Errors and limits reached:", *errors]
    return "\n".join(out) + "\n"
