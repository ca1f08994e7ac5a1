"""Who may do what: the access policy every request passes before it is served.

Authentication (bearer token, one-time ticket, client certificate), the
failed-login and new-connection rate limits, the client address allow-list,
RBAC on the VM's scopes, the console switches, MFA, the browser `Origin`
check and the session caps live here, in one place, so the HTTP layer only
asks and the gateway (app.py) is only the life cycle. Every refusal is a
`PeerError` that carries its status and close code, and every denial of a
known principal is an audit event.

The policy holds no sockets and no hubs: it decides on configuration (`VmConfig`)
and on counts the caller passes in, so it serves a VM whether its hub runs in
this process or, in a cluster, on another gateway.
"""

from __future__ import annotations

import ipaddress
import json
import math
import secrets
import time
from collections import Counter
from typing import Protocol

from .audit import audit
from .auth import Authenticator, Principal
from .config import Config, Role, VmConfig
from .errors import (
    AuthError,
    ForbiddenError,
    NotFoundError,
    PeerError,
    RateLimitedError,
    RelaydError,
    SharedStateError,
)
from .http import Request
from .log import get_logger
from .ratelimit import KeyedLimiter
from .rbac import Rbac
from .switches import ConsoleSwitches, Level, scale_set_key
from .tickets import Ticket, TicketStore

log = get_logger("relayd.access")


class SwitchSource(Protocol):
    """Where switch overrides are read: the state file, or the region's Redis (cluster)."""

    def get(self, level: Level, key: str) -> bool | None:
        """The override at this level, or None when the config's default applies."""


class SharedTickets(Protocol):
    """Tickets every gateway of a region can redeem (cluster: Redis, GETDEL)."""

    async def put_ticket(self, ticket_id: str, payload: str, ttl: float) -> bool:
        """Store a new ticket; False if the id exists."""

    async def take_ticket(self, ticket_id: str) -> str | None:
        """Take a ticket once: its payload, or None when unknown, used or expired."""


