"""A relayed console session that outlives its owner: the splice, plus re-attachment.

Like `peerlink.splice`, a `Relay` writes the owner's answer to the client and
then passes bytes both ways with the transports' own flow control; it also
walks both streams' frame headers (wsframes.py: no payload is copied or
decoded, except the owner's small text messages) so that it always knows
whether each direction is between frames and where the client's console
position is. That lets it move the session when the owner dies:

1. The owner's link ends without a Close frame from it (its gateway died, or
   the link broke) while its stream is between frames: the client gets a
   `port_down` notice, and its input is held (up to the high-water mark, then
   its socket is not read).
2. The relay waits for the region to name a new owner (`OwnerDirectory`:
   the gateway's view after each ownership round), for at most `wait`
   seconds, and sends it the same forwarded upgrade (same session id,
   principal, role and mode) resuming at the client's position.
3. The new owner's 101 and its hello are swallowed (the client already has
   a session); the client gets `port_up` (unless the new owner's port is not
   up yet: it says `port_up` itself when it is), then the new owner's stream,
   which starts exactly at the client's position (an `output_gap` notice
   first if the new owner no longer holds those bytes; an `offsets_reused`
   notice first if the new owner's output ends before that position, its log
   lost with Redis's data: the session goes on at the new owner's end, as a
   reconnect with `?from=` would). The held input follows,
   including the start of a frame the dead owner got only part of (it never
   acted on it), and the relay goes on. Input waits for the new owner's port
   only so long (`control.MOVED_INPUT_WAIT`, as a session that moves to this
   gateway holds it): then the owner gets it, and refuses keys with `port_down`
   if its port is still down, as it refuses any. If the console moves again
   before that port is up, the input stays held for the next owner, until the
   same deadline.

The same happens when the owner lets go of the VM without a Close frame (it
hands the console to another gateway, or drains for a deploy: it ends a
forwarded session's link cleanly, between frames), and when the region names
another owner while the link still looks alive (the owner is frozen and
fenced: `owner_moved`). The session keeps what it had: a client that is no
longer the writer (demoted, evicted) resumes as a spectator, and one that
was the writer but cannot be any more on the new owner (`deny` with a writer
there) resumes as a spectator with a `demoted` notice.

When the owner closes on purpose (a Close frame: 4001, 4009, 1001...) the
frame reaches the client unchanged and the relay ends, as a splice does. When
no new owner comes in time, or it refuses the session, the client gets a
Close 1001 with the reason; when the owner died in the middle of a frame, the
client's connection is reset (no well-formed frame can finish it).

The session's clocks move with it (`forwarding.SessionClocks`): the relay keeps
when the session started and when the client last sent a message, and gives
both to every new owner, so `max_session_seconds` and `idle_timeout` count from
the session's start and its client's last message, never from the move. The
relay sees frame headers only, so any text or binary message counts as
activity (an owner counts a writer's accepted input and BREAKs only): a moved
session may have its idle clock a little younger, never older, than its owner had.
It also notes when the owner sends the client an `idle_warning` (a notice it
decodes anyway), so that the next owner does not warn again for the same period.

Whatever the relay gives up on, it resets (linger.py): a client or an owner that
does not flush in `close_timeout`, a frozen owner's link, a client dropped mid-frame.
A socket merely closed would be kept, orphaned, with its FIN queued behind bytes a
side that reads nothing never takes.
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import ssl
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Protocol

from websockets.frames import Close, Frame, Opcode

from .. import control
from ..errors import PeerLinkError
from ..linger import reset_connection
from ..log import get_logger
from ..tls import peer_certificate
from .forwarding import SessionClocks
from .peerlink import CLOSE_TIMEOUT, HIGH_WATER, PeerConnection, open_peer
from .wsframes import ClientStream, ServerStream, first_frame

__all__ = [
    "ROUTE_WAIT",
    "OwnerDirectory",
    "Reattach",
    "Relay",
    "adopt",
    "reach_owner",
    "refusal_close_code",
    "relay",
]

log = get_logger("relayd.relay")

#: A refusal's body read for its error code, at most (relayd's are a few hundred bytes).
_MAX_REFUSAL_BYTES = 4096
#: The start of a client frame kept for a new owner, at most (a larger frame in
#: flight when the owner dies ends the session).
MAX_PARTIAL_BYTES = 1 << 20

#: How long a new session waits for the region to name a VM's next owner when the
#: one this gateway named is gone or no longer holds the VM: a failover's few
#: seconds, under the 10 s most WebSocket clients allow their handshake.
ROUTE_WAIT = 6.0

#: How long a link to a gateway that is no longer the VM's owner may take to end by
#: itself before the relay leaves it (see `Relay.owner_moved`).
DEPOSED_GRACE = 1.0


class OwnerDirectory(Protocol):
    """Who owns which VM, as the gateway last saw it (`ClusterNode`)."""

    def owner_of(self, vm_id: str) -> tuple[str, str] | None:
        """(gateway id, advertise host:port) of the VM's owner, None while nobody owns it."""

    def fence_of(self, vm_id: str) -> int | None:
        """The fencing token of that owner's lease on the VM (None: unknown)."""

    async def next_round(self) -> None:
        """Wait until the gateway's next ownership round has run."""

    def link_failed(self, gateway: str) -> None:
        """A peer link to `gateway` could not be opened (counted for /metrics)."""


