"""The relay's stream walkers against websockets' own frame encoder, for streams cut anywhere."""

from __future__ import annotations

import itertools
import json
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st
from websockets.frames import Close, Frame, Opcode

from relayd import control
from relayd.cluster.wsframes import ClientStream, ServerStream, first_frame

# A frame as a test describes it: (opcode, fin, payload).
Spec = tuple[Opcode, bool, bytes]

_payloads = st.one_of(
    st.binary(max_size=140),
    st.integers(125, 70000).map(lambda n: bytes(n % 251 for n in range(n))),
)


def _encode(frames: list[Spec], *, mask: bool) -> tuple[bytes, list[int]]:
    """The stream and the offset just after each frame."""
    out = bytearray()
    ends = []
    for opcode, fin, payload in frames:
        out += Frame(opcode, payload, fin=fin).serialize(mask=mask)
        ends.append(len(out))
    return bytes(out), ends


def _cuts(data: bytes, points: list[int]) -> list[bytes]:
    marks = sorted({p % (len(data) + 1) for p in points} | {0, len(data)})
    return [data[a:b] for a, b in itertools.pairwise(marks)]


def _walk(walker: ClientStream | ServerStream, chunks: list[bytes]) -> set[int]:
    """Feed the chunks; the boundaries `feed` reported, as stream offsets."""
    seen: set[int] = set()
    base = 0
    for chunk in chunks:
        done = walker.feed(chunk)
        if done:
            seen.add(base + done)
        base += len(chunk)
    return seen


@st.composite
def _client_frames(draw: st.DrawFn) -> list[Spec]:
    """Client messages: binary keys and pastes (some fragmented), text, pings, pongs."""
    frames: list[Spec] = []
    for _ in range(draw(st.integers(0, 8))):
        kind = draw(st.sampled_from(["binary", "text", "ping", "pong", "fragmented"]))
        if kind == "fragmented":
            parts = draw(st.lists(st.binary(max_size=300), min_size=2, max_size=4))
            frames.append((Opcode.BINARY, False, parts[0]))
            for part in parts[1:-1]:
                frames.append((Opcode.CONT, False, part))
            frames.append((Opcode.CONT, True, parts[-1]))
        elif kind in ("ping", "pong"):
            op = Opcode.PING if kind == "ping" else Opcode.PONG
            frames.append((op, True, draw(st.binary(max_size=125))))
        elif kind == "text":
            frames.append((Opcode.TEXT, True, b'{"type":"resize","cols":80,"rows":24}'))
        else:
            frames.append((Opcode.BINARY, True, draw(_payloads)))
    return frames


@given(_client_frames(), st.lists(st.integers(0, 1 << 20), max_size=12))
def test_client_stream_cut_anywhere_reports_every_frame_end_it_sees(
    frames: list[Spec], points: list[int]
) -> None:
    """Every boundary `feed` reports is a frame end; the last one of each chunk is reported."""
    data, ends = _encode(frames, mask=True)
    chunks = _cuts(data, points)
    walker = ClientStream()
    seen = _walk(walker, chunks)
    assert seen <= set(ends)
    base = 0
    for chunk in chunks:  # the last frame end inside each chunk is the one reported
        inside = [e for e in ends if base < e <= base + len(chunk)]
        if inside:
            assert max(inside) in seen
        base += len(chunk)
    assert walker.at_boundary
    assert not walker.broken


@given(_client_frames(), st.lists(st.integers(0, 1 << 20), max_size=12))
def test_pings_and_pongs_are_counted_however_the_stream_is_cut(
    frames: list[Spec], points: list[int]
) -> None:
    """The relay tells an owner that dropped an unresponsive client from one that died by
    the owner's pings and the client's pongs: each counted once, in any cut."""
    pongs = sum(1 for opcode, _, _ in frames if opcode is Opcode.PONG)
    pings = sum(1 for opcode, _, _ in frames if opcode is Opcode.PING)
    messages = sum(1 for opcode, _, _ in frames if opcode in (Opcode.BINARY, Opcode.TEXT))
    client = ClientStream()
    _walk(client, _cuts(_encode(frames, mask=True)[0], points))
    assert client.pongs == pongs
    # The client's activity, which a moving session's idle clock carries: each message
    # once (a fragmented paste too), never a ping or a pong.
    assert client.messages == messages
    server = ServerStream()
    _walk(server, _cuts(_encode(frames, mask=False)[0], points))
    assert server.pings == pings


