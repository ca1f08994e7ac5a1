"""The machine the bench runs on: what it is, who else uses it, how fast it is now.

The host is a shared two-vCPU VM: other tenants' work takes CPU the guest
cannot see as steal, and the same work takes up to half again as long from
one minute to the next. So the bench records the machine with every run,
waits for a quiet machine before each phase, measures how much CPU other
processes took during each measured window, times a fixed loop on the relay's
CPU before and after each phase, and stops opening sessions before memory
runs out.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime
import os
import platform
import ssl
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from . import procfs
from .peers import RELAY_CPU, versions

GEN_CPU = 1
"""The CPU of the load generator and the echo/flood backend (the relay's is peers.RELAY_CPU)."""
MIN_FREE_KIB = 3 * 2**20  # stop opening sessions when the machine has less than 3 GiB left
QUIET_CORES = 0.10  # other processes may use this much CPU during a measured window
SPEED_LOOP = (
    "import time\nt = time.process_time()\ns = 0\n"
    "for i in range(2_000_000): s += i * i\nprint(time.process_time() - t)"
)


class MemoryGuard(ValueError):
    """The machine is running out of memory; stop opening sessions."""


def describe() -> dict[str, Any]:
    """The machine and software, for the report."""
    model = ""
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    mem = 0
    with contextlib.suppress(OSError):
        mem = int(Path("/proc/meminfo").read_text().split()[1])
    return {
        "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "nproc": os.cpu_count(),
        "cpu_model": model,
        "mem_total_gib": round(mem / 2**20, 1),
        "kernel": platform.release(),
        "python": sys.version.split()[0],
        "openssl": ssl.OPENSSL_VERSION,
        "clk_tck": procfs.CLK_TCK,
        **versions(),
    }


def guard_memory() -> None:
    """Raise MemoryGuard when the machine is short of memory."""
    if procfs.mem_available_kib() < MIN_FREE_KIB:
        raise MemoryGuard("MemAvailable below 3 GiB: stopped opening sessions")


def disturbance(res: Any) -> float:
    """The worst share of a core used by other processes in any measured window of a result."""
    worst = 0.0
    if isinstance(res, dict):
        if "other_cpu_s" in res and res.get("window_s"):
            other = max(res["other_cpu_s"], res.get("foreign_cpu_s", 0.0))
            worst = max(0.0, other / res["window_s"])
        for v in res.values():
            worst = max(worst, disturbance(v))
    return worst


async def wait_quiet(max_wait: float) -> tuple[float, float]:
    """Wait (bounded) until other processes leave the CPUs alone; returns (waited, load)."""
    t0 = time.monotonic()
    load = await asyncio.to_thread(procfs.foreign_load, 1.0)
    while load > QUIET_CORES / 2 and time.monotonic() - t0 < max_wait:
        await asyncio.sleep(2.0)
        load = await asyncio.to_thread(procfs.foreign_load, 1.0)
    return time.monotonic() - t0, load


def relay_cpu_speed() -> float:
    """CPU seconds a fixed pure-Python loop takes on the relay's CPU.

    This VM's vCPUs are shared with other tenants and the same work takes up to
    half again as long from one minute to the next (steal is not reported), so
    each phase records this before and after; CPU-per-unit figures move with it.
    """
    argv = ["taskset", "-c", RELAY_CPU, sys.executable, "-c", SPEED_LOOP]
    out = subprocess.run(argv, capture_output=True, text=True, check=True, timeout=60)
    return round(float(out.stdout), 3)
