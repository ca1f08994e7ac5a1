"""Tests for relayd.auth (bearer JWTs, real keys) and relayd.rbac (roles on nested scopes)."""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import re
import time
from pathlib import Path
from typing import Any

import jwt
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from hypothesis import given, settings
from hypothesis import strategies as st
from jwt.algorithms import ECAlgorithm, RSAAlgorithm
from structlog.testing import capture_logs

from relayd.auth import MAX_TOKEN_BYTES, Authenticator, Principal, issue_token, read_secret_file
from relayd.config import AuthConfig, RoleAssignment, VmConfig, parse_config
from relayd.errors import AuthError, ConfigError
from relayd.rbac import Rbac, at_least

ISSUER = "https://login.example.com/tenant"
AUDIENCE = "relayd"
SECRET = b"s3cret-for-tests-only-0123456789abcdef"


class Keys:
    """Real signing keys for one test module: an EC P-256 and an RSA 2048 pair, plus strangers."""

    def __init__(self) -> None:
        self.ec = ec.generate_private_key(ec.SECP256R1())
        self.rsa = rsa.generate_private_key(public_exponent=65537, key_size=2048)
        self.other_ec = ec.generate_private_key(ec.SECP256R1())

    def jwks(self) -> dict[str, Any]:
        ec_jwk = ECAlgorithm.to_jwk(self.ec.public_key(), as_dict=True)
        rsa_jwk = RSAAlgorithm.to_jwk(self.rsa.public_key(), as_dict=True)
        return {
            "keys": [
                {**ec_jwk, "kid": "ec-1", "alg": "ES256", "use": "sig"},
                {**rsa_jwk, "kid": "rsa-1", "alg": "RS256", "use": "sig"},
            ]
        }


@pytest.fixture(scope="module")
def keys() -> Keys:
    return Keys()


@pytest.fixture
def secret_file(tmp_path: Path) -> Path:
    path = tmp_path / "dev.key"
    path.write_bytes(SECRET + b"\n")  # trailing newline, as an editor leaves it
    return path


@pytest.fixture
def jwks_file(tmp_path: Path, keys: Keys) -> Path:
    path = tmp_path / "jwks.json"
    path.write_text(json.dumps(keys.jwks()), encoding="utf-8")
    return path


@pytest.fixture
def hs_auth(secret_file: Path) -> Authenticator:
    return Authenticator(
        AuthConfig(issuer=ISSUER, audience=AUDIENCE, hs256_secret_file=secret_file)
    )


@pytest.fixture(scope="module")
def any_auth(tmp_path_factory: pytest.TempPathFactory, keys: Keys) -> Authenticator:
    """Both key sources configured, shared across Hypothesis examples (module-scoped)."""
    directory = tmp_path_factory.mktemp("auth")
    (directory / "dev.key").write_bytes(SECRET)
    (directory / "jwks.json").write_text(json.dumps(keys.jwks()), encoding="utf-8")
    return Authenticator(
        AuthConfig(
            issuer=ISSUER,
            audience=AUDIENCE,
            hs256_secret_file=directory / "dev.key",
            jwks_file=directory / "jwks.json",
            allow_dev_tokens=True,
        )
    )


@pytest.fixture
def jwks_auth(jwks_file: Path) -> Authenticator:
    return Authenticator(AuthConfig(issuer=ISSUER, audience=AUDIENCE, jwks_file=jwks_file))


def claims(**overrides: Any) -> dict[str, Any]:
    now = int(time.time())
    base: dict[str, Any] = {
        "iss": ISSUER,
        "aud": AUDIENCE,
        "sub": "alice",
        "iat": now,
        "nbf": now,
        "exp": now + 600,
    }
    base.update(overrides)
    return {k: v for k, v in base.items() if v is not None}


def hs_token(**overrides: Any) -> str:
    return jwt.encode(claims(**overrides), SECRET, algorithm="HS256")


def es_token(keys: Keys, kid: str | None = "ec-1", **overrides: Any) -> str:
    headers = {"kid": kid} if kid is not None else None
    return jwt.encode(claims(**overrides), keys.ec, algorithm="ES256", headers=headers)


def rs_token(keys: Keys, kid: str = "rsa-1", **overrides: Any) -> str:
    return jwt.encode(claims(**overrides), keys.rsa, algorithm="RS256", headers={"kid": kid})


