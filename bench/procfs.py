"""What the kernel says a relay costs: CPU time and PSS of a process tree, from /proc.

CPU is utime+stime of the process plus cutime+cstime (children it has reaped),
plus the same for every live descendant (websockify forks one per client;
a zombie still shows its times until its parent reaps it, and then they move
into the parent's cutime/cstime, so nothing is counted twice or lost).
The unit is the clock tick (1/100 s here), so a phase should burn at least a
second or two of CPU to be read to a few percent.
"""

from __future__ import annotations

import os
import resource
import time
from dataclasses import dataclass
from pathlib import Path

CLK_TCK = os.sysconf("SC_CLK_TCK")
PROC = Path("/proc")


def _stat_fields(pid: int) -> list[str] | None:
    try:
        text = (PROC / str(pid) / "stat").read_text()
    except (FileNotFoundError, ProcessLookupError, PermissionError):
        return None
    # comm may hold spaces and parentheses; the fields start after the last ')'.
    return text[text.rindex(")") + 2 :].split()


def parents() -> dict[int, int]:
    """pid -> ppid for every process now alive."""
    out: dict[int, int] = {}
    for entry in os.scandir(PROC):
        if not entry.name.isdigit():
            continue
        fields = _stat_fields(int(entry.name))
        if fields is not None:
            out[int(entry.name)] = int(fields[1])
    return out


def descendants(root: int) -> list[int]:
    """Live descendants of `root` (children, grandchildren, ...)."""
    children: dict[int, list[int]] = {}
    for pid, ppid in parents().items():
        children.setdefault(ppid, []).append(pid)
    out: list[int] = []
    todo = [root]
    while todo:
        pid = todo.pop()
        for child in children.get(pid, ()):
            out.append(child)
            todo.append(child)
    return out


def tree(root: int) -> list[int]:
    """The root and its live descendants."""
    return [root, *descendants(root)]


def cpu_seconds(root: int) -> float:
    """CPU time (user+system) of the tree, including reaped children."""
    ticks = 0
    for pid in tree(root):
        fields = _stat_fields(pid)
        if fields is None:
            continue
        # utime, stime, cutime, cstime are stat fields 14-17 (1-based).
        ticks += sum(int(f) for f in fields[11:15])
    return ticks / CLK_TCK


def pss_kib(root: int) -> int:
    """Proportional set size of the tree in KiB (shared pages split fairly)."""
    total = 0
    for pid in tree(root):
        try:
            text = (PROC / str(pid) / "smaps_rollup").read_text()
        except (FileNotFoundError, ProcessLookupError, PermissionError):
            continue
        for line in text.splitlines():
            if line.startswith("Pss:"):
                total += int(line.split()[1])
                break
    return total


