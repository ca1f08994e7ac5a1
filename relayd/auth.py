"""Who is calling: principals from bearer JWTs.

HS256 with a shared secret is for development (`relayd token issue`);
production identity providers sign with ES256/RS256 keys published in a JWKS
file. The accepted algorithms follow from which key sources are configured,
so an HS256 token can never be checked against a public key (algorithm
confusion) and `alg=none` is never accepted. Errors carry a specific code
for the JSON body; the token itself never appears in a message or a log.
"""

from __future__ import annotations

import hashlib
import secrets
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import jwt

from .config import AuthConfig
from .errors import AuthError, ConfigError
from .log import get_logger
from .principal import Principal as Principal  # re-exported: callers import it from here

log = get_logger("relayd.auth")

_ASYMMETRIC = ("ES256", "ES384", "RS256", "RS384", "RS512", "PS256", "EdDSA")
MAX_TOKEN_BYTES = 8192
CACHE_SIZE = 4096


def _read_secret(path: Path) -> bytes:
    try:
        secret = path.read_bytes().strip()
    except OSError as exc:
        raise ConfigError(
            str(path), "auth.hs256_secret_file", f"cannot read: {exc.strerror}"
        ) from None
    if len(secret) < 32:
        raise ConfigError(str(path), "auth.hs256_secret_file", "secret must be at least 32 bytes")
    return secret


def _read_jwks(path: Path) -> jwt.PyJWKSet:
    try:
        return jwt.PyJWKSet.from_json(path.read_text(encoding="utf-8"))
    except OSError as exc:
        raise ConfigError(str(path), "auth.jwks_file", f"cannot read: {exc.strerror}") from None
    except (jwt.PyJWKSetError, ValueError) as exc:
        raise ConfigError(str(path), "auth.jwks_file", f"not a usable JWKS: {exc}") from None


