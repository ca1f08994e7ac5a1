"""The plain HTTP routes of the TLS listener (everything but the console upgrade).

Handlers are synchronous functions of (gateway, request) that return an
`HttpResponse` or raise a `PeerError`; the connection turns either into
bytes. Routing is a short table, so the whole surface is readable here.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from typing import TYPE_CHECKING

from .errors import NotFoundError, PeerError

if TYPE_CHECKING:
    from .app import Gateway
    from .connection import HttpResponse, Request

_CONSOLE = re.compile(r"^/v1/vms/([A-Za-z0-9][A-Za-z0-9._-]{0,127})/console$")
_CONSOLE_LOG = re.compile(r"^/v1/vms/([A-Za-z0-9][A-Za-z0-9._-]{0,127})/console-log$")


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
    """The landing page (the web terminal is served here when its assets are built)."""
    from .connection import HttpResponse

    body = (
        "<!doctype html><html lang=en><meta charset=utf-8><title>relayd</title>"
        f"<h1>relayd serial-console gateway ({gw.region})</h1>"
        "<p>Connect with <code>relayd connect</code> or any WebSocket client speaking "
        "<code>relayd.console.v1</code> at <code>/v1/vms/{vm}/console</code>.</p></html>"
    ).encode()
    return HttpResponse(
        200,
        body,
        "text/html; charset=utf-8",
        [("Content-Security-Policy", "default-src 'none'; style-src 'self'")],
    )


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
    ring = hub.ring
    try:
        start = int(request.query.get("from", ring.start))
        max_bytes = int(request.query.get("max_bytes", ring.capacity))
    except ValueError:
        raise PeerError("from and max_bytes must be integers", code="bad_request") from None
    if start < 0 or max_bytes < 0:
        raise PeerError("from and max_bytes must not be negative", code="bad_request")
    data = ring.read(start, max_bytes)
    first = max(start, ring.start) if data else min(max(start, ring.start), ring.end)
    return HttpResponse(
        200,
        data,
        "application/octet-stream",
        [
            ("Relayd-Log-Start", str(ring.start)),
            ("Relayd-Log-End", str(ring.end)),
            ("Relayd-Data-Offset", str(first)),
        ],
    )


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
            raise _method_not_allowed(request.method)
        return handler(gw, request)
    m = _CONSOLE_LOG.match(request.path)
    if m is not None:
        if request.method != "GET":
            raise _method_not_allowed(request.method)
        return console_log(gw, request, m.group(1))
    if is_console_path(request.path):
        raise _method_not_allowed(request.method)
    raise NotFoundError(f"no route for {request.path[:100]}", code="not_found")


def _method_not_allowed(method: str) -> PeerError:
    exc = PeerError(f"method {method[:16]} is not allowed here", code="method_not_allowed")
    exc.http_status = 405
    return exc
