"""Gateway-side limits and switches: idle timeout, session length, disabled consoles, MFA, CIDRs."""

from __future__ import annotations

import asyncio
import datetime
import json
import ssl
import time
from collections.abc import Callable
from typing import Any

import jwt
import trustme
from websockets.asyncio.client import connect

from relayd.config import load_config
from relayd.listener import plain_address

from .conftest import Console, FarEnd, console_url, refused_upgrade, running, wait_port_up


async def test_idle_writer_gets_warning_then_close_4008(
    write_config: Callable[..., Any], far_end: FarEnd, open_console: Callable[..., Any]
) -> None:
    """A writer that types nothing is warned, then closed with 4008; typing resets the clock."""
    config = write_config(
        vms=[{"id": "vm-a", "serial": f"tcp://127.0.0.1:{far_end.port}"}],
        limits={"idle_timeout": "1200ms", "idle_warning": "600ms"},
    )
    async with running(config) as gw:
        await wait_port_up(gw, "vm-a")
        async with open_console(gw, "vm-a") as console:
            warning = await console.control(type="notice", event="idle_warning")
            assert 0 < warning["closes_in"] <= 0.6
            await console.send(b"x")  # activity: a fresh warning must come before the close
            await console.control(type="notice", event="idle_warning")
            code, reason = await console.closed()
    assert code == 4008
    assert reason is not None
    assert "idle" in reason


async def test_idle_spectator_gets_warning_then_close_4008(
    write_config: Callable[..., Any], far_end: FarEnd, open_console: Callable[..., Any]
) -> None:
    """Readers hold no idle sessions either: a silent spectator is warned, then closed 4008."""
    config = write_config(
        vms=[{"id": "vm-a", "serial": f"tcp://127.0.0.1:{far_end.port}"}],
        limits={"idle_timeout": "1200ms", "idle_warning": "600ms"},
    )
    async with running(config) as gw:
        await wait_port_up(gw, "vm-a")
        async with open_console(gw, "vm-a", user="rita") as console:
            assert console.hello["role"] == "spectator"
            await console.control(type="notice", event="idle_warning")
            await console.send(b"x")  # refused (read-only), yet someone is there
            await console.control(type="error", code="read_only")
            await console.control(type="notice", event="idle_warning")
            code, reason = await console.closed()
    assert code == 4008
    assert reason is not None
    assert "idle" in reason


async def test_max_session_length_ends_any_session(
    write_config: Callable[..., Any], far_end: FarEnd, open_console: Callable[..., Any]
) -> None:
    """max_session_seconds ends a session whatever it does (idle limit off here)."""
    config = write_config(
        vms=[{"id": "vm-a", "serial": f"tcp://127.0.0.1:{far_end.port}"}],
        limits={"idle_timeout": "off", "max_session_seconds": "1500ms"},
    )
    async with running(config) as gw:
        await wait_port_up(gw, "vm-a")
        async with open_console(gw, "vm-a", mode="spectate") as console:
            code, reason = await console.closed()
    assert code == 4008
    assert reason is not None
    assert "maximum session length" in reason


async def _wait_past(token: str) -> float:
    """Wait until the token's exp has passed (the test configs allow 1 ms of leeway)."""
    exp = float(jwt.decode(token, options={"verify_signature": False})["exp"])
    await asyncio.sleep(max(0.0, exp - time.time() + 0.05))
    return exp


def _with_auth(config: Any, extra: str) -> Any:
    config.path.write_text(config.path.read_text().replace("[auth]\n", f"[auth]\n{extra}"))
    return load_config(config.path)


async def test_disconnect_expired_ends_sessions_with_4003_when_their_token_expires(
    write_config: Callable[..., Any],
    far_end: FarEnd,
    open_console: Callable[..., Any],
    token: Callable[..., str],
) -> None:
    """Off (the default) a session outlives its token; on (even by reload) it ends at expiry."""
    vms = [{"id": "vm-a", "serial": f"tcp://127.0.0.1:{far_end.port}"}]
    config = _with_auth(write_config(vms=vms), 'leeway = "1ms"\n')
    short = token("alice", ttl=2)
    async with running(config) as gw:
        await wait_port_up(gw, "vm-a")
        async with (
            open_console(gw, "vm-a", bearer=short) as alice,
            open_console(gw, "vm-a", user="bob", mode="spectate") as bob,
        ):
            await _wait_past(short)
            await alice.send(b"after expiry\r")
            await far_end.wait_received(lambda b: b"after expiry" in b)
            _with_auth(write_config(vms=vms), 'leeway = "1ms"\ndisconnect_expired = true\n')
            assert await gw.reload()
            code, reason = await alice.closed()
            assert (code, reason) == (4003, "credentials expired")
            # A session opened with the flag on ends by itself when its token does.
            late = token("alice", ttl=2)
            async with open_console(gw, "vm-a", bearer=late) as again:
                code, _ = await again.closed()
                assert code == 4003
                assert time.time() >= float(
                    jwt.decode(late, options={"verify_signature": False})["exp"]
                )
            await far_end.send(b"bob still watches")
            await bob.expect(b"bob still watches")


