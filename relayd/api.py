"""The plain HTTP routes of the TLS listener (everything but the console upgrade).

Handlers are synchronous functions of (gateway, request) that return an
`HttpResponse` or raise a `PeerError`; the connection turns either into
bytes. Routing is a short table, so the whole surface is readable here.
"""

from __future__ import annotations

import json
import re
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from . import webui
from .audit import audit
from .config import VmConfig, vm_scopes
from .errors import ForbiddenError, NotFoundError, PeerError
from .rbac import at_least

if TYPE_CHECKING:
    from .app import Gateway
    from .auth import Principal
    from .connection import HttpResponse, Request
    from .switches import Level

MAX_LOG_RESPONSE = 16 * 2**20  # one response; page with ?from= for more

_CONSOLE = re.compile(r"^/v1/vms/([A-Za-z0-9][A-Za-z0-9._-]{0,127})/console$")
_CONSOLE_LOG = re.compile(r"^/v1/vms/([A-Za-z0-9][A-Za-z0-9._-]{0,127})/console-log$")
_TICKETS = re.compile(r"^/v1/vms/([A-Za-z0-9][A-Za-z0-9._-]{0,127})/console/tickets$")
_SWITCH_VM = re.compile(r"^/v1/vms/([^/]{1,128})/serial-console$")
_SWITCH_SUB = re.compile(r"^/v1/subscriptions/([^/]{1,128})/serial-console$")
_SWITCH_SS = re.compile(
    r"^/v1/subscriptions/([^/]{1,128})/scale-sets/([^/]{1,128})/serial-console$"
)


def is_console_path(path: str) -> bool:
    """Whether this is the WebSocket console route."""
    return _CONSOLE.match(path) is not None


def console_vm(path: str) -> str:
    """The VM id in a console route."""
    m = _CONSOLE.match(path)
    assert m is not None
    return m.group(1)


def _json(status: int, obj: object, **headers: str) -> HttpResponse:
    from .connection import HttpResponse

    return HttpResponse.json(status, obj, **headers)


def index(gw: Gateway, request: Request) -> HttpResponse:
    """The web terminal page (or, when its assets are not built, how to build them)."""
    response = webui.static_response("/", if_none_match=request.headers.get("if-none-match"))
    assert response is not None  # "/" always has an answer
    return response


def list_vms(gw: Gateway, request: Request) -> HttpResponse:
    """The VMs the caller holds any role on, with their live state."""
    principal = gw.authenticate(request)
    vms = []
    for hub in gw.hubs.values():
        role = gw.rbac.role(principal, hub.vm)
        if role is None:
            continue
        vms.append(
            {
                "id": hub.vm.id,
                "subscription": hub.vm.subscription,
                "resource_group": hub.vm.resource_group,
                "scale_set": hub.vm.scale_set,
                "enabled": gw.console_enabled(hub.vm),
                "port": "up" if hub.port_up else "down",
                "writer_attached": hub.lease.holder is not None,
                "sessions": len(hub.clients),
                "role": role,
                "takeover": hub.vm.takeover,
                "can_break": hub.can_break,
            }
        )
    return _json(200, {"vms": vms})


def console_log(gw: Gateway, request: Request, vm_id: str) -> HttpResponse:
    """The held console output, by absolute offsets (readers and up)."""
    from .connection import HttpResponse

    principal = gw.authenticate(request)
    hub, _ = gw.authorize(principal, vm_id, request)
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


def issue_ticket(gw: Gateway, request: Request, vm_id: str) -> HttpResponse:
    """A one-time ticket for a browser's WebSocket (readers and up; mode as requested)."""
    principal = gw.authenticate(request)
    gw.authorize(principal, vm_id, request)
    body = _json_body(request, optional=True)
    mode = body.get("mode", "interactive")
    if mode not in ("interactive", "spectate"):
        raise PeerError("mode must be interactive or spectate", code="bad_request")
    ticket = gw.tickets.issue(principal, vm_id, mode, time.monotonic())
    return _json(201, {"ticket": ticket, "expires_in": int(gw.tickets.ttl), "mode": mode})


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