@given(_client_frames(), st.integers(0, 1 << 20))
def test_client_stream_stopped_mid_frame_is_not_at_a_boundary(
    frames: list[Spec], point: int
) -> None:
    """A stream cut inside a frame is not at a boundary; cut between frames, it is."""
    data, ends = _encode(frames, mask=True)
    cut = point % (len(data) + 1)
    walker = ClientStream()
    walker.feed(data[:cut])
    assert walker.at_boundary == (cut == 0 or cut in ends)


@given(_client_frames(), st.lists(st.integers(0, 1 << 20), max_size=12), st.integers(1, 300))
def test_client_stream_keeps_the_unfinished_frame_for_a_new_owner(
    frames: list[Spec], points: list[int], max_unfinished: int
) -> None:
    """After any chunk, `unfinished` is the start of the frame in progress (unless too long)."""
    data, ends = _encode(frames, mask=True)
    walker = ClientStream(max_unfinished)
    consumed = 0
    for chunk in _cuts(data, points):
        walker.track(chunk)
        consumed += len(chunk)
        start = max([0, *(e for e in ends if e <= consumed)])
        expected = data[start:consumed]
        if len(expected) <= max_unfinished:
            assert walker.unfinished_whole
            assert bytes(walker.unfinished) == expected
        else:
            assert not walker.unfinished_whole


def _hello(offset: int, replay: int, port: str = "up", role: str = "writer") -> Spec:
    text = control.encode_hello(
        vm="vm-a", session="s", role=role, offset=offset, replay=replay, limits={}, port=port
    )
    return (Opcode.TEXT, True, text.encode())


def _notice(event: str, **fields: Any) -> Spec:
    return (Opcode.TEXT, True, control.encode_notice(event, **fields).encode())


@st.composite
def _owner_session(draw: st.DrawFn) -> tuple[list[Spec], list[int | None], int]:
    """An owner's stream: hello, then output, gaps, notices, pings, maybe fragmented text.

    Returns the frames, the client's position after each frame (None before
    the hello) and the final position.
    """
    offset = draw(st.integers(0, 1 << 40))
    replay = draw(st.integers(0, min(offset, 5000)))
    frames = [_hello(offset, replay)]
    position = offset - replay
    positions: list[int | None] = [position]
    for _ in range(draw(st.integers(0, 10))):
        kind = draw(st.sampled_from(["output", "gap", "notice", "ping", "split", "split-text"]))
        if kind == "output":
            payload = draw(_payloads)
            frames.append((Opcode.BINARY, True, payload))
            position += len(payload)
        elif kind == "gap":
            skipped = draw(st.integers(1, 1 << 20))
            frames.append(_notice("output_gap", first=position, last=position + skipped - 1))
            position += skipped
        elif kind == "notice":
            frames.append(_notice("writer_changed", writer="user:ü" * draw(st.integers(0, 40))))
        elif kind == "ping":
            frames.append((Opcode.PING, True, draw(st.binary(max_size=125))))
        elif kind == "split":  # a binary message in fragments, a ping between them
            a, b = draw(st.binary(max_size=200)), draw(st.binary(max_size=200))
            frames.append((Opcode.BINARY, False, a))
            positions.append(position + len(a))
            frames.append((Opcode.PING, True, b""))
            positions.append(position + len(a))
            frames.append((Opcode.CONT, True, b))
            position += len(a) + len(b)
        else:  # a notice in two fragments
            text = control.encode_notice("output_gap", first=position, last=position + 9).encode()
            frames.append((Opcode.TEXT, False, text[:5]))
            positions.append(position)
            frames.append((Opcode.CONT, True, text[5:]))
            position += 10
        positions.append(position)
    return frames, positions, position


