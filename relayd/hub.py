"""One `ConsoleHub` per VM: owns the serial port, the output ring and the writer lease.

The port stays open for the life of the daemon, so output is recorded while
nobody is attached and an attach is instant; `keeper.keep_port` reconnects it
with exponential backoff when it goes away, and the hub tells attached clients.
This module is the state and the keystroke path, compiled (native.py), with no
coroutines; keeper.py holds the port's I/O loops.

Two paths touch the port and nothing else does: the reader appends to the
ring and hands each chunk to every client *without waiting on any of them*
(a client that cannot keep up skips ahead itself); the writer takes keyboard
input and BREAKs from one queue (inputqueue.py, which decides what goes out
when) and writes them paced at the line rate. Input is bounded: when the
queue holds a second of line time, the writer's socket stops being read until
it drains (backpressure, not buffering).
"""

from __future__ import annotations

import asyncio
import math
import random
import time
from collections import deque
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

from . import control
from .audit import audit
from .auth import Principal
from .config import LimitsConfig, VmConfig
from .consolelog import ConsoleLog, LogIdentity, adopt_legacy_logs
from .errors import ConsoleLogError
from .frames import binary_frame
from .inputqueue import Break, Hangup, InputQueue
from .lease import Decision, Demoted, Denied, Evicted, WriterLease
from .log import get_logger
from .ports import SerialLink
from .ports.protocol import LinkProtocol
from .ring import OutputRing

log = get_logger("relayd.hub")

# Hooks are slow (one may run 10 s) and carry no bytes for the input bound: past this many
# waiting, more are refused, not queued, so an owner sending them in a loop cannot grow the
# queue (or the audit log) without end. BREAKs have their bound in inputqueue.py.
MAX_QUEUED_HOOKS = 4
# A kill -9 loses at most this much output (a clean stop loses none). Each flush is one
# pwritev per console with new output: at 0.2 s, 1,000 consoles being typed into cost
# the relay 5,000 small ext4 writes a second, about a tenth of its CPU.
LOG_FLUSH_SECONDS = 1.0
# Each flush comes after a random share of that, at least this one. Consoles that start
# printing together (a fleet event; 1,000 sessions starting to type) would otherwise
# flush together every second, a few ms of writes at once in front of every keystroke.
LOG_FLUSH_MIN_SHARE = 0.5


class HubClient(Protocol):
    """What the hub needs of an attached session."""

    session_id: str
    principal: Principal
    role: str
    peer: str  # the client's real address, for audit events
    region: str

    def deliver(self, offset: int, data: bytes, frame: bytes) -> None:
        """Console output; must never block or await."""

    def send_text(self, text: str) -> None:
        """A control message (notice or error)."""

    def hand_off(self, reason: str) -> None:
        """This gateway lets go of the VM: a relayed session moves, a direct one is closed."""

    def close(self, code: int, reason: str) -> None:
        """End the session with a WebSocket close code."""

    def set_role(self, role: str) -> None:
        """Become writer or spectator."""

    def pause_input(self) -> None:
        """Stop reading the client's socket (the input queue is full)."""

    def resume_input(self) -> None:
        """Read the client's socket again."""


@dataclass(frozen=True)
class QueuedHook:
    """An owner's NMI or reset: run the configured command, report its outcome to who asked."""

    name: str
    argv: tuple[str, ...]
    session_id: str  # the session that asked, and the fields of its audit event
    principal: str
    peer: str
    region: str


def log_identity(vm: VmConfig) -> LogIdentity:
    """Whose console log a VM's is: its id in its subscription, resource group and scale set."""
    return LogIdentity(vm.subscription, vm.resource_group, vm.scale_set, vm.id)


@dataclass
class HubStats:
    """Counters the metrics endpoint reads."""

    input: InputQueue  # counts what it hands to the port
    bytes_from_port: int = 0
    reconnects: int = 0
    takeovers: int = 0
    output_gaps: int = 0
    skipped_bytes: int = 0
    pastes_refused: int = 0
    idle_closes: int = 0
    log_errors: int = 0
    port_errors: int = 0
    last_error: str = ""

    @property
    def bytes_to_port(self) -> int:
        """Input bytes handed to the port, keystrokes and paced chunks alike."""
        return self.input.bytes_written


