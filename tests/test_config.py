"""Tests for relayd.config: loading a full file, and naming file and key for every bad input."""

from __future__ import annotations

import ipaddress
import math
import re
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from relayd.config import (
    Address,
    Config,
    SerialUrl,
    load_config,
    parse_config,
    parse_duration,
    vm_scopes,
)
from relayd.errors import ConfigError

# The DESIGN.md sample, with every VM kind of serial URL and relative paths.
FULL = """\
[gateway]
region = "japaneast"
listen = "0.0.0.0:443"
health_listen = "127.0.0.1:9100"
state_dir = "state"
trusted_proxies = ["10.0.0.0/8", "fd00::/8"]
allow_clients = ["0.0.0.0/0", "::/0"]
handshake_timeout = "1.5s"

[tls]
cert = "tls/server.crt"
key = "/etc/relayd/tls/server.key"
min_version = "1.3"

[auth]
issuer = "https://login.example.com/tenant"
audience = "relayd"
jwks_file = "jwks.json"
require_mfa = false

[limits]
max_paste_bytes = 65536
output_bytes_per_s = 1048576
idle_timeout = "30m"
max_session_seconds = "8h"
replay_bytes = 16384
console_log_bytes = 1048576

[[subscriptions]]
id = "sub-1"
serial_console = true

[[subscriptions]]
id = "sub-2"
require_mfa = true

[[vms]]
id = "vm-alpha"
subscription = "sub-1"
serial = "tcp://127.0.0.1:7001"
baud = 115200
takeover = "evict"
on_detach = 'send:\\x04exit\\r'
break_command = ["virsh", "send-break", "vm-alpha"]

[[vms]]
id = "vm-tty"
subscription = "sub-1"
resource_group = "rg-web"
serial = "/dev/ttyS0"
baud = 9600
parity = "even"
takeover = "demote"
on_detach = "hangup"

[[vms]]
id = "vm-telnet"
subscription = "sub-1"
resource_group = "rg-web"
scale_set = "ss-web"
serial = "telnet://qemu-host.example:2323"
takeover = "deny"

[[vms]]
id = "vm-unix"
subscription = "sub-2"
serial = "unix:///run/qemu/vm.sock"
input_bytes_per_s = 500

[[vms]]
id = "vm-v6"
subscription = "sub-2"
serial = "tcp://[::1]:7002"

[[role_assignments]]
principal = "user:alice"
role = "contributor"
scope = "/subscriptions/sub-1"

[[role_assignments]]
principal = "group:ops"
role = "owner"
scope = "/subscriptions/sub-1/resourceGroups/rg-web/virtualMachineScaleSets/ss-web"

[[role_assignments]]
principal = "cert:console-bot"
role = "reader"
scope = "/subscriptions/sub-2/vms/vm-unix"
"""

# A small valid file that bad-input cases edit.
BASE = """\
[gateway]
listen = "0.0.0.0:443"
trusted_proxies = ["10.0.0.0/8"]

[tls]
cert = "server.crt"
key = "server.key"

[auth]
issuer = "https://issuer.example"
audience = "relayd"
hs256_secret_file = "dev.key"

[limits]
idle_timeout = "30m"

[[subscriptions]]
id = "sub-1"

[[vms]]
id = "vm-a"
subscription = "sub-1"
serial = "tcp://127.0.0.1:7001"
takeover = "evict"

[[role_assignments]]
principal = "user:alice"
role = "contributor"
scope = "/subscriptions/sub-1"
"""


def write(tmp_path: Path, text: str, name: str = "relayd.toml") -> Path:
    path = tmp_path / name
    path.write_text(text, encoding="utf-8")
    return path


def edited(old: str, new: str) -> str:
    """BASE with one exact fragment replaced (asserted present, so cases cannot rot)."""
    assert old in BASE, old
    return BASE.replace(old, new, 1)


@pytest.fixture
def full(tmp_path: Path) -> Config:
    return load_config(write(tmp_path, FULL))


# --- a valid full file --------------------------------------------------------------


