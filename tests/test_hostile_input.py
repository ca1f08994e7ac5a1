"""Hostile HTTP and WebSocket input found in a review: each gets a clear answer, never a crash."""

from __future__ import annotations

import asyncio
import contextlib
import json
import socket
import ssl
import struct
from collections.abc import Callable
from typing import Any

import pytest
from structlog.testing import capture_logs
from websockets.frames import Frame, Opcode

from relayd.app import Gateway
from relayd.config import LimitsConfig, VmConfig
from relayd.hub import MAX_QUEUED_HOOKS, ConsoleHub
from relayd.inputqueue import MAX_QUEUED_BREAKS, Break, Write
from relayd.keeper import wait_until

from .conftest import (
    TIMEOUT,
    FarEnd,
    gateway_process,
    http_request,
    https_exchange,
    raw_console,
    running,
    wait_port_up,
)


def _serial(far_end: FarEnd) -> list[dict[str, Any]]:
    return [{"id": "vm-a", "serial": f"tcp://127.0.0.1:{far_end.port}"}]


async def test_unparseable_request_target_is_400(
    write_config: Callable[..., Any], far_end: FarEnd, client_ssl: ssl.SSLContext
) -> None:
    """ "//[" makes urlsplit raise: a 400, not a dropped connection."""
    async with running(write_config(vms=_serial(far_end))) as gw:
        status, _, body = await https_exchange(gw.tls_port, client_ssl, http_request("GET", "//["))
        assert status == 400
        assert json.loads(body)["error"] == "bad_request"


async def test_hundreds_of_pipelined_requests_are_all_answered(
    write_config: Callable[..., Any], far_end: FarEnd, client_ssl: ssl.SSLContext
) -> None:
    """Each pipelined request used to recurse once: 330 of them overflowed the stack."""
    async with running(write_config(vms=_serial(far_end))) as gw:
        reader, writer = await asyncio.open_connection(
            "127.0.0.1", gw.tls_port, ssl=client_ssl, server_hostname="localhost"
        )
        writer.write(b"GET / HTTP/1.1\r\nHost: localhost\r\n\r\n" * 600)
        async with asyncio.timeout(TIMEOUT):
            for _ in range(600):
                head = await reader.readuntil(b"\r\n\r\n")
                assert head.startswith(b"HTTP/1.1 200")
                length = int(head.lower().split(b"content-length:")[1].split(b"\r\n")[0])
                await reader.readexactly(length)
        writer.close()


async def test_pipelined_responses_wait_for_a_client_that_reads_late(
    write_config: Callable[..., Any], far_end: FarEnd, client_ssl: ssl.SSLContext
) -> None:
    """Unread answers stop the reading of more requests; every answer still arrives, whole."""
    async with running(write_config(vms=_serial(far_end))) as gw:
        reader, writer = await asyncio.open_connection(
            "127.0.0.1", gw.tls_port, ssl=client_ssl, server_hostname="localhost"
        )
        count = 60
        writer.write(b"GET /assets/xterm.mjs HTTP/1.1\r\nHost: localhost\r\n\r\n" * count)
        await writer.drain()  # 20 MB of answers cannot fit the buffers: the server pauses
        async with asyncio.timeout(TIMEOUT):
            sizes = set()
            for _ in range(count):
                head = await reader.readuntil(b"\r\n\r\n")
                assert head.startswith(b"HTTP/1.1 200")
                length = int(head.lower().split(b"content-length:")[1].split(b"\r\n")[0])
                sizes.add(len(await reader.readexactly(length)))
        assert len(sizes) == 1
        assert sizes.pop() > 100_000
        writer.close()


async def test_single_burst_head_over_the_cap_is_431(
    write_config: Callable[..., Any], far_end: FarEnd, client_ssl: ssl.SSLContext
) -> None:
    async with running(write_config(vms=_serial(far_end))) as gw:
        request = (
            b"GET / HTTP/1.1\r\nHost: localhost\r\n"
            + b"".join(b"X-Pad-%d: %s\r\n" % (i, b"a" * 1000) for i in range(32))
            + b"Connection: close\r\n\r\n"
        )
        status, _, _ = await https_exchange(gw.tls_port, client_ssl, request)
        assert status == 431


