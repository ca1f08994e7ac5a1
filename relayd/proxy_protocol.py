"""PROXY protocol v1 (text) and v2 (binary) headers, parsed without I/O.

A load balancer in `trusted_proxies` prepends one header to each TCP
connection, before the TLS ClientHello, to tell relayd who the real client is
(haproxy's doc/proxy-protocol.txt). The header must be consumed exactly: a byte
too many and the ClientHello is damaged. So `parse` never needs more bytes
than it asks for, and it asks only for bytes that are certainly header:

- it answers `NeedData(n)` with the *total* buffer length to read before the
  next call; every `n` is at most the length of the shortest valid header that
  could start with the buffer, so a caller that reads up to `n` never reads
  past the header;
- v2 says its length in bytes 15-16, so it is read in at most three steps
  (15 bytes, 16, then 16 + length);
- v1 has no length field: the line ends at CRLF. After the first 15 bytes,
  `parse` asks for the fewest bytes the rest of the line can take (two per
  missing port, seven per missing IPv4 address, ...; one at a time near the
  end). This costs a handful of reads per connection, once, from a trusted
  peer; the alternative, `MSG_PEEK`, does not fit asyncio's `sock_recv`.

Every size is capped before it is read: a v1 line ends within 107 bytes, a v2
address block is at most 536 bytes (TLVs included), so `parse` never asks for
more than `MAX_HEADER_LENGTH` (552) bytes. Garbage fails as soon as a byte
shows it, and every other violation of the spec raises `ProxyProtocolError`.

The caller (the listener, on a non-blocking accepted socket, under the
handshake deadline)::

    buf = b""
    while isinstance(result := proxy_protocol.parse(buf), proxy_protocol.NeedData):
        chunk = await loop.sock_recv(sock, result.at_least - len(buf))
        if not chunk:
            raise ProxyProtocolError(f"connection closed after {len(buf)} header bytes")
        buf += chunk
    # result is a ProxyHeader; buf holds exactly the header (result.length bytes)

Not a StreamReader: it reads ahead and would swallow the ClientHello.

TLVs (ALPN, authority, SSL details, CRC32C, cloud endpoint ids) are skipped
unread: relayd uses none of them, and the block that holds them is capped.
"""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass
from typing import Literal

from .errors import ProxyProtocolError

__all__ = [
    "MAX_HEADER_LENGTH",
    "V1_MAX_LENGTH",
    "V2_MAX_ADDRESS_LENGTH",
    "NeedData",
    "ProxyHeader",
    "ProxyProtocolError",
    "parse",
]

V1_PREFIX = b"PROXY "
V2_SIGNATURE = b"\r\n\r\n\x00\r\nQUIT\n"
V1_MAX_LENGTH = 107  # "PROXY UNKNOWN" + two 39-char IPv6 + two ports + CRLF, per the spec
V1_MIN_LENGTH = 15  # "PROXY UNKNOWN\r\n"
V2_FIXED_LENGTH = 16  # signature, version/command, family/transport, length
V2_MAX_ADDRESS_LENGTH = 536  # the spec's minimum TCP segment; room for AF_UNIX plus TLVs
MAX_HEADER_LENGTH = V2_FIXED_LENGTH + V2_MAX_ADDRESS_LENGTH

Address = tuple[str, int]


@dataclass(frozen=True)
class ProxyHeader:
    """A complete header.

    `source` and `destination` are None when the header carries no usable
    TCP address (v1 UNKNOWN, v2 LOCAL, AF_UNSPEC, AF_UNIX): the caller then
    uses the socket's own peer, as the spec says. Addresses are normalized
    (`str(ipaddress.ip_address(...))`); an IPv4-mapped IPv6 address stays IPv6.
    """

    version: int
    command: Literal["PROXY", "LOCAL"]
    source: Address | None
    destination: Address | None
    length: int  # bytes of the buffer that belong to the header


@dataclass(frozen=True)
class NeedData:
    """Read until the buffer holds `at_least` bytes in total, then parse again."""

    at_least: int