class LogSink(Protocol):
    """Where console output goes besides the ring when the log is not on local disk.

    In a cluster the owner's hub hands every chunk to the VM's shared log
    (a Redis stream, relayd/cluster); `append` must only buffer, never wait.
    """

    def append(self, offset: int, data: bytes) -> None:
        """Record `data`, which starts at absolute `offset`."""

    def hold(self, data: bytes) -> bool:
        """Whether to keep `data` from everyone for now (True: the sink has it, and gives
        it back through `publish` once it may be handed out, or drops it)."""


class ConsoleHub:
    """Everything about one VM's console that outlives client sessions."""

    def __init__(
        self,
        vm: VmConfig,
        limits: LimitsConfig,
        *,
        log_dir: Path | None = None,
        sink: LogSink | None = None,
        history: tuple[int, bytes] | None = None,
    ) -> None:
        """A hub for `vm`.

        Args:
            log_dir: keep the console log on disk under this root (single gateway).
            sink: hand output to a shared log instead (cluster owner).
            history: (offset, bytes) the ring starts from: the shared log's tail,
                so offsets continue across owners and a resume finds its bytes.

        Raises:
            ConsoleLogError: the log cannot be opened.
        """
        self.vm = vm
        self.limits = limits
        self.sink = sink
        self._log_root = log_dir
        self.log = self._open_log(vm, limits)
        self.ring = self._new_ring(limits, history)
        self._flush_timer: asyncio.TimerHandle | None = None
        self._log_error_at = 0.0
        self.lease = WriterLease(vm.takeover)
        self.clients: dict[str, HubClient] = {}
        self.input = InputQueue(vm.input_rate)
        # In a cluster, when this gateway's lease on the VM lapses by its own clock (loop
        # time): no input goes to the port after it until a round renews the lease, since
        # another gateway may own the VM by then (a freeze). Set by cluster/node.py.
        self.lease_expiry = math.inf
        self.stats = HubStats(self.input)
        self.port_up = False
        self.resize: tuple[int, int] | None = None
        self.previous_logged_out: bool | None = None
        # Reset and NMI run apart from the port writer: a guest whose serial line stopped
        # draining is exactly the one that needs them, and must not wait behind its input.
        self.hook_queue: deque[QueuedHook] = deque()
        self.hooks_ready = asyncio.Event()
        self.input_ready = asyncio.Event()  # set when input is queued for the keeper
        self._paused: HubClient | None = None
        self._link: SerialLink | None = None
        self._writer: LinkProtocol | None = None  # the link's, for typing without a task
        # Set once by the keeper: on 3.11 every get_running_loop() is a getpid() syscall.
        self._loop: asyncio.AbstractEventLoop | None = None
        self._watchers: set[asyncio.Future[None]] = set()
        self.first_attempt = asyncio.Event()

    # -- the port ---------------------------------------------------------------

    # keeper.py does the port's I/O; these are its entry points.

    def bind_loop(self, loop: asyncio.AbstractEventLoop) -> None:
        """Keep the loop: on 3.11 every get_running_loop() is a getpid() syscall."""
        self._loop = loop

    def port_opened(self, link: SerialLink) -> None:
        """The port is open: accept input, tell the clients."""
        self._link = link
        self._writer = link.writer
        self._set_port_state(True)
        self.first_attempt.set()

    def port_closed(self) -> None:
        """The port is gone (or closing): refuse input, drop what is queued, tell the clients."""
        self._link = None
        self._writer = None
        self._set_port_state(False)

    def lease_renewed(self, expiry: float) -> None:
        """The lease now lasts until `expiry` (loop time): input held for it may go (keeper.py)."""
        self.lease_expiry = expiry
        self._changed()

    def input_written(self, n: int) -> None:
        """The keeper's operation is done (`n` bytes reached the port): maybe read the writer."""
        if self.input.written(n):
            self._resume_paused()

    def break_failed(self, message: str) -> None:
        """A BREAK could not be sent: the writer, who sent it, is told why; the session goes on.

        The message may quote `break_command`'s stderr, which is for who asked, not for
        every spectator (only the writer's BREAKs are queued, and a new writer's drop
        the old one's).
        """
        log.warning("break_failed", vm=self.vm.id, error=message)
        writer = self.clients.get(self.lease.holder) if self.lease.holder is not None else None
        if writer is not None:
            writer.send_text(control.encode_notice("break_failed", message=message))

    def hook_done(
        self, hook: QueuedHook, *, ok: bool, status: int | None = None, message: str = ""
    ) -> None:
        """Report an NMI/reset outcome: whole to the session that asked and the audit log.

        A failure's message quotes the command's stderr (hypervisor hosts, paths, what an
        operator's script prints for operators): every other session, readers included,
        learns only that the hook ran and who ran it.
        """
        result: dict[str, object] = {"status": status} if ok else {"message": message}
        audit(
            "hook_finished",
            hook=hook.name,
            ok=ok,
            session_id=hook.session_id,
            vm=self.vm.id,
            principal=hook.principal,
            peer=hook.peer,
            region=hook.region,
            **({"status": status} if ok else {"error": message}),
        )
        asker = self.clients.get(hook.session_id)
        if asker is not None:  # gone meanwhile: the audit event is its only record
            asker.send_text(control.encode_notice("hook_result", hook=hook.name, ok=ok, **result))
        ran = control.encode_notice("hook_ran", hook=hook.name, by=hook.principal)
        for client in list(self.clients.values()):
            if client is not asker:
                client.send_text(ran)

    def _set_port_state(self, up: bool) -> None:
        self.port_up = up
        if not up:
            self._drop_input()
        self._changed()
        self.broadcast(control.encode_notice("port_up" if up else "port_down", vm=self.vm.id))

    def publish(self, data: bytes) -> None:
        """Record console output (log first, then ring) and hand it to every client.

        A cluster owner's sink may hold it first: an owner that was frozen past its
        lease must not give the output an offset before it knows the lease is still
        its own (another gateway may already hand out those offsets).
        """
        if self.sink is not None and self.sink.hold(data):
            return
        self._log_append(data)
        offset = self.ring.append(data)
        if self.sink is not None:
            self.sink.append(offset, data)
        self.stats.bytes_from_port += len(data)
        if self.clients:
            frame = binary_frame(data)
            for client in list(self.clients.values()):
                client.deliver(offset, data, frame)
        if self._watchers:
            self._changed()

    @staticmethod
    def adopt_legacy_logs(log_dir: Path, vms: Iterable[VmConfig]) -> None:
        """At start, before any hub: logs kept by VM id alone go to the VMs with that id.

        Raises:
            ConsoleLogError: a log could not be moved.
        """
        adopt_legacy_logs(log_dir, [log_identity(vm) for vm in vms])

    def _open_log(self, vm: VmConfig, limits: LimitsConfig) -> ConsoleLog | None:
        if self._log_root is None:
            return None
        identity = log_identity(vm)
        # Timer-flushed: a flood writes at most console_log_bytes per flush to disk.
        log = ConsoleLog(
            self._log_root / identity.directory_name(),
            limits.console_log_bytes,
            flush_bytes=None,
            identity=identity,
        )
        log.open()
        return log

    def _new_ring(
        self, limits: LimitsConfig, history: tuple[int, bytes] | None = None
    ) -> OutputRing:
        end = self.log.end if self.log is not None else 0
        if history is not None:
            end = history[0]
        # Memory holds what live clients may lag by; never more than the log holds.
        ring = OutputRing(min(limits.output_buffer_bytes, limits.console_log_bytes), end=end)
        if history is not None and history[1]:
            ring.append(history[1])
        return ring

    def reconfigure(self, vm: VmConfig, limits: LimitsConfig) -> bool:
        """Apply a reloaded VM entry; True when the port itself must be reopened.

        A VM whose subscription, resource group or scale set changed is another
        VM to its readers: its sessions are closed (4004) and it goes on with
        that identity's log, its history (see consolelog.py).
        """
        old, self.vm, self.limits = self.vm, vm, limits
        self.lease.policy = vm.takeover
        self.input.pace(vm.input_rate)
        if log_identity(old) != log_identity(vm):
            self._change_identity(vm, limits)
        return (old.serial, old.baud, old.parity) != (vm.serial, vm.baud, vm.parity)

    def _change_identity(self, vm: VmConfig, limits: LimitsConfig) -> None:
        """Close the sessions and swap the log and ring for the new identity's."""
        self.close_all(control.CLOSE_UNKNOWN_VM, "vm identity changed in the gateway configuration")
        self.close_log()
        try:
            self.log = self._open_log(vm, limits)
        except ConsoleLogError as exc:
            # Never the old identity's history: run without a log until the next start.
            self.log = None
            self.stats.log_errors += 1
            log.error("console_log_open_failed", vm=vm.id, error=str(exc))
        self.ring = self._new_ring(limits)
        log.info("vm_identity_changed", vm=vm.id, subscription=vm.subscription)

    def _log_append(self, data: bytes) -> None:
        """Append to the on-disk log; a disk problem is logged (rate-limited), never fatal."""
        if self.log is None:
            return
        try:
            self.log.append(data)
        except ConsoleLogError as exc:
            self._log_failed(exc)
        if self._flush_timer is None and self.log.flushed_end < self.log.end:
            loop = self._loop or asyncio.get_running_loop()
            share = LOG_FLUSH_MIN_SHARE + (1.0 - LOG_FLUSH_MIN_SHARE) * random.random()  # noqa: S311
            self._flush_timer = loop.call_later(LOG_FLUSH_SECONDS * share, self._flush_log)

    def _flush_log(self) -> None:
        self._flush_timer = None
        if self.log is not None:
            try:
                self.log.flush()
            except ConsoleLogError as exc:
                self._log_failed(exc)

    def _log_failed(self, exc: ConsoleLogError) -> None:
        self.stats.log_errors += 1
        now = time.monotonic()
        if now - self._log_error_at >= 60:
            self._log_error_at = now
            log.error("console_log_write_failed", vm=self.vm.id, error=str(exc))

    def close_log(self) -> None:
        """Flush and fsync the console log (shutdown, VM removed)."""
        if self._flush_timer is not None:
            self._flush_timer.cancel()
            self._flush_timer = None
        if self.log is not None:
            try:
                self.log.close()
            except ConsoleLogError as exc:
                log.error("console_log_close_failed", vm=self.vm.id, error=str(exc))

    # -- output history ---------------------------------------------------------------

    @property
    def start(self) -> int:
        """Oldest console offset still held (on disk when there is a log)."""
        if self.log is None:
            return self.ring.start
        return min(self.log.start, self.ring.start)

    @property
    def end(self) -> int:
        """Offset just after the newest console byte."""
        return self.ring.end

    def next_held(self, offset: int) -> int:
        """The first offset at or after `offset` whose output is held: past a hole in the
        on-disk log (output a crash lost before it was written), else `offset` itself."""
        if self.log is None or offset >= self.ring.start:
            return offset
        return min(self.log.next_held(offset), self.ring.start)

    def read(self, offset: int, max_bytes: int) -> bytes:
        """Held console output from `offset` (clamped to `start`), at most `max_bytes`.

        Recent output comes from memory; older output from the on-disk log. Empty
        when the log cannot be read: what is below ``ring.start`` is then unavailable.
        """
        return b"".join(self.pieces(offset, max_bytes))

    def pieces(self, offset: int, max_bytes: int) -> list[bytes | memoryview]:
        """What `read` returns, unjoined: a client catching up joins them into its frame."""
        offset = max(offset, self.start)
        if offset >= self.ring.start or self.log is None:
            return self.ring.pieces(offset, max_bytes)
        try:
            older = self.log.read(offset, min(max_bytes, self.ring.start - offset))
        except ConsoleLogError as exc:
            self._log_failed(exc)
            return []  # the caller skips to ring.start, telling the client what it missed
        parts: list[bytes | memoryview] = [older] if older else []
        if len(older) < max_bytes and offset + len(older) >= self.ring.start:
            parts += self.ring.pieces(offset + len(older), max_bytes - len(older))
        return parts

    # -- input ------------------------------------------------------------------

    @property
    def can_break(self) -> bool:
        """Whether BREAK (and so SysRq) can reach this console now."""
        if self.vm.break_command:
            return True
        return self._link is not None and self._link.can_break

    def submit(self, client: HubClient, data: bytes) -> None:
        """Write the writer's keystrokes, or queue them; pauses its socket when a second is queued.

        Typing is the common case: when nothing is queued or being written and the
        line rate allows it, the queue answers "write_now" and the bytes go to the port
        at once (in order, since the writer task is idle), saving a task wake-up per
        keystroke. Past `lease_expiry` they are queued instead, and the keeper holds them
        until the lease is renewed (or the port closes with the lease lost).
        """
        writer, loop = self._writer, self._loop
        if writer is not None and loop is not None and writer.writable:
            now = loop.time()
            verdict = self.input.offer(data, now if now < self.lease_expiry else None)
            if verdict == "write_now":
                writer.write_now(data)
                return
        else:
            verdict = self.input.offer(data)  # the port cannot take it now: queued
        self.input_ready.set()
        if verdict == "pause":
            self._paused = client
            client.pause_input()

    def submit_break(self, key: str = "") -> bool:
        """Queue a BREAK (then a SysRq key) ahead of queued input, behind earlier BREAKs.

        Behind, so a scripted sequence (s, u, b: sync, remount, reboot) keeps its order.
        False (nothing queued) when `MAX_QUEUED_BREAKS` are already waiting.
        """
        if self.input.offer(Break(key.encode("ascii"))) == "refused":
            return False
        self.input_ready.set()
        return True

    def submit_hook(self, name: str, client: HubClient) -> str | None:
        """Queue `nmi_command`/`reset_command` for `client`; else why not: `unsupported`, `busy`."""
        argv = self.vm.nmi_command if name == "nmi" else self.vm.reset_command
        if argv is None:
            return "unsupported"
        if len(self.hook_queue) >= MAX_QUEUED_HOOKS:
            return "busy"
        self.hook_queue.append(
            QueuedHook(
                f"{name}_command",
                argv,
                client.session_id,
                client.principal.id,
                client.peer,
                client.region,
            )
        )
        self.hooks_ready.set()
        return None

    def _resume_paused(self) -> None:
        if self._paused is not None:
            client, self._paused = self._paused, None
            client.resume_input()

    def input_stalled(self, seconds: float) -> None:
        """The far end took nothing for `seconds`: drop queued keys, keep BREAKs."""
        dropped, resume = self.input.stall()
        if resume:
            self._resume_paused()
        log.warning("serial_input_stalled", vm=self.vm.id, dropped=dropped)
        self.broadcast(
            control.encode_notice(
                "input_dropped",
                bytes=dropped,
                message=f"the serial port took no input for {seconds:g}s",
            )
        )

    def _drop_input(self, then: bytes | Hangup | None = None) -> None:
        """Forget queued input (its writer or port is gone); queue `then` (on_detach) instead."""
        if self.input.drop(then):
            self._resume_paused()
        if then is not None:
            self.input_ready.set()

    # -- sessions -----------------------------------------------------------------

    def check_writer(self, session_id: str) -> Decision:
        """What would happen if this session asked to write (for the HTTP 409 decision)."""
        return self.lease.check(session_id)

    def attach(self, client: HubClient, *, writer: bool) -> Decision | None:
        """Add a session; as writer, carry out the takeover policy.

        Returns the lease decision for writers, None for spectators. The caller
        has already refused `Denied` with HTTP 409, so it does not occur here
        unless the caller asked for it.

        All or nothing: what can fail (the messages built from the newcomer's
        name, the newcomer taking its role) is done before the lease, the
        client table or the old writer change, so a failure leaves the old
        writer writing and nobody told otherwise.
        """
        decision = self.lease.check(client.session_id) if writer else None
        if decision is None or isinstance(decision, Denied):
            client.set_role("spectator")
            self.clients[client.session_id] = client
            self._changed()
            return decision
        by = client.principal.id
        displaced = decision.previous if isinstance(decision, Evicted | Demoted) else None
        to_others = control.encode_notice("writer_changed", writer=by)
        to_previous = reason = ""
        if isinstance(decision, Evicted):
            to_previous = control.encode_notice("writer_changed", writer=by, by=by, you="evicted")
            reason = control.close_reason(f"taken over by {by}")
        elif isinstance(decision, Demoted):
            to_previous = control.encode_notice("demoted", by=by, writer=by)
        client.set_role("writer")
        # Decided: from here on the lease, the table and the old writer change together.
        self.lease.acquire(client.session_id)
        self.clients[client.session_id] = client
        self._changed()
        previous = self.clients.get(displaced) if displaced is not None else None
        if displaced is not None:
            self.stats.takeovers += 1
            self._writer_left()
        if previous is not None:
            # A spectator from now on: keys it still has in flight are refused.
            previous.set_role("spectator")
            previous.send_text(to_previous)
            if isinstance(decision, Evicted):
                previous.close(control.CLOSE_TAKEN_OVER, reason)
        for other in self.clients.values():
            if other is not client and other.session_id != displaced:
                other.send_text(to_others)
        if previous is not None:
            audit(
                "writer_evicted" if isinstance(decision, Evicted) else "writer_demoted",
                vm=self.vm.id,
                session_id=previous.session_id,
                principal=previous.principal.id,
                peer=previous.peer,
                region=previous.region,
                by=by,
                by_session_id=client.session_id,
                by_peer=client.peer,
            )
        return decision

    def demote(self, client: HubClient, reason: str) -> bool:
        """Make the writer a spectator that stays attached; False if it was not the writer.

        The takeover policy `demote` without a newcomer: used when the writer's own
        role on the VM fell to reader (a reload). Its queued input is dropped and
        `on_detach` runs, as when any writer leaves.
        """
        if not self.lease.release(client.session_id):
            return False
        self._writer_left()
        client.set_role("spectator")
        audit(
            "writer_demoted",
            vm=self.vm.id,
            session_id=client.session_id,
            principal=client.principal.id,
            peer=client.peer,
            region=client.region,
            reason=reason,
        )
        client.send_text(control.encode_notice("demoted", by=None, writer=None, reason=reason))
        for other in self.clients.values():
            if other is not client:
                other.send_text(control.encode_notice("writer_changed", writer=None))
        self._changed()
        return True

    def detach(self, client: HubClient) -> None:
        """Remove a session; a leaving writer releases the lease."""
        if self.clients.get(client.session_id) is client:
            del self.clients[client.session_id]
        if self._paused is client:
            self._paused = None
        if self.lease.release(client.session_id):
            self._writer_left()
            for other in self.clients.values():
                other.send_text(control.encode_notice("writer_changed", writer=None))
        self._changed()

    def _writer_left(self) -> None:
        """The writer is gone or displaced: drop its queued input, run on_detach."""
        action = self.vm.on_detach
        if isinstance(action, bytes):
            self._drop_input(then=action)
            self.previous_logged_out = True
        elif action == "hangup" and self._link is not None and self._link.can_hangup:
            self._drop_input(then=Hangup())
            self.previous_logged_out = True
        else:
            self._drop_input()
            self.previous_logged_out = False

    def next_change(self) -> asyncio.Future[None]:
        """Resolved at the next change of port, output or lease (keeper.wait_until loops on it)."""
        loop = self._loop or asyncio.get_running_loop()
        waiter: asyncio.Future[None] = loop.create_future()
        self._watchers.add(waiter)
        waiter.add_done_callback(self._watchers.discard)
        return waiter

    def _changed(self) -> None:
        for waiter in self._watchers:
            if not waiter.done():
                waiter.set_result(None)

    def broadcast(self, text: str) -> None:
        """A control message to every attached session."""
        for client in list(self.clients.values()):
            client.send_text(text)

    def close_all(self, code: int, reason: str) -> None:
        """Close every session (shutdown, VM removed)."""
        for client in list(self.clients.values()):
            client.close(code, reason)

    def hand_off_all(self, reason: str) -> None:
        """This gateway lets go of the VM (cluster mode): every session is handed off."""
        for client in list(self.clients.values()):
            client.hand_off(reason)

    def limits_for(self, role: str) -> dict[str, int | float | None]:
        """The numbers a client is told in `hello`."""
        return {
            "input_bytes_per_s": self.vm.input_rate if role == "writer" else 0,
            "max_paste_bytes": self.limits.max_paste_bytes,
            "output_bytes_per_s": self.limits.output_bytes_per_s,
            "idle_timeout": self.limits.idle_timeout,
            "replay_bytes": self.limits.replay_bytes,
        }