def test_load_full_config_gateway_values_are_parsed(full: Config, tmp_path: Path) -> None:
    """[gateway] addresses, networks and durations come out typed."""
    gw = full.gateway
    assert gw.region == "japaneast"
    assert gw.listen == Address("0.0.0.0", 443)
    assert gw.health_listen == Address("127.0.0.1", 9100)
    assert gw.trusted_proxies == (
        ipaddress.ip_network("10.0.0.0/8"),
        ipaddress.ip_network("fd00::/8"),
    )
    assert gw.allow_clients == (ipaddress.ip_network("0.0.0.0/0"), ipaddress.ip_network("::/0"))
    assert gw.handshake_timeout == 1.5
    assert gw.drain_seconds == 10.0


def test_load_full_config_relative_paths_resolve_against_file_dir(
    full: Config, tmp_path: Path
) -> None:
    """Relative paths are resolved against the config's directory; absolute ones are kept."""
    base = tmp_path.resolve()
    assert full.path == base / "relayd.toml"
    assert full.gateway.state_dir == base / "state"
    assert full.tls.cert == base / "tls" / "server.crt"
    assert full.tls.key == Path("/etc/relayd/tls/server.key")
    assert full.auth.jwks_file == base / "jwks.json"
    assert full.auth.hs256_secret_file is None


def test_load_full_config_tls_auth_limits_are_parsed(full: Config) -> None:
    """[tls], [auth] and [limits] carry their values and defaults."""
    assert full.tls.min_version == "1.3"
    assert full.tls.client_ca is None
    assert full.auth.issuer == "https://login.example.com/tenant"
    assert full.auth.audience == "relayd"
    assert full.auth.require_mfa is False
    assert full.auth.leeway == 60.0
    limits = full.limits
    assert limits.idle_timeout == 1800.0
    assert limits.max_session_seconds == 8 * 3600.0
    assert (limits.max_paste_bytes, limits.output_bytes_per_s) == (65536, 1048576)
    assert (limits.replay_bytes, limits.console_log_bytes) == (16384, 1048576)
    assert limits.idle_warning == 60.0
    assert limits.max_sessions is None


def test_load_full_config_subscriptions_and_vms_are_parsed(full: Config) -> None:
    """Subscriptions and VMs are kept in order with their per-VM settings."""
    assert [s.id for s in full.subscriptions] == ["sub-1", "sub-2"]
    sub2 = full.subscription("sub-2")
    assert sub2 is not None
    assert sub2.require_mfa is True
    assert full.subscription("nope") is None
    assert [v.id for v in full.vms] == ["vm-alpha", "vm-tty", "vm-telnet", "vm-unix", "vm-v6"]
    alpha = full.vm("vm-alpha")
    assert alpha is not None
    assert alpha.on_detach == b"\x04exit\r"
    assert alpha.break_command == ("virsh", "send-break", "vm-alpha")
    assert alpha.nmi_command is None
    assert alpha.input_rate == 11520
    tty = full.vm("vm-tty")
    assert tty is not None
    assert (tty.baud, tty.parity, tty.takeover, tty.on_detach) == (9600, "even", "demote", "hangup")
    assert tty.input_rate == 960
    telnet = full.vm("vm-telnet")
    assert telnet is not None
    assert (telnet.takeover, telnet.on_detach) == ("deny", "none")
    unix = full.vm("vm-unix")
    assert unix is not None
    assert unix.input_rate == 500
    assert full.vm("missing") is None


def test_load_full_config_serial_urls_are_parsed(full: Config) -> None:
    """Each kind of serial URL parses into kind, target and port."""
    serials = {vm.id: vm.serial for vm in full.vms}
    assert serials == {
        "vm-alpha": SerialUrl("tcp", "127.0.0.1", 7001),
        "vm-tty": SerialUrl("tty", "/dev/ttyS0"),
        "vm-telnet": SerialUrl("telnet", "qemu-host.example", 2323),
        "vm-unix": SerialUrl("unix", "/run/qemu/vm.sock"),
        "vm-v6": SerialUrl("tcp", "::1", 7002),
    }
    assert [str(s) for s in serials.values()] == [
        "tcp://127.0.0.1:7001",
        "/dev/ttyS0",
        "telnet://qemu-host.example:2323",
        "unix:///run/qemu/vm.sock",
        "tcp://[::1]:7002",
    ]


