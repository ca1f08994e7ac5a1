"""Tests for relayd.proxy_protocol: PROXY v1/v2 headers parsed exactly, never read past."""

from __future__ import annotations

import ipaddress
import struct

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from relayd.errors import RelaydError
from relayd.proxy_protocol import (
    MAX_HEADER_LENGTH,
    V1_MAX_LENGTH,
    V2_MAX_ADDRESS_LENGTH,
    NeedData,
    ProxyHeader,
    ProxyProtocolError,
    parse,
)

SIG = b"\r\n\r\n\x00\r\nQUIT\n"
CLIENT_HELLO = b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03"  # what follows on the wire

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address


def v1(protocol: str, src: str, dst: str, sport: int, dport: int) -> bytes:
    """A v1 line as a sender writes it."""
    return f"PROXY {protocol} {src} {dst} {sport} {dport}\r\n".encode()


def v2(
    src: IPAddress | None = None,
    dst: IPAddress | None = None,
    sport: int = 0,
    dport: int = 0,
    *,
    ver_cmd: int = 0x21,
    fam: int | None = None,
    tlvs: bytes = b"",
    block: bytes | None = None,
) -> bytes:
    """A v2 header as a sender writes it; `block` replaces the address block."""
    if block is None:
        block = b""
        if src is not None and dst is not None:
            block = src.packed + dst.packed + struct.pack("!HH", sport, dport)
    if fam is None:
        fam = {None: 0x00, 4: 0x11, 6: 0x21}[src.version if src else None]
    block += tlvs
    return SIG + bytes([ver_cmd, fam]) + struct.pack("!H", len(block)) + block


def tlv(kind: int, value: bytes) -> bytes:
    """One type-length-value record."""
    return bytes([kind]) + struct.pack("!H", len(value)) + value


def read_header(
    header: bytes, *, max_chunk: int | None = None, tail: bytes = CLIENT_HELLO
) -> tuple[ProxyHeader, int]:
    """Play the listener on `header + tail`: read what `parse` asks for; return header, reads.

    Asserts on every step that the requested total is ahead of the buffer and
    never beyond the header, so no byte after it (the ClientHello) is consumed;
    `max_chunk` makes the socket return short reads.
    """
    stream = header + tail
    buf = b""
    reads = 0
    while isinstance(result := parse(buf), NeedData):
        assert len(buf) < result.at_least <= len(header)
        want = result.at_least - len(buf)
        if max_chunk is not None:
            want = min(want, max_chunk)
        buf += stream[len(buf) : len(buf) + want]
        reads += 1
    assert result.length == len(buf) == len(header)
    return result, reads


