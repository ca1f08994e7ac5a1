"""Access control end to end: tickets, console switches, client certificates, rate limits."""

from __future__ import annotations

import asyncio
import json
import re
import ssl
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import trustme
from structlog.testing import capture_logs
from websockets.asyncio.client import connect
from websockets.exceptions import InvalidMessage

from relayd.access import AccessPolicy
from relayd.config import load_config

from .conftest import (
    TIMEOUT,
    FarEnd,
    console_url,
    http_request,
    https_exchange,
    refused_upgrade,
    running,
    wait_port_up,
)

SS_RG_WEB = "/v1/subscriptions/sub-1/resourceGroups/rg/virtualMachineScaleSets/web/serial-console"


def _ss_path(rg: str, ss: str = "web") -> str:
    return (
        f"/v1/subscriptions/sub-1/resourceGroups/{rg}/virtualMachineScaleSets/{ss}/serial-console"
    )


async def _request(
    gw: Any,
    ctx: ssl.SSLContext,
    method: str,
    path: str,
    *,
    bearer: str | None = None,
    body: object = None,
) -> tuple[int, dict[str, str], Any]:
    """One HTTP request over TLS; returns status, headers, parsed JSON body."""
    payload = b"" if body is None else json.dumps(body).encode()
    request = http_request(method, path, bearer=bearer, body=payload)
    status, headers, raw = await https_exchange(gw.tls_port, ctx, request)
    return status, headers, json.loads(raw) if raw else None


async def test_ticket_opens_console_once_with_its_mode(
    write_config: Callable[..., Any],
    far_end: FarEnd,
    client_ssl: ssl.SSLContext,
    token: Callable[..., str],
) -> None:
    """A ticket from POST .../tickets opens the console without headers, once, in its mode."""
    config = write_config(vms=[{"id": "vm-a", "serial": f"tcp://127.0.0.1:{far_end.port}"}])
    async with running(config) as gw:
        await wait_port_up(gw, "vm-a")
        status, _, body = await _request(
            gw,
            client_ssl,
            "POST",
            "/v1/vms/vm-a/console/tickets",
            bearer=token("alice"),
            body={"mode": "spectate"},
        )
        assert status == 201
        assert body["expires_in"] == 30
        url = console_url(gw, "vm-a", f"ticket={body['ticket']}")
        async with connect(
            url,
            ssl=client_ssl,
            subprotocols=["relayd.console.v1"],  # type: ignore[list-item]
        ) as ws:
            hello = json.loads(await asyncio.wait_for(ws.recv(), TIMEOUT))
            assert hello["role"] == "spectator"
        assert await refused_upgrade(url, client_ssl) == (401, "invalid_ticket")
        # Bound to the VM: a ticket for vm-a does not open anything else.
        _, _, body = await _request(
            gw, client_ssl, "POST", "/v1/vms/vm-a/console/tickets", bearer=token("alice")
        )
        other = console_url(gw, "vm-b", f"ticket={body['ticket']}")
        assert await refused_upgrade(other, client_ssl) == (401, "invalid_ticket")


async def test_ticket_needs_a_role_and_a_token(
    write_config: Callable[..., Any],
    far_end: FarEnd,
    client_ssl: ssl.SSLContext,
    token: Callable[..., str],
) -> None:
    """No token: 401; a principal without a role on the VM: 404."""
    config = write_config(vms=[{"id": "vm-a", "serial": f"tcp://127.0.0.1:{far_end.port}"}])
    async with running(config) as gw:
        status, headers, body = await _request(
            gw, client_ssl, "POST", "/v1/vms/vm-a/console/tickets"
        )
        assert (status, body["error"]) == (401, "missing_token")
        assert headers["www-authenticate"].startswith("Bearer")
        status, _, body = await _request(
            gw, client_ssl, "POST", "/v1/vms/vm-a/console/tickets", bearer=token("mallory")
        )
        assert (status, body["error"]) == (404, "unknown_vm")