def test_load_full_config_role_assignments_are_parsed(full: Config) -> None:
    """Role assignments keep principal, role and scope."""
    triples = [(ra.principal, ra.role, ra.scope) for ra in full.role_assignments]
    assert triples[0] == ("user:alice", "contributor", "/subscriptions/sub-1")
    assert triples[1][:2] == ("group:ops", "owner")
    assert triples[2] == ("cert:console-bot", "reader", "/subscriptions/sub-2/vms/vm-unix")


def test_load_minimal_config_uses_defaults(tmp_path: Path) -> None:
    """Only [tls] and [auth] are required; everything else has a default."""
    path = write(
        tmp_path,
        '[tls]\ncert = "c"\nkey = "k"\n[auth]\nissuer = "i"\naudience = "a"\n'
        'hs256_secret_file = "/etc/relayd/dev.key"\n',
    )
    cfg = load_config(path)
    assert cfg.gateway.listen == Address("0.0.0.0", 443)
    assert cfg.gateway.state_dir == Path("/var/lib/relayd")
    assert cfg.gateway.trusted_proxies == ()
    assert cfg.auth.hs256_secret_file == Path("/etc/relayd/dev.key")
    assert cfg.limits.idle_timeout == 1800.0
    assert (cfg.subscriptions, cfg.vms, cfg.role_assignments) == ((), (), ())


def test_load_minimal_config_caps_sessions_per_principal_and_keeps_expired_sessions(
    tmp_path: Path,
) -> None:
    """Ten sessions per principal unless raised; disconnect_expired is off unless set."""
    text = (
        '[tls]\ncert = "c"\nkey = "k"\n[auth]\nissuer = "i"\naudience = "a"\n'
        'hs256_secret_file = "/etc/relayd/dev.key"\n'
    )
    cfg = load_config(write(tmp_path, text))
    assert cfg.limits.max_sessions_per_principal == 10
    assert cfg.auth.disconnect_expired is False
    text = text.replace("[auth]\n", "[auth]\ndisconnect_expired = true\n")
    text += "[limits]\nmax_sessions_per_principal = 500\n"
    cfg = load_config(write(tmp_path, text))
    assert cfg.auth.disconnect_expired is True
    assert cfg.limits.max_sessions_per_principal == 500


def test_load_config_accepts_str_path(tmp_path: Path) -> None:
    """load_config takes a str as well as a Path."""
    assert load_config(str(write(tmp_path, BASE))).vms[0].id == "vm-a"


def test_load_config_off_and_zero_durations_disable(tmp_path: Path) -> None:
    """ "off" and 0 turn an optional duration off (None)."""
    cfg = load_config(write(tmp_path, edited('idle_timeout = "30m"', 'idle_timeout = "off"')))
    assert cfg.limits.idle_timeout is None
    cfg = load_config(write(tmp_path, edited('idle_timeout = "30m"', "idle_timeout = 0")))
    assert cfg.limits.idle_timeout is None


def test_address_str_brackets_ipv6() -> None:
    """Listen addresses print back in HOST:PORT form, IPv6 in brackets."""
    assert str(Address("::1", 443)) == "[::1]:443"
    assert str(Address("127.0.0.1", 443)) == "127.0.0.1:443"


def test_config_listen_ipv6_is_parsed(tmp_path: Path) -> None:
    """A bracketed IPv6 listen address parses to host and port."""
    cfg = load_config(write(tmp_path, edited('listen = "0.0.0.0:443"', 'listen = "[::]:8443"')))
    assert cfg.gateway.listen == Address("::", 8443)