VALID_HEADERS = [
    pytest.param(
        v1("TCP4", "192.168.0.1", "192.168.0.11", 56324, 443),
        ProxyHeader(1, "PROXY", ("192.168.0.1", 56324), ("192.168.0.11", 443), 47),
        id="v1-tcp4",
    ),
    pytest.param(
        v1("TCP4", "255.255.255.255", "255.255.255.255", 65535, 65535),
        ProxyHeader(1, "PROXY", ("255.255.255.255", 65535), ("255.255.255.255", 65535), 56),
        id="v1-tcp4-longest",
    ),
    pytest.param(
        v1("TCP4", "0.0.0.0", "0.0.0.0", 0, 0),
        ProxyHeader(1, "PROXY", ("0.0.0.0", 0), ("0.0.0.0", 0), 32),
        id="v1-tcp4-shortest",
    ),
    pytest.param(
        v1("TCP6", "2001:DB8:0:0:0:0:0:1", "::1", 1234, 8443),
        ProxyHeader(1, "PROXY", ("2001:db8::1", 1234), ("::1", 8443), 47),
        id="v1-tcp6",
    ),
    pytest.param(
        v1("TCP6", ":".join(["ffff"] * 8), ":".join(["ffff"] * 8), 65535, 65535),
        ProxyHeader(
            1,
            "PROXY",
            (":".join(["ffff"] * 8), 65535),
            (":".join(["ffff"] * 8), 65535),
            104,
        ),
        id="v1-tcp6-longest",
    ),
    pytest.param(
        b"PROXY UNKNOWN\r\n", ProxyHeader(1, "PROXY", None, None, 15), id="v1-unknown-short"
    ),
    pytest.param(
        v1("UNKNOWN", ":".join(["ffff"] * 8), ":".join(["ffff"] * 8), 65535, 65535),
        ProxyHeader(1, "PROXY", None, None, 107),
        id="v1-unknown-longest",
    ),
    pytest.param(
        b"PROXY UNKNOWN whatever the sender had\r\n",
        ProxyHeader(1, "PROXY", None, None, 39),
        id="v1-unknown-free-text",
    ),
    pytest.param(
        v2(ipaddress.IPv4Address("203.0.113.7"), ipaddress.IPv4Address("10.1.2.3"), 50000, 443),
        ProxyHeader(2, "PROXY", ("203.0.113.7", 50000), ("10.1.2.3", 443), 28),
        id="v2-ipv4",
    ),
    pytest.param(
        v2(
            ipaddress.IPv6Address("2001:db8::7"),
            ipaddress.IPv6Address("2001:db8::1"),
            40000,
            8443,
        ),
        ProxyHeader(2, "PROXY", ("2001:db8::7", 40000), ("2001:db8::1", 8443), 52),
        id="v2-ipv6",
    ),
    pytest.param(
        v2(
            ipaddress.IPv4Address("198.51.100.9"),
            ipaddress.IPv4Address("10.0.0.1"),
            1,
            2,
            tlvs=tlv(0x01, b"h2") + tlv(0x02, b"console.example") + tlv(0x04, b"\x00" * 5),
        ),
        ProxyHeader(2, "PROXY", ("198.51.100.9", 1), ("10.0.0.1", 2), 28 + 5 + 18 + 8),
        id="v2-ipv4-tlvs",
    ),
    pytest.param(
        v2(
            ipaddress.IPv6Address("::1"),
            ipaddress.IPv6Address("::2"),
            3,
            4,
            tlvs=tlv(0xEA, b"vpce-0123456789abcdef0") + tlv(0x20, b"\x01" + b"\x00" * 4),
        ),
        ProxyHeader(2, "PROXY", ("::1", 3), ("::2", 4), 52 + 25 + 8),
        id="v2-ipv6-tlvs",
    ),
    pytest.param(
        v2(ver_cmd=0x20, fam=0x00),
        ProxyHeader(2, "LOCAL", None, None, 16),
        id="v2-local",
    ),
    pytest.param(
        v2(ver_cmd=0x20, fam=0x11, block=b"\xff" * 12),
        ProxyHeader(2, "LOCAL", None, None, 28),
        id="v2-local-with-block",
    ),
    pytest.param(
        v2(ver_cmd=0x20, fam=0x12, block=b"\xff" * 12),
        ProxyHeader(2, "LOCAL", None, None, 28),
        id="v2-local-ignores-family",
    ),
    pytest.param(
        v2(fam=0x00, block=b"\x00" * 4),
        ProxyHeader(2, "PROXY", None, None, 20),
        id="v2-proxy-unspec",
    ),
    pytest.param(
        v2(fam=0x31, block=b"/run/lb.sock".ljust(108, b"\x00") * 2),
        ProxyHeader(2, "PROXY", None, None, 16 + 216),
        id="v2-proxy-unix-stream",
    ),
    pytest.param(
        v2(fam=0x31, block=b"\x00" * V2_MAX_ADDRESS_LENGTH),
        ProxyHeader(2, "PROXY", None, None, MAX_HEADER_LENGTH),
        id="v2-largest-block",
    ),
]


@pytest.mark.parametrize(("header", "expected"), VALID_HEADERS)
def test_parse_valid_header_returns_addresses_and_length(
    header: bytes, expected: ProxyHeader
) -> None:
    """A whole valid header, with the ClientHello behind it, parses to its fields."""
    assert parse(header + CLIENT_HELLO) == expected
    assert parse(header) == expected


@pytest.mark.parametrize(("header", "expected"), VALID_HEADERS)
def test_parse_byte_by_byte_never_requests_past_header(
    header: bytes, expected: ProxyHeader
) -> None:
    """A socket that yields one byte per read is never asked for a byte after the header."""
    assert read_header(header, max_chunk=1)[0] == expected


@pytest.mark.parametrize(("header", "expected"), VALID_HEADERS)
def test_parse_exact_reads_consume_exactly_the_header(header: bytes, expected: ProxyHeader) -> None:
    """Reading exactly what NeedData asks for stops at the header's last byte."""
    assert read_header(header)[0] == expected


@pytest.mark.parametrize(("header", "expected"), VALID_HEADERS)
def test_parse_every_proper_prefix_needs_more_data(header: bytes, expected: ProxyHeader) -> None:
    """A truncated valid header is never mistaken for a complete one, nor for garbage."""
    for n in range(len(header)):
        result = parse(header[:n])
        assert isinstance(result, NeedData)
        assert n < result.at_least <= expected.length