def b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def handmade(header: dict[str, Any], payload: dict[str, Any], key: bytes = b"") -> str:
    """A hand-built HMAC-SHA256 JWS (PyJWT refuses to make the malicious ones)."""
    signing_input = f"{b64(json.dumps(header).encode())}.{b64(json.dumps(payload).encode())}"
    signature = hmac.new(key, signing_input.encode(), hashlib.sha256).digest()
    return f"{signing_input}.{b64(signature)}"


def auth_code(authenticator: Authenticator, token: str) -> str:
    """The AuthError code `token` is refused with (fails the test if it is accepted)."""
    with pytest.raises(AuthError) as info:
        authenticator.verify(token)
    return info.value.code


# --- accepted tokens ----------------------------------------------------------------


def test_verify_hs256_issued_token_returns_principal(hs_auth: Authenticator) -> None:
    """A token from issue_token yields user:<sub>, group:<g> names and the amr claim."""
    token = issue_token(
        SECRET, issuer=ISSUER, audience=AUDIENCE, sub="alice", groups=["ops", "dba"], amr=["mfa"]
    )
    principal = hs_auth.verify(token)
    assert principal == Principal("user:alice", ("group:ops", "group:dba"), ("mfa",))
    assert principal.names == ("user:alice", "group:ops", "group:dba")


def test_verify_token_without_groups_has_no_groups(hs_auth: Authenticator) -> None:
    """A token without groups or amr claims gives empty tuples."""
    principal = hs_auth.verify(issue_token(SECRET, issuer=ISSUER, audience=AUDIENCE, sub="bob"))
    assert principal == Principal("user:bob")
    assert principal.names == ("user:bob",)


def test_verify_es256_jwks_token_returns_principal(jwks_auth: Authenticator, keys: Keys) -> None:
    """An ES256 token whose kid is in the JWKS is accepted."""
    principal = jwks_auth.verify(es_token(keys, groups=["ops"]))
    assert principal.id == "user:alice"
    assert principal.groups == ("group:ops",)


def test_verify_rs256_jwks_token_returns_principal(jwks_auth: Authenticator, keys: Keys) -> None:
    """An RS256 token whose kid is in the JWKS is accepted."""
    assert jwks_auth.verify(rs_token(keys, sub="carol")).id == "user:carol"


def test_verify_es256_without_kid_uses_key_of_that_algorithm(
    jwks_auth: Authenticator, keys: Keys
) -> None:
    """Without a kid the first JWKS key for the token's algorithm is used."""
    assert jwks_auth.verify(es_token(keys, kid=None)).id == "user:alice"


def test_verify_both_sources_configured_accepts_both_kinds(
    secret_file: Path, jwks_file: Path, keys: Keys
) -> None:
    """With a secret, a JWKS and allow_dev_tokens, HS256 and ES256 tokens are both accepted."""
    auth = Authenticator(
        AuthConfig(
            issuer=ISSUER,
            audience=AUDIENCE,
            hs256_secret_file=secret_file,
            jwks_file=jwks_file,
            allow_dev_tokens=True,
        )
    )
    assert auth.verify(hs_token()).id == "user:alice"
    assert auth.verify(es_token(keys)).id == "user:alice"


def test_verify_nbf_within_leeway_is_accepted(hs_auth: Authenticator) -> None:
    """A token valid a few seconds from now (clock skew) is accepted within the leeway."""
    soon = int(time.time()) + 20
    assert hs_auth.verify(hs_token(nbf=soon, iat=soon)).id == "user:alice"


def test_verify_expired_within_leeway_is_accepted(hs_auth: Authenticator) -> None:
    """A token expired a few seconds ago is accepted within the leeway."""
    assert hs_auth.verify(hs_token(exp=int(time.time()) - 20)).id == "user:alice"


@pytest.mark.parametrize("scheme", ["Bearer", "bearer", "BEARER"])
def test_authenticate_bearer_header_returns_principal(hs_auth: Authenticator, scheme: str) -> None:
    """The Bearer scheme is matched case-insensitively and surrounding spaces are ignored."""
    assert hs_auth.authenticate(f"{scheme}  {hs_token()} ").id == "user:alice"