@given(_owner_session(), st.lists(st.integers(0, 1 << 20), max_size=12))
def test_server_stream_cut_anywhere_tracks_the_clients_position(
    session: tuple[list[Spec], list[int | None], int], points: list[int]
) -> None:
    """Hello's offset minus replay, plus binary payloads, moved on by gaps: for any cuts."""
    frames, _, final = session
    data, ends = _encode(frames, mask=False)
    walker = ServerStream()
    seen = _walk(walker, _cuts(data, points))
    assert seen <= set(ends)
    assert walker.at_boundary
    assert walker.position == final
    assert walker.hello is not None
    assert not walker.closing


@given(_owner_session(), st.integers(0, 1 << 30))
def test_server_stream_at_each_frame_end_knows_the_position_so_far(
    session: tuple[list[Spec], list[int | None], int], point: int
) -> None:
    """Cut at any frame end, the position is the one the client has then; mid-frame, no boundary."""
    frames, positions, _ = session
    data, ends = _encode(frames, mask=False)
    cut = point % (len(data) + 1)
    walker = ServerStream()
    walker.feed(data[:cut])
    if cut in ends:
        assert walker.at_boundary
        assert walker.position == positions[ends.index(cut)]
    elif cut:
        assert not walker.at_boundary


def test_server_stream_sees_the_owners_close_frame() -> None:
    """A Close from the owner marks its session as ending on purpose."""
    walker = ServerStream()
    data, _ = _encode([_hello(10, 0)], mask=False)
    walker.feed(data)
    walker.feed(Frame(Opcode.CLOSE, Close(4009, "disabled").serialize()).serialize(mask=False))
    assert walker.closing
    assert walker.at_boundary


def test_server_stream_with_a_masked_frame_is_broken() -> None:
    """A masked frame from the owner cannot be walked: the relay may not switch owners then."""
    walker = ServerStream()
    walker.feed(Frame(Opcode.BINARY, b"x").serialize(mask=True))
    assert walker.broken


def test_server_stream_tracks_port_notices() -> None:
    """The hello's port state, then port_down / port_up notices, are remembered."""
    walker = ServerStream()
    data, _ = _encode([_hello(0, 0, port="down")], mask=False)
    walker.feed(data)
    assert not walker.port_up
    data, _ = _encode([_notice("port_up", vm="vm-a")], mask=False)
    walker.feed(data)
    assert walker.port_up


@pytest.mark.parametrize(
    ("role", "notice", "writer"),
    [
        ("writer", None, True),
        ("spectator", None, False),
        ("writer", ("demoted", {"by": "user:bob", "writer": "user:bob"}), False),
        ("writer", ("writer_changed", {"writer": "user:bob", "you": "evicted"}), False),
        ("writer", ("writer_changed", {"writer": None}), True),
    ],
)
def test_server_stream_tracks_whether_the_client_writes(
    role: str, notice: tuple[str, dict[str, Any]] | None, writer: bool
) -> None:
    """The hello's role, then a demotion or an eviction: what a moved session asks for."""
    walker = ServerStream()
    specs = [_hello(0, 0, role=role)] + ([_notice(notice[0], **notice[1])] if notice else [])
    data, _ = _encode(specs, mask=False)
    walker.feed(data)
    assert walker.writer is writer


def test_first_frame_waits_for_the_whole_frame() -> None:
    """`first_frame` answers only once the first frame is whole, with its payload."""
    text = json.dumps({"type": "hello"}).encode()
    data, ends = _encode([(Opcode.TEXT, True, text), (Opcode.BINARY, True, b"abc")], mask=False)
    assert first_frame(data[: ends[0] - 1]) is None
    assert first_frame(data) == (ends[0], 0x81, text)
