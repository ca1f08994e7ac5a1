"""The health listener: plain HTTP on a separate (usually loopback) port.

`/healthz` answers whenever the loop does; `/readyz` is 200 only when the
listeners are bound, a certificate is loaded and unexpired, and the gateway
is not draining; `/metrics` is Prometheus text, collected on scrape from the
live state (no counters duplicated in a second place).
"""

from __future__ import annotations

import asyncio
import datetime
from collections import Counter
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from typing import Protocol, cast

import h11
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.metrics_core import Metric
from prometheus_client.registry import Collector

from . import native
from .http import HttpResponse, encode_response
from .hub import ConsoleHub
from .linger import reset_connection
from .log import get_logger

log = get_logger("relayd.health")

#: How long a health client may take to send its request and read the answer (probes are
#: quick). One still there then is reset (linger.py): a FIN would wait behind its answer.
REQUEST_DEADLINE = 10.0


class SessionView(Protocol):
    """What metrics read of a session."""

    @property
    def role(self) -> str:
        """writer or spectator."""


class HandshakeCounts(Protocol):
    """What metrics read of the TLS listener."""

    @property
    def handshakes(self) -> int:
        """Completed handshakes."""

    @property
    def handshake_failures(self) -> Counter[str]:
        """Failed handshakes by reason."""


@dataclass(frozen=True)
class ClusterHealth:
    """A cluster member's state, for /healthz and /metrics."""

    redis_up: bool
    owned_vms: int
    forwarded_sessions: int
    round_seconds: float  # the last ownership round's round trip to Redis
    redis_errors: Mapping[str, int]  # failed calls, by kind
    appended_bytes: int
    fenced_appends: int
    owner_changes: int
    news_rounds: int = 0  # ownership rounds run early on another gateway's claim or release
    deposed_by_peers: int = 0  # ports let go while cut off from Redis, on a peer's reading
    unstored_bytes: int = 0  # console output given up on when leaving: Redis never took it
    dropped_bytes: int = 0  # console output let go of while Redis was away (buffer full)
    peer_link_failures: Mapping[str, int] = field(default_factory=dict)  # by peer gateway


class HealthSource(Protocol):
    """What the health listener needs of the gateway."""

    @property
    def sessions(self) -> Mapping[str, SessionView]:
        """Open console sessions."""

    @property
    def hubs(self) -> Mapping[str, ConsoleHub]:
        """The consoles this gateway runs."""

    @property
    def auth_failures(self) -> Counter[str]:
        """Rejected credentials by reason."""

    @property
    def listener(self) -> HandshakeCounts | None:
        """The TLS listener, once bound."""

    @property
    def cert_not_after(self) -> datetime.datetime:
        """The server certificate's expiry."""

    @property
    def crl_next_update(self) -> datetime.datetime | None:
        """When the first CRL of `[tls] crl` expires (None: no CRL, or none says)."""

    @property
    def draining(self) -> bool:
        """True while shutting down."""

    def unready_reasons(self) -> list[str]:
        """Why /readyz is not 200 (empty when ready)."""

    def cluster_health(self) -> ClusterHealth | None:
        """The cluster member's state; None for a single gateway."""