def parse(buf: bytes) -> ProxyHeader | NeedData:
    """Parse the PROXY header at the start of `buf`.

    Args:
        buf: every byte read from the connection so far. Bytes after the
            header are allowed and left alone (`ProxyHeader.length` says
            where the header ends).

    Returns:
        The header, or `NeedData` with a total length greater than
        `len(buf)`, never past the end of the header, never above
        `MAX_HEADER_LENGTH`.

    Raises:
        ProxyProtocolError: `buf` cannot be the start of a valid header.
    """
    if buf.startswith(V2_SIGNATURE):
        return _parse_v2(buf)
    if buf.startswith(V1_PREFIX):
        return _parse_v1(buf)
    if V2_SIGNATURE.startswith(buf[: len(V2_SIGNATURE)]):
        # b"" is a prefix of both; both headers are at least 15 bytes long.
        return NeedData(V2_FIXED_LENGTH if buf else V1_MIN_LENGTH)
    if V1_PREFIX.startswith(buf[: len(V1_PREFIX)]):
        return NeedData(V1_MIN_LENGTH)
    raise ProxyProtocolError(
        f"no proxy protocol signature: the connection starts with {buf[:16].hex()}"
    )


# --- version 1 -------------------------------------------------------------

_V1_FIELDS = ("source address", "destination address", "source port", "destination port")
_DIGITS = frozenset(b"0123456789")
# protocol: (characters an address may use, longest address, shortest address)
_V1_TCP = {
    b"TCP4": (_DIGITS | frozenset(b"."), 15, 7),  # 255.255.255.255, 0.0.0.0
    b"TCP6": (_DIGITS | frozenset(b"abcdefABCDEF:."), 45, 2),  # ::ffff:255.255.255.255, ::
}
_V1_PROTOCOLS = (b"TCP4", b"TCP6", b"UNKNOWN")


def _parse_v1(buf: bytes) -> ProxyHeader | NeedData:
    window = buf[:V1_MAX_LENGTH]
    cr = window.find(b"\r")
    lf = window.find(b"\n")
    if lf != -1 and (cr == -1 or lf < cr):
        raise ProxyProtocolError(f"v1 header has a bare lf at byte {lf}")
    if cr == -1:
        missing = _v1_check(window, complete=False)
        need = max(V1_MIN_LENGTH, len(window) + missing + 2)
        if need > V1_MAX_LENGTH:
            raise ProxyProtocolError(
                f"v1 header has no crlf within {V1_MAX_LENGTH} bytes (needs at least {need})"
            )
        return NeedData(need)
    length = cr + 2
    if length > V1_MAX_LENGTH:
        raise ProxyProtocolError(f"v1 header of {length} bytes exceeds {V1_MAX_LENGTH}")
    line = window[:cr]
    _v1_check(line, complete=True)
    if len(buf) < length:
        return NeedData(length)
    if buf[cr + 1] != ord("\n"):
        raise ProxyProtocolError(f"v1 header has a cr without lf at byte {cr}")
    fields = line.split(b" ")
    if fields[1] == b"UNKNOWN":
        return ProxyHeader(1, "PROXY", None, None, length)
    version = 4 if fields[1] == b"TCP4" else 6
    source = (_v1_ip(fields[2], version, "source"), int(fields[4]))
    destination = (_v1_ip(fields[3], version, "destination"), int(fields[5]))
    return ProxyHeader(1, "PROXY", source, destination, length)


def _v1_check(line: bytes, *, complete: bool) -> int:
    """Check a v1 line without its CRLF as far as it goes.

    Returns the fewest bytes still missing before the CRLF, so that an
    incomplete line is rejected at the first bad byte and the caller asks
    for no more than the shortest valid ending.
    """
    fields = line[len(V1_PREFIX) :].split(b" ")
    protocol, values = fields[0], fields[1:]
    if not values and not complete:
        if not any(name.startswith(protocol) for name in _V1_PROTOCOLS):
            raise ProxyProtocolError(f"v1 header has unknown protocol {protocol[:8]!r}")
        return 0
    if protocol == b"UNKNOWN":
        return 0  # the spec says to ignore whatever follows, up to the CRLF
    if protocol not in _V1_TCP:
        raise ProxyProtocolError(f"v1 header has unknown protocol {protocol[:8]!r}")
    chars, longest, shortest = _V1_TCP[protocol]
    name = protocol.decode().lower()
    if len(values) > 4 or (complete and len(values) < 4):
        raise ProxyProtocolError(
            f"v1 {name} header has {len(values)} fields after the protocol, expected 4"
        )
    for i, value in enumerate(values):
        field = _V1_FIELDS[i]
        if not value and (complete or i < len(values) - 1):
            raise ProxyProtocolError(f"v1 {name} header has an empty {field} (field {i + 2})")
        if i < 2:
            if not chars.issuperset(value) or len(value) > longest:
                raise ProxyProtocolError(
                    f"v1 {name} {field} {value[: longest + 1]!r} is not an ipv{name[-1]} address"
                )
        elif not _DIGITS.issuperset(value) or len(value) > 5 or int(value or 0) > 65535:
            raise ProxyProtocolError(f"v1 {name} {field} is not a number from 0 to 65535")
        elif len(value) > 1 and value.startswith(b"0"):
            raise ProxyProtocolError(f"v1 {name} {field} has a leading zero")
    minimum = (shortest, shortest, 1, 1)
    last = len(values) - 1
    missing = max(0, minimum[last] - len(values[last]))
    return missing + sum(1 + minimum[i] for i in range(last + 1, 4))


