"""Profilers attached to a relay during measured windows: py-spy and perf.

`--profile` samples relayd's Python stacks with py-spy; `--perf` records the
relay's whole core with `perf record` (any relay, native code and kernel
included). Both run pinned to the generator's CPU so they do not take the
relay's, write their raw data beside the results, and leave a summary (shares
of samples by function, or by shared object and symbol) in the run's JSON
under `profiles`.
"""

from __future__ import annotations

import asyncio
import contextlib
import shutil
import signal
import subprocess
import sys
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .machine import GEN_CPU
from .peers import RELAY_CPU, Peer


@dataclass
class Profiler:
    """Which profilers run during measured windows, and what they found.

    Args:
        directory: where the raw profiles go (`profile-LABEL.txt`, `perf-LABEL.data`).
        py_spy: sample relayd (only relayd) with py-spy.
        perf: record the relay's core with perf, whichever relay it is.
    """

    directory: Path
    py_spy: bool = False
    perf: bool = False
    found: dict[str, Any] = field(default_factory=dict)
    """Summaries by label: `LABEL` for py-spy, `perf-LABEL` for perf."""

    @contextlib.asynccontextmanager
    async def window(self, peer: Peer, label: str) -> AsyncIterator[None]:
        """Profile `peer` for the duration of the block, as the options say."""
        if self.perf:
            data = self.directory / f"perf-{label}.data"
            recorder = _spawn_perf(data)
            try:
                async with self._py_spy(peer, label):
                    yield
            finally:
                if recorder is not None:
                    recorder.send_signal(signal.SIGINT)
                    with contextlib.suppress(subprocess.TimeoutExpired):
                        await asyncio.to_thread(recorder.wait, 30)
                    if recorder.poll() is None:
                        recorder.kill()
                    self.found[f"perf-{label}"] = await asyncio.to_thread(summarize_perf, data)
            return
        async with self._py_spy(peer, label):
            yield

    @contextlib.asynccontextmanager
    async def _py_spy(self, peer: Peer, label: str) -> AsyncIterator[None]:
        out = self.directory / f"profile-{label}.txt"
        relayd = self.py_spy and peer.name.startswith("relayd")
        proc = _spawn_py_spy(peer.pid, out) if relayd else None
        if proc is None:
            yield
            return
        try:
            await asyncio.sleep(0.5)
            yield
        finally:
            proc.send_signal(signal.SIGINT)
            with contextlib.suppress(subprocess.TimeoutExpired):
                await asyncio.to_thread(proc.wait, 10)
            if proc.poll() is None:
                proc.kill()
                proc.wait(5)
            self.found[label] = summarize_profile(out)


def _spawn_py_spy(pid: int, out: Path) -> subprocess.Popen[bytes] | None:
    spy = shutil.which("py-spy") or str(Path(sys.executable).parent / "py-spy")
    if not Path(spy).exists():
        return None
    argv = [spy, "record", "--pid", str(pid), "--rate", "250", "--format", "raw"]
    argv += ["--output", str(out), "--nonblocking"]
    return subprocess.Popen(
        ["taskset", "-c", str(GEN_CPU), *argv],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )


def _spawn_perf(out: Path) -> subprocess.Popen[bytes] | None:
    perf = shutil.which("perf")
    if perf is None:
        return None
    argv = [perf, "record", "-q", "-C", RELAY_CPU, "-F", "999", "-o", str(out)]
    return subprocess.Popen(
        ["taskset", "-c", str(GEN_CPU), *argv],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )


def summarize_perf(path: Path, top: int = 12) -> dict[str, Any]:
    """Shares of the relay core's samples by shared object, then by symbol."""
    out: dict[str, Any] = {}
    for key, sort in (("by_dso", "dso"), ("by_symbol", "dso,sym")):
        try:
            text = subprocess.run(
                ["perf", "report", "-i", str(path), "--stdio", "--sort", sort, "-q"],
                capture_output=True,
                text=True,
                timeout=120,
                check=False,
            ).stdout
        except (OSError, subprocess.TimeoutExpired) as exc:
            return {"error": str(exc)}
        rows = [line.split(None, 1) for line in text.splitlines() if "%" in line]
        out[key] = [[r[0], " ".join(r[1].split())] for r in rows[:top] if len(r) == 2]
    return out


def summarize_profile(path: Path, top: int = 25) -> dict[str, Any]:
    """Self and inclusive sample shares by function from py-spy's collapsed stacks."""
    if not path.exists():
        return {"error": "no profile written"}
    self_n: dict[str, int] = {}
    incl: dict[str, int] = {}
    total = 0
    for line in path.read_text().splitlines():
        stack, _, count = line.rpartition(" ")
        if not stack or not count.isdigit():
            continue
        n = int(count)
        total += n
        frames = [f.rsplit(" (", 1)[0] + " (" + f.rsplit("/", 1)[-1] for f in stack.split(";")]
        frames = [f.split(":")[0] + ")" if f.endswith(")") else f for f in frames]
        self_n[frames[-1]] = self_n.get(frames[-1], 0) + n
        for f in set(frames):
            incl[f] = incl.get(f, 0) + n

    def pct(d: dict[str, int]) -> list[tuple[str, float]]:
        return [
            (k, round(100 * v / total, 1))
            for k, v in sorted(d.items(), key=lambda kv: -kv[1])[:top]
        ]

    return {
        "samples": total,
        "self_pct": pct(self_n),
        "inclusive_pct": pct(incl),
        "file": str(path),
    }