async def test_upgrade_with_non_ascii_after_the_token_is_401_and_the_token_never_logged(
    write_config: Callable[..., Any],
    far_end: FarEnd,
    client_ssl: ssl.SSLContext,
    token: Callable[..., str],
) -> None:
    """Once a crash that logged the whole Authorization header; now a plain 401."""
    secret = token("alice")
    request = (
        b"GET /v1/vms/vm-a/console HTTP/1.1\r\nHost: localhost\r\n"
        b"Authorization: Bearer " + secret.encode() + b"\xa0\r\n"
        b"X-Note: caf\xe9\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
        b"Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n"
        b"Sec-WebSocket-Protocol: relayd.console.v1\r\n\r\n"
    )
    good = request.replace(b"\xa0\r\n", b"\r\n", 1)  # the same odd X-Note byte, good token
    async with running(write_config(vms=_serial(far_end))) as gw:
        await wait_port_up(gw, "vm-a")
        for sent, expected in ((request, b"HTTP/1.1 401"), (good, b"HTTP/1.1 101")):
            reader, writer = await asyncio.open_connection(
                "127.0.0.1", gw.tls_port, ssl=client_ssl, server_hostname="localhost"
            )
            with capture_logs() as events:
                writer.write(sent)
                head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), TIMEOUT)
            assert head.startswith(expected)
            assert secret not in repr(events)
            writer.close()


async def test_deeply_nested_json_body_is_400(
    write_config: Callable[..., Any],
    far_end: FarEnd,
    client_ssl: ssl.SSLContext,
    token: Callable[..., str],
) -> None:
    async with running(write_config(vms=_serial(far_end))) as gw:
        status, _, body = await https_exchange(
            gw.tls_port,
            client_ssl,
            http_request(
                "POST", "/v1/vms/vm-a/console/tickets", bearer=token("alice"), body=b"[" * 60000
            ),
        )
        assert status == 400
        assert json.loads(body)["error"] == "bad_request"


async def test_health_port_answers_head_and_refuses_other_methods(
    write_config: Callable[..., Any], far_end: FarEnd
) -> None:
    async def exchange(method: str, path: str) -> bytes:
        reader, writer = await asyncio.open_connection("127.0.0.1", gw.health_port)
        writer.write(f"{method} {path} HTTP/1.1\r\nHost: x\r\n\r\n".encode())
        async with asyncio.timeout(TIMEOUT):
            data = await reader.read()
        writer.close()
        return data

    async with running(write_config(vms=_serial(far_end))) as gw:
        head = await exchange("HEAD", "/healthz")
        assert head.startswith(b"HTTP/1.1 200")
        assert head.endswith(b"\r\n\r\n")  # headers only
        post = await exchange("POST", "/metrics")
        assert post.startswith(b"HTTP/1.1 405")
        assert b"allow: get, head" in post.lower()


async def test_client_that_sends_but_never_answers_pings_is_dropped(
    write_config: Callable[..., Any],
    far_end: FarEnd,
    client_ssl: ssl.SSLContext,
    token: Callable[..., str],
) -> None:
    """Data frames are not pongs: a client that writes but never reads is not kept forever."""
    config = write_config(vms=_serial(far_end), limits={"keepalive_interval": "200ms"})
    async with running(config) as gw:
        await wait_port_up(gw, "vm-a")
        reader, writer = await raw_console(gw, client_ssl, token("alice"), query="mode=spectate")
        resize = json.dumps({"type": "resize", "cols": 80, "rows": 24}).encode()
        frame = struct.pack("!BB", 0x81, 0x80 | len(resize)) + b"\0\0\0\0" + resize
        async with asyncio.timeout(TIMEOUT):
            with contextlib.suppress(ConnectionError, ssl.SSLError):
                while not reader.at_eof():
                    writer.write(frame)  # busy, but never a pong
                    await reader.read(65536)  # pings arrive; nothing answers them
        writer.close()


def test_sysrq_keys_queued_together_go_out_in_the_order_pressed(tmp_path: Any) -> None:
    """s, u, b (sync, remount, reboot) must not become b, u, s."""
    vm = VmConfig(id="vm-a", subscription="sub-1", serial="tcp://127.0.0.1:1")
    hub = ConsoleHub(vm, LimitsConfig(), log_dir=tmp_path)
    hub.input.offer(b"queued paste")
    for key in "sub":
        hub.submit_break(key)
    ops = []
    while (op := hub.input.next(0.0)) is not None:
        ops.append(op)
        hub.input_written(0)
    assert ops == [Break(b"s"), Break(b"u"), Break(b"b"), Write(b"queued paste")]
    hub.close_log()


