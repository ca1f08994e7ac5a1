"""End to end through real TLS on loopback: auth, sessions, takeover, replay, ports."""

from __future__ import annotations

import asyncio
import json
import os
import ssl
import warnings
from collections.abc import Callable
from typing import Any

import pytest
from structlog.testing import capture_logs
from websockets.asyncio.client import connect
from websockets.exceptions import InvalidStatus
from websockets.frames import Frame, Opcode

from relayd.sim import SimulatedGuest

from .conftest import (
    TIMEOUT,
    FarEnd,
    http_request,
    https_exchange,
    raw_console,
    running,
    wait_hub,
    wait_port_up,
)


@pytest.mark.parametrize("version", [ssl.TLSVersion.TLSv1_2, ssl.TLSVersion.TLSv1_3])
async def test_tls_modern_versions_are_accepted(
    write_config: Callable[..., Any], far_end: FarEnd, client_ssl: ssl.SSLContext, version: Any
) -> None:
    """TLS 1.2 and 1.3 clients complete the handshake and get answers."""
    config = write_config(vms=[{"id": "vm-a", "serial": f"tcp://127.0.0.1:{far_end.port}"}])
    client_ssl.minimum_version = client_ssl.maximum_version = version
    async with running(config) as gw:
        status, _, _ = await https_exchange(
            gw.tls_port, client_ssl, http_request("GET", "/healthz-not-here")
        )
    assert status == 404


async def test_tls_1_1_client_is_refused_at_handshake(
    write_config: Callable[..., Any], far_end: FarEnd, pki: dict[str, Any]
) -> None:
    """A client that offers at most TLS 1.1 fails the handshake."""
    config = write_config(vms=[{"id": "vm-a", "serial": f"tcp://127.0.0.1:{far_end.port}"}])
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.load_verify_locations(str(pki["ca"]))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        ctx.minimum_version = ssl.TLSVersion.TLSv1
        ctx.maximum_version = ssl.TLSVersion.TLSv1_1
    ctx.set_ciphers("ALL:@SECLEVEL=0")
    async with running(config) as gw:
        # asyncio aborts a failed handshake, so the client sees an alert or a reset.
        with pytest.raises((ssl.SSLError, ConnectionError)):
            await https_exchange(gw.tls_port, ctx, http_request("GET", "/"))
        # Control: the same permissive client succeeds once it may use TLS 1.2.
        ctx.maximum_version = ssl.TLSVersion.TLSv1_2
        status, _, _ = await https_exchange(gw.tls_port, ctx, http_request("GET", "/"))
        assert status == 200


@pytest.mark.parametrize(
    ("kwargs", "code"),
    [
        (None, "missing_token"),
        ({"ttl": -3600}, "token_expired"),
        ({"audience": "someone-else"}, "invalid_audience"),
        ({"issuer": "https://evil.example"}, "invalid_issuer"),
    ],
)
async def test_console_bad_token_is_401_with_json_error(
    write_config: Callable[..., Any],
    far_end: FarEnd,
    client_ssl: ssl.SSLContext,
    token: Callable[..., str],
    kwargs: dict[str, Any] | None,
    code: str,
) -> None:
    """Missing, expired, wrong-audience and wrong-issuer tokens get 401 before the upgrade."""
    config = write_config(vms=[{"id": "vm-a", "serial": f"tcp://127.0.0.1:{far_end.port}"}])
    headers = {} if kwargs is None else {"Authorization": f"Bearer {token('alice', **kwargs)}"}
    async with running(config) as gw:
        with pytest.raises(InvalidStatus) as info:
            async with connect(
                f"wss://localhost:{gw.tls_port}/v1/vms/vm-a/console",
                ssl=client_ssl,
                additional_headers=headers,
                subprotocols=["relayd.console.v1"],  # type: ignore[list-item]
            ):
                pass
    response = info.value.response
    assert response.status_code == 401
    assert response.headers["WWW-Authenticate"].startswith("Bearer")
    assert json.loads(response.body)["error"] == code
    assert gw.auth_failures[code] == 1