def test_issue_token_sets_standard_claims() -> None:
    """issue_token sets iss, aud, sub, iat = nbf = now, exp = now + ttl and a jti."""
    token = issue_token(SECRET, issuer=ISSUER, audience=AUDIENCE, sub="x", ttl=90, now=1000.0)
    decoded = jwt.decode(token, options={"verify_signature": False})
    assert decoded["iss"] == ISSUER
    assert decoded["aud"] == AUDIENCE
    assert (decoded["iat"], decoded["nbf"], decoded["exp"]) == (1000, 1000, 1090)
    assert len(decoded["jti"]) == 16
    assert "groups" not in decoded
    assert jwt.get_unverified_header(token)["alg"] == "HS256"


# --- refused tokens, each with its code ------------------------------------------------


def test_verify_expired_token_raises_token_expired(hs_auth: Authenticator) -> None:
    """A token expired beyond the leeway is refused as token_expired."""
    token = issue_token(
        SECRET, issuer=ISSUER, audience=AUDIENCE, sub="a", ttl=3600, now=time.time() - 7200
    )
    assert auth_code(hs_auth, token) == "token_expired"


def test_verify_expired_es256_raises_token_expired(jwks_auth: Authenticator, keys: Keys) -> None:
    """Expiry is checked for JWKS tokens too."""
    assert auth_code(jwks_auth, es_token(keys, exp=int(time.time()) - 3600)) == "token_expired"


def test_verify_nbf_in_future_raises_token_not_yet_valid(hs_auth: Authenticator) -> None:
    """A token whose nbf is beyond the leeway is refused as token_not_yet_valid."""
    later = int(time.time()) + 3600
    assert auth_code(hs_auth, hs_token(nbf=later, iat=None, exp=later + 600)) == (
        "token_not_yet_valid"
    )


def test_verify_issued_by_future_clock_raises_token_not_yet_valid(hs_auth: Authenticator) -> None:
    """A token issued an hour from now (iat and nbf) is not yet valid."""
    token = issue_token(SECRET, issuer=ISSUER, audience=AUDIENCE, sub="a", now=time.time() + 3600)
    assert auth_code(hs_auth, token) == "token_not_yet_valid"


def test_verify_wrong_audience_raises_invalid_audience(
    hs_auth: Authenticator, jwks_auth: Authenticator, keys: Keys
) -> None:
    """A token for another service is refused as invalid_audience."""
    assert auth_code(hs_auth, hs_token(aud="other-service")) == "invalid_audience"
    assert auth_code(jwks_auth, rs_token(keys, aud=["other", "more"])) == "invalid_audience"


def test_verify_wrong_issuer_raises_invalid_issuer(
    hs_auth: Authenticator, jwks_auth: Authenticator, keys: Keys
) -> None:
    """A token from another issuer is refused as invalid_issuer."""
    assert auth_code(hs_auth, hs_token(iss="https://evil.example")) == "invalid_issuer"
    assert auth_code(jwks_auth, es_token(keys, iss="https://evil.example")) == "invalid_issuer"


def test_verify_hs256_other_secret_raises_invalid_signature(hs_auth: Authenticator) -> None:
    """An HS256 token signed with another secret is refused as invalid_signature."""
    token = jwt.encode(claims(), b"another-secret-that-is-32-bytes-long!", algorithm="HS256")
    assert auth_code(hs_auth, token) == "invalid_signature"


def test_verify_es256_signed_by_stranger_raises_invalid_signature(
    jwks_auth: Authenticator, keys: Keys
) -> None:
    """An ES256 token claiming a known kid but signed by another key is refused."""
    token = jwt.encode(claims(), keys.other_ec, algorithm="ES256", headers={"kid": "ec-1"})
    assert auth_code(jwks_auth, token) == "invalid_signature"


def test_verify_tampered_payload_raises_invalid_signature(
    jwks_auth: Authenticator, keys: Keys
) -> None:
    """Changing the payload of a signed token invalidates it."""
    header, _, signature = rs_token(keys).split(".")
    forged = b64(json.dumps(claims(sub="root")).encode())
    assert auth_code(jwks_auth, f"{header}.{forged}.{signature}") == "invalid_signature"


