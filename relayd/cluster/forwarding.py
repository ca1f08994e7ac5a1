"""The forwarded console upgrade: what a gateway tells a VM's owner about a client.

In cluster mode a client may reach any gateway. When the VM's port is owned
by another gateway, the gateway the client reached (the *receiving* gateway)
authenticates and authorizes the client itself, then opens a peer link to
the owner (peerlink.py) and sends this module's request on it: the client's
own WebSocket handshake plus `Relayd-Forwarded-*` headers that say who the
client is and what it was granted. The owner answers with its own 101 (or a
refusal, such as 409 for takeover `deny`) and from then on the receiving
gateway only relays bytes, so the owner's session speaks to the client
directly: hello, offsets, notices and close codes are the owner's.

The request, exactly::

    GET /v1/vms/vm-a/console HTTP/1.1
    Host: ...                           } the client's own, from PASSED_HEADERS only:
    Upgrade: websocket                  } the WebSocket handshake, Origin, User-Agent
    Sec-WebSocket-Key: ...              }
    Relayd-Forwarded-Version: 1
    Relayd-Forwarded-Principal: user%3Aalice
    Relayd-Forwarded-Groups: group%3Aops,group%3Adev     (absent when there are none)
    Relayd-Forwarded-Amr: pwd,mfa                        (absent when there are none)
    Relayd-Forwarded-Role: contributor
    Relayd-Forwarded-Mode: interactive
    Relayd-Forwarded-From: 1234                          (absent without ?from=)
    Relayd-Forwarded-For: 203.0.113.7
    Relayd-Forwarded-Session: 9f86d081884c7d65
    Relayd-Forwarded-Expires: 1765000000                 (absent unless the credentials expire)
    Relayd-Forwarded-Age: 95250                          } a session that moves: its clocks
    Relayd-Forwarded-Idle: 4125                          } (absent for a new session)
    Relayd-Forwarded-Warned: 2040                        (absent unless warned since idle)

- Every client header not in `PASSED_HEADERS` is dropped: a client's own
  `Relayd-Forwarded-*` headers never reach the owner, nor do `Authorization`,
  cookies, or `Content-Length`/`Transfer-Encoding` (which could smuggle a
  second request into what becomes a raw byte relay).
- Only the path travels, never the query: `mode` and `from` are in the
  headers, and a redeemed ticket has no business on another machine.
- Strings are percent-encoded UTF-8 (unreserved characters stay as they are,
  lone surrogates pass as PyJWT can produce them), lists are comma-separated
  encoded items; the encoding is canonical, so decoding is strict and
  encode/decode is a bijection (property-tested).
- A session's clocks cross machines as **elapsed milliseconds**, never as
  monotonic or wall-clock times: `Age` since the session started, `Idle`
  since its client last acted, each measured by the sending gateway on its
  own monotonic clock when it encodes the request, and subtracted from the
  owner's monotonic clock when it admits it (`SessionClocks`). So no two
  gateways' clocks need agree; the request's transit (one peer-link round
  trip) is the only error, and rounding up never gives a session time.
  `Warned` is the time since the client's last `idle_warning`, so the new
  owner sends none again for the same idle period (`SessionClocks.warned`).
  (`Expires` is the credentials' own wall-clock time, from the token.)
- Sizes are capped on both sides: a value at `MAX_VALUE_BYTES`, the whole
  head at `MAX_HEAD_BYTES` (the owner's own request-head cap).
- A `Relayd-Forwarded-*` header the owner does not know is ignored, so that a
  region mid-way through a rolling upgrade keeps moving sessions between old
  and new gateways: a newer gateway may add advisory headers (as `Warned` was
  added). A header that narrows what a session may do must never be added so:
  it comes with a new `Relayd-Forwarded-Version`, which an older owner refuses.

The owner must honour these headers only on a connection whose client
certificate is a gateway's (`peerlink.PeerTrust.gateway_identity`); from
anyone else a request that carries one is refused (`has_forwarded_headers`).

`parse_response_head` reads the owner's answer with a size cap and tells the
caller how long its body is; no I/O here.
"""

