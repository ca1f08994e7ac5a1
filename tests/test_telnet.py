"""Tests for relayd.telnet: framing, BREAK, negotiation, and robustness to any input."""

from __future__ import annotations

import itertools
import tracemalloc

from hypothesis import given
from hypothesis import strategies as st

from relayd.telnet import (
    BINARY,
    BRK,
    ECHO,
    IAC,
    QEMU_GREETING,
    SGA,
    BreakReceived,
    DataReceived,
    TelnetCodec,
    TelnetEvent,
)

WILL, WONT, DO, DONT, SB, SE, NOP = 251, 252, 253, 254, 250, 240, 241


def iac(*codes: int) -> bytes:
    return bytes((IAC, *codes))


def split(data: bytes, cuts: list[int]) -> list[bytes]:
    """`data` cut at the given offsets (taken modulo its length, in order)."""
    points = sorted({c % (len(data) + 1) for c in cuts} | {0, len(data)})
    return [data[a:b] for a, b in itertools.pairwise(points)]


def feed(codec: TelnetCodec, chunks: list[bytes]) -> list[TelnetEvent]:
    events: list[TelnetEvent] = []
    for chunk in chunks:
        events += codec.receive(chunk)
    return events


def merge(events: list[TelnetEvent]) -> list[bytes | BreakReceived]:
    """Events with adjacent data joined, so chunking does not matter for comparison."""
    out: list[bytes | BreakReceived] = []
    for event in events:
        if isinstance(event, DataReceived):
            if out and isinstance(out[-1], bytes):
                out[-1] += event.data
            else:
                out.append(event.data)
        else:
            out.append(event)
    return out


def data_of(events: list[TelnetEvent]) -> bytes:
    return b"".join(e.data for e in events if isinstance(e, DataReceived))


def negotiate(client: TelnetCodec, server: TelnetCodec) -> int:
    """Wire two codecs back to back until both are quiet; returns the rounds it took."""
    to_server, to_client = client.initial(), server.initial()
    for rounds in range(1, 20):
        if not to_server and not to_client:
            return rounds
        server.receive(to_server)
        client.receive(to_client)
        to_server, to_client = client.data_to_send(), server.data_to_send()
    raise AssertionError("negotiation did not settle")


def binary_pair() -> tuple[TelnetCodec, TelnetCodec]:
    client, server = TelnetCodec(detect_qemu=False), TelnetCodec(server_side=True)
    negotiate(client, server)
    return client, server


# Framing.


def test_receive_plain_bytes_returns_them_unchanged() -> None:
    """Bytes with no IAC pass through as one DataReceived."""
    assert TelnetCodec().receive(b"login: ") == [DataReceived(b"login: ")]


def test_receive_doubled_iac_yields_literal_ff() -> None:
    """IAC IAC is one 0xFF data byte."""
    assert data_of(TelnetCodec().receive(b"a\xff\xffb")) == b"a\xffb"


def test_receive_iac_split_from_its_command_still_parses() -> None:
    """An IAC at the end of one chunk pairs with the command that starts the next."""
    codec = TelnetCodec()
    assert codec.receive(b"ab\xff") == [DataReceived(b"ab")]
    assert codec.receive(bytes((BRK,)) + b"cd") == [BreakReceived(), DataReceived(b"cd")]


def test_receive_break_between_data_keeps_stream_order() -> None:
    """Data before and after IAC BRK stay on their side of the BreakReceived."""
    events = TelnetCodec().receive(b"x" + iac(BRK) + b"y")
    assert events == [DataReceived(b"x"), BreakReceived(), DataReceived(b"y")]


def test_receive_nop_and_ga_are_ignored() -> None:
    """IAC NOP, IAC GA and IAC AYT disappear from the data."""
    assert data_of(TelnetCodec().receive(b"a" + iac(NOP) + iac(249) + iac(246) + b"b")) == b"ab"


def test_receive_subnegotiation_split_anywhere_is_removed() -> None:
    """SB ... SE is stripped even when cut at every byte, including an IAC IAC inside."""
    codec = TelnetCodec()
    wire = b"a" + iac(SB, 24, 0) + b"xterm\xff\xff" + iac(SE) + b"b"
    assert data_of(feed(codec, [bytes((b,)) for b in wire])) == b"ab"


def test_receive_subnegotiation_without_se_ends_at_next_command() -> None:
    """A peer that forgets SE does not swallow the rest of the stream."""
    events = TelnetCodec().receive(iac(SB, 24) + b"junk" + iac(BRK) + b"after")
    assert events == [BreakReceived(), DataReceived(b"after")]