def test_vm_scopes_cover_azure_hierarchy(full: Config) -> None:
    """vm_scopes lists every scope containing a VM, widest first."""
    telnet, tty, alpha = full.vm("vm-telnet"), full.vm("vm-tty"), full.vm("vm-alpha")
    assert telnet is not None
    assert tty is not None
    assert alpha is not None
    ss = "/subscriptions/sub-1/resourceGroups/rg-web/virtualMachineScaleSets/ss-web"
    assert vm_scopes(telnet) == (
        "/subscriptions/sub-1",
        "/subscriptions/sub-1/resourceGroups/rg-web",
        ss,
        f"{ss}/virtualMachines/vm-telnet",
        "/subscriptions/sub-1/vms/vm-telnet",
    )
    assert vm_scopes(tty) == (
        "/subscriptions/sub-1",
        "/subscriptions/sub-1/resourceGroups/rg-web",
        "/subscriptions/sub-1/resourceGroups/rg-web/providers/Microsoft.Compute/virtualMachines/vm-tty",
        "/subscriptions/sub-1/vms/vm-tty",
    )
    assert vm_scopes(alpha) == ("/subscriptions/sub-1", "/subscriptions/sub-1/vms/vm-alpha")


# --- serial URLs --------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("/dev/ttyS0", SerialUrl("tty", "/dev/ttyS0")),
        ("/dev/pts/7", SerialUrl("tty", "/dev/pts/7")),
        ("tcp://127.0.0.1:7001", SerialUrl("tcp", "127.0.0.1", 7001)),
        ("tcp://[::1]:7001", SerialUrl("tcp", "::1", 7001)),
        ("telnet://host:23", SerialUrl("telnet", "host", 23)),
        ("telnet://[fe80::1]:65535", SerialUrl("telnet", "fe80::1", 65535)),
        ("unix:///x", SerialUrl("unix", "/x")),
        ("unix:///run/vm.sock", SerialUrl("unix", "/run/vm.sock")),
    ],
)
def test_serial_url_valid_is_parsed_and_round_trips(text: str, expected: SerialUrl) -> None:
    """Device paths and tcp/telnet/unix URLs parse, and print back as written."""
    assert SerialUrl.parse(text) == expected
    assert str(expected) == text


@pytest.mark.parametrize(
    "text",
    [
        "",
        "ttyS0",
        "COM1",
        "ftp://h:1",
        "tcp://",
        "tcp://host",
        "tcp://host:",
        "tcp://:7001",
        "tcp://host:0",
        "tcp://host:65536",
        "tcp://host:-1",
        "tcp://host:port",
        "telnet://[::1]",
        "unix://relative.sock",
        "unix://",
    ],
)
def test_serial_url_invalid_raises_value_error(text: str) -> None:
    """Anything but a device path or a well-formed tcp/telnet/unix URL is refused."""
    with pytest.raises(ValueError, match=r"."):
        SerialUrl.parse(text)


# --- every bad input names the file and the key --------------------------------------