from __future__ import annotations

import ipaddress
import math
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Literal, get_args
from urllib.parse import quote, unquote

from ..config import Role
from ..errors import (
    ForwardedRequestError,
    ForwardedRequestTooLargeError,
    PeerLinkError,
)

__all__ = [
    "FORWARDED_PREFIX",
    "MAX_HEAD_BYTES",
    "MAX_OFFSET",
    "MAX_RESPONSE_BODY_BYTES",
    "MAX_RESPONSE_HEAD_BYTES",
    "MAX_VALUE_BYTES",
    "PASSED_HEADERS",
    "ForwardedRequestError",
    "ForwardedSession",
    "Mode",
    "PeerLinkError",
    "ResponseHead",
    "SessionClocks",
    "encode_forwarded_request",
    "has_forwarded_headers",
    "parse_forwarded_headers",
    "parse_response_head",
]

Mode = Literal["interactive", "spectate"]

FORWARDED_PREFIX = "relayd-forwarded-"
VERSION = "1"

#: One forwarded header's value, encoded (a principal with a few hundred groups fits).
MAX_VALUE_BYTES = 8192
#: The whole forwarded request head: the owner's h11 refuses a longer one.
MAX_HEAD_BYTES = 16384
#: The owner's answer: a head, and for a refusal its JSON body.
MAX_RESPONSE_HEAD_BYTES = 16384
MAX_RESPONSE_BODY_BYTES = 65536
#: A byte offset fits a signed 64-bit integer (19 digits), as everywhere in relayd.
MAX_OFFSET = 2**63 - 1
MAX_SESSION_ID_LENGTH = 64

#: The client headers that travel to the owner (lower case), in the client's order.
PASSED_HEADERS = frozenset(
    {
        "host",
        "upgrade",
        "connection",
        "sec-websocket-key",
        "sec-websocket-version",
        "sec-websocket-protocol",
        "sec-websocket-extensions",
        "origin",
        "user-agent",
    }
)

_VERSION = "Relayd-Forwarded-Version"
_PRINCIPAL = "Relayd-Forwarded-Principal"
_GROUPS = "Relayd-Forwarded-Groups"
_AMR = "Relayd-Forwarded-Amr"
_ROLE = "Relayd-Forwarded-Role"
_MODE = "Relayd-Forwarded-Mode"
_FROM = "Relayd-Forwarded-From"
_FOR = "Relayd-Forwarded-For"
_SESSION = "Relayd-Forwarded-Session"
_EXPIRES = "Relayd-Forwarded-Expires"
_AGE = "Relayd-Forwarded-Age"
_IDLE = "Relayd-Forwarded-Idle"
_WARNED = "Relayd-Forwarded-Warned"
_KNOWN = {name.lower(): name for name in (_VERSION, _PRINCIPAL, _GROUPS, _AMR, _ROLE, _MODE)}
_KNOWN |= {name.lower(): name for name in (_FROM, _FOR, _SESSION, _EXPIRES, _AGE, _IDLE)}
_KNOWN[_WARNED.lower()] = _WARNED

_ENCODED = re.compile(r"(?:[A-Za-z0-9_.~-]|%[0-9A-F]{2})*")
# What api.open_console makes (secrets.token_hex), and all a session can read: it takes
# its keepalive spread from the first hex digits.
_SESSION_ID = re.compile(r"[0-9a-f]+")
_OFFSET = re.compile(r"0|[1-9][0-9]{0,18}")
_TOKEN = re.compile(r"[!#$%&'*+.^_`|~0-9A-Za-z-]+")
_FIELD_VALUE = re.compile(r"[\t\x20-\x7e\x80-\xff]*")
_PATH = re.compile(r"/[\x21-\x7e]*")
_STATUS_LINE = re.compile(rb"HTTP/1\.1 ([1-5][0-9]{2})(?: [\t\x20-\x7e\x80-\xff]*)?")


