"""The TOML configuration, validated once into frozen models.

pydantic does the type checking and the defaults; this module adds what is
ours: durations like ``"30m"``, serial-port URLs, cross-references (a VM's
subscription must exist, a role scope must name something configured), and
error messages that name the file and the key so an operator can fix the
file without reading code. Relative paths are resolved against the config
file's directory, so a config and its certificates can be moved together.
"""

from __future__ import annotations

import codecs
import ipaddress
import math
import platform
import re
import tomllib
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any, Literal
from urllib.parse import parse_qsl, urlsplit

from pydantic import (
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    ValidationError,
    ValidationInfo,
    field_validator,
    model_validator,
)

from .errors import ConfigError

__all__ = [
    "AuthConfig",
    "ClusterConfig",
    "Config",
    "GatewayConfig",
    "LimitsConfig",
    "RoleAssignment",
    "SerialUrl",
    "SubscriptionConfig",
    "TlsConfig",
    "VmConfig",
    "load_config",
    "parse_config",
    "parse_duration",
    "redact_url",
    "scale_set_scopes",
    "vm_scopes",
]

_UNITS = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0, "d": 86400.0}
_DURATION = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(ms|s|m|h|d)?\s*$")


def parse_duration(value: object) -> float | None:
    """Turn ``"30m"``, ``"1.5s"``, ``500`` (seconds) into seconds; 0 or "off" disable.

    Raises:
        ValueError: the value is not a duration.
    """
    if value is None or value is False or value == "off":
        return None
    if isinstance(value, bool):
        raise ValueError("expected a duration like '30s', '5m' or '1h'")
    if isinstance(value, int | float):
        try:
            seconds = float(value)
        except OverflowError:
            raise ValueError("duration is out of range") from None
    elif isinstance(value, str) and (m := _DURATION.match(value)):
        seconds = float(m.group(1)) * _UNITS[m.group(2) or "s"]
    else:
        raise ValueError(f"expected a duration like '30s', '5m' or '1h', got {value!r}")
    if not math.isfinite(seconds) or seconds < 0:
        raise ValueError(f"a duration must be finite and not negative, got {value!r}")
    return seconds or None


def _required_duration(value: object) -> float:
    seconds = parse_duration(value)
    if seconds is None:
        raise ValueError("must be a positive duration")
    return seconds


Duration = Annotated[float | None, BeforeValidator(parse_duration)]
PositiveDuration = Annotated[float, BeforeValidator(_required_duration)]
Network = ipaddress.IPv4Network | ipaddress.IPv6Network


def _split_hostport(value: str, what: str) -> tuple[str, int]:
    host, sep, port = value.rpartition(":")
    bracketed = host.startswith("[") or host.endswith("]")
    if (
        not sep
        or not (port.isascii() and port.isdigit())
        or not host
        or (bracketed and not (host.startswith("[") and host.endswith("]")))
    ):
        raise ValueError(f"{what} must be HOST:PORT, got {value!r}")
    number = int(port)
    if not 0 <= number <= 65535:
        raise ValueError(f"port {number} is out of range")
    return host.strip("[]"), number


def dialable_address(value: str) -> tuple[str, int]:
    """(host, port) of a `HOST:PORT` (`[v6]:PORT`) another gateway can dial: port 1-65535.

    Raises:
        ValueError: anything else (an address read from Redis is checked with this).
    """
    host, port = _split_hostport(value, "address")
    if port == 0:
        raise ValueError("port 0 cannot be dialled")
    return host, port


@dataclass(frozen=True)
class Address:
    """A host and port to listen on."""

    host: str
    port: int

    def __str__(self) -> str:
        return f"[{self.host}]:{self.port}" if ":" in self.host else f"{self.host}:{self.port}"


def _parse_address(value: object) -> Address:
    if isinstance(value, Address):
        return value
    if not isinstance(value, str):
        raise ValueError("expected 'HOST:PORT'")
    return Address(*_split_hostport(value, "listen address"))