@dataclass(frozen=True)
class Reattach:
    """What a relay needs to move its session to a new owner.

    Attributes:
        vm: the VM.
        owner: the gateway id of the owner the session is relayed to first.
        owners: the gateway's view of ownership.
        fence: the fencing token of `owner`'s lease, as `owners` named it (None: unknown).
        request: the forwarded upgrade for this session, resuming at an offset, as the
            writer (interactive) or not (spectate), with its clocks as of now.
        ssl_context: the peer-link client context.
        timeout: deadline of each peer link (connection, TLS, answer, hello).
        wait: how long to wait for a new owner before closing the client.
        me: this gateway's id: when it is the next owner, the relay's `on_here` takes
            the client into a session here instead of a peer link to itself.
        keepalive: the owners' `keepalive_interval` (the region's config): a client
            that sent no pong for that long when its owner hangs up was dropped by it.
        lease_ttl: the region's lease period: an owner the region still names under the
            same lease a period after its link broke renewed it since, so it is alive
            and is linked to again (None: never; see `Relay._next_owner`).
    """

    vm: str
    owner: str
    owners: OwnerDirectory
    request: Callable[[int, bool, SessionClocks], bytes]
    ssl_context: ssl.SSLContext
    timeout: float
    wait: float
    me: str | None = None
    keepalive: float | None = None
    fence: int | None = None
    lease_ttl: float | None = None


class MoveRefused(Exception):
    """The new owner refused the session (its status or reason is in the message).

    Attributes:
        close_code: what the client is closed with: the contract's code for the
            refusal where it has one (`refusal_close_code`), else 1001 (reconnect).
    """

    def __init__(self, message: str, close_code: int = control.CLOSE_GOING_AWAY) -> None:
        super().__init__(message)
        self.close_code = close_code


#: The close codes of the contract for the refusals that have one: a moved session
#: refused for a reason a reconnect would meet again says so, as a new session would.
_REFUSAL_CLOSE_CODES = {
    "console_disabled": control.CLOSE_DISABLED,
    "session_limit": control.CLOSE_SESSION_LIMIT,
}
_STATUS_CLOSE_CODES = {
    401: control.CLOSE_FORBIDDEN,
    403: control.CLOSE_FORBIDDEN,
    404: control.CLOSE_UNKNOWN_VM,
    429: control.CLOSE_SESSION_LIMIT,
}


def refusal_close_code(status: int, error: str | None) -> int:
    """The close code for a session a new owner refused with `status` and error code
    `error` (the contract's ``{"error": CODE}``, None if unknown); 1001 for the rest."""
    if error is not None and error in _REFUSAL_CLOSE_CODES:
        return _REFUSAL_CLOSE_CODES[error]
    return _STATUS_CLOSE_CODES.get(status, control.CLOSE_GOING_AWAY)


def _refusal_error(body: bytes) -> str | None:
    """The error code of a refusal's JSON body, if it has one."""
    try:
        error = json.loads(body[:_MAX_REFUSAL_BYTES]).get("error")
    except (ValueError, AttributeError):
        return None
    return error if isinstance(error, str) else None


class _TakenHere(Exception):
    """The next owner is this gateway, and the client is now a session here."""


class _Client(asyncio.Protocol):
    def __init__(self, relay: Relay, transport: asyncio.Transport) -> None:
        self.relay = relay
        self.transport = transport
        self.lost = False
        self.close_timer: asyncio.TimerHandle | None = None

    def data_received(self, data: bytes) -> None:
        self.relay._from_client(data)

    def eof_received(self) -> bool | None:
        return None

    def pause_writing(self) -> None:
        """The client is slow: stop reading the owner until it drains."""
        owner = self.relay._owner
        if owner is not None and not owner.transport.is_closing():
            owner.transport.pause_reading()

    def resume_writing(self) -> None:
        """See `pause_writing`."""
        owner = self.relay._owner
        if owner is not None and not owner.transport.is_closing():
            owner.transport.resume_reading()

    def connection_lost(self, exc: Exception | None) -> None:
        self.lost = True
        if self.close_timer is not None:
            self.close_timer.cancel()
        self.relay._client_lost()