@dataclass(frozen=True)
class SessionClocks:
    """When a session started and when its client last acted, on this host's monotonic clock.

    They travel with the session when it moves (to another gateway, or between
    a relay and a session here), so `[limits] max_session_seconds`, `idle_timeout`
    and the idle warning count from the session's real start and last activity:
    a move never gives a session more time. Between gateways they travel as
    elapsed milliseconds (`elapsed_ms`, `from_elapsed_ms`): monotonic clocks do
    not cross machines, and wall clocks would add the hosts' skew.

    `warned` is when the client was last sent an `idle_warning` (None: not
    known to have been), so that it gets one per idle period, not one per
    owner: a session decides with `warned_since_active` whether that warning
    was this idle period's.
    """

    started: float
    last_active: float
    warned: float | None = None

    def elapsed_ms(self, now: float) -> tuple[int, int]:
        """(age, idle) in whole milliseconds as of `now`, rounded up (never a gift of time)."""
        return _ceil_ms(now - self.started), _ceil_ms(now - self.last_active)

    def warned_ms(self, now: float) -> int | None:
        """Milliseconds since the idle warning as of `now`, rounded up; None: no warning."""
        return None if self.warned is None else _ceil_ms(now - self.warned)

    @classmethod
    def from_elapsed_ms(
        cls, now: float, age_ms: int, idle_ms: int, warned_ms: int | None = None
    ) -> SessionClocks:
        """The clocks of a session `age_ms` old and idle for `idle_ms`, as of `now`.

        Idle longer than the session's age is capped at its age (it was idle since it began).
        """
        warned = None if warned_ms is None else now - min(warned_ms, age_ms) / 1000
        return cls(now - age_ms / 1000, now - min(idle_ms, age_ms) / 1000, warned)


def _ceil_ms(seconds: float) -> int:
    return max(0, min(MAX_OFFSET, math.ceil(seconds * 1000)))


@dataclass(frozen=True)
class ForwardedSession:
    """What the receiving gateway decided about a client, for the owner to act on.

    Attributes:
        principal: the authenticated principal's id (`user:alice`, `cert:ops-1`).
        role: the role the receiving gateway granted on this VM.
        mode: what the client asked for (a reader asking `interactive` still
            spectates: the owner decides writer or spectator from role and mode).
        client_peer: the client's real address (behind the load balancer), for
            audit events; a canonical IP address.
        session_id: the receiving gateway's session id; the owner uses it, so
            both gateways' logs and the client's `hello` name the same session.
        groups: the principal's groups (`group:ops`), possibly empty.
        amr: the authentication methods of its token (`mfa`), possibly empty.
        resume_from: the client's `?from=` offset, or None.
        expires: wall-clock seconds when the credentials stop being valid, or None.
        age_ms, idle_ms: a moving session's clocks (`SessionClocks.elapsed_ms`): the
            owner continues them; None for a new session (its clocks start at the owner).
        warned_ms: how long ago the moving session's client was sent an `idle_warning`
            (`SessionClocks.warned_ms`); None: not since it last acted, as far as known.

    Raises:
        ValueError: a field is out of its range (the message says which).
    """

    principal: str
    role: Role
    mode: Mode
    client_peer: str
    session_id: str
    groups: tuple[str, ...] = ()
    amr: tuple[str, ...] = ()
    resume_from: int | None = None
    expires: int | None = None
    age_ms: int | None = None
    idle_ms: int | None = None
    warned_ms: int | None = None

    def __post_init__(self) -> None:
        if not isinstance(self.principal, str) or not self.principal:
            raise ValueError("principal must be a non-empty string")
        if self.role not in get_args(Role):
            raise ValueError(f"role must be one of {', '.join(get_args(Role))}, not {self.role!r}")
        if self.mode not in get_args(Mode):
            raise ValueError(f"mode must be interactive or spectate, not {self.mode!r}")
        try:
            canonical = str(ipaddress.ip_address(self.client_peer))
        except ValueError:
            canonical = None
        if canonical != self.client_peer:
            raise ValueError(f"client_peer must be an IP address, not {self.client_peer!r:.64}")
        if (
            not isinstance(self.session_id, str)
            or len(self.session_id) > MAX_SESSION_ID_LENGTH
            or not _SESSION_ID.fullmatch(self.session_id)
        ):
            raise ValueError(f"session_id must be 1-{MAX_SESSION_ID_LENGTH} lower-case hex digits")
        for name, items in (("groups", self.groups), ("amr", self.amr)):
            if not isinstance(items, tuple) or not all(isinstance(i, str) for i in items):
                raise ValueError(f"{name} must be a tuple of strings")
        if self.expires is not None and (
            isinstance(self.expires, bool)
            or not isinstance(self.expires, int)
            or not 0 <= self.expires <= MAX_OFFSET
        ):
            # Bounded as the parser bounds it: what is encoded is always accepted.
            raise ValueError(f"expires must be whole seconds 0..{MAX_OFFSET}, or None")
        for name, ms in (
            ("age_ms", self.age_ms),
            ("idle_ms", self.idle_ms),
            ("warned_ms", self.warned_ms),
        ):
            if ms is not None and (
                isinstance(ms, bool) or not isinstance(ms, int) or not 0 <= ms <= MAX_OFFSET
            ):
                raise ValueError(f"{name} must be milliseconds 0..{MAX_OFFSET}, or None")
        if self.resume_from is not None and (
            isinstance(self.resume_from, bool)
            or not isinstance(self.resume_from, int)
            or not 0 <= self.resume_from <= MAX_OFFSET
        ):
            raise ValueError(f"resume_from must be an offset 0..{MAX_OFFSET}, or None")


