"""`make run-cluster` (scripts/run-cluster.py): a region up, the demo lines, all stopped."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import ssl
import sys
from pathlib import Path

from websockets.asyncio.client import connect

from .processes import ROOT, START_TIMEOUT, free_port

WORDS = ("web", "token", "ca", "config", "guest-login", "connect", "health")


def _gone(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    return False


async def test_run_cluster_prints_demo_lines_serves_through_haproxy_and_stops_everything(
    tmp_path: Path,
) -> None:
    """The `relayd demo` lines with web: on HAProxy, a gateway: line each; SIGINT stops all."""
    front = free_port("127.0.0.1")
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        str(ROOT / "scripts" / "run-cluster.py"),
        "--certs", str(tmp_path / "certs"),
        "--state-dir", str(tmp_path / "state"),
        "--listen", f"127.0.0.1:{front}",
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )  # fmt: skip
    assert proc.stdout is not None
    lines: dict[str, list[str]] = {}
    try:
        async with asyncio.timeout(START_TIMEOUT):
            while len(lines.get("gateway", [])) < 3:
                line = (await proc.stdout.readline()).decode()
                assert line, "run-cluster exited: " + (await proc.stderr.read()).decode()  # type: ignore[union-attr]
                word, _, rest = line.rstrip("\n").partition(": ")
                lines.setdefault(word, []).append(rest)
        assert all(len(lines[w]) == 1 for w in WORDS), lines
        assert lines["web"] == [f"https://127.0.0.1:{front}/"]
        assert lines["guest-login"] == ["operator/relayd"]
        gateways = [g.split() for g in lines["gateway"]]
        assert [g[0] for g in gateways] == ["gw-1", "gw-2", "gw-3"]
        pids = [int(g[g.index("pid") + 1]) for g in gateways]
        # Through HAProxy, to every simulated VM: the guest answers.
        ctx = ssl.create_default_context(cafile=lines["ca"][0])
        for vm in ("demo-1", "demo-2", "demo-3"):
            async with connect(
                f"wss://127.0.0.1:{front}/v1/vms/{vm}/console",
                ssl=ctx,
                server_hostname="localhost",
                subprotocols=["relayd.console.v1"],  # type: ignore[list-item]
                additional_headers={"Authorization": f"Bearer {lines['token'][0]}"},
            ) as ws:
                assert json.loads(await ws.recv())["role"] == "writer"
                await ws.send(b"\r")
                seen = b""
                async with asyncio.timeout(START_TIMEOUT):
                    while f"{vm} login: ".encode() not in seen:
                        message = await ws.recv()
                        seen += message if isinstance(message, bytes) else b""
        proc.send_signal(signal.SIGINT)
        async with asyncio.timeout(START_TIMEOUT):
            assert await proc.wait() == 0
        assert all(_gone(pid) for pid in pids)
    finally:
        if proc.returncode is None:
            # SIGTERM first: its children run in sessions of their own, so only the
            # script can stop them; SIGKILL would leave them running.
            proc.terminate()
            try:
                async with asyncio.timeout(START_TIMEOUT):
                    await proc.wait()
            except TimeoutError:
                proc.kill()
                await proc.wait()