async def test_rate_limits_set_to_zero_are_off(
    write_config: Callable[..., Any], far_end: FarEnd
) -> None:
    config = write_config(
        vms=_serial(far_end),
        limits={"auth_failures_per_minute": 0, "connections_per_second_per_ip": 0},
    )
    gateway = Gateway(config)
    assert gateway.access.auth_limiter is None
    assert gateway.access.conn_limiter is None


async def test_switching_a_subscription_one_cannot_see_reads_as_unknown(
    write_config: Callable[..., Any],
    far_end: FarEnd,
    client_ssl: ssl.SSLContext,
    token: Callable[..., str],
) -> None:
    """No role anywhere under it: the same 404 as a subscription that does not exist."""
    async with running(write_config(vms=_serial(far_end))) as gw:
        answers = []
        for sub in ("sub-1", "no-such-sub"):
            status, _, body = await https_exchange(
                gw.tls_port,
                client_ssl,
                http_request(
                    "PUT",
                    f"/v1/subscriptions/{sub}/serial-console",
                    bearer=token("mallory"),
                    body=b'{"enabled": false}',
                ),
            )
            answers.append((status, json.loads(body)["error"]))
        assert answers == [(404, "not_found"), (404, "not_found")]


async def test_client_that_closes_by_the_rfc_is_audited_as_closing_not_lost(
    write_config: Callable[..., Any],
    far_end: FarEnd,
    client_ssl: ssl.SSLContext,
    token: Callable[..., str],
) -> None:
    """Close 1000, then wait for the server to end TCP: the audit says who closed, and how."""
    async with running(write_config(vms=_serial(far_end))) as gw:
        await wait_port_up(gw, "vm-a")
        with capture_logs() as events:
            reader, writer = await raw_console(gw, client_ssl, token("alice"))
            writer.write(struct.pack("!BBI", 0x88, 0x82, 0) + struct.pack("!H", 1000))
            async with asyncio.timeout(TIMEOUT):
                with contextlib.suppress(ConnectionError, ssl.SSLError):
                    while await reader.read(65536):
                        pass  # hello, replay, the server's Close; then the server's EOF
            writer.close()
            await wait_until(gw.hubs["vm-a"], lambda: not gw.hubs["vm-a"].clients)
        ended = [e for e in events if e["event"] == "session_ended"]
        assert [e["reason"] for e in ended] == ["client closed (1000)"]


async def test_text_message_that_is_not_utf8_closes_1007(
    write_config: Callable[..., Any], far_end: FarEnd, open_console: Callable[..., Any]
) -> None:
    """RFC 6455 8.1; UTF-16 JSON, which json.loads(bytes) would have accepted, included."""
    async with running(write_config(vms=_serial(far_end))) as gw:
        await wait_port_up(gw, "vm-a")
        for payload in (b"\xff\xfe{", '{"type":"break"}'.encode("utf-16")):
            async with open_console(gw, "vm-a") as console:
                frame = Frame(Opcode.TEXT, payload).serialize(mask=True)
                console.ws.transport.write(frame)
                code, _ = await console.closed()
                assert code == 1007


async def test_wrong_method_is_405_with_allow_and_console_log_takes_head(
    write_config: Callable[..., Any],
    far_end: FarEnd,
    client_ssl: ssl.SSLContext,
    token: Callable[..., str],
) -> None:
    async with running(write_config(vms=_serial(far_end))) as gw:
        bearer = token("alice")
        status, headers, _ = await https_exchange(
            gw.tls_port, client_ssl, http_request("DELETE", "/v1/vms", bearer=bearer)
        )
        assert (status, headers.get("allow")) == (405, "GET, HEAD")
        status, headers, _ = await https_exchange(
            gw.tls_port, client_ssl, http_request("GET", "/v1/vms/vm-a/console/tickets")
        )
        assert (status, headers.get("allow")) == (405, "POST")
        status, _, body = await https_exchange(
            gw.tls_port,
            client_ssl,
            http_request("HEAD", "/v1/vms/vm-a/console-log", bearer=bearer),
        )
        assert (status, body) == (200, b"")