async def test_vm_list_shows_only_what_the_principal_may_see(
    write_config: Callable[..., Any],
    far_end: FarEnd,
    client_ssl: ssl.SSLContext,
    token: Callable[..., str],
) -> None:
    """GET /v1/vms lists VMs with a role for the caller, with their live state."""
    config = write_config(
        vms=[
            {"id": "vm-a", "serial": f"tcp://127.0.0.1:{far_end.port}"},
            {"id": "vm-b", "serial": "tcp://127.0.0.1:9"},
        ],
        roles=[("user:alice", "reader", "/subscriptions/sub-1/vms/vm-a")],
    )
    async with running(config) as gw:
        await wait_port_up(gw, "vm-a")
        status, headers, body = await https_exchange(
            gw.tls_port, client_ssl, http_request("GET", "/v1/vms", bearer=token("alice"))
        )
        anon, _, _ = await https_exchange(gw.tls_port, client_ssl, http_request("GET", "/v1/vms"))
    assert status == 200
    assert headers["content-type"] == "application/json"
    vms = json.loads(body)["vms"]
    assert [vm["id"] for vm in vms] == ["vm-a"]
    assert vms[0]["port"] == "up"
    assert vms[0]["writer_attached"] is False
    assert anon == 401


async def test_unknown_vm_and_vm_without_role_are_both_404(
    write_config: Callable[..., Any],
    far_end: FarEnd,
    client_ssl: ssl.SSLContext,
    token: Callable[..., str],
) -> None:
    """An unknown VM and a VM the caller has no role on look the same: 404 unknown_vm."""
    config = write_config(
        vms=[{"id": "vm-a", "serial": f"tcp://127.0.0.1:{far_end.port}"}],
        roles=[("user:alice", "reader", "/subscriptions/sub-1")],
    )
    async with running(config) as gw:
        for user, vm in (("alice", "vm-zzz"), ("mallory", "vm-a")):
            with pytest.raises(InvalidStatus) as info:
                async with connect(
                    f"wss://localhost:{gw.tls_port}/v1/vms/{vm}/console",
                    ssl=client_ssl,
                    additional_headers={"Authorization": f"Bearer {token(user)}"},
                ):
                    pass
            assert info.value.response.status_code == 404
            assert json.loads(info.value.response.body)["error"] == "unknown_vm"


async def test_login_to_simulated_vm_runs_a_command(
    write_config: Callable[..., Any], open_console: Callable[..., Any]
) -> None:
    """Through the gateway: login prompt, password, a shell command and its output."""
    guest = SimulatedGuest("vm-sim")
    port = await guest.start()
    try:
        config = write_config(vms=[{"id": "vm-sim", "serial": f"telnet://127.0.0.1:{port}"}])
        async with running(config) as gw:
            await wait_port_up(gw, "vm-sim")
            async with open_console(gw, "vm-sim") as console:
                assert console.hello["role"] == "writer"
                await console.send(b"\r")
                await console.expect(b"login: ")
                await console.send(b"operator\r")
                await console.expect(b"Password: ")
                await console.send(b"relayd\r")
                await console.expect(b"$ ")
                await console.send(b"echo hello-$((6*7))\r")
                await console.send(b"uname -a\r")
                output = await console.expect(b"GNU/Linux")
                assert b"Linux vm-sim" in output
                await console.send({"type": "sysrq", "key": "h"})
                await console.expect(b"sysrq: HELP")
    finally:
        await guest.close()


async def test_reader_is_spectator_and_cannot_write(
    write_config: Callable[..., Any], far_end: FarEnd, open_console: Callable[..., Any]
) -> None:
    """A reader asking to write gets a spectator session; its input never reaches the port."""
    config = write_config(vms=[{"id": "vm-a", "serial": f"tcp://127.0.0.1:{far_end.port}"}])
    async with running(config) as gw:
        await wait_port_up(gw, "vm-a")
        async with open_console(gw, "vm-a", user="rita") as reader:
            assert reader.hello["role"] == "spectator"
            await reader.send(b"rm -rf /\r")
            error = await reader.control(type="error")
            assert error["code"] == "read_only"
            await reader.send({"type": "break"})
            assert (await reader.control(type="error"))["code"] == "read_only"
            async with open_console(gw, "vm-a", user="alice") as writer:
                await writer.send(b"ok\r")
                await far_end.wait_received(lambda b: b"ok\r" in b)
                await far_end.send(b"console says hi\r\n")
                await reader.expect(b"console says hi")
        assert bytes(far_end.received) == b"ok\r"


