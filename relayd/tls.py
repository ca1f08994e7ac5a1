"""The server's TLS context: a 1.2 floor, forward-secret AEAD ciphers only.

TLS 1.0 and 1.1 fail at the handshake (the context's minimum version), as
do RSA key exchange and CBC suites. With `client_ca` set, a client may
present a certificate; it is verified against that CA only, and against
`crl` when one is set (revocation.py).
"""

from __future__ import annotations

import asyncio
import ssl
from pathlib import Path

from cryptography import x509

from .config import TlsConfig
from .errors import ConfigError

# TLS 1.2 suites; TLS 1.3 suites are OpenSSL's defaults, all AEAD.
CIPHERS_TLS12 = "ECDHE+AESGCM:ECDHE+CHACHA20:!aNULL:!eNULL:!MD5:!DSS"


def server_context(cfg: TlsConfig) -> ssl.SSLContext:
    """Build the listener's context.

    Raises:
        ConfigError: the certificate, key or client CA cannot be loaded.
    """
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.minimum_version = (
        ssl.TLSVersion.TLSv1_3 if cfg.min_version == "1.3" else ssl.TLSVersion.TLSv1_2
    )
    ctx.set_ciphers(CIPHERS_TLS12)
    ctx.options |= ssl.OP_NO_COMPRESSION | ssl.OP_CIPHER_SERVER_PREFERENCE
    ctx.options |= ssl.OP_NO_RENEGOTIATION | ssl.OP_SINGLE_ECDH_USE
    ctx.set_alpn_protocols(["http/1.1"])
    ctx.num_tickets = 0  # clients do not resume; each ticket costs the server a write and crypto
    try:
        ctx.load_cert_chain(cfg.cert, cfg.key)
    except FileNotFoundError as exc:
        raise ConfigError(str(exc.filename), "tls.cert", "file not found") from None
    except (ssl.SSLError, OSError) as exc:
        raise ConfigError(
            str(cfg.cert), "tls.cert", f"cannot load certificate/key: {exc}"
        ) from None
    if cfg.client_ca is not None:
        try:
            ctx.load_verify_locations(cafile=cfg.client_ca)
        except (ssl.SSLError, OSError) as exc:
            raise ConfigError(str(cfg.client_ca), "tls.client_ca", f"cannot load: {exc}") from None
        ctx.verify_mode = ssl.CERT_OPTIONAL
    if cfg.crl is not None:
        apply_crl(ctx, cfg.crl)
    return ctx


def read_certificates(path: Path, key: str) -> tuple[x509.Certificate, ...]:
    """The PEM certificates in a CA file (`key` names it in errors).

    Raises:
        ConfigError: the file cannot be read or holds no PEM certificate.
    """
    try:
        return tuple(x509.load_pem_x509_certificates(path.read_bytes()))
    except FileNotFoundError:
        raise ConfigError(str(path), key, "file not found") from None
    except OSError as exc:
        raise ConfigError(str(path), key, f"cannot read: {exc.strerror}") from None
    except ValueError as exc:
        raise ConfigError(str(path), key, f"not PEM certificates: {exc}") from None


def apply_crl(ctx: ssl.SSLContext, crl: Path) -> None:
    """Make `ctx` refuse revoked leaf certificates (`[tls] crl`, see revocation.py).

    Raises:
        ConfigError: the file cannot be loaded.
    """
    try:
        ctx.load_verify_locations(cafile=crl)
    except (ssl.SSLError, OSError) as exc:
        raise ConfigError(str(crl), "tls.crl", f"cannot load: {exc}") from None
    ctx.verify_flags |= ssl.VERIFY_CRL_CHECK_LEAF


def peer_certificate(transport: asyncio.BaseTransport) -> bytes | None:
    """The certificate (DER) the other end of a TLS transport presented, verified at its
    handshake; None without TLS or without a certificate."""
    ssl_object = transport.get_extra_info("ssl_object")
    return None if ssl_object is None else ssl_object.getpeercert(binary_form=True)