async def test_owner_disables_vm_console_live_sessions_close_4009_and_it_persists(
    write_config: Callable[..., Any],
    far_end: FarEnd,
    client_ssl: ssl.SSLContext,
    token: Callable[..., str],
    open_console: Callable[..., Any],
) -> None:
    """PUT serial-console false: 4009 for live sessions, 403 for new ones, and after a restart."""
    roles = [
        ("user:olga", "owner", "/subscriptions/sub-1"),
        ("user:alice", "contributor", "/subscriptions/sub-1"),
    ]
    config = write_config(
        vms=[{"id": "vm-a", "serial": f"tcp://127.0.0.1:{far_end.port}"}], roles=roles
    )
    async with running(config) as gw:
        await wait_port_up(gw, "vm-a")
        status, _, body = await _request(
            gw,
            client_ssl,
            "PUT",
            "/v1/vms/vm-a/serial-console",
            bearer=token("alice"),
            body={"enabled": False},
        )
        assert (status, body["error"]) == (403, "forbidden")
        async with open_console(gw, "vm-a", user="alice") as alice:
            status, _, body = await _request(
                gw,
                client_ssl,
                "PUT",
                "/v1/vms/vm-a/serial-console",
                bearer=token("olga"),
                body={"enabled": False},
            )
            assert status == 200
            assert body == {
                "scope": "/subscriptions/sub-1/vms/vm-a",
                "enabled": False,
                "sessions_closed": 1,
            }
            code, reason = await alice.closed()
            assert code == 4009
            assert reason is not None
            assert "disabled" in reason
    async with running(config) as gw:
        bearer = {"Authorization": f"Bearer {token('alice')}"}
        refused = await refused_upgrade(
            console_url(gw, "vm-a"), client_ssl, additional_headers=bearer
        )
        assert refused == (403, "console_disabled")
        status, _, body = await _request(gw, client_ssl, "GET", "/v1/vms", bearer=token("alice"))
        assert body["vms"][0]["enabled"] is False
        await _request(
            gw,
            client_ssl,
            "PUT",
            "/v1/subscriptions/sub-1/serial-console",
            bearer=token("olga"),
            body={"enabled": True},
        )
        # The VM-level switch still says off: every level must be on.
        refused = await refused_upgrade(
            console_url(gw, "vm-a"), client_ssl, additional_headers=bearer
        )
        assert refused == (403, "console_disabled")
        status, _, _ = await _request(
            gw,
            client_ssl,
            "PUT",
            "/v1/vms/vm-a/serial-console",
            bearer=token("olga"),
            body={"enabled": True},
        )
        assert status == 200
        async with connect(
            console_url(gw, "vm-a"),
            ssl=client_ssl,
            subprotocols=["relayd.console.v1"],  # type: ignore[list-item]
            additional_headers=bearer,
        ) as ws:
            assert json.loads(await ws.recv())["type"] == "hello"


async def test_scale_set_switch_covers_its_instances_only(
    write_config: Callable[..., Any],
    far_end: FarEnd,
    client_ssl: ssl.SSLContext,
    token: Callable[..., str],
) -> None:
    """Disabling a scale set disables its instances and leaves other VMs alone."""
    serial = f"tcp://127.0.0.1:{far_end.port}"
    config = write_config(
        vms=[
            {"id": "ss-0", "serial": serial, "resource_group": "rg", "scale_set": "web"},
            {"id": "solo", "serial": serial},
        ],
        roles=[("user:olga", "owner", "/subscriptions/sub-1/resourceGroups/rg")],
    )
    async with running(config) as gw:
        status, _, body = await _request(
            gw,
            client_ssl,
            "PUT",
            SS_RG_WEB,
            bearer=token("olga"),
            body={"enabled": False},
        )
        assert status == 200
        assert body["scope"] == "/subscriptions/sub-1/resourceGroups/rg/virtualMachineScaleSets/web"
        assert not gw.console_enabled(gw.hubs["ss-0"].vm)
        assert gw.console_enabled(gw.hubs["solo"].vm)
        for bad in ({"enabled": "no"}, {"enabled": False, "x": 1}, [1]):
            status, _, body = await _request(
                gw,
                client_ssl,
                "PUT",
                SS_RG_WEB,
                bearer=token("olga"),
                body=bad,
            )
            assert (status, body["error"]) == (400, "bad_request")