ListenAddress = Annotated[Address, BeforeValidator(_parse_address)]


@dataclass(frozen=True)
class SerialUrl:
    """Where a VM's serial port is: a local tty, or a socket of the hypervisor."""

    kind: Literal["tty", "tcp", "telnet", "unix"]
    target: str  # device or socket path for tty/unix, host for tcp/telnet
    port: int = 0

    def __str__(self) -> str:
        if self.kind == "tty":
            return self.target
        if self.kind == "unix":
            return f"unix://{self.target}"
        host = f"[{self.target}]" if ":" in self.target else self.target
        return f"{self.kind}://{host}:{self.port}"

    @classmethod
    def parse(cls, value: str) -> SerialUrl:
        """Parse a `serial =` value.

        Raises:
            ValueError: not a tty path nor a tcp://, telnet:// or unix:// URL.
        """
        if value.startswith("/"):
            return cls("tty", value)
        scheme, sep, rest = value.partition("://")
        if not sep:
            raise ValueError(
                f"expected a device path or tcp://, telnet://, unix:// URL, got {value!r}"
            )
        if scheme == "unix":
            if not rest.startswith("/"):
                raise ValueError("unix:// needs an absolute socket path (unix:///run/vm.sock)")
            return cls("unix", rest)
        if scheme in ("tcp", "telnet"):
            host, port = _split_hostport(rest, f"{scheme}:// URL")
            if port == 0:
                raise ValueError("port 0 is not a serial endpoint")
            return cls("tcp" if scheme == "tcp" else "telnet", host, port)
        raise ValueError(f"unknown scheme {scheme!r}: use tcp, telnet or unix")


def _parse_serial(value: object) -> SerialUrl:
    if isinstance(value, SerialUrl):
        return value
    if not isinstance(value, str):
        raise ValueError("expected a string")
    return SerialUrl.parse(value)


