"""Control messages of the ``relayd.console.v1`` WebSocket subprotocol.

Text frames carry one JSON object each. Client messages are decoded into
frozen dataclasses here, strictly: unknown types, missing or extra fields and
out-of-range values are a `BadMessageError` (the session answers
``bad_message`` and goes on). Server messages are encoded here so the wire
format lives in one file. No I/O.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

from .errors import BadMessageError

SUBPROTOCOL = "relayd.console.v1"
MAX_CONTROL_BYTES = 4096

# Close codes of the contract (docs/protocol.md, "Close codes"). The one source for them:
# relayd/client.py imports them, and scripts/gen-web-constants.py writes them (with
# SUBPROTOCOL) into web/src/protocol-constants.js for the page; a test compares the two.
CLOSE_NORMAL = 1000
CLOSE_GOING_AWAY = 1001
CLOSE_PROTOCOL_ERROR = 1002  # RFC 6455: a frame that breaks the protocol (websockets sends it)
CLOSE_ABNORMAL = 1006  # RFC 6455: never sent; a client's word for a connection that dropped
CLOSE_INVALID_DATA = 1007  # RFC 6455: a text message that is not UTF-8
CLOSE_MESSAGE_TOO_BIG = 1009  # RFC 6455: a message over the size limit (websockets sends it)
CLOSE_INTERNAL_ERROR = 1011
CLOSE_TAKEN_OVER = 4001
CLOSE_FORBIDDEN = 4003
CLOSE_UNKNOWN_VM = 4004
CLOSE_IDLE = 4008
CLOSE_DISABLED = 4009
CLOSE_SESSION_LIMIT = 4029

# What a client sends while its console moves waits for the new owner's port (held by the
# relay, or unread by the session that takes it here), at most this long once the new owner
# has the session: as long as the keeper waits for a port that takes no input (keeper.py's
# STALL_SECONDS). Past it the input is answered as any is with the port down (`port_down`):
# keys and SysRq typed into a console that is not back must not reach it much later.
MOVED_INPUT_WAIT = 5.0

# RFC 6455 5.5: a control frame carries at most 125 bytes; a Close spends 2 on its code.
MAX_CLOSE_REASON_BYTES = 123


def close_reason(text: str) -> str:
    """`text` as a Close frame can carry it: at most 123 bytes of UTF-8, cut between characters.

    Every close reason goes through here (it is often built from a principal's
    name, which may be long, wide, or not text at all: a JSON claim can carry a
    lone surrogate, which UTF-8 cannot encode and which becomes "?").
    """
    data = text.encode("utf-8", "replace")
    if len(data) <= MAX_CLOSE_REASON_BYTES:
        return data.decode("utf-8")
    # The cut may split the last character; "ignore" drops its incomplete bytes.
    return data[:MAX_CLOSE_REASON_BYTES].decode("utf-8", "ignore")


@dataclass(frozen=True)
class Break:
    """Send a serial BREAK."""


@dataclass(frozen=True)
class Sysrq:
    """BREAK then one key: Linux magic SysRq over a serial console."""

    key: str


@dataclass(frozen=True)
class Resize:
    """The client's terminal size; recorded, since a serial line cannot carry it."""

    cols: int
    rows: int


@dataclass(frozen=True)
class Nmi:
    """Run the VM's NMI hook."""


@dataclass(frozen=True)
class Reset:
    """Run the VM's reset hook."""


ClientMessage = Break | Sysrq | Resize | Nmi | Reset

_SYSRQ_KEYS = frozenset("0123456789abcdefghijklmnopqrstuvwxyz")


def _int_field(obj: dict[str, Any], name: str, low: int, high: int) -> int:
    value = obj.get(name)
    if not isinstance(value, int) or isinstance(value, bool) or not low <= value <= high:
        raise BadMessageError(f"{name} must be an integer from {low} to {high}")
    return value


def decode_client_message(text: str | bytes) -> ClientMessage:
    """Parse one text frame from a client.

    Raises:
        BadMessageError: not JSON, not an object, unknown type or bad fields.
    """
    if len(text) > MAX_CONTROL_BYTES:  # characters <= bytes: refuse without encoding
        raise BadMessageError(f"control message of {len(text)}+ bytes exceeds {MAX_CONTROL_BYTES}")
    size = len(text) if isinstance(text, bytes) else len(text.encode("utf-8", "surrogatepass"))
    if size > MAX_CONTROL_BYTES:
        raise BadMessageError(f"control message of {size} bytes exceeds {MAX_CONTROL_BYTES}")
    try:
        obj = json.loads(text)
    except (ValueError, RecursionError):
        raise BadMessageError("control message is not valid JSON") from None
    if not isinstance(obj, dict):
        raise BadMessageError("control message must be a JSON object")
    kind = obj.get("type")
    allowed: frozenset[str]
    message: ClientMessage
    if kind == "break":
        allowed, message = frozenset({"type"}), Break()
    elif kind == "nmi":
        allowed, message = frozenset({"type"}), Nmi()
    elif kind == "reset":
        allowed, message = frozenset({"type"}), Reset()
    elif kind == "sysrq":
        key = obj.get("key")
        if not isinstance(key, str) or key not in _SYSRQ_KEYS:
            raise BadMessageError("sysrq key must be one character of 0-9 or a-z")
        allowed, message = frozenset({"type", "key"}), Sysrq(key)
    elif kind == "resize":
        cols = _int_field(obj, "cols", 1, 1000)
        rows = _int_field(obj, "rows", 1, 1000)
        allowed, message = frozenset({"type", "cols", "rows"}), Resize(cols, rows)
    else:
        raise BadMessageError(f"unknown control message type {str(kind)[:32]!r}")
    extra = set(obj) - allowed
    if extra:
        raise BadMessageError(f"unexpected field {sorted(extra)[0][:32]!r} in {kind}")
    return message


def _encode(obj: dict[str, Any]) -> str:
    return json.dumps(obj, separators=(",", ":"), ensure_ascii=False)


def encode_hello(
    *,
    vm: str,
    session: str,
    role: str,
    offset: int,
    replay: int,
    limits: dict[str, Any],
    **extra: Any,
) -> str:
    """The first message of every session.

    Args:
        offset: absolute console offset just after the replayed bytes.
        replay: how many bytes of replay follow as binary frames.
    """
    return _encode(
        {
            "type": "hello",
            "vm": vm,
            "session": session,
            "role": role,
            "offset": offset,
            "replay": replay,
            "limits": limits,
            **extra,
        }
    )


def encode_notice(event: str, **fields: Any) -> str:
    """An informational event: port_down, port_up, writer_changed, demoted, output_gap, ..."""
    return _encode({"type": "notice", "event": event, **fields})


def encode_error(code: str, message: str, **fields: Any) -> str:
    """A refused client action; the session continues."""
    return _encode({"type": "error", "code": code, "message": message, **fields})