@pytest.mark.parametrize("authenticator", ["hs_auth", "jwks_auth"])
def test_verify_alg_none_raises_bad_algorithm(
    request: pytest.FixtureRequest, authenticator: str
) -> None:
    """An unsigned token (alg=none) is never accepted."""
    auth: Authenticator = request.getfixturevalue(authenticator)
    token = jwt.encode(claims(), "", algorithm="none")
    assert token.endswith(".")
    assert auth_code(auth, token) == "bad_algorithm"


def test_verify_hs256_signed_with_rsa_public_key_raises_bad_algorithm(
    jwks_auth: Authenticator, keys: Keys
) -> None:
    """Algorithm confusion: HS256 keyed with the RSA public PEM is refused when only JWKS is set."""
    pem = keys.rsa.public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    token = handmade({"alg": "HS256", "typ": "JWT", "kid": "rsa-1"}, claims(), key=pem)
    assert auth_code(jwks_auth, token) == "bad_algorithm"


def test_verify_hs256_when_only_jwks_raises_bad_algorithm(jwks_auth: Authenticator) -> None:
    """HS256 is only accepted when a shared secret is configured."""
    assert auth_code(jwks_auth, hs_token()) == "bad_algorithm"


def test_verify_es256_when_only_secret_raises_bad_algorithm(
    hs_auth: Authenticator, keys: Keys
) -> None:
    """Asymmetric algorithms are only accepted when a JWKS is configured."""
    assert auth_code(hs_auth, es_token(keys)) == "bad_algorithm"


@pytest.mark.parametrize("alg", ["HS384", "HS512", "none", "None", "XX999", ""])
def test_verify_unlisted_algorithm_raises_bad_algorithm(
    jwks_auth: Authenticator, hs_auth: Authenticator, alg: str
) -> None:
    """Algorithms outside the accepted set are refused before any key lookup."""
    token = handmade({"alg": alg, "typ": "JWT"}, claims(), key=SECRET)
    assert auth_code(hs_auth, token) == "bad_algorithm"
    assert auth_code(jwks_auth, token) == "bad_algorithm"


def test_verify_unknown_kid_raises_unknown_key(jwks_auth: Authenticator, keys: Keys) -> None:
    """A kid that is not in the JWKS is refused as unknown_key."""
    assert auth_code(jwks_auth, es_token(keys, kid="rotated-away")) == "unknown_key"


def test_verify_kid_of_other_algorithm_raises_unknown_key(
    jwks_auth: Authenticator, keys: Keys
) -> None:
    """An ES256 token naming the RSA key's kid finds no matching key."""
    assert auth_code(jwks_auth, es_token(keys, kid="rsa-1")) == "unknown_key"


@pytest.mark.parametrize(
    "token",
    [
        "",
        "garbage",
        "a.b",
        "a.b.c",
        "...",
        "eyJhbGciOiJIUzI1NiJ9",
        "!!!.!!!.!!!",
        b64(b"[1,2]") + ".e30.sig",
        b64(b"not json") + ".e30.sig",
    ],
)
def test_verify_garbage_raises_malformed_token(hs_auth: Authenticator, token: str) -> None:
    """Strings that are not a JWT are refused as malformed_token."""
    assert auth_code(hs_auth, token) == "malformed_token"


def test_verify_oversized_token_raises_malformed_token(hs_auth: Authenticator) -> None:
    """A token over MAX_TOKEN_BYTES is refused before parsing."""
    token = hs_token(pad="x" * MAX_TOKEN_BYTES)
    assert len(token) > MAX_TOKEN_BYTES
    assert auth_code(hs_auth, token) == "malformed_token"


@pytest.mark.parametrize("missing", ["exp", "sub", "iss", "aud"])
def test_verify_missing_required_claim_raises_malformed_token(
    hs_auth: Authenticator, missing: str
) -> None:
    """exp, sub, iss and aud are required."""
    token = hs_token(**{missing: None})
    with pytest.raises(AuthError, match=missing) as info:
        hs_auth.verify(token)
    assert info.value.code == "malformed_token"


