"""Audit events for every access, and no secret in any log line."""

from __future__ import annotations

import json
import ssl
from collections.abc import Callable
from typing import Any

import pytest
from structlog.testing import capture_logs
from websockets.asyncio.client import connect
from websockets.exceptions import InvalidStatus

from relayd.auth import Principal
from relayd.sim import SimulatedGuest

from .conftest import running, wait_port_up

PASSWORD = "Tr0ub4dor-and-3"
SUB: Any = "relayd.console.v1"
TYPED = b"echo my-private-command-xyzzy"


async def test_full_session_logs_audit_events_and_never_a_secret(
    write_config: Callable[..., Any],
    open_console: Callable[..., Any],
    token: Callable[..., str],
    client_ssl: ssl.SSLContext,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """Login, a typed command, a takeover and a bad token: audited, yet no token/password/keys."""
    guest = SimulatedGuest("vm-sim", password=PASSWORD)
    port = await guest.start()
    bad_token = token("alice", audience="not-relayd")
    caplog.set_level("DEBUG")
    try:
        config = write_config(vms=[{"id": "vm-sim", "serial": f"telnet://127.0.0.1:{port}"}])
        with capture_logs() as events:
            async with running(config) as gw:
                await wait_port_up(gw, "vm-sim")
                async with open_console(gw, "vm-sim", user="alice") as alice:
                    await alice.send(b"\r")
                    await alice.expect(b"login: ")
                    await alice.send(b"operator\r")
                    await alice.expect(b"Password: ")
                    await alice.send(PASSWORD.encode() + b"\r")
                    await alice.expect(b"$ ")
                    await alice.send(TYPED + b"\r")
                    await alice.expect(b"xyzzy\r\n")
                    async with open_console(gw, "vm-sim", user="bob") as bob:
                        await alice.closed()
                        await bob.send({"type": "break"})
                with pytest.raises(InvalidStatus):
                    async with connect(
                        f"wss://localhost:{gw.tls_port}/v1/vms/vm-sim/console",
                        ssl=client_ssl,
                        additional_headers={"Authorization": f"Bearer {bad_token}"},
                    ):
                        pass
                # A browser's way in: a ticket, used once, then refused on reuse.
                ticket = gw.access.tickets.issue(Principal("user:alice"), "vm-sim", "spectate", 0.0)
                url = f"wss://localhost:{gw.tls_port}/v1/vms/vm-sim/console?ticket={ticket}"
                with pytest.raises(InvalidStatus):  # issued at clock 0: long expired
                    async with connect(url, ssl=client_ssl, subprotocols=[SUB]):
                        pass
    finally:
        await guest.close()

    # Everything the gateway side logged (the test's own websockets client logs headers at DEBUG).
    server_records = [r for r in caplog.records if not r.name.startswith("websockets.client")]
    everything = json.dumps(events, default=str) + "".join(r.getMessage() for r in server_records)
    for secret in (PASSWORD, "xyzzy", bad_token, bad_token.split(".")[2], ticket):
        assert secret not in everything
    audit = [e for e in events if e.get("audit")]
    names = [e["event"] for e in audit]
    assert names.count("session_started") == 2
    assert names.count("session_ended") == 2
    assert "break_sent" in names
    assert "auth_failed" in names
    ended = next(
        e for e in audit if e["event"] == "session_ended" and e["principal"] == "user:alice"
    )
    assert ended["reason"] == "taken over by user:bob"
    assert ended["bytes_in"] > len(TYPED)
    assert ended["bytes_out"] > 0
    assert ended["peer"] == "127.0.0.1"
    assert ended["region"] == "test"
    assert ended["duration"] >= 0
    failed = next(e for e in audit if e["event"] == "auth_failed")
    assert failed["reason"] == "invalid_audience"