class _Owner(asyncio.Protocol):
    def __init__(self, relay: Relay, transport: asyncio.Transport, *, live: bool) -> None:
        self.relay = relay
        self.transport = transport
        self.lost = False
        self.live = live  # False while a new owner's hello is awaited
        self.pending = bytearray()
        self.changed = asyncio.Event()
        self.close_timer: asyncio.TimerHandle | None = None
        self.deposed: asyncio.TimerHandle | None = None  # see `Relay.owner_moved`
        self.left = False  # the relay reset this link itself (a deposed owner's)

    def data_received(self, data: bytes) -> None:
        if self.live:
            self.relay._from_owner(data)
        else:
            self.pending += data
            self.changed.set()

    def eof_received(self) -> bool | None:
        return None

    def pause_writing(self) -> None:
        """The owner is slow to read: stop reading the client until it drains."""
        client = self.relay._client.transport
        if self.live and not client.is_closing():
            client.pause_reading()

    def resume_writing(self) -> None:
        """See `pause_writing`."""
        if self.live:
            self.relay._read_client()

    def connection_lost(self, exc: Exception | None) -> None:
        self.lost = True
        for timer in (self.close_timer, self.deposed):
            if timer is not None:
                timer.cancel()
        self.changed.set()
        if self.live:
            self.relay._owner_lost(self)


def _another_lease(
    owner: tuple[str, str] | None, fence: int | None, gateway: str | None, known: int | None
) -> bool:
    """Whether the view (`owner`, its lease's `fence`) names another lease than the one
    `gateway` held (`known`): no owner, another gateway, or the same one under another
    token. An unknown token (a peer named the owner) counts as the same lease."""
    if owner is None or owner[0] != gateway:
        return True
    return fence is not None and known is not None and fence != known


def _resumed(hello: dict[str, object], at: int, position: int) -> bool:
    """Whether a new owner's `hello`, resuming at `at`, resumes a client at `position`.

    At it or past it: a later position is the owner's to explain (an `output_gap`
    notice comes next). Before it only when the owner's whole output ends before the
    client's position (its log lost what the client saw: a Redis that lost its data),
    with no replay: the owner then resumes at its end and says so with an
    `offsets_reused` notice next, as it answers a `?from=` past the end, and the
    client's position is the owner's from there on. Any other earlier position would
    repeat bytes the client has.
    """
    return at >= position or (hello.get("replay") == 0 and hello.get("offset") == at)


def _close_later(end: _Client | _Owner, close_timeout: float) -> None:
    """Flush, then close; reset if the flush takes longer than `close_timeout`."""
    if end.lost or end.close_timer is not None:
        return
    if not end.transport.is_closing():  # never close twice (see peerlink._End.close)
        end.transport.close()
    end.close_timer = asyncio.get_running_loop().call_later(
        close_timeout, reset_connection, end.transport
    )


def _text_frame(text: str) -> bytes:
    return Frame(Opcode.TEXT, text.encode()).serialize(mask=False)


def _close_frame(code: int, reason: str) -> bytes:
    payload = Close(code, control.close_reason(reason)).serialize()
    return Frame(Opcode.CLOSE, payload).serialize(mask=False)