@pytest.mark.parametrize(
    "overrides",
    [
        {"groups": "ops"},
        {"groups": ["ops", 1]},
        {"amr": "mfa"},
        {"amr": [None]},
    ],
)
def test_verify_bad_groups_or_amr_raises_malformed_token(
    hs_auth: Authenticator, overrides: dict[str, Any]
) -> None:
    """groups and amr must be lists of strings."""
    assert auth_code(hs_auth, hs_token(**overrides)) == "malformed_token"


@pytest.mark.parametrize(("sub", "code"), [("", "malformed_token"), (42, "invalid_token")])
def test_verify_bad_sub_raises_auth_error(hs_auth: Authenticator, sub: object, code: str) -> None:
    """An empty sub is malformed; a non-string sub is rejected by PyJWT as invalid."""
    assert auth_code(hs_auth, hs_token(sub=sub)) == code


def test_verify_non_integer_exp_raises_invalid_token(hs_auth: Authenticator) -> None:
    """A malformed exp claim is an invalid token."""
    assert auth_code(hs_auth, hs_token(exp="tomorrow")) == "invalid_token"


@pytest.mark.parametrize(
    ("header", "code"),
    [
        (None, "missing_token"),
        ("", "missing_token"),
        ("Basic dXNlcjpwYXNz", "malformed_token"),
        ("Bearer", "malformed_token"),
        ("Bearer    ", "malformed_token"),
        ("Token abc", "malformed_token"),
    ],
)
def test_authenticate_missing_or_non_bearer_raises_auth_error(
    hs_auth: Authenticator, header: str | None, code: str
) -> None:
    """A missing header, another scheme or an empty bearer is refused with its code."""
    with pytest.raises(AuthError) as info:
        hs_auth.authenticate(header)
    assert info.value.code == code
    assert info.value.http_status == 401


def test_authenticate_raw_token_without_scheme_raises_malformed_token(
    hs_auth: Authenticator,
) -> None:
    """A bare token, without 'Bearer ', is refused."""
    with pytest.raises(AuthError) as info:
        hs_auth.authenticate(hs_token())
    assert info.value.code == "malformed_token"


def test_auth_error_message_never_contains_token(hs_auth: Authenticator) -> None:
    """The token is never echoed back in the error message."""
    token = hs_token(aud="other")
    with pytest.raises(AuthError) as info:
        hs_auth.authenticate(f"Bearer {token}")
    assert token not in str(info.value)
    assert token.split(".")[1] not in str(info.value)


@pytest.mark.parametrize(
    "header",
    [
        {"alg": "HS256", "kid": 1},
        {"alg": "HS256", "crit": "b64"},
        {"alg": "HS256", "crit": ["unknown-ext"]},
    ],
)
def test_verify_invalid_kid_or_crit_header_raises_auth_error(
    hs_auth: Authenticator, header: dict[str, Any]
) -> None:
    """A header with a non-string kid or a bad crit is an AuthError, not a PyJWT exception."""
    with pytest.raises(AuthError):
        hs_auth.verify(handmade(header, claims(), key=SECRET))


@given(text=st.text(max_size=200))
@settings(max_examples=200)
def test_authenticate_random_string_raises_only_auth_error(
    any_auth: Authenticator, text: str
) -> None:
    """Any header value is refused with AuthError and nothing else."""
    for value in (text, f"Bearer {text}"):
        with pytest.raises(AuthError):
            any_auth.authenticate(value)


jwt_charset = st.sampled_from("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_.=")
header_values = st.none() | st.booleans() | st.integers() | st.text(max_size=8)


@given(
    parts=st.lists(st.text(jwt_charset, max_size=40), min_size=1, max_size=4),
    header=st.dictionaries(st.sampled_from(["alg", "typ", "cty", "x"]), header_values),
    alg=st.sampled_from(["HS256", "ES256", "RS256", "none", "EdDSA"]),
)
@settings(max_examples=150)
def test_verify_jwt_shaped_string_raises_only_auth_error(
    any_auth: Authenticator, parts: list[str], header: dict[str, Any], alg: str
) -> None:
    """Dot-separated base64url-ish strings, with or without a JSON header, fail as AuthError."""
    with pytest.raises(AuthError):
        any_auth.verify(".".join(parts))
    token = ".".join([b64(json.dumps({**header, "alg": alg}).encode()), *parts])
    with pytest.raises(AuthError):
        any_auth.verify(token)


# --- key sources ----------------------------------------------------------------------