async def test_takeover_evict_closes_old_writer_with_4001_naming_newcomer(
    write_config: Callable[..., Any], far_end: FarEnd, open_console: Callable[..., Any]
) -> None:
    """Default policy: the newcomer writes; the old writer gets a notice and close 4001."""
    config = write_config(vms=[{"id": "vm-a", "serial": f"tcp://127.0.0.1:{far_end.port}"}])
    async with running(config) as gw:
        await wait_port_up(gw, "vm-a")
        async with (
            open_console(gw, "vm-a", user="alice") as alice,
            open_console(gw, "vm-a", user="bob") as bob,
        ):
            assert bob.hello["role"] == "writer"
            notice = await alice.control(type="notice", event="writer_changed")
            assert notice["by"] == "user:bob"
            code, reason = await alice.closed()
            assert code == 4001
            assert reason is not None
            assert "user:bob" in reason
            await bob.send(b"bob types\r")
            await far_end.wait_received(lambda b: b"bob types" in b)
        assert gw.hubs["vm-a"].stats.takeovers == 1


@pytest.mark.parametrize("name", ["界" * 40, "\ud800-lone-surrogate"], ids=["wide", "surrogate"])
async def test_takeover_by_a_name_too_long_for_a_close_reason_or_not_text_still_evicts(
    write_config: Callable[..., Any],
    far_end: FarEnd,
    open_console: Callable[..., Any],
    token: Callable[..., str],
    name: str,
) -> None:
    """The 4001 reason is cut to 123 UTF-8 bytes at a character boundary, never raised on.

    40 "界" make a reason of 59 characters but 139 bytes: cut at 120 characters it
    raised inside attach once the newcomer held the lease, and the old writer stayed
    connected but dead. A lone surrogate (a JSON `sub` can carry one) cannot be UTF-8
    at all: it is sent as "?".
    """
    config = write_config(
        vms=[{"id": "vm-a", "serial": f"tcp://127.0.0.1:{far_end.port}"}],
        roles=[
            ("user:alice", "contributor", "/subscriptions/sub-1"),
            ("group:ops", "contributor", "/subscriptions/sub-1"),
        ],
    )
    newcomer_token = {"Authorization": f"Bearer {token(name, groups=['ops'])}"}
    # The test's console log renderer cannot print a lone surrogate (production logs JSON).
    with capture_logs() as events:
        async with running(config) as gw:
            await wait_port_up(gw, "vm-a")
            async with (
                open_console(gw, "vm-a", user="alice") as alice,
                open_console(gw, "vm-a", headers=newcomer_token) as newcomer,
            ):
                assert newcomer.hello["role"] == "writer"
                notice = await alice.control(type="notice", event="writer_changed")
                assert notice["by"].startswith("user:")
                code, reason = await alice.closed()
                assert code == 4001
                assert reason is not None
                assert reason.startswith("taken over by user:")
                assert len(reason.encode()) <= 123
                await newcomer.send(b"typed\r")
                await far_end.wait_received(lambda b: b"typed\r" in b)
            assert gw.hubs["vm-a"].stats.takeovers == 1
    assert [e["by"] for e in events if e["event"] == "writer_evicted"] == [f"user:{name}"]


async def test_evicted_writer_keys_in_flight_never_reach_the_port(
    write_config: Callable[..., Any], far_end: FarEnd, open_console: Callable[..., Any]
) -> None:
    """Keys an evicted writer sends before it reads its close are dropped, not written."""
    config = write_config(vms=[{"id": "vm-a", "serial": f"tcp://127.0.0.1:{far_end.port}"}])
    async with running(config) as gw:
        await wait_port_up(gw, "vm-a")
        async with open_console(gw, "vm-a", user="alice") as alice:
            transport = alice.ws.transport
            transport.pause_reading()  # alice has not seen the takeover yet
            async with open_console(gw, "vm-a", user="bob") as bob:
                assert bob.hello["role"] == "writer"
                transport.write(Frame(Opcode.BINARY, b"EVIL\r").serialize(mask=True))
                transport.resume_reading()  # her close reply follows the key on the wire
                code, _ = await alice.closed()
                assert code == 4001
                await wait_hub(gw, "vm-a", lambda hub: len(hub.clients) == 1)
                await bob.send(b"bob\r")
                await far_end.wait_received(lambda b: b"bob\r" in b)
        assert bytes(far_end.received) == b"bob\r"