class Relay:
    """A client relayed to a VM's owner, re-attached to the next owner when one dies.

    Attributes:
        bytes_to_peer: bytes relayed from the client to the owners.
        bytes_to_client: bytes relayed from the owners to the client.
        reattached: how many times the session moved to a new owner.
        closed: done when the client and every owner link are gone.
    """

    def __init__(
        self,
        client: asyncio.Transport,
        peer: PeerConnection | None,
        reattach: Reattach | None,
        *,
        on_done: Callable[[Relay], None] | None,
        high_water: int,
        close_timeout: float,
        on_here: Callable[[Relay], Awaitable[bool]] | None = None,
        clocks: SessionClocks | None = None,
    ) -> None:
        self.bytes_to_peer = 0
        self.bytes_to_client = 0
        self.reattached = 0
        self.closed: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._reattach = reattach
        self._owner_id = None if reattach is None else reattach.owner
        self._owner_fence = None if reattach is None else reattach.fence  # its lease's token
        self._on_done = on_done
        self._on_here = on_here
        self._high_water = high_water
        self._close_timeout = close_timeout
        self._client = _Client(self, client)
        self._owner = None if peer is None else _Owner(self, peer.transport, live=True)
        self._server = ServerStream()
        self._frames = ClientStream(MAX_PARTIAL_BYTES)
        self._held: bytearray | None = None  # client input while no owner is attached
        self._moving: asyncio.Task[None] | None = None
        self._hold_timer: asyncio.TimerHandle | None = None  # see `_attach`
        # When held input goes to the owner whatever its port says (loop time; None: no
        # owner has had the held input's session yet). Set once per hold, kept across moves.
        self._hold_deadline: float | None = None
        self._was_writer = False  # whether the client wrote before its latest move
        self._pongs_before = 0  # the client's pongs before the current owner's stream
        self._last_pong = asyncio.get_running_loop().time()  # or when the relay began
        # The session's clocks (time.monotonic()): a new one starts as its owner's 101 comes.
        now = time.monotonic()
        self._started = now if clocks is None else clocks.started
        self._last_active = now if clocks is None else clocks.last_active
        self._warned = None if clocks is None else clocks.warned  # the last idle_warning
        self._server.on_idle_warning = self._idle_warned

    # -- normal relaying --------------------------------------------------------------------

    def _from_client(self, data: bytes) -> None:
        held = self._held
        if held is not None:
            held += data
            if len(held) > self._high_water:
                self._client.transport.pause_reading()
            return
        frames = self._frames
        pongs, messages = frames.pongs, frames.messages
        frames.track(data)
        if frames.pongs != pongs:
            self._last_pong = asyncio.get_running_loop().time()
        if frames.messages != messages:
            self._last_active = time.monotonic()
        owner = self._owner
        if owner is not None and not owner.transport.is_closing():
            owner.transport.write(data)
            self.bytes_to_peer += len(data)

    def _from_owner(self, data: bytes) -> None:
        server = self._server
        server.feed(data)
        client = self._client.transport
        if not client.is_closing():
            client.write(data)
            self.bytes_to_client += len(data)
        if self._held is not None and server.port_up and self._owner is not None:
            self._flush_held(self._owner)  # a new owner's port came up: the keys may go

    def _read_client(self) -> None:
        client = self._client.transport
        if self._held is None and not client.is_closing():
            client.resume_reading()

    def _start(self, peer: PeerConnection, client_data: bytes) -> None:
        client = self._client.transport
        client.set_write_buffer_limits(high=self._high_water)
        client.set_protocol(self._client)
        owner = self._owner
        assert owner is not None
        client.write(peer.head)
        self.bytes_to_client += len(peer.head)
        reader = peer._reader
        self._from_owner(peer.rest + bytes(reader.buf))
        reader.buf.clear()
        owner.transport.set_write_buffer_limits(high=self._high_water)
        if reader.lost:  # the owner hung up between its answer and now
            owner.lost = True
            self._owner_lost(owner)
            return
        owner.transport.set_protocol(owner)
        if client_data:
            self._from_client(client_data)
        if client.get_write_buffer_size() <= self._high_water:
            owner.transport.resume_reading()
        if owner.transport.get_write_buffer_size() <= self._high_water:
            client.resume_reading()

    # -- ends -------------------------------------------------------------------------------

    def close(self) -> None:
        """End the relay: flush and close both sides (reset after `close_timeout`)."""
        if self._moving is not None:
            self._moving.cancel()
        _close_later(self._client, self._close_timeout)
        if self._owner is not None:
            _close_later(self._owner, self._close_timeout)

    def going_away(self, reason: str) -> None:
        """This gateway stops: tell the client with a 1001 close (between frames), then end.

        The owner's session ends as its link closes; the client reconnects with
        `?from=` through another gateway.
        """
        self.end(control.CLOSE_GOING_AWAY, reason)

    def owner_certificate(self) -> bytes | None:
        """The certificate (DER) of the owner this relay is linked to now, if any."""
        owner = self._owner
        if owner is None or owner.lost:
            return None
        return peer_certificate(owner.transport)

    def end(self, code: int, reason: str) -> None:
        """Close the client with `code` (between frames: else it is cut), and the owner's link."""
        if self._moving is not None:
            self._moving.cancel()
        if self._server.at_boundary and not self._server.closing and not self._server.broken:
            self._send_client(_close_frame(code, reason))
        self.close()

    def close_moving(self, code: int, reason: str) -> bool:
        """Close a client waiting for its console's next owner with `code` (a switch
        disabled the console meanwhile: it hears what an owner would have said, now).

        False when the relay is not moving: its owner closes the session itself then.
        """
        moving = self._moving
        if moving is None or self._reattach is None:
            return False
        moving.cancel()
        self._moving = None
        log.info("relay_closed_while_moving", vm=self._reattach.vm, code=code)
        self._send_client(_close_frame(code, reason))
        _close_later(self._client, self._close_timeout)
        return True

    def notify(self, text: str) -> None:
        """Tell the client something (a text frame), between two of the owner's frames.

        Skipped when the owner's stream is mid-frame: a notice is advice, and the
        frame it would have to wait for may be long in coming.
        """
        server = self._server
        if server.at_boundary and not server.closing and not server.broken:
            self._send_client(_text_frame(text))

    @property
    def clocks(self) -> SessionClocks:
        """When the session started, its client last sent a message and was last sent an
        idle warning (see the module doc)."""
        return SessionClocks(self._started, self._last_active, self._warned)

    def _idle_warned(self) -> None:
        """The owner sent the client an idle warning: the next owner need not send it again."""
        self._warned = time.monotonic()

    @property
    def vm(self) -> str | None:
        """The VM relayed to (None for a relay that cannot move)."""
        return None if self._reattach is None else self._reattach.vm

    def owner_moved(self, owner: str) -> None:
        """The region names `owner` as the VM's owner: leave a link to any other one.

        An owner that let go cleanly ends the link itself, between frames, but
        what it sent last may still be in flight (or unread: a slow client holds
        the link's reading). So the link gets `DEPOSED_GRACE` to end; one still
        open then belongs to an owner that cannot act (frozen, cut off): it is
        reset (nothing of it waits in this kernel for the owner to wake) and the
        session moves as if that owner had died.
        """
        current = self._owner
        if (
            self._reattach is None
            or self._moving is not None
            or current is None
            or current.lost
            or owner == self._owner_id
            or current.deposed is not None
        ):
            return
        current.deposed = asyncio.get_running_loop().call_later(
            DEPOSED_GRACE, self._leave_deposed, current, owner
        )

    def _leave_deposed(self, link: _Owner, owner: str) -> None:
        link.deposed = None
        if link is self._owner and not link.lost and self._reattach is not None:
            log.info("relay_owner_moved", vm=self._reattach.vm, owner=self._owner_id, to=owner)
            link.left = True
            reset_connection(link.transport)

    def abort(self) -> None:
        """End the relay at once: both connections reset, whatever is buffered dropped."""
        if self._moving is not None:
            self._moving.cancel()
        if not self._client.lost:
            reset_connection(self._client.transport)
        if self._owner is not None and not self._owner.lost:
            reset_connection(self._owner.transport)

    async def wait_closed(self) -> None:
        """Wait until the client and the owner link are gone."""
        await asyncio.shield(self.closed)

    def _client_lost(self) -> None:
        if self._moving is not None:
            self._moving.cancel()  # its cleanup drops a link being opened
        owner = self._owner
        if owner is not None and not owner.lost:
            _close_later(owner, self._close_timeout)  # flush what the client sent last
            return
        self._done()

    def _owner_lost(self, owner: _Owner) -> None:
        if owner is not self._owner:
            return
        if self._client.lost:
            self._done()
            return
        server = self._server
        if self._reattach is None or server.closing or self._client.transport.is_closing():
            _close_later(self._client, self._close_timeout)  # the owner's Close reaches it
            return
        holding = self._held is not None  # the client's input, pongs too, never reached it
        if not owner.left and not holding and self._client_unresponsive():
            # The owner reset the link because of the client: it missed a pong or left its
            # output unread (session.py drops a direct client so, with a reset). Moved, the
            # client would only be dropped again; it is dropped alike, not told port_down.
            log.info(
                "relay_owner_lost",
                vm=self._reattach.vm,
                owner=self._owner_id,
                outcome="client dropped",
            )
            reset_connection(self._client.transport)
            return
        if not server.at_boundary or server.position is None or server.broken:
            log.warning(
                "relay_owner_lost",
                vm=self._reattach.vm,
                owner=self._owner_id,
                outcome="dropped mid-frame",
            )
            reset_connection(self._client.transport)
            return
        self._owner = None
        if not self._frames.unfinished_whole:  # a client frame too long to keep was in flight
            self._give_up(self._reattach, "a long message was in flight")
            return
        if self._hold_timer is not None:
            self._hold_timer.cancel()
            self._hold_timer = None
        if self._held is None:
            self._held = bytearray()
        # Else the input held for this owner's port waits for the next owner's, until the
        # same deadline (`_attach`).
        log.info("relay_owner_lost", vm=self._reattach.vm, owner=self._owner_id, outcome="moving")
        self._send_client(_text_frame(control.encode_notice("port_down", vm=self._reattach.vm)))
        self._moving = asyncio.get_running_loop().create_task(self._move(self._reattach))

    def _client_unresponsive(self) -> bool:
        """Whether the client has not answered the owner's last ping, or sent no pong for a
        keepalive interval (the ping may not have reached this relay: behind output the
        client leaves unread, or dropped with the link's reset).

        That is why an owner drops a client (session.py). One that dies or hands the
        console over does so at any time, and a live client answers each ping, one per
        interval, within a round trip: it is rarely caught between the two.
        """
        if self._server.pings > self._frames.pongs - self._pongs_before:
            return True
        keepalive = None if self._reattach is None else self._reattach.keepalive
        now = asyncio.get_running_loop().time()
        return keepalive is not None and now - self._last_pong >= keepalive

    def _done(self) -> None:
        if not self.closed.done():
            self.closed.set_result(None)
            if self._on_done is not None:
                self._on_done(self)

    def _send_client(self, data: bytes) -> None:
        client = self._client.transport
        if not client.is_closing():
            client.write(data)
            self.bytes_to_client += len(data)

    # -- re-attachment ----------------------------------------------------------------------

    async def _move(self, reattach: Reattach) -> None:
        """Find the next owner and splice it in; close the client if none comes."""
        loop = asyncio.get_running_loop()
        began = loop.time()
        try:
            async with asyncio.timeout(reattach.wait):
                owner, hello_end, link = await self._next_owner(reattach)
        except TimeoutError:
            self._give_up(reattach, f"no gateway took over within {reattach.wait:g} s")
            return
        except MoveRefused as exc:
            self._give_up(reattach, str(exc), exc.close_code)
            return
        except _TakenHere:
            self._moving = None
            self._log_reattached(reattach.me, began, here=True)
            return
        except Exception:  # a bug: the client is told to reconnect, never left at port_down
            log.exception("relay_move_crashed", vm=reattach.vm, owner=self._owner_id)
            self._give_up(reattach, "internal error")
            return
        self._moving = None
        self._attach(owner, hello_end, link)
        self._log_reattached(
            self._owner_id,
            began,
            role="writer" if self._server.writer else "spectator",
            demoted=self._was_writer and not self._server.writer,
        )

    def _log_reattached(self, owner: str | None, began: float, **how: object) -> None:
        assert self._reattach is not None
        log.info(
            "relay_reattached",
            vm=self._reattach.vm,
            owner=owner,
            resumed_at=self._server.position,
            seconds=round(asyncio.get_running_loop().time() - began, 3),
            **how,
        )

    def _give_up(self, reattach: Reattach, why: str, code: int = control.CLOSE_GOING_AWAY) -> None:
        self._moving = None
        log.warning("relay_reattach_failed", vm=reattach.vm, reason=why, close_code=code)
        hint = "; reconnect" if code == control.CLOSE_GOING_AWAY else ""
        self._send_client(_close_frame(code, f"console moved: {why}{hint}"))
        _close_later(self._client, self._close_timeout)

    async def _next_owner(self, reattach: Reattach) -> tuple[_Owner, int, PeerConnection]:
        """Wait for a live owner and open the session on it, resuming at the client's position.

        The gateway that died stays in the view until its lease lapses: it is
        tried again only once the view has named someone else (or no one), or
        the same gateway under another lease (fencing token), as when it
        restarts and takes its share back. Gateway ids alone would miss that
        when this gateway saw no round in between (frozen, or its rounds
        failed): the client would wait at port_down for an owner never named.

        Or once rounds that began a lease period (`Reattach.lease_ttl`) after the
        link broke still name the same lease: a dead or frozen owner's would have
        lapsed by then, so the owner renewed it and is alive, and only the link
        broke (a reset between the gateways): the session is made again there,
        rather than waiting for a new owner that never comes and closing the
        client with 1001.
        """
        dead, dead_fence = self._owner_id, self._owner_fence
        moved = False
        loop = asyncio.get_running_loop()
        alive_from = None if reattach.lease_ttl is None else loop.time() + reattach.lease_ttl
        rounds_since = 0  # rounds seen since `alive_from`: the third began after it
        while True:
            owners = reattach.owners
            owner, fence = owners.owner_of(reattach.vm), owners.fence_of(reattach.vm)
            if _another_lease(owner, fence, dead, dead_fence):
                moved = True
            elif alive_from is not None and loop.time() >= alive_from:
                rounds_since += 1
                moved = moved or rounds_since >= 3
            if owner is not None and moved:
                if owner[0] == reattach.me and self._on_here is not None:
                    if await self._on_here(self):  # MoveRefused when this gateway says no
                        raise _TakenHere
                else:
                    attached = await self._try_owner(reattach, owner)
                    if attached is not None:
                        self._owner_id, self._owner_fence = owner[0], fence
                        return attached
            await owners.next_round()

    async def _try_owner(
        self, reattach: Reattach, owner: tuple[str, str]
    ) -> tuple[_Owner, int, PeerConnection] | None:
        """Open the session on `owner` and read its hello; None to try again next round.

        Raises:
            MoveRefused: the owner refused the session (not for "no owner here yet").
        """
        host, _, port = owner[1].rpartition(":")
        position = self._server.position
        assert position is not None
        writer = self._server.writer
        while True:
            try:
                link = await open_peer(
                    host.strip("[]"),
                    int(port),
                    reattach.ssl_context,
                    reattach.request(position, writer, self.clocks),
                    reattach.timeout,
                )
            except PeerLinkError as exc:
                reattach.owners.link_failed(owner[0])
                log.info("relay_owner_unreachable", vm=reattach.vm, owner=owner[0], error=str(exc))
                return None
            if link.status == 503:  # it does not hold the port (yet): the next round will say
                return None
            if link.status == 409 and writer:  # `deny`, and it has a writer: spectate there
                log.info("relay_writer_refused", vm=reattach.vm, owner=owner[0], status=409)
                writer = False
                continue
            if link.status != 101:
                code = refusal_close_code(link.status, _refusal_error(link.rest))
                raise MoveRefused(
                    f"gateway {owner[0]} refused the session with {link.status}", code
                )
            break
        side = _Owner(self, link.transport, live=False)
        reader = link._reader
        side.pending += link.rest + bytes(reader.buf)
        reader.buf.clear()
        if reader.lost:
            return None
        link.transport.set_protocol(side)
        link.transport.resume_reading()
        try:
            async with asyncio.timeout(reattach.timeout):
                while (found := first_frame(side.pending)) is None:
                    if side.lost:
                        return None
                    side.changed.clear()
                    await side.changed.wait()
        except TimeoutError:
            link.transport.abort()
            return None
        except BaseException:
            link.transport.abort()
            raise
        end, first, payload = found
        stream = ServerStream()
        stream.on_idle_warning = self._idle_warned
        if first == 0x81:  # a final text frame: the hello
            stream.message(payload)
        if (
            stream.hello is None
            or stream.position is None
            or not _resumed(stream.hello, stream.position, position)
        ):
            link.transport.abort()
            raise MoveRefused(f"gateway {owner[0]} resumed the session at the wrong offset")
        self._was_writer = self._server.writer
        self._server = stream
        self._pongs_before = self._frames.pongs
        self._last_pong = asyncio.get_running_loop().time()  # a new session: pings anew
        return side, end, link

    @property
    def position(self) -> int | None:
        """The offset of the next console byte the client is owed (None: not known)."""
        return self._server.position

    @property
    def writer(self) -> bool:
        """Whether the client is the writer, as its current owner last said."""
        return self._server.writer

    @property
    def hold_deadline(self) -> float | None:
        """When the client's held input goes to its owner whatever its port says (loop
        time), or None: no owner has had the session since the input began to be held."""
        return self._hold_deadline

    def release_client(self) -> bytes:
        """Let go of the client, whose session goes on at this gateway (the VM came here).

        Only while moving (no owner link, both directions between frames). The relay
        ends without `on_done`: the connection lives on. Returns what the client sent
        meanwhile, from the start of the frame no owner finished: the new session reads
        it first.
        """
        assert self._owner is None
        assert self._held is not None
        replay = bytes(self._frames.unfinished) + bytes(self._held)
        self._held = None
        self._client.lost = True  # nothing of the relay touches the transport any more
        self._on_done = None
        self._done()
        return replay

    def _attach(self, owner: _Owner, hello_end: int, link: PeerConnection) -> None:
        """Splice in the new owner: port_up, its stream after the hello, the held input."""
        reattach = self._reattach
        assert reattach is not None
        self.reattached += 1
        if self._was_writer and not self._server.writer:
            # A code, as `role_revoked` is: the 409's own (the new owner's `deny`).
            notice = control.encode_notice("demoted", by=None, writer=None, reason="writer_exists")
            self._send_client(_text_frame(notice))
        if self._server.port_up:
            self._send_client(_text_frame(control.encode_notice("port_up", vm=reattach.vm)))
        rest = bytes(owner.pending[hello_end:])
        owner.pending.clear()
        owner.live = True
        self._owner = owner
        owner.transport.set_write_buffer_limits(high=self._high_water)
        if rest:
            self._from_owner(rest)
        if owner.lost:  # it went while we were attaching
            self._owner_lost(owner)
            return
        if self._client.transport.get_write_buffer_size() > self._high_water:
            owner.transport.pause_reading()
        if self._server.port_up and self._held is not None:
            self._flush_held(owner)
        elif self._held is not None:
            # The input waits for the new owner's port_up: sent now, it would be refused
            # (`port_down` errors) and lost. Not for ever: past MOVED_INPUT_WAIT it goes
            # and is refused so, as a session here would refuse it (and the client's pongs,
            # held with it, reach the owner before it drops the client for missing them).
            # In all: an owner that lets go before its port is up hands the hold on to the
            # next owner with the deadline it had.
            loop = asyncio.get_running_loop()
            if self._hold_deadline is None:
                self._hold_deadline = loop.time() + control.MOVED_INPUT_WAIT
            if self._hold_deadline <= loop.time():
                self._flush_held(owner)
            else:
                self._hold_timer = loop.call_at(self._hold_deadline, self._hold_over, owner)

    def _hold_over(self, owner: _Owner) -> None:
        """The new owner's port stayed down: its session gets the held input now."""
        self._hold_timer = None
        if self._held is not None and owner is self._owner and not owner.lost:
            self._flush_held(owner)

    def _flush_held(self, owner: _Owner) -> None:
        """Send the new owner the start of a frame the old one never finished, then the rest."""
        if self._hold_timer is not None:
            self._hold_timer.cancel()
            self._hold_timer = None
        self._hold_deadline = None
        held, self._held = self._held or bytearray(), None
        replay = bytes(self._frames.unfinished) + bytes(held)
        messages = self._frames.messages
        self._frames.track(held)
        if self._frames.messages != messages:
            self._last_active = time.monotonic()
        if replay and not owner.transport.is_closing():
            owner.transport.write(replay)
            self.bytes_to_peer += len(replay)
        self._read_client()