BAD_CASES: list[tuple[str, str, str, str]] = [
    # (case id, old fragment, new fragment, expected key)
    ("bad takeover", 'takeover = "evict"', 'takeover = "steal"', "vms[0].takeover"),
    ("typo key", 'takeover = "evict"', 'takeovr = "deny"', "vms[0].takeovr"),
    ("unknown table", "[limits]", "[limitz]", "limitz"),
    ("unknown top key", "[gateway]", 'colour = "blue"\n[gateway]', "colour"),
    ("path key", "[gateway]", 'path = "/x"\n[gateway]', "path"),
    ("missing serial", 'serial = "tcp://127.0.0.1:7001"\n', "", "vms[0].serial"),
    ("missing vm sub", 'subscription = "sub-1"\n', "", "vms[0].subscription"),
    ("missing tls", '[tls]\ncert = "server.crt"\nkey = "server.key"\n', "", "tls"),
    ("missing tls key", 'key = "server.key"\n', "", "tls.key"),
    ("missing issuer", 'issuer = "https://issuer.example"\n', "", "auth.issuer"),
    ("no key source", 'hs256_secret_file = "dev.key"\n', "", "auth"),
    (
        "unknown subscription",
        'subscription = "sub-1"',
        'subscription = "sub-9"',
        "vms[0].subscription",
    ),
    (
        "duplicate vm",
        "[[role_assignments]]",
        '[[vms]]\nid = "vm-a"\nsubscription = "sub-1"\nserial = "/dev/ttyS1"\n'
        "\n[[role_assignments]]",
        "vms[1].id",
    ),
    (
        "duplicate subscription",
        "[[vms]]",
        '[[subscriptions]]\nid = "sub-1"\n\n[[vms]]',
        "subscriptions[1].id",
    ),
    (
        "scope names nothing",
        'scope = "/subscriptions/sub-1"',
        'scope = "/subscriptions/sub-9"',
        "role_assignments[0].scope",
    ),
    (
        "scope unknown rg",
        'scope = "/subscriptions/sub-1"',
        'scope = "/subscriptions/sub-1/resourceGroups/rg-none"',
        "role_assignments[0].scope",
    ),
    (
        "scope unknown vm",
        'scope = "/subscriptions/sub-1"',
        'scope = "/subscriptions/sub-1/vms/vm-z"',
        "role_assignments[0].scope",
    ),
    (
        "scope not a subscription path",
        'scope = "/subscriptions/sub-1"',
        'scope = "/tenants/t1"',
        "role_assignments[0].scope",
    ),
    (
        "bad principal",
        'principal = "user:alice"',
        'principal = "alice"',
        "role_assignments[0].principal",
    ),
    ("bad role", 'role = "contributor"', 'role = "admin"', "role_assignments[0].role"),
    ("bad duration", 'idle_timeout = "30m"', 'idle_timeout = "soon"', "limits.idle_timeout"),
    ("bad duration unit", 'idle_timeout = "30m"', 'idle_timeout = "30y"', "limits.idle_timeout"),
    ("negative duration", 'idle_timeout = "30m"', "idle_timeout = -5", "limits.idle_timeout"),
    ("bool duration", 'idle_timeout = "30m"', "idle_timeout = true", "limits.idle_timeout"),
    ("nan duration", 'idle_timeout = "30m"', "idle_timeout = nan", "limits.idle_timeout"),
    ("inf duration", 'idle_timeout = "30m"', "idle_timeout = inf", "limits.idle_timeout"),
    (
        "zero required duration",
        "[limits]",
        '[limits]\nkeepalive_interval = "0s"',
        "limits.keepalive_interval",
    ),
    (
        "off required duration",
        "[gateway]",
        '[gateway]\ndrain_seconds = "off"',
        "gateway.drain_seconds",
    ),
    ("bad cidr", '["10.0.0.0/8"]', '["10.0.0.300/8"]', "gateway.trusted_proxies"),
    ("cidr garbage", '["10.0.0.0/8"]', '["lb.example"]', "gateway.trusted_proxies"),
    (
        "bad allow_clients",
        "[gateway]",
        '[gateway]\nallow_clients = ["::/200"]',
        "gateway.allow_clients",
    ),
    ("bad serial scheme", '"tcp://127.0.0.1:7001"', '"ftp://127.0.0.1:7001"', "vms[0].serial"),
    ("serial no port", '"tcp://127.0.0.1:7001"', '"tcp://127.0.0.1"', "vms[0].serial"),
    ("serial port 0", '"tcp://127.0.0.1:7001"', '"tcp://127.0.0.1:0"', "vms[0].serial"),
    ("serial relative unix", '"tcp://127.0.0.1:7001"', '"unix://vm.sock"', "vms[0].serial"),
    ("serial relative tty", '"tcp://127.0.0.1:7001"', '"ttyS0"', "vms[0].serial"),
    ("serial not string", '"tcp://127.0.0.1:7001"', "7001", "vms[0].serial"),
    (
        "replay exceeds log",
        'idle_timeout = "30m"',
        "replay_bytes = 8192\nconsole_log_bytes = 4096",
        "limits",
    ),
    ("bad listen", 'listen = "0.0.0.0:443"', 'listen = "0.0.0.0"', "gateway.listen"),
    ("listen port range", 'listen = "0.0.0.0:443"', 'listen = "0.0.0.0:70000"', "gateway.listen"),
    ("bad on_detach", 'takeover = "evict"', 'on_detach = "logout"', "vms[0].on_detach"),
    ("empty send", 'takeover = "evict"', 'on_detach = "send:"', "vms[0].on_detach"),
    ("bad vm id", 'id = "vm-a"', 'id = "-vm"', "vms[0].id"),
    ("low baud", 'takeover = "evict"', "baud = 10", "vms[0].baud"),
    ("bad parity", 'takeover = "evict"', 'parity = "mark"', "vms[0].parity"),
    ("empty argv", 'takeover = "evict"', "nmi_command = []", "vms[0].nmi_command"),
    ("scale set without rg", 'takeover = "evict"', 'scale_set = "ss"', "vms[0].scale_set"),
    (
        "slash in resource group",
        'takeover = "evict"',
        'resource_group = "rg/virtualMachineScaleSets/web"',
        "vms[0].resource_group",
    ),
    (
        "slash in scale set",
        'takeover = "evict"',
        'resource_group = "rg"\nscale_set = "a/b"',
        "vms[0].scale_set",
    ),
    ("slash in subscription id", 'id = "sub-1"', 'id = "sub/1"', "subscriptions[0].id"),
    ("tls 1.1", 'key = "server.key"', 'key = "server.key"\nmin_version = "1.1"', "tls.min_version"),
    ("paste too big", 'idle_timeout = "30m"', "max_paste_bytes = 0", "limits.max_paste_bytes"),
    ("table not array", "[[subscriptions]]", "[subscriptions]", "subscriptions"),
    ("empty subscription id", 'id = "sub-1"', 'id = ""', "subscriptions[0].id"),
]


