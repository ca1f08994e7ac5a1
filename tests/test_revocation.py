"""`[tls] crl`: revoked client and gateway certificates are refused, at the handshake and
on reload. Real TLS on loopback, real CRLs signed by the test CAs."""

from __future__ import annotations

import asyncio
import datetime
import json
import ssl
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import trustme
from prometheus_client import generate_latest
from structlog.testing import capture_logs
from websockets.asyncio.client import connect
from websockets.exceptions import InvalidMessage

from relayd.cluster.peerlink import peer_client_context, trust_peer_ca
from relayd.config import TlsConfig
from relayd.errors import ConfigError
from relayd.health import make_registry
from relayd.revocation import Revocations, load_revocations
from relayd.tls import server_context

from .conftest import TIMEOUT, FarEnd, console_url, running, wait_port_up
from .crl import NOW, crl_pem


def write(path: Path, data: bytes) -> Path:
    path.write_bytes(data)
    return path


def leaf_files(leaf: trustme.LeafCert, directory: Path, name: str) -> tuple[Path, Path]:
    cert, key = directory / f"{name}.crt", directory / f"{name}.key"
    leaf.cert_chain_pems[0].write_to_path(str(cert))
    leaf.private_key_pem.write_to_path(str(key))
    return cert, key


# -- the file -------------------------------------------------------------------------------


def test_a_crl_no_configured_ca_signed_is_refused(tmp_path: Path) -> None:
    """A CRL from the wrong CA would revoke nothing and look fine: it is a config error."""
    ours, theirs = trustme.CA(), trustme.CA()
    ca_file = tmp_path / "ca.pem"
    ours.cert_pem.write_to_path(str(ca_file))
    crl = write(tmp_path / "crl.pem", crl_pem(theirs))
    with pytest.raises(ConfigError, match=r"tls\.crl: the CRL of .* is signed by no certificate"):
        load_revocations(crl, ca_file, None)
    with pytest.raises(ConfigError, match=r"tls\.crl: no PEM CRL"):
        load_revocations(write(tmp_path / "empty.pem", b"nothing here\n"), ca_file, None)
    with pytest.raises(ConfigError, match=r"tls\.crl: file not found"):
        load_revocations(tmp_path / "missing.pem", ca_file, None)


def test_problems_name_a_ca_without_a_crl_and_an_expired_crl(tmp_path: Path) -> None:
    """OpenSSL fails closed on both: said at load, not in a stream of failed handshakes."""
    users, gateways = trustme.CA(), trustme.CA()
    users_file, gateways_file = tmp_path / "users.pem", tmp_path / "gateways.pem"
    users.cert_pem.write_to_path(str(users_file))
    gateways.cert_pem.write_to_path(str(gateways_file))
    stale = crl_pem(users, next_update=NOW - datetime.timedelta(hours=1))
    revocations, problems = load_revocations(
        write(tmp_path / "crl.pem", stale), users_file, gateways_file
    )
    assert len(problems) == 2
    assert "expired" in problems[0]
    assert "no CRL for" in problems[1]
    assert isinstance(revocations, Revocations)


def test_crl_without_any_verified_client_certificate_is_a_config_error(
    write_config: Callable[..., Any], tmp_path: Path
) -> None:
    with pytest.raises(ConfigError, match=r"tls\.crl: no client certificate is verified"):
        write_config(vms=[], tls={"crl": tmp_path / "crl.pem"})


# -- a gateway's listener --------------------------------------------------------------------


async def test_a_revoked_client_certificate_is_refused_and_a_reload_ends_a_live_one(
    write_config: Callable[..., Any], far_end: FarEnd, pki: dict[str, Any], tmp_path: Path
) -> None:
    """The CRL refuses a revoked user's handshake; a reload with a CRL that now revokes
    a live session's certificate ends that session with 4003, and no other."""
    users = trustme.CA()
    users_file = tmp_path / "users.pem"
    users.cert_pem.write_to_path(str(users_file))
    revoked, kept, later = (
        users.issue_cert(f"{cn}@example.com", common_name=cn) for cn in ("old", "ops", "dev")
    )
    crl = write(tmp_path / "crl.pem", crl_pem(users, [revoked]))
    config = write_config(
        vms=[{"id": "vm-a", "serial": f"tcp://127.0.0.1:{far_end.port}"}],
        tls={"client_ca": users_file, "crl": crl},
        roles=[(f"cert:{cn}", "reader", "/subscriptions/sub-1") for cn in ("old", "ops", "dev")],
    )

    def context(leaf: trustme.LeafCert) -> ssl.SSLContext:
        ctx = ssl.create_default_context(cafile=str(pki["ca"]))
        leaf.configure_cert(ctx)
        return ctx

    async with running(config) as gw:
        await wait_port_up(gw, "vm-a")
        url = console_url(gw, "vm-a")
        with capture_logs() as events:
            # Under TLS 1.3 the client finishes first: the refusal shows as a dropped exchange.
            with pytest.raises((ssl.SSLError, ConnectionError, InvalidMessage)):
                async with connect(url, ssl=context(revoked), subprotocols=["relayd.console.v1"]):  # type: ignore[list-item]
                    pass
            async with (
                connect(url, ssl=context(kept), subprotocols=["relayd.console.v1"]) as ws_kept,  # type: ignore[list-item]
                connect(url, ssl=context(later), subprotocols=["relayd.console.v1"]) as ws_later,  # type: ignore[list-item]
            ):
                for ws in (ws_kept, ws_later):
                    hello = json.loads(await asyncio.wait_for(ws.recv(), TIMEOUT))
                    assert hello["type"] == "hello"
                # Two handshakes and upgrades later, the refused one has been counted.
                assert gw.listener is not None
                assert gw.listener.handshake_failures["certificate_revoked"] == 1
                assert [e["reason"] for e in events if e["event"] == "handshake_failed"] == [
                    "certificate_revoked"
                ]
                metrics = generate_latest(make_registry(gw)).decode()
                assert "relayd_crl_next_update_timestamp_seconds" in metrics
                await _revoke_live(gw, crl, crl_pem(users, [revoked, later]), ws_kept, ws_later)


