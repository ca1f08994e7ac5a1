"""The HTTP vocabulary both listeners speak: a request, a response, and the one writer.

`Request` is what route handlers see; `HttpResponse` is what they return; the
connection (TLS listener) and the health listener both turn a response into
bytes with `encode_response`, through their own h11 connection. A `PeerError`
becomes a response through `HttpResponse.error`, which takes the status and
the headers it needs from the exception itself (errors.py).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field

import h11

from .errors import PeerError

REASONS = {400: "Bad Request", 413: "Payload Too Large", 431: "Request Header Fields Too Large"}


@dataclass(frozen=True)
class Request:
    """What the route handlers see of a request."""

    method: str
    path: str
    query: dict[str, str]
    headers: dict[str, str]
    body: bytes
    peer: str
    client_cert_cn: str | None = None
    peer_gateway: str | None = None  # a verified gateway certificate's name (cluster)
    client_cert_not_after: float | None = None  # wall-clock seconds
    # Every header line in order, a repeated one too (`headers` keeps the last): what a
    # forwarded upgrade passes on, as RFC 6455 lets a client split its handshake headers.
    header_lines: tuple[tuple[str, str], ...] = ()


@dataclass
class HttpResponse:
    """A complete response for a non-upgrade request."""

    status: int
    body: bytes = b""
    content_type: str = "application/json"
    headers: list[tuple[str, str]] = field(default_factory=list)

    @classmethod
    def json(cls, status: int, obj: object, **headers: str) -> HttpResponse:
        """A JSON body; keyword headers are spelled with `_` for `-`."""
        body = json.dumps(obj, separators=(",", ":")).encode() + b"\n"
        return cls(status, body, headers=[(k.replace("_", "-"), v) for k, v in headers.items()])

    @classmethod
    def error(cls, exc: PeerError) -> HttpResponse:
        """The contract's `{"error": CODE, "message": TEXT}` body, status and headers."""
        response = cls.json(exc.http_status, {"error": exc.code, "message": exc.message})
        response.headers.extend(exc.response_headers())
        return response


def encode_response(
    conn: h11.Connection,
    response: HttpResponse,
    *,
    head_only: bool = False,
    defaults: tuple[tuple[str, str], ...] = (),
) -> bytes:
    """The response's bytes, framed by `conn` (which then expects the next request).

    Args:
        conn: the connection's h11 state; it decides keep-alive and framing.
        response: what to send.
        head_only: a HEAD request: the head only, with the body's length.
        defaults: headers added unless the response sets the same name itself.

    Raises:
        h11.LocalProtocolError: h11 cannot send a response now (the caller closes).
    """
    own = {name.lower() for name, _ in response.headers}
    headers = [
        ("Content-Type", response.content_type),
        ("Content-Length", str(len(response.body))),
        *(h for h in defaults if h[0].lower() not in own),
        *response.headers,
    ]
    out = conn.send(h11.Response(status_code=response.status, headers=headers)) or b""
    if not head_only:
        out += conn.send(h11.Data(data=response.body)) or b""
    return out + (conn.send(h11.EndOfMessage()) or b"")


def raw_error(status: int, code: str, message: str) -> bytes:
    """An error response for a request h11 could not parse (so it cannot frame one)."""
    body = json.dumps({"error": code, "message": message}).encode()
    head = (
        f"HTTP/1.1 {status} {REASONS.get(status, 'Error')}\r\n"
        f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n"
        "Connection: close\r\n\r\n"
    ).encode()
    return head + body