async def test_break_while_the_port_is_down_is_refused_not_queued(
    write_config: Callable[..., Any], open_console: Callable[..., Any], tmp_path: Any
) -> None:
    """A SysRq pressed during an outage would fire at reconnect: it is refused instead."""
    config = write_config(
        vms=[
            {
                "id": "vm-a",
                "serial": f"unix://{tmp_path}/nothing-here.sock",
                "break_command": ["true"],
            }
        ]
    )
    async with running(config) as gw:
        await wait_hub(gw, "vm-a", lambda hub: hub.first_attempt.is_set())
        async with open_console(gw, "vm-a") as console:
            await console.send({"type": "sysrq", "key": "b"})
            error = await console.control(type="error")
            assert error["code"] == "port_down"
        assert not gw.hubs["vm-a"].input


async def test_takeover_demote_keeps_old_writer_as_spectator(
    write_config: Callable[..., Any], far_end: FarEnd, open_console: Callable[..., Any]
) -> None:
    """Policy demote: the old writer stays connected, told so, and is read-only."""
    config = write_config(
        vms=[{"id": "vm-a", "serial": f"tcp://127.0.0.1:{far_end.port}", "takeover": "demote"}]
    )
    async with running(config) as gw:
        await wait_port_up(gw, "vm-a")
        async with (
            open_console(gw, "vm-a", user="alice") as alice,
            open_console(gw, "vm-a", user="bob") as bob,
        ):
            notice = await alice.control(type="notice", event="demoted")
            assert notice["by"] == "user:bob"
            await alice.send(b"alice types\r")
            assert (await alice.control(type="error"))["code"] == "read_only"
            await bob.send(b"bob types\r")
            await far_end.send(b"shared output\r\n")
            await alice.expect(b"shared output")
            await bob.expect(b"shared output")
        assert bytes(far_end.received) == b"bob types\r"


async def test_takeover_deny_refuses_newcomer_with_409_but_allows_spectate(
    write_config: Callable[..., Any],
    far_end: FarEnd,
    open_console: Callable[..., Any],
    client_ssl: ssl.SSLContext,
    token: Callable[..., str],
) -> None:
    """Policy deny: a second interactive contributor gets HTTP 409; spectating works."""
    config = write_config(
        vms=[{"id": "vm-a", "serial": f"tcp://127.0.0.1:{far_end.port}", "takeover": "deny"}]
    )
    async with running(config) as gw:
        await wait_port_up(gw, "vm-a")
        async with open_console(gw, "vm-a", user="alice") as alice:
            with pytest.raises(InvalidStatus) as info:
                async with connect(
                    f"wss://localhost:{gw.tls_port}/v1/vms/vm-a/console",
                    ssl=client_ssl,
                    additional_headers={"Authorization": f"Bearer {token('bob')}"},
                ):
                    pass
            assert info.value.response.status_code == 409
            assert json.loads(info.value.response.body)["error"] == "writer_exists"
            async with open_console(gw, "vm-a", user="bob", mode="spectate") as bob:
                assert bob.hello["role"] == "spectator"
                await alice.send(b"still mine\r")
                await far_end.wait_received(lambda b: b"still mine" in b)


async def test_reconnect_with_from_offset_resumes_without_gap_or_duplicate(
    write_config: Callable[..., Any], far_end: FarEnd, open_console: Callable[..., Any]
) -> None:
    """A client that resumes at its offset gets exactly the bytes it missed."""
    config = write_config(vms=[{"id": "vm-a", "serial": f"tcp://127.0.0.1:{far_end.port}"}])
    async with running(config) as gw:
        await wait_port_up(gw, "vm-a")
        await far_end.send(b"first part|")
        async with open_console(gw, "vm-a") as first:
            seen = await first.expect(b"first part|")
            position = first.hello["offset"] - first.hello["replay"] + len(seen)
        await far_end.send(b"while away|")
        await wait_hub(gw, "vm-a", lambda hub: hub.ring.end >= position + len(b"while away|"))
        async with open_console(gw, "vm-a", resume_from=position) as second:
            assert second.hello["replay"] == len(b"while away|")
            await far_end.send(b"live|")
            out = await second.expect(b"live|")
            assert out == b"while away|live|"