@dataclass(frozen=True)
class ResponseHead:
    """The owner's answer to a forwarded request, as far as the relay needs it.

    Attributes:
        status: the HTTP status (101 when the owner accepted the session).
        length: bytes of the head, blank line included; the caller passes
            exactly these to the client, verbatim.
        content_length: the body that follows a refusal (0 for a 101).
    """

    status: int
    length: int
    content_length: int


def has_forwarded_headers(headers: Mapping[str, str] | Iterable[tuple[str, str]]) -> bool:
    """Whether a request carries any `Relayd-Forwarded-*` header (in any letter case).

    The owner refuses such a request unless the connection is a gateway's.
    """
    pairs = headers.items() if isinstance(headers, Mapping) else headers
    return any(name.lower().startswith(FORWARDED_PREFIX) for name, _ in pairs)


def encode_forwarded_request(
    path: str, client_headers: Iterable[tuple[str, str]], fwd: ForwardedSession
) -> bytes:
    """The request head the receiving gateway sends to the owner.

    Args:
        path: the console path the client asked for, without the query
            (`/v1/vms/vm-a/console`).
        client_headers: the client's request headers as (name, value) pairs,
            in order; only `PASSED_HEADERS` are kept (so a client's own
            `Relayd-Forwarded-*` headers are dropped here).
        fwd: what the receiving gateway decided.

    Returns:
        The head, ending with the blank line; the request has no body.

    Raises:
        ValueError: the path is not an origin-form path without a query, a
            header value holds a control character, or there is no `Host`
            (all impossible for a request that h11 parsed).
        ForwardedRequestError: (431) the principal's names make a value longer
            than `MAX_VALUE_BYTES` or the head longer than `MAX_HEAD_BYTES`.
    """
    if not _PATH.fullmatch(path) or "?" in path or "#" in path:
        raise ValueError(f"path must be an origin-form path without a query, not {path!r:.80}")
    lines = [f"GET {path} HTTP/1.1"]
    has_host = False
    for name, value in client_headers:
        lower = name.lower()
        if lower not in PASSED_HEADERS:
            continue
        if not _FIELD_VALUE.fullmatch(value):
            raise ValueError(f"header {name!r} holds a control character")
        has_host |= lower == "host"
        lines.append(f"{name}: {value}")
    if not has_host:
        raise ValueError("the client request has no Host header")
    for name, value in _forwarded_values(fwd):
        if len(value) > MAX_VALUE_BYTES:
            raise ForwardedRequestTooLargeError(
                f"{name} would be {len(value)} bytes, over {MAX_VALUE_BYTES}"
            )
        lines.append(f"{name}: {value}")
    head = ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1")
    if len(head) > MAX_HEAD_BYTES:
        raise ForwardedRequestTooLargeError(
            f"forwarded request head would be {len(head)} bytes, over {MAX_HEAD_BYTES}"
        )
    return head


