"""Development PKI: a throwaway CA, a server and a client certificate, an HS256 key.

The server certificate carries both the serverAuth and the clientAuth extended
key usage: in cluster mode a gateway presents it as its client certificate on
peer links (relayd/cluster/peerlink.py), and OpenSSL refuses a client
certificate whose extended key usage lacks clientAuth.

`relayd certs init DIR` and `relayd demo` call `init_dev_pki`; the readiness
check calls `certificate_not_after`. Everything is made with `cryptography`
so that no `openssl` binary (and no openssl.cnf) is needed.

Each piece is kept when it is still good, so running `certs init` twice does not
invalidate a CA that a browser or a script already trusts:

- the CA is kept while it parses, matches its key and has not expired;
- the server and client certificates are kept while they also chain to that CA,
  and the server certificate still covers every requested name and may also
  act as a client (older ones were serverAuth only);
- the HS256 key is kept while it is 32 bytes of hex.

A new CA reissues everything it signs. `force=True` reissues everything.
"""

from __future__ import annotations

import datetime
import ipaddress
import os
import secrets
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

__all__ = ["DEFAULT_NAMES", "DevPki", "certificate_not_after", "init_dev_pki"]

#: Names every development server certificate carries.
DEFAULT_NAMES = ("localhost", "127.0.0.1", "::1")

CA_COMMON_NAME = "relayd dev CA"
SERVER_COMMON_NAME = "relayd dev server"
CLIENT_COMMON_NAME = "dev-operator"

HS256_KEY_BYTES = 32

#: A gateway's server certificate is also its client certificate on peer links.
SERVER_USAGES = (ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH)
CLIENT_USAGES = (ExtendedKeyUsageOID.CLIENT_AUTH,)

# Certificates start a little in the past so that a peer whose clock lags
# ours does not reject them as "not yet valid".
_CLOCK_SKEW = datetime.timedelta(minutes=5)

_GeneralName = x509.DNSName | x509.IPAddress


@dataclass(frozen=True)
class DevPki:
    """Where the development PKI files are."""

    directory: Path
    ca_cert: Path
    ca_key: Path
    server_cert: Path
    server_key: Path
    client_cert: Path
    client_key: Path
    hs256_key: Path

    @classmethod
    def at(cls, directory: Path) -> DevPki:
        """The file layout inside `directory` (nothing is read or written)."""
        return cls(
            directory=directory,
            ca_cert=directory / "ca.crt",
            ca_key=directory / "ca.key",
            server_cert=directory / "server.crt",
            server_key=directory / "server.key",
            client_cert=directory / "client.crt",
            client_key=directory / "client.key",
            hs256_key=directory / "hs256.key",
        )


def init_dev_pki(
    directory: Path,
    *,
    names: Sequence[str] = (),
    days: int = 825,
    force: bool = False,
    now: datetime.datetime | None = None,
) -> DevPki:
    """Create (or keep) a development CA, server and client certificates and an HS256 key.

    Args:
        directory: created with mode 0700 if missing, and set to 0700 if not.
        names: extra server names beyond localhost, 127.0.0.1 and ::1; an entry
            that parses as an IP address becomes an IP SAN, anything else a DNS SAN.
        days: validity of newly issued certificates (825 is the longest TLS
            server lifetime that Apple clients accept).
        force: reissue everything even when the existing files are still good.
        now: the clock, for tests; defaults to the current UTC time.

    Returns:
        The paths of the files, which exist when this returns.

    Raises:
        ValueError: `days` is not positive or a name is empty or not ASCII.
        OSError: the directory cannot be created or written.
    """
    if days < 1:
        raise ValueError(f"days must be at least 1, not {days}")
    when = now if now is not None else datetime.datetime.now(datetime.UTC)
    sans = _subject_alt_names([*DEFAULT_NAMES, *names])

    directory.mkdir(mode=0o700, parents=True, exist_ok=True)
    directory.chmod(0o700)  # mkdir honours the umask, and the directory may predate us
    pki = DevPki.at(directory)

    ca = None if force else _load_valid(pki.ca_cert, pki.ca_key, None, when)
    if ca is None:
        ca = _issue_ca(pki, days, when)
    ca_cert = ca[0]

    server = None if force else _load_valid(pki.server_cert, pki.server_key, ca_cert, when)
    if server is None or not _covers(server[0], sans) or not _is_peer_capable(server[0]):
        _issue_leaf(pki.server_cert, pki.server_key, ca, days, when, server_sans=sans)

    client = None if force else _load_valid(pki.client_cert, pki.client_key, ca_cert, when)
    if client is None:
        _issue_leaf(pki.client_cert, pki.client_key, ca, days, when, server_sans=None)

    if force or not _hs256_key_is_valid(pki.hs256_key):
        secret = secrets.token_bytes(HS256_KEY_BYTES).hex() + "\n"
        _write_private(pki.hs256_key, secret.encode("ascii"))
    return pki


def certificate_not_after(path: Path) -> datetime.datetime:
    """The expiry (timezone-aware, UTC) of the first certificate in a PEM file.

    Raises:
        OSError: the file cannot be read.
        ValueError: the file holds no PEM certificate.
    """
    return x509.load_pem_x509_certificate(path.read_bytes()).not_valid_after_utc


def _subject_alt_names(names: Sequence[str]) -> list[_GeneralName]:
    """Turn names into SAN entries, IP or DNS, without duplicates, in order."""
    result: list[_GeneralName] = []
    for name in names:
        if not name or not name.isascii():
            raise ValueError(f"server name {name!r} must be non-empty ASCII (use punycode)")
        entry: _GeneralName
        try:
            entry = x509.IPAddress(ipaddress.ip_address(name))
        except ValueError:
            entry = x509.DNSName(name)
        if entry not in result:
            result.append(entry)
    return result


