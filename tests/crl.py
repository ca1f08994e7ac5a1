"""Certificate revocation lists for tests: signed by a trustme CA, listing its leaves."""

from __future__ import annotations

import datetime
from collections.abc import Sequence

import trustme
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization

NOW = datetime.datetime.now(datetime.UTC)


def crl_pem(
    ca: trustme.CA,
    revoked: Sequence[trustme.LeafCert] = (),
    *,
    next_update: datetime.datetime | None = None,
) -> bytes:
    """A CRL signed by `ca` that lists `revoked`."""
    key = serialization.load_pem_private_key(ca.private_key_pem.bytes(), None)
    issuer = x509.load_pem_x509_certificate(ca.cert_pem.bytes()).subject
    next_update = next_update or NOW + datetime.timedelta(days=1)
    builder = (
        x509.CertificateRevocationListBuilder()
        .issuer_name(issuer)
        .last_update(min(NOW, next_update) - datetime.timedelta(hours=1))
        .next_update(next_update)
    )
    for leaf in revoked:
        serial = x509.load_pem_x509_certificate(leaf.cert_chain_pems[0].bytes()).serial_number
        builder = builder.add_revoked_certificate(
            x509.RevokedCertificateBuilder().serial_number(serial).revocation_date(NOW).build()
        )
    return builder.sign(key, hashes.SHA256()).public_bytes(serialization.Encoding.PEM)  # type: ignore[arg-type]