def test_parse_v2_reads_in_three_steps_or_fewer() -> None:
    """The v2 length field lets the caller read the header in at most three reads."""
    header = v2(ipaddress.IPv4Address("192.0.2.1"), ipaddress.IPv4Address("192.0.2.2"), 1, 2)
    assert read_header(header)[1] <= 3


def test_parse_v1_tcp4_reads_far_fewer_times_than_bytes() -> None:
    """The v1 lower bound skips ahead instead of asking for one byte at a time."""
    header = v1("TCP4", "192.168.100.200", "10.20.30.40", 56324, 443)
    _, reads = read_header(header)
    assert reads <= len(header) // 4


def test_parse_empty_buffer_asks_for_the_shortest_header() -> None:
    """Nothing read yet: 15 bytes, the length of `PROXY UNKNOWN\\r\\n`."""
    assert parse(b"") == NeedData(15)


@pytest.mark.parametrize(
    ("data", "match"),
    [
        pytest.param(CLIENT_HELLO, "no proxy protocol signature: .* 16030102", id="tls-first"),
        pytest.param(b"\x16", "no proxy protocol signature", id="one-byte-of-tls"),
        pytest.param(b"GET / HTTP/1.1\r\n\r\n", "no proxy protocol signature", id="http"),
        pytest.param(b"PROXY\r\n", "no proxy protocol signature", id="v1-no-space"),
        pytest.param(b"proxy TCP4 1.2.3.4", "no proxy protocol signature", id="v1-lowercase"),
        pytest.param(b"\r\n\r\n\x00\r\nQUIX\n", "no proxy protocol signature", id="v2-bad-sig"),
        pytest.param(b"\r\n\r\n\x01", "no proxy protocol signature", id="v2-bad-sig-short"),
    ],
)
def test_parse_garbage_raises_as_soon_as_it_shows(data: bytes, match: str) -> None:
    """Bytes that match neither signature fail at once, without waiting for more."""
    with pytest.raises(ProxyProtocolError, match=match):
        parse(data)


@pytest.mark.parametrize(
    ("data", "match"),
    [
        pytest.param(b"PROXY TCP5 1.2.3.4", "unknown protocol b'TCP5'", id="protocol"),
        pytest.param(b"PROXY tcp4 1.2.3.4", "unknown protocol", id="protocol-lowercase"),
        pytest.param(b"PROXY UNKNOWNX\r\n", "unknown protocol", id="unknown-suffix"),
        pytest.param(b"PROXY UNKNOWN\n", "bare lf at byte 13", id="unknown-bare-lf"),
        pytest.param(b"PROXY UNKNOWN\rX", "cr without lf at byte 13", id="unknown-cr-only"),
        pytest.param(b"PROXY \r\n", "unknown protocol b''", id="empty-protocol"),
        pytest.param(b"PROXY TCP4\r\n", "0 fields after the protocol, expected 4", id="no-fields"),
        pytest.param(b"PROXY TCP4 1.2.3.4x", "is not an ipv4 address", id="ipv4-char-early"),
        pytest.param(b"PROXY TCP4 1.2.3.4  ", "empty destination address", id="double-space-early"),
        pytest.param(b"PROXY TCP4 1.2.3.4 5.6.7.8 1 2 3", "5 fields", id="extra-field-early"),
        pytest.param(b"PROXY TCP4 1.2.3.4 5.6.7.8 99999", "0 to 65535", id="port-early"),
        pytest.param(b"PROXY TCP4 1.2.3.4 5.6.7.8 1 2\n", "bare lf at byte 30", id="bare-lf"),
        pytest.param(b"PROXY TCP4 1.2.3.4 5.6.7.8 1 2\r\r", "cr without lf", id="cr-cr"),
        pytest.param(b"PROXY TCP4\t1.2.3.4", "unknown protocol", id="tab"),
        pytest.param(b"PROXY TCP6 fe80::1%eth0", "is not an ipv6 address", id="ipv6-scope"),
    ],
)
def test_parse_v1_malformed_prefix_raises_before_crlf(data: bytes, match: str) -> None:
    """A v1 line fails at the first byte that shows it is wrong."""
    with pytest.raises(ProxyProtocolError, match=match):
        parse(data)


