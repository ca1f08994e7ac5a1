"""Tests for relayd.certs: the development PKI."""

from __future__ import annotations

import asyncio
import datetime
import ipaddress
import ssl
import stat
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from relayd.certs import DevPki, certificate_not_after, init_dev_pki

HANDSHAKE_TIMEOUT = 10.0


def _mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def _cert(path: Path) -> x509.Certificate:
    return x509.load_pem_x509_certificate(path.read_bytes())


def _sans(path: Path) -> x509.SubjectAlternativeName:
    return _cert(path).extensions.get_extension_for_class(x509.SubjectAlternativeName).value


def _server_context(pki: DevPki, version: ssl.TLSVersion) -> ssl.SSLContext:
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.minimum_version = context.maximum_version = version
    context.load_cert_chain(pki.server_cert, pki.server_key)
    return context


async def _handshake(
    server_context: ssl.SSLContext,
    client_context: ssl.SSLContext,
    server_hostname: str,
) -> bytes:
    """Run a TLS echo round trip on loopback and return what came back."""

    async def echo(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writer.write(await reader.readexactly(4))
        await writer.drain()
        writer.close()
        await writer.wait_closed()

    server = await asyncio.start_server(echo, "127.0.0.1", 0, ssl=server_context)
    port = server.sockets[0].getsockname()[1]
    async with server, asyncio.timeout(HANDSHAKE_TIMEOUT):
        reader, writer = await asyncio.open_connection(
            "127.0.0.1", port, ssl=client_context, server_hostname=server_hostname
        )
        writer.write(b"ping")
        reply = await reader.readexactly(4)
        writer.close()
        await writer.wait_closed()
    return reply


def test_init_dev_pki_fresh_directory_creates_files_with_private_modes(tmp_path: Path) -> None:
    """A fresh run creates every file, keys 0600 and the directory 0700."""
    pki = init_dev_pki(tmp_path / "dev")
    assert _mode(pki.directory) == 0o700
    for key in (pki.ca_key, pki.server_key, pki.client_key, pki.hs256_key):
        assert _mode(key) == 0o600, key
    for cert in (pki.ca_cert, pki.server_cert, pki.client_cert):
        assert cert.is_file()
    assert sorted(p.name for p in pki.directory.iterdir()) == [
        "ca.crt",
        "ca.key",
        "client.crt",
        "client.key",
        "hs256.key",
        "server.crt",
        "server.key",
    ]


def test_init_dev_pki_hs256_key_is_32_bytes_of_hex(tmp_path: Path) -> None:
    """The development JWT key is 32 random bytes written as hex text."""
    pki = init_dev_pki(tmp_path)
    assert len(bytes.fromhex(pki.hs256_key.read_text().strip())) == 32


def test_init_dev_pki_certificates_have_the_expected_roles(tmp_path: Path) -> None:
    """The CA may sign, the server is a serverAuth+clientAuth leaf, the client clientAuth only."""
    pki = init_dev_pki(tmp_path)
    ca = _cert(pki.ca_cert)
    assert ca.subject.get_attributes_for_oid(NameOID.COMMON_NAME)[0].value == "relayd dev CA"
    assert ca.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
    usage = ca.extensions.get_extension_for_class(x509.KeyUsage).value
    assert usage.key_cert_sign
    assert usage.crl_sign

    server = _cert(pki.server_cert)
    client = _cert(pki.client_cert)
    for leaf, purposes in (
        (server, [ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH]),
        (client, [ExtendedKeyUsageOID.CLIENT_AUTH]),
    ):
        leaf.verify_directly_issued_by(ca)
        assert not leaf.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
        usage = leaf.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
        assert list(usage) == purposes
    assert client.subject.get_attributes_for_oid(NameOID.COMMON_NAME)[0].value == "dev-operator"


def test_server_certificate_default_names_are_localhost_and_loopback(tmp_path: Path) -> None:
    """Without extra names the server certificate covers localhost, 127.0.0.1 and ::1."""
    sans = _sans(init_dev_pki(tmp_path).server_cert)
    assert sans.get_values_for_type(x509.DNSName) == ["localhost"]
    assert sans.get_values_for_type(x509.IPAddress) == [
        ipaddress.ip_address("127.0.0.1"),
        ipaddress.ip_address("::1"),
    ]


def test_init_dev_pki_extra_names_appear_as_dns_or_ip_sans(tmp_path: Path) -> None:
    """An extra name that parses as an IP becomes an IP SAN, anything else a DNS SAN."""
    pki = init_dev_pki(tmp_path, names=["gw.example.test", "10.1.2.3", "fd00::7", "localhost"])
    sans = _sans(pki.server_cert)
    assert sans.get_values_for_type(x509.DNSName) == ["localhost", "gw.example.test"]
    assert ipaddress.ip_address("10.1.2.3") in sans.get_values_for_type(x509.IPAddress)
    assert ipaddress.ip_address("fd00::7") in sans.get_values_for_type(x509.IPAddress)


@pytest.mark.parametrize("version", [ssl.TLSVersion.TLSv1_2, ssl.TLSVersion.TLSv1_3])
@pytest.mark.parametrize("server_hostname", ["localhost", "127.0.0.1"])
async def test_server_certificate_loopback_handshake_verifies_against_ca(
    tmp_path: Path, version: ssl.TLSVersion, server_hostname: str
) -> None:
    """A client trusting only ca.crt completes a TLS handshake by name and by IP."""
    pki = init_dev_pki(tmp_path)
    client_context = ssl.create_default_context(cafile=pki.ca_cert)
    reply = await _handshake(_server_context(pki, version), client_context, server_hostname)
    assert reply == b"ping"


async def test_client_certificate_mutual_tls_handshake_is_verified(tmp_path: Path) -> None:
    """A server requiring client certificates from the dev CA accepts client.crt."""
    pki = init_dev_pki(tmp_path)
    server_context = _server_context(pki, ssl.TLSVersion.TLSv1_3)
    server_context.verify_mode = ssl.CERT_REQUIRED
    server_context.load_verify_locations(cafile=pki.ca_cert)
    client_context = ssl.create_default_context(cafile=pki.ca_cert)
    client_context.load_cert_chain(pki.client_cert, pki.client_key)
    assert await _handshake(server_context, client_context, "localhost") == b"ping"


async def test_server_certificate_as_client_certificate_passes_mutual_tls(
    tmp_path: Path,
) -> None:
    """A gateway presents server.crt as its client certificate on peer links: it verifies."""
    pki = init_dev_pki(tmp_path)
    server_context = _server_context(pki, ssl.TLSVersion.TLSv1_2)
    server_context.verify_mode = ssl.CERT_REQUIRED
    server_context.load_verify_locations(cafile=pki.ca_cert)
    client_context = ssl.create_default_context(cafile=pki.ca_cert)
    client_context.load_cert_chain(pki.server_cert, pki.server_key)
    assert await _handshake(server_context, client_context, "127.0.0.1") == b"ping"


def test_init_dev_pki_server_certificate_without_client_auth_is_reissued(tmp_path: Path) -> None:
    """A server certificate from before peer links (serverAuth only) is reissued, CA kept."""
    pki = init_dev_pki(tmp_path)
    ca_before = pki.ca_cert.read_bytes()
    ca_key = serialization.load_pem_private_key(pki.ca_key.read_bytes(), password=None)
    assert isinstance(ca_key, ec.EllipticCurvePrivateKey)
    old = _cert(pki.server_cert)
    builder = (
        x509.CertificateBuilder()
        .subject_name(old.subject)
        .issuer_name(old.issuer)
        .public_key(old.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(old.not_valid_before_utc)
        .not_valid_after(old.not_valid_after_utc)
        .add_extension(_sans(pki.server_cert), critical=False)
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
    )
    pki.server_cert.write_bytes(
        builder.sign(ca_key, hashes.SHA256()).public_bytes(serialization.Encoding.PEM)
    )
    init_dev_pki(tmp_path)
    assert pki.ca_cert.read_bytes() == ca_before
    usage = _cert(pki.server_cert).extensions.get_extension_for_class(x509.ExtendedKeyUsage)
    assert ExtendedKeyUsageOID.CLIENT_AUTH in usage.value


async def test_server_certificate_other_hostname_fails_verification(tmp_path: Path) -> None:
    """A name the certificate does not carry is refused, so the SAN check is real."""
    pki = init_dev_pki(tmp_path)
    client_context = ssl.create_default_context(cafile=pki.ca_cert)
    server_context = _server_context(pki, ssl.TLSVersion.TLSv1_3)
    with pytest.raises(ssl.SSLCertVerificationError):
        await _handshake(server_context, client_context, "not-in-the-cert.test")


def test_init_dev_pki_existing_valid_set_is_kept(tmp_path: Path) -> None:
    """A second run keeps every file byte for byte."""
    first = init_dev_pki(tmp_path)
    before = {p.name: p.read_bytes() for p in tmp_path.iterdir()}
    second = init_dev_pki(tmp_path)
    assert second == first
    assert {p.name: p.read_bytes() for p in tmp_path.iterdir()} == before


def test_init_dev_pki_force_reissues_everything(tmp_path: Path) -> None:
    """force=True replaces every file even though the old ones are valid."""
    init_dev_pki(tmp_path)
    before = {p.name: p.read_bytes() for p in tmp_path.iterdir()}
    init_dev_pki(tmp_path, force=True)
    after = {p.name: p.read_bytes() for p in tmp_path.iterdir()}
    assert after.keys() == before.keys()
    assert all(after[name] != before[name] for name in before)


def test_init_dev_pki_expired_set_is_reissued(tmp_path: Path) -> None:
    """Certificates that have expired are replaced by fresh ones."""
    long_ago = datetime.datetime.now(datetime.UTC) - datetime.timedelta(days=400)
    pki = init_dev_pki(tmp_path, days=30, now=long_ago)
    assert certificate_not_after(pki.server_cert) < datetime.datetime.now(datetime.UTC)
    init_dev_pki(tmp_path, days=30)
    for cert in (pki.ca_cert, pki.server_cert, pki.client_cert):
        assert certificate_not_after(cert) > datetime.datetime.now(datetime.UTC)


def test_init_dev_pki_damaged_server_key_reissues_server_only(tmp_path: Path) -> None:
    """A server key that no longer parses is replaced and the CA is kept."""
    pki = init_dev_pki(tmp_path)
    ca_before = pki.ca_cert.read_bytes()
    pki.server_key.write_text("garbage")
    init_dev_pki(tmp_path)
    assert pki.ca_cert.read_bytes() == ca_before
    _cert(pki.server_cert).verify_directly_issued_by(_cert(pki.ca_cert))
    assert "PRIVATE KEY" in pki.server_key.read_text()


def test_init_dev_pki_new_name_on_existing_set_reissues_server_under_same_ca(
    tmp_path: Path,
) -> None:
    """Asking for a name the server certificate lacks reissues it, keeping the trusted CA."""
    pki = init_dev_pki(tmp_path)
    ca_before = pki.ca_cert.read_bytes()
    client_before = pki.client_cert.read_bytes()
    init_dev_pki(tmp_path, names=["gw.example.test"])
    assert pki.ca_cert.read_bytes() == ca_before
    assert pki.client_cert.read_bytes() == client_before
    assert "gw.example.test" in _sans(pki.server_cert).get_values_for_type(x509.DNSName)


def test_init_dev_pki_loose_directory_mode_is_tightened(tmp_path: Path) -> None:
    """An existing world-readable directory is set to 0700."""
    directory = tmp_path / "dev"
    directory.mkdir(mode=0o755)
    directory.chmod(0o755)
    init_dev_pki(directory)
    assert _mode(directory) == 0o700


def test_certificate_not_after_is_days_from_now(tmp_path: Path) -> None:
    """The expiry reported is the requested number of days after issue, in UTC."""
    now = datetime.datetime(2030, 1, 2, 3, 4, 5, tzinfo=datetime.UTC)
    pki = init_dev_pki(tmp_path, days=10, now=now)
    assert certificate_not_after(pki.server_cert) == now + datetime.timedelta(days=10)


@pytest.mark.parametrize("bad", [{"days": 0}, {"names": [""]}, {"names": ["bücher.test"]}])
def test_init_dev_pki_bad_arguments_raise_value_error(
    tmp_path: Path, bad: dict[str, object]
) -> None:
    """Non-positive days and empty or non-ASCII names are refused before any file is written."""
    with pytest.raises(ValueError, match=r"days|name"):
        init_dev_pki(tmp_path / "dev", **bad)  # type: ignore[arg-type]
    assert not (tmp_path / "dev").exists()
