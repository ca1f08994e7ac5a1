"""The routes of the TLS listener, and the admission of a console upgrade.

Handlers are synchronous functions of (owner, request) that return an
`HttpResponse` or raise a `PeerError`; the connection turns either into
bytes. Routing is a short table, so the whole surface is readable here.
`open_console` is every check a WebSocket upgrade passes before the 101
(mode, credentials, role, origin, resume offset, takeover policy, caps); the
connection then only performs the handshake. What the routes need of the
gateway is the `ApiOwner` protocol: this module never imports app.py.
"""

from __future__ import annotations

import dataclasses
import json
import math
import re
import secrets
import ssl
import time
from collections.abc import Awaitable, Callable, Mapping, Sequence
from typing import Any, Protocol

from . import webui
from .access import AccessPolicy
from .audit import audit
from .auth import Principal
from .cluster import peerview
from .cluster.forwarding import (
    MAX_OFFSET,
    ForwardedSession,
    Mode,
    SessionClocks,
    encode_forwarded_request,
    has_forwarded_headers,
    parse_forwarded_headers,
)
from .cluster.relay import Reattach
from .config import Role, VmConfig, scale_set_scopes, vm_scopes
from .connection import ConsoleGrant, ForwardGrant, MoveHere, console_vm
from .errors import (
    ConflictError,
    ForbiddenError,
    MethodNotAllowedError,
    NotFoundError,
    OwnerUnavailableError,
    PeerError,
    RelaydError,
    SharedStateError,
)
from .http import HttpResponse, Request
from .hub import ConsoleHub
from .lease import Denied
from .rbac import at_least
from .switches import Level, scale_set_key

MAX_LOG_RESPONSE = 16 * 2**20  # one response; page with ?from= for more

_CONSOLE_LOG = re.compile(r"^/v1/vms/([A-Za-z0-9][A-Za-z0-9._-]{0,127})/console-log$")
_TICKETS = re.compile(r"^/v1/vms/([A-Za-z0-9][A-Za-z0-9._-]{0,127})/console/tickets$")
_SWITCH_VM = re.compile(r"^/v1/vms/([^/]{1,128})/serial-console$")
_SWITCH_SUB = re.compile(r"^/v1/subscriptions/([^/]{1,128})/serial-console$")
_SWITCH_SS = re.compile(
    r"^/v1/subscriptions/([^/]{1,128})/resourceGroups/([^/]{1,128})"
    r"/virtualMachineScaleSets/([^/]{1,128})/serial-console$"
)


class SharedLog(Protocol):
    """The region's console log (cluster: a Redis stream per VM)."""

    async def read(self, vm: str, from_offset: int, max_bytes: int) -> LogSliceLike:
        """Contiguous output from `from_offset` (or the first held byte after it)."""

    async def bounds(self, vm: str) -> tuple[int, int]:
        """The log's (start, end) offsets."""


class LogSliceLike(Protocol):
    """A read of the shared log."""

    @property
    def start(self) -> int:
        """Oldest offset held."""

    @property
    def end(self) -> int:
        """Offset after the newest byte."""

    @property
    def offset(self) -> int:
        """Where `data` starts."""

    @property
    def data(self) -> bytes:
        """The bytes."""


class ClusterView(Protocol):
    """What the routes need of the cluster node."""

    @property
    def gateway_id(self) -> str:
        """This gateway."""

    @property
    def log(self) -> SharedLog:
        """The shared console log."""

    @property
    def peer_ssl(self) -> ssl.SSLContext:
        """The client context for peer links."""

    @property
    def forward_timeout(self) -> float:
        """Deadline to reach an owner and get its answer."""

    def owner_of(self, vm_id: str) -> tuple[str, str] | None:
        """(gateway id, advertise host:port) of the VM's owner."""

    def fence_of(self, vm_id: str) -> int | None:
        """The fencing token of the owner's lease on the VM (None: unknown)."""

    async def next_round(self) -> None:
        """Wait until the next ownership round has run."""

    def link_failed(self, gateway: str) -> None:
        """A peer link to `gateway` could not be opened (counted for /metrics)."""

    @property
    def keepalive_interval(self) -> float:
        """The region's keepalive interval (owners drop a client that misses a pong)."""

    @property
    def reattach_wait(self) -> float:
        """How long a relay waits for a new owner when the owner dies."""

    @property
    def lease_ttl(self) -> float:
        """The region's ownership lease period."""

    def view_for_peer(self, vms: Sequence[str]) -> dict[str, object]:
        """What this gateway's last round read from Redis about `vms` (cluster/peerview.py)."""