async def test_scale_set_switch_is_per_resource_group_and_needs_that_scale_sets_owner(
    write_config: Callable[..., Any],
    far_end: FarEnd,
    client_ssl: ssl.SSLContext,
    token: Callable[..., str],
) -> None:
    """Two scale sets named web in rg-a and rg-b: each owner switches only their own."""
    serial = f"tcp://127.0.0.1:{far_end.port}"
    config = write_config(
        vms=[
            {"id": "a-0", "serial": serial, "resource_group": "rg-a", "scale_set": "web"},
            {"id": "b-0", "serial": serial, "resource_group": "rg-b", "scale_set": "web"},
        ],
        roles=[
            ("user:olga", "owner", "/subscriptions/sub-1/resourceGroups/rg-a"),
            ("user:olga", "reader", "/subscriptions/sub-1"),
            ("user:rick", "owner", "/subscriptions/sub-1/resourceGroups/rg-b"),
        ],
    )
    off, on = {"enabled": False}, {"enabled": True}
    async with running(config) as gw:
        a, b = gw.hubs["a-0"].vm, gw.hubs["b-0"].vm
        status, _, body = await _request(
            gw, client_ssl, "PUT", _ss_path("rg-a"), bearer=token("olga"), body=off
        )
        assert (status, body["scope"]) == (
            200,
            "/subscriptions/sub-1/resourceGroups/rg-a/virtualMachineScaleSets/web",
        )
        assert (gw.console_enabled(a), gw.console_enabled(b)) == (False, True)
        # Owner of rg-a, reader of rg-b: she sees rg-b's web but may not switch it.
        status, _, body = await _request(
            gw, client_ssl, "PUT", _ss_path("rg-b"), bearer=token("olga"), body=off
        )
        assert (status, body["error"]) == (403, "forbidden")
        status, _, _ = await _request(
            gw, client_ssl, "PUT", _ss_path("rg-b"), bearer=token("rick"), body=off
        )
        assert status == 200
        # Turning rg-a's back on leaves rg-b's off: two switches, not one.
        status, _, _ = await _request(
            gw, client_ssl, "PUT", _ss_path("rg-a"), bearer=token("olga"), body=on
        )
        assert status == 200
        assert (gw.console_enabled(a), gw.console_enabled(b)) == (True, False)
        status, _, _ = await _request(
            gw, client_ssl, "PUT", _ss_path("rg-c"), bearer=token("olga"), body=off
        )
        assert status == 404
        # The path without the resource group is gone.
        status, _, body = await _request(
            gw,
            client_ssl,
            "PUT",
            "/v1/subscriptions/sub-1/scale-sets/web/serial-console",
            bearer=token("rick"),
            body=on,
        )
        assert (status, body["error"]) == (404, "not_found")
        assert not gw.console_enabled(b)