class _Model(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid", arbitrary_types_allowed=True)


class GatewayConfig(_Model):
    """`[gateway]`: where relayd listens and whom it trusts at the network level."""

    region: str = "local"
    listen: ListenAddress = Address("0.0.0.0", 443)  # noqa: S104 - a gateway listens publicly
    health_listen: ListenAddress | None = Address("127.0.0.1", 9100)
    state_dir: Path = Path("/var/lib/relayd")
    trusted_proxies: tuple[Network, ...] = ()
    allow_clients: tuple[Network, ...] = (
        ipaddress.ip_network("0.0.0.0/0"),
        ipaddress.ip_network("::/0"),
    )
    allowed_origins: tuple[str, ...] | None = None  # None: the gateway's own origin
    handshake_timeout: PositiveDuration = 10.0
    drain_seconds: PositiveDuration = 10.0
    ready_requires_port: bool = False

    @field_validator("trusted_proxies", "allow_clients", mode="before")
    @classmethod
    def _networks(cls, value: object) -> object:
        if isinstance(value, list | tuple):
            return tuple(ipaddress.ip_network(str(v), strict=False) for v in value)
        return value


class TlsConfig(_Model):
    """`[tls]`: the server certificate and the version floor."""

    cert: Path
    key: Path
    min_version: Literal["1.2", "1.3"] = "1.2"
    client_ca: Path | None = None
    # PEM CRLs of the CAs that issue client and gateway certificates (revocation.py).
    crl: Path | None = None


# Clock skew tolerated on `exp`/`nbf`: more keeps an expired (or revoked) token usable.
MAX_LEEWAY_SECONDS = 300.0


class AuthConfig(_Model):
    """`[auth]`: which tokens are accepted.

    The HS256 secret is a development key: anyone who reads it (a laptop, a CI
    log) mints tokens for any principal. Beside a production JWKS it would be a
    second, weaker way in, so both at once need `allow_dev_tokens = true`.
    """

    issuer: str
    audience: str
    jwks_file: Path | None = None
    # Declared before hs256_secret_file: its validator reads both (pydantic's field order).
    allow_dev_tokens: bool = False
    hs256_secret_file: Path | None = None
    require_mfa: bool = False
    leeway: PositiveDuration = 60.0
    # Like Teleport's disconnect_expired_cert: a session ends (4003) when the token or
    # client certificate that opened it expires. Off: a session outlives its credentials.
    disconnect_expired: bool = False

    @field_validator("hs256_secret_file")
    @classmethod
    def _no_dev_secret_beside_jwks(cls, value: Path | None, info: ValidationInfo) -> Path | None:
        if (
            value is not None
            and info.data.get("jwks_file") is not None
            and not info.data.get("allow_dev_tokens")
        ):
            raise ValueError(
                "the HS256 development secret is refused beside a production jwks_file "
                "(anyone holding it can mint tokens); remove it, or set "
                "allow_dev_tokens = true to accept both on purpose"
            )
        return value

    @field_validator("leeway")
    @classmethod
    def _bounded_leeway(cls, value: float) -> float:
        if value > MAX_LEEWAY_SECONDS:
            raise ValueError(
                f"leeway {value:g}s exceeds the maximum of {MAX_LEEWAY_SECONDS:g}s (5 minutes)"
            )
        return value

    @model_validator(mode="after")
    def _one_key_source(self) -> AuthConfig:
        if self.jwks_file is None and self.hs256_secret_file is None:
            raise ValueError("set jwks_file (production) or hs256_secret_file (development)")
        return self


class LimitsConfig(_Model):
    """`[limits]`: every bound a client can run into."""

    max_paste_bytes: int = Field(65536, ge=1, le=16 * 2**20)
    output_bytes_per_s: int | None = Field(1048576, ge=1024)
    idle_timeout: Duration = 1800.0
    idle_warning: PositiveDuration = 60.0
    max_session_seconds: Duration = None
    replay_bytes: int = Field(16384, ge=0)
    console_log_bytes: int = Field(1048576, ge=4096)
    output_queue_bytes: int = Field(262144, ge=4096)
    output_buffer_bytes: int = Field(1048576, ge=4096)
    keepalive_interval: PositiveDuration = 20.0
    max_sessions: int | None = Field(None, ge=1)
    # Finite by default: one principal (a leaked token, a script) cannot take the gateway.
    max_sessions_per_principal: int | None = Field(10, ge=1)
    # 0 turns a limit off (TOML has no null to write).
    auth_failures_per_minute: int = Field(10, ge=0)
    connections_per_second_per_ip: int = Field(20, ge=0)
    # Connections between accept and the end of their TLS handshake; past these, new
    # ones are closed at accept, before any TLS work (per address: IPv4, or IPv6 /64).
    max_handshakes: int = Field(1024, ge=0)
    max_handshakes_per_ip: int = Field(32, ge=0)

    @model_validator(mode="after")
    def _replay_fits(self) -> LimitsConfig:
        if self.replay_bytes > self.console_log_bytes:
            raise ValueError(
                f"replay_bytes {self.replay_bytes} exceeds console_log_bytes "
                f"{self.console_log_bytes}"
            )
        return self


# A subscription, resource group or scale set name is one segment of a scope path and of
# a switch route: a "/" in it would let two different resources spell the same scope.
NAME_PATTERN = r"^[^/]+$"


class SubscriptionConfig(_Model):
    """`[[subscriptions]]`: a tenant, with its console switch."""

    id: str = Field(min_length=1, pattern=NAME_PATTERN)
    serial_console: bool = True
    require_mfa: bool = False


OnDetach = Literal["none", "hangup"] | bytes


def _parse_on_detach(value: object) -> object:
    if isinstance(value, str) and value.startswith("send:"):
        text = value[len("send:") :]
        try:
            decoded = codecs.decode(text, "unicode_escape")
            data = decoded.encode("latin-1")
        except (UnicodeDecodeError, UnicodeEncodeError) as exc:
            raise ValueError(f"send: bytes must be latin-1 with \\x escapes ({exc})") from None
        if not data:
            raise ValueError("send: needs at least one byte")
        return data
    if value in ("none", "hangup") or isinstance(value, bytes):
        return value
    raise ValueError("must be 'none', 'hangup' or 'send:<bytes>'")


class VmConfig(_Model):
    """`[[vms]]`: one console and how to reach its serial port."""

    id: str = Field(min_length=1, pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")
    subscription: str
    resource_group: str | None = Field(None, pattern=NAME_PATTERN)
    scale_set: str | None = Field(None, pattern=NAME_PATTERN)
    serial: Annotated[SerialUrl, BeforeValidator(_parse_serial)]
    baud: int = Field(115200, ge=50, le=4_000_000)
    parity: Literal["none", "even", "odd"] = "none"
    takeover: Literal["evict", "demote", "deny"] = "evict"
    on_detach: Annotated[OnDetach, BeforeValidator(_parse_on_detach)] = "none"
    input_bytes_per_s: int | None = Field(None, ge=1)
    serial_console: bool = True
    break_command: tuple[str, ...] | None = None
    nmi_command: tuple[str, ...] | None = None
    reset_command: tuple[str, ...] | None = None

    @field_validator("break_command", "nmi_command", "reset_command")
    @classmethod
    def _argv(cls, value: tuple[str, ...] | None) -> tuple[str, ...] | None:
        if value is not None and not value:
            raise ValueError("an argv list needs at least the program")
        return value

    @property
    def input_rate(self) -> int:
        """Bytes per second the serial line takes: 10 bits per byte on the wire."""
        return self.input_bytes_per_s or max(1, self.baud // 10)

    @property
    def scale_set_ref(self) -> tuple[str, str, str] | None:
        """(subscription, resource group, name) of the VM's scale set; None outside one.

        All three name a scale set: two resource groups may each hold one called `web`.
        """
        if self.scale_set is None or self.resource_group is None:
            return None  # the config refuses a scale set without a resource group
        return (self.subscription, self.resource_group, self.scale_set)

    @property
    def scope(self) -> str:
        """The VM's own RBAC scope."""
        return f"/subscriptions/{self.subscription}/vms/{self.id}"


Role = Literal["reader", "contributor", "owner"]


class RoleAssignment(_Model):
    """`[[role_assignments]]`: a principal gets a role on a scope."""

    principal: str = Field(pattern=r"^(user|group|cert):.+$")
    role: Role
    scope: str = Field(pattern=r"^/subscriptions/[^/]+(/.*)?$")


_GATEWAY_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,62}$")
MIN_LEASE_TTL = 1.0
MAX_LEASE_TTL = 60.0


def _check_redis_url(value: object) -> object:
    """Accept redis://, rediss:// and unix:// URLs; never echo the URL (it may hold a password)."""
    if not isinstance(value, str):
        return value
    try:
        url = urlsplit(value)
        port = url.port
    except ValueError:
        raise ValueError("not a valid URL (the port must be a number 0..65535)") from None
    query = dict(parse_qsl(url.query, keep_blank_values=True))
    if url.scheme in ("redis", "rediss"):
        if not url.hostname:
            raise ValueError(f"{url.scheme}:// needs a host ({url.scheme}://HOST:PORT/DB)")
        if port == 0:
            raise ValueError("port 0 is not a Redis server")
        db = url.path.strip("/") or "0"
    elif url.scheme == "unix":
        # Credentials of a Redis ACL user may come before the path (unix://user:pw@/path).
        if not url.path.startswith("/") or url.netloc.rpartition("@")[2]:
            raise ValueError(
                "unix:// needs an absolute socket path (unix:///run/redis.sock?db=0, "
                "unix://USER:PASSWORD@/run/redis.sock?db=0)"
            )
        db = query.get("db", "0")
    else:
        raise ValueError("must be a redis://, rediss:// or unix:// URL")
    if not (db.isascii() and db.isdigit()) or int(db) > 65535:
        raise ValueError("the database must be a number (redis://HOST:PORT/0, unix:///x?db=0)")
    unknown = sorted(set(query) - {"db"})
    if unknown:
        raise ValueError(f"unknown URL parameter {unknown[0]!r} (only db is taken)")
    if url.fragment:
        raise ValueError("a Redis URL takes no #fragment")
    return value


def _read_password(path: Path) -> str:
    """A password file's text, less the line end an editor adds.

    Raises:
        ValueError: it cannot be read, is not UTF-8, or is empty.
    """
    try:
        password = path.read_text(encoding="utf-8").rstrip("\r\n")
    except OSError as exc:
        raise ValueError(f"cannot read {path}: {exc.strerror}") from None
    except UnicodeDecodeError:
        raise ValueError(f"{path} is not UTF-8 text") from None
    if not password:
        raise ValueError(f"{path} is empty")
    return password


def redact_url(value: str) -> str:
    """The URL with any password replaced by ``***``: safe to print or log."""
    url = urlsplit(value)
    if url.password is None:
        return value
    user = url.username or ""
    host = url.netloc.rpartition("@")[2]
    return url._replace(netloc=f"{user}:***@{host}").geturl()


class ClusterConfig(_Model):
    """`[cluster]`: this gateway is one of several serving the region, coordinated in Redis."""

    redis: Annotated[str, BeforeValidator(_check_redis_url)] = Field(repr=False)  # password
    gateway_id: str = Field(default_factory=lambda: platform.node(), validate_default=True)
    advertise: ListenAddress
    peer_ca: Path
    lease_ttl: PositiveDuration = 3.0
    # rediss:// only. A Redis inside the region usually has a private CA, and one that
    # takes writes only from the gateways asks them for a certificate (tls-auth-clients).
    redis_ca: Path | None = None
    redis_cert: Path | None = None
    redis_key: Path | None = Field(default=None, validate_default=True)
    # The ACL user's password (the URL names the user), so the config itself holds no
    # secret: systemd's LoadCredential= puts it under $CREDENTIALS_DIRECTORY.
    redis_password_file: Path | None = None

    @field_validator("gateway_id")
    @classmethod
    def _gateway_id(cls, value: str) -> str:
        if not _GATEWAY_ID.match(value):
            raise ValueError(
                f"{value!r} is not a usable gateway id: 1-63 letters, digits, '.', '_' or '-', "
                "starting with a letter or digit (the default is the host name; set gateway_id)"
            )
        return value

    @field_validator("advertise")
    @classmethod
    def _advertise(cls, value: Address) -> Address:
        if value.port == 0:
            raise ValueError("port 0 cannot be reached by the other gateways")
        if value.host in ("0.0.0.0", "::", ""):  # noqa: S104 - refusing it, not binding it
            raise ValueError(
                f"{value.host!r} is a wildcard: advertise the address the other gateways reach"
            )
        return value

    @field_validator("peer_ca")
    @classmethod
    def _peer_ca(cls, value: Path) -> Path:
        if not value.is_file():
            raise ValueError(f"{value} does not exist or is not a file")
        return value

    @field_validator("lease_ttl")
    @classmethod
    def _lease_ttl(cls, value: float) -> float:
        if not MIN_LEASE_TTL <= value <= MAX_LEASE_TTL:
            raise ValueError(
                f"lease_ttl {value:g}s is out of range {MIN_LEASE_TTL:g}s..{MAX_LEASE_TTL:g}s"
            )
        return value

    @field_validator("redis_ca", "redis_cert", "redis_key")
    @classmethod
    def _redis_tls_file(cls, value: Path | None, info: ValidationInfo) -> Path | None:
        if info.field_name == "redis_key" and (value is None) != (
            info.data.get("redis_cert") is None
        ):
            raise ValueError("redis_cert and redis_key go together (the client certificate)")
        if value is None:
            return value
        if not value.is_file():
            raise ValueError(f"{value} does not exist or is not a file")
        redis = info.data.get("redis")
        if isinstance(redis, str) and urlsplit(redis).scheme != "rediss":
            raise ValueError("needs a rediss:// URL (TLS to Redis)")
        return value

    @field_validator("redis_password_file")
    @classmethod
    def _redis_password_file(cls, value: Path | None, info: ValidationInfo) -> Path | None:
        if value is None:
            return value
        redis = info.data.get("redis")
        if isinstance(redis, str) and urlsplit(redis).password is not None:
            raise ValueError("the redis URL holds a password too: keep one of the two")
        _read_password(value)  # now, rather than at the first connection
        return value

    def redis_password(self) -> str | None:
        """The password from `redis_password_file` (None: none, or the URL's).

        Raises:
            ValueError: the file cannot be read, is empty, or is not UTF-8 text.
        """
        return (
            None if self.redis_password_file is None else _read_password(self.redis_password_file)
        )

    @property
    def redis_display(self) -> str:
        """The Redis URL without its password, for logs and `check-config`."""
        return redact_url(self.redis)


class Config(_Model):
    """The whole file; cross-references checked after the parts."""

    path: Path
    gateway: GatewayConfig = GatewayConfig()
    tls: TlsConfig
    auth: AuthConfig
    limits: LimitsConfig = LimitsConfig()
    subscriptions: tuple[SubscriptionConfig, ...] = ()
    vms: tuple[VmConfig, ...] = ()
    role_assignments: tuple[RoleAssignment, ...] = ()
    cluster: ClusterConfig | None = None  # None: a single gateway, no Redis

    def vm(self, vm_id: str) -> VmConfig | None:
        """The VM with this id, if configured."""
        for vm in self.vms:
            if vm.id == vm_id:
                return vm
        return None

    def subscription(self, sub_id: str) -> SubscriptionConfig | None:
        """The subscription with this id, if configured."""
        for sub in self.subscriptions:
            if sub.id == sub_id:
                return sub
        return None


def _check_references(cfg: Config) -> None:
    """Cross-checks pydantic cannot express; raise with the offending key."""
    path = str(cfg.path)
    if cfg.tls.crl is not None and cfg.tls.client_ca is None and cfg.cluster is None:
        raise ConfigError(
            path,
            "tls.crl",
            "no client certificate is verified without tls.client_ca or [cluster] peer_ca",
        )
    subs = [s.id for s in cfg.subscriptions]
    for i, sid in enumerate(subs):
        if subs.index(sid) != i:
            raise ConfigError(path, f"subscriptions[{i}].id", f"duplicate subscription {sid!r}")
    seen: set[str] = set()
    for i, vm in enumerate(cfg.vms):
        if vm.id in seen:
            raise ConfigError(path, f"vms[{i}].id", f"duplicate vm {vm.id!r}")
        seen.add(vm.id)
        if vm.subscription not in subs:
            raise ConfigError(
                path,
                f"vms[{i}].subscription",
                f"unknown subscription {vm.subscription!r} (add it under [[subscriptions]])",
            )
        if vm.scale_set is not None and vm.resource_group is None:
            raise ConfigError(path, f"vms[{i}].scale_set", "a scale set needs a resource_group")
    for i, ra in enumerate(cfg.role_assignments):
        if not _scope_exists(cfg, ra.scope):
            raise ConfigError(
                path,
                f"role_assignments[{i}].scope",
                f"scope {ra.scope!r} names no configured subscription, resource group, "
                "scale set or vm",
            )


def _scope_exists(cfg: Config, scope: str) -> bool:
    parts = scope.strip("/").split("/")
    for vm in cfg.vms:
        if scope in vm_scopes(vm):
            return True
    return len(parts) == 2 and cfg.subscription(parts[1]) is not None


def scale_set_scopes(subscription: str, resource_group: str, name: str) -> tuple[str, ...]:
    """Every scope that contains a scale set, widest first: the roles that govern it."""
    sub = f"/subscriptions/{subscription}"
    rg = f"{sub}/resourceGroups/{resource_group}"
    return (sub, rg, f"{rg}/virtualMachineScaleSets/{name}")


def vm_scopes(vm: VmConfig) -> tuple[str, ...]:
    """Every scope that contains this VM, widest first (the Azure hierarchy)."""
    sub = f"/subscriptions/{vm.subscription}"
    scopes = [sub]
    if vm.resource_group is not None:
        rg = f"{sub}/resourceGroups/{vm.resource_group}"
        scopes.append(rg)
        if vm.scale_set is not None:
            ss = f"{rg}/virtualMachineScaleSets/{vm.scale_set}"
            scopes.append(ss)
            scopes.append(f"{ss}/virtualMachines/{vm.id}")
        else:
            scopes.append(f"{rg}/providers/Microsoft.Compute/virtualMachines/{vm.id}")
    scopes.append(vm.scope)
    return tuple(scopes)


def _key(loc: tuple[int | str, ...]) -> str:
    key = ""
    for part in loc:
        if isinstance(part, int):
            key += f"[{part}]"
        elif not part.startswith(("function-", "literal[", "bytes", "is-instance")):
            key += f".{part}" if key else part
    return key


def _resolve(base: Path, raw: dict[str, Any], section: str, keys: tuple[str, ...]) -> None:
    table = raw.get(section)
    if not isinstance(table, dict):
        return
    for key in keys:
        value = table.get(key)
        if isinstance(value, str) and value:
            table[key] = str(base / Path(value).expanduser())


def parse_config(raw: dict[str, Any], path: Path) -> Config:
    """Validate an already-parsed TOML document.

    Raises:
        ConfigError: naming the file, the first bad key and what is wrong.
    """
    raw = {k: (dict(v) if isinstance(v, dict) else v) for k, v in raw.items()}
    base = path.parent
    _resolve(base, raw, "tls", ("cert", "key", "client_ca"))
    _resolve(base, raw, "auth", ("jwks_file", "hs256_secret_file"))
    _resolve(base, raw, "gateway", ("state_dir",))
    _resolve(
        base,
        raw,
        "cluster",
        ("peer_ca", "redis_ca", "redis_cert", "redis_key", "redis_password_file"),
    )
    if "path" in raw:
        raise ConfigError(str(path), "path", "unknown key")
    try:
        cfg = Config.model_validate({**raw, "path": path})
    except ValidationError as exc:
        first = exc.errors()[0]
        key = _key(tuple(first["loc"]))
        message = first["msg"].removeprefix("Value error, ")
        if first["type"] == "extra_forbidden":
            message = "unknown key"
        elif first["type"] == "missing":
            message = "required key is missing"
        more = len(exc.errors()) - 1
        if more:
            message += f" (and {more} more error{'s' if more > 1 else ''})"
        raise ConfigError(str(path), key, message) from None
    _check_references(cfg)
    return cfg


def load_config(path: Path | str) -> Config:
    """Read and validate a config file.

    Raises:
        ConfigError: the file is unreadable, not TOML, or not a valid config.
    """
    path = Path(path)
    try:
        raw = tomllib.loads(path.read_text(encoding="utf-8"))
    except OSError as exc:
        raise ConfigError(str(path), "", f"cannot read: {exc.strerror}") from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(str(path), "", f"not valid TOML: {exc}") from None
    except UnicodeDecodeError:
        raise ConfigError(str(path), "", "not UTF-8 text") from None
    return parse_config(raw, path.resolve())