class ApiOwner(Protocol):
    """What the routes need of the gateway."""

    @property
    def access(self) -> AccessPolicy:
        """The access policy in force."""

    @property
    def hubs(self) -> Mapping[str, ConsoleHub]:
        """The consoles this gateway runs, by VM id."""

    @property
    def region(self) -> str:
        """For audit events."""

    @property
    def cluster(self) -> ClusterView | None:
        """The region's shared state and VM owners; None for a single gateway."""

    def session_counts(self, principal: Principal, session_id: str) -> tuple[int, int]:
        """Client sessions the gateway holds, and this principal's, but `session_id`."""

    async def set_console(self, level: Level, key: str, enabled: bool, *, by: str) -> int:
        """Switch consoles at one level; the number of sessions closed."""


def _json(status: int, obj: object, **headers: str) -> HttpResponse:
    return HttpResponse.json(status, obj, **headers)


async def index(gw: ApiOwner, request: Request) -> HttpResponse:
    """The web terminal page (or, when its assets are not built, how to build them)."""
    response = webui.static_response("/", if_none_match=request.headers.get("if-none-match"))
    assert response is not None  # "/" always has an answer
    return response


async def list_vms(gw: ApiOwner, request: Request) -> HttpResponse:
    """The VMs the caller holds any role on, with their live state.

    In a cluster, a VM whose port another gateway holds shows `"port": "remote"`
    and the `owner`; its writer and session counts are that gateway's to know.
    """
    principal = gw.access.authenticate(request)
    vms = []
    for vm in gw.access.vms.values():
        role = gw.access.effective_role(principal, vm)
        if role is None:
            continue
        entry: dict[str, object] = {
            "id": vm.id,
            "subscription": vm.subscription,
            "resource_group": vm.resource_group,
            "scale_set": vm.scale_set,
            "enabled": gw.access.console_enabled(vm),
            "role": role,
            "takeover": vm.takeover,
        }
        hub = gw.hubs.get(vm.id)
        if hub is not None:
            entry |= {
                "port": "up" if hub.port_up else "down",
                "writer_attached": hub.lease.holder is not None,
                "sessions": len(hub.clients),
                "can_break": hub.can_break,
            }
        else:
            owner = gw.cluster.owner_of(vm.id) if gw.cluster is not None else None
            entry |= {
                "port": "remote" if owner is not None else "down",
                "owner": owner[0] if owner is not None else None,
                "can_break": bool(vm.break_command) or vm.serial.kind in ("tty", "telnet"),
            }
        vms.append(entry)
    _audit_access(gw, request, "vms_listed", principal, count=len(vms))
    return _json(200, {"vms": vms})


def _audit_access(
    gw: ApiOwner, request: Request, event: str, principal: Principal, **fields: object
) -> None:
    """An audit event for a served request: who, from where (never a credential)."""
    audit(event, principal=principal.id, peer=request.peer, region=gw.region, **fields)