def test_legacy_scale_set_switch_keeps_disables_and_drops_enables(
    write_config: Callable[..., Any], tmp_path: Path
) -> None:
    """An old "sub/ss" disable applies to every scale set of that name; an enable is dropped."""
    serial = "tcp://127.0.0.1:9"
    config = write_config(
        vms=[
            {"id": "a-0", "serial": serial, "resource_group": "rg-a", "scale_set": "web"},
            {"id": "b-0", "serial": serial, "resource_group": "rg-b", "scale_set": "web"},
            {"id": "c-0", "serial": serial, "resource_group": "rg-a", "scale_set": "api"},
            {"id": "d-0", "serial": serial, "resource_group": "rg-a", "scale_set": "db"},
        ],
    )
    state = config.gateway.state_dir
    state.mkdir(parents=True)
    legacy = {"sub-1/web": False, "sub-1/api": True, "sub-1/gone": False, "sub-1/db": False}
    (state / "serial-console.json").write_text(
        json.dumps({"scale_sets": {**legacy, "sub-1/rg-a/db": True}})
    )
    with capture_logs() as events:
        policy = AccessPolicy(config)
    enabled = {vm.id: policy.console_enabled(vm) for vm in config.vms}
    # Never re-enabled: both "web" scale sets stay off (ambiguous, so both keep the disable).
    # A switch already in the new form wins over the old key (rg-a/db was turned on since).
    assert enabled == {"a-0": False, "b-0": False, "c-0": True, "d-0": True}
    saved = json.loads((state / "serial-console.json").read_text())["scale_sets"]
    assert saved == {
        "sub-1/rg-a/web": False,
        "sub-1/rg-b/web": False,
        "sub-1/rg-a/db": True,
        "sub-1/gone": False,  # no such scale set configured now: kept until one is
    }
    warned = {e["key"]: e for e in events if e["log_level"] == "warning"}
    assert warned["sub-1/web"]["scale_sets"] == ["sub-1/rg-a/web", "sub-1/rg-b/web"]
    assert "sub-1/gone" in warned


async def test_client_certificate_authenticates_as_cert_principal(
    write_config: Callable[..., Any],
    far_end: FarEnd,
    ca: trustme.CA,
    pki: dict[str, Any],
) -> None:
    """With client_ca set, a verified certificate is principal cert:<CN>; others are 401."""
    config = write_config(
        vms=[{"id": "vm-a", "serial": f"tcp://127.0.0.1:{far_end.port}"}],
        tls={"client_ca": pki["ca"]},
        roles=[("cert:ops-laptop", "contributor", "/subscriptions/sub-1")],
    )
    ctx = ssl.create_default_context(cafile=str(pki["ca"]))
    ca.issue_cert("ops-laptop@example.com", common_name="ops-laptop").configure_cert(ctx)
    async with running(config) as gw:
        await wait_port_up(gw, "vm-a")
        async with connect(
            console_url(gw, "vm-a"),
            ssl=ctx,
            subprotocols=["relayd.console.v1"],  # type: ignore[list-item]
        ) as ws:
            hello = json.loads(await ws.recv())
            assert hello["role"] == "writer"
        anonymous = ssl.create_default_context(cafile=str(pki["ca"]))
        assert await refused_upgrade(console_url(gw, "vm-a"), anonymous) == (401, "missing_token")
        stranger_ca = trustme.CA()
        stranger = ssl.create_default_context(cafile=str(pki["ca"]))
        stranger_ca.issue_cert("x@example.com", common_name="ops-laptop").configure_cert(stranger)
        # Under TLS 1.3 the client finishes first: the refusal may show as a dropped exchange.
        with pytest.raises((ssl.SSLError, ConnectionError, InvalidMessage)):
            async with connect(
                console_url(gw, "vm-a"),
                ssl=stranger,
                subprotocols=["relayd.console.v1"],  # type: ignore[list-item]
            ):
                pass