def test_authenticator_short_secret_raises_config_error(tmp_path: Path) -> None:
    """A secret under 32 bytes (after stripping whitespace) is refused at start."""
    path = tmp_path / "short.key"
    path.write_bytes(b"x" * 31 + b"\n\n")
    with pytest.raises(ConfigError, match="at least 32 bytes") as info:
        Authenticator(AuthConfig(issuer=ISSUER, audience=AUDIENCE, hs256_secret_file=path))
    assert info.value.key == "auth.hs256_secret_file"


def test_authenticator_missing_secret_file_raises_config_error(tmp_path: Path) -> None:
    """An unreadable secret file names the file and key."""
    path = tmp_path / "absent.key"
    with pytest.raises(ConfigError, match="cannot read") as info:
        Authenticator(AuthConfig(issuer=ISSUER, audience=AUDIENCE, hs256_secret_file=path))
    assert info.value.path == str(path)


@pytest.mark.parametrize("content", ["not json", "{}", '{"keys": []}', '{"keys": [{"kty": "XX"}]}'])
def test_authenticator_bad_jwks_raises_config_error(tmp_path: Path, content: str) -> None:
    """A JWKS file that is not a usable key set is refused at start."""
    path = tmp_path / "jwks.json"
    path.write_text(content, encoding="utf-8")
    with pytest.raises(ConfigError) as info:
        Authenticator(AuthConfig(issuer=ISSUER, audience=AUDIENCE, jwks_file=path))
    assert info.value.key == "auth.jwks_file"


def test_authenticator_missing_jwks_file_raises_config_error(tmp_path: Path) -> None:
    """An unreadable JWKS file names the file and key."""
    with pytest.raises(ConfigError, match="cannot read") as info:
        Authenticator(
            AuthConfig(issuer=ISSUER, audience=AUDIENCE, jwks_file=tmp_path / "absent.json")
        )
    assert info.value.key == "auth.jwks_file"


def test_read_secret_file_strips_whitespace(secret_file: Path) -> None:
    """The secret is read as the authenticator reads it, without the trailing newline."""
    assert read_secret_file(secret_file) == SECRET


# --- RBAC -------------------------------------------------------------------------------

RG = "/subscriptions/sub-1/resourceGroups/rg-web"
SS = f"{RG}/virtualMachineScaleSets/ss-web"


def rbac_config(*assignments: tuple[str, str, str]) -> tuple[Rbac, dict[str, VmConfig]]:
    """Three VMs in the Azure hierarchy, with the given (principal, role, scope) assignments."""
    raw: dict[str, Any] = {
        "tls": {"cert": "c", "key": "k"},
        "auth": {"issuer": ISSUER, "audience": AUDIENCE, "hs256_secret_file": "dev.key"},
        "subscriptions": [{"id": "sub-1"}, {"id": "sub-2"}],
        "vms": [
            {
                "id": "vm-ss",
                "subscription": "sub-1",
                "resource_group": "rg-web",
                "scale_set": "ss-web",
                "serial": "tcp://127.0.0.1:7001",
            },
            {
                "id": "vm-rg",
                "subscription": "sub-1",
                "resource_group": "rg-web",
                "serial": "tcp://127.0.0.1:7002",
            },
            {"id": "vm-plain", "subscription": "sub-1", "serial": "/dev/ttyS0"},
            {"id": "vm-other", "subscription": "sub-2", "serial": "unix:///run/vm.sock"},
        ],
        "role_assignments": [{"principal": p, "role": r, "scope": s} for p, r, s in assignments],
    }
    cfg = parse_config(raw, Path("/etc/relayd/relayd.toml"))
    return Rbac(cfg.role_assignments), {vm.id: vm for vm in cfg.vms}


ALICE = Principal("user:alice")
ALL_VMS = ("vm-ss", "vm-rg", "vm-plain", "vm-other")


def roles_of(principal: Principal, rbac: Rbac, vms: dict[str, VmConfig]) -> dict[str, str | None]:
    return {vm_id: rbac.role(principal, vms[vm_id]) for vm_id in ALL_VMS}