async def test_a_loop_of_breaks_and_resets_is_refused_past_a_bounded_queue(
    write_config: Callable[..., Any], far_end: FarEnd, open_console: Callable[..., Any]
) -> None:
    """BREAKs and hooks carry no bytes for the input bound: past a few queued, busy.

    Each BREAK here runs a 30 s hook, so nothing drains while the loop runs; the
    queue would otherwise grow (with an audit line each) for as long as a writer sent.
    """
    config = write_config(
        vms=[
            {
                "id": "vm-a",
                "serial": f"tcp://127.0.0.1:{far_end.port}",
                "break_command": ["sleep", "30"],
                "reset_command": ["sleep", "30"],
            }
        ],
        roles=[("user:olga", "owner", "/subscriptions/sub-1")],
    )
    async with running(config) as gw:
        await wait_port_up(gw, "vm-a")
        async with open_console(gw, "vm-a", user="olga") as olga:
            with capture_logs() as logs:
                for _ in range(MAX_QUEUED_BREAKS + 4):
                    await olga.send({"type": "break"})
                busy = [await olga.control(type="error", code="busy") for _ in range(3)]
                for _ in range(MAX_QUEUED_HOOKS + 3):
                    await olga.send({"type": "reset"})
                busy += [await olga.control(type="error", code="busy") for _ in range(2)]
                await olga.send({"type": "launch"})  # the session still answers
                await olga.control(type="error", code="bad_message")
            assert "BREAK was not queued" in busy[0]["message"]
            assert "reset was not queued" in busy[-1]["message"]
            hub = gw.hubs["vm-a"]
            # The first of each may already have left the queue for the port or the hook.
            assert MAX_QUEUED_BREAKS - 1 <= hub.input.queued_breaks <= MAX_QUEUED_BREAKS
            assert MAX_QUEUED_HOOKS - 1 <= len(hub.hook_queue) <= MAX_QUEUED_HOOKS
            audited = [e for e in logs if e.get("event") == "break_sent"]
            assert len(audited) <= MAX_QUEUED_BREAKS + 1


def _masked(opcode: int, payload: bytes) -> bytes:
    """A final client frame with a zero mask key (the payload goes as it is)."""
    assert len(payload) <= 125
    return struct.pack("!BB", 0x80 | opcode, 0x80 | len(payload)) + b"\0\0\0\0" + payload


async def test_client_that_floods_pings_and_reads_nothing_costs_the_gateway_a_few_mb(
    write_config: Callable[..., Any],
    far_end: FarEnd,
    client_ssl: ssl.SSLContext,
    token: Callable[..., str],
) -> None:
    """50 MB of pings (and unasked pongs, to look alive) from a reader that never reads.

    Every ping wants a pong back; a gateway that kept reading queued ~48 MB of
    them. It must stop reading the client once its output is over the
    high-water mark, whatever the frame kind, and drop it when its keepalive
    goes unanswered (with a reset: a FIN would wait behind the pongs). Measured
    as the peak RSS of a real gateway process.
    """
    config = write_config(vms=_serial(far_end), limits={"keepalive_interval": "1s"})
    unit = _masked(0x9, b"p" * 125) * 7 + _masked(0xA, b"relayd")
    chunk = unit * (2**20 // len(unit))
    total = 50 * 2**20
    deadline = TIMEOUT * 6
    async with gateway_process(config) as gateway:
        sock = socket.create_connection(("127.0.0.1", gateway.port))
        # Closed here whatever happens: a socket left to the collector fails a later test.
        with contextlib.closing(sock):
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
            sock.setblocking(False)
            _, writer = await raw_console(
                gateway.port, client_ssl, token("rita"), query="mode=spectate", sock=sock
            )
            baseline = gateway.peak_rss()
            sent = 0
            try:
                with contextlib.suppress(ConnectionError, ssl.SSLError):
                    async with asyncio.timeout(deadline):
                        while sent < total:
                            writer.write(chunk)
                            await writer.drain()  # blocks once the gateway stops reading us
                            sent += len(chunk)
            except TimeoutError:
                pytest.fail(
                    f"after {sent} bytes of pings the gateway neither read more nor dropped "
                    f"the client in {deadline:g}s; its log: "
                    f"{[e['event'] for e in gateway.events]}"
                )
            finally:
                writer.transport.abort()  # close() would wait to flush what it could not send
            grown = gateway.peak_rss() - baseline
    assert grown < 8 * 2**20, f"the gateway grew by {grown} bytes for {sent} bytes of pings"