async def console_log(gw: ApiOwner, request: Request, vm_id: str) -> HttpResponse:
    """The held console output, by absolute offsets (readers and up)."""
    principal = gw.access.authenticate(request)
    vm, _ = gw.access.authorize(principal, vm_id, request)
    if gw.cluster is not None:
        held = await _shared_console_log(gw.cluster.log, request, vm.id)
        _audit_access(
            gw,
            request,
            "console_log_read",
            principal,
            vm=vm.id,
            offset=held.offset,
            bytes=len(held.data),
        )
        return HttpResponse(
            200,
            held.data,
            "application/octet-stream",
            [
                ("Relayd-Log-Start", str(held.start)),
                ("Relayd-Log-End", str(held.end)),
                ("Relayd-Data-Offset", str(held.offset)),
            ],
        )
    hub = gw.hubs[vm.id]
    try:
        start = int(request.query.get("from", hub.start))
        max_bytes = int(request.query.get("max_bytes", MAX_LOG_RESPONSE))
    except ValueError:
        raise PeerError("from and max_bytes must be integers", code="bad_request") from None
    if start < 0 or max_bytes < 0:
        raise PeerError("from and max_bytes must not be negative", code="bad_request")
    first = hub.next_held(min(max(start, hub.start), hub.end))  # past a hole a crash left
    parts: list[bytes] = []
    want = min(max_bytes, MAX_LOG_RESPONSE)
    got = 0
    while got < want and first + got < hub.end:
        chunk = hub.read(first + got, want - got)
        if not chunk:
            break
        parts.append(chunk)
        got += len(chunk)
    _audit_access(gw, request, "console_log_read", principal, vm=vm.id, offset=first, bytes=got)
    return HttpResponse(
        200,
        b"".join(parts),
        "application/octet-stream",
        [
            ("Relayd-Log-Start", str(hub.start)),
            ("Relayd-Log-End", str(hub.end)),
            ("Relayd-Data-Offset", str(first)),
        ],
    )


async def _shared_console_log(log: SharedLog, request: Request, vm_id: str) -> LogSliceLike:
    """What `console_log` answers from the region's shared log: the same on every gateway."""
    try:
        start = int(request.query.get("from", 0))
        max_bytes = int(request.query.get("max_bytes", MAX_LOG_RESPONSE))
    except ValueError:
        raise PeerError("from and max_bytes must be integers", code="bad_request") from None
    if start < 0 or max_bytes < 0:
        raise PeerError("from and max_bytes must not be negative", code="bad_request")
    try:
        return await log.read(vm_id, start, min(max_bytes, MAX_LOG_RESPONSE))
    except RelaydError as exc:
        raise SharedStateError(f"console log not read: {exc}") from None


async def issue_ticket(gw: ApiOwner, request: Request, vm_id: str) -> HttpResponse:
    """A one-time ticket for a browser's WebSocket (readers and up; mode as requested)."""
    principal = gw.access.authenticate(request)
    gw.access.authorize(principal, vm_id, request)
    body = _json_body(request, optional=True)
    mode = body.get("mode", "interactive")
    if mode not in ("interactive", "spectate"):
        raise PeerError("mode must be interactive or spectate", code="bad_request")
    ticket = await gw.access.issue_ticket(principal, vm_id, mode)
    expires_in = int(gw.access.tickets.ttl)
    # The ticket is a credential: never in the event.
    _audit_access(
        gw, request, "ticket_issued", principal, vm=vm_id, mode=mode, expires_in=expires_in
    )
    return _json(201, {"ticket": ticket, "expires_in": expires_in, "mode": mode})


def _json_body(request: Request, *, optional: bool = False) -> dict[str, Any]:
    if not request.body.strip():
        if optional:
            return {}
        raise PeerError("a JSON body is required", code="bad_request")
    try:
        body = json.loads(request.body)
    except (ValueError, RecursionError):  # RecursionError: "[[[[..." nested too deep
        raise PeerError("body is not valid JSON", code="bad_request") from None
    if not isinstance(body, dict):
        raise PeerError("body must be a JSON object", code="bad_request")
    return body


def _enabled_from(request: Request) -> bool:
    body = _json_body(request)
    if set(body) != {"enabled"} or not isinstance(body["enabled"], bool):
        raise PeerError('body must be {"enabled": true|false}', code="bad_request")
    return bool(body["enabled"])