async def test_auth_failures_over_the_limit_get_429_yet_valid_credentials_pass(
    write_config: Callable[..., Any],
    far_end: FarEnd,
    client_ssl: ssl.SSLContext,
    token: Callable[..., str],
) -> None:
    """Behind one NAT: after the limit, bad tokens get 429; a good token or ticket still works."""
    config = write_config(
        vms=[{"id": "vm-a", "serial": f"tcp://127.0.0.1:{far_end.port}"}],
        limits={"auth_failures_per_minute": 3},
    )
    async with running(config) as gw:
        for _ in range(3):
            status, _, _ = await _request(gw, client_ssl, "GET", "/v1/vms", bearer="nonsense")
            assert status == 401
        status, _, body = await _request(gw, client_ssl, "GET", "/v1/vms", bearer=token("alice"))
        assert (status, [vm["id"] for vm in body["vms"]]) == (200, ["vm-a"])
        with capture_logs() as events:
            status, headers, body = await _request(
                gw, client_ssl, "GET", "/v1/vms", bearer="nonsense"
            )
        assert (status, body["error"]) == (429, "too_many_auth_failures")
        assert int(headers["retry-after"]) >= 1
        failed = [e for e in events if e["event"] == "auth_failed"]
        assert [(e["reason"], e["status"]) for e in failed] == [("malformed_token", 429)]
        assert gw.auth_failures["malformed_token"] == 4
        # A ticket: a good one opens the console, a spent one is refused with 429.
        _, _, body = await _request(
            gw, client_ssl, "POST", "/v1/vms/vm-a/console/tickets", bearer=token("alice")
        )
        url = console_url(gw, "vm-a", f"ticket={body['ticket']}")
        async with connect(
            url,
            ssl=client_ssl,
            subprotocols=["relayd.console.v1"],  # type: ignore[list-item]
        ) as ws:
            assert json.loads(await asyncio.wait_for(ws.recv(), TIMEOUT))["type"] == "hello"
        assert await refused_upgrade(url, client_ssl) == (429, "too_many_auth_failures")


async def test_client_certificate_passes_while_its_address_is_over_the_failure_limit(
    write_config: Callable[..., Any],
    far_end: FarEnd,
    ca: trustme.CA,
    pki: dict[str, Any],
) -> None:
    """A verified client certificate is a valid credential: the failure limit never blocks it."""
    config = write_config(
        vms=[{"id": "vm-a", "serial": f"tcp://127.0.0.1:{far_end.port}"}],
        tls={"client_ca": pki["ca"]},
        roles=[("cert:ops-laptop", "contributor", "/subscriptions/sub-1")],
        limits={"auth_failures_per_minute": 1},
    )
    ctx = ssl.create_default_context(cafile=str(pki["ca"]))
    ca.issue_cert("ops-laptop@example.com", common_name="ops-laptop").configure_cert(ctx)
    async with running(config) as gw:
        for expected in (401, 429):
            status, _, _ = await _request(gw, ctx, "GET", "/v1/vms", bearer="nonsense")
            assert status == expected
        status, _, body = await _request(gw, ctx, "GET", "/v1/vms")
        assert (status, [vm["id"] for vm in body["vms"]]) == (200, ["vm-a"])


async def test_connection_flood_from_one_address_is_reset_before_tls(
    write_config: Callable[..., Any],
    far_end: FarEnd,
    client_ssl: ssl.SSLContext,
    token: Callable[..., str],
) -> None:
    """More new connections per second than allowed are reset at accept: no TLS, no 429."""
    config = write_config(
        vms=[{"id": "vm-a", "serial": f"tcp://127.0.0.1:{far_end.port}"}],
        limits={"connections_per_second_per_ip": 1},
    )
    outcomes: list[int | str] = []
    async with running(config) as gw:
        assert gw.listener is not None
        for _ in range(4):
            try:
                outcomes.append(
                    (await _request(gw, client_ssl, "GET", "/v1/vms", bearer=token("alice")))[0]
                )
            except (ConnectionError, ssl.SSLError):
                outcomes.append("reset")
        assert outcomes.count("reset") == gw.listener.handshake_failures["rate_limited"]
    assert outcomes[:2] == [200, 200]
    assert "reset" in outcomes[2:]


