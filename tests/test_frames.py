"""The keystroke-path frames are exactly what websockets would have sent and seen."""

from __future__ import annotations

import itertools
import struct

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from websockets.frames import Frame, Opcode
from websockets.protocol import State
from websockets.server import ServerProtocol

from relayd import frames as frames_module
from relayd.frames import (
    SHORT_HEADERS,
    ClientFrameReader,
    binary_frame,
    binary_frame_of,
    frame_extent,
)
from relayd.session import WS_LOGGER


@given(st.binary(max_size=300))
def test_binary_frame_matches_websockets_for_short_and_medium_payloads(data: bytes) -> None:
    assert binary_frame(data) == Frame(Opcode.BINARY, data).serialize(mask=False)


def test_short_headers_are_binary_frame_headers() -> None:
    for n, head in enumerate(SHORT_HEADERS):
        assert head + b"x" * n == binary_frame(b"x" * n)
    assert len(SHORT_HEADERS) == 126


def test_binary_frame_matches_websockets_at_every_length_boundary() -> None:
    for n in (0, 125, 126, 127, 65535, 65536, 70000):
        data = bytes(range(256)) * (n // 256) + bytes(range(n % 256))
        assert binary_frame(data) == Frame(Opcode.BINARY, data).serialize(mask=False)


@given(st.lists(st.binary(max_size=40_000), max_size=4))
def test_binary_frame_of_pieces_is_the_frame_of_their_join(pieces: list[bytes]) -> None:
    joined = b"".join(pieces)
    views: list[bytes | memoryview] = [memoryview(p) for p in pieces]
    assert binary_frame_of(views, len(joined)) == binary_frame(joined)


# -- client frames ---------------------------------------------------------------------------

KEY = b"\x11\x22\x33\x44"
ZERO_KEY = bytes(4)  # masked payloads read as written: keystroke look-alikes inside frames


def masked(
    first: int, payload: bytes, *, length: str = "min", mask: bool = True, key: bytes = KEY
) -> bytes:
    """A client frame with any first byte, any length encoding, masked or not."""
    n = len(payload)
    bit = 0x80 if mask else 0
    if length == "16" or (length == "min" and 126 <= n < 65536):
        head = struct.pack("!BBH", first, bit | 126, n)
    elif length == "64" or (length == "min" and n >= 65536):
        head = struct.pack("!BBQ", first, bit | 127, n)
    else:
        head = struct.pack("!BB", first, bit | n)
    if not mask:
        return head + payload
    body = bytes(b ^ key[i % 4] for i, b in enumerate(payload))
    return head + key + body


FIRST_BYTES = [0x82, 0x81, 0x02, 0x01, 0x00, 0x80, 0x89, 0x8A, 0x88, 0xC2, 0x92, 0x83, 0x8B]


@st.composite
def client_frame(draw: st.DrawFn) -> bytes:
    kind = draw(st.sampled_from(["key", "key", "key", "any", "close", "garbage"]))
    if kind == "garbage":
        return draw(st.binary(min_size=1, max_size=20))
    if kind == "key":
        return masked(0x82, draw(st.binary(min_size=0, max_size=8)))
    if kind == "close":
        code = draw(st.sampled_from([1000, 1001, 4000, 999, 1005]))
        return masked(0x88, struct.pack("!H", code) + b"bye")
    first = draw(st.one_of(st.sampled_from(FIRST_BYTES), st.integers(0, 255)))
    parts = draw(
        st.lists(st.one_of(st.binary(max_size=100), st.just(masked(0x82, b"k"))), max_size=4)
    )
    return masked(
        first,
        b"".join(parts),
        length=draw(st.sampled_from(["min", "min", "16", "64"])),
        mask=draw(st.integers(0, 9)) > 0,
        key=draw(st.sampled_from([KEY, ZERO_KEY])),
    )


def observe(protocol: ServerProtocol, events: list[object]) -> tuple[object, ...]:
    """What a session can see after a feed: events, bytes to send, state, close frames."""
    norm = []
    for e in events:
        if isinstance(e, bytes):
            norm.append((Opcode.BINARY, e, True, False, False, False))
        else:
            assert isinstance(e, Frame)
            norm.append((e.opcode, bytes(e.data), e.fin, e.rsv1, e.rsv2, e.rsv3))
    sent = protocol.data_to_send()
    return (
        norm,
        sent,
        protocol.state,
        protocol.close_rcvd and protocol.close_rcvd.code,
        protocol.close_sent and protocol.close_sent.code,
        protocol.current_size,
    )


def ws(max_size: int | None) -> ServerProtocol:
    return ServerProtocol(state=State.OPEN, max_size=max_size, logger=WS_LOGGER)


@settings(max_examples=400, deadline=None)
@given(
    frames=st.lists(client_frame(), max_size=12),
    cuts=st.lists(st.integers(0, 4000), max_size=8),
    max_size=st.sampled_from([None, 0, 5, 40, 125, 126, 200, 1 << 20]),
    close_after=st.one_of(st.none(), st.integers(0, 8)),
    eof=st.booleans(),
)
def test_reader_sees_what_websockets_alone_sees(
    frames: list[bytes], cuts: list[int], max_size: int | None, close_after: int | None, eof: bool
) -> None:
    stream = b"".join(frames)
    points = sorted({0, len(stream), *(c % (len(stream) + 1) for c in cuts)})
    chunks = [stream[a:b] for a, b in itertools.pairwise(points)]
    reference, ours = ws(max_size), ws(max_size)
    reader = ClientFrameReader(ours)
    for i, chunk in enumerate(chunks):
        if i == close_after:  # the server starts the closing handshake mid-stream
            for p in (reference, ours):
                if p.state is State.OPEN:
                    p.send_close(1000, "")
        reference.receive_data(chunk)
        expected = observe(reference, reference.events_received())
        assert observe(ours, reader.feed(chunk)) == expected
    if eof:
        reference.receive_eof()
        assert observe(ours, reader.feed_eof()) == observe(reference, reference.events_received())


@settings(max_examples=300, deadline=None)
@given(frames=st.lists(client_frame(), max_size=8), max_size=st.sampled_from([None, 5, 125]))
def test_reader_fed_one_byte_at_a_time_sees_what_websockets_sees(
    frames: list[bytes], max_size: int | None
) -> None:
    stream = b"".join(frames)
    reference, ours = ws(max_size), ws(max_size)
    reader = ClientFrameReader(ours)
    for i in range(len(stream)):
        reference.receive_data(stream[i : i + 1])
        expected = observe(reference, reference.events_received())
        assert observe(ours, reader.feed(stream[i : i + 1])) == expected


def test_input_websockets_throws_away_is_not_walked_frame_by_frame(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A continuation with no message open fails the connection: the rest is not parsed."""
    walked = []
    real = frames_module.frame_extent
    monkeypatch.setattr(
        frames_module, "frame_extent", lambda buf, pos: walked.append(pos) or real(buf, pos)
    )
    protocol = ws(1 << 20)
    reader = ClientFrameReader(protocol)
    reader.feed(masked(0x80, b"") * 10_000)
    assert protocol.close_sent is not None
    assert protocol.close_sent.code == 1002
    assert len(walked) <= 16
    walked.clear()
    reader.feed(masked(0x80, b"") * 10_000)  # after that, not walked at all
    assert walked == []


def test_a_keystroke_takes_the_short_path_and_websockets_is_not_fed() -> None:
    reader = ClientFrameReader(ws(1 << 20))
    assert reader.feed(masked(0x82, b"ls\r")) == [b"ls\r"]
    assert not reader.fed_protocol


def test_keystrokes_after_a_long_frame_cut_anywhere_take_the_short_path() -> None:
    paste = masked(0x82, b"p" * 300)  # 16-bit length: websockets parses it
    for cut in range(1, len(paste)):
        reader = ClientFrameReader(ws(1 << 20))
        reader.feed(paste[:cut])
        events = reader.feed(paste[cut:])
        assert events
        assert bytes(events[0].data) == b"p" * 300
        assert reader.feed(masked(0x82, b"x")) == [b"x"]
        assert not reader.fed_protocol


def test_keystrokes_cut_anywhere_come_out_whole_and_in_order() -> None:
    reader = ClientFrameReader(ws(1 << 20))
    stream = b"".join(masked(0x82, bytes([c])) for c in b"hello")
    out: list[object] = []
    for i in range(len(stream)):
        out += reader.feed(stream[i : i + 1])
    assert out == [b"h", b"e", b"l", b"l", b"o"]


def test_a_keystroke_inside_a_fragmented_message_goes_to_websockets() -> None:
    protocol = ws(1 << 20)
    reader = ClientFrameReader(protocol)
    reader.feed(masked(0x02, b"par"))  # a binary message begun, not final
    events = reader.feed(masked(0x82, b"x"))  # not allowed before the message ends
    assert reader.fed_protocol
    assert events == []
    assert protocol.close_sent is not None
    assert protocol.close_sent.code == 1002


def test_frame_extent_reads_every_length_encoding() -> None:
    assert frame_extent(masked(0x82, b"abc"), 0) == 9
    assert frame_extent(masked(0x82, b"a" * 300), 0) == 2 + 2 + 4 + 300
    assert frame_extent(masked(0x82, b"a" * 5, length="64"), 0) == 2 + 8 + 4 + 5
    assert frame_extent(masked(0x82, b"abc", mask=False), 0) == 5
    assert frame_extent(b"\x82", 0) == -1
    assert frame_extent(b"\x82\xfe\x01", 0) == -1