async def switch_console(gw: ApiOwner, request: Request, level: Level, key: str) -> HttpResponse:
    """Owner-only enable/disable at one level; persisted; disabling closes sessions (4009)."""
    principal = gw.access.authenticate(request)
    enabled = _enabled_from(request)
    scopes: tuple[str, ...]
    if level == "vms":
        vm = gw.access.vms.get(key)
        if vm is None or gw.access.rbac.role(principal, vm) is None:
            raise NotFoundError(f"unknown vm {key!r}", code="unknown_vm")
        scopes = vm_scopes(vm)
        sub = vm.subscription
    elif level == "subscriptions":
        members = [vm for vm in gw.access.vms.values() if vm.subscription == key]
        # Unknown and invisible read the same, as for VMs: no probing for what exists.
        holds = gw.access.rbac.role_on(principal, (f"/subscriptions/{key}",)) is not None
        if gw.access.config.subscription(key) is None or not (
            holds or _sees_any(gw, principal, members)
        ):
            raise NotFoundError(f"unknown subscription {key!r}", code="not_found")
        scopes = (f"/subscriptions/{key}",)
        sub = key
    else:
        scopes = _scale_set_scopes(gw, principal, key)
        sub = key.split("/")[0]
    gw.access.check_mfa(principal, sub, request, scope=scopes[-1])
    if not at_least(gw.access.rbac.role_on(principal, scopes), "owner"):
        audit(
            "access_denied",
            reason="not_owner",
            principal=principal.id,
            peer=request.peer,
            scope=scopes[-1],
            region=gw.region,
        )
        raise ForbiddenError(
            "enabling or disabling a console needs the owner role", code="forbidden"
        )
    closed = await gw.set_console(level, key, enabled, by=principal.id)
    audit(
        "console_switched",
        principal=principal.id,
        peer=request.peer,
        scope=scopes[-1],
        enabled=enabled,
        sessions_closed=closed,
        region=gw.region,
    )
    return _json(200, {"scope": scopes[-1], "enabled": enabled, "sessions_closed": closed})


def _scale_set_scopes(gw: ApiOwner, principal: Principal, key: str) -> tuple[str, ...]:
    """The scopes of the scale set `sub/rg/name` (its owner check), if the caller sees it.

    A scale set is its subscription, resource group and name together: the same
    name in another resource group is another scale set with other owners.

    Raises:
        NotFoundError: no such scale set, or the caller sees none of its instances.
    """
    sub, rg, name = key.split("/")
    assert key == scale_set_key(sub, rg, name)  # the route's three segments, in this order
    members = [vm for vm in gw.access.vms.values() if vm.scale_set_ref == (sub, rg, name)]
    if not members or not _sees_any(gw, principal, members):
        raise NotFoundError(
            f"unknown scale set {name!r} in resource group {rg!r} of {sub!r}", code="not_found"
        )
    return scale_set_scopes(sub, rg, name)


def _sees_any(gw: ApiOwner, principal: Principal, vms: list[VmConfig]) -> bool:
    """Whether the principal holds any role on any of these VMs (or on a scope above them)."""
    return any(gw.access.rbac.role(principal, vm) is not None for vm in vms)


async def cluster_owners(gw: ApiOwner, request: Request) -> HttpResponse:
    """A gateway cut off from Redis asks who owns its VMs (cluster/peerview.py).

    Raises:
        NotFoundError: not in cluster mode.
        ForbiddenError: the connection is not a gateway's.
        PeerError: (400) the question is malformed.
    """
    if gw.cluster is None:
        raise NotFoundError(f"no route for {request.path}", code="not_found")
    if request.peer_gateway is None:
        raise ForbiddenError("only the region's gateways may ask this", code="forbidden")
    try:
        vms = peerview.parse_question(request.body)
    except ValueError as exc:
        raise PeerError(str(exc), code="bad_request") from None
    return _json(200, gw.cluster.view_for_peer(vms))


Handler = Callable[[ApiOwner, Request], Awaitable[HttpResponse]]
_ROUTES: dict[str, Handler] = {"/": index, "/v1/vms": list_vms}