async def test_an_answer_429_closes_the_connection(
    write_config: Callable[..., Any], far_end: FarEnd, client_ssl: ssl.SSLContext
) -> None:
    """Pipelined behind a 429, further requests are not answered: the connection ends."""
    config = write_config(
        vms=[{"id": "vm-a", "serial": f"tcp://127.0.0.1:{far_end.port}"}],
        limits={"auth_failures_per_minute": 1},
    )
    bad = "GET /v1/vms HTTP/1.1\r\nHost: localhost\r\nAuthorization: Bearer nonsense\r\n\r\n"
    async with running(config) as gw:
        reader, writer = await asyncio.open_connection(
            "127.0.0.1", gw.tls_port, ssl=client_ssl, server_hostname="localhost"
        )
        writer.write((bad * 2 + "GET / HTTP/1.1\r\nHost: localhost\r\n\r\n").encode())
        async with asyncio.timeout(TIMEOUT):
            data = await reader.read()  # to the end of the connection
        writer.close()
    statuses = [int(status) for status in re.findall(rb"HTTP/1\.1 (\d{3}) ", data)]
    assert statuses == [401, 429]
    assert b"connection: close" in data.lower()


async def test_cross_site_origin_is_refused_and_own_origin_allowed(
    write_config: Callable[..., Any],
    far_end: FarEnd,
    client_ssl: ssl.SSLContext,
    token: Callable[..., str],
) -> None:
    """A browser Origin other than the gateway's own (or allowed_origins) gets 403 bad_origin."""
    config = write_config(
        vms=[{"id": "vm-a", "serial": f"tcp://127.0.0.1:{far_end.port}"}],
        gateway={"allowed_origins": ["https://portal.example.com"]},
    )
    bearer = {"Authorization": f"Bearer {token('alice')}"}
    async with running(config) as gw:
        await wait_port_up(gw, "vm-a")
        refused = await refused_upgrade(
            console_url(gw, "vm-a"),
            client_ssl,
            additional_headers=bearer,
            origin="https://evil.example",
        )
        assert refused == (403, "bad_origin")
        for origin in (f"https://localhost:{gw.tls_port}", "https://portal.example.com"):
            async with connect(
                console_url(gw, "vm-a", "mode=spectate"),
                ssl=client_ssl,
                subprotocols=["relayd.console.v1"],  # type: ignore[list-item]
                additional_headers=bearer,
                origin=origin,  # type: ignore[arg-type]
            ) as ws:
                assert json.loads(await ws.recv())["type"] == "hello"


async def test_session_cap_per_principal_is_429(
    write_config: Callable[..., Any],
    far_end: FarEnd,
    client_ssl: ssl.SSLContext,
    token: Callable[..., str],
    open_console: Callable[..., Any],
) -> None:
    """max_sessions_per_principal: one more session for the same principal gets 429; others pass."""
    config = write_config(
        vms=[{"id": "vm-a", "serial": f"tcp://127.0.0.1:{far_end.port}"}],
        limits={"max_sessions_per_principal": 1},
    )
    async with running(config) as gw:
        await wait_port_up(gw, "vm-a")
        async with open_console(gw, "vm-a", user="alice", mode="spectate"):
            refused = await refused_upgrade(
                console_url(gw, "vm-a", "mode=spectate"),
                client_ssl,
                additional_headers={"Authorization": f"Bearer {token('alice')}"},
            )
            assert refused == (429, "session_limit")
            async with open_console(gw, "vm-a", user="bob", mode="spectate") as bob:
                assert bob.hello["role"] == "spectator"


def _mfa_config(write_config: Callable[..., Any], serial: str, **kwargs: Any) -> Any:
    """sub-1 without MFA (vm-a), sub-2 requiring it (vm-m, a scale-set instance)."""
    return write_config(
        subscriptions=[{"id": "sub-1"}, {"id": "sub-2", "require_mfa": True}],
        vms=[
            {"id": "vm-a", "serial": serial},
            {
                "id": "vm-m",
                "serial": serial,
                "subscription": "sub-2",
                "resource_group": "rg",
                "scale_set": "web",
            },
        ],
        roles=[
            ("user:olga", "owner", "/subscriptions/sub-1"),
            ("user:olga", "owner", "/subscriptions/sub-2"),
        ],
        **kwargs,
    )


