"""The gateway: start-up and shutdown order in one readable place.

Start-up:
  1. build the TLS context, the authenticator and RBAC (a bad file fails here);
  2. start one hub per VM (each opens its port and keeps reconnecting);
  3. bind the health listener; in a cluster, read the region from Redis (waiting
     for it at most 12 s); bind the TLS listener;
  4. start the keepalive sweeper; set `ready` (systemd READY=1 goes here).
Shutdown (SIGTERM/SIGINT, or `stop()`):
  1. draining: /readyz turns 503, new requests get 503;
  2. stop accepting on the TLS listener;
  3. tell sessions (notice), close them with 1001 (hand off those another gateway
     relays here); in cluster mode leave the region (output shipped, leases released);
     then wait (bounded) until the sessions are gone;
  4. cancel the hubs (closing their ports) and the sweeper; close the health listener.
Every task belongs to one TaskGroup; nothing outlives `serve()`.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime
import gc
import signal
import ssl
import time
from collections import Counter
from collections.abc import Callable, Collection, Sequence

from . import api, control, native
from .access import AccessPolicy
from .auth import Authenticator, Principal
from .certs import certificate_not_after
from .cluster import peerview
from .cluster.node import ClusterNode, Outbox
from .cluster.peerlink import PeerTrust, peer_client_context, trust_peer_ca
from .cluster.store import ClusterStore, RedisTarget, SwitchChange
from .config import Config, VmConfig, load_config
from .connection import ConsoleGrant, ForwardGrant, HttpConnection, client_cert_cn
from .errors import (
    ClusterUnavailableError,
    ConfigError,
    ConsoleLogError,
    PeerError,
    SharedStateError,
)
from .health import ClusterHealth, HealthConnection, make_registry
from .http import HttpResponse, Request
from .hub import ConsoleHub
from .keeper import keep_port
from .linger import reset_connection
from .listener import Listener, bind, is_trusted_proxy, plain_address
from .log import get_logger
from .revocation import Revocations, load_revocations
from .sdnotify import Notifier
from .session import ConsoleSession
from .switches import Level
from .tls import server_context

log = get_logger("relayd.app")

PORTS_TRIED_TIMEOUT = 12.0
SWEEP_BATCH = 256
# Young collections every 10,000 net allocations instead of 700. With 1,000 consoles
# being typed into (10,000 keys/s) the defaults ran ~13 young collections a second at
# ~1 ms each, a middle one (~3 ms) a second and a full one (20-30 ms) every ~10 s:
# ~2 % of the relay's CPU, and pauses every typist waits out. Start-up is frozen.
GC_THRESHOLDS = (10_000, 10, 10)


def _server_context(config: Config) -> ssl.SSLContext:
    """The listener's TLS context; in a cluster it also verifies gateways' certificates."""
    ctx = server_context(config.tls)
    if config.cluster is not None:
        trust_peer_ca(ctx, config.cluster.peer_ca)
    return ctx


#: Source addresses of gateways' peer links remembered (a region has a few gateways).
MAX_GATEWAY_SOURCES = 64


def peer_material(config: Config) -> tuple[ssl.SSLContext, PeerTrust]:
    """The context peer links go out with, and what tells a gateway's certificate.

    Raises:
        ConfigError: the certificate, key or a CA file cannot be loaded.
    """
    assert config.cluster is not None
    tls, peer_ca = config.tls, config.cluster.peer_ca
    ssl_ctx = peer_client_context(
        tls.cert, tls.key, peer_ca, min_version=tls.min_version, crl=tls.crl
    )
    return ssl_ctx, PeerTrust.load(peer_ca, tls.client_ca)


def _revocations(config: Config) -> Revocations | None:
    """`[tls] crl`, read and checked (revocation.py); what in it will refuse certificates
    nobody revoked (a CA without a CRL, an expired CRL) is logged, not fatal.

    Raises:
        ConfigError: the CRL (or a CA file) cannot be read, or no configured CA signed it.
    """
    tls = config.tls
    if tls.crl is None:
        return None
    peer_ca = None if config.cluster is None else config.cluster.peer_ca
    revocations, problems = load_revocations(tls.crl, tls.client_ca, peer_ca)
    for problem in problems:
        log.warning("tls_crl_problem", problem=problem)
    return revocations


#: `[cluster]` keys a running gateway keeps until it restarts (its place in the region).
#: A changed `redis` (or how the gateway proves itself to Redis: `redis_ca`, `redis_cert`,
#: `redis_key`, the password in `redis_password_file`) is followed at once
#: (`Gateway._reload_cluster`).
CLUSTER_KEYS_NEEDING_RESTART = ("gateway_id", "advertise", "lease_ttl")


class GatewayCluster:
    """This gateway's cluster membership: the node, the peer-link contexts, the shared log."""

    def __init__(self, gateway: Gateway, config: Config) -> None:
        assert config.cluster is not None
        cluster = config.cluster
        self.store = ClusterStore.from_config(config)
        self.gateway_id = cluster.gateway_id
        self.peer_ssl, self.trust = peer_material(config)
        self.forward_timeout = max(2.0, config.gateway.handshake_timeout)
        # A dead owner's lease lapses after lease_ttl and a survivor claims the VM within
        # a round or two; a relay waits three leases (and a margin) before giving up.
        self.reattach_wait = 3 * cluster.lease_ttl + 2.0
        self.lease_ttl = cluster.lease_ttl
        self.keepalive_interval = config.limits.keepalive_interval
        self.gateway_sources: dict[str, None] = {}  # see `saw_gateway`
        self._proxy_warned: float | None = None  # see `gateway_certificate_from_proxy`
        limits = config.limits
        self.node = ClusterNode(
            gateway,
            self.store,
            gateway_id=cluster.gateway_id,
            advertise=str(cluster.advertise),
            lease_ttl=cluster.lease_ttl,
            ring_bytes=min(limits.output_buffer_bytes, limits.console_log_bytes),
            log_bytes=limits.console_log_bytes,
            backup=gateway.access.switches,
            ask_peer=self._ask_peer,
        )

    async def _ask_peer(self, advertise: str, vms: Sequence[str]) -> peerview.PeerView:
        """Ask the gateway at `advertise` what Redis told it about `vms` (peerview.py)."""
        host, _, port = advertise.rpartition(":")
        return await peerview.ask(
            host.strip("[]"), int(port), self.peer_ssl, vms, self.forward_timeout
        )

    def view_for_peer(self, vms: Sequence[str]) -> dict[str, object]:
        """What this gateway's last round read from Redis about `vms` (a peer asks)."""
        return self.node.view_for_peer(vms)

    @property
    def log(self) -> ClusterStore:
        """The shared console log."""
        return self.store

    def gateway_certificate_from_proxy(self, gateway: str, proxy: str) -> None:
        """A load balancer presented a gateway's certificate: not honoured, and the
        operator told (at most once a minute) to give the balancer a certificate of its
        own, not one from peer_ca with serverAuth."""
        now = time.monotonic()
        if self._proxy_warned is None or now - self._proxy_warned >= 60.0:
            self._proxy_warned = now
            log.warning(
                "gateway_certificate_from_proxy",
                certificate=gateway,
                proxy=proxy,
                hint="a trusted proxy presented a certificate peer_ca issues to gateways; "
                "it is taken for a client's: give the balancer its own client certificate",
            )

    def saw_gateway(self, address: str) -> None:
        """A verified gateway's connection came from `address` (remembered, oldest out)."""
        sources = self.gateway_sources
        sources.pop(address, None)
        sources[address] = None
        if len(sources) > MAX_GATEWAY_SOURCES:
            del sources[next(iter(sources))]

    def is_gateway_address(self, address: str) -> bool:
        """Whether `address` is a gateway of the region: one a live gateway advertises, or
        one a gateway's verified peer link came from (a gateway behind NAT, multi-homed)."""
        return address in self.node.gateway_addresses or address in self.gateway_sources

    def owner_of(self, vm_id: str) -> tuple[str, str] | None:
        """(gateway id, advertise address) of the VM's owner, as of the last round."""
        return self.node.owner_of(vm_id)

    def fence_of(self, vm_id: str) -> int | None:
        """The fencing token of the owner's lease on the VM, as of the last round."""
        return self.node.fence_of(vm_id)

    async def next_round(self) -> None:
        """Wait until the next ownership round has run (a relay waits for a new owner)."""
        await self.node.next_round()

    def link_failed(self, gateway: str) -> None:
        """A peer link to `gateway` could not be opened (counted for /metrics)."""
        self.node.link_failed(gateway)