class Authenticator:
    """Verifies bearer tokens against the configured issuer, audience and keys."""

    def __init__(self, cfg: AuthConfig) -> None:
        self._cfg = cfg
        self._secret = _read_secret(cfg.hs256_secret_file) if cfg.hs256_secret_file else None
        self._jwks = _read_jwks(cfg.jwks_file) if cfg.jwks_file else None
        self._cache: dict[bytes, tuple[Principal, float]] = {}
        if cfg.allow_dev_tokens:
            # At every start and reload: an opt-in made for a test must not go unnoticed.
            log.warning(
                "dev_tokens_allowed",
                hs256_secret_file=str(cfg.hs256_secret_file),
                jwks_file=str(cfg.jwks_file),
                message="anyone holding the HS256 development secret can mint tokens",
            )

    def authenticate(self, authorization: str | None) -> Principal:
        """The principal named by an `Authorization: Bearer` header value.

        Raises:
            AuthError: missing, malformed, expired, wrongly signed or addressed token.
        """
        if not authorization:
            raise AuthError("a bearer token is required", code="missing_token")
        scheme, _, token = authorization.partition(" ")
        token = token.strip(" \t")  # HTTP whitespace only: "\xa0" is no separator
        if scheme.lower() != "bearer" or not token or not token.isascii():
            raise AuthError("authorization must be 'Bearer <token>'", code="malformed_token")
        return self.verify(token)

    def verify(self, token: str) -> Principal:
        """Check a JWT and turn its claims into a principal.

        A token verified before is answered from a small cache (keyed by its
        hash, valid until the token's own expiry), because clients reconnect
        with the same token and signature checks dominate session set-up.

        Raises:
            AuthError: with a specific code.
        """
        if len(token) > MAX_TOKEN_BYTES:
            raise AuthError(f"token exceeds {MAX_TOKEN_BYTES} bytes", code="malformed_token")
        key = hashlib.sha256(token.encode("utf-8", "surrogatepass")).digest()
        cached = self._cache.get(key)
        if cached is not None:
            principal, expires = cached
            if time.time() < expires + self._cfg.leeway:
                return principal
            del self._cache[key]
        principal, expires = self._verify(token)
        if len(self._cache) >= CACHE_SIZE:
            del self._cache[next(iter(self._cache))]  # oldest first
        self._cache[key] = (principal, expires)
        return principal

    def _verify(self, token: str) -> tuple[Principal, float]:
        try:
            header = jwt.get_unverified_header(token)
        except jwt.InvalidTokenError:
            raise AuthError("token is not a JWT", code="malformed_token") from None
        alg = header.get("alg")
        key: Any
        if alg == "HS256" and self._secret is not None:
            key = self._secret
        elif alg in _ASYMMETRIC and self._jwks is not None:
            key = self._jwk_for(header.get("kid"), str(alg))
        else:
            raise AuthError(f"algorithm {str(alg)[:16]!r} is not accepted", code="bad_algorithm")
        try:
            claims = jwt.decode(
                token,
                key,
                algorithms=[str(alg)],
                audience=self._cfg.audience,
                issuer=self._cfg.issuer,
                leeway=self._cfg.leeway,
                options={"require": ["exp", "sub", "iss", "aud"]},
            )
        except jwt.ExpiredSignatureError:
            raise AuthError("token has expired", code="token_expired") from None
        except jwt.ImmatureSignatureError:
            raise AuthError("token is not valid yet", code="token_not_yet_valid") from None
        except jwt.InvalidAudienceError:
            raise AuthError("token is for another audience", code="invalid_audience") from None
        except jwt.InvalidIssuerError:
            raise AuthError("token is from another issuer", code="invalid_issuer") from None
        except jwt.InvalidSignatureError:
            raise AuthError("token signature is invalid", code="invalid_signature") from None
        except jwt.MissingRequiredClaimError as exc:
            raise AuthError(f"token lacks the {exc.claim} claim", code="malformed_token") from None
        except jwt.InvalidTokenError:
            raise AuthError("token is invalid", code="invalid_token") from None
        if claims.get("iss") != self._cfg.issuer:
            # PyJWT checks this too, but 2.10.0 matched a substring of the issuer: never again.
            raise AuthError("token is from another issuer", code="invalid_issuer")
        try:
            expires = float(claims["exp"])
        except (TypeError, ValueError, OverflowError):  # PyJWT accepted it; a float cannot hold it
            raise AuthError("token has an unusable exp claim", code="malformed_token") from None
        return _principal(claims, expires + self._cfg.leeway), expires

    def _jwk_for(self, kid: object, alg: str) -> Any:
        assert self._jwks is not None
        for jwk in self._jwks.keys:
            if (kid is None or jwk.key_id == kid) and jwk.algorithm_name in (alg, None):
                return jwk.key
        raise AuthError("no key in the JWKS matches the token's kid", code="unknown_key")


def _principal(claims: dict[str, Any], expires: float) -> Principal:
    sub = claims.get("sub")
    if not isinstance(sub, str) or not sub:
        raise AuthError("token sub claim must be a non-empty string", code="malformed_token")
    groups = claims.get("groups", [])
    amr = claims.get("amr", [])
    if not isinstance(groups, list) or not all(isinstance(g, str) for g in groups):
        raise AuthError("token groups claim must be a list of strings", code="malformed_token")
    if not isinstance(amr, list) or not all(isinstance(a, str) for a in amr):
        raise AuthError("token amr claim must be a list of strings", code="malformed_token")
    return Principal(f"user:{sub}", tuple(f"group:{g}" for g in groups), tuple(amr), expires)


def issue_token(
    secret: bytes,
    *,
    issuer: str,
    audience: str,
    sub: str,
    groups: Sequence[str] = (),
    amr: Sequence[str] = (),
    ttl: float = 3600.0,
    now: float | None = None,
) -> str:
    """Mint a development HS256 token (the `relayd token issue` command)."""
    issued = int(time.time() if now is None else now)
    claims: dict[str, Any] = {
        "iss": issuer,
        "aud": audience,
        "sub": sub,
        "iat": issued,
        "nbf": issued,
        "exp": issued + int(ttl),
        "jti": secrets.token_hex(8),
    }
    if groups:
        claims["groups"] = list(groups)
    if amr:
        claims["amr"] = list(amr)
    return jwt.encode(claims, secret, algorithm="HS256")


def read_secret_file(path: Path) -> bytes:
    """The HS256 secret as the authenticator reads it."""
    return _read_secret(path)


__all__ = ["Authenticator", "Principal", "issue_token", "read_secret_file"]