@pytest.mark.parametrize(
    ("old", "new", "key"), [case[1:] for case in BAD_CASES], ids=[case[0] for case in BAD_CASES]
)
def test_load_config_bad_input_raises_config_error_naming_file_and_key(
    tmp_path: Path, old: str, new: str, key: str
) -> None:
    """Each kind of mistake is a ConfigError whose message names the file and the key."""
    path = write(tmp_path, edited(old, new))
    with pytest.raises(ConfigError) as info:
        load_config(path)
    err = info.value
    assert err.path == str(path.resolve())
    assert err.key == key
    assert str(err).startswith(f"{path.resolve()}: {key}: ")
    assert err.message


def test_load_config_typo_key_says_unknown_key(tmp_path: Path) -> None:
    """A misspelt key reads as an unknown key, not a pydantic message."""
    with pytest.raises(ConfigError, match=r"vms\[0\]\.takeovr: unknown key$"):
        load_config(write(tmp_path, edited('takeover = "evict"', 'takeovr = "deny"')))


def test_load_config_missing_key_says_required(tmp_path: Path) -> None:
    """A missing required key reads as such."""
    with pytest.raises(ConfigError, match=r"vms\[0\]\.serial: required key is missing$"):
        load_config(write(tmp_path, edited('serial = "tcp://127.0.0.1:7001"\n', "")))


def test_load_config_replay_over_log_names_both_numbers(tmp_path: Path) -> None:
    """replay_bytes > console_log_bytes names both keys and values."""
    path = write(
        tmp_path, edited('idle_timeout = "30m"', "replay_bytes = 8192\nconsole_log_bytes = 4096")
    )
    with pytest.raises(ConfigError, match="replay_bytes 8192 exceeds console_log_bytes 4096"):
        load_config(path)


def test_load_config_several_errors_reports_first_and_count(tmp_path: Path) -> None:
    """With several mistakes, the first is named and the rest counted."""
    path = write(tmp_path, edited('takeover = "evict"', 'takeover = "x"\nbaud = 1\nparity = "x"'))
    with pytest.raises(ConfigError, match=r"\(and 2 more errors\)$"):
        load_config(path)


def test_load_config_invalid_toml_raises_config_error(tmp_path: Path) -> None:
    """A syntax error is a ConfigError naming the file."""
    path = write(tmp_path, BASE + "\n[vms\n")
    with pytest.raises(ConfigError, match="not valid TOML") as info:
        load_config(path)
    assert info.value.path == str(path)
    assert str(info.value).startswith(f"{path}: ")


def test_load_config_not_utf8_raises_config_error(tmp_path: Path) -> None:
    """A file that is not UTF-8 is a ConfigError naming the file."""
    path = tmp_path / "latin1.toml"
    path.write_bytes(b'[gateway]\nregion = "caf\xe9"\n')
    with pytest.raises(ConfigError, match="not UTF-8") as info:
        load_config(path)
    assert info.value.path == str(path)