def _forwarded_values(fwd: ForwardedSession) -> list[tuple[str, str]]:
    values = [(_VERSION, VERSION), (_PRINCIPAL, _encode(fwd.principal))]
    if fwd.groups:
        values.append((_GROUPS, ",".join(_encode(g) for g in fwd.groups)))
    if fwd.amr:
        values.append((_AMR, ",".join(_encode(a) for a in fwd.amr)))
    values += [(_ROLE, fwd.role), (_MODE, fwd.mode)]
    if fwd.resume_from is not None:
        values.append((_FROM, str(fwd.resume_from)))
    values += [(_FOR, fwd.client_peer), (_SESSION, fwd.session_id)]
    if fwd.expires is not None:
        values.append((_EXPIRES, str(fwd.expires)))
    if fwd.age_ms is not None:
        values.append((_AGE, str(fwd.age_ms)))
    if fwd.idle_ms is not None:
        values.append((_IDLE, str(fwd.idle_ms)))
    if fwd.warned_ms is not None:
        values.append((_WARNED, str(fwd.warned_ms)))
    return values


def parse_forwarded_headers(
    headers: Mapping[str, str] | Iterable[tuple[str, str]],
) -> ForwardedSession:
    """The forwarded session a request describes (on the owner, for a gateway's request).

    Args:
        headers: the request's headers, as (name, value) pairs (preferred: a
            repeated forwarded header is then refused) or a mapping; names
            in any letter case. Headers other than `Relayd-Forwarded-*` are
            ignored.

    Raises:
        ForwardedRequestError: (400) a forwarded header is repeated, missing, too
            long or not in the format; the message names it. One this gateway does
            not know is ignored (rolling upgrades).
    """
    pairs = headers.items() if isinstance(headers, Mapping) else headers
    found: dict[str, str] = {}
    for name, value in pairs:
        lower = name.lower()
        if not lower.startswith(FORWARDED_PREFIX):
            continue
        canonical = _KNOWN.get(lower)
        if canonical is None:
            continue  # a newer gateway's advisory header (see the module docstring)
        if canonical in found:
            raise ForwardedRequestError(f"{canonical} appears more than once")
        if len(value) > MAX_VALUE_BYTES:
            raise ForwardedRequestError(
                f"{canonical} is {len(value)} bytes, over {MAX_VALUE_BYTES}"
            )
        found[canonical] = value
    for required in (_VERSION, _PRINCIPAL, _ROLE, _MODE, _FOR, _SESSION):
        if required not in found:
            raise ForwardedRequestError(f"{required} is missing")
    if found[_VERSION] != VERSION:
        raise ForwardedRequestError(
            f"{_VERSION} {found[_VERSION][:16]!r} is not supported (this gateway speaks {VERSION})"
        )
    resume_from: int | None = None
    if _FROM in found:
        if not _OFFSET.fullmatch(found[_FROM]):
            raise ForwardedRequestError(f"{_FROM} must be a decimal offset of at most 19 digits")
        resume_from = int(found[_FROM])
    expires: int | None = None
    if _EXPIRES in found:
        if not _OFFSET.fullmatch(found[_EXPIRES]):
            raise ForwardedRequestError(f"{_EXPIRES} must be whole seconds since the epoch")
        expires = int(found[_EXPIRES])
    age_ms, idle_ms, warned_ms = (_milliseconds(found, header) for header in (_AGE, _IDLE, _WARNED))
    try:
        return ForwardedSession(
            principal=_decode(_PRINCIPAL, found[_PRINCIPAL]),
            role=found[_ROLE],  # type: ignore[arg-type]  # checked in __post_init__
            mode=found[_MODE],  # type: ignore[arg-type]
            client_peer=found[_FOR],
            session_id=found[_SESSION],
            groups=_decode_list(_GROUPS, found.get(_GROUPS)),
            amr=_decode_list(_AMR, found.get(_AMR)),
            resume_from=resume_from,
            expires=expires,
            age_ms=age_ms,
            idle_ms=idle_ms,
            warned_ms=warned_ms,
        )
    except ValueError as exc:
        raise ForwardedRequestError(f"forwarded session: {exc}") from None


