"""Telnet framing for `telnet://` serial ports, without I/O.

relayd is a telnet *client* of QEMU's telnet chardev, libvirt and ser2net; the
simulated guest (`relayd.sim`) uses the same codec as a *server*. Bytes go in
through `TelnetCodec.receive`, which returns events in stream order; replies
to option negotiation accumulate and are fetched with `data_to_send`, as in
websockets' sans-I/O protocol.

The parser is a small state machine over the states below. It keeps nothing
but its state, one pending option verb and a capped subnegotiation buffer, so
input may be split anywhere (an IAC apart from its command, SB apart from SE)
and memory stays bounded whatever the peer sends.

    DATA  --IAC-->  COMMAND  --IAC-->  DATA          (literal 0xFF)
                             --BRK-->  DATA          (BreakReceived)
                             --WILL/WONT/DO/DONT-->  OPTION --any--> DATA
                             --SB-->   SUB  --IAC--> SUB_IAC --SE--> DATA
                                                             --IAC--> SUB (literal)
                             --other-> DATA          (NOP, GA, AYT, ... ignored)

Option negotiation follows RFC 1143's "Q method" without its queue bits: we
never answer a message that only confirms the state we are already in, so two
codecs wired back to back settle after one round trip. QEMU's telnet parser
swallows exactly three bytes after any IAC but IAC IAC and IAC BRK, so the
client never sends NOP or subnegotiations.

QEMU's telnet chardev is not a conforming server: it un-doubles IAC IAC in
what it receives, but sends the guest's output raw, 0xFF and all, and after
its fixed opening (`QEMU_GREETING`) it never sends a command again. A client
codec that sees exactly that opening therefore takes everything after it as
data (`raw_peer`), so a guest printing 0xFF is neither corrupted nor able to
stall the console with a stray IAC SB. What we send is still IAC-escaped,
which QEMU expects. ser2net and libvirt's proxies open differently and get
standard telnet.

A subnegotiation longer than `MAX_SUBNEGOTIATION` ends the subnegotiation:
a peer that never sends IAC SE cannot swallow the console.

CR NUL is turned into CR only while the peer has not agreed to send BINARY
(RFC 854's NVT rule); in binary mode every byte is data. We do not add NUL
after CR when sending: relayd and QEMU negotiate BINARY at once.
"""

from __future__ import annotations

from dataclasses import dataclass

__all__ = [
    "BINARY",
    "BRK",
    "ECHO",
    "IAC",
    "SGA",
    "BreakReceived",
    "DataReceived",
    "TelnetCodec",
    "TelnetEvent",
]

# Commands (RFC 854).
SE = 240
NOP = 241
BRK = 243
SB = 250
WILL = 251
WONT = 252
DO = 253
DONT = 254
IAC = 255

# Options.
BINARY = 0  # RFC 856
ECHO = 1  # RFC 857
SGA = 3  # RFC 858, suppress go-ahead

MAX_SUBNEGOTIATION = 1024
"""Bytes of one subnegotiation kept; past this the subnegotiation is abandoned."""

QEMU_GREETING = bytes((IAC, WILL, ECHO, IAC, WILL, SGA, IAC, WILL, BINARY, IAC, DO, BINARY))
"""What QEMU's telnet chardev sends first, and the last command it ever sends."""

_CR = 0x0D
_NUL = 0x00

# Parser states.
_DATA, _COMMAND, _OPTION, _SUB, _SUB_IAC = range(5)

# RFC 1143 option states, one per side ("us" = our side, "him" = the peer's).
_NO, _YES, _WANTNO, _WANTYES = range(4)


@dataclass(frozen=True)
class DataReceived:
    """Console bytes, with the telnet framing removed."""

    data: bytes


@dataclass(frozen=True)
class BreakReceived:
    """The peer sent IAC BRK: a serial BREAK."""


TelnetEvent = DataReceived | BreakReceived


