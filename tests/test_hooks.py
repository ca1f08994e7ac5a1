"""NMI/reset hook results reach only the session that ran the hook (issue 15, item 12).

A hook's result can quote its stderr (hypervisor host names, paths, whatever the
operator's script prints for operators); readers watching the same console
must learn only that a hook ran and who ran it. Real sessions, real processes.
"""

from __future__ import annotations

import json
import os
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

from structlog.testing import capture_logs

from .conftest import TIMEOUT, Console, FarEnd, running, wait_hub, wait_port_up

STDERR_SECRET = "hv-node-17.internal: /srv/vm-a/qmp.sock refused"
HOOK_EVENTS = ("hook_result", "hook_ran")


def _failing_hook(status: int) -> list[str]:
    """An argv that prints an operator-only line on stderr and exits with `status`."""
    script = f"import sys; sys.stderr.write({STDERR_SECRET!r} + '\\n'); sys.exit({status})"
    return [sys.executable, "-c", script]


async def _first_hook_notice(console: Console) -> dict[str, Any]:
    """The first hook_result or hook_ran notice this console gets (whichever comes)."""
    import asyncio

    async with asyncio.timeout(TIMEOUT):
        while True:
            for i, msg in enumerate(console.controls):
                if msg.get("type") == "notice" and msg.get("event") in HOOK_EVENTS:
                    del console.controls[i]
                    return msg
            await console._recv()


def _roles() -> list[tuple[str, str, str]]:
    return [
        ("user:olga", "owner", "/subscriptions/sub-1/vms/vm-a"),
        ("user:alice", "contributor", "/subscriptions/sub-1"),
        ("user:rita", "reader", "/subscriptions/sub-1"),
    ]


async def test_hook_failure_goes_to_the_owner_who_ran_it_and_readers_learn_only_that_it_ran(
    write_config: Callable[..., Any], far_end: FarEnd, open_console: Callable[..., Any]
) -> None:
    """The owner gets exit status and stderr; a reader and a contributor get hook_ran only."""
    config = write_config(
        vms=[
            {
                "id": "vm-a",
                "serial": f"tcp://127.0.0.1:{far_end.port}",
                "reset_command": _failing_hook(3),
            }
        ],
        roles=_roles(),
    )
    with capture_logs() as events:
        async with running(config) as gw:
            await wait_port_up(gw, "vm-a")
            async with (
                open_console(gw, "vm-a", user="olga") as olga,
                open_console(gw, "vm-a", user="rita", mode="spectate") as rita,
                open_console(gw, "vm-a", user="alice", mode="spectate") as alice,
            ):
                assert olga.hello["role"] == "writer"
                await olga.send({"type": "reset"})
                mine = await _first_hook_notice(olga)
                assert mine["event"] == "hook_result"
                assert mine["hook"] == "reset_command"
                assert mine["ok"] is False
                assert "status 3" in mine["message"]
                assert STDERR_SECRET in mine["message"]
                for watcher in (rita, alice):
                    theirs = await _first_hook_notice(watcher)
                    assert theirs == {
                        "type": "notice",
                        "event": "hook_ran",
                        "hook": "reset_command",
                        "by": "user:olga",
                    }
                    assert STDERR_SECRET not in json.dumps(watcher.controls)
    finished = [e for e in events if e.get("audit") and e["event"] == "hook_finished"]
    assert len(finished) == 1
    record = finished[0]
    assert record["principal"] == "user:olga"
    assert record["session_id"] == olga.hello["session"]
    assert record["vm"] == "vm-a"
    assert record["hook"] == "reset_command"
    assert record["ok"] is False
    assert STDERR_SECRET in record["error"]
    assert (record["peer"], record["region"]) == ("127.0.0.1", "test")


async def test_hook_success_status_goes_to_the_owner_and_spectators_get_hook_ran(
    write_config: Callable[..., Any],
    far_end: FarEnd,
    open_console: Callable[..., Any],
    tmp_path: Path,
) -> None:
    """On success too, the exit status is the asker's; a second owner watching sees who ran it."""
    marker = tmp_path / "nmi-ran"
    config = write_config(
        vms=[
            {
                "id": "vm-a",
                "serial": f"tcp://127.0.0.1:{far_end.port}",
                "nmi_command": ["touch", str(marker)],
            }
        ],
        roles=[*_roles(), ("user:oscar", "owner", "/subscriptions/sub-1")],
    )
    async with running(config) as gw:
        await wait_port_up(gw, "vm-a")
        async with (
            open_console(gw, "vm-a", user="oscar", mode="spectate") as oscar,
            open_console(gw, "vm-a", user="olga", mode="spectate") as olga,
        ):
            await olga.send({"type": "nmi"})  # an owner may run hooks as a spectator
            assert await _first_hook_notice(olga) == {
                "type": "notice",
                "event": "hook_result",
                "hook": "nmi_command",
                "ok": True,
                "status": 0,
            }
            assert await _first_hook_notice(oscar) == {
                "type": "notice",
                "event": "hook_ran",
                "hook": "nmi_command",
                "by": "user:olga",
            }
    assert marker.exists()


async def test_hook_result_of_a_session_that_left_is_audited_and_others_get_hook_ran(
    write_config: Callable[..., Any],
    far_end: FarEnd,
    open_console: Callable[..., Any],
    tmp_path: Path,
) -> None:
    """The asker closed before its hook finished: no one else gets its stderr; the audit does."""
    fifo = tmp_path / "release"
    os.mkfifo(fifo)
    # The hook waits for one line on the FIFO, then fails with an operator-only message.
    script = (
        f"import sys; open({str(fifo)!r}).readline(); "
        f"sys.stderr.write({STDERR_SECRET!r}); sys.exit(4)"
    )
    config = write_config(
        vms=[
            {
                "id": "vm-a",
                "serial": f"tcp://127.0.0.1:{far_end.port}",
                "reset_command": [sys.executable, "-c", script],
            }
        ],
        roles=_roles(),
    )
    # Read-write: opening never blocks, and the line waits in the pipe for the hook.
    release = os.open(fifo, os.O_RDWR | os.O_NONBLOCK)
    try:
        with capture_logs() as events:
            async with running(config) as gw:
                await wait_port_up(gw, "vm-a")
                async with open_console(gw, "vm-a", user="rita", mode="spectate") as rita:
                    async with open_console(gw, "vm-a", user="olga") as olga:
                        await olga.send({"type": "reset"})
                        olga_session = olga.hello["session"]
                    await wait_hub(gw, "vm-a", lambda hub: olga_session not in hub.clients)
                    os.write(release, b"go\n")
                    theirs = await _first_hook_notice(rita)
                    assert theirs["event"] == "hook_ran"
                    assert theirs["by"] == "user:olga"
                    assert STDERR_SECRET not in json.dumps(rita.controls)
    finally:
        os.close(release)
    finished = [e for e in events if e.get("audit") and e["event"] == "hook_finished"]
    assert [(e["session_id"], e["ok"]) for e in finished] == [(olga_session, False)]
    assert STDERR_SECRET in finished[0]["error"]