async def handle(gw: ApiOwner, request: Request) -> HttpResponse:
    """Route a request.

    Raises:
        PeerError: 404 for unknown paths, 405 for a wrong method, or the handler's error.
    """
    handler = _ROUTES.get(request.path)
    if handler is not None:
        if request.method not in ("GET", "HEAD"):
            raise MethodNotAllowedError(request.method, allow="GET, HEAD")
        return await handler(gw, request)
    if request.path == peerview.PATH:
        if request.method != "POST":
            raise MethodNotAllowedError(request.method, allow="POST")
        return await cluster_owners(gw, request)
    m = _CONSOLE_LOG.match(request.path)
    if m is not None:
        if request.method not in ("GET", "HEAD"):
            raise MethodNotAllowedError(request.method, allow="GET, HEAD")
        return await console_log(gw, request, m.group(1))
    m = _TICKETS.match(request.path)
    if m is not None:
        if request.method != "POST":
            raise MethodNotAllowedError(request.method, allow="POST")
        return await issue_ticket(gw, request, m.group(1))
    switches: tuple[tuple[re.Pattern[str], Level], ...] = (
        (_SWITCH_VM, "vms"),
        (_SWITCH_SUB, "subscriptions"),
        (_SWITCH_SS, "scale_sets"),
    )
    for pattern, level in switches:
        m = pattern.match(request.path)
        if m is not None:
            if request.method != "PUT":
                raise MethodNotAllowedError(request.method, allow="PUT")
            return await switch_console(gw, request, level, "/".join(m.groups()))
    if console_vm(request.path) is not None:
        raise MethodNotAllowedError(request.method, allow="GET")
    if request.path.startswith(webui.ASSETS_PREFIX):
        if request.method not in ("GET", "HEAD"):
            raise MethodNotAllowedError(request.method, allow="GET, HEAD")
        asset = webui.static_response(
            request.path, if_none_match=request.headers.get("if-none-match")
        )
        if asset is not None:
            return asset
    raise NotFoundError(f"no route for {request.path[:100]}", code="not_found")


async def open_console(gw: ApiOwner, request: Request) -> ConsoleGrant | ForwardGrant:
    """Every check of a console upgrade, in the order a client can act on.

    In a cluster, a session for a VM that another gateway owns is admitted
    here (credentials, role, origin, this gateway's caps) and relayed to the
    owner, which applies the takeover policy and its own caps; a forwarded
    request from a gateway is taken at its word for who the client is, and
    authorized again.

    Raises:
        PeerError: bad mode or offset (400), credentials (401), role, origin or
            switch (403), unknown VM (404), takeover policy `deny` (409), caps (429),
            owner unreachable (503).
    """
    vm_id = console_vm(request.path)
    assert vm_id is not None  # the connection routes only console paths here
    access = gw.access
    if has_forwarded_headers(request.headers):
        return _admit_forwarded(gw, request, vm_id)
    mode = request.query.get("mode", "interactive")
    if mode not in ("interactive", "spectate"):
        raise PeerError("mode must be interactive or spectate", code="bad_request")
    if "ticket" in request.query:
        ticket = await access.redeem_ticket(request, vm_id)
        principal = ticket.principal
        if "mode" in request.query and mode != ticket.mode:
            raise PeerError("mode differs from the ticket's", code="bad_request")
        mode = ticket.mode
    else:
        principal = access.authenticate(request)
    vm, role = access.authorize(principal, vm_id, request)
    access.check_origin(request)
    resume_from: int | None = None
    if "from" in request.query:
        try:
            resume_from = int(request.query["from"])
        except ValueError:
            raise PeerError("from must be a byte offset", code="bad_request") from None
        if resume_from < 0:
            raise PeerError("from must be a byte offset", code="bad_request")
        # Past the end is the end: capped where offsets end, so a forwarded session can
        # carry it (an int of any length would be refused there, and 500 here).
        resume_from = min(resume_from, MAX_OFFSET)
    session_id = secrets.token_hex(8)
    # What another gateway needs to serve this session: the owner, or the next one.
    fwd = ForwardedSession(
        principal=principal.id,
        role=role,
        mode=mode,  # type: ignore[arg-type]  # checked above
        client_peer=request.peer,
        session_id=session_id,
        groups=principal.groups,
        amr=principal.amr,
        resume_from=resume_from,
        # Rounded up: the owner never ends a session before its credentials do. Capped
        # where the header's 19 digits end (billions of years away): a valid token's exp
        # may be larger, and the owner would refuse the forwarded upgrade.
        expires=None
        if principal.expires is None
        else min(math.ceil(principal.expires), MAX_OFFSET),
    )
    hub = gw.hubs.get(vm.id)
    if hub is None:
        # A relayed client is this gateway's session too: its caps count it.
        access.check_session_limits(principal, *gw.session_counts(principal, session_id))
        return _forward_grant(gw, request, vm.id, fwd)
    want_writer = mode == "interactive" and at_least(role, "contributor")
    grant = _admit_local(gw, request, hub, principal, role, session_id, want_writer, resume_from)
    if gw.cluster is None:
        return grant
    # Should the VM move away from this gateway, the session moves with it.
    return dataclasses.replace(
        grant,
        reattach=_reattach(gw.cluster, request, vm.id, fwd, gw.cluster.gateway_id),
        here=_move_here(gw, request, vm.id, fwd),
    )