@pytest.mark.parametrize(
    ("line", "match"),
    [
        ("TCP4 256.1.1.1 1.1.1.1 1 2", "source address '256.1.1.1' is not an ipv4 address"),
        ("TCP4 01.2.3.4 1.1.1.1 1 2", "source address '01.2.3.4' is not an ipv4 address"),
        ("TCP4 1.2.3.4 1.2.3 1 2", "destination address '1.2.3' is not an ipv4 address"),
        ("TCP4 1.2.3.4 1..2.3 1 2", "destination address '1..2.3' is not an ipv4 address"),
        ("TCP4 ::1 1.2.3.4 1 2", "is not an ipv4 address"),
        ("TCP6 1.2.3.4 ::1 1 2", "source address '1.2.3.4' is not an ipv6 address"),
        ("TCP6 ::1 1:2:3:4:5:6:7:8:9 1 2", "is not an ipv6 address"),
        ("TCP6 ::1 ::g 1 2", "is not an ipv6 address"),
        ("TCP4 1.2.3.4 5.6.7.8 65536 2", "source port is not a number from 0 to 65535"),
        ("TCP4 1.2.3.4 5.6.7.8 1 080", "destination port has a leading zero"),
        ("TCP4 1.2.3.4 5.6.7.8 +1 2", "source port is not a number"),
        ("TCP4 1.2.3.4 5.6.7.8 -1 2", "source port is not a number"),
        ("TCP4 1.2.3.4 5.6.7.8 1 0x1", "destination port is not a number"),
        ("TCP4 1.2.3.4 5.6.7.8 1 2 ", "5 fields after the protocol"),
        ("TCP4 1.2.3.4 5.6.7.8 1", "3 fields after the protocol, expected 4"),
        ("TCP4 1.2.3.4 5.6.7.8  1", "empty source port"),
        ("TCP4 1.2.3.4 5.6.7.8 1 ", "empty destination port"),
        (" TCP4 1.2.3.4 5.6.7.8 1 2", "unknown protocol"),
    ],
)
def test_parse_v1_malformed_line_raises(line: str, match: str) -> None:
    """Addresses of the wrong family, bad ports and bad spacing are refused."""
    with pytest.raises(ProxyProtocolError, match=match):
        parse(f"PROXY {line}\r\n".encode() + CLIENT_HELLO)


def test_parse_v1_without_crlf_in_107_bytes_raises() -> None:
    """A v1 line may not run past 107 bytes, CRLF included."""
    line = b"PROXY UNKNOWN " + b"x" * (V1_MAX_LENGTH - 14)
    assert len(line) == V1_MAX_LENGTH
    assert parse(line[:-2]) == NeedData(V1_MAX_LENGTH)
    with pytest.raises(ProxyProtocolError, match="no crlf within 107 bytes"):
        parse(line[:-1])
    with pytest.raises(ProxyProtocolError, match="no crlf within 107 bytes"):
        parse(line + b"\r\n")


def test_parse_v1_header_of_108_bytes_raises() -> None:
    """A CRLF that ends the line at byte 108 is one byte too late."""
    line = b"PROXY UNKNOWN " + b"x" * (V1_MAX_LENGTH - 15) + b"\r\n"
    assert len(line) == V1_MAX_LENGTH + 1
    with pytest.raises(ProxyProtocolError, match="108 bytes exceeds 107"):
        parse(line)
    with pytest.raises(ProxyProtocolError, match="108 bytes exceeds 107"):
        parse(line[:-1])


def test_parse_v1_tcp6_line_that_cannot_fit_raises_early() -> None:
    """When the fields still missing cannot fit in 107 bytes, the line fails at once."""
    long6 = ":".join(["ffff"] * 6) + ":255.255.255.255"
    with pytest.raises(ProxyProtocolError, match="needs at least 108"):
        parse(f"PROXY TCP6 {long6} {long6}".encode())


@pytest.mark.parametrize(
    ("data", "match"),
    [
        pytest.param(SIG + b"\x11", "version 1, expected 2", id="version-1"),
        pytest.param(SIG + b"\x31", "version 3, expected 2", id="version-3"),
        pytest.param(SIG + b"\x22", "unknown command 2", id="command-2"),
        pytest.param(SIG + b"\x2f", "unknown command 15", id="command-15"),
        pytest.param(SIG + b"\x21\x41", "unknown address family 4", id="family-4"),
        pytest.param(SIG + b"\x21\x13", "unknown transport 3", id="transport-3"),
        pytest.param(SIG + b"\x21\x12", r"datagram connection \(byte 0x12\)", id="udp4"),
        pytest.param(SIG + b"\x21\x22", "datagram", id="udp6"),
        pytest.param(SIG + b"\x21\x32", "datagram", id="unix-dgram"),
        pytest.param(SIG + b"\x21\x11\x02\x19", "block of 537 bytes exceeds 536", id="too-long"),
        pytest.param(
            SIG + b"\x20\x00\xff\xff", "block of 65535 bytes exceeds 536", id="local-long"
        ),
    ],
)
def test_parse_v2_bad_fixed_header_raises_before_the_block(data: bytes, match: str) -> None:
    """Version, command, family and length are checked as soon as their byte arrives."""
    with pytest.raises(ProxyProtocolError, match=match):
        parse(data)