async def _revoke_live(gw: Any, crl: Path, data: bytes, kept: Any, revoked: Any) -> None:
    write(crl, data)
    assert await gw.reload()
    async with asyncio.timeout(TIMEOUT):
        await revoked.wait_closed()
    assert revoked.close_code == 4003
    assert revoked.close_reason == "client certificate revoked"
    await kept.ping()  # the other session goes on
    assert kept.close_code is None


# -- peer links ----------------------------------------------------------------------------------


async def _handshake(server: ssl.SSLContext, client: ssl.SSLContext) -> None:
    """One TLS handshake on loopback, with a byte each way so that TLS 1.3's client sees the
    server's verdict on its certificate."""

    async def answer(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writer.write(await reader.readexactly(1))
        await writer.drain()
        writer.close()

    srv = await asyncio.start_server(answer, "127.0.0.1", 0, ssl=server)
    port = srv.sockets[0].getsockname()[1]
    try:
        async with asyncio.timeout(TIMEOUT):
            reader, writer = await asyncio.open_connection(
                "127.0.0.1", port, ssl=client, server_hostname="127.0.0.1"
            )
            writer.write(b"x")
            try:
                if await reader.read(1) != b"x":
                    raise ConnectionError("the server dropped the connection")
            finally:
                writer.close()
    finally:
        srv.close()


async def test_peer_links_refuse_a_revoked_gateway_both_ways(tmp_path: Path) -> None:
    """An owner refuses a revoked gateway's client certificate; a gateway refuses to relay
    to an owner whose server certificate is revoked; unrevoked gateways still link."""
    peers = trustme.CA()
    peer_ca = tmp_path / "peer-ca.pem"
    peers.cert_pem.write_to_path(str(peer_ca))
    names = ("gw-1", "gw-2", "gw-x")
    gw = {name: peers.issue_cert("127.0.0.1", common_name=name) for name in names}
    files = {name: leaf_files(leaf, tmp_path, name) for name, leaf in gw.items()}
    crl = write(tmp_path / "crl.pem", crl_pem(peers, [gw["gw-x"]]))

    def owner(name: str) -> ssl.SSLContext:
        cert, key = files[name]
        ctx = server_context(TlsConfig(cert=cert, key=key, crl=crl))
        trust_peer_ca(ctx, peer_ca)
        return ctx

    def dialer(name: str) -> ssl.SSLContext:
        cert, key = files[name]
        return peer_client_context(cert, key, peer_ca, crl=crl)

    await _handshake(owner("gw-1"), dialer("gw-2"))
    with pytest.raises((ssl.SSLError, ConnectionError)):
        await _handshake(owner("gw-1"), dialer("gw-x"))
    with pytest.raises(ssl.SSLCertVerificationError, match="certificate revoked"):
        await _handshake(owner("gw-x"), dialer("gw-1"))


async def test_check_config_warns_of_an_expired_crl_and_refuses_a_foreign_one(
    write_config: Callable[..., Any], tmp_path: Path
) -> None:
    """check-config says what the daemon would log: an expired CRL refuses every
    certificate of its CA (a warning); a CRL no configured CA signed is an error."""
    users, stranger = trustme.CA(), trustme.CA()
    users_file = tmp_path / "users.pem"
    users.cert_pem.write_to_path(str(users_file))
    crl = write(tmp_path / "crl.pem", crl_pem(users, next_update=NOW - datetime.timedelta(hours=1)))
    config = write_config(vms=[], tls={"client_ca": users_file, "crl": crl})

    async def check() -> tuple[int | None, str]:
        proc = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "relayd.cli", "check-config", str(config.path),
            stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.PIPE,
        )  # fmt: skip
        async with asyncio.timeout(TIMEOUT * 3):
            _, err = await proc.communicate()
        return proc.returncode, err.decode()

    code, err = await check()
    assert code == 0, err
    assert "warning" in err
    assert "tls.crl: the CRL of" in err
    assert "expired" in err
    write(crl, crl_pem(stranger))
    code, err = await check()
    assert code != 0
    assert "signed by no certificate of client_ca or peer_ca" in err