class TelnetCodec:
    """Telnet framing and option negotiation for one connection.

    Args:
        server_side: negotiate as QEMU's telnet chardev does (we echo, we send
            binary) rather than as relayd's client side.
        detect_qemu: (client side) take a peer that opens exactly as QEMU does
            for QEMU, and everything after its opening as data.
    """

    def __init__(self, *, server_side: bool = False, detect_qemu: bool = True) -> None:
        self.server_side = server_side
        self._detect_qemu = detect_qemu and not server_side
        if server_side:
            # What QEMU announces: it echoes, suppresses go-ahead, and is 8-bit clean.
            self._ours = frozenset({BINARY, SGA, ECHO})
            self._theirs = frozenset({BINARY, SGA})
            self._initial = ((WILL, ECHO), (WILL, SGA), (WILL, BINARY), (DO, BINARY))
        else:
            self._ours = frozenset({BINARY, SGA})
            self._theirs = frozenset({BINARY, SGA, ECHO})
            self._initial = ((WILL, BINARY), (DO, BINARY), (DO, SGA), (WILL, SGA))
        self._us: dict[int, int] = {}
        self._him: dict[int, int] = {}
        self._state = _DATA
        self._verb = 0
        self._sub = bytearray()
        self._after_cr = False
        self._out = bytearray()
        self._opening = bytearray()  # the peer's first bytes, until we know who it is
        self.raw_peer = False

    # Sending.

    def initial(self) -> bytes:
        """Start option negotiation.

        Returns:
            The bytes to send first: the opening requests plus anything
            already pending, as `data_to_send` would return them. Calling it
            again repeats no request that is already on its way.
        """
        for verb, option in self._initial:
            if verb == WILL and self._us.get(option, _NO) == _NO:
                self._us[option] = _WANTYES
                self._send(WILL, option)
            elif verb == DO and self._him.get(option, _NO) == _NO:
                self._him[option] = _WANTYES
                self._send(DO, option)
        return self.data_to_send()

    def data_to_send(self) -> bytes:
        """Negotiation replies accumulated by `receive` and `initial`; clears them."""
        out = bytes(self._out)
        self._out.clear()
        return out

    @staticmethod
    def encode(data: bytes) -> bytes:
        """Frame console bytes for the wire: 0xFF is doubled as IAC IAC."""
        return data.replace(b"\xff", b"\xff\xff")

    @staticmethod
    def brk() -> bytes:
        """A serial BREAK on the wire: IAC BRK."""
        return bytes((IAC, BRK))

    def local_enabled(self, option: int) -> bool:
        """Whether the peer has agreed that we perform `option` (we sent WILL, it said DO)."""
        return self._us.get(option, _NO) == _YES

    def remote_enabled(self, option: int) -> bool:
        """Whether we have agreed that the peer performs `option`."""
        return self._him.get(option, _NO) == _YES

    # Receiving.

    def receive(self, data: bytes) -> list[TelnetEvent]:
        """Parse bytes from the peer.

        Args:
            data: any chunk of the stream; sequences may be split anywhere.

        Returns:
            Data and breaks in stream order. Data never exceeds the input
            size, and negotiation replies (see `data_to_send`) never exceed
            it either. Malformed input is tolerated, never raised on.
        """
        if self.raw_peer:
            return [DataReceived(bytes(data))] if data else []
        if self._detect_qemu and len(self._opening) < len(QEMU_GREETING):
            need = len(QEMU_GREETING) - len(self._opening)
            head, rest = data[:need], data[need:]
            self._opening += head
            events = self._parse(head)
            if not QEMU_GREETING.startswith(self._opening):
                self._opening += bytes(len(QEMU_GREETING))  # not QEMU: decide once
            elif self._opening == QEMU_GREETING:
                self.raw_peer = True
                if rest:
                    events.append(DataReceived(bytes(rest)))
                return events
            return _merged(events + self._parse(rest)) if rest else events
        return self._parse(data)

    def _parse(self, data: bytes) -> list[TelnetEvent]:
        events: list[TelnetEvent] = []
        pending = bytearray()
        i, n = 0, len(data)
        while i < n:
            if self._state == _DATA:
                # Fast path: copy everything up to the next IAC in one slice.
                j = data.find(IAC, i)
                end = n if j < 0 else j
                if end > i:
                    self._take_data(data[i:end], pending)
                if j < 0:
                    break
                self._state = _COMMAND
                i = j + 1
                continue
            if self._state == _SUB:
                # Subnegotiation bytes up to the next IAC, kept up to the cap.
                j = data.find(IAC, i)
                end = n if j < 0 else j
                room = MAX_SUBNEGOTIATION - len(self._sub)
                if end - i > room:
                    # Never-ending subnegotiation: abandon it, read on as data.
                    self._sub.clear()
                    self._state = _DATA
                    i += room
                    continue
                self._sub += data[i:end]
                if j < 0:
                    break
                self._state = _SUB_IAC
                i = j + 1
                continue
            byte = data[i]
            i += 1
            if self._state == _COMMAND:
                self._after_cr = False
                if byte == IAC:
                    pending.append(IAC)
                    self._state = _DATA
                elif byte == BRK:
                    if pending:
                        events.append(DataReceived(bytes(pending)))
                        pending.clear()
                    events.append(BreakReceived())
                    self._state = _DATA
                elif WILL <= byte <= DONT:
                    self._verb = byte
                    self._state = _OPTION
                elif byte == SB:
                    self._sub.clear()
                    self._state = _SUB
                else:  # NOP, GA, AYT, DM, a stray SE...: nothing to do for a console.
                    self._state = _DATA
            elif self._state == _OPTION:
                self._negotiate(self._verb, byte)
                self._state = _DATA
            else:  # _SUB_IAC
                if byte == IAC:
                    if len(self._sub) < MAX_SUBNEGOTIATION:
                        self._sub.append(IAC)
                    self._state = _SUB
                else:
                    # SE ends it; anything else is a peer that forgot SE: end the
                    # subnegotiation and read the byte as a command (as libtelnet does).
                    self._sub.clear()
                    self._state = _DATA
                    if byte != SE:
                        self._state = _COMMAND
                        i -= 1
        if pending:
            events.append(DataReceived(bytes(pending)))
        return events

    def _take_data(self, chunk: bytes, pending: bytearray) -> None:
        if not self.remote_enabled(BINARY):
            # NVT: CR NUL means a bare CR; the NUL may start the next chunk.
            if self._after_cr and chunk[0] == _NUL:
                chunk = chunk[1:]
            self._after_cr = chunk.endswith(b"\r")
            chunk = chunk.replace(b"\r\x00", b"\r")
        pending += chunk

    # Negotiation (RFC 1143, no queue bits).

    def _send(self, verb: int, option: int) -> None:
        self._out += bytes((IAC, verb, option))

    def _negotiate(self, verb: int, option: int) -> None:
        if verb in (WILL, WONT):
            self._his_offer(option, enable=verb == WILL)
        else:
            self._his_request(option, enable=verb == DO)

    def _his_offer(self, option: int, *, enable: bool) -> None:
        """WILL/WONT: the peer offers, or stops, performing `option` itself."""
        state = self._him.get(option, _NO)
        if enable:
            if state == _NO:
                if option in self._theirs:
                    self._him[option] = _YES
                    self._send(DO, option)
                else:
                    self._send(DONT, option)
            elif state in (_WANTYES, _WANTNO):
                # WANTNO answered by WILL is a peer error; RFC 1143 settles on NO.
                self._him[option] = _YES if state == _WANTYES else _NO
        else:
            if state == _YES:
                self._send(DONT, option)
            self._him[option] = _NO

    def _his_request(self, option: int, *, enable: bool) -> None:
        """DO/DONT: the peer asks us to start, or stop, performing `option`."""
        state = self._us.get(option, _NO)
        if enable:
            if state == _NO:
                if option in self._ours:
                    self._us[option] = _YES
                    self._send(WILL, option)
                else:
                    self._send(WONT, option)
            elif state in (_WANTYES, _WANTNO):
                self._us[option] = _YES if state == _WANTYES else _NO
        else:
            if state == _YES:
                self._send(WONT, option)
            self._us[option] = _NO


def _merged(events: list[TelnetEvent]) -> list[TelnetEvent]:
    """Join adjacent data events (a chunk parsed in two parts reads as one)."""
    out: list[TelnetEvent] = []
    for event in events:
        if out and isinstance(event, DataReceived) and isinstance(out[-1], DataReceived):
            out[-1] = DataReceived(out[-1].data + event.data)
        else:
            out.append(event)
    return out