def _covers(cert: x509.Certificate, sans: Sequence[_GeneralName]) -> bool:
    """Whether `cert` names every entry of `sans`."""
    try:
        present = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except x509.ExtensionNotFound:
        return False
    return all(entry in present for entry in sans)


def _is_peer_capable(cert: x509.Certificate) -> bool:
    """Whether a server certificate may also be presented as a client one (peer links)."""
    try:
        usage = cert.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    except x509.ExtensionNotFound:
        return False
    return all(purpose in usage for purpose in SERVER_USAGES)


def _load_valid(
    cert_path: Path,
    key_path: Path,
    issuer: x509.Certificate | None,
    now: datetime.datetime,
) -> tuple[x509.Certificate, ec.EllipticCurvePrivateKey] | None:
    """Load a certificate and its key, or None if they are missing, broken or stale.

    Stale means: expired (or not yet valid), not matching the key, or not
    issued by `issuer` (None: self-signed, which is how the CA is checked).
    """
    try:
        cert = x509.load_pem_x509_certificate(cert_path.read_bytes())
        key = serialization.load_pem_private_key(key_path.read_bytes(), password=None)
    except (OSError, ValueError, TypeError):
        return None
    if not isinstance(key, ec.EllipticCurvePrivateKey):
        return None
    if not cert.not_valid_before_utc <= now < cert.not_valid_after_utc:
        return None
    if cert.public_key() != key.public_key():
        return None
    try:
        cert.verify_directly_issued_by(issuer if issuer is not None else cert)
    except (ValueError, TypeError, InvalidSignature):
        return None
    return cert, key


def _hs256_key_is_valid(path: Path) -> bool:
    """Whether `path` holds a hex-encoded key of the expected length."""
    try:
        text = path.read_text(encoding="ascii").strip()
        return len(bytes.fromhex(text)) == HS256_KEY_BYTES
    except (OSError, ValueError):
        return False


def _issue_ca(
    pki: DevPki, days: int, now: datetime.datetime
) -> tuple[x509.Certificate, ec.EllipticCurvePrivateKey]:
    """Create and write a self-signed EC P-256 CA."""
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, CA_COMMON_NAME)])
    cert = (
        _builder(name, name, key.public_key(), days, now)
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(
            _key_usage(digital_signature=False, key_cert_sign=True, crl_sign=True),
            critical=True,
        )
        .sign(key, hashes.SHA256())
    )
    _write_key_and_cert(pki.ca_cert, pki.ca_key, cert, key)
    return cert, key


def _issue_leaf(
    cert_path: Path,
    key_path: Path,
    ca: tuple[x509.Certificate, ec.EllipticCurvePrivateKey],
    days: int,
    now: datetime.datetime,
    *,
    server_sans: Sequence[_GeneralName] | None,
) -> None:
    """Create and write an end-entity certificate: server if `server_sans`, else client."""
    ca_cert, ca_key = ca
    key = ec.generate_private_key(ec.SECP256R1())
    common_name = SERVER_COMMON_NAME if server_sans is not None else CLIENT_COMMON_NAME
    usages = SERVER_USAGES if server_sans is not None else CLIENT_USAGES
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])
    builder = (
        _builder(subject, ca_cert.subject, key.public_key(), days, now)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(
            _key_usage(digital_signature=True, key_cert_sign=False, crl_sign=False),
            critical=True,
        )
        .add_extension(x509.ExtendedKeyUsage(list(usages)), critical=False)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()),
            critical=False,
        )
    )
    if server_sans is not None:
        builder = builder.add_extension(
            x509.SubjectAlternativeName(list(server_sans)), critical=False
        )
    _write_key_and_cert(cert_path, key_path, builder.sign(ca_key, hashes.SHA256()), key)


def _builder(
    subject: x509.Name,
    issuer: x509.Name,
    public_key: ec.EllipticCurvePublicKey,
    days: int,
    now: datetime.datetime,
) -> x509.CertificateBuilder:
    """The fields every certificate here shares."""
    return (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(issuer)
        .public_key(public_key)
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - _CLOCK_SKEW)
        .not_valid_after(now + datetime.timedelta(days=days))
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(public_key), critical=False)
    )


def _key_usage(*, digital_signature: bool, key_cert_sign: bool, crl_sign: bool) -> x509.KeyUsage:
    """A KeyUsage extension with only the flags that EC keys use here."""
    return x509.KeyUsage(
        digital_signature=digital_signature,
        content_commitment=False,
        key_encipherment=False,
        data_encipherment=False,
        key_agreement=False,
        key_cert_sign=key_cert_sign,
        crl_sign=crl_sign,
        encipher_only=False,
        decipher_only=False,
    )


def _write_key_and_cert(
    cert_path: Path,
    key_path: Path,
    cert: x509.Certificate,
    key: ec.EllipticCurvePrivateKey,
) -> None:
    """Write the key first, so a crash in between leaves a pair that fails validation."""
    key_pem = key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )
    _write_private(key_path, key_pem)
    _write_atomic(cert_path, cert.public_bytes(serialization.Encoding.PEM), mode=0o644)


def _write_private(path: Path, data: bytes) -> None:
    """Write a secret with mode 0600 from the moment the file exists."""
    _write_atomic(path, data, mode=0o600)


def _write_atomic(path: Path, data: bytes, *, mode: int) -> None:
    """Write `data` to a temporary file with `mode`, then rename it over `path`."""
    tmp = path.with_name(f".{path.name}.{secrets.token_hex(4)}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, mode)
    try:
        with os.fdopen(fd, "wb") as file:
            file.write(data)
            file.flush()
            os.fsync(file.fileno())
        os.chmod(tmp, mode)  # os.open's mode is filtered by the umask
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
