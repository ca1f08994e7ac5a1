"""Where a relayed WebSocket stream stands: frame boundaries and the client's console position.

A gateway that relays a console session to the VM's owner (peerlink.py,
relay.py) passes bytes through unparsed, but to move the session to a new
owner when the old one dies it must know two things, without copying or
decoding what it relays:

- whether each direction is *between frames*, since the new owner can only
  be spliced in at a frame boundary (the client must never see half a frame
  from one owner followed by frames from another);
- the client's console position: the offset of the next output byte the
  client will receive, so that the new owner resumes exactly there
  (`?from=`, protocol.md "Offsets"): the hello's `offset - replay`, plus
  the payload of every binary frame, moved on by every `output_gap` notice
  (to its `last + 1`).

Both walkers read frame headers only (RFC 6455 5.2) and skip payloads by
arithmetic; only text frames from the owner (hello and notices, each a few
hundred bytes) are collected and decoded. Whether a frame is otherwise valid
is for the endpoints to decide: a walker only refuses what it cannot walk
(`broken`), after which the relay can no longer switch owners.

No I/O.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import TypeGuard

__all__ = [
    "MAX_TEXT_BYTES",
    "ClientStream",
    "ServerStream",
    "first_frame",
    "header_length",
]

#: A text message from the owner longer than this is passed on but not decoded
#: (the hello and the notices are far smaller).
MAX_TEXT_BYTES = 65536

_OP_CONT = 0x0
_OP_TEXT = 0x1
_OP_BINARY = 0x2
_OP_CLOSE = 0x8
_OP_PING = 0x9
_OP_PONG = 0xA
_MASK = 0x80
_FIN = 0x80


def header_length(first_two: bytes | bytearray) -> int:
    """The length of a frame header from its first two bytes: 2 to 14."""
    code = first_two[1] & 0x7F
    ext = 0 if code < 126 else (2 if code == 126 else 8)
    return 2 + ext + (4 if first_two[1] & _MASK else 0)


def _payload_length(head: bytes | bytearray) -> int:
    code = head[1] & 0x7F
    if code < 126:
        return code
    ext = 2 if code == 126 else 8
    return int.from_bytes(head[2 : 2 + ext], "big")


class _FrameWalker:
    """Frame headers in, boundaries out; payload bytes are skipped, not copied.

    Attributes:
        at_boundary: no frame is begun and unfinished.
        broken: the stream cannot be walked (a mask bit on the wrong side);
            nothing is walked after it.
    """

    _masked: bool  # whether frames in this direction must carry a mask

    def __init__(self) -> None:
        self.at_boundary = True
        self.broken = False
        self._head = bytearray()  # a header that arrived in pieces
        self._remaining = 0  # payload bytes of the current frame still to come
        self._opcode = 0  # of the current frame (a continuation's message opcode)
        self._message = 0  # opcode of the fragmented message in progress, 0 if none

    def feed(self, data: bytes | bytearray) -> int:
        """Walk `data`, the next bytes of the stream.

        Returns:
            How many bytes of `data` end with the last frame that ends in it
            (0 when none does). `data[result:]` is the start of an unfinished
            frame unless `at_boundary`.
        """
        n = len(data)
        i = 0
        last = 0
        while i < n and not self.broken:
            if self._remaining:
                take = min(self._remaining, n - i)
                self._payload(data, i, take)
                i += take
                self._remaining -= take
                if self._remaining == 0:
                    self._frame_done()
                    last = i
                continue
            # A header: parsed in place when whole in `data`, else gathered.
            head: bytes | bytearray
            if not self._head and n - i >= 2 and n - i >= header_length(data[i : i + 2]):
                size = header_length(data[i : i + 2])
                head = data[i : i + size]
                i += size
            else:
                self._head.append(data[i])
                i += 1
                self.at_boundary = False
                if len(self._head) < 2 or len(self._head) < header_length(self._head):
                    continue
                head = bytes(self._head)
                self._head.clear()
            self.at_boundary = False
            if bool(head[1] & _MASK) != self._masked:
                self.broken = True
                break
            self._remaining = _payload_length(head)
            self._begin(head[0])
            if self._remaining == 0:
                self._frame_done()
                last = i
        return last

    def _begin(self, first: int) -> None:
        opcode = first & 0x0F
        fin = bool(first & _FIN)
        if opcode == _OP_CONT:
            self._opcode = self._message
            if fin:
                self._message = 0
        else:
            self._opcode = opcode
            if opcode < _OP_CLOSE and not fin:
                self._message = opcode
        self._start(self._opcode, fin)

    def _frame_done(self) -> None:
        self.at_boundary = True
        self._end()

    # Hooks for the server side.
    def _start(self, opcode: int, fin: bool) -> None:
        pass

    def _payload(self, data: bytes | bytearray, start: int, n: int) -> None:
        pass

    def _end(self) -> None:
        pass


class ClientStream(_FrameWalker):
    """The client's frames to the owner (masked): where they end, and the unfinished one.

    Attributes:
        unfinished: the bytes of the frame in progress (empty at a boundary),
            which an owner that dies now never acted on: a new owner must get
            them again. Copied only when a chunk ends inside a frame.
        unfinished_whole: `unfinished` holds the whole start of that frame
            (false once it grew past `max_unfinished`).
        pongs: Pong frames the client sent (its answers to the owner's pings).
        messages: text and binary messages the client sent (its keys and requests):
            what the relay counts as the client's activity (`Relay.clocks`).
    """

    _masked = True

    def __init__(self, max_unfinished: int = 1 << 20) -> None:
        super().__init__()
        self.max_unfinished = max_unfinished
        self.unfinished = bytearray()
        self.unfinished_whole = True
        self.pongs = 0
        self.messages = 0

    def _start(self, opcode: int, fin: bool) -> None:
        if opcode == _OP_PONG:
            self.pongs += 1
        elif fin and opcode in (_OP_TEXT, _OP_BINARY):
            self.messages += 1  # at its final frame: a fragmented message counts once

    def track(self, data: bytes | bytearray) -> None:
        """`feed`, keeping `unfinished` up to date."""
        done = self.feed(data)
        if self.at_boundary:
            if self.unfinished:
                self.unfinished.clear()
            self.unfinished_whole = True
            return
        if not self.unfinished_whole:
            if not done:
                return
            self.unfinished_whole = True  # a new frame began in this chunk
        if done:
            self.unfinished[:] = data[done:]
        else:
            self.unfinished += data
        if len(self.unfinished) > self.max_unfinished:
            self.unfinished.clear()
            self.unfinished_whole = False


class ServerStream(_FrameWalker):
    """The owner's frames to the client (unmasked): boundaries and the client's position.

    Attributes:
        position: the offset of the next console byte the client will get;
            None until the hello has been walked.
        hello: the owner's hello, once walked.
        port_up: whether the owner last said its port is up (hello, then notices).
        writer: whether the client is the writer as the owner last said (its hello's
            role, until a `demoted` notice or an eviction): a session that moves to a
            new owner asks for what it has, never for more.
        closing: the owner has begun a Close frame (its session is ending on
            purpose: the relay passes that on and never switches owners).
        pings: Ping frames the owner sent (its keepalive; the client must answer).
        on_idle_warning: called when an `idle_warning` notice passes (the relay keeps
            the time with the session's clocks).
    """

    _masked = False

    def __init__(self, position: int | None = None) -> None:
        super().__init__()
        self.position = position
        self.hello: dict[str, object] | None = None
        self.port_up = True
        self.writer = False
        self.closing = False
        self.pings = 0
        self.on_idle_warning: Callable[[], None] | None = None
        self._text: bytearray | None = None  # the text message being collected
        self._text_fin = False
        self._binary = False

    def _start(self, opcode: int, fin: bool) -> None:
        self._binary = opcode == _OP_BINARY
        if opcode == _OP_TEXT:
            if self._text is None:
                self._text = bytearray()
            self._text_fin = fin
        elif opcode == _OP_CLOSE:
            self.closing = True
        elif opcode == _OP_PING:
            self.pings += 1

    def _payload(self, data: bytes | bytearray, start: int, n: int) -> None:
        if self._binary:
            if self.position is not None:
                self.position += n
        elif self._text is not None and self._opcode == _OP_TEXT:
            if len(self._text) + n <= MAX_TEXT_BYTES:
                self._text += data[start : start + n]
            else:
                self._text = bytearray(b"\xff")  # undecodable: passed on, not read

    def _end(self) -> None:
        if self._opcode == _OP_TEXT and self._text_fin and self._text is not None:
            text, self._text = bytes(self._text), None
            self.message(text)

    def message(self, text: bytes) -> None:
        """Take in one whole text message from the owner (the hello, a notice, an error)."""
        try:
            msg = json.loads(text)
        except ValueError:
            return
        if not isinstance(msg, dict):
            return
        kind = msg.get("type")
        if kind == "hello":
            offset, replay = msg.get("offset"), msg.get("replay")
            if _is_offset(offset) and _is_offset(replay) and replay <= offset:
                self.hello = msg
                self.position = offset - replay
                self.port_up = msg.get("port", "up") == "up"
                self.writer = msg.get("role") == "writer"
        elif kind == "notice":
            event = msg.get("event")
            last = msg.get("last")
            if event == "output_gap" and _is_offset(last) and self.position is not None:
                self.position = max(self.position, last + 1)
            elif event == "port_down":
                self.port_up = False
            elif event == "port_up":
                self.port_up = True
            elif event == "demoted" or (event == "writer_changed" and msg.get("you") == "evicted"):
                self.writer = False
            elif event == "idle_warning" and self.on_idle_warning is not None:
                self.on_idle_warning()


def _is_offset(value: object) -> TypeGuard[int]:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


def first_frame(buf: bytes | bytearray) -> tuple[int, int, bytes] | None:
    """The first whole unmasked frame in `buf`: (its length, its first byte, its payload).

    None until it is whole. Used on a new owner's stream, whose first frame
    must be its hello (a final text frame).
    """
    if len(buf) < 2 or len(buf) < header_length(buf):
        return None
    size = header_length(buf)
    end = size + _payload_length(buf)
    if len(buf) < end:
        return None
    return end, buf[0], bytes(buf[size:end])