MFA_SS = "/v1/subscriptions/sub-2/resourceGroups/rg/virtualMachineScaleSets/web/serial-console"


async def test_mfa_subscription_is_neither_listed_nor_read_nor_switched_without_mfa(
    write_config: Callable[..., Any],
    far_end: FarEnd,
    client_ssl: ssl.SSLContext,
    token: Callable[..., str],
) -> None:
    """Without mfa in amr: vm-m is not listed; its log, tickets and switches are 403."""
    config = _mfa_config(write_config, f"tcp://127.0.0.1:{far_end.port}")
    plain, strong = token("olga", amr=["pwd"]), token("olga", amr=["pwd", "mfa"])
    off = {"enabled": False}
    async with running(config) as gw:
        with capture_logs() as events:
            _, _, body = await _request(gw, client_ssl, "GET", "/v1/vms", bearer=plain)
            assert [vm["id"] for vm in body["vms"]] == ["vm-a"]
            for method, path, payload in (
                ("GET", "/v1/vms/vm-m/console-log", None),
                ("POST", "/v1/vms/vm-m/console/tickets", None),
                ("PUT", "/v1/vms/vm-m/serial-console", off),
                ("PUT", "/v1/subscriptions/sub-2/serial-console", off),
                ("PUT", MFA_SS, off),
            ):
                status, _, body = await _request(
                    gw, client_ssl, method, path, bearer=plain, body=payload
                )
                assert (path, status, body["error"]) == (path, 403, "mfa_required")
        denied = [e for e in events if e.get("reason") == "mfa_required"]
        assert len(denied) == 5
        assert all(e["principal"] == "user:olga" for e in denied)
        assert gw.console_enabled(gw.hubs["vm-m"].vm)
        # The subscription without MFA is served as before.
        status, _, _ = await _request(
            gw, client_ssl, "GET", "/v1/vms/vm-a/console-log", bearer=plain
        )
        assert status == 200
        # With MFA, everything.
        _, _, body = await _request(gw, client_ssl, "GET", "/v1/vms", bearer=strong)
        assert [vm["id"] for vm in body["vms"]] == ["vm-a", "vm-m"]
        status, _, _ = await _request(
            gw, client_ssl, "POST", "/v1/vms/vm-m/console/tickets", bearer=strong
        )
        assert status == 201
        for path in ("/v1/vms/vm-m/serial-console", "/v1/subscriptions/sub-2/serial-console"):
            status, _, _ = await _request(gw, client_ssl, "PUT", path, bearer=strong, body=off)
            assert status == 200
        status, _, _ = await _request(gw, client_ssl, "PUT", MFA_SS, bearer=strong, body=off)
        assert status == 200


async def test_global_require_mfa_hides_every_vm_and_refuses_every_switch(
    write_config: Callable[..., Any],
    far_end: FarEnd,
    client_ssl: ssl.SSLContext,
    token: Callable[..., str],
) -> None:
    """[auth] require_mfa: a token without mfa lists nothing and switches nothing."""
    config = _mfa_config(write_config, f"tcp://127.0.0.1:{far_end.port}")
    config.path.write_text(
        config.path.read_text().replace("[auth]\n", "[auth]\nrequire_mfa = true\n")
    )
    async with running(load_config(config.path)) as gw:
        plain = token("olga")
        _, _, body = await _request(gw, client_ssl, "GET", "/v1/vms", bearer=plain)
        assert body["vms"] == []
        status, _, body = await _request(
            gw,
            client_ssl,
            "PUT",
            "/v1/subscriptions/sub-1/serial-console",
            bearer=plain,
            body={"enabled": False},
        )
        assert (status, body["error"]) == (403, "mfa_required")
        assert gw.console_enabled(gw.hubs["vm-a"].vm)