def _admit_local(
    gw: ApiOwner,
    request: Request,
    hub: ConsoleHub,
    principal: Principal,
    role: Role,
    session_id: str,
    want_writer: bool,
    resume_from: int | None,
) -> ConsoleGrant:
    """The checks only the hub's own gateway can make: takeover policy and caps."""
    if want_writer and isinstance(hub.check_writer(session_id), Denied):
        audit(
            "takeover_denied",
            region=gw.region,
            principal=principal.id,
            peer=request.peer,
            vm=hub.vm.id,
        )
        raise ConflictError(
            f"vm {hub.vm.id!r} has a writer and its takeover policy is deny; "
            "connect with mode=spectate",
            code="writer_exists",
        )
    # Not this session itself: a relayed one that moves here, or comes back over a
    # loopback link, is already counted.
    gw.access.check_session_limits(principal, *gw.session_counts(principal, session_id))
    return ConsoleGrant(hub, principal, role, session_id, want_writer, resume_from, request.peer)


def _forward_grant(
    gw: ApiOwner, request: Request, vm_id: str, fwd: ForwardedSession
) -> ForwardGrant:
    """Where to relay a session whose VM another gateway owns."""
    cluster = gw.cluster
    owner = cluster.owner_of(vm_id) if cluster is not None else None
    if cluster is None or owner is None or owner[0] == cluster.gateway_id:
        if cluster is None:
            raise NotFoundError(f"unknown vm {vm_id!r}", code="unknown_vm")
        raise OwnerUnavailableError(
            f"no gateway holds the console of {vm_id} right now (failover); try again"
        )
    host, _, port = owner[1].rpartition(":")
    head = encode_forwarded_request(request.path, _header_lines(request), fwd)
    reattach = _reattach(cluster, request, vm_id, fwd, owner[0])
    return ForwardGrant(
        host.strip("[]"),
        int(port),
        head,
        cluster.peer_ssl,
        cluster.forward_timeout,
        reattach,
        here=_move_here(gw, request, vm_id, fwd),
        session=(fwd.session_id, fwd.principal),
    )


def _header_lines(request: Request) -> list[tuple[str, str]]:
    """The client's header lines for a forwarded upgrade: each one, a repeated one too."""
    return list(request.header_lines or request.headers.items())