class GatewayCollector(Collector):
    """Reads the gateway's counters at scrape time."""

    def __init__(self, gateway: HealthSource) -> None:
        self.gateway = gateway

    def collect(self) -> Iterator[Metric]:
        """One family per contract metric."""
        gw = self.gateway
        by_role = GaugeMetricFamily("relayd_sessions", "Open console sessions", labels=["role"])
        counts = {"writer": 0, "spectator": 0}
        for session in gw.sessions.values():
            counts[session.role] = counts.get(session.role, 0) + 1
        for role, n in counts.items():
            by_role.add_metric([role], n)
        yield by_role
        yield from self._per_vm()
        failures = CounterMetricFamily(
            "relayd_auth_failures", "Rejected credentials", labels=["reason"]
        )
        for reason, n in sorted(gw.auth_failures.items()):
            failures.add_metric([reason], n)
        yield failures
        listener = gw.listener
        handshakes = CounterMetricFamily("relayd_tls_handshakes", "Completed TLS handshakes")
        handshakes.add_metric([], listener.handshakes if listener else 0)
        yield handshakes
        tls_failures = CounterMetricFamily(
            "relayd_tls_handshake_failures",
            "Failed TLS handshakes (and PROXY headers) by reason",
            labels=["reason"],
        )
        if listener is not None:
            for reason, n in sorted(listener.handshake_failures.items()):
                tls_failures.add_metric([reason], n)
        yield tls_failures
        expiry = GaugeMetricFamily(
            "relayd_certificate_expiry_timestamp_seconds", "Server certificate notAfter"
        )
        expiry.add_metric([], gw.cert_not_after.timestamp())
        yield expiry
        crl_next_update = gw.crl_next_update
        if crl_next_update is not None:
            crl = GaugeMetricFamily(
                "relayd_crl_next_update_timestamp_seconds",
                "nextUpdate of the first CRL in [tls] crl to expire",
            )
            crl.add_metric([], crl_next_update.timestamp())
            yield crl
        draining = GaugeMetricFamily("relayd_draining", "1 while shutting down")
        draining.add_metric([], 1 if gw.draining else 0)
        yield draining
        modules = GaugeMetricFamily(
            "relayd_native_module",
            "Keystroke-path modules by state (stale: an outdated build, run from source)",
            labels=["module", "state"],
        )
        for module, state in native.module_states().items():
            modules.add_metric([module, state], 1)
        yield modules
        cluster = gw.cluster_health()
        if cluster is not None:
            yield from _cluster_metrics(cluster)

    def _per_vm(self) -> Iterator[Metric]:
        port_up = GaugeMetricFamily("relayd_port_up", "Serial port connected", labels=["vm"])
        counters = {
            "bytes_from_port": ("relayd_console_output_bytes", "Bytes read from the serial port"),
            "bytes_to_port": ("relayd_console_input_bytes", "Bytes written (paced) to the port"),
            "takeovers": ("relayd_takeovers", "Writer takeovers"),
            "reconnects": ("relayd_port_reconnects", "Serial port reconnects"),
            "output_gaps": ("relayd_output_gaps", "Clients that skipped ahead"),
            "skipped_bytes": ("relayd_output_skipped_bytes", "Bytes clients skipped"),
            "pastes_refused": ("relayd_pastes_refused", "Inputs over max_paste_bytes"),
            "idle_closes": ("relayd_idle_closes", "Sessions closed for idleness"),
            "port_errors": ("relayd_port_errors", "Failed opens and lost serial links"),
            "log_errors": ("relayd_console_log_errors", "Console log writes that failed"),
        }
        families = {
            attr: CounterMetricFamily(name, doc, labels=["vm"])
            for attr, (name, doc) in counters.items()
        }
        for vm_id, hub in self.gateway.hubs.items():
            port_up.add_metric([vm_id], 1 if hub.port_up else 0)
            for attr, family in families.items():
                family.add_metric([vm_id], getattr(hub.stats, attr))
        yield port_up
        yield from families.values()


class HealthConnection(asyncio.Protocol):
    """One HTTP/1.1 exchange on the health port."""

    def __init__(self, gateway: HealthSource, registry: CollectorRegistry) -> None:
        self.gateway = gateway
        self.registry = registry
        self.transport: asyncio.Transport | None = None
        self._h11 = h11.Connection(h11.SERVER, max_incomplete_event_size=8192)
        self._timer: asyncio.TimerHandle | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        """Probes are quick; slow ones are reset at `REQUEST_DEADLINE`."""
        # uvloop's transports are not asyncio.Transport subclasses, only alike.
        self.transport = cast(asyncio.Transport, transport)
        self._timer = asyncio.get_running_loop().call_later(
            REQUEST_DEADLINE, reset_connection, self.transport
        )

    def connection_lost(self, exc: Exception | None) -> None:
        """Stop the deadline."""
        if self._timer is not None:
            self._timer.cancel()

    def data_received(self, data: bytes) -> None:
        """Parse until a whole request is in, answer it, close."""
        assert self.transport is not None
        self._h11.receive_data(data)
        while True:
            try:
                event = self._h11.next_event()
            except h11.RemoteProtocolError:
                self.transport.close()
                return
            if event is h11.NEED_DATA:
                return
            if isinstance(event, h11.Request):
                path = event.target.decode("ascii", "replace").split("?")[0]
                self._answer(event.method, path)
                return
            if isinstance(event, h11.ConnectionClosed):
                self.transport.close()
                return

    def _answer(self, method: bytes, path: str) -> None:
        """GET, or HEAD (load balancers probe with either); anything else is 405."""
        assert self.transport is not None
        if method not in (b"GET", b"HEAD"):
            response = HttpResponse.json(
                405,
                {"error": "method_not_allowed", "message": "use GET or HEAD"},
                Allow="GET, HEAD",
            )
        elif path == "/healthz":
            response = HttpResponse.json(200, _liveness(self.gateway.cluster_health()))
        elif path == "/readyz":
            reasons = self.gateway.unready_reasons()
            response = HttpResponse.json(
                503 if reasons else 200, {"ready": not reasons, "reasons": reasons}
            )
        elif path == "/metrics":
            response = HttpResponse(
                200, generate_latest(self.registry), "text/plain; version=0.0.4; charset=utf-8"
            )
        else:
            response = HttpResponse.json(404, {"error": "not_found", "message": "no such path"})
        response.headers.append(("Connection", "close"))
        self.transport.write(encode_response(self._h11, response, head_only=method == b"HEAD"))
        self.transport.close()


