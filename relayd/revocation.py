"""Certificate revocation lists (`[tls] crl`): users' and gateways' certificates taken back.

A client certificate is a credential (`cert:<CN>`), and in a cluster a gateway's
certificate is more: a verified peer may name any principal for the sessions it
relays. Expiry alone leaves a stolen key, or a decommissioned gateway, trusted
for the certificate's whole life; a CRL ends that at once.

OpenSSL does the check at every handshake (`tls.apply_crl`: the CRLs join the context's
store with `VERIFY_CRL_CHECK_LEAF`), for client certificates on the listener and,
on peer links, for the owner's certificate too. It fails closed: a leaf whose
issuer has no CRL in the file, or whose CRL is past its nextUpdate, is refused
like a revoked one. So the file is read here first, to say that at start-up and
on reload (`Revocations.problems`) rather than in a stream of failed handshakes,
and to refuse a CRL that none of the configured CAs signed (a wrong file would
otherwise revoke nothing and look fine).

Handshakes already done are not re-checked by OpenSSL: a reload that brings a
new CRL ends the live connections whose certificate it now revokes
(`Revocations.revokes`, asked by the gateway on reload).
"""

from __future__ import annotations

import datetime
import re
from collections.abc import Sequence
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives.asymmetric.types import CertificateIssuerPublicKeyTypes

from .errors import ConfigError
from .tls import read_certificates

__all__ = ["Revocations", "load_revocations"]

_PEM_CRL = re.compile(rb"-----BEGIN X509 CRL-----.+?-----END X509 CRL-----", re.DOTALL)


class Revocations:
    """The CRLs of `[tls] crl`, each checked against the CA that signed it."""

    def __init__(self, crls: Sequence[x509.CertificateRevocationList]) -> None:
        self._by_issuer = {crl.issuer: crl for crl in crls}

    @classmethod
    def load(cls, path: Path, cas: Sequence[x509.Certificate]) -> Revocations:
        """Read `path` (one or more PEM CRLs) and check each is signed by one of `cas`.

        Args:
            cas: the certificates of `client_ca` and `peer_ca`: the issuers whose
                leaves the gateway verifies.

        Raises:
            ConfigError: the file cannot be read, holds no CRL, or holds one that no
                configured CA signed.
        """
        try:
            data = path.read_bytes()
        except FileNotFoundError:
            raise ConfigError(str(path), "tls.crl", "file not found") from None
        except OSError as exc:
            raise ConfigError(str(path), "tls.crl", f"cannot read: {exc.strerror}") from None
        crls = []
        for block in _PEM_CRL.findall(data):
            try:
                crls.append(x509.load_pem_x509_crl(block))
            except ValueError as exc:
                raise ConfigError(str(path), "tls.crl", f"not a PEM CRL: {exc}") from None
        if not crls:
            raise ConfigError(str(path), "tls.crl", "no PEM CRL (-----BEGIN X509 CRL-----)")
        for crl in crls:
            if not any(_signed_by(crl, ca) for ca in cas):
                raise ConfigError(
                    str(path),
                    "tls.crl",
                    f"the CRL of {crl.issuer.rfc4514_string()} is signed by no certificate "
                    "of client_ca or peer_ca",
                )
        return cls(crls)

    def revokes(self, der: bytes) -> bool:
        """Whether a (verified, DER) certificate is on its issuer's list."""
        try:
            cert = x509.load_der_x509_certificate(der)
        except ValueError:
            return False
        crl = self._by_issuer.get(cert.issuer)
        return crl is not None and (
            crl.get_revoked_certificate_by_serial_number(cert.serial_number) is not None
        )

    def problems(
        self, cas: Sequence[x509.Certificate], now: datetime.datetime | None = None
    ) -> list[str]:
        """What will make OpenSSL refuse certificates that are not revoked: a CA with no
        CRL in the file, a CRL past its nextUpdate. One sentence each, for logs and
        `check-config`."""
        now = now or datetime.datetime.now(datetime.UTC)
        found = []
        for ca in cas:
            crl = self._by_issuer.get(ca.subject)
            name = ca.subject.rfc4514_string()
            if crl is None:
                found.append(f"no CRL for {name}: every certificate it issues directly is refused")
            elif crl.next_update_utc is not None and crl.next_update_utc < now:
                found.append(
                    f"the CRL of {name} expired at {crl.next_update_utc.isoformat()}: "
                    "every certificate it issued is refused until a fresh one is loaded"
                )
        return found

    def next_update(self) -> datetime.datetime | None:
        """When the first CRL to expire does (None: none says)."""
        dates = [c.next_update_utc for c in self._by_issuer.values() if c.next_update_utc]
        return min(dates) if dates else None


def _signed_by(crl: x509.CertificateRevocationList, ca: x509.Certificate) -> bool:
    if crl.issuer != ca.subject:
        return False
    key: CertificateIssuerPublicKeyTypes = ca.public_key()  # type: ignore[assignment]
    try:
        return crl.is_signature_valid(key)
    except TypeError:  # a key type that cannot sign CRLs
        return False


def load_revocations(
    crl: Path, client_ca: Path | None, peer_ca: Path | None
) -> tuple[Revocations, list[str]]:
    """`[tls] crl`, checked against the CAs whose leaves the gateway verifies, and the
    `problems` that will make OpenSSL refuse certificates nobody revoked.

    Raises:
        ConfigError: a file cannot be read, or the CRL file is wrong (`Revocations.load`).
    """
    cas: tuple[x509.Certificate, ...] = ()
    if client_ca is not None:
        cas += read_certificates(client_ca, "tls.client_ca")
    if peer_ca is not None:
        cas += read_certificates(peer_ca, "cluster.peer_ca")
    revocations = Revocations.load(crl, cas)
    return revocations, revocations.problems(cas)