def rss_kib(pid: int) -> int:
    """Resident set of one process (VmRSS), KiB."""
    try:
        for line in (PROC / str(pid) / "status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    except (FileNotFoundError, ProcessLookupError):
        pass
    return 0


def mem_available_kib() -> int:
    """MemAvailable from /proc/meminfo (the guard against swamping the machine)."""
    for line in (PROC / "meminfo").read_text().splitlines():
        if line.startswith("MemAvailable:"):
            return int(line.split()[1])
    return 0


def self_cpu_seconds() -> float:
    """This process's CPU time (the load generator's own cost)."""
    ru = resource.getrusage(resource.RUSAGE_SELF)
    return ru.ru_utime + ru.ru_stime


def listening(port: int) -> bool:
    """Whether something listens on 127.0.0.1:port (read from /proc/net/tcp, no probe)."""
    want = f"0100007F:{port:04X}"
    try:
        lines = (PROC / "net" / "tcp").read_text().splitlines()[1:]
    except OSError:
        return False
    return any(parts[1] == want and parts[3] == "0A" for parts in (line.split() for line in lines))


def _all_ticks() -> dict[int, tuple[int, int]]:
    """pid -> (utime+stime ticks, ppid) for every live process."""
    out: dict[int, tuple[int, int]] = {}
    for entry in os.scandir(PROC):
        if entry.name.isdigit():
            fields = _stat_fields(int(entry.name))
            if fields is not None:
                out[int(entry.name)] = (int(fields[11]) + int(fields[12]), int(fields[1]))
    return out


def _subtrees(procs: dict[int, tuple[int, int]], roots: set[int]) -> set[int]:
    children: dict[int, list[int]] = {}
    for pid, (_, ppid) in procs.items():
        children.setdefault(ppid, []).append(pid)
    seen, todo = set(roots), list(roots)
    while todo:
        for child in children.get(todo.pop(), ()):
            if child not in seen:
                seen.add(child)
                todo.append(child)
    return seen


def cpu_busy_seconds() -> dict[str, float]:
    """Per CPU since boot: time in processes (user+nice+system) and in softirq, /proc/stat.

    Interrupt and softirq time is not charged to any process's utime/stime, so
    it is kept apart (`cpuN_softirq`): on loopback much of TCP receive runs there.
    """
    out: dict[str, float] = {}
    for line in (PROC / "stat").read_text().splitlines():
        if not line.startswith("cpu") or line.startswith("cpu "):
            continue
        name, *vals = line.split()
        ticks = [int(v) for v in vals[:8]]
        out[name] = (ticks[0] + ticks[1] + ticks[2]) / CLK_TCK
        out[f"{name}_softirq"] = (ticks[5] + ticks[6]) / CLK_TCK
        out[f"{name}_steal"] = ticks[7] / CLK_TCK  # the hypervisor ran someone else
    return out


def foreign_load(seconds: float = 1.0) -> float:
    """Cores kept busy by processes other than this one over `seconds` (blocking sample)."""
    b0, s0 = cpu_busy_seconds(), self_cpu_seconds()
    time.sleep(seconds)
    b1, s1 = cpu_busy_seconds(), self_cpu_seconds()
    procs = sum(b1[k] - b0[k] for k in b1 if not k.endswith(("_softirq", "_steal")))
    return max(0.0, procs - (s1 - s0)) / seconds


@dataclass
class Meter:
    """CPU of a process tree and of the generator across one phase.

    Also the busy time of each CPU, so that work by anything else on the
    machine during the window (another user's tests, say) shows up.
    """

    pid: int
    relay_cpu0: float = 0.0
    gen_cpu0: float = 0.0
    relay_cpu: float = 0.0
    gen_cpu: float = 0.0
    wall: float = 0.0
    busy: dict[str, float] | None = None
    foreign_cpu: float = 0.0
    _procs0: dict[int, tuple[int, int]] | None = None

    def start(self) -> Meter:
        """Take the 'before' readings."""
        self.relay_cpu0 = cpu_seconds(self.pid)
        self.gen_cpu0 = self_cpu_seconds()
        self.busy = cpu_busy_seconds()
        self._procs0 = _all_ticks()
        self.wall = time.monotonic()
        return self

    def stop(self) -> Meter:
        """Take the 'after' readings."""
        self.relay_cpu = cpu_seconds(self.pid) - self.relay_cpu0
        self.gen_cpu = self_cpu_seconds() - self.gen_cpu0
        self.wall = time.monotonic() - self.wall
        after = cpu_busy_seconds()
        before = self.busy or {}
        self.busy = {k: after[k] - before.get(k, 0.0) for k in after}
        # Other processes, one by one (those that started and ended inside the window
        # are missed here; the /proc/stat difference in `report` may catch them).
        procs1, procs0 = _all_ticks(), self._procs0 or {}
        ours = _subtrees(procs1, {self.pid, os.getpid()}) | _subtrees(
            procs0, {self.pid, os.getpid()}
        )
        ticks = sum(
            t - procs0.get(pid, (0, 0))[0] for pid, (t, _) in procs1.items() if pid not in ours
        )
        self.foreign_cpu = max(0, ticks) / CLK_TCK
        return self

    def report(self) -> dict[str, float]:
        """Busy % of each CPU and two estimates of CPU time taken by other processes.

        `other_cpu_s`: busy time of both CPUs (/proc/stat, processes and softirq)
        minus the relay's and this process's own. /proc/stat is sampled per tick
        while task times are exact, so under heavy load this reads low, even
        negative; it still catches short-lived processes. `foreign_cpu_s`: the
        sum over every other live process, exact but blind to processes that
        came and went inside the window. The echo server lives in this process.
        """
        busy = self.busy or {}
        wall = max(self.wall, 1e-9)
        out = {f"{k}_busy_pct": round(100 * v / wall, 1) for k, v in sorted(busy.items())}
        procs = sum(v for k, v in busy.items() if not k.endswith("_steal"))
        out["other_cpu_s"] = round(procs - self.relay_cpu - self.gen_cpu, 2)
        out["foreign_cpu_s"] = round(self.foreign_cpu, 2)
        out["window_s"] = round(wall, 3)
        return out


def raise_nofile(limit: int) -> None:
    """Raise RLIMIT_NOFILE (soft and hard; root may go up to fs.nr_open)."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft >= limit:
        return
    try:
        resource.setrlimit(resource.RLIMIT_NOFILE, (limit, max(hard, limit)))
    except (ValueError, OSError):
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