async def test_resume_from_offset_older_than_ring_reports_output_gap(
    write_config: Callable[..., Any], far_end: FarEnd, open_console: Callable[..., Any]
) -> None:
    """Resuming at an offset the ring no longer holds gets an output_gap notice first."""
    config = write_config(
        vms=[{"id": "vm-a", "serial": f"tcp://127.0.0.1:{far_end.port}"}],
        limits={"console_log_bytes": 4096, "replay_bytes": 1024},
    )
    async with running(config) as gw:
        await wait_port_up(gw, "vm-a")
        await far_end.send(b"x" * 10000)
        await wait_hub(gw, "vm-a", lambda hub: hub.ring.end >= 10000)
        hub = gw.hubs["vm-a"]
        async with open_console(gw, "vm-a", resume_from=10) as console:
            gap = await console.control(type="notice", event="output_gap")
            assert gap["first"] == 10
            assert gap["last"] == hub.ring.start - 1
            assert console.hello["replay"] == 4096


async def test_tcp_port_that_goes_away_and_returns_sends_notices(
    write_config: Callable[..., Any], far_end: FarEnd, open_console: Callable[..., Any]
) -> None:
    """The far end restarts: port_down, then port_up, and input flows again."""
    config = write_config(vms=[{"id": "vm-a", "serial": f"tcp://127.0.0.1:{far_end.port}"}])
    async with running(config) as gw:
        await wait_port_up(gw, "vm-a")
        async with open_console(gw, "vm-a") as console:
            await far_end.stop()
            await console.control(type="notice", event="port_down")
            await far_end.start()
            await console.control(type="notice", event="port_up")
            await console.send(b"back\r")
            await far_end.wait_received(lambda b: b"back\r" in b)


async def test_pty_port_unplugged_and_replugged_sends_notices(
    write_config: Callable[..., Any],
    open_console: Callable[..., Any],
    pty_pair: Callable[[], tuple[int, Any]],
) -> None:
    """Closing the pty master drops the port; a new pty at the same path brings it back."""
    master, link = pty_pair()
    config = write_config(vms=[{"id": "vm-tty", "serial": str(link), "baud": 9600}])
    loop = asyncio.get_running_loop()
    async with running(config) as gw:
        await wait_port_up(gw, "vm-tty")
        async with open_console(gw, "vm-tty") as console:
            assert console.hello["limits"]["input_bytes_per_s"] == 960
            await console.send(b"via pty\r")
            got = bytearray()
            readable = asyncio.Event()
            loop.add_reader(master, readable.set)
            try:
                async with asyncio.timeout(TIMEOUT):
                    while b"via pty" not in got:
                        readable.clear()
                        await readable.wait()
                        got += _read_available(master)
            finally:
                loop.remove_reader(master)
            os.write(master, b"tty output\r\n")
            await console.expect(b"tty output")
            os.close(master)
            await console.control(type="notice", event="port_down")
            pty_pair()
            await console.control(type="notice", event="port_up")


def _read_available(fd: int) -> bytes:
    try:
        return os.read(fd, 65536)
    except BlockingIOError:
        return b""


async def test_telnet_break_reaches_far_end_as_iac_brk(
    write_config: Callable[..., Any], far_end: FarEnd, open_console: Callable[..., Any]
) -> None:
    """On telnet:// a BREAK is IAC BRK on the wire and 0xFF input is escaped."""
    config = write_config(vms=[{"id": "vm-t", "serial": f"telnet://127.0.0.1:{far_end.port}"}])
    async with running(config) as gw:
        await wait_port_up(gw, "vm-t")
        async with open_console(gw, "vm-t") as console:
            await console.send(b"a\xffb")
            await far_end.wait_received(lambda b: b"a\xff\xffb" in b)
            await console.send({"type": "sysrq", "key": "s"})
            await far_end.wait_received(lambda b: b"\xff\xf3s" in b)


