"""WebSocket frames on the keystroke path, beside websockets rather than instead of it.

A console session's traffic is almost all tiny: each keystroke is one masked
binary frame of a few bytes from the client, each echo one unmasked binary
frame back. websockets' general parser (a generator per frame, a `Frame`
object, its checks, the event list) cost about half of relayd's own work per
keystroke round trip, so those two frames take a short path here and every
other frame still goes through websockets:

- `binary_frame` builds the output frame header with `struct`;
- `ClientFrameReader` splits the client's byte stream at frame boundaries.
  A whole, final, masked binary frame of at most 125 bytes that arrives
  while websockets is between messages is unmasked here and returned as
  `bytes`; all other bytes (text, control, fragmented, oversized, malformed
  frames) are fed to websockets exactly when it would have received them, and
  its events are returned in stream order. A property test checks that the
  events, the bytes websockets answers with and its state are the same as
  with websockets alone, for any stream cut anywhere.

No I/O.
"""

from __future__ import annotations

import struct

from websockets.frames import Frame
from websockets.protocol import State
from websockets.server import ServerProtocol

try:
    from websockets.speedups import apply_mask
except ImportError:  # pragma: no cover - websockets built without its C extension
    from websockets.utils import apply_mask

_SHORT = struct.Struct("!BB")
_MEDIUM = struct.Struct("!BBH")
_LONG = struct.Struct("!BBQ")

FIN_BINARY = 0x82  # FIN, no RSV bits, opcode 2
MASKED = 0x80
SHORT_MAX = 125  # the largest payload whose length fits the second header byte
# First bytes (FIN aside) of frames websockets parses and goes on: data, ping, pong, with no
# RSV bit. Any other frame (a Close, garbage) may end parsing, so websockets gets it at once.
_PLAIN = frozenset({0x00, 0x01, 0x02, 0x09, 0x0A})
# Plain frames can end parsing too (a continuation with no message open): websockets gets
# what was walked every this many frames, so input it would discard is not walked for long.
_WALK_MAX = 16


# The header of every final binary frame of 0..125 bytes, by length: echoed keys are these.
SHORT_HEADERS = tuple(_SHORT.pack(FIN_BINARY, n) for n in range(126))


def _header(n: int) -> bytes:
    """The header of a final, unmasked binary frame carrying `n` bytes."""
    if n < 126:
        return SHORT_HEADERS[n]
    if n < 65536:
        return _MEDIUM.pack(FIN_BINARY, 126, n)
    return _LONG.pack(FIN_BINARY, 127, n)


def binary_frame(data: bytes) -> bytes:
    """One final, unmasked binary frame, serialized once for every client.

    Equal byte for byte to websockets' ``Frame(BINARY, data).serialize(mask=False)``
    (a property test checks it); building it through a ``Frame`` object and its
    checks cost about 3 µs a chunk.
    """
    return _header(len(data)) + data


def binary_frame_of(pieces: list[bytes | memoryview], n: int) -> bytes:
    """`binary_frame` of the `n` bytes in `pieces`, joined once (a catch-up read is not
    joined first and then copied again behind the header)."""
    return b"".join([_header(n), *pieces])


def frame_extent(buf: bytes | bytearray, pos: int) -> int:
    """The whole length of the frame starting at ``buf[pos]``; -1 until its header says.

    Only the length is read (RFC 6455 5.2: 7-bit, 16-bit or 64-bit payload
    length, then a 4-byte key when the mask bit is set); whether the frame is
    valid is websockets' to decide.
    """
    if len(buf) - pos < 2:
        return -1
    second = buf[pos + 1]
    code = second & 0x7F
    key = 4 if second & MASKED else 0
    if code < 126:
        return 2 + key + code
    ext = 2 if code == 126 else 8
    if len(buf) - pos < 2 + ext:
        return -1
    length = int.from_bytes(buf[pos + 2 : pos + 2 + ext], "big")
    return 2 + ext + key + length