@pytest.mark.parametrize(
    ("scope", "covered"),
    [
        ("/subscriptions/sub-1", {"vm-ss", "vm-rg", "vm-plain"}),
        ("/subscriptions/sub-2", {"vm-other"}),
        (RG, {"vm-ss", "vm-rg"}),
        (SS, {"vm-ss"}),
        (f"{SS}/virtualMachines/vm-ss", {"vm-ss"}),
        (f"{RG}/providers/Microsoft.Compute/virtualMachines/vm-rg", {"vm-rg"}),
        ("/subscriptions/sub-1/vms/vm-plain", {"vm-plain"}),
        ("/subscriptions/sub-1/vms/vm-ss", {"vm-ss"}),
    ],
)
def test_rbac_role_on_scope_covers_exactly_contained_vms(scope: str, covered: set[str]) -> None:
    """A role on a subscription, resource group, scale set or VM covers only the VMs inside."""
    rbac, vms = rbac_config(("user:alice", "reader", scope))
    roles = roles_of(ALICE, rbac, vms)
    assert {vm for vm, role in roles.items() if role == "reader"} == covered
    assert all(role is None for vm, role in roles.items() if vm not in covered)


def test_rbac_highest_role_wins_across_scopes() -> None:
    """With roles on several enclosing scopes, the highest one is effective."""
    rbac, vms = rbac_config(
        ("user:alice", "reader", "/subscriptions/sub-1"),
        ("user:alice", "owner", "/subscriptions/sub-1/vms/vm-plain"),
        ("user:alice", "contributor", RG),
        ("user:alice", "reader", SS),
    )
    assert roles_of(ALICE, rbac, vms) == {
        "vm-ss": "contributor",
        "vm-rg": "contributor",
        "vm-plain": "owner",
        "vm-other": None,
    }


def test_rbac_lower_role_later_does_not_downgrade() -> None:
    """Assignment order does not matter: a later, lower role leaves the higher one."""
    rbac, vms = rbac_config(
        ("user:alice", "owner", "/subscriptions/sub-1"),
        ("user:alice", "reader", "/subscriptions/sub-1/vms/vm-plain"),
    )
    assert rbac.role(ALICE, vms["vm-plain"]) == "owner"


def test_rbac_group_assignment_applies_to_members() -> None:
    """A role assigned to group:<g> applies to principals carrying that group."""
    rbac, vms = rbac_config(
        ("group:ops", "contributor", RG),
        ("user:alice", "reader", "/subscriptions/sub-1"),
    )
    member = Principal("user:alice", ("group:dev", "group:ops"))
    assert rbac.role(member, vms["vm-ss"]) == "contributor"
    assert rbac.role(member, vms["vm-plain"]) == "reader"
    assert rbac.role(Principal("user:bob", ("group:ops",)), vms["vm-rg"]) == "contributor"
    assert rbac.role(Principal("user:bob", ("group:dev",)), vms["vm-rg"]) is None


def test_rbac_no_assignment_returns_none() -> None:
    """A principal without any assignment has no role anywhere."""
    rbac, vms = rbac_config(("user:alice", "owner", "/subscriptions/sub-1"))
    assert set(roles_of(Principal("user:mallory"), rbac, vms).values()) == {None}
    assert set(roles_of(ALICE, Rbac([]), vms).values()) == {None}


def test_rbac_user_and_group_names_do_not_collide() -> None:
    """user:ops and group:ops are different principals."""
    rbac, vms = rbac_config(("group:ops", "owner", "/subscriptions/sub-1"))
    assert rbac.role(Principal("user:ops"), vms["vm-plain"]) is None


def test_rbac_scope_with_trailing_slash_is_normalised() -> None:
    """A scope written with a trailing slash still matches."""
    rbac, vms = rbac_config()
    ra = RoleAssignment(principal="user:alice", role="reader", scope="/subscriptions/sub-1/")
    assert Rbac([ra]).role(ALICE, vms["vm-plain"]) == "reader"
    assert rbac.role(ALICE, vms["vm-plain"]) is None


def test_rbac_prefix_of_other_vm_id_does_not_match() -> None:
    """A VM scope is matched whole, not as a string prefix of another VM's scope."""
    _, vms = rbac_config()
    ra = RoleAssignment(principal="user:alice", role="owner", scope="/subscriptions/sub-1/vms/vm")
    assert Rbac([ra]).role(ALICE, vms["vm-plain"]) is None
    ra = RoleAssignment(principal="user:alice", role="owner", scope="/subscriptions/sub")
    assert Rbac([ra]).role(ALICE, vms["vm-plain"]) is None