async def test_break_on_raw_tcp_without_hook_is_unsupported(
    write_config: Callable[..., Any], far_end: FarEnd, open_console: Callable[..., Any]
) -> None:
    """Raw TCP cannot carry a BREAK: the client gets `unsupported` and the session goes on."""
    config = write_config(vms=[{"id": "vm-a", "serial": f"tcp://127.0.0.1:{far_end.port}"}])
    async with running(config) as gw:
        await wait_port_up(gw, "vm-a")
        async with open_console(gw, "vm-a") as console:
            await console.send({"type": "break"})
            assert (await console.control(type="error"))["code"] == "unsupported"
            await console.send(b"still here\r")
            await far_end.wait_received(lambda b: b"still here" in b)


async def test_break_command_hook_runs_for_raw_tcp(
    write_config: Callable[..., Any],
    far_end: FarEnd,
    open_console: Callable[..., Any],
    tmp_path: Any,
) -> None:
    """With break_command set, a SysRq runs the hook, then writes the key."""
    marker = tmp_path / "break-ran"
    config = write_config(
        vms=[
            {
                "id": "vm-a",
                "serial": f"tcp://127.0.0.1:{far_end.port}",
                "break_command": ["touch", str(marker)],
            }
        ]
    )
    async with running(config) as gw:
        await wait_port_up(gw, "vm-a")
        async with open_console(gw, "vm-a") as console:
            await console.send({"type": "sysrq", "key": "h"})
            await far_end.wait_received(lambda b: b == b"h")
    assert marker.exists()


async def test_bad_control_messages_get_bad_message_and_session_continues(
    write_config: Callable[..., Any], far_end: FarEnd, open_console: Callable[..., Any]
) -> None:
    """Malformed JSON, unknown types and bad fields are answered, not fatal."""
    config = write_config(vms=[{"id": "vm-a", "serial": f"tcp://127.0.0.1:{far_end.port}"}])
    async with running(config) as gw:
        await wait_port_up(gw, "vm-a")
        async with open_console(gw, "vm-a") as console:
            for bad in ("{nope", "[1,2]", '{"type":"launch"}', '{"type":"sysrq","key":"!!"}'):
                await console.send(bad)
                assert (await console.control(type="error"))["code"] == "bad_message"
            await console.send({"type": "resize", "cols": 120, "rows": 40})
            await console.send(b"fine\r")
            await far_end.wait_received(lambda b: b"fine" in b)
        assert gw.hubs["vm-a"].resize == (120, 40)


async def test_paste_longer_than_limit_is_refused_whole(
    write_config: Callable[..., Any], far_end: FarEnd, open_console: Callable[..., Any]
) -> None:
    """A message over max_paste_bytes gets paste_too_long and nothing of it is written."""
    config = write_config(
        vms=[{"id": "vm-a", "serial": f"tcp://127.0.0.1:{far_end.port}"}],
        limits={"max_paste_bytes": 1024},
    )
    async with running(config) as gw:
        await wait_port_up(gw, "vm-a")
        async with open_console(gw, "vm-a") as console:
            await console.send(b"y" * 1025)
            error = await console.control(type="error")
            assert error["code"] == "paste_too_long"
            assert error["limit"] == 1024
            await console.send(b"z" * 1024)
            await far_end.wait_received(lambda b: len(b) >= 1024)
        assert bytes(far_end.received) == b"z" * 1024