async def test_disconnect_expired_ends_a_client_certificate_session_at_not_after(
    write_config: Callable[..., Any], far_end: FarEnd, ca: trustme.CA, pki: dict[str, Any]
) -> None:
    """With disconnect_expired, a cert:<CN> session ends with 4003 once the certificate expires."""
    config = write_config(
        vms=[{"id": "vm-a", "serial": f"tcp://127.0.0.1:{far_end.port}"}],
        tls={"client_ca": pki["ca"]},
        roles=[("cert:ops-laptop", "contributor", "/subscriptions/sub-1")],
    )
    config = _with_auth(config, "disconnect_expired = true\n")
    not_after = datetime.datetime.now(datetime.UTC).replace(microsecond=0) + datetime.timedelta(
        seconds=3
    )
    ctx = ssl.create_default_context(cafile=str(pki["ca"]))
    ca.issue_cert("ops@example.com", common_name="ops-laptop", not_after=not_after).configure_cert(
        ctx
    )
    async with running(config) as gw:
        await wait_port_up(gw, "vm-a")
        async with connect(
            console_url(gw, "vm-a"),
            ssl=ctx,
            subprotocols=["relayd.console.v1"],  # type: ignore[list-item]
        ) as ws:
            console = Console(ws)
            assert json.loads(await ws.recv())["role"] == "writer"
            code, reason = await console.closed()
    assert (code, reason) == (4003, "credentials expired")
    assert datetime.datetime.now(datetime.UTC) >= not_after


async def _status_and_code(
    gw: Any, client_ssl: ssl.SSLContext, bearer: str, vm: str = "vm-a"
) -> tuple[int, str]:
    headers = {"Authorization": f"Bearer {bearer}"}
    return await refused_upgrade(console_url(gw, vm), client_ssl, additional_headers=headers)


async def test_disabled_console_is_403_console_disabled(
    write_config: Callable[..., Any],
    far_end: FarEnd,
    client_ssl: ssl.SSLContext,
    token: Callable[..., str],
) -> None:
    """A VM with serial_console = false refuses connections with 403."""
    config = write_config(
        vms=[{"id": "vm-a", "serial": f"tcp://127.0.0.1:{far_end.port}", "serial_console": False}]
    )
    async with running(config) as gw:
        assert await _status_and_code(gw, client_ssl, token("alice")) == (403, "console_disabled")


async def test_require_mfa_refuses_tokens_without_mfa_amr(
    write_config: Callable[..., Any],
    far_end: FarEnd,
    client_ssl: ssl.SSLContext,
    token: Callable[..., str],
    tmp_path: Any,
) -> None:
    """With require_mfa, a token lacking amr=mfa gets 403 mfa_required; one with it gets in."""
    config = write_config(vms=[{"id": "vm-a", "serial": f"tcp://127.0.0.1:{far_end.port}"}])
    text = config.path.read_text().replace("[auth]\n", "[auth]\nrequire_mfa = true\n")
    config.path.write_text(text)

    async with running(load_config(config.path)) as gw:
        await wait_port_up(gw, "vm-a")
        assert await _status_and_code(gw, client_ssl, token("alice")) == (403, "mfa_required")
        async with connect(
            f"wss://localhost:{gw.tls_port}/v1/vms/vm-a/console",
            ssl=client_ssl,
            subprotocols=["relayd.console.v1"],  # type: ignore[list-item]
            additional_headers={"Authorization": f"Bearer {token('alice', amr=['pwd', 'mfa'])}"},
        ) as ws:
            assert '"hello"' in str(await ws.recv())


async def test_client_outside_allow_list_is_403(
    write_config: Callable[..., Any],
    far_end: FarEnd,
    client_ssl: ssl.SSLContext,
    token: Callable[..., str],
) -> None:
    """allow_clients without loopback refuses a loopback client before authentication."""
    config = write_config(
        vms=[{"id": "vm-a", "serial": f"tcp://127.0.0.1:{far_end.port}"}],
        gateway={"allow_clients": ["10.0.0.0/8"]},
    )
    async with running(config) as gw:
        assert await _status_and_code(gw, client_ssl, "garbage") == (403, "client_not_allowed")


async def test_ipv4_client_on_a_dual_stack_listener_matches_ipv4_allow_list(
    write_config: Callable[..., Any],
    far_end: FarEnd,
    client_ssl: ssl.SSLContext,
    token: Callable[..., str],
) -> None:
    """On `[::]` an IPv4 client arrives as ::ffff:127.0.0.1; it must match 127.0.0.0/8."""
    config = write_config(
        vms=[{"id": "vm-a", "serial": f"tcp://127.0.0.1:{far_end.port}"}],
        gateway={"listen": "[::]:0", "allow_clients": ["127.0.0.0/8"]},
    )
    async with (
        running(config) as gw,
        connect(
            console_url(gw, "vm-a"),
            ssl=client_ssl,
            host="127.0.0.1",
            subprotocols=["relayd.console.v1"],  # type: ignore[list-item]
            additional_headers={"Authorization": f"Bearer {token('alice')}"},
        ) as ws,
    ):
        assert '"hello"' in str(await ws.recv())


def test_plain_address_unmaps_ipv4_and_keeps_ipv6() -> None:
    assert plain_address("::ffff:10.0.0.5") == "10.0.0.5"
    assert plain_address("::1") == "::1"
    assert plain_address("192.0.2.7") == "192.0.2.7"
