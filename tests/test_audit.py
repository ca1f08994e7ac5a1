"""Audit events for every access, and no secret in any log line."""

from __future__ import annotations

import json
import re
import ssl
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from structlog.testing import capture_logs
from websockets.asyncio.client import connect
from websockets.exceptions import InvalidStatus

from relayd.audit import EVENTS
from relayd.auth import Principal
from relayd.sim import SimulatedGuest

from .conftest import FarEnd, http_request, https_exchange, running, wait_hub, wait_port_up

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


async def test_listing_log_reads_and_ticket_issuance_are_audited_without_the_ticket(
    write_config: Callable[..., Any],
    far_end: FarEnd,
    token: Callable[..., str],
    client_ssl: ssl.SSLContext,
) -> None:
    """GET /v1/vms, GET .../console-log and POST .../tickets each leave an audit event."""
    config = write_config(vms=[{"id": "vm-a", "serial": f"tcp://127.0.0.1:{far_end.port}"}])
    bearer = token("rita")
    async with running(config) as gw:
        await wait_port_up(gw, "vm-a")
        await far_end.send(b"boot log\r\n")
        await wait_hub(gw, "vm-a", lambda hub: hub.end >= 10)
        with capture_logs() as events:
            for method, path in (
                ("GET", "/v1/vms"),
                ("GET", "/v1/vms/vm-a/console-log?from=5"),
                ("POST", "/v1/vms/vm-a/console/tickets"),
            ):
                status, _, body = await https_exchange(
                    gw.tls_port, client_ssl, http_request(method, path, bearer=bearer)
                )
                assert status in (200, 201)
    ticket = json.loads(body)["ticket"]
    audit = {e["event"]: e for e in events if e.get("audit")}
    common = {"principal": "user:rita", "peer": "127.0.0.1", "region": "test"}
    assert audit["vms_listed"] == {**audit["vms_listed"], **common, "count": 1}
    assert audit["console_log_read"] == {
        **audit["console_log_read"],
        **common,
        "vm": "vm-a",
        "offset": 5,
        "bytes": 5,
    }
    assert audit["ticket_issued"] == {
        **audit["ticket_issued"],
        **common,
        "vm": "vm-a",
        "mode": "interactive",
        "expires_in": 30,
    }
    assert ticket not in json.dumps(events, default=str)


@pytest.mark.parametrize("policy", ["evict", "demote"])
async def test_displaced_writer_events_carry_peer_and_region(
    write_config: Callable[..., Any], far_end: FarEnd, open_console: Callable[..., Any], policy: str
) -> None:
    """writer_evicted and writer_demoted name the real address and region, like other events."""
    config = write_config(
        vms=[{"id": "vm-a", "serial": f"tcp://127.0.0.1:{far_end.port}", "takeover": policy}]
    )
    async with running(config) as gw:
        await wait_port_up(gw, "vm-a")
        async with open_console(gw, "vm-a", user="alice") as alice:
            with capture_logs() as events:
                async with open_console(gw, "vm-a", user="bob") as bob:
                    assert bob.hello["role"] == "writer"
            del alice
    name = {"evict": "writer_evicted", "demote": "writer_demoted"}[policy]
    event = next(e for e in events if e["event"] == name)
    assert event["principal"] == "user:alice"
    assert (event["by"], event["peer"], event["by_peer"]) == ("user:bob", "127.0.0.1", "127.0.0.1")
    assert event["region"] == "test"


def test_audit_doc_lists_every_event() -> None:
    """docs/audit.md has a row for each name audit() accepts, and no other."""
    doc = (Path(__file__).resolve().parent.parent / "docs" / "audit.md").read_text()
    documented = set()
    for line in doc.splitlines():
        if line.startswith("| `"):
            first_cell = line.split("|")[1]
            documented |= set(re.findall(r"`([a-z_]+)`", first_cell))
    assert documented == set(EVENTS)