async def test_burst_reaches_fast_client_intact_while_stalled_client_gets_gap(
    write_config: Callable[..., Any],
    far_end: FarEnd,
    open_console: Callable[..., Any],
    stalled_spectator: Callable[..., Any],
) -> None:
    """8 MiB of output: the fast client gets every byte; one that stops reading skips ahead.

    The stalled client falls further behind than the ring (256 KiB here) holds, so
    it must skip; the fast one never lags that far, so it must not.
    """
    config = write_config(
        vms=[{"id": "vm-a", "serial": f"tcp://127.0.0.1:{far_end.port}"}],
        limits={
            "output_queue_bytes": 65536,
            "console_log_bytes": 256 * 1024,
            "output_bytes_per_s": 2**30,
        },
    )
    payload = os.urandom(8 * 2**20)
    async with running(config) as gw:
        await wait_port_up(gw, "vm-a")
        async with (
            stalled_spectator(gw, "vm-a") as stalled,
            open_console(gw, "vm-a", mode="spectate") as fast,
        ):
            await far_end.send(payload)
            out = await fast.read_at_least(len(payload))
            assert out == payload
            # Now the stalled client reads what reached it: a prefix, the gap, the rest.
            before, after = bytearray(), bytearray()
            gap: dict[str, Any] | None = None
            async with asyncio.timeout(TIMEOUT):
                while gap is None or gap["last"] + 1 + len(after) < len(payload):
                    message = await stalled.recv()
                    if isinstance(message, str):
                        if '"output_gap"' in message:
                            gap = json.loads(message)
                    elif gap is None:
                        before += message
                    else:
                        after += message
            assert gap["first"] == len(before)
            assert bytes(before) == payload[: len(before)]
            assert bytes(after) == payload[gap["last"] + 1 :]
        ring = gw.hubs["vm-a"].ring
        assert ring.end == len(payload)
        assert ring.read(0) == payload[-ring.capacity :]


async def test_dead_writer_is_dropped_and_lease_released(
    write_config: Callable[..., Any],
    far_end: FarEnd,
    open_console: Callable[..., Any],
    client_ssl: ssl.SSLContext,
    token: Callable[..., str],
) -> None:
    """A writer that stops answering pings loses the console within two intervals."""
    config = write_config(
        vms=[{"id": "vm-a", "serial": f"tcp://127.0.0.1:{far_end.port}", "takeover": "deny"}],
        limits={"keepalive_interval": "200ms"},
    )
    async with running(config) as gw:
        await wait_port_up(gw, "vm-a")
        _reader, writer = await raw_console(gw, client_ssl, token("alice"))
        assert gw.hubs["vm-a"].lease.holder is not None
        # This client never answers pings; with policy deny, bob gets in once it is dropped.
        await wait_hub(gw, "vm-a", lambda hub: hub.lease.holder is None)
        async with open_console(gw, "vm-a", user="bob") as bob:
            assert bob.hello["role"] == "writer"
        writer.close()


async def test_writer_held_back_by_pacing_is_not_dropped_for_its_unread_pongs(
    write_config: Callable[..., Any], far_end: FarEnd, open_console: Callable[..., Any]
) -> None:
    """While the hub stops reading a pasting writer, its pongs wait unread: no keepalive drop.

    The paste is paced to about three seconds (2000 B/s), fifteen keepalive intervals of
    200 ms, whatever the host's speed: the session must see all of it through and still
    take keys after, not end in the keepalive's two intervals."""
    config = write_config(
        vms=[
            {"id": "vm-a", "serial": f"tcp://127.0.0.1:{far_end.port}", "input_bytes_per_s": 2000}
        ],
        limits={"keepalive_interval": "200ms"},
    )
    async with running(config) as gw:
        await wait_port_up(gw, "vm-a")
        async with open_console(gw, "vm-a") as console:
            await console.send(b"p" * 6000)  # held back for about three seconds
            await far_end.wait_received(lambda b: len(b) > 0)
            assert gw.hubs["vm-a"]._paused is not None
            await far_end.wait_received(lambda b: len(b) >= 6000)
            await console.send(b"still here\r")
            await far_end.wait_received(lambda b: b.endswith(b"still here\r"))