@pytest.mark.parametrize(
    ("fam", "length", "match"),
    [
        (0x11, 0, "af_inet address block of 0 bytes is shorter than 12"),
        (0x11, 11, "af_inet address block of 11 bytes is shorter than 12"),
        (0x21, 12, "af_inet6 address block of 12 bytes is shorter than 36"),
    ],
)
def test_parse_v2_address_block_too_short_for_family_raises(
    fam: int, length: int, match: str
) -> None:
    """A block too short to hold the announced addresses is refused."""
    with pytest.raises(ProxyProtocolError, match=match):
        parse(v2(fam=fam, block=b"\x01" * length))


def test_parse_error_is_a_relayd_error() -> None:
    """The listener catches PROXY failures with the rest of relayd's own errors."""
    assert issubclass(ProxyProtocolError, RelaydError)


# --- properties ---------------------------------------------------------------

prefixes = st.sampled_from(
    [b"", b"PROXY ", b"PROXY TCP4 ", b"PROXY TCP6 ", b"PROXY UNKNOWN", SIG, SIG + b"\x21"]
)


@settings(max_examples=500)
@given(data=st.tuples(prefixes, st.binary(max_size=700)).map(b"".join))
def test_parse_arbitrary_bytes_raise_only_proxy_protocol_error(data: bytes) -> None:
    """Any input parses, asks for a bounded amount more, or raises ProxyProtocolError."""
    try:
        result = parse(data)
    except ProxyProtocolError:
        return
    if isinstance(result, NeedData):
        assert len(data) < result.at_least <= MAX_HEADER_LENGTH
    else:
        assert 15 <= result.length <= min(len(data), MAX_HEADER_LENGTH)


@settings(max_examples=300)
@given(data=st.binary(min_size=1, max_size=120).filter(lambda b: b"\r" not in b))
def test_parse_v1_line_of_arbitrary_text_requests_at_most_107_bytes(data: bytes) -> None:
    """However a v1 line goes on, the parser never asks for more than 107 bytes."""
    line = b"PROXY " + data
    try:
        result = parse(line)
    except ProxyProtocolError:
        return
    assert isinstance(result, NeedData)
    assert len(line) < result.at_least <= V1_MAX_LENGTH


ipv4s: st.SearchStrategy[IPAddress] = st.builds(ipaddress.IPv4Address, st.integers(0, 2**32 - 1))
ipv6s: st.SearchStrategy[IPAddress] = st.builds(ipaddress.IPv6Address, st.integers(0, 2**128 - 1))
ports = st.integers(0, 65535)


@st.composite
def encoded_headers(draw: st.DrawFn) -> tuple[bytes, tuple[str, int], tuple[str, int]]:
    """A random v1 or v2 TCP header, built independently of the parser, and its addresses."""
    ips = draw(st.sampled_from([ipv4s, ipv6s]))
    src, dst = draw(ips), draw(ips)
    sport, dport = draw(ports), draw(ports)
    if draw(st.booleans()):
        if src.version == 6 and draw(st.booleans()):
            text = [src.exploded.upper(), dst.exploded]
        else:
            text = [str(src), str(dst)]
        header = v1(f"TCP{src.version}", text[0], text[1], sport, dport)
    else:
        records = draw(st.lists(st.tuples(st.integers(0, 255), st.binary(max_size=40)), max_size=5))
        tlvs = b"".join(tlv(kind, value) for kind, value in records)
        header = v2(src, dst, sport, dport, tlvs=tlvs)
    return header, (str(src), sport), (str(dst), dport)


@settings(max_examples=300)
@given(case=encoded_headers(), chunk=st.sampled_from([None, 1, 3, 7]), tail=st.binary(max_size=64))
def test_parse_encoded_header_round_trips(
    case: tuple[bytes, tuple[str, int], tuple[str, int]], chunk: int | None, tail: bytes
) -> None:
    """Random headers parse back to their addresses, read to their exact end."""
    header, source, destination = case
    result, _ = read_header(header, max_chunk=chunk, tail=CLIENT_HELLO + tail)
    assert (result.source, result.destination) == (source, destination)
    assert result.length == len(header)
    assert result.version == (1 if header.startswith(b"PROXY") else 2)
