"""Tests for the `[cluster]` config section: defaults, accepted URLs, and errors naming the key."""

from __future__ import annotations

import platform
from pathlib import Path

import pytest

from relayd.config import Address, load_config, redact_url
from relayd.errors import ConfigError

BASE = """\
[tls]
cert = "server.crt"
key = "server.key"

[auth]
issuer = "https://issuer.example"
audience = "relayd"
hs256_secret_file = "dev.key"
"""

CLUSTER = """\
[cluster]
redis = "redis://127.0.0.1:6379/0"
gateway_id = "gw-1"
advertise = "10.0.0.5:8443"
peer_ca = "peer-ca.pem"
"""


def write(tmp_path: Path, cluster: str) -> Path:
    """A config file with this [cluster] text, beside an existing peer CA file (and the
    files the Redis access keys name: a CA, a client certificate and key, a password)."""
    for name in ("peer-ca.pem", "redis-ca.pem", "redis.crt", "redis.key"):
        (tmp_path / name).write_text("not parsed here\n")
    (tmp_path / "redis-password").write_text("s3cret\n")
    (tmp_path / "empty").write_text("\n")
    path = tmp_path / "relayd.toml"
    path.write_text(BASE + "\n" + cluster, encoding="utf-8")
    return path


def edited(old: str, new: str) -> str:
    """CLUSTER with one exact fragment replaced (asserted present, so cases cannot rot)."""
    assert old in CLUSTER, old
    return CLUSTER.replace(old, new, 1)


def test_cluster_absent_config_cluster_is_none(tmp_path: Path) -> None:
    """Without a [cluster] section the gateway runs alone: Config.cluster is None."""
    assert load_config(write(tmp_path, "")).cluster is None


def test_cluster_full_section_values_are_parsed(tmp_path: Path) -> None:
    """Every key comes out typed; peer_ca resolves against the config file's directory."""
    cfg = load_config(write(tmp_path, CLUSTER + 'lease_ttl = "5s"\n'))
    cluster = cfg.cluster
    assert cluster is not None
    assert cluster.redis == "redis://127.0.0.1:6379/0"
    assert cluster.gateway_id == "gw-1"
    assert cluster.advertise == Address("10.0.0.5", 8443)
    assert cluster.peer_ca == (tmp_path / "peer-ca.pem").resolve()
    assert cluster.lease_ttl == 5.0


def test_cluster_defaults_gateway_id_is_host_name_and_ttl_3s(tmp_path: Path) -> None:
    """gateway_id defaults to the host name and lease_ttl to 3 seconds."""
    cfg = load_config(write(tmp_path, edited('gateway_id = "gw-1"\n', "")))
    assert cfg.cluster is not None
    assert cfg.cluster.gateway_id == platform.node()
    assert cfg.cluster.lease_ttl == 3.0


@pytest.mark.parametrize(
    "url",
    [
        "redis://127.0.0.1:6379/0",
        "redis://redis.internal",
        "rediss://user:pw@redis.example:6380/3",
        "redis://[::1]:6379/1",
        "unix:///run/redis/redis.sock",
        "unix:///run/redis/redis.sock?db=2",
        "unix://relayd:pw@/run/redis/redis.sock?db=2",  # an ACL user over the socket
    ],
)
def test_cluster_redis_url_valid_is_accepted(tmp_path: Path, url: str) -> None:
    """redis://, rediss:// and unix:// URLs, with or without a database, are accepted."""
    cfg = load_config(write(tmp_path, edited('"redis://127.0.0.1:6379/0"', f'"{url}"')))
    assert cfg.cluster is not None
    assert cfg.cluster.redis == url


def test_cluster_redis_url_with_password_is_redacted_for_display(tmp_path: Path) -> None:
    """The password never shows: not in redis_display, not in the model's repr."""
    url = "rediss://relayd:s3cret-pw@redis.example:6380/0"
    cfg = load_config(write(tmp_path, edited('"redis://127.0.0.1:6379/0"', f'"{url}"')))
    assert cfg.cluster is not None
    assert cfg.cluster.redis_display == "rediss://relayd:***@redis.example:6380/0"
    assert "s3cret" not in repr(cfg.cluster)
    assert redact_url("redis://h:1/0") == "redis://h:1/0"
    assert redact_url("unix://relayd:pw@/run/r.sock?db=0") == "unix://relayd:***@/run/r.sock?db=0"