def relay(
    client: asyncio.Transport,
    peer: PeerConnection,
    reattach: Reattach | None,
    *,
    client_data: bytes = b"",
    on_done: Callable[[Relay], None] | None = None,
    on_here: Callable[[Relay], Awaitable[bool]] | None = None,
    high_water: int = HIGH_WATER,
    close_timeout: float = CLOSE_TIMEOUT,
) -> Relay:
    """Relay a client to the owner (as `peerlink.splice`), re-attaching it when the owner dies.

    Args:
        client: the client's TLS transport, open.
        peer: a 101 answer from `open_peer`.
        reattach: how to find and reach the next owner; None: end with the owner.
        client_data: bytes the client sent after its upgrade request.
        on_done: called once, with the relay, when the client and the owner link are gone.
        on_here: when the next owner is this gateway (`Reattach.me`): wait until its
            port is up and take the client into a session here (`release_client`);
            False to try again next round; raises `MoveRefused` for a refusal.
        high_water: each transport's write-buffer mark, and the most client input held
            while no owner is attached.
        close_timeout: how long a side may take to flush after the other ended.

    Raises:
        ValueError: `peer` is not a 101, or `client` is closing (the link is aborted).
    """
    if peer.status != 101:
        raise ValueError(f"only a 101 answer can be relayed, not {peer.status}")
    if client.is_closing():
        peer.abort()
        raise ValueError("the client transport is closing")
    r = Relay(
        client,
        peer,
        reattach,
        on_done=on_done,
        high_water=high_water,
        close_timeout=close_timeout,
        on_here=on_here,
    )
    r._start(peer, client_data)
    return r