class AccessPolicy:
    """Authentication, authorization and admission for one gateway.

    In a cluster, `shared_switches` and `shared_tickets` are the region's
    (Redis); without one, the state file and this process's ticket store.
    """

    shared_switches: SwitchSource | None = None
    shared_tickets: SharedTickets | None = None

    def __init__(self, config: Config, authenticator: Authenticator | None = None) -> None:
        self.switches = ConsoleSwitches(config.gateway.state_dir)
        self.switches.load()
        self.tickets = TicketStore()
        self.auth_failures: Counter[str] = Counter()
        limits = config.limits
        per_minute = limits.auth_failures_per_minute
        self.auth_limiter = KeyedLimiter(per_minute / 60, per_minute) if per_minute else None
        rate = limits.connections_per_second_per_ip
        self.conn_limiter = KeyedLimiter(rate, 2 * rate) if rate else None
        self.reload(config, authenticator or Authenticator(config.auth))

    def reload(self, config: Config, authenticator: Authenticator) -> None:
        """Take a new, validated configuration; rate limits keep their state and settings."""
        self.config = config
        self.region = config.gateway.region
        self.authenticator = authenticator
        self.rbac = Rbac(config.role_assignments)
        self.vms = {vm.id: vm for vm in config.vms}
        self._adopt_legacy_switches(config)

    def _adopt_legacy_switches(self, config: Config) -> None:
        """Scale-set switches of the old form (no resource group) for the configured scale sets."""
        refs = {vm.scale_set_ref for vm in config.vms}
        self.switches.adopt_legacy_scale_sets(ref for ref in refs if ref is not None)

    # -- admission ------------------------------------------------------------------------

    def admit_connection(self, peer: str) -> PeerError | None:
        """Count a new connection; the refusal to answer its first request with, if over rate."""
        if self.conn_limiter is None:
            return None
        now = time.monotonic()
        wait = self.conn_limiter.retry_after(peer, now)
        self.conn_limiter.hit(peer, now)
        if wait > 0:
            return RateLimitedError(
                "too many new connections from this address", code="rate_limited", retry_after=wait
            )
        return None

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

    # -- authentication -------------------------------------------------------------------

    def _auth_failed(self, request: Request, exc: AuthError) -> PeerError:
        """Count and audit a failed credential; what to answer: 401, or 429 over the limit.

        The limit is on failures only and is applied after the credential was checked,
        so many clients behind one address (a NAT, a balancer without PROXY) keep
        getting in with valid credentials while a guesser among them is refused.
        """
        self.auth_failures[exc.code] += 1
        refusal: PeerError = exc
        if self.auth_limiter is not None:
            now = time.monotonic()
            wait = self.auth_limiter.retry_after(request.peer, now)
            self.auth_limiter.hit(request.peer, now)
            if wait > 0:
                refusal = RateLimitedError(
                    "too many failed authentication attempts from this address",
                    code="too_many_auth_failures",
                    retry_after=wait,
                )
        audit(
            "auth_failed",
            reason=exc.code,
            status=refusal.http_status,
            peer=request.peer,
            region=self.region,
        )
        return refusal

    def authenticate(self, request: Request) -> Principal:
        """The request's principal: a bearer token, else a verified client certificate.

        Raises:
            AuthError: no or bad credentials (counted and audited).
            RateLimitedError: bad credentials from an address over its failure limit.
        """
        authorization = request.headers.get("authorization")
        if authorization is None and request.client_cert_cn is not None:
            return Principal(
                f"cert:{request.client_cert_cn}",
                amr=("x509",),
                expires=request.client_cert_not_after,
            )
        try:
            return self.authenticator.authenticate(authorization)
        except AuthError as exc:
            raise self._auth_failed(request, exc) from None

    async def issue_ticket(self, principal: Principal, vm_id: str, mode: str) -> str:
        """A new one-time ticket for this principal, VM and mode.

        Raises:
            RateLimitedError: too many outstanding tickets.
            SharedStateError: the region's ticket store did not answer.
        """
        if self.shared_tickets is None:
            return self.tickets.issue(principal, vm_id, mode, time.monotonic())
        ticket = secrets.token_urlsafe(32)
        payload = json.dumps(
            {
                "principal": principal.id,
                "groups": list(principal.groups),
                "amr": list(principal.amr),
                # A ticket's session ends with the credentials that asked for it
                # (`disconnect_expired`), as the single gateway's in-memory ticket does.
                "expires": principal.expires,
                "vm": vm_id,
                "mode": mode,
            }
        )
        try:
            stored = await self.shared_tickets.put_ticket(ticket, payload, self.tickets.ttl)
        except RelaydError as exc:
            raise SharedStateError(f"ticket not issued: {exc}") from None
        if not stored:  # 256 random bits collided: never in practice
            raise SharedStateError("ticket not issued: try again")
        return ticket

    async def redeem_ticket(self, request: Request, vm_id: str) -> Ticket:
        """Use the request's one-time ticket for this VM (once, on any gateway of a region).

        Raises:
            AuthError: unknown, reused, expired or foreign ticket.
            SharedStateError: the region's ticket store did not answer.
            RateLimitedError: such a ticket from an address over its failure limit.
        """
        try:
            if self.shared_tickets is None:
                return self.tickets.redeem(request.query["ticket"], vm_id, time.monotonic())
            return await self._redeem_shared(request.query["ticket"], vm_id)
        except AuthError as exc:
            raise self._auth_failed(request, exc) from None

    async def _redeem_shared(self, ticket: str, vm_id: str) -> Ticket:
        assert self.shared_tickets is not None
        try:
            raw = await self.shared_tickets.take_ticket(ticket)
        except RelaydError as exc:
            raise SharedStateError(f"ticket not checked: {exc}") from None
        if raw is None:
            raise AuthError("ticket is unknown, already used or expired", code="invalid_ticket")
        try:
            principal, vm, mode = _shared_ticket(raw)
        except ValueError as exc:
            # Not what a gateway writes (`issue_ticket`): someone else wrote the key.
            log.warning("ticket_payload_malformed", vm=vm_id, error=str(exc))
            raise AuthError("ticket is not usable", code="invalid_ticket") from None
        if vm != vm_id:
            raise AuthError("ticket was issued for another vm", code="invalid_ticket")
        return Ticket(principal, vm_id, mode, time.monotonic() + self.tickets.ttl)

    # -- authorization --------------------------------------------------------------------

    def authorize(
        self, principal: Principal, vm_id: str, request: Request
    ) -> tuple[VmConfig, Role]:
        """The VM and the caller's role on it, after every access rule.

        Raises:
            NotFoundError: unknown VM, or no role on it (the two look the same).
            ForbiddenError: console disabled, or MFA required and absent.
        """
        vm = self.vms.get(vm_id)
        role = self.rbac.role(principal, vm) if vm is not None else None
        fields = {
            "principal": principal.id,
            "peer": request.peer,
            "vm": vm_id,
            "region": self.region,
        }
        if vm is None or role is None:
            audit("access_denied", reason="no_role" if vm else "unknown_vm", **fields)
            raise NotFoundError(f"unknown vm {vm_id!r}", code="unknown_vm")
        # MFA before the switch: a caller without it learns nothing more of the VM.
        self.check_mfa(principal, vm.subscription, request, vm=vm_id)
        if not self.console_enabled(vm):
            audit("access_denied", reason="console_disabled", **fields)
            raise ForbiddenError(
                f"the serial console of {vm_id} is disabled", code="console_disabled"
            )
        return vm, role

    def mfa_required(self, subscription: str) -> bool:
        """Whether `[auth] require_mfa` or the subscription's own asks for MFA."""
        sub = self.config.subscription(subscription)
        return self.config.auth.require_mfa or (sub is not None and sub.require_mfa)

    def check_mfa(
        self, principal: Principal, subscription: str, request: Request, **where: str
    ) -> None:
        """Refuse a principal without `mfa` in `amr` anything in an MFA-required subscription.

        Every route that shows or changes a VM applies it, as the console does:
        `where` (`vm=` or `scope=`) names what was refused in the audit event.

        Raises:
            ForbiddenError: MFA is required and the principal's token did not carry it.
        """
        if "mfa" in principal.amr or not self.mfa_required(subscription):
            return
        audit(
            "access_denied",
            reason="mfa_required",
            principal=principal.id,
            peer=request.peer,
            region=self.region,
            **where,
        )
        raise ForbiddenError("multi-factor authentication is required", code="mfa_required")

    def effective_role(self, principal: Principal, vm: VmConfig) -> Role | None:
        """The principal's role on the VM now, None without one or without the MFA it needs.

        What `GET /v1/vms` lists (a VM of an MFA-required subscription is not shown to
        a caller without MFA), and what a live session keeps after a reload.
        """
        role = self.rbac.role(principal, vm)
        if role is None or ("mfa" not in principal.amr and self.mfa_required(vm.subscription)):
            return None
        return role

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

    def check_session_limits(self, principal: Principal, total: int, mine: int) -> None:
        """Per-gateway and per-principal session caps, given the open sessions' counts.

        Raises:
            RateLimitedError: a cap is reached.
        """
        limits = self.config.limits
        if limits.max_sessions is not None and total >= limits.max_sessions:
            raise RateLimitedError(
                f"gateway session limit {limits.max_sessions} reached", code="session_limit"
            )
        if (
            limits.max_sessions_per_principal is not None
            and mine >= limits.max_sessions_per_principal
        ):
            raise RateLimitedError(
                f"session limit {limits.max_sessions_per_principal} per principal reached",
                code="session_limit",
            )

    def console_enabled(self, vm: VmConfig) -> bool:
        """Whether the VM's console is on at every level: subscription, scale set, VM.

        The scale set is the VM's own: named by subscription, resource group and name.
        """
        switches: SwitchSource = self.shared_switches or self.switches
        sub = self.config.subscription(vm.subscription)
        sub_on = switches.get("subscriptions", vm.subscription)
        if sub_on is None:
            sub_on = sub is None or sub.serial_console
        ss = vm.scale_set_ref
        ss_on = True if ss is None else switches.get("scale_sets", scale_set_key(*ss))
        vm_on = switches.get("vms", vm.id)
        if vm_on is None:
            vm_on = vm.serial_console
        return sub_on and ss_on is not False and vm_on

    def prune(self, now: float) -> None:
        """Housekeeping: forget expired tickets and idle limiter keys."""
        self.tickets.expire(now)
        for limiter in (self.auth_limiter, self.conn_limiter):
            if limiter is not None:
                limiter.prune(now)