def _liveness(cluster: ClusterHealth | None) -> dict[str, object]:
    """/healthz: the loop answers. A cluster member also says whether Redis does: still 200,
    since every gateway shares an outage and restarting them all would end every session."""
    if cluster is None:
        return {"status": "ok"}
    return {"status": "ok" if cluster.redis_up else "degraded", "redis": _up(cluster.redis_up)}


def _up(flag: bool) -> str:
    return "up" if flag else "down"


def _cluster_metrics(cluster: ClusterHealth) -> Iterator[Metric]:
    gauges = (
        ("relayd_cluster_redis_up", "1 while this gateway's last Redis call succeeded",
         float(cluster.redis_up)),
        ("relayd_cluster_owned_vms", "VMs whose serial port this gateway owns", cluster.owned_vms),
        ("relayd_cluster_forwarded_sessions", "Client sessions relayed to another gateway",
         cluster.forwarded_sessions),
        ("relayd_cluster_lease_round_seconds", "Round trip of the last ownership round",
         cluster.round_seconds),
    )  # fmt: skip
    for name, doc, value in gauges:
        family = GaugeMetricFamily(name, doc)
        family.add_metric([], value)
        yield family
    counters = (
        ("relayd_cluster_log_appended_bytes", "Console output stored in the shared log",
         cluster.appended_bytes),
        ("relayd_cluster_fenced_appends", "Appends refused: this gateway no longer owned the VM",
         cluster.fenced_appends),
        ("relayd_cluster_vms_claimed", "VMs this gateway took ownership of", cluster.owner_changes),
        ("relayd_cluster_news_rounds",
         "Ownership rounds run at once on another gateway's claim or release", cluster.news_rounds),
        ("relayd_cluster_deposed_by_peers",
         "Ports let go while cut off from Redis, another gateway having claimed the VM",
         cluster.deposed_by_peers),
        ("relayd_cluster_log_unstored_bytes",
         "Console output given up on when leaving the region: Redis never took it",
         cluster.unstored_bytes),
        ("relayd_cluster_log_dropped_bytes",
         "Console output let go of while Redis was away, past console_log_bytes per VM",
         cluster.dropped_bytes),
    )  # fmt: skip
    for name, doc, total in counters:
        counter = CounterMetricFamily(name, doc)
        counter.add_metric([], total)
        yield counter
    errors = CounterMetricFamily(
        "relayd_cluster_redis_errors", "Redis calls that failed, by kind", labels=["call"]
    )
    for call, n in sorted(cluster.redis_errors.items()):
        errors.add_metric([call], n)
    yield errors
    links = CounterMetricFamily(
        "relayd_cluster_peer_link_failures",
        "Peer links to another gateway that could not be opened, by that gateway",
        labels=["peer"],
    )
    for peer, n in sorted(cluster.peer_link_failures.items()):
        links.add_metric([peer], n)
    yield links


def make_registry(gateway: HealthSource) -> CollectorRegistry:
    """A registry holding only relayd's own collector (no process globals)."""
    registry = CollectorRegistry(auto_describe=False)
    registry.register(GatewayCollector(gateway))
    return registry