@pytest.mark.parametrize("kind", ["missing", "directory"])
def test_load_config_unreadable_file_raises_config_error(tmp_path: Path, kind: str) -> None:
    """A missing file or a directory is a ConfigError naming the path and why."""
    path = tmp_path / "relayd.toml"
    if kind == "directory":
        path.mkdir()
    with pytest.raises(ConfigError, match="cannot read") as info:
        load_config(path)
    assert info.value.path == str(path)
    assert info.value.key == ""
    assert str(info.value).startswith(f"{path}: cannot read: ")


def test_parse_config_does_not_mutate_input() -> None:
    """Resolving relative paths works on a copy, so a dict can be validated twice."""
    raw: dict[str, Any] = {
        "tls": {"cert": "c", "key": "k"},
        "auth": {"issuer": "i", "audience": "a", "hs256_secret_file": "s"},
    }
    parse_config(raw, Path("/etc/relayd/relayd.toml"))
    assert raw["tls"] == {"cert": "c", "key": "k"}
    cfg = parse_config(raw, Path("/srv/relayd.toml"))
    assert cfg.tls.cert == Path("/srv/c")


def test_config_is_frozen(full: Config) -> None:
    """Loaded configuration cannot be changed in place."""
    with pytest.raises(ValueError, match="frozen"):
        full.limits.replay_bytes = 1  # type: ignore[misc]


def test_parse_config_home_relative_path_is_expanded() -> None:
    """A path beginning with ~ is expanded to the home directory, not put under the config dir."""
    raw: dict[str, Any] = {
        "tls": {"cert": "~/tls/server.crt", "key": "k"},
        "auth": {"issuer": "i", "audience": "a", "hs256_secret_file": "s"},
    }
    cfg = parse_config(raw, Path("/etc/relayd/relayd.toml"))
    assert cfg.tls.cert == Path("~/tls/server.crt").expanduser()


# --- parse_duration ---------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "seconds"),
    [
        ("30m", 1800.0),
        ("1.5s", 1.5),
        ("500ms", 0.5),
        ("2h", 7200.0),
        ("1d", 86400.0),
        ("45", 45.0),
        (" 10 s ", 10.0),
        (500, 500.0),
        (2.5, 2.5),
    ],
)
def test_parse_duration_valid_returns_seconds(text: object, seconds: float) -> None:
    """Numbers are seconds; strings take an optional ms/s/m/h/d unit."""
    assert parse_duration(text) == seconds


@pytest.mark.parametrize("value", [None, False, "off", 0, 0.0, "0", "0s", "0ms"])
def test_parse_duration_off_or_zero_returns_none(value: object) -> None:
    """None, false, "off" and zero mean disabled."""
    assert parse_duration(value) is None


@pytest.mark.parametrize(
    "value",
    ["", "soon", "5 minutes", "-5s", "1e3", "1.s", ".5s", "5S", "5 m s", True, -1, -0.5, [5], {}],
)
def test_parse_duration_invalid_raises_value_error(value: object) -> None:
    """Garbage, negative numbers, booleans and containers are not durations."""
    with pytest.raises(ValueError, match=r"duration"):
        parse_duration(value)


@given(value=st.integers(0, 10**12) | st.floats(0, 1e12, allow_nan=False, allow_infinity=False))
@settings(max_examples=100)
def test_parse_duration_non_negative_number_round_trips(value: float) -> None:
    """A non-negative number is that many seconds (zero meaning off)."""
    assert parse_duration(value) == (float(value) or None)


@given(amount=st.integers(1, 10**6), unit=st.sampled_from(["ms", "s", "m", "h", "d", ""]))
@settings(max_examples=100)
def test_parse_duration_number_with_unit_scales(amount: int, unit: str) -> None:
    """An integer with a unit scales by that unit."""
    factor = {"ms": 0.001, "s": 1, "m": 60, "h": 3600, "d": 86400, "": 1}[unit]
    assert parse_duration(f"{amount}{unit}") == pytest.approx(amount * factor)


_VALID = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(ms|s|m|h|d)?\s*$")