def test_receive_huge_subnegotiation_keeps_memory_bounded() -> None:
    """Megabytes of subnegotiation are discarded beyond the cap, not buffered."""
    codec = TelnetCodec()
    chunk = b"x" * 16384
    codec.receive(iac(SB, 24))
    tracemalloc.start()
    try:
        for _ in range(16):
            codec.receive(chunk)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 64 * 1024
    assert codec.receive(iac(SE) + b"ok") == [DataReceived(b"ok")]


def test_receive_cr_nul_without_binary_becomes_cr() -> None:
    """In NVT mode CR NUL is a bare CR, even when the NUL starts the next chunk."""
    codec = TelnetCodec()
    assert data_of(feed(codec, [b"a\r\x00b\r", b"\x00c"])) == b"a\rb\rc"


def test_receive_cr_nul_with_binary_is_kept() -> None:
    """Once the peer sends BINARY, NUL after CR is data."""
    client, _ = binary_pair()
    assert data_of(client.receive(b"\r\x00")) == b"\r\x00"


def test_encode_doubles_iac() -> None:
    """0xFF goes on the wire as IAC IAC."""
    assert TelnetCodec.encode(b"\xffa\xff") == b"\xff\xffa\xff\xff"


def test_brk_is_iac_brk() -> None:
    """A BREAK is the two bytes IAC BRK."""
    assert TelnetCodec().brk() == iac(BRK)


# Negotiation.


def test_client_initial_asks_for_binary_and_sga() -> None:
    """The client offers and asks for BINARY and asks for SGA."""
    sent = TelnetCodec().initial()
    assert iac(WILL, BINARY) in sent
    assert iac(DO, BINARY) in sent
    assert iac(DO, SGA) in sent


def test_client_initial_called_twice_repeats_nothing() -> None:
    """Requests already on their way are not sent again."""
    codec = TelnetCodec()
    codec.initial()
    assert codec.initial() == b""


def test_server_initial_matches_qemu() -> None:
    """The server side announces what QEMU's telnet chardev does, in its order."""
    sent = TelnetCodec(server_side=True).initial()
    assert sent == iac(WILL, ECHO) + iac(WILL, SGA) + iac(WILL, BINARY) + iac(DO, BINARY)


def test_client_against_qemu_answers_only_echo() -> None:
    """QEMU's opening confirms our requests; only its WILL ECHO needs a DO ECHO."""
    client = TelnetCodec()
    client.initial()
    client.receive(iac(WILL, ECHO) + iac(WILL, SGA) + iac(WILL, BINARY) + iac(DO, BINARY))
    assert client.data_to_send() == iac(DO, ECHO)
    assert client.remote_enabled(BINARY)
    assert client.local_enabled(BINARY)
    assert client.remote_enabled(ECHO)


def test_client_unknown_option_requests_are_refused() -> None:
    """DO and WILL for options we do not support get WONT and DONT."""
    client = TelnetCodec()
    client.receive(iac(DO, 24) + iac(WILL, 31))
    assert client.data_to_send() == iac(WONT, 24) + iac(DONT, 31)


def test_client_confirmation_of_own_state_is_not_answered() -> None:
    """A repeated WILL for an enabled option gets no reply, so nothing loops."""
    client = TelnetCodec()
    client.receive(iac(WILL, ECHO))
    assert client.data_to_send() == iac(DO, ECHO)
    client.receive(iac(WILL, ECHO))
    assert client.data_to_send() == b""


def test_client_peer_disabling_option_is_acknowledged_once() -> None:
    """WONT for an enabled option gets one DONT; a second WONT gets nothing."""
    client = TelnetCodec()
    client.receive(iac(WILL, ECHO))
    client.data_to_send()
    client.receive(iac(WONT, ECHO) + iac(WONT, ECHO))
    assert client.data_to_send() == iac(DONT, ECHO)
    assert not client.remote_enabled(ECHO)


def test_client_and_server_back_to_back_settle_in_binary() -> None:
    """Two codecs negotiate to BINARY both ways, ECHO and SGA, and then fall quiet."""
    client, server = TelnetCodec(), TelnetCodec(server_side=True)
    assert negotiate(client, server) <= 3
    assert client.local_enabled(BINARY)
    assert client.remote_enabled(BINARY)
    assert server.local_enabled(BINARY)
    assert server.remote_enabled(BINARY)
    assert client.remote_enabled(ECHO)
    assert server.local_enabled(ECHO)
    assert client.remote_enabled(SGA)
    assert server.local_enabled(SGA)


# Properties.