@pytest.mark.parametrize(
    ("role", "needed", "expected"),
    [
        ("reader", "reader", True),
        ("reader", "contributor", False),
        ("contributor", "reader", True),
        ("contributor", "owner", False),
        ("owner", "contributor", True),
        ("owner", "owner", True),
        (None, "reader", False),
    ],
)
def test_at_least_orders_reader_contributor_owner(role: Any, needed: Any, expected: bool) -> None:
    """reader < contributor < owner, and no role grants nothing."""
    assert at_least(role, needed) is expected


def test_verify_exp_too_large_for_a_float_is_malformed_not_a_crash(
    hs_auth: Authenticator,
) -> None:
    with pytest.raises(AuthError) as info:
        hs_auth.verify(hs_token(exp=10**400))
    assert info.value.code == "malformed_token"


def test_authenticate_refuses_non_ascii_around_the_token(hs_auth: Authenticator) -> None:
    """str.strip() would drop a trailing NBSP and accept the token; HTTP whitespace is not it."""
    with pytest.raises(AuthError) as info:
        hs_auth.authenticate(f"Bearer {hs_token()}\xa0")
    assert info.value.code == "malformed_token"
    assert hs_auth.authenticate(f"Bearer {hs_token()} ").id == "user:alice"


# --- development tokens, leeway and the PyJWT floor (issue 15, item 9) -------------------


def test_auth_config_secret_beside_jwks_without_opt_in_is_refused(
    secret_file: Path, jwks_file: Path
) -> None:
    """Built directly too, an AuthConfig with both key sources needs allow_dev_tokens."""
    with pytest.raises(ValueError, match="allow_dev_tokens"):
        AuthConfig(
            issuer=ISSUER, audience=AUDIENCE, hs256_secret_file=secret_file, jwks_file=jwks_file
        )


def test_authenticator_with_dev_tokens_allowed_logs_a_warning(
    secret_file: Path, jwks_file: Path
) -> None:
    """Starting (or reloading) with allow_dev_tokens logs `dev_tokens_allowed` at warning."""
    cfg = AuthConfig(
        issuer=ISSUER,
        audience=AUDIENCE,
        hs256_secret_file=secret_file,
        jwks_file=jwks_file,
        allow_dev_tokens=True,
    )
    with capture_logs() as events:
        Authenticator(cfg)
    warned = [e for e in events if e["event"] == "dev_tokens_allowed"]
    assert len(warned) == 1
    assert warned[0]["log_level"] == "warning"
    assert warned[0]["hs256_secret_file"] == str(secret_file)


def test_authenticator_without_dev_tokens_logs_no_warning(hs_auth: Authenticator) -> None:
    """A secret alone (the demo) or a JWKS alone starts without the warning."""
    with capture_logs() as events:
        Authenticator(hs_auth._cfg)
    assert not [e for e in events if e["event"] == "dev_tokens_allowed"]


def test_verify_issuer_that_is_a_substring_of_ours_raises_invalid_issuer(
    hs_auth: Authenticator,
) -> None:
    """`iss` must equal the configured issuer: a prefix of it is another issuer (PyJWT 2.10.0)."""
    assert auth_code(hs_auth, hs_token(iss=ISSUER[:20])) == "invalid_issuer"
    assert auth_code(hs_auth, hs_token(iss="login")) == "invalid_issuer"


def test_setup_cfg_requires_pyjwt_2_10_1_or_later() -> None:
    """PyJWT 2.10.0 matched `iss` by substring; the dependency floor excludes it."""
    setup_cfg = Path(__file__).resolve().parent.parent / "setup.cfg"
    match = re.search(r"^\s*PyJWT(?:\[[^\]]*\])?\s*>=\s*([\d.]+)", setup_cfg.read_text(), re.M)
    assert match is not None, "setup.cfg does not require PyJWT with a floor"
    floor = tuple(int(part) for part in match.group(1).split("."))
    assert floor >= (2, 10, 1), f"PyJWT floor {match.group(1)} admits 2.10.0"