def _v1_ip(text: bytes, version: int, which: str) -> str:
    """Check a v1 address, already limited to ASCII, against its family."""
    try:
        if version == 4:
            return str(ipaddress.IPv4Address(text.decode("ascii")))
        return str(ipaddress.IPv6Address(text.decode("ascii")))
    except ValueError:
        shown = text.decode("ascii")
        raise ProxyProtocolError(
            f"v1 tcp{version} {which} address {shown!r} is not an ipv{version} address"
        ) from None


# --- version 2 -------------------------------------------------------------

_LOCAL, _PROXY = 0x0, 0x1
_AF_UNSPEC, _AF_INET, _AF_INET6, _AF_UNIX = 0x0, 0x1, 0x2, 0x3
_UNSPEC, _STREAM, _DGRAM = 0x0, 0x1, 0x2
# family: (name, bytes per address, ip class); ports follow the two addresses
_V2_INET = {
    _AF_INET: ("af_inet", 4, ipaddress.IPv4Address),
    _AF_INET6: ("af_inet6", 16, ipaddress.IPv6Address),
}


def _parse_v2(buf: bytes) -> ProxyHeader | NeedData:
    command = _v2_command(buf[12]) if len(buf) > 12 else _PROXY
    if len(buf) > 13 and command == _PROXY:
        _v2_family(buf[13])
    if len(buf) < V2_FIXED_LENGTH:
        return NeedData(V2_FIXED_LENGTH)
    block_length = int.from_bytes(buf[14:16], "big")
    if block_length > V2_MAX_ADDRESS_LENGTH:
        raise ProxyProtocolError(
            f"v2 address block of {block_length} bytes exceeds {V2_MAX_ADDRESS_LENGTH}"
        )
    length = V2_FIXED_LENGTH + block_length
    if len(buf) < length:
        return NeedData(length)
    if command == _LOCAL:
        # A health check from the proxy itself: the spec says to ignore the block.
        return ProxyHeader(2, "LOCAL", None, None, length)
    family, transport = _v2_family(buf[13])
    if family not in _V2_INET or transport != _STREAM:
        return ProxyHeader(2, "PROXY", None, None, length)
    name, size, ip = _V2_INET[family]
    needed = 2 * size + 4
    if block_length < needed:
        raise ProxyProtocolError(
            f"v2 {name} address block of {block_length} bytes is shorter than {needed}"
        )
    block = buf[V2_FIXED_LENGTH:length]
    ports = block[2 * size :]
    source = (str(ip(block[:size])), int.from_bytes(ports[0:2], "big"))
    destination = (str(ip(block[size : 2 * size])), int.from_bytes(ports[2:4], "big"))
    return ProxyHeader(2, "PROXY", source, destination, length)


def _v2_command(byte: int) -> int:
    version, command = byte >> 4, byte & 0xF
    if version != 2:
        raise ProxyProtocolError(f"v2 header has version {version}, expected 2")
    if command not in (_LOCAL, _PROXY):
        raise ProxyProtocolError(f"v2 header has unknown command {command}")
    return command


def _v2_family(byte: int) -> tuple[int, int]:
    family, transport = byte >> 4, byte & 0xF
    if family > _AF_UNIX:
        raise ProxyProtocolError(f"v2 header has unknown address family {family}")
    if transport > _DGRAM:
        raise ProxyProtocolError(f"v2 header has unknown transport {transport}")
    if transport == _DGRAM:
        raise ProxyProtocolError(
            f"v2 header announces a datagram connection (byte 0x{byte:02x}); relayd is tcp only"
        )
    return family, transport
