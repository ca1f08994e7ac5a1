"""One client's console session: the WebSocket phase of a connection.

The session is driven by callbacks (bytes in from the transport, output from
the hub), with websockets' sans-I/O protocol doing the framing, so an idle
session costs no task and little memory.

Output never waits and is never copied per client: each session is a cursor
into the hub's ring. A caught-up client gets each chunk as the hub reads it
(one frame serialized for all clients); a client whose transport is over its
high-water mark (`output_queue_bytes`) is simply not written to, and when it
drains it continues from its cursor, reading the ring. Only a client that
falls further behind than the ring holds skips ahead, with an `output_gap`
notice naming the first and last offsets it missed. Input from the writer
goes to the hub, which pauses this transport when the serial line is behind.

While a client's output is over the high-water mark, it is read once per
drain: after one read in that state, whatever it held, the client is not
read again until its output falls below the low-water mark. Pings want
pongs and bad messages want errors, and a client sending them without ever
reading would otherwise grow our buffer without end; a slow client that does
read still gets its keys (a Ctrl-C during a flood) and pongs through. What
one connection can make the gateway hold is thus its high-water mark, the
answers to a read or two (past `MAX_UNREAD_BYTES` more it is dropped) and
websockets' bounded frame buffer. A client that never drains misses its
keepalive and is dropped within two intervals.

A dropped client is sent a TCP reset, never a FIN: the kernel sends a FIN only
after the output it holds, which a client that reads nothing never takes, so
the client would never learn of its end and the socket would outlive the
session, buffers and all. For the same reason a close that cannot flush is
reset after `CLOSE_TIMEOUT`.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from typing import TYPE_CHECKING

from websockets.frames import Frame, Opcode
from websockets.protocol import State
from websockets.server import ServerProtocol

from . import control
from .audit import audit
from .auth import Principal
from .errors import BadMessageError
from .frames import ClientFrameReader, binary_frame_of
from .hub import MAX_QUEUED_HOOKS
from .inputqueue import MAX_QUEUED_BREAKS
from .linger import reset_connection
from .log import get_logger
from .rbac import at_least
from .throttle import TokenBucket

if TYPE_CHECKING:
    from .config import Role
    from .hub import ConsoleHub

log = get_logger("relayd.session")

# websockets logs every frame (keystrokes included) at DEBUG on its own logger.
# Sessions get a logger pinned at WARNING so no log configuration can leak input.
WS_LOGGER = logging.getLogger("relayd.websocket")
WS_LOGGER.setLevel(logging.WARNING)

CLOSE_TIMEOUT = 5.0
PUMP_CHUNK = 65536
# Past its high-water mark a client is not read, so only the answers to what one read
# held (pongs, errors) and notices can pile up; over this much more, it is dropped.
MAX_UNREAD_BYTES = 2**20
# Clocks that crossed gateways are whole milliseconds, each rounded up (forwarding.py).
WARNED_SLACK = 0.005


class ConsoleSession:
    """A client attached to a `ConsoleHub` over a WebSocket."""

    def __init__(
        self,
        *,
        transport: asyncio.Transport,
        hub: ConsoleHub,
        session_id: str,
        principal: Principal,
        role: Role,
        peer: str,
        region: str,
        output_queue_bytes: int,
        relayed: bool = False,
    ) -> None:
        self.transport = transport
        # Relayed by another gateway (cluster mode): that gateway can move the session.
        self.relayed = relayed
        self._handed_off = False
        self.hub = hub
        self.session_id = session_id
        self.principal = principal
        self.rbac_role: Role = role
        self.role = "spectator"
        self.peer = peer
        self.region = region
        limits = hub.limits
        self._max_paste = limits.max_paste_bytes
        self.ws = ServerProtocol(
            state=State.OPEN, max_size=4 * limits.max_paste_bytes + 4096, logger=WS_LOGGER
        )
        # Keystrokes are unmasked there; every other frame is websockets' (see frames.py).
        self._reader = ClientFrameReader(self.ws)
        # The session's clocks (`max_session_seconds`, `idle_timeout`): from now, unless
        # it moved here with its own (`start`). `attached` is this gateway's part, audited.
        self.attached = time.monotonic()
        self.started = self.attached
        self.last_input = self.started
        self.bytes_in = 0
        self.bytes_out = 0
        self.end_reason = ""
        self._fragments: list[bytes] = []
        self._fragment_opcode: Opcode | None = None
        self.cursor = 0  # absolute offset of the next console byte this client gets
        self._loop = asyncio.get_running_loop()  # looked up once: deliver() runs per chunk
        rate = limits.output_bytes_per_s
        self._out_bucket = (
            TokenBucket(rate, max(PUMP_CHUNK, rate // 4), now=self._loop.time()) if rate else None
        )
        self._throttle_timer: asyncio.TimerHandle | None = None
        # Set while input that came with the session (it moved here) waits for the port.
        self._hold_timer: asyncio.TimerHandle | None = None
        self._held = b""
        self._hold_until: float | None = None  # when it goes whatever the port says (loop time)
        self._replaying = True
        self._write_paused = False
        self._awaiting_pong = False
        # Set while the hub holds this writer back (its paste waits for the line): its
        # pong is unread, not missing, and must not cost it the session.
        self._reading_paused = False
        # Unread output that drops the client (see the module docstring).
        self._max_buffered = output_queue_bytes + MAX_UNREAD_BYTES
        # When the client was sent its idle warning (monotonic); None: not since it last acted.
        self.idle_warned_at: float | None = None
        # Monotonic time when the credentials that opened the session expire, when the
        # gateway ends sessions then (`[auth] disconnect_expired`); None: never.
        self._credentials_end: float | None = None
        # First ping somewhere in the second half of the interval, by session id, so
        # sessions opened together do not all ping together.
        spread = 0.5 + int(session_id[:4], 16) / 0x20000
        self._next_ping = self.started + limits.keepalive_interval * spread
        self._closed = False  # the transport is gone
        # Data frames may be sent and taken: false once either side's Close is out (RFC 6455
        # 5.5.1) or the transport is gone, so an evicted writer's keys in flight are dropped.
        self._open = True
        self._close_timer: asyncio.TimerHandle | None = None
        # The connection's tidy-up, run once the transport is gone: after the upgrade the
        # session is the transport's protocol itself (see `connection_lost`).
        self.on_lost: Callable[[], None] | None = None
        # Cluster mode: how the connection relays this client to the VM's next owner
        # when this gateway lets go of the VM (see `hand_off`); None: it cannot.
        self.on_move: Callable[[], None] | None = None
        transport.set_write_buffer_limits(high=output_queue_bytes)

    # -- attach -------------------------------------------------------------------

    def start(
        self,
        *,
        want_writer: bool,
        resume_from: int | None,
        hello: bool = True,
        started: float | None = None,
        last_active: float | None = None,
        warned: float | None = None,
    ) -> None:
        """Attach to the hub, then send hello, the replay and go live (all in one callback).

        Args:
            hello: False for a client that had its hello from another gateway and moved
                here with its console (cluster mode): it resumes at `resume_from`.
            started, last_active: a session that moved here keeps its clocks
                (`time.monotonic()` values), so a move never restarts its session
                length or idle time; None: from now.
            warned: when such a session's client was sent an idle warning, if it was:
                kept when it was this idle period's, so the client is not warned twice.
        """
        self.hub.attach(self, writer=want_writer)  # may displace a writer and run on_detach
        # After attaching: becoming the writer there is no activity of a moving client's.
        if started is not None:
            self.started = started
        if last_active is not None:
            self.last_input = last_active
            self.idle_warned_at = warned if self._warned_this_period(warned) else None
        previous_logged_out = self.hub.previous_logged_out
        hub = self.hub
        if resume_from is None:
            self.cursor = max(hub.start, hub.end - hub.limits.replay_bytes)
        else:
            self.cursor = min(resume_from, hub.end)
        extra: dict[str, object] = {"port": "up" if self.hub.port_up else "down"}
        if self.role == "writer":
            extra["previous_session_logged_out"] = previous_logged_out
        if hello:
            self.send_text(
                control.encode_hello(
                    vm=self.hub.vm.id,
                    session=self.session_id,
                    role=self.role,
                    offset=hub.end,
                    replay=hub.end - max(self.cursor, hub.start),
                    limits=self.hub.limits_for(self.role),
                    **extra,
                )
            )
        if resume_from is not None and resume_from > hub.end:
            self._offsets_reused(resume_from)
        self._pump()
        self._audit("session_started", role=self.role, resume_from=resume_from)

    def _warned_this_period(self, warned: float | None) -> bool:
        """Whether an idle warning sent at `warned` was for the idle period that began at
        `last_input`: sent once that period was old enough to warn. One a relay saw sent
        just as the client typed (the key on its way) was the period before's."""
        limits = self.hub.limits
        if warned is None or limits.idle_timeout is None:
            return False
        due = limits.idle_timeout - limits.idle_warning
        return warned - self.last_input >= due - WARNED_SLACK

    def _offsets_reused(self, resume_from: int) -> None:
        """The client resumes past the end of the output: it holds bytes at offsets this
        console hands out again (its history was lost: a wiped log, a region's Redis
        emptied), so what it has there is not what comes. Said, not clamped silently: the
        stream goes on at the end, and the client knows its view may not be this console's."""
        end = self.hub.end
        self._info("offsets_reused", resume_from=resume_from, end=end)
        self.send_text(
            control.encode_notice(
                "offsets_reused",
                first=end,
                last=resume_from - 1,
                bytes=resume_from - end,
                message=f"offset {resume_from} is past the end of this console's output; "
                f"output goes on at {end}",
            )
        )

    # -- HubClient ------------------------------------------------------------------

    def set_role(self, role: str) -> None:
        """Writer or spectator, as the hub decided; a new writer's idle clock starts now."""
        if role == "writer" and self.role != "writer":
            self._touch()
        self.role = role

    def deliver(self, offset: int, data: bytes, frame: bytes) -> None:
        """Live output: sent at once when the client is caught up, else read from the ring later."""
        if not self._open or self._write_paused or self._throttle_timer is not None:
            return
        n = len(data)
        bucket = self._out_bucket
        if self.cursor == offset and (bucket is None or bucket.take(n, self._loop.time())):
            self.transport.write(frame)
            self.cursor += n
            self.bytes_out += n
        else:
            self._pump()

    def _pump(self) -> None:
        """Send from the cursor to the end of the output until the transport or the cap pushes back.

        A client that fell so far behind that the hub no longer holds its
        cursor skips to the oldest byte held and is told exactly what it missed.
        """
        hub = self.hub
        while True:
            # Replay and resume may read the on-disk log; live catch-up only the ring.
            live_floor = hub.ring.start
            if self._replaying and self.cursor >= live_floor:
                self._replaying = False
            if self._write_paused or not self._open or self.cursor >= hub.end:
                return
            floor = hub.start if self._replaying else live_floor
            if self.cursor < floor:
                self._send_gap(self.cursor, floor - 1)
                self.cursor = floor
            budget = self._budget()
            if budget <= 0:
                return
            pieces = hub.pieces(self.cursor, min(budget, PUMP_CHUNK))
            if not pieces:
                if self.cursor >= live_floor:
                    return
                # Nothing at the cursor: a hole a crash left in the on-disk log (skip to what
                # is held next), or a log that could not be read (skip to what memory holds).
                # Either way the client is told exactly what it misses.
                resume = hub.next_held(self.cursor)
                if resume <= self.cursor:
                    resume = live_floor
                self._send_gap(self.cursor, resume - 1)
                self.cursor = resume
                continue
            n = sum(len(p) for p in pieces)
            self.transport.write(binary_frame_of(pieces, n))
            self._sent(n)

    def _budget(self) -> int:
        """Bytes the output cap allows now; arms a timer to resume when it allows none."""
        if self._out_bucket is None:
            return PUMP_CHUNK
        available = int(self._out_bucket.available(self._loop.time()))
        if available <= 0 and self._throttle_timer is None:
            wait = min(PUMP_CHUNK, self._out_bucket.burst) / self._out_bucket.rate / 4
            self._throttle_timer = self._loop.call_later(wait, self._throttle_over)
        return available

    def _throttle_over(self) -> None:
        self._throttle_timer = None
        self._pump()

    def _sent(self, n: int) -> None:
        self.cursor += n
        self.bytes_out += n
        if self._out_bucket is not None:
            self._out_bucket.reserve(n, self._loop.time())

    def send_text(self, text: str) -> None:
        """A control message, framed by the WebSocket protocol."""
        if self._closed or self.ws.state is not State.OPEN:
            return
        # "replace": a principal's name may hold a lone surrogate (from a JSON claim), which
        # UTF-8 cannot encode; strict encoding raised in the middle of a takeover.
        self.ws.send_text(text.encode("utf-8", "replace"))
        self._flush()

    def pause_input(self) -> None:
        """The serial line is behind: stop reading this client (its pongs wait too)."""
        if not self._closed:
            self._reading_paused = True
            self.transport.pause_reading()

    def resume_input(self) -> None:
        """The serial line caught up: read again, unless the client's output is too."""
        self._reading_paused = False
        self._read_again()

    def _read_again(self) -> None:
        """Read the client, unless the hub or its own unread output still holds it back."""
        if (
            not self._reading_paused
            and not self._write_paused
            and not self._closed
            and not self.transport.is_closing()
        ):
            self.transport.resume_reading()

    def hand_off(self, reason: str) -> None:
        """This gateway lets go of the VM (it moved, or the gateway drains): end the session.

        A relayed session's link is closed cleanly between frames, without a Close
        frame: that tells the gateway relaying it to move the client to the VM's
        next owner, where it resumes at its position (cluster/relay.py). A direct
        client is closed with 1001 and reconnects with `?from=`.
        """
        if not self.relayed:
            if self.on_move is not None and self._movable():
                self._move_away(reason)
            else:
                self.close(control.CLOSE_GOING_AWAY, f"{reason}; reconnect to resume")
            return
        if self._closed or self.ws.state is not State.OPEN:
            return
        self.end_reason = self.end_reason or f"handed off: {reason}"
        self._open = False
        self._flush()  # whole frames only: the relay resumes the client after the last one
        self._handed_off = True  # from here nothing more reaches the link (see `_flush`)
        self.ws.send_close(control.CLOSE_GOING_AWAY, "")  # never sent: websockets goes quiet
        self.transport.close()
        if self._close_timer is None:
            self._close_timer = self._loop.call_later(CLOSE_TIMEOUT, self._reset)

    def hold_input(self, held: bytes, seconds: float) -> None:
        """The session moved here and the port is not up yet: what its client sent on the
        way (`held`) and sends next waits for `port_up`, for at most `seconds`, as a relay
        holds it for a new owner elsewhere (control.MOVED_INPUT_WAIT).

        The client is not read meanwhile (TCP holds the rest: backpressure, no buffer
        here), and its pong waits with its keys, not held against it. Then it is read
        in order, as any session's: refused with `port_down` if the port is still down.
        """
        self._held = held
        self._hold_until = self._loop.time() + seconds
        self._reading_paused = True
        self.transport.pause_reading()
        self._hold_timer = self._loop.call_later(seconds, self._release_held)
        self._watch_port()

    def _watch_port(self) -> None:
        self.hub.next_change().add_done_callback(self._port_changed)

    def _port_changed(self, _: object) -> None:
        """The hub changed (port, lease, sessions): release the input once the port is up."""
        if self._hold_timer is None:
            return
        if self.hub.port_up:
            self._release_held()
        else:
            self._watch_port()

    def _release_held(self) -> None:
        """The port is up, or the wait is over: take the held input, read the client again."""
        timer, self._hold_timer = self._hold_timer, None
        if timer is not None:
            timer.cancel()
        held, self._held = self._held, b""
        self._hold_until = None
        if self._closed:
            return
        self._reading_paused = False
        if held:
            self.data_received(held)
        self._read_again()

    def _movable(self) -> bool:
        """Open both ways, and between frames both ways: a relay can take over from here."""
        return (
            not self._closed
            and self.ws.state is State.OPEN
            and self._reader.at_boundary
            and not self._fragments
        )

    def held_input(self) -> tuple[bytes, float | None]:
        """The input held for the port (see `hold_input`) and when it goes whatever the
        port says (loop time; None: nothing is held). A session that moves away while it
        holds input hands both to the relay that takes its client: the client's keys
        wait for the next owner's port, until the same deadline."""
        return self._held, self._hold_until

    def _move_away(self, reason: str) -> None:
        """Leave the client's connection to a relay that moves it to the VM's next owner.

        The session ends here as if its transport were gone (detached, audited), but
        the transport stays open: whole frames only were written to it, and the relay
        resumes the client at `cursor` on the next owner, under the same session id.
        """
        self._flush()
        self.end_reason = f"moved: {reason}"
        on_move, self.on_move = self.on_move, None
        self.on_lost = None  # the connection lives on, relaying
        self.connection_lost(None)
        if on_move is not None:
            on_move()

    def close(self, code: int, reason: str) -> None:
        """Start the closing handshake; the transport is dropped if the peer does not answer."""
        if self._closed or self.ws.state is not State.OPEN:
            return
        self.end_reason = self.end_reason or reason or f"closed with {code}"
        self._open = False
        self.ws.send_close(code, control.close_reason(reason))
        self._flush()  # arms the close timer: websockets now expects the peer to close
        if self._hold_timer is not None:
            self._release_held()  # its keys go nowhere now; its Close must be read

    # -- transport events -------------------------------------------------------------

    def pause_writing(self) -> None:
        """The client's buffer is full: stop writing; the ring keeps the output."""
        self._write_paused = True

    def resume_writing(self) -> None:
        """The client caught up with its buffer: read it again, continue from the cursor."""
        self._write_paused = False
        self._read_again()
        self._pump()

    def _send_gap(self, first: int, last: int) -> None:
        self._info("output_gap", first=first, last=last)
        self.hub.stats.output_gaps += 1
        self.hub.stats.skipped_bytes += last - first + 1
        self.send_text(
            control.encode_notice("output_gap", first=first, last=last, bytes=last - first + 1)
        )

    def data_received(self, data: bytes) -> None:
        """Bytes from the client: keystrokes straight to the hub, other frames via websockets."""
        for event in self._reader.feed(data):
            if isinstance(event, bytes):  # a whole binary message
                if self._open:
                    self._on_input(event)
            else:
                self._on_frame(event)
        if self._reader.fed_protocol:
            self._settle()
        if self._write_paused and not self._closed:
            # Over its high-water mark and still sending: no more until it drains.
            self.transport.pause_reading()

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        """Never called: the session takes over a transport that is already up."""

    def eof_received(self) -> bool | None:
        """The client half-closed: the transport closes (asyncio protocol semantics)."""
        for event in self._reader.feed_eof():
            if isinstance(event, Frame):
                self._on_frame(event)
        self._settle()
        return None

    def connection_lost(self, exc: Exception | None = None) -> None:
        """The transport is gone: detach, write the summary audit event, let the connection go.

        The session is the TLS transport's protocol from the upgrade on, so a keystroke
        reaches compiled code straight from uvloop (see `HttpConnection._upgrade`).
        """
        if self._closed:
            return
        self._closed = True
        self._open = False
        for timer in (self._close_timer, self._throttle_timer, self._hold_timer):
            if timer is not None:
                timer.cancel()
        self._hold_timer = None
        self.hub.detach(self)
        if not self.end_reason:
            code = self.ws.close_code
            self.end_reason = f"client closed ({code})" if code else "connection lost"
        self._audit(
            "session_ended",
            role=self.role,
            bytes_in=self.bytes_in,
            bytes_out=self.bytes_out,
            duration=round(time.monotonic() - self.attached, 3),
            reason=self.end_reason,
        )
        if self.on_lost is not None:
            on_lost, self.on_lost = self.on_lost, None
            on_lost()

    # -- authorization after the upgrade ----------------------------------------------

    def reauthorize(self, role: Role | None) -> None:
        """Keep only what the principal's current role grants (after a reload).

        No role (or no longer the MFA it needs): closed with 4003. A writer now only
        a reader becomes a spectator. The role is read per message, so an owner who
        is now a contributor loses NMI and reset at once.
        """
        if self._closed or self.ws.state is not State.OPEN:
            return
        if role is None:
            self._info("access_revoked")
            self.close(control.CLOSE_FORBIDDEN, "access revoked: no role on this vm")
            return
        self.rbac_role = role
        if self.role == "writer" and not at_least(role, "contributor"):
            self.hub.demote(self, "role_revoked")

    def end_by(self, deadline: float | None) -> None:
        """Close with 4003 at this monotonic time (the credentials expire); None: never."""
        self._credentials_end = deadline

    # -- timers (driven by the gateway's sweeper) -------------------------------------

    def sweep(self, now: float) -> None:
        """Credentials expiry, session length, idle timeout and keepalive, as of `now`."""
        if self._closed:
            return
        if self._credentials_end is not None and now >= self._credentials_end:
            self.close(control.CLOSE_FORBIDDEN, "credentials expired")
            return
        limits = self.hub.limits
        if (
            limits.max_session_seconds is not None
            and now - self.started >= limits.max_session_seconds
        ):
            self.close(
                control.CLOSE_IDLE,
                f"maximum session length {limits.max_session_seconds:g}s reached",
            )
            return
        # Spectators too: a reader must not hold sessions nobody watches (see `_touch`).
        if limits.idle_timeout is not None:
            idle = now - self.last_input
            if idle >= limits.idle_timeout:
                self.hub.stats.idle_closes += 1
                self.close(control.CLOSE_IDLE, f"idle for {limits.idle_timeout:g}s")
                return
            if idle >= limits.idle_timeout - limits.idle_warning and self.idle_warned_at is None:
                self.idle_warned_at = now
                closes_in = round(limits.idle_timeout - idle, 1)
                self.send_text(control.encode_notice("idle_warning", closes_in=closes_in))
        if now >= self._next_ping:
            self._next_ping = now + limits.keepalive_interval
            self.keepalive()

    # -- keepalive ------------------------------------------------------------------

    def keepalive(self) -> bool:
        """Ping; False (and the client reset) when the last ping went unanswered."""
        if self._closed:
            return False
        if self._awaiting_pong and not self._reading_paused:
            self.end_reason = "keepalive timeout"
            self._info("keepalive_timeout")
            self._reset()
            return False
        if self.ws.state is State.OPEN:
            self._awaiting_pong = True
            self.ws.send_ping(b"relayd")
            self._flush()
        return True

    # -- internals --------------------------------------------------------------------

    def _flush(self) -> None:
        if self._handed_off:
            self.ws.data_to_send()  # the relay moves the client: its link hears nothing more
            return
        for chunk in self.ws.data_to_send():
            if chunk:
                self.transport.write(chunk)
            else:
                # SSL transports cannot half-close; end of stream means close.
                self.transport.close()
        if self.transport.get_write_buffer_size() > self._max_buffered:
            self.end_reason = self.end_reason or (
                f"unread output over {self._max_buffered} bytes (client not reading)"
            )
            self._info("client_not_reading", buffered=self.transport.get_write_buffer_size())
            self._reset()
            return
        # Waiting for the client's Close, or for a closing transport to flush: a client
        # that reads nothing lets neither end, so both have a deadline.
        if self._close_timer is None and (self.ws.close_expected() or self.transport.is_closing()):
            self._close_timer = self._loop.call_later(CLOSE_TIMEOUT, self._reset)

    def _reset(self) -> None:
        """Drop the client at once: its transport aborted, the connection reset (linger.py)."""
        if self._closed:
            return
        reset_connection(self.transport)

    def _on_frame(self, frame: Frame) -> None:
        if frame.opcode is Opcode.PONG:
            self._awaiting_pong = False
        elif frame.opcode in (Opcode.BINARY, Opcode.TEXT, Opcode.CONT) and self._open:
            self._on_data_frame(frame)

    def _settle(self) -> None:
        """After websockets was fed: note a close it saw or sent, and send its answers."""
        if self.ws.state is not State.OPEN:
            self._open = False
            if not self.end_reason:
                if self.ws.close_rcvd is not None:
                    self.end_reason = f"client closed ({self.ws.close_rcvd.code})"
                elif self.ws.close_sent is not None:  # the client broke the protocol
                    sent = self.ws.close_sent
                    self.end_reason = f"protocol error ({sent.code}: {sent.reason})"
        self._flush()

    def _on_data_frame(self, frame: Frame) -> None:
        if frame.opcode is not Opcode.CONT:
            self._fragment_opcode = frame.opcode
            self._fragments = []
        self._fragments.append(bytes(frame.data))
        if not frame.fin:
            return
        message = b"".join(self._fragments)
        opcode, self._fragments = self._fragment_opcode, []
        if opcode is Opcode.BINARY:
            self._on_input(message)
            return
        try:
            text = message.decode("utf-8")  # strictly: json.loads(bytes) would take UTF-16
        except UnicodeDecodeError:
            self.close(control.CLOSE_INVALID_DATA, "text message is not valid UTF-8")
            return
        self._on_control(text)

    def _on_input(self, data: bytes) -> None:
        if not data:
            return
        if self.role != "writer":
            self._touch()  # refused, but someone is there: a spectator's activity
            self._error("read_only", "this session is read-only (spectator)")
            return
        if len(data) > self._max_paste:
            self.hub.stats.pastes_refused += 1
            self._error(
                "paste_too_long",
                f"input of {len(data)} bytes exceeds max_paste_bytes {self._max_paste}",
                limit=self._max_paste,
            )
            return
        if not self.hub.port_up:
            self._error("port_down", "the serial port is down; input was not sent")
            return
        self._touch()
        self.bytes_in += len(data)
        self.hub.submit(self, data)

    def _on_control(self, text: str) -> None:
        if self.role != "writer":
            self._touch()  # a spectator's every message counts; a writer's only when it acts
        try:
            message = control.decode_client_message(text)
        except BadMessageError as exc:
            self._error("bad_message", exc.message)
            return
        if isinstance(message, control.Resize):
            self.hub.resize = (message.cols, message.rows)
            return
        if isinstance(message, control.Nmi | control.Reset):
            self._on_hook("nmi" if isinstance(message, control.Nmi) else "reset")
            return
        if self.role != "writer" or not at_least(self.rbac_role, "contributor"):
            self._error("read_only", "only the writer may send BREAK or SysRq")
            return
        if not self.hub.port_up:
            self._error("port_down", "the serial port is down; BREAK was not sent")
            return
        if not self.hub.can_break:
            self._error(
                "unsupported",
                f"{self.hub.vm.serial.kind} port cannot carry BREAK and no break_command is set",
            )
            return
        key = message.key if isinstance(message, control.Sysrq) else ""
        what = "SysRq" if key else "BREAK"
        if not self.hub.submit_break(key):
            self._error(
                "busy",
                f"{MAX_QUEUED_BREAKS} BREAKs are already waiting for the serial port; "
                f"this {what} was not queued",
            )
            return
        self._touch()  # a refused BREAK does not keep an idle writer's session alive
        self._audit("sysrq_sent" if key else "break_sent")

    def _on_hook(self, name: str) -> None:
        if not at_least(self.rbac_role, "owner"):
            self._error("forbidden", f"{name} needs the owner role on this vm")
            return
        if not self.hub.port_up:
            self._error("port_down", f"the serial port is down; {name} was not run")
            return
        refused = self.hub.submit_hook(name, self)
        if refused == "unsupported":
            self._error("unsupported", f"no {name}_command is configured for this vm")
            return
        if refused == "busy":
            self._error(
                "busy", f"{MAX_QUEUED_HOOKS} hook runs are already waiting; {name} was not queued"
            )
            return
        self._audit("hook_run", hook=name)

    def _touch(self) -> None:
        """Activity: the idle clock starts again.

        A writer's accepted input or BREAK counts; a spectator's every message does
        (it cannot act, but a refused key still shows someone is there).
        """
        self.last_input = time.monotonic()
        self.idle_warned_at = None

    def _audit(self, event: str, **fields: object) -> None:
        audit(
            event,
            session_id=self.session_id,
            vm=self.hub.vm.id,
            principal=self.principal.id,
            peer=self.peer,
            region=self.region,
            **fields,
        )

    def _info(self, event: str, **fields: object) -> None:
        # Not a bound logger made in __init__: binding costs as much as a TLS handshake.
        log.info(
            event,
            session_id=self.session_id,
            vm=self.hub.vm.id,
            principal=self.principal.id,
            peer=self.peer,
            **fields,
        )

    def _error(self, code: str, message: str, **fields: object) -> None:
        # Answers to bad input are advisory: not queued for a client that is not reading,
        # or a spectator sending keys it never reads back would grow our memory without end.
        if not self._write_paused:
            self.send_text(control.encode_error(code, message, **fields))