def _shared_ticket(raw: str) -> tuple[Principal, str, str]:
    """(principal, VM, mode) of a region ticket's payload, exactly as `issue_ticket` writes it.

    The payload comes from Redis, which any of its clients may write: anything else (a
    field missing or of another type, an `expires` that is no finite number) would raise
    later, in the upgrade (a 500) or a session's timers.

    Raises:
        ValueError: the payload is not such an object (the message says what is wrong).
    """
    try:
        data = json.loads(raw)
    except (ValueError, RecursionError):
        raise ValueError("not JSON") from None
    if not isinstance(data, dict):
        raise ValueError("not a JSON object")
    principal, expires = data.get("principal"), data.get("expires")
    groups: list[str] = data.get("groups")  # type: ignore[assignment]  # checked below
    amr: list[str] = data.get("amr")  # type: ignore[assignment]
    vm, mode = data.get("vm"), data.get("mode")
    if not isinstance(principal, str) or not principal:
        raise ValueError("principal is not a non-empty string")
    for name, items in (("groups", groups), ("amr", amr)):
        if not isinstance(items, list) or not all(isinstance(i, str) for i in items):
            raise ValueError(f"{name} is not a list of strings")
    if expires is not None and (
        isinstance(expires, bool)
        or not isinstance(expires, int | float)
        or not math.isfinite(expires)
    ):
        raise ValueError("expires is not a finite number or null")
    if not isinstance(vm, str) or mode not in ("interactive", "spectate"):
        raise ValueError("vm or mode is not what a gateway writes")
    return Principal(principal, tuple(groups), tuple(amr), expires), vm, mode
