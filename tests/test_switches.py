"""Console switches: persisted before they apply, so a failed write changes nothing (issue 15, 11).

A full disk is made real without mounting anything: the switch file's temporary
path is a symlink to /dev/full (every write fails with ENOSPC), or a directory
sits where the temporary file must go (EISDIR); both stop root as well.
"""

from __future__ import annotations

import json
import os
import ssl
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from relayd.errors import ConfigError
from relayd.switches import ConsoleSwitches

from .conftest import FarEnd, http_request, https_exchange, running, wait_port_up

DEV_FULL = Path("/dev/full")


def _obstruct(temp: Path, how: str) -> None:
    """Make every write of the switch file fail at its temporary path."""
    temp.parent.mkdir(parents=True, exist_ok=True)
    if how == "disk_full":
        temp.symlink_to(DEV_FULL)
    else:
        temp.mkdir()


def _clear(temp: Path) -> None:
    """Room again (relayd itself removes a temp file it could not finish)."""
    if temp.is_dir() and not temp.is_symlink():
        temp.rmdir()
    else:
        temp.unlink(missing_ok=True)


OBSTRUCTIONS = [
    pytest.param(
        "disk_full",
        marks=pytest.mark.skipif(not DEV_FULL.exists(), reason="no /dev/full here"),
    ),
    "directory_in_the_way",
]


def test_switches_set_then_reload_reads_the_same_state(tmp_path: Path) -> None:
    """A switch written by one instance is what the next (a restart) reads."""
    switches = ConsoleSwitches(tmp_path / "state")
    switches.set("vms", "vm-a", False)
    switches.set("subscriptions", "sub-1", True)
    again = ConsoleSwitches(tmp_path / "state")
    again.load()
    assert again.get("vms", "vm-a") is False
    assert again.get("subscriptions", "sub-1") is True
    assert not switches.temp_path.exists()


def test_switches_keep_a_clusters_times_and_refuse_a_file_whose_times_are_not_numbers(
    tmp_path: Path,
) -> None:
    """A cluster gateway's copy keeps when each override changed (what it puts back after
    Redis loses its data is ordered by it), through a restart and a single-gateway set; a
    times section that is not numbers stops the start like any unreadable file."""
    switches = ConsoleSwitches(tmp_path / "state")
    switches.replace({"vms": {"vm-a": False}}, {"vms": {"vm-a": 1_700_000_000_123}})
    switches.set("vms", "vm-b", True)
    again = ConsoleSwitches(tmp_path / "state")
    again.load()
    assert again.snapshot()["vms"] == {"vm-a": False, "vm-b": True}
    assert again.times()["vms"] == {"vm-a": 1_700_000_000_123}
    for times in ('{"vms": {"vm-a": "soon"}}', '{"vms": {"vm-a": true}}', "[]", '{"vms": 3}'):
        switches.path.write_text('{"vms": {"vm-a": false}, "times": ' + times + "}")
        with pytest.raises(ConfigError, match="not a console switch file"):
            ConsoleSwitches(tmp_path / "state").load()


@pytest.mark.parametrize("how", OBSTRUCTIONS)
def test_switches_failed_write_raises_state_write_error_and_changes_nothing(
    tmp_path: Path, how: str
) -> None:
    """A write that fails leaves memory and disk as they were, and says so with a 500 error."""
    from relayd.errors import StateWriteError

    switches = ConsoleSwitches(tmp_path / "state")
    switches.set("vms", "vm-a", True)
    before = switches.path.read_bytes()
    _obstruct(switches.temp_path, how)
    with pytest.raises(StateWriteError) as info:
        switches.set("vms", "vm-a", False)
    assert info.value.http_status == 500
    assert info.value.code == "state_write_failed"
    assert "not changed" in info.value.message
    assert switches.get("vms", "vm-a") is True  # memory unchanged
    assert switches.get("subscriptions", "sub-1") is None
    assert switches.path.read_bytes() == before  # disk unchanged
    _clear(switches.temp_path)
    switches.set("vms", "vm-a", False)  # the next write, with room again, works
    assert switches.get("vms", "vm-a") is False


async def _put_switch(gw: Any, ctx: ssl.SSLContext, bearer: str, enabled: bool) -> Any:
    body = json.dumps({"enabled": enabled}).encode()
    request = http_request("PUT", "/v1/vms/vm-a/serial-console", bearer=bearer, body=body)
    status, headers, raw = await https_exchange(gw.tls_port, ctx, request)
    return status, headers, json.loads(raw)


@pytest.mark.parametrize("how", OBSTRUCTIONS)
async def test_switch_put_on_a_full_disk_answers_500_and_the_console_stays_on(
    write_config: Callable[..., Any],
    far_end: FarEnd,
    client_ssl: ssl.SSLContext,
    token: Callable[..., str],
    open_console: Callable[..., Any],
    how: str,
) -> None:
    """PUT serial-console that cannot be saved: 500 with a JSON error, sessions stay, state too."""
    config = write_config(
        vms=[{"id": "vm-a", "serial": f"tcp://127.0.0.1:{far_end.port}"}],
        roles=[("user:olga", "owner", "/subscriptions/sub-1")],
    )
    async with running(config) as gw:
        await wait_port_up(gw, "vm-a")
        _obstruct(gw.access.switches.temp_path, how)
        async with open_console(gw, "vm-a", user="olga") as olga:
            status, headers, body = await _put_switch(gw, client_ssl, token("olga"), False)
            assert status == 500
            assert headers["content-type"] == "application/json"
            assert body["error"] == "state_write_failed"
            assert "not changed" in body["message"]
            assert gw.console_enabled(gw.hubs["vm-a"].vm) is True
            # The live session was not closed: the console is still on.
            await olga.send(b"still here\r")
            await far_end.wait_received(lambda b: b"still here" in b)
        assert not gw.access.switches.path.exists()
        _clear(gw.access.switches.temp_path)
        status, _, body = await _put_switch(gw, client_ssl, token("olga"), False)
        assert (status, body["enabled"]) == (200, False)
    async with running(config) as gw:  # a restart reads what was answered 200
        assert gw.console_enabled(gw.hubs["vm-a"].vm) is False
        assert os.listdir(gw.access.switches.path.parent).count(gw.access.switches.path.name) == 1