def adopt(
    client: asyncio.Transport,
    reattach: Reattach,
    *,
    position: int,
    writer: bool,
    clocks: SessionClocks,
    held: bytes = b"",
    hold_until: float | None = None,
    on_done: Callable[[Relay], None] | None = None,
    on_here: Callable[[Relay], Awaitable[bool]] | None = None,
    high_water: int = HIGH_WATER,
    close_timeout: float = CLOSE_TIMEOUT,
) -> Relay:
    """Take over a client whose session this gateway ended as the VM moved away from it.

    The client stays connected: it is told `port_down` and relayed to the VM's next
    owner as soon as the region names one, resuming at `position` as the writer or
    not, exactly as a relay moves from an owner that died (`reattach.owner` is this
    gateway), and with the session's `clocks`. Its stream must be between frames both ways.

    `held`: what the client sent that the session here held for its port (it came here
    with its console, and the port was not up yet), from a frame's start; it waits for
    the next owner's port until `hold_until` (loop time), as if held by this relay.
    """
    r = Relay(
        client,
        None,
        reattach,
        on_done=on_done,
        high_water=high_water,
        close_timeout=close_timeout,
        on_here=on_here,
        clocks=clocks,
    )
    r._server = ServerStream(position)
    r._server.on_idle_warning = r._idle_warned
    r._server.writer = writer
    r._held = bytearray(held)
    r._hold_deadline = hold_until
    client.set_write_buffer_limits(high=high_water)
    client.set_protocol(r._client)
    if len(r._held) <= high_water:
        client.resume_reading()
    r._send_client(_text_frame(control.encode_notice("port_down", vm=reattach.vm)))
    log.info("relay_owner_lost", vm=reattach.vm, owner=reattach.owner, outcome="moving")
    r._moving = asyncio.get_running_loop().create_task(r._move(reattach))
    return r