def _cert_not_after(config: Config) -> datetime.datetime:
    """When the configured server certificate expires (already loadable: checked by TLS)."""
    try:
        return certificate_not_after(config.tls.cert)
    except (OSError, ValueError) as exc:
        raise ConfigError(str(config.tls.cert), "tls.cert", f"cannot read expiry: {exc}") from None


SHUTDOWN_CLOSE_TIMEOUT = 6.0


def _disabled_reason(level: Level, key: str) -> str:
    """The 4009 close reason for sessions a switch disabled: which switch."""
    return f"serial console disabled for {level[:-1]} {key}"


class Gateway:
    """One relayd process: listeners, hubs, sessions."""

    def __init__(self, config: Config) -> None:
        self.config = config
        self.region = config.gateway.region
        self.ssl_context = _server_context(config)
        self.revocations = _revocations(config)
        self.access = AccessPolicy(config)
        self.cluster: GatewayCluster | None = None
        if config.cluster is not None:
            # Hubs come and go with ownership (cluster/node.py); switches and tickets
            # are the region's.
            self.cluster = GatewayCluster(self, config)
            self.access.shared_switches = self.cluster.node
            self.access.shared_tickets = self.cluster.store
            self.hubs: dict[str, ConsoleHub] = {}
        else:
            ConsoleHub.adopt_legacy_logs(config.gateway.state_dir / "consolelog", config.vms)
            self.hubs = {vm.id: self._new_hub(vm, config) for vm in config.vms}
        self.sessions: dict[str, ConsoleSession] = {}
        self.connections: set[HttpConnection] = set()
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

    # -- what connections, routes and the health port ask of the gateway -------------------

    @property
    def auth_failures(self) -> Counter[str]:
        """Rejected credentials by reason (metrics)."""
        return self.access.auth_failures

    def new_connection(self, peer: str) -> HttpConnection:
        """The protocol for a connection that completed its TLS handshake."""
        return HttpConnection(self, peer=peer)

    def peer_identity(self, transport: asyncio.Transport) -> tuple[str | None, str | None]:
        """(user certificate CN, peer gateway id): a gateway's certificate is never a user's."""
        if self.cluster is None:
            return client_cert_cn(transport), None
        ssl_object = transport.get_extra_info("ssl_object")
        trust = self.cluster.trust
        gateway = trust.gateway_identity(ssl_object)
        user = client_cert_cn(transport) if trust.user_certificate_allowed(ssl_object) else None
        peername = transport.get_extra_info("peername")
        address = plain_address(str(peername[0])) if isinstance(peername, tuple) else None
        if gateway is not None and address is not None:
            if is_trusted_proxy(self.config, address):
                # Through the load balancer: a client's connection, whatever certificate the
                # balancer presents for it (one re-encrypting in HTTP mode passes every
                # client's headers on, Relayd-Forwarded-* too). Peer links dial the owner.
                self.cluster.gateway_certificate_from_proxy(gateway, address)
                return user, None
            self.cluster.saw_gateway(address)
        return user, gateway

    def is_peer_link(self, protocol: asyncio.BaseProtocol) -> bool:
        """Whether a connection is a verified gateway's (see `is_gateway_address`)."""
        return isinstance(protocol, HttpConnection) and protocol.gateway is not None

    def is_gateway_address(self, peer: str) -> bool:
        """Whether `peer` is another gateway of the region (the listener asks, before TLS).

        A gateway's peer links each carry one client it admitted itself, so they are not
        counted as one address's connections: under `connections_per_second_per_ip` and
        `max_handshakes_per_ip` a relayed client would be refused where a direct one is not.
        """
        return self.cluster is not None and self.cluster.is_gateway_address(peer)

    # -- what the cluster node asks (cluster/node.py's NodeOwner) ---------------------------

    def configured_vms(self) -> dict[str, VmConfig]:
        """Every VM of the region's configuration."""
        return self.access.vms

    def open_hub(self, vm: VmConfig, history: tuple[int, bytes], sink: Outbox) -> ConsoleHub:
        """This gateway now owns `vm`: a hub from the shared log's tail, its port opening."""
        hub = ConsoleHub(vm, self.config.limits, sink=sink, history=history)
        self.hubs[vm.id] = hub
        if self._tg is not None:
            self._start_hub(hub)
        return hub

    def close_hub(self, vm_id: str, reason: str) -> asyncio.Task[None] | None:
        """This gateway no longer owns the VM: close the port now, send its sessions away.

        Returns the hub's task, done once the port is closed (a hand-over waits for it).
        """
        hub = self.hubs.pop(vm_id, None)
        task = self._hub_tasks.pop(vm_id, None)
        if task is not None:
            task.cancel()
        if hub is not None:
            log.info("cluster_vm_released", vm=vm_id, reason=reason)
            # Relayed sessions move with the console; direct ones get 1001 and reconnect.
            hub.hand_off_all(reason)
        return task

    def owners_changed(self, vms: Collection[str]) -> None:
        """The region named new owners: sessions relayed to the old ones follow (see Relay)."""
        cluster = self.cluster
        if cluster is None or not any(conn.relaying for conn in self.connections):
            return
        owners = {vm: owner[0] for vm in vms if (owner := cluster.node.owner_of(vm)) is not None}
        for conn in list(self.connections):
            conn.owners_moved(owners)

    def switches_changed(self, change: SwitchChange | None = None) -> None:
        """A console switch changed somewhere in the region: end what it disabled here.

        The close names the switch, as `set_console` does on the gateway that set it: a
        client hears the same whichever gateway its owner set the switch on.
        """
        reason = "serial console disabled"
        if change is not None and not change.enabled:
            reason = _disabled_reason(change.level, change.key)
        for hub in list(self.hubs.values()):
            if hub.clients and not self.console_enabled(hub.vm):
                hub.close_all(control.CLOSE_DISABLED, reason)
        self._close_disabled_moves(reason)

    def admit_connection(self, peer: str) -> PeerError | None:
        """Count a new connection (the listener asks, before TLS); an error if over rate."""
        return self.access.admit_connection(peer)

    def check_client(self, peer: str) -> None:
        """Raise `ForbiddenError` for an address outside `allow_clients`."""
        self.access.check_client(peer)

    async def handle(self, request: Request) -> HttpResponse:
        """Route a plain request."""
        return await api.handle(self, request)

    async def open_console(self, request: Request) -> ConsoleGrant | ForwardGrant:
        """Admit a console upgrade, or raise `PeerError`."""
        return await api.open_console(self, request)

    def session_counts(self, principal: Principal, session_id: str) -> tuple[int, int]:
        """Client sessions this gateway holds, and this principal's, but `session_id`.

        The caps (`max_sessions`, `max_sessions_per_principal`) are per gateway, and a
        gateway holds a session whether it serves it here (its own client, or one
        another gateway relays to its console) or relays it to another gateway's
        console (from its admission on): each costs it a connection either way, so
        a gateway behind a balancer is never filled past its cap by relayed sessions.
        A session is counted once by its id (a relay and the session it reaches over
        a loopback link share one); `session_id`, the one being admitted, not at all.
        """
        total = mine = 0
        for sid, session in self.sessions.items():
            if sid != session_id:
                total += 1
                mine += session.principal.id == principal.id
        if self.cluster is None:
            return total, mine  # nothing is relayed: spare the walk over every connection
        for conn in self.connections:
            relayed = conn.relayed_session
            if relayed is None or relayed[0] == session_id or relayed[0] in self.sessions:
                continue
            total += 1
            mine += relayed[1] == principal.id
        return total, mine

    def connection_opened(self, conn: HttpConnection) -> None:
        """Track a live connection (drain waits for them)."""
        self.connections.add(conn)

    def session_started(self, session: ConsoleSession) -> None:
        """Track a console session (caps, metrics, drain)."""
        self.sessions[session.session_id] = session
        self._end_with_credentials(session)

    def session_moved(self, session: ConsoleSession) -> None:
        """A session ended here, its client now relayed to the VM's next owner."""
        self.sessions.pop(session.session_id, None)
        self._connections_changed.set()

    def _end_with_credentials(self, session: ConsoleSession) -> None:
        """`[auth] disconnect_expired`: the session ends (4003) when its token or cert does."""
        expires = session.principal.expires
        if not self.config.auth.disconnect_expired or expires is None:
            session.end_by(None)
            return
        session.end_by(time.monotonic() + (expires - time.time()))

    @property
    def crl_next_update(self) -> datetime.datetime | None:
        """When the first CRL of `[tls] crl` expires (/metrics: renew it before then)."""
        return None if self.revocations is None else self.revocations.next_update()

    def _end_revoked(self) -> None:
        """End the connections whose certificate the CRL now revokes (4003): OpenSSL
        checked each only at its handshake. A gateway's peer link ends every session it
        relays: what a revoked gateway says about its clients is no longer believed. A
        session relayed to an owner whose certificate is revoked ends with 1001."""
        revocations = self.revocations
        if revocations is None:
            return
        for conn in list(self.connections):
            der = conn.peer_certificate()
            if der is not None and revocations.revokes(der):
                log.warning("revoked_certificate_closed", peer=conn.peer, gateway=conn.gateway)
                conn.end(control.CLOSE_FORBIDDEN, "client certificate revoked")
                continue
            der = conn.owner_certificate()
            if der is not None and revocations.revokes(der):
                # The client did nothing wrong: it reconnects, and reaches a trusted owner.
                log.warning("revoked_owner_link_closed", peer=conn.peer, vm=conn.relayed_vm)
                conn.end(control.CLOSE_GOING_AWAY, "the console's owner is no longer trusted")

    def _reauthorize_sessions(self) -> None:
        """After a reload, every live session keeps only what the new policy grants it."""
        for session in list(self.sessions.values()):
            session.reauthorize(self.access.effective_role(session.principal, session.hub.vm))
            self._end_with_credentials(session)

    async def set_console(self, level: Level, key: str, enabled: bool, *, by: str) -> int:
        """Switch consoles at one level; disabling closes their live sessions with 4009.

        Returns the number of sessions closed.
        """
        if self.cluster is not None:
            try:
                await self.cluster.node.set_switch(level, key, enabled)
            except ClusterUnavailableError as exc:
                raise SharedStateError(f"switch not changed: {exc}") from None
        else:
            self.access.switches.set(level, key, enabled)
        log.info("serial_console_switched", level=level, key=key, enabled=enabled, by=by)
        if enabled:
            return 0
        closed = 0
        for hub in self.hubs.values():
            if not self.console_enabled(hub.vm):
                closed += len(hub.clients)
                hub.close_all(control.CLOSE_DISABLED, _disabled_reason(level, key))
        return closed + self._close_disabled_moves(_disabled_reason(level, key))

    def _close_disabled_moves(self, reason: str) -> int:
        """Relayed clients of a console now disabled that wait for its next owner: 4009 now,
        as an owner would close them (the next owner would refuse them, later, with 1001)."""
        closed = 0
        for conn in list(self.connections):
            vm = self.access.vms.get(conn.relayed_vm or "")
            if vm is not None and not self.console_enabled(vm):
                closed += conn.close_moving(control.CLOSE_DISABLED, reason)
        return closed

    def cluster_health(self) -> ClusterHealth | None:
        """The cluster member's state for /healthz and /metrics; None for a single gateway."""
        if self.cluster is None:
            return None
        node = self.cluster.node
        stats = node.stats
        return ClusterHealth(
            redis_up=node.redis_up,
            owned_vms=len(node.held),
            forwarded_sessions=sum(1 for conn in self.connections if conn.relaying),
            round_seconds=stats.renew_seconds,
            redis_errors=dict(stats.errors_by_call),
            appended_bytes=stats.appended_bytes,
            fenced_appends=stats.fenced_appends,
            owner_changes=stats.owner_changes,
            news_rounds=stats.news_rounds,
            deposed_by_peers=stats.deposed_by_peers,
            unstored_bytes=stats.unstored_bytes,
            dropped_bytes=stats.dropped_bytes,
            peer_link_failures=dict(stats.peer_link_failures),
        )

    def console_enabled(self, vm: VmConfig) -> bool:
        """Whether the VM's console is on at every level (see `AccessPolicy`)."""
        return self.access.console_enabled(vm)

    def unready_reasons(self) -> list[str]:
        """Why /readyz is not 200 (empty when ready)."""
        reasons = []
        if not self._listening:
            reasons.append("listener not bound")
        if self.draining:
            reasons.append("draining")
        if self.cluster is not None and not self.cluster.node.state_read:
            reasons.append("cluster state not read from Redis yet")
        if self.cert_not_after <= datetime.datetime.now(datetime.UTC):
            reasons.append(f"certificate expired at {self.cert_not_after.isoformat()}")
        if self.config.gateway.ready_requires_port and not self._a_port_is_reachable():
            reasons.append("no serial port is reachable")
        return reasons

    def _a_port_is_reachable(self) -> bool:
        """A port is up here, or (in a cluster) another gateway owns a VM of this config.

        A gateway that owns no VM is normal in a region (rendezvous hashing: more
        gateways than VMs, or a gateway that just joined) and serves every console
        through their owners; taking it out of the balancer would only shrink the region.
        """
        if any(hub.port_up for hub in self.hubs.values()):
            return True
        cluster = self.cluster
        if cluster is None:
            return False
        owners = (cluster.owner_of(vm.id) for vm in self.config.vms)
        return any(owner is not None and owner[0] != cluster.gateway_id for owner in owners)

    def connection_closed(self, conn: HttpConnection) -> None:
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
        if self.cluster is not None:
            await self._refuse_a_taken_gateway_id(self.cluster)
        try:
            async with asyncio.TaskGroup() as tg:
                self._tg = tg
                for hub in self.hubs.values():
                    self._start_hub(hub)
                # Health first: a cluster gateway may wait for Redis below, and a monitor
                # should hear "Redis down, not ready" meanwhile, not find the port closed.
                if gw.health_listen is not None:
                    registry = make_registry(self)
                    health_server = await loop.create_server(
                        lambda: HealthConnection(self, registry),
                        gw.health_listen.host,
                        gw.health_listen.port,
                        reuse_address=True,
                    )
                    self.health_port = health_server.sockets[0].getsockname()[1]
                node_task: asyncio.Task[None] | None = None
                if self.cluster is not None:
                    await self._join_cluster(self.cluster)
                    node_task = tg.create_task(self.cluster.node.run(), name="cluster")
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
                    stale_modules=list(native.stale_modules()),
                )
                self.ready.set()
                self.notifier.notify("READY=1", f"STATUS={self.status_line()}")
                await self._stop.wait()
                self.notifier.notify("STOPPING=1", "STATUS=draining")
                await self._shutdown(accepting, node_task)
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
            if self.cluster is not None:
                await self.cluster.store.close()
            if install_signals:
                for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
                    loop.remove_signal_handler(sig)
            self.notifier.close()
            log.info("gateway_stopped")

    def _warn_cluster_keys_need_restart(self, config: Config) -> None:
        """Log what a reload leaves as it was: the region and this gateway's place in it."""
        old, new = self.config.cluster, config.cluster
        if (old is None) != (new is None):
            log.warning("reload_needs_restart", key="cluster")
            return
        if old is None or new is None:
            return
        if config.gateway.region != self.config.gateway.region:
            log.warning("reload_needs_restart", key="gateway.region")
        for key in CLUSTER_KEYS_NEEDING_RESTART:
            if getattr(new, key) != getattr(old, key):
                log.warning("reload_needs_restart", key=f"cluster.{key}")

    def _keep_place_in_region(self, config: Config) -> Config:
        """`config` with the region and the restart-only [cluster] keys as they run now.

        The region names the Redis keys this gateway shares, and its id, address and
        lease period are its place in that region: a reload cannot move them, so the
        configuration says what is in force (audit events name the region served).
        """
        old, new = self.config.cluster, config.cluster
        if old is None or new is None:
            return config
        kept = {key: getattr(old, key) for key in CLUSTER_KEYS_NEEDING_RESTART}
        gateway = config.gateway.model_copy(update={"region": self.config.gateway.region})
        return config.model_copy(
            update={"gateway": gateway, "cluster": new.model_copy(update=kept)}
        )

    async def _refuse_a_taken_gateway_id(self, cluster: GatewayCluster) -> None:
        """Refuse to start where another live gateway has this one's `gateway_id`.

        Raises:
            ConfigError: it has (an unreachable Redis is `_join_cluster`'s to report).
        """
        assert self.config.cluster is not None
        advertise = str(self.config.cluster.advertise)
        try:
            elsewhere = await cluster.store.id_live_elsewhere(advertise)
        except ClusterUnavailableError:
            return
        if elsewhere is not None:
            await cluster.store.close()
            message = cluster.store.id_conflict(elsewhere, advertise)
            raise ConfigError(str(self.config.path), "cluster.gateway_id", message)

    async def _join_cluster(self, cluster: GatewayCluster) -> None:
        """Before serving: the switch overrides (or no console is served), a first round."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + PORTS_TRIED_TIMEOUT
        waiting = False
        while True:
            try:
                await cluster.node.load_switches()
                break
            except ClusterUnavailableError as exc:
                if loop.time() >= deadline:
                    log.error("cluster_start_without_redis", error=str(exc))
                    return  # serve; consoles stay refused until the switches are read
                if not waiting:  # the TLS listener is bound only after this: say why
                    waiting = True
                    log.warning(
                        "cluster_waiting_for_redis",
                        error=str(exc),
                        serves_without_in=round(deadline - loop.time(), 1),
                    )
                await asyncio.sleep(0.5)
        await cluster.node.round()

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
            ssl_context = _server_context(config)
            revocations = _revocations(config)
            authenticator = Authenticator(config.auth)
            cert_expiry = _cert_not_after(config)
            added = self._open_added_hubs(config) if self.cluster is None else {}
            peer = None
            if self.cluster is not None and config.cluster is not None:
                peer = peer_material(config)
        except (ConfigError, ConsoleLogError) as exc:
            log.error("config_reload_failed", error=str(exc))
            self.notifier.notify("READY=1", f"STATUS=reload failed; {self.status_line()}")
            return False
        for key in ("listen", "health_listen", "state_dir"):
            if getattr(config.gateway, key) != getattr(self.config.gateway, key):
                log.warning("reload_needs_restart", key=f"gateway.{key}")
        self._warn_cluster_keys_need_restart(config)
        config = self._keep_place_in_region(config)
        if self.cluster is not None and peer is not None:
            # New peer links present the new certificate and check the new peer_ca, as the
            # listener's new context does; links already open keep theirs.
            self.cluster.peer_ssl, self.cluster.trust = peer
        await self._reload_cluster(config)
        self.config = config
        self.region = config.gateway.region
        self.ssl_context = ssl_context
        self.revocations = revocations
        self.access.reload(config, authenticator)
        self.cert_not_after = cert_expiry
        wanted = {vm.id: vm for vm in config.vms}
        # In a cluster, VMs added or removed are claimed or released by the node's next round.
        for vm_id in [v for v in self.hubs if v not in wanted and self.cluster is None]:
            hub = self.hubs.pop(vm_id)
            hub.close_all(control.CLOSE_UNKNOWN_VM, "vm removed from the gateway configuration")
            task = self._hub_tasks.pop(vm_id)
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)
            hub.close_log()
        for vm_id, vm in wanted.items():
            existing = self.hubs.get(vm_id)
            if existing is None:
                if vm_id not in added:
                    continue
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
        self._close_disabled_moves("serial console disabled by configuration")
        self._reauthorize_sessions()
        self._end_revoked()
        log.info("config_reloaded", vms=len(self.hubs))
        self.notifier.notify("READY=1", f"STATUS={self.status_line()}")
        return True

    async def _reload_cluster(self, config: Config) -> None:
        """Follow Redis to a new address at once: the old one may be gone for good, and
        without it the gateway is cut off from the region until restarted."""
        cluster, new = self.cluster, config.cluster
        if cluster is None or new is None:
            return  # adding or removing [cluster] needs a restart (`_warn_...` says so)
        try:
            target = RedisTarget.from_config(new)
        except ValueError as exc:  # the password file went since the config was checked
            log.error("cluster_redis_password_unreadable", error=str(exc))
            return
        if target != cluster.store.target:
            log.info("cluster_redis_changed")  # the URL may hold a password: not logged
            await cluster.store.retarget(target)

    async def _shutdown(
        self, accepting: asyncio.Task[None], node_task: asyncio.Task[None] | None
    ) -> None:
        self.draining = True
        log.info("gateway_draining", sessions=len(self.sessions))
        accepting.cancel()  # stop accepting; the listening socket closes with it
        grace = self.config.gateway.drain_seconds
        notice = control.encode_notice("shutting_down", closes_in=grace)
        # Our own clients are told, whether attached here or relayed from here to an owner
        # elsewhere. A session another gateway relays here is not: it moves with its console
        # when this gateway hands the VM over, and its client stays connected.
        for session in list(self.sessions.values()):
            if not session.relayed:
                session.send_text(notice)
        for conn in list(self.connections):
            conn.notify(notice)
        if node_task is not None and self.cluster is not None:
            # A deploy must not take the consoles away for the drain: they move to the other
            # gateways now, and our clients follow them, relayed from here until they leave.
            self.cluster.node.leave_soon()
        # Clients may leave on their own during the grace period; then the rest are closed.
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(grace):
                await self._until(
                    lambda: (
                        all(s.relayed for s in self.sessions.values())
                        and not any(conn.relaying for conn in self.connections)
                    )
                )
        for session in list(self.sessions.values()):
            session.on_move = None  # closed now, not moved
            if session.relayed:
                session.hand_off("gateway shutting down")
            else:
                session.close(control.CLOSE_GOING_AWAY, "gateway shutting down")
        for conn in list(self.connections):
            conn.going_away("gateway shutting down")
        if node_task is not None and self.cluster is not None:
            # Leaving releases our leases (the other gateways claim them at once), and before
            # the closing handshakes below: the sessions handed off above wait for a new owner
            # for 3 x lease_ttl + 2 s only, and a client that never answers its 1001 holds
            # those handshakes for the session's CLOSE_TIMEOUT.
            self.cluster.node.stop()
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(SHUTDOWN_CLOSE_TIMEOUT):
                    await asyncio.shield(node_task)
            node_task.cancel()
            await asyncio.gather(node_task, return_exceptions=True)
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(SHUTDOWN_CLOSE_TIMEOUT):
                await self._until(lambda: not self.connections)
        for conn in list(self.connections):
            if conn.transport is not None:
                reset_connection(conn.transport)

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
                self.access.prune(time.monotonic())

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
