"""The gateway: start-up and shutdown order in one readable place.

Start-up:
  1. build the TLS context, the authenticator and RBAC (a bad file fails here);
  2. start one hub per VM (each opens its port and keeps reconnecting);
  3. bind the health listener, then the TLS listener;
  4. start the keepalive sweeper; set `ready` (systemd READY=1 goes here).
Shutdown (SIGTERM/SIGINT, or `stop()`):
  1. draining: /readyz turns 503, new requests get 503;
  2. stop accepting on the TLS listener;
  3. tell sessions (notice), close them with 1001, wait (bounded) until they are gone;
  4. cancel the hubs (closing their ports) and the sweeper; close the health listener.
Every task belongs to one TaskGroup; nothing outlives `serve()`.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime
import gc
import ipaddress
import signal
import time
from collections import Counter
from collections.abc import Callable

from . import control, native
from .audit import audit
from .auth import Authenticator, Principal
from .certs import certificate_not_after
from .config import Config, Role, VmConfig, load_config
from .connection import ClientConnection, Request
from .consolelog import ConsoleLogError
from .errors import (
    AuthError,
    ConfigError,
    ForbiddenError,
    NotFoundError,
    PeerError,
    RateLimitedError,
)
from .health import HealthConnection, make_registry
from .hub import ConsoleHub
from .keeper import keep_port
from .listener import Listener, bind
from .log import get_logger
from .ratelimit import KeyedLimiter
from .rbac import Rbac
from .sdnotify import Notifier
from .session import ConsoleSession
from .switches import ConsoleSwitches, Level
from .tickets import Ticket, TicketStore
from .tls import server_context

log = get_logger("relayd.app")

PORTS_TRIED_TIMEOUT = 12.0
SWEEP_BATCH = 256
# Young collections every 10,000 net allocations instead of 700. With 1,000 consoles
# being typed into (10,000 keys/s) the defaults ran ~13 young collections a second at
# ~1 ms each, a middle one (~3 ms) a second and a full one (20-30 ms) every ~10 s:
# ~2 % of the relay's CPU, and pauses every typist waits out. Start-up is frozen.
GC_THRESHOLDS = (10_000, 10, 10)


def _cert_not_after(config: Config) -> datetime.datetime:
    """When the configured server certificate expires (already loadable: checked by TLS)."""
    try:
        return certificate_not_after(config.tls.cert)
    except (OSError, ValueError) as exc:
        raise ConfigError(str(config.tls.cert), "tls.cert", f"cannot read expiry: {exc}") from None


SHUTDOWN_CLOSE_TIMEOUT = 6.0


class Gateway:
    """One relayd process: listeners, hubs, sessions."""

    def __init__(self, config: Config) -> None:
        self.config = config
        self.region = config.gateway.region
        self.ssl_context = server_context(config.tls)
        self.authenticator = Authenticator(config.auth)
        self.rbac = Rbac(config.role_assignments)
        self.hubs: dict[str, ConsoleHub] = {vm.id: self._new_hub(vm, config) for vm in config.vms}
        self.sessions: dict[str, ConsoleSession] = {}
        self.connections: set[ClientConnection] = set()
        self.auth_failures: Counter[str] = Counter()
        self.switches = ConsoleSwitches(config.gateway.state_dir)
        self.switches.load()
        self.tickets = TicketStore()
        limits = config.limits
        self._auth_limiter = (
            KeyedLimiter(limits.auth_failures_per_minute / 60, limits.auth_failures_per_minute)
            if limits.auth_failures_per_minute
            else None
        )
        self._conn_limiter = (
            KeyedLimiter(
                limits.connections_per_second_per_ip, 2 * limits.connections_per_second_per_ip
            )
            if limits.connections_per_second_per_ip
            else None
        )
        self.draining = False
        self.ready = asyncio.Event()
        self.tls_port = 0
        self.listener: Listener | None = None
        self.notifier = Notifier.from_environment()
        self.cert_not_after = _cert_not_after(config)
        self._tg: asyncio.TaskGroup | None = None
        self._hub_tasks: dict[str, asyncio.Task[None]] = {}
        self._reloading: asyncio.Task[bool] | None = None
        self.health_port = 0
        self._stop = asyncio.Event()
        self._connections_changed = asyncio.Event()
        self._listening = False

    # -- policy used by connections ------------------------------------------------------

    def admit_connection(self, peer: str) -> PeerError | None:
        """Count a new connection; the refusal to answer its first request with, if over rate."""
        if self._conn_limiter is None:
            return None
        now = time.monotonic()
        wait = self._conn_limiter.retry_after(peer, now)
        self._conn_limiter.hit(peer, now)
        if wait > 0:
            return RateLimitedError(
                "too many new connections from this address", code="rate_limited", retry_after=wait
            )
        return None

    def _check_auth_rate(self, request: Request) -> None:
        if self._auth_limiter is None:
            return
        wait = self._auth_limiter.retry_after(request.peer, time.monotonic())
        if wait > 0:
            raise RateLimitedError(
                "too many failed authentication attempts from this address",
                code="too_many_auth_failures",
                retry_after=wait,
            )

    def _auth_failed(self, request: Request, exc: AuthError) -> None:
        self.auth_failures[exc.code] += 1
        if self._auth_limiter is not None:
            self._auth_limiter.hit(request.peer, time.monotonic())
        audit("auth_failed", reason=exc.code, peer=request.peer, region=self.region)

    def authenticate(self, request: Request) -> Principal:
        """The request's principal: a bearer token, else a verified client certificate.

        Raises:
            RateLimitedError: this address failed too often recently.
            AuthError: no or bad credentials (counted and audited).
        """
        self._check_auth_rate(request)
        authorization = request.headers.get("authorization")
        if authorization is None and request.client_cert_cn is not None:
            return Principal(f"cert:{request.client_cert_cn}", amr=("x509",))
        try:
            return self.authenticator.authenticate(authorization)
        except AuthError as exc:
            self._auth_failed(request, exc)
            raise

    def redeem_ticket(self, request: Request, vm_id: str) -> Ticket:
        """Use the request's one-time ticket for this VM.

        Raises:
            RateLimitedError: this address failed too often recently.
            AuthError: unknown, reused, expired or foreign ticket.
        """
        self._check_auth_rate(request)
        try:
            return self.tickets.redeem(request.query["ticket"], vm_id, time.monotonic())
        except AuthError as exc:
            self._auth_failed(request, exc)
            raise

    def set_console(self, level: Level, key: str, enabled: bool, *, by: str) -> int:
        """Switch consoles at one level; disabling closes their live sessions with 4009.

        Returns the number of sessions closed.
        """
        self.switches.set(level, key, enabled)
        log.info("serial_console_switched", level=level, key=key, enabled=enabled, by=by)
        if enabled:
            return 0
        closed = 0
        for hub in self.hubs.values():
            if not self.console_enabled(hub.vm):
                closed += len(hub.clients)
                hub.close_all(
                    control.CLOSE_DISABLED, f"serial console disabled for {level[:-1]} {key}"
                )
        return closed

    def check_client(self, peer: str) -> None:
        """The client address must be in `allow_clients`.

        Raises:
            ForbiddenError: it is not.
        """
        allowed = self.config.gateway.allow_clients
        if {net.version for net in allowed if net.prefixlen == 0} == {4, 6}:
            return  # everything is allowed (the default): skip the per-request address parse
        try:
            address = ipaddress.ip_address(peer)
        except ValueError:
            return  # a unix-socket peer (tests, local tools): not an IP to check
        if not any(address in net for net in allowed):
            raise ForbiddenError(f"client address {peer} is not allowed", code="client_not_allowed")

    def authorize(
        self, principal: Principal, vm_id: str, request: Request
    ) -> tuple[ConsoleHub, Role]:
        """The hub and the caller's role on it, after every access rule.

        Raises:
            NotFoundError: unknown VM, or no role on it (the two look the same).
            ForbiddenError: console disabled, or MFA required and absent.
        """
        hub = self.hubs.get(vm_id)
        role = self.rbac.role(principal, hub.vm) if hub is not None else None
        fields = {
            "principal": principal.id,
            "peer": request.peer,
            "vm": vm_id,
            "region": self.region,
        }
        if hub is None or role is None:
            audit("access_denied", reason="no_role" if hub else "unknown_vm", **fields)
            raise NotFoundError(f"unknown vm {vm_id!r}", code="unknown_vm")
        if not self.console_enabled(hub.vm):
            audit("access_denied", reason="console_disabled", **fields)
            raise ForbiddenError(
                f"the serial console of {vm_id} is disabled", code="console_disabled"
            )
        sub = self.config.subscription(hub.vm.subscription)
        if (self.config.auth.require_mfa or (sub is not None and sub.require_mfa)) and (
            "mfa" not in principal.amr
        ):
            audit("access_denied", reason="mfa_required", **fields)
            raise ForbiddenError("multi-factor authentication is required", code="mfa_required")
        return hub, role

    def check_origin(self, request: Request) -> None:
        """Refuse cross-site WebSocket requests (browsers always send Origin).

        Raises:
            ForbiddenError: the Origin is not the gateway's own nor allowed.
        """
        origin = request.headers.get("origin")
        if origin is None:
            return
        allowed = self.config.gateway.allowed_origins
        own = f"https://{request.headers.get('host', '')}"
        if origin == own or (allowed is not None and origin in allowed):
            return
        raise ForbiddenError(f"origin {origin[:100]!r} is not allowed", code="bad_origin")

    def check_session_limits(self, principal: Principal) -> None:
        """Per-gateway and per-principal session caps.

        Raises:
            RateLimitedError: a cap is reached.
        """
        limits = self.config.limits
        if limits.max_sessions is not None and len(self.sessions) >= limits.max_sessions:
            raise RateLimitedError(
                f"gateway session limit {limits.max_sessions} reached", code="session_limit"
            )
        if limits.max_sessions_per_principal is not None:
            mine = sum(1 for s in self.sessions.values() if s.principal.id == principal.id)
            if mine >= limits.max_sessions_per_principal:
                raise RateLimitedError(
                    f"session limit {limits.max_sessions_per_principal} per principal reached",
                    code="session_limit",
                )

    def console_enabled(self, vm: VmConfig) -> bool:
        """Whether the VM's console is on at every level: subscription, scale set, VM."""
        sub = self.config.subscription(vm.subscription)
        sub_on = self.switches.get("subscriptions", vm.subscription)
        if sub_on is None:
            sub_on = sub is None or sub.serial_console
        ss_on = (
            True
            if vm.scale_set is None
            else self.switches.get("scale_sets", f"{vm.subscription}/{vm.scale_set}")
        )
        vm_on = self.switches.get("vms", vm.id)
        if vm_on is None:
            vm_on = vm.serial_console
        return sub_on and ss_on is not False and vm_on

    def unready_reasons(self) -> list[str]:
        """Why /readyz is not 200 (empty when ready)."""
        reasons = []
        if not self._listening:
            reasons.append("listener not bound")
        if self.draining:
            reasons.append("draining")
        if self.cert_not_after <= datetime.datetime.now(datetime.UTC):
            reasons.append(f"certificate expired at {self.cert_not_after.isoformat()}")
        if self.config.gateway.ready_requires_port and not any(
            hub.port_up for hub in self.hubs.values()
        ):
            reasons.append("no serial port is reachable")
        return reasons

    def connection_closed(self, conn: ClientConnection) -> None:
        """Forget a connection (and its session); wakes a waiting shutdown."""
        self.connections.discard(conn)
        if conn.session is not None:
            self.sessions.pop(conn.session.session_id, None)
        self._connections_changed.set()

    # -- life cycle -----------------------------------------------------------------------

    def stop(self) -> None:
        """Begin the graceful shutdown (idempotent; safe from a signal handler)."""
        self._stop.set()

    async def serve(self, *, install_signals: bool = False) -> None:
        """Run until `stop()`; see the module docstring for the order."""
        loop = asyncio.get_running_loop()
        gw = self.config.gateway
        if install_signals:
            for sig in (signal.SIGTERM, signal.SIGINT):
                loop.add_signal_handler(sig, self.stop)
            loop.add_signal_handler(signal.SIGHUP, self.request_reload)
        health_server: asyncio.Server | None = None
        try:
            async with asyncio.TaskGroup() as tg:
                self._tg = tg
                for hub in self.hubs.values():
                    self._start_hub(hub)
                if gw.health_listen is not None:
                    registry = make_registry(self)
                    health_server = await loop.create_server(
                        lambda: HealthConnection(self, registry),
                        gw.health_listen.host,
                        gw.health_listen.port,
                        reuse_address=True,
                    )
                    self.health_port = health_server.sockets[0].getsockname()[1]
                self.listener = Listener(self, bind(gw.listen.host, gw.listen.port))
                self.tls_port = self.listener.port
                accepting = tg.create_task(self.listener.serve(), name="listener")
                self._listening = True
                # READY only once every port has been tried (opened, or failed once).
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(PORTS_TRIED_TIMEOUT):
                        for hub in self.hubs.values():
                            await hub.first_attempt.wait()
                sweeper = tg.create_task(self._sweep(), name="sweeper")
                watchdog = tg.create_task(self.notifier.watchdog(), name="watchdog")
                log.info(
                    "gateway_ready",
                    listen=str(gw.listen),
                    port=self.tls_port,
                    health_port=self.health_port,
                    vms=len(self.hubs),
                    ports_up=sum(hub.port_up for hub in self.hubs.values()),
                    keystroke_path=native.mode(),
                )
                self.ready.set()
                self.notifier.notify("READY=1", f"STATUS={self.status_line()}")
                await self._stop.wait()
                self.notifier.notify("STOPPING=1", "STATUS=draining")
                await self._shutdown(accepting)
                for task in (*self._hub_tasks.values(), sweeper, watchdog):
                    task.cancel()
        finally:
            self._listening = False
            self._tg = None
            for hub in self.hubs.values():
                hub.close_log()
            if health_server is not None:
                health_server.close()
                await health_server.wait_closed()
            if install_signals:
                for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
                    loop.remove_signal_handler(sig)
            self.notifier.close()
            log.info("gateway_stopped")

    @staticmethod
    def _new_hub(vm: VmConfig, config: Config) -> ConsoleHub:
        return ConsoleHub(vm, config.limits, log_dir=config.gateway.state_dir / "consolelog")

    def _open_added_hubs(self, config: Config) -> dict[str, ConsoleHub]:
        """Hubs (console logs open) for the VMs a new config adds: all of them, or none.

        Opened before the reload commits, so a log that cannot be opened (disk
        full, read-only, held by another process) fails the reload, not the daemon.

        Raises:
            ConsoleLogError: one of the logs cannot be opened.
        """
        added: dict[str, ConsoleHub] = {}
        try:
            for vm in config.vms:
                if vm.id not in self.hubs:
                    added[vm.id] = self._new_hub(vm, config)
        except ConsoleLogError:
            for hub in added.values():
                hub.close_log()
            raise
        return added

    def _start_hub(self, hub: ConsoleHub) -> None:
        assert self._tg is not None
        self._hub_tasks[hub.vm.id] = self._tg.create_task(keep_port(hub), name=f"hub-{hub.vm.id}")

    def status_line(self) -> str:
        """One line for systemd's STATUS=."""
        writers = sum(1 for s in self.sessions.values() if s.role == "writer")
        up = sum(hub.port_up for hub in self.hubs.values())
        return (
            f"{len(self.sessions)} sessions ({writers} writing), "
            f"{up}/{len(self.hubs)} serial ports up"
        )

    def request_reload(self) -> None:
        """SIGHUP: reload in a task owned by the gateway (one at a time)."""
        if self._tg is None or self.draining:
            return
        if self._reloading is not None and not self._reloading.done():
            log.info("reload_already_running")
            return
        self._reloading = self._tg.create_task(self.reload(), name="reload")

    async def reload(self) -> bool:
        """Re-read config, certificate and keys; keep the old ones if anything is wrong.

        Live sessions continue; new handshakes use the new certificate. VMs added
        start, VMs removed close their sessions (4004) and their ports; a VM whose
        port settings changed reconnects its port, its sessions staying attached.
        """
        self.notifier.notify("RELOADING=1", f"MONOTONIC_USEC={time.monotonic_ns() // 1000}")
        try:
            config = load_config(self.config.path)
            ssl_context = server_context(config.tls)
            authenticator = Authenticator(config.auth)
            cert_expiry = _cert_not_after(config)
            added = self._open_added_hubs(config)
        except (ConfigError, ConsoleLogError) as exc:
            log.error("config_reload_failed", error=str(exc))
            self.notifier.notify("READY=1", f"STATUS=reload failed; {self.status_line()}")
            return False
        for key in ("listen", "health_listen", "state_dir"):
            if getattr(config.gateway, key) != getattr(self.config.gateway, key):
                log.warning("reload_needs_restart", key=f"gateway.{key}")
        self.config = config
        self.region = config.gateway.region
        self.ssl_context = ssl_context
        self.authenticator = authenticator
        self.cert_not_after = cert_expiry
        self.rbac = Rbac(config.role_assignments)
        wanted = {vm.id: vm for vm in config.vms}
        for vm_id in [v for v in self.hubs if v not in wanted]:
            hub = self.hubs.pop(vm_id)
            hub.close_all(control.CLOSE_UNKNOWN_VM, "vm removed from the gateway configuration")
            task = self._hub_tasks.pop(vm_id)
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)
            hub.close_log()
        for vm_id, vm in wanted.items():
            existing = self.hubs.get(vm_id)
            if existing is None:
                self.hubs[vm_id] = added[vm_id]
                self._start_hub(self.hubs[vm_id])
            elif existing.reconfigure(vm, config.limits):
                task = self._hub_tasks.pop(vm_id)
                task.cancel()
                await asyncio.gather(task, return_exceptions=True)
                self._start_hub(existing)
        for hub in self.hubs.values():
            if not self.console_enabled(hub.vm):
                hub.close_all(control.CLOSE_DISABLED, "serial console disabled by configuration")
        log.info("config_reloaded", vms=len(self.hubs))
        self.notifier.notify("READY=1", f"STATUS={self.status_line()}")
        return True

    async def _shutdown(self, accepting: asyncio.Task[None]) -> None:
        self.draining = True
        log.info("gateway_draining", sessions=len(self.sessions))
        accepting.cancel()  # stop accepting; the listening socket closes with it
        grace = self.config.gateway.drain_seconds
        for session in list(self.sessions.values()):
            session.send_text(control.encode_notice("shutting_down", closes_in=grace))
        # Clients may leave on their own during the grace period; then the rest are closed.
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(grace):
                await self._until(lambda: not self.sessions)
        for session in list(self.sessions.values()):
            session.close(control.CLOSE_GOING_AWAY, "gateway shutting down")
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(SHUTDOWN_CLOSE_TIMEOUT):
                await self._until(lambda: not self.connections)
        for conn in list(self.connections):
            if conn.transport is not None:
                conn.transport.abort()

    async def _until(self, predicate: Callable[[], bool]) -> None:
        """Wait until `predicate` holds, re-checked whenever a connection closes."""
        while not predicate():
            self._connections_changed.clear()
            await self._connections_changed.wait()

    async def _sweep(self) -> None:
        """Session timers in one task: keepalive pings, idle warnings and closes, length caps.

        Each session pings on its own schedule (spread over the interval from its
        session id), and the sweep yields to the loop every `SWEEP_BATCH` sessions,
        so 10,000 sessions never stall typing users for a ping round. A writer that
        stops answering pings is dropped within two keepalive intervals.
        """
        limits = self.config.limits
        tick = min(1.0, limits.keepalive_interval, limits.idle_warning / 2)
        loop = asyncio.get_running_loop()
        next_housekeeping = loop.time() + limits.keepalive_interval
        while True:
            await asyncio.sleep(tick)
            await self._sweep_sessions(time.monotonic())
            if loop.time() >= next_housekeeping:
                next_housekeeping = loop.time() + limits.keepalive_interval
                if self.notifier.enabled:
                    self.notifier.notify(f"STATUS={self.status_line()}")
                now = time.monotonic()
                self.tickets.expire(now)
                for limiter in (self._auth_limiter, self._conn_limiter):
                    if limiter is not None:
                        limiter.prune(now)

    async def _sweep_sessions(self, now: float) -> None:
        """One round over the sessions, yielding every `SWEEP_BATCH`.

        Its own coroutine so that its locals end with it: the sweeper sleeping between
        rounds must not keep the last session it swept (closed since, with its TLS
        buffers) alive until the next round.
        """
        for i, session in enumerate(list(self.sessions.values()), 1):
            session.sweep(now)
            if i % SWEEP_BATCH == 0:
                await asyncio.sleep(0)


def run_forever(config: Config, *, on_ready: Callable[[Gateway], None] | None = None) -> int:
    """Run a gateway on a fresh event loop (uvloop when installed) until SIGTERM/SIGINT."""

    async def main() -> None:
        gateway = Gateway(config)
        task = asyncio.create_task(gateway.serve(install_signals=True))
        ready = asyncio.create_task(gateway.ready.wait())
        await asyncio.wait({task, ready}, return_when=asyncio.FIRST_COMPLETED)
        if ready.done():
            # Start-up objects (config, modules, hubs) live as long as the process: keep
            # them out of every later full collection's scan (a tail-latency cost).
            # Only here, in the daemon: freezing is process-wide.
            gc.collect()
            gc.freeze()
            gc.set_threshold(*GC_THRESHOLDS)
        if ready.done() and on_ready is not None:
            on_ready(gateway)
        ready.cancel()
        await task

    _run(main())
    return 0


def _run(coro: object) -> None:
    try:
        import uvloop
    except ImportError:  # pragma: no cover - uvloop is a Linux dependency
        asyncio.run(coro)  # type: ignore[arg-type]
        return
    uvloop.run(coro)  # type: ignore[arg-type]


__all__ = ["Gateway", "run_forever"]