cuts = st.lists(st.integers(min_value=0, max_value=10_000), max_size=20)


@given(payload=st.binary(max_size=2000), cut_at=cuts)
def test_encode_then_receive_round_trips_any_bytes_in_binary(
    payload: bytes, cut_at: list[int]
) -> None:
    """Whatever the bytes and however the wire splits them, BINARY delivers them intact."""
    client, server = binary_pair()
    assert data_of(feed(server, split(client.encode(payload), cut_at))) == payload
    assert data_of(feed(client, split(server.encode(payload), cut_at))) == payload


@given(payload=st.binary(max_size=2000), cut_at=cuts)
def test_encode_then_receive_without_binary_only_folds_cr_nul(
    payload: bytes, cut_at: list[int]
) -> None:
    """Before BINARY, the only change on the way through is CR NUL becoming CR."""
    codec = TelnetCodec()
    got = data_of(feed(codec, split(codec.encode(payload), cut_at)))
    assert got == payload.replace(b"\r\x00", b"\r")


@given(
    parts=st.lists(st.one_of(st.binary(min_size=1, max_size=50), st.just(None)), max_size=30),
    cut_at=cuts,
)
def test_breaks_interleaved_with_data_keep_order(
    parts: list[bytes | None], cut_at: list[int]
) -> None:
    """Data and BREAKs come out in the order they were sent, whatever the chunking."""
    client, server = binary_pair()
    wire = b"".join(client.brk() if p is None else client.encode(p) for p in parts)
    expected: list[bytes | BreakReceived] = []
    for part in parts:
        if part is None:
            expected.append(BreakReceived())
        elif expected and isinstance(expected[-1], bytes):
            expected[-1] += part
        else:
            expected.append(part)
    assert merge(feed(server, split(wire, cut_at))) == expected


@given(garbage=st.binary(max_size=4000), cut_at=cuts, server_side=st.booleans())
def test_receive_random_garbage_never_raises_and_output_is_bounded(
    garbage: bytes, cut_at: list[int], server_side: bool
) -> None:
    """Any input is parsed without error; neither data nor replies outgrow the input."""
    codec = TelnetCodec(server_side=server_side)
    events = feed(codec, split(garbage, cut_at))
    assert len(data_of(events)) <= len(garbage)
    assert len(codec.data_to_send()) <= len(garbage)


@given(server_opens=st.booleans(), server_first=st.booleans(), cut_at=cuts)
def test_negotiation_back_to_back_settles_whatever_the_timing(
    server_opens: bool, server_first: bool, cut_at: list[int]
) -> None:
    """Client and server codecs fall quiet and agree, however replies are split or ordered."""
    client, server = TelnetCodec(detect_qemu=False), TelnetCodec(server_side=True)
    to_server = client.initial()
    to_client = server.initial() if server_opens else b""
    for _ in range(10):
        if not to_server and not to_client:
            break
        if server_first:
            feed(server, split(to_server, cut_at))
            feed(client, split(to_client, cut_at))
        else:
            feed(client, split(to_client, cut_at))
            feed(server, split(to_server, cut_at))
        to_server, to_client = client.data_to_send(), server.data_to_send()
    else:
        raise AssertionError("negotiation looped")
    for option in (BINARY, ECHO, SGA):
        assert client.local_enabled(option) == server.remote_enabled(option)
        assert client.remote_enabled(option) == server.local_enabled(option)
    assert client.local_enabled(BINARY)
    assert client.remote_enabled(BINARY)


@given(cut_at=cuts, output=st.binary(max_size=300))
def test_qemu_greeting_makes_everything_after_it_data(cut_at: list[int], output: bytes) -> None:
    """After QEMU's fixed opening, 0xFF, IAC SB and IAC BRK from the guest are plain output."""
    client = TelnetCodec()
    client.initial()
    stream = QEMU_GREETING + output + b"\xff\xfa\x18junk\xff\xf3"
    events = feed(client, split(stream, cut_at))
    assert client.raw_peer
    assert data_of(events) == output + b"\xff\xfa\x18junk\xff\xf3"
    assert not any(isinstance(e, BreakReceived) for e in events)
    assert client.encode(b"\xff") == b"\xff\xff"  # what we send stays escaped


def test_other_telnet_servers_are_not_taken_for_qemu() -> None:
    """ser2net-style openings keep standard telnet: IAC IAC is one 0xFF."""
    client = TelnetCodec()
    events = client.receive(iac(WILL, SGA) + iac(WILL, ECHO) + b"a" + iac(IAC) + b"b")
    assert not client.raw_peer
    assert data_of(events) == b"a\xffb"