@given(text=st.text(max_size=12))
@settings(max_examples=200)
def test_parse_duration_garbage_string_raises_value_error(text: str) -> None:
    """Any string that is not NUMBER[UNIT] (or "off") raises ValueError and nothing else."""
    if text == "off" or _VALID.match(text):
        result = parse_duration(text)
        assert result is None or result >= 0
        return
    with pytest.raises(ValueError, match="duration"):
        parse_duration(text)


@pytest.mark.parametrize("value", [math.nan, math.inf, -math.inf, "9" * 400])
def test_parse_duration_non_finite_raises_value_error(value: object) -> None:
    """NaN and infinity (TOML `nan`, `inf`, or a digit string overflowing float) are refused."""
    with pytest.raises(ValueError, match="duration"):
        parse_duration(value)


def test_parse_duration_huge_integer_raises_value_error() -> None:
    """An integer too large for a float is refused as a duration, with ValueError."""
    with pytest.raises(ValueError, match="duration"):
        parse_duration(10**400)


def test_load_config_huge_integer_duration_raises_config_error(tmp_path: Path) -> None:
    """tomllib accepts integers of any size; one as a duration is a ConfigError naming the key."""
    path = write(tmp_path, edited('idle_timeout = "30m"', "idle_timeout = " + "9" * 400))
    with pytest.raises(ConfigError) as info:
        load_config(path)
    assert info.value.key == "limits.idle_timeout"


# --- development tokens and leeway (issue 15, item 9) ------------------------------------

JWKS_BESIDE_SECRET = 'hs256_secret_file = "dev.key"\njwks_file = "jwks.json"'


def test_load_config_dev_secret_beside_jwks_raises_config_error_naming_key(
    tmp_path: Path,
) -> None:
    """The HS256 development secret next to a production JWKS is refused by default."""
    path = write(tmp_path, edited('hs256_secret_file = "dev.key"', JWKS_BESIDE_SECRET))
    with pytest.raises(ConfigError) as info:
        load_config(path)
    assert info.value.path == str(path.resolve())
    assert info.value.key == "auth.hs256_secret_file"
    assert "allow_dev_tokens" in info.value.message


def test_load_config_dev_secret_beside_jwks_with_allow_dev_tokens_loads(tmp_path: Path) -> None:
    """`allow_dev_tokens = true` is the explicit opt-in to both key sources at once."""
    text = edited('hs256_secret_file = "dev.key"', JWKS_BESIDE_SECRET + "\nallow_dev_tokens = true")
    cfg = load_config(write(tmp_path, text))
    assert cfg.auth.allow_dev_tokens is True
    assert cfg.auth.jwks_file is not None
    assert cfg.auth.hs256_secret_file is not None


def test_load_config_dev_secret_alone_needs_no_opt_in(tmp_path: Path) -> None:
    """A development config with only the HS256 secret loads as before (the demo's)."""
    cfg = load_config(write(tmp_path, BASE))
    assert cfg.auth.allow_dev_tokens is False
    assert cfg.auth.hs256_secret_file is not None


@pytest.mark.parametrize("leeway", ['"5m"', "300", '"90s"', '"0.5s"'])
def test_load_config_leeway_up_to_five_minutes_loads(tmp_path: Path, leeway: str) -> None:
    """A clock-skew allowance up to 300 s is accepted."""
    text = edited(
        'hs256_secret_file = "dev.key"', f'hs256_secret_file = "dev.key"\nleeway = {leeway}'
    )
    assert load_config(write(tmp_path, text)).auth.leeway <= 300


@pytest.mark.parametrize(
    ("leeway", "seconds"), [('"6m"', "360"), ("301", "301"), ('"1d"', "86400")]
)
def test_load_config_leeway_over_five_minutes_raises_config_error_with_numbers(
    tmp_path: Path, leeway: str, seconds: str
) -> None:
    """A leeway above 5 minutes would keep expired tokens alive: refused, with the numbers."""
    text = edited(
        'hs256_secret_file = "dev.key"', f'hs256_secret_file = "dev.key"\nleeway = {leeway}'
    )
    with pytest.raises(ConfigError) as info:
        load_config(write(tmp_path, text))
    assert info.value.key == "auth.leeway"
    assert seconds in info.value.message
    assert "300" in info.value.message