def _move_here(gw: ApiOwner, request: Request, vm_id: str, fwd: ForwardedSession) -> MoveHere:
    """How a session relayed elsewhere is admitted here when its console comes here.

    The checks are the ones its owner would make (`_admit_forwarded`): access as of
    now, the takeover policy, the caps; it keeps its id, principal and client address.
    """
    principal = Principal(fwd.principal, fwd.groups, fwd.amr, expires=fwd.expires)

    def here(offset: int, writer: bool, clocks: SessionClocks) -> ConsoleGrant:
        cluster = gw.cluster
        vm, role = gw.access.authorize(principal, vm_id, request)
        hub = gw.hubs.get(vm.id)
        if hub is None or cluster is None:
            raise OwnerUnavailableError(f"this gateway does not hold the console of {vm_id}")
        want_writer = writer and at_least(role, "contributor")
        grant = _admit_local(gw, request, hub, principal, role, fwd.session_id, want_writer, offset)
        reattach = _reattach(cluster, request, vm_id, fwd, cluster.gateway_id)
        return dataclasses.replace(grant, reattach=reattach, here=here, clocks=clocks)

    return here


def _reattach(
    cluster: ClusterView, request: Request, vm_id: str, fwd: ForwardedSession, owner: str
) -> Reattach:
    """How a session served by `owner` follows its console to the VM's next owner."""
    path, headers = request.path, _header_lines(request)

    def resuming(offset: int, writer: bool, clocks: SessionClocks) -> bytes:
        """The same session (id, principal, role, clocks), resuming at `offset`, for a new owner.

        It asks to write only if it was the writer when it moved: a session demoted
        or evicted on the old owner never takes the console back by moving. Its clocks
        go as elapsed times, measured now (forwarding.py says why).
        """
        mode: Mode = "interactive" if writer else "spectate"
        now = time.monotonic()
        age_ms, idle_ms = clocks.elapsed_ms(now)
        moved = dataclasses.replace(
            fwd,
            resume_from=offset,
            mode=mode,
            age_ms=age_ms,
            idle_ms=idle_ms,
            warned_ms=clocks.warned_ms(now),
        )
        return encode_forwarded_request(path, headers, moved)

    named = cluster.owner_of(vm_id)
    return Reattach(
        vm=vm_id,
        owner=owner,
        fence=cluster.fence_of(vm_id) if named is not None and named[0] == owner else None,
        owners=cluster,
        request=resuming,
        ssl_context=cluster.peer_ssl,
        timeout=cluster.forward_timeout,
        wait=cluster.reattach_wait,
        lease_ttl=cluster.lease_ttl,
        keepalive=cluster.keepalive_interval,
        me=cluster.gateway_id,
    )


def _admit_forwarded(gw: ApiOwner, request: Request, vm_id: str) -> ConsoleGrant:
    """A session another gateway admitted and relays here, the VM's owner.

    Raises:
        ForbiddenError: the connection is not a gateway's (a client sent the headers), or
            the client it relays is outside `allow_clients`.
        OwnerUnavailableError: this gateway does not own the VM (any more): no second hop.
    """
    if request.peer_gateway is None:
        raise ForbiddenError("forwarded sessions come only from gateways", code="forbidden")
    fwd = parse_forwarded_headers(_header_lines(request))  # a repeated one is refused
    gw.access.check_client(fwd.client_peer)  # the client's address, never the gateway's
    principal = Principal(fwd.principal, fwd.groups, fwd.amr, expires=fwd.expires)
    client = dataclasses.replace(request, peer=fwd.client_peer)
    vm, role = gw.access.authorize(principal, vm_id, client)
    hub = gw.hubs.get(vm.id)
    if hub is None:
        raise OwnerUnavailableError(f"this gateway does not hold the console of {vm_id}")
    want_writer = fwd.mode == "interactive" and at_least(role, "contributor")
    grant = _admit_local(
        gw, client, hub, principal, role, fwd.session_id, want_writer, fwd.resume_from
    )
    clocks = None
    if fwd.age_ms is not None:  # a session that moves here: it keeps its clocks
        idle_ms = fwd.age_ms if fwd.idle_ms is None else fwd.idle_ms
        clocks = SessionClocks.from_elapsed_ms(time.monotonic(), fwd.age_ms, idle_ms, fwd.warned_ms)
    return dataclasses.replace(grant, relayed=True, clocks=clocks)
