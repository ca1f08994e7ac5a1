"""What a gateway cut off from Redis alone learns from its peers: who owns its VMs now.

Redis is the region's only authority on ownership. A gateway that cannot reach
it keeps its ports open: an outage usually hits every gateway alike, and closing
every port would take every console away. But when only this gateway is cut off,
the others see its leases expire and claim its VMs, and the hypervisor's
single-client port keeps each new owner waiting behind this gateway for as long
as the cut lasts. So once its leases have surely expired, the cut-off gateway
asks its peers, over the authenticated peer link, what Redis told them: a peer
that read Redis after those leases expired and names another owner for a VM
means this gateway was deposed. It closes that port (the fence would have said
the same) and its clients follow the console to the new owner. Peers only pass
on what they read from Redis, and their word can only make a gateway let go of
a port, never take one: no second source of truth.

The exchange, on the TLS listener, from a gateway's client certificate only::

    POST /v1/cluster/owners HTTP/1.1
    Content-Type: application/json

    {"vms": ["vm-a", "vm-b"]}

    HTTP/1.1 200 OK
    {"gateway": "gw-2", "seen_ago": 0.42,
     "live": {"gw-2": "10.0.0.6:8443", "gw-3": "10.0.0.7:8443"},
     "owners": {"vm-a": "gw-3", "vm-b": null}}

`seen_ago`: seconds since the start of the answering gateway's last round that
read Redis (null: it never did); `owners`: its last round's owner of each VM
asked about (null: none). Questions are at most `MAX_QUESTION_BYTES`, so
answers stay within the peer link's response cap. Parsing is strict: anything
else is a `ValueError`.
"""

from __future__ import annotations

import json
import math
import ssl
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from ..errors import PeerLinkError
from .peerlink import open_peer

PATH = "/v1/cluster/owners"
# A question's JSON body; its answer adds a gateway id per VM, well within the
# peer link's 64 KiB answer cap (forwarding.MAX_RESPONSE_BODY_BYTES).
MAX_QUESTION_BYTES = 16384


@dataclass(frozen=True)
class PeerView:
    """One peer's last reading of Redis, for the VMs asked about."""

    gateway: str
    seen_ago: float | None
    live: dict[str, str]
    owners: dict[str, str | None]


def questions(vms: Iterable[str]) -> list[list[str]]:
    """The VMs in groups that each fit one question."""
    groups: list[list[str]] = [[]]
    size = len('{"vms": []}')
    for vm in vms:
        cost = len(json.dumps(vm)) + 2
        if groups[-1] and size + cost > MAX_QUESTION_BYTES:
            groups.append([])
            size = len('{"vms": []}')
        groups[-1].append(vm)
        size += cost
    return [g for g in groups if g]


def encode_question(host: str, vms: Sequence[str]) -> bytes:
    """The request a cut-off gateway sends a peer (`host`: the peer's advertise host)."""
    body = json.dumps({"vms": list(vms)}).encode()
    if len(body) > MAX_QUESTION_BYTES:
        raise ValueError(f"question of {len(body)} bytes exceeds {MAX_QUESTION_BYTES}")
    head = (
        f"POST {PATH} HTTP/1.1\r\n"
        f"Host: {host}\r\n"
        "Content-Type: application/json\r\n"
        f"Content-Length: {len(body)}\r\n"
        "Connection: close\r\n\r\n"
    )
    return head.encode("ascii") + body


def parse_question(body: bytes) -> list[str]:
    """The VM ids a peer asks about.

    Raises:
        ValueError: not `{"vms": [str, ...]}` within `MAX_QUESTION_BYTES`.
    """
    if len(body) > MAX_QUESTION_BYTES:
        raise ValueError(f"question exceeds {MAX_QUESTION_BYTES} bytes")
    try:
        data = json.loads(body)
    except (ValueError, RecursionError):
        raise ValueError("question is not JSON") from None
    if not isinstance(data, dict) or set(data) != {"vms"} or not isinstance(data["vms"], list):
        raise ValueError('question must be {"vms": [...]}')
    vms = data["vms"]
    if not all(isinstance(vm, str) for vm in vms):
        raise ValueError("vms must be strings")
    return vms


def encode_answer(
    gateway: str,
    seen_ago: float | None,
    live: Mapping[str, str],
    owners: Mapping[str, tuple[str, str] | None],
    vms: Iterable[str],
) -> dict[str, Any]:
    """The answer's JSON object: `owners` maps vm -> (gateway, advertise) as the node has it."""
    named = {vm: (owners.get(vm) or (None,))[0] for vm in vms}
    return {
        "gateway": gateway,
        "seen_ago": None if seen_ago is None else round(max(0.0, seen_ago), 3),
        "live": dict(live),
        "owners": named,
    }


def parse_answer(body: bytes) -> PeerView:
    """A peer's answer.

    Raises:
        ValueError: not an answer of the shape `encode_answer` makes.
    """
    try:
        data = json.loads(body)
    except (ValueError, RecursionError):
        raise ValueError("answer is not JSON") from None
    if not isinstance(data, dict) or set(data) != {"gateway", "seen_ago", "live", "owners"}:
        raise ValueError("answer has the wrong fields")
    gateway, seen_ago, live, owners = (
        data["gateway"],
        data["seen_ago"],
        data["live"],
        data["owners"],
    )
    if not isinstance(gateway, str):
        raise ValueError("gateway must be a string")
    if seen_ago is not None and (
        isinstance(seen_ago, bool)
        or not isinstance(seen_ago, int | float)
        or not math.isfinite(seen_ago)
        or seen_ago < 0
    ):
        raise ValueError("seen_ago must be a number of seconds or null")
    if not isinstance(live, dict) or not all(isinstance(v, str) for v in live.values()):
        raise ValueError("live must map gateways to addresses")
    if not isinstance(owners, dict) or not all(
        v is None or isinstance(v, str) for v in owners.values()
    ):
        raise ValueError("owners must map VMs to a gateway or null")
    return PeerView(gateway, None if seen_ago is None else float(seen_ago), live, owners)


async def ask(
    host: str,
    port: int,
    ssl_ctx: ssl.SSLContext,
    vms: Sequence[str],
    timeout: float,  # noqa: ASYNC109 - open_peer's one deadline
) -> PeerView:
    """Ask the peer at `host:port` who owns `vms` (one question: see `questions`).

    Raises:
        PeerLinkError: the peer cannot be reached, refuses, or answers nonsense.
    """
    link = await open_peer(host, port, ssl_ctx, encode_question(host, vms), timeout)
    if link.status != 200:
        raise PeerLinkError(f"peer {host}:{port} answered {link.status}")
    try:
        return parse_answer(link.rest)
    except ValueError as exc:
        raise PeerLinkError(f"peer {host}:{port}: {exc}") from None


__all__ = [
    "MAX_QUESTION_BYTES",
    "PATH",
    "PeerView",
    "ask",
    "encode_answer",
    "encode_question",
    "parse_answer",
    "parse_question",
    "questions",
]