def switch_console(gw: Gateway, request: Request, level: Level, key: str) -> HttpResponse:
    """Owner-only enable/disable at one level; persisted; disabling closes sessions (4009)."""
    principal = gw.authenticate(request)
    enabled = _enabled_from(request)
    scopes: tuple[str, ...]
    if level == "vms":
        hub = gw.hubs.get(key)
        if hub is None or gw.rbac.role(principal, hub.vm) is None:
            raise NotFoundError(f"unknown vm {key!r}", code="unknown_vm")
        scopes = vm_scopes(hub.vm)
    elif level == "subscriptions":
        members = [h.vm for h in gw.hubs.values() if h.vm.subscription == key]
        # Unknown and invisible read the same, as for VMs: no probing for what exists.
        holds = gw.rbac.role_on(principal, (f"/subscriptions/{key}",)) is not None
        if gw.config.subscription(key) is None or not (holds or _sees_any(gw, principal, members)):
            raise NotFoundError(f"unknown subscription {key!r}", code="not_found")
        scopes = (f"/subscriptions/{key}",)
    else:
        sub, _, ss = key.partition("/")
        members = [
            h.vm for h in gw.hubs.values() if (h.vm.subscription, h.vm.scale_set) == (sub, ss)
        ]
        if not members or not _sees_any(gw, principal, members):
            raise NotFoundError(f"unknown scale set {ss!r} in {sub!r}", code="not_found")
        scopes = vm_scopes(members[0])[:-2]  # subscription, resource group, scale set
    if not at_least(gw.rbac.role_on(principal, scopes), "owner"):
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
    closed = gw.set_console(level, key, enabled, by=principal.id)
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


def _sees_any(gw: Gateway, principal: Principal, vms: list[VmConfig]) -> bool:
    """Whether the principal holds any role on any of these VMs (or on a scope above them)."""
    return any(gw.rbac.role(principal, vm) is not None for vm in vms)


Handler = Callable[["Gateway", "Request"], "HttpResponse"]
_ROUTES: dict[str, Handler] = {"/": index, "/v1/vms": list_vms}


def handle(gw: Gateway, request: Request) -> HttpResponse:
    """Route a request.

    Raises:
        PeerError: 404 for unknown paths, 405 for a wrong method, or the handler's error.
    """
    handler = _ROUTES.get(request.path)
    if handler is not None:
        if request.method not in ("GET", "HEAD"):
            raise _method_not_allowed(request.method, "GET, HEAD")
        return handler(gw, request)
    m = _CONSOLE_LOG.match(request.path)
    if m is not None:
        if request.method not in ("GET", "HEAD"):
            raise _method_not_allowed(request.method, "GET, HEAD")
        return console_log(gw, request, m.group(1))
    m = _TICKETS.match(request.path)
    if m is not None:
        if request.method != "POST":
            raise _method_not_allowed(request.method, "POST")
        return issue_ticket(gw, request, m.group(1))
    switches: tuple[tuple[re.Pattern[str], Level], ...] = (
        (_SWITCH_VM, "vms"),
        (_SWITCH_SUB, "subscriptions"),
        (_SWITCH_SS, "scale_sets"),
    )
    for pattern, level in switches:
        m = pattern.match(request.path)
        if m is not None:
            if request.method != "PUT":
                raise _method_not_allowed(request.method, "PUT")
            return switch_console(gw, request, level, "/".join(m.groups()))
    if is_console_path(request.path):
        raise _method_not_allowed(request.method, "GET")
    if request.path.startswith(webui.ASSETS_PREFIX):
        if request.method not in ("GET", "HEAD"):
            raise _method_not_allowed(request.method, "GET, HEAD")
        asset = webui.static_response(
            request.path, if_none_match=request.headers.get("if-none-match")
        )
        if asset is not None:
            return asset
    raise NotFoundError(f"no route for {request.path[:100]}", code="not_found")


def _method_not_allowed(method: str, allow: str) -> PeerError:
    """405, with the methods the path does take (RFC 9110 requires the Allow header)."""
    exc = PeerError(f"method {method[:16]} is not allowed here", code="method_not_allowed")
    exc.http_status = 405
    exc.allow = allow
    return exc