BAD_CASES: list[tuple[str, str, str, str, str]] = [
    # (case id, old fragment, new fragment, expected key, expected words in the message)
    ("no redis", 'redis = "redis://127.0.0.1:6379/0"\n', "", "cluster.redis", "required"),
    ("http url", "redis://127.0.0.1", "http://127.0.0.1", "cluster.redis", "redis://"),
    ("no host", '"redis://127.0.0.1:6379/0"', '"redis:///0"', "cluster.redis", "needs a host"),
    ("bad port", ":6379/0", ":99999/0", "cluster.redis", "port"),
    ("port 0", ":6379/0", ":0/0", "cluster.redis", "port 0"),
    ("bad db", ":6379/0", ":6379/zero", "cluster.redis", "database"),
    ("unknown param", ":6379/0", ":6379/0?timeout=1", "cluster.redis", "'timeout'"),
    (
        "relative unix",
        '"redis://127.0.0.1:6379/0"',
        '"unix://redis.sock"',
        "cluster.redis",
        "absolute",
    ),
    (
        "unix with a host",
        '"redis://127.0.0.1:6379/0"',
        '"unix://redis.internal/run/redis.sock"',
        "cluster.redis",
        "absolute",
    ),
    ("not a string", '"redis://127.0.0.1:6379/0"', "6379", "cluster.redis", "string"),
    ("bad gateway id", '"gw-1"', '"gw 1"', "cluster.gateway_id", "gateway id"),
    ("gateway id colon", '"gw-1"', '"gw:1"', "cluster.gateway_id", "gateway id"),
    ("no advertise", 'advertise = "10.0.0.5:8443"\n', "", "cluster.advertise", "required"),
    ("advertise no port", '"10.0.0.5:8443"', '"10.0.0.5"', "cluster.advertise", "HOST:PORT"),
    ("advertise wildcard", '"10.0.0.5:8443"', '"0.0.0.0:8443"', "cluster.advertise", "wildcard"),
    ("advertise port 0", '"10.0.0.5:8443"', '"10.0.0.5:0"', "cluster.advertise", "port 0"),
    ("no peer_ca", 'peer_ca = "peer-ca.pem"\n', "", "cluster.peer_ca", "required"),
    ("missing peer_ca", '"peer-ca.pem"', '"nope.pem"', "cluster.peer_ca", "does not exist"),
    ("ttl too short", "[cluster]", '[cluster]\nlease_ttl = "500ms"', "cluster.lease_ttl", "0.5s"),
    ("ttl too long", "[cluster]", '[cluster]\nlease_ttl = "2m"', "cluster.lease_ttl", "120s"),
    ("ttl off", "[cluster]", '[cluster]\nlease_ttl = "off"', "cluster.lease_ttl", "positive"),
    ("ttl garbage", "[cluster]", '[cluster]\nlease_ttl = "soon"', "cluster.lease_ttl", "duration"),
    ("typo key", "[cluster]", '[cluster]\nlease_tll = "3s"', "cluster.lease_tll", "unknown key"),
    ("redis ca without tls", "[cluster]", '[cluster]\nredis_ca = "redis-ca.pem"',
     "cluster.redis_ca", "rediss://"),
    ("redis cert without tls", "[cluster]",
     '[cluster]\nredis_cert = "redis.crt"\nredis_key = "redis.key"',
     "cluster.redis_cert", "rediss://"),
    ("redis cert without key", 'redis = "redis://', 'redis_cert = "redis.crt"\nredis = "rediss://',
     "cluster.redis_key", "go together"),
    ("redis key without cert", 'redis = "redis://', 'redis_key = "redis.key"\nredis = "rediss://',
     "cluster.redis_key", "go together"),
    ("missing redis ca", 'redis = "redis://', 'redis_ca = "nope.pem"\nredis = "rediss://',
     "cluster.redis_ca", "does not exist"),
    ("two passwords", 'redis = "redis://', 'redis_password_file = "redis-password"\nredis = "redis://u:pw@',
     "cluster.redis_password_file", "keep one"),
    ("empty password", "[cluster]", '[cluster]\nredis_password_file = "empty"',
     "cluster.redis_password_file", "is empty"),
    ("missing password", "[cluster]", '[cluster]\nredis_password_file = "nope"',
     "cluster.redis_password_file", "cannot read"),
]  # fmt: skip


@pytest.mark.parametrize(
    ("old", "new", "key", "words"),
    [case[1:] for case in BAD_CASES],
    ids=[case[0] for case in BAD_CASES],
)
def test_cluster_bad_input_raises_config_error_naming_file_and_key(
    tmp_path: Path, old: str, new: str, key: str, words: str
) -> None:
    """Each mistake in [cluster] is a ConfigError naming the file, the key and what is wrong."""
    path = write(tmp_path, edited(old, new))
    with pytest.raises(ConfigError) as info:
        load_config(path)
    err = info.value
    assert err.path == str(path.resolve())
    assert err.key == key
    assert words in err.message


def test_cluster_redis_tls_and_password_file_resolve_beside_the_config(tmp_path: Path) -> None:
    """The files that prove the gateway to Redis resolve against the config's directory,
    and the password is the file's text without its line end (editors add one)."""
    extra = (
        'redis_ca = "redis-ca.pem"\nredis_cert = "redis.crt"\nredis_key = "redis.key"\n'
        'redis_password_file = "redis-password"\n'
    )
    text = edited('"redis://127.0.0.1:6379/0"', '"rediss://relayd@redis.internal:6380/0"')
    cluster = load_config(write(tmp_path, text + extra)).cluster
    assert cluster is not None
    assert cluster.redis_ca == (tmp_path / "redis-ca.pem").resolve()
    assert (cluster.redis_cert, cluster.redis_key) == (
        (tmp_path / "redis.crt").resolve(),
        (tmp_path / "redis.key").resolve(),
    )
    assert cluster.redis_password() == "s3cret"
    assert "s3cret" not in repr(cluster)


def test_cluster_bad_redis_url_error_never_shows_the_password(tmp_path: Path) -> None:
    """A refused URL is described, never echoed: it may carry a password."""
    path = write(tmp_path, edited('"redis://127.0.0.1:6379/0"', '"redis://:hunter2@h:bad/0"'))
    with pytest.raises(ConfigError) as info:
        load_config(path)
    assert info.value.key == "cluster.redis"
    assert "hunter2" not in str(info.value)


def test_cluster_bad_host_name_default_says_set_gateway_id(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A host name that is no safe token is refused with advice to set gateway_id."""
    monkeypatch.setattr(platform, "node", lambda: "bad host")
    path = write(tmp_path, edited('gateway_id = "gw-1"\n', ""))
    with pytest.raises(ConfigError, match=r"cluster\.gateway_id: .*set gateway_id"):
        load_config(path)