def _milliseconds(found: Mapping[str, str], header: str) -> int | None:
    value = found.get(header)
    if value is None:
        return None
    if not _OFFSET.fullmatch(value):
        raise ForwardedRequestError(f"{header} must be whole milliseconds")
    return int(value)


def _encode(text: str) -> str:
    return quote(text, safe="", encoding="utf-8", errors="surrogatepass")


def _decode(name: str, value: str) -> str:
    """Strict percent-decoding: only the encoder's own (canonical) output is accepted."""
    if not _ENCODED.fullmatch(value):
        raise ForwardedRequestError(f"{name} is not percent-encoded")
    try:
        # surrogatepass: lone surrogates travel as their UTF-8 form; any other bad byte fails.
        text = unquote(value, encoding="utf-8", errors="surrogatepass")
    except UnicodeDecodeError:
        raise ForwardedRequestError(f"{name} is not UTF-8") from None
    if _encode(text) != value:
        raise ForwardedRequestError(f"{name} is not in canonical percent-encoding")
    return text


def _decode_list(name: str, value: str | None) -> tuple[str, ...]:
    if value is None:
        return ()
    return tuple(_decode(name, item) for item in value.split(","))


def parse_response_head(buf: bytes) -> ResponseHead | None:
    """The owner's response head at the start of `buf`, or None while it is incomplete.

    Raises:
        PeerLinkError: the head is longer than `MAX_RESPONSE_HEAD_BYTES`, is not
            HTTP/1.1, or (for a status other than 101) its body is not framed
            by one `Content-Length` of at most `MAX_RESPONSE_BODY_BYTES`.
    """
    end = buf.find(b"\r\n\r\n", 0, MAX_RESPONSE_HEAD_BYTES)
    if end < 0:
        if len(buf) >= MAX_RESPONSE_HEAD_BYTES:
            raise PeerLinkError(f"owner's response head exceeds {MAX_RESPONSE_HEAD_BYTES} bytes")
        return None
    status_line, *fields = buf[:end].split(b"\r\n")
    match = _STATUS_LINE.fullmatch(status_line)
    if match is None:
        raise PeerLinkError(f"owner's status line is not HTTP/1.1: {status_line[:40]!r}")
    status = int(match[1])
    lengths: list[bytes] = []
    for field in fields:
        name, colon, value = field.partition(b":")
        if not colon or not _TOKEN.fullmatch(name.decode("latin-1")):
            raise PeerLinkError(f"owner's response has a malformed header line {field[:40]!r}")
        lower = name.lower()
        if lower == b"transfer-encoding":
            raise PeerLinkError("owner's response uses Transfer-Encoding")
        if lower == b"content-length":
            lengths.append(value.strip(b" \t"))
    content_length = 0
    if status != 101:
        if len(lengths) != 1 or not re.fullmatch(rb"[0-9]{1,10}", lengths[0]):
            raise PeerLinkError(f"owner's {status} response has no single valid Content-Length")
        content_length = int(lengths[0])
        if content_length > MAX_RESPONSE_BODY_BYTES:
            raise PeerLinkError(
                f"owner's {status} response body of {content_length} bytes exceeds "
                f"{MAX_RESPONSE_BODY_BYTES}"
            )
    return ResponseHead(status=status, length=end + 4, content_length=content_length)