class ClientFrameReader:
    """Client bytes in; in stream order, keystroke payloads (`bytes`) and websockets' frames out.

    Tracks where frames begin so that websockets, which gets every byte not
    taken here, is always fed at the moment it would have been without this
    reader. Holds back only the start of a frame that may qualify for the
    short path (at most 131 bytes) until it is whole, which is also when
    websockets would have acted on it.
    """

    def __init__(self, protocol: ServerProtocol) -> None:
        self.protocol = protocol
        limits = [SHORT_MAX]
        if protocol.max_message_size is not None:
            limits.append(protocol.max_message_size)
        if protocol.max_fragment_size is not None:
            limits.append(protocol.max_fragment_size)
        self._short_max = min(limits)
        self._held = b""  # the start of a short-path candidate
        self._head = bytearray()  # a header websockets has begun, until its length is known
        self._owed = 0  # bytes websockets still needs to finish its current frame
        # Set once websockets throws input away (a Close received, or it failed the
        # connection): frame boundaries no longer matter and are not looked for.
        self._discarding = False
        # True when the last feed gave websockets bytes: it may have something to send.
        self.fed_protocol = False

    @property
    def at_boundary(self) -> bool:
        """Whether every frame begun has been taken whole (the next byte starts a frame)."""
        return not (self._held or self._head or self._owed or self._discarding)

    def feed(self, data: bytes) -> list[bytes | Frame]:
        """Take bytes from the client; return what they completed, in order."""
        self.fed_protocol = False
        if self._held:
            data, self._held = self._held + data, b""
        events: list[bytes | Frame] = []
        if self._discarding:
            self._pass(data, 0, len(data), events)
            return events
        protocol = self.protocol
        n = len(data)
        pos = 0  # next byte to classify
        slow = 0  # first byte of the run that websockets is to get
        walked = 0  # frames in that run
        while pos < n:
            if self._owed:
                step = min(self._owed, n - pos)
                self._owed -= step
                pos += step
                continue
            if self._head:
                pos = self._continue_head(data, pos)
                continue
            if data[pos] == FIN_BINARY:
                if pos + 1 == n:  # is it short? the next feed says
                    if pos > slow and self._pass(data, slow, pos, events):
                        self._pass(data, pos, n, events)
                        return events
                    self._held = data[pos:]
                    return events
                second = data[pos + 1]
                if second & MASKED and (second & 0x7F) <= self._short_max:
                    # websockets must see what came before first: it decides whether a
                    # binary frame may start a message here.
                    if pos > slow:
                        discarding = self._pass(data, slow, pos, events)
                        slow = pos
                        if discarding:
                            break
                    if protocol.state is State.OPEN and protocol.current_size is None:
                        end = pos + 6 + (second & 0x7F)
                        if end > n:
                            self._held = data[pos:]
                            return events
                        events.append(apply_mask(data[pos + 6 : end], data[pos + 2 : pos + 6]))
                        pos = slow = end
                        continue
            extent = frame_extent(data, pos)
            plain = data[pos] & 0x7F in _PLAIN and (pos + 1 == n or data[pos + 1] & MASKED)
            if extent < 0:
                self._head = bytearray(data[pos:])
                pos = n
            elif pos + extent > n:
                self._owed = pos + extent - n
                pos = n
            else:
                pos += extent
            walked += 1
            if not plain or walked >= _WALK_MAX:  # websockets may stop parsing here
                discarding = self._pass(data, slow, pos, events)
                slow, walked = pos, 0
                if discarding:
                    break
        if n > slow:
            self._pass(data, slow, n, events)
        return events

    def _continue_head(self, data: bytes, pos: int) -> int:
        """Add to a header begun in an earlier feed; once its length is known, owe the rest."""
        self._head += data[pos : pos + 14]
        extent = frame_extent(self._head, 0)
        if extent < 0:
            return pos + min(14, len(data) - pos)
        taken_before = len(self._head) - min(14, len(data) - pos)
        self._head.clear()
        self._owed = extent - taken_before
        return pos

    def _pass(self, data: bytes, start: int, stop: int, events: list[bytes | Frame]) -> bool:
        """Give websockets ``data[start:stop]`` and collect the frames it completed.

        Returns whether websockets now throws input away (see `_discarding`).
        """
        self.fed_protocol = True
        protocol = self.protocol
        protocol.receive_data(data[start:stop])
        events.extend(e for e in protocol.events_received() if isinstance(e, Frame))
        if protocol.close_rcvd is not None or protocol.parser_exc is not None:
            self._discarding = True
        return self._discarding

    def feed_eof(self) -> list[bytes | Frame]:
        """The client half-closed: websockets gets what was held back, then the end."""
        events: list[bytes | Frame] = []
        held, self._held = self._held, b""
        if held:
            self._pass(held, 0, len(held), events)
        self.fed_protocol = True
        self.protocol.receive_eof()
        events.extend(e for e in self.protocol.events_received() if isinstance(e, Frame))
        return events