async def reach_owner(
    host: str,
    port: int,
    head: bytes,
    ssl_context: ssl.SSLContext,
    link_timeout: float,
    reattach: Reattach | None,
) -> tuple[PeerConnection, Reattach | None]:
    """Ask the VM's owner to take a new session, following ownership if it just moved.

    This gateway routes by its last ownership round, so for a few seconds after
    an owner dies (its lease has not lapsed yet) or hands the VM over, it names a
    gateway that is gone (the link fails) or no longer holds the VM (503).
    Rather than fail the client, the session waits (at most `ROUTE_WAIT`) for the
    region to name another owner and asks that one, as a moving relay does.

    Args:
        link_timeout: the deadline of each peer link (connection, TLS, answer).

    Returns:
        The answer to pass on (a 101, or the owner's refusal), and the `Reattach`
        naming the gateway that gave it.

    Raises:
        PeerLinkError: no owner could be reached.
    """
    first: PeerConnection | None = None
    # Why the last link failed: what the operator needs if no owner can be reached
    # (a wrong peer_ca or certificate fails every link the same way).
    failure: PeerLinkError | None = None
    try:
        first = await open_peer(host, port, ssl_context, head, link_timeout)
    except PeerLinkError as exc:
        if reattach is None:
            raise
        reattach.owners.link_failed(reattach.owner)
        failure = exc
    if reattach is None or (first is not None and first.status != 503):
        assert first is not None
        return first, reattach
    try:
        async with asyncio.timeout(min(ROUTE_WAIT, reattach.wait)):
            moved = False
            while True:
                await reattach.owners.next_round()
                owner = reattach.owners.owner_of(reattach.vm)
                fence = reattach.owners.fence_of(reattach.vm)  # of the same round, as `owner`
                moved = moved or _another_lease(owner, fence, reattach.owner, reattach.fence)
                if owner is None or not moved:
                    continue
                owner_host, _, owner_port = owner[1].rpartition(":")
                try:
                    answer = await open_peer(
                        owner_host.strip("[]"), int(owner_port), ssl_context, head, link_timeout
                    )
                except PeerLinkError as exc:
                    reattach.owners.link_failed(owner[0])
                    failure = exc
                    continue
                if answer.status == 503:
                    answer.abort()
                    continue
                if first is not None:
                    first.abort()
                log.info("relay_routed_again", vm=reattach.vm, owner=reattach.owner, to=owner[0])
                return answer, dataclasses.replace(reattach, owner=owner[0], fence=fence)
    except TimeoutError:
        pass
    if first is not None:
        return first, reattach  # the named owner's 503: the client may retry
    waited = f"no gateway took the console within {ROUTE_WAIT:g} s"
    raise PeerLinkError(f"{waited}; last: {failure}" if failure is not None else waited)