async def test_owner_hooks_run_and_report_exit_status(
    write_config: Callable[..., Any],
    far_end: FarEnd,
    open_console: Callable[..., Any],
    tmp_path: Any,
) -> None:
    """reset runs reset_command for an owner; a contributor is refused; nmi unset is unsupported."""
    marker = tmp_path / "reset-ran"
    config = write_config(
        vms=[
            {
                "id": "vm-a",
                "serial": f"tcp://127.0.0.1:{far_end.port}",
                "reset_command": ["touch", str(marker)],
            }
        ],
        roles=[
            ("user:olga", "owner", "/subscriptions/sub-1/vms/vm-a"),
            ("user:alice", "contributor", "/subscriptions/sub-1"),
        ],
    )
    async with running(config) as gw:
        await wait_port_up(gw, "vm-a")
        async with open_console(gw, "vm-a", user="alice") as alice:
            await alice.send({"type": "reset"})
            assert (await alice.control(type="error"))["code"] == "forbidden"
        async with open_console(gw, "vm-a", user="olga") as olga:
            await olga.send({"type": "nmi"})
            assert (await olga.control(type="error"))["code"] == "unsupported"
            await olga.send({"type": "reset"})
            result = await olga.control(type="notice", event="hook_result")
            assert result == {
                "type": "notice",
                "event": "hook_result",
                "hook": "reset_command",
                "ok": True,
                "status": 0,
            }
    assert marker.exists()


async def test_reset_runs_while_a_hung_guest_is_not_reading_its_serial_line(
    write_config: Callable[..., Any],
    open_console: Callable[..., Any],
    tmp_path: Any,
    hung_far_end: int,
) -> None:
    """Input stuck behind a far end that stopped reading does not hold back reset."""
    marker = tmp_path / "reset-ran"
    config = write_config(
        vms=[
            {
                "id": "vm-a",
                "serial": f"tcp://127.0.0.1:{hung_far_end}",
                "reset_command": ["touch", str(marker)],
                "input_bytes_per_s": 50_000_000,
            }
        ],
        limits={"max_paste_bytes": 2**20},
        roles=[("user:olga", "owner", "/subscriptions/sub-1")],
    )
    async with running(config) as gw:
        await wait_port_up(gw, "vm-a")
        async with open_console(gw, "vm-a", user="olga") as olga:
            # The first 1 MiB chunk alone overfills every buffer on the way: the port
            # writer is stuck in its drain from then on, with the rest queued behind.
            for _ in range(4):
                await olga.send(b"x" * 2**20)
            await olga.send({"type": "reset"})
            result = await olga.control(type="notice", event="hook_result")
            assert result["ok"] is True
    assert marker.exists()


async def test_input_a_hung_guest_never_takes_is_dropped_and_said_so(
    write_config: Callable[..., Any],
    open_console: Callable[..., Any],
    monkeypatch: pytest.MonkeyPatch,
    hung_far_end: int,
) -> None:
    """Queued keys for a far end that stopped reading are dropped after the stall limit."""
    monkeypatch.setattr("relayd.keeper.STALL_SECONDS", 0.3)
    config = write_config(
        vms=[
            {
                "id": "vm-a",
                "serial": f"tcp://127.0.0.1:{hung_far_end}",
                "input_bytes_per_s": 50_000_000,
            }
        ],
        limits={"max_paste_bytes": 2**20},
    )
    async with running(config) as gw:
        await wait_port_up(gw, "vm-a")
        async with open_console(gw, "vm-a") as console:
            for _ in range(4):
                await console.send(b"x" * 2**20)
            notice = await console.control(type="notice", event="input_dropped")
            assert notice["bytes"] > 0
            assert gw.hubs["vm-a"].input.held_bytes == 0


async def test_output_cap_makes_a_client_skip_a_burst_it_may_not_receive_in_time(
    write_config: Callable[..., Any], far_end: FarEnd, open_console: Callable[..., Any]
) -> None:
    """With output_bytes_per_s far below a burst, even a reading client gets an output_gap."""
    config = write_config(
        vms=[{"id": "vm-a", "serial": f"tcp://127.0.0.1:{far_end.port}"}],
        limits={"output_bytes_per_s": 65536, "console_log_bytes": 131072, "replay_bytes": 0},
    )
    payload = os.urandom(2**20)
    async with running(config) as gw:
        await wait_port_up(gw, "vm-a")
        async with open_console(gw, "vm-a", mode="spectate") as console:
            assert console.hello["limits"]["output_bytes_per_s"] == 65536
            await far_end.send(payload)
            gap = await console.control(type="notice", event="output_gap")
            assert gap["first"] < gap["last"] < len(payload)
            tail = await console.read_at_least(len(payload) - gap["last"] - 1 + gap["first"])
            assert tail == payload[: gap["first"]] + payload[gap["last"] + 1 :]
