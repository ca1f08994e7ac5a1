"""The routes and the console admission (api.py), called directly with a fake ApiOwner.

`FakeApiOwner` is a small real class implementing `ApiOwner` around a real
`AccessPolicy` (a real config, real HS256 tokens) and real hubs without ports;
the requests are `Request` values, as the connection builds them. Bytes on the
wire are the connection's (test_connection.py); this is what each path means.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Mapping
from typing import Any

import pytest

from relayd import api
from relayd.access import AccessPolicy
from relayd.config import Config
from relayd.errors import (
    AuthError,
    ConflictError,
    MethodNotAllowedError,
    NotFoundError,
    PeerError,
)
from relayd.http import Request
from relayd.hub import ConsoleHub
from relayd.principal import Principal
from relayd.switches import Level

from .hubclient import RecordingClient

ROLES = [
    ("user:alice", "contributor", "/subscriptions/sub-1"),
    ("user:rita", "reader", "/subscriptions/sub-1"),
    ("user:olga", "owner", "/subscriptions/sub-1"),
]


class FakeApiOwner:
    """An `ApiOwner`: the access policy and hubs of a config, switches recorded."""

    def __init__(self, config: Config) -> None:
        self.access = AccessPolicy(config)
        self.cluster = None  # a single gateway
        self.hubs: Mapping[str, ConsoleHub] = {
            vm.id: ConsoleHub(vm, config.limits) for vm in config.vms
        }
        self.region = "test"
        self.switched: list[tuple[Level, str, bool, str]] = []
        self.sessions = (0, 0)

    def session_counts(self, principal: Principal, session_id: str) -> tuple[int, int]:
        """What the test set: (on the gateway, of this principal)."""
        return self.sessions

    async def set_console(self, level: Level, key: str, enabled: bool, *, by: str) -> int:
        """Record the switch (and persist it, as the gateway does); no sessions to close."""
        self.access.switches.set(level, key, enabled)
        self.switched.append((level, key, enabled, by))
        return 0


@pytest.fixture
def owner(write_config: Callable[..., Config]) -> FakeApiOwner:
    """Two VMs: vm-a (takeover evict) and vm-d (takeover deny)."""
    config = write_config(
        vms=[
            {"id": "vm-a", "serial": "tcp://127.0.0.1:1"},
            {"id": "vm-d", "serial": "tcp://127.0.0.1:1", "takeover": "deny"},
        ],
        roles=ROLES,
    )
    return FakeApiOwner(config)


@pytest.fixture
def request_as(token: Callable[..., str]) -> Callable[..., Request]:
    """`request_as("alice", "GET", "/v1/vms", body=b"", **query)`; user None: no credentials."""

    def make(user: str | None, method: str, path: str, body: bytes = b"", **query: str) -> Request:
        headers = {"host": "localhost"}
        if user is not None:
            headers["authorization"] = f"Bearer {token(user)}"
        return Request(method, path, query, headers, body, "192.0.2.7")

    return make


# -- routing ------------------------------------------------------------------------------


async def test_api_vm_list_route_shows_each_vm_with_the_callers_role(
    owner: FakeApiOwner, request_as: Callable[..., Request]
) -> None:
    """GET /v1/vms lists the VMs the caller may see, with live state and its role."""
    response = await api.handle(owner, request_as("rita", "GET", "/v1/vms"))
    assert response.status == 200
    vms = json.loads(response.body)["vms"]
    assert [(v["id"], v["role"], v["port"], v["takeover"]) for v in vms] == [
        ("vm-a", "reader", "down", "evict"),
        ("vm-d", "reader", "down", "deny"),
    ]


async def test_api_console_log_route_serves_bytes_with_offsets(
    owner: FakeApiOwner, request_as: Callable[..., Request]
) -> None:
    """GET console-log returns the held output from `from`, with the log's offsets in headers."""
    owner.hubs["vm-a"].publish(b"0123456789")
    response = await api.handle(
        owner, request_as("rita", "GET", "/v1/vms/vm-a/console-log", **{"from": "4"})
    )
    assert (response.status, response.body, response.content_type) == (
        200,
        b"456789",
        "application/octet-stream",
    )
    assert dict(response.headers) == {
        "Relayd-Log-Start": "0",
        "Relayd-Log-End": "10",
        "Relayd-Data-Offset": "4",
    }


async def test_api_ticket_route_issues_a_ticket_for_the_mode_asked(
    owner: FakeApiOwner, request_as: Callable[..., Request]
) -> None:
    """POST console/tickets returns 201 with a one-time ticket that redeems for that VM."""
    request = request_as("alice", "POST", "/v1/vms/vm-a/console/tickets", b'{"mode":"spectate"}')
    response = await api.handle(owner, request)
    assert response.status == 201
    body = json.loads(response.body)
    assert (body["mode"], body["expires_in"]) == ("spectate", 30)
    redeemed = owner.access.tickets.redeem(body["ticket"], "vm-a", now=0.0)
    assert redeemed.principal.id == "user:alice"


@pytest.mark.parametrize(
    ("path", "level", "key"),
    [
        ("/v1/vms/vm-a/serial-console", "vms", "vm-a"),
        ("/v1/subscriptions/sub-1/serial-console", "subscriptions", "sub-1"),
    ],
)
async def test_api_switch_routes_reach_the_owner_with_level_and_key(
    owner: FakeApiOwner, request_as: Callable[..., Request], path: str, level: str, key: str
) -> None:
    """PUT serial-console at each level switches that level, by the owner role only."""
    response = await api.handle(owner, request_as("olga", "PUT", path, b'{"enabled": false}'))
    assert response.status == 200
    assert owner.switched == [(level, key, False, "user:olga")]
    with pytest.raises(PeerError) as info:
        await api.handle(owner, request_as("alice", "PUT", path, b'{"enabled": true}'))
    assert (info.value.http_status, info.value.code) == (403, "forbidden")


# -- 405 and 404 --------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("method", "path", "allow"),
    [
        ("POST", "/", "GET, HEAD"),
        ("DELETE", "/v1/vms", "GET, HEAD"),
        ("POST", "/v1/vms/vm-a/console-log", "GET, HEAD"),
        ("GET", "/v1/vms/vm-a/console/tickets", "POST"),
        ("GET", "/v1/vms/vm-a/serial-console", "PUT"),
        (
            "POST",
            "/v1/subscriptions/sub-1/resourceGroups/rg/virtualMachineScaleSets/ss/serial-console",
            "PUT",
        ),
        ("POST", "/v1/vms/vm-a/console", "GET"),
        ("PUT", "/assets/app.js", "GET, HEAD"),
    ],
)
async def test_api_wrong_method_is_405_with_allow_before_credentials(
    owner: FakeApiOwner, request_as: Callable[..., Request], method: str, path: str, allow: str
) -> None:
    """A known path with the wrong method is 405 naming the allowed ones, even without a token."""
    with pytest.raises(MethodNotAllowedError) as info:
        await api.handle(owner, request_as(None, method, path))
    assert info.value.http_status == 405
    assert info.value.response_headers() == [("Allow", allow)]


@pytest.mark.parametrize(
    "path", ["/nope", "/v1", "/v1/vms/vm-a", "/v1/vms/vm-a/console/extra", "/assets/missing.js"]
)
async def test_api_unknown_path_is_404(
    owner: FakeApiOwner, request_as: Callable[..., Request], path: str
) -> None:
    """A path no route matches is 404 not_found, whoever asks."""
    with pytest.raises(NotFoundError) as info:
        await api.handle(owner, request_as("alice", "GET", path))
    assert (info.value.http_status, info.value.code) == (404, "not_found")


async def test_api_vm_the_caller_holds_no_role_on_is_404_like_an_unknown_one(
    owner: FakeApiOwner, request_as: Callable[..., Request]
) -> None:
    """No role on a VM and no such VM read the same (404 unknown_vm): nothing to probe."""
    for user, vm in (("mallory", "vm-a"), ("alice", "vm-zz")):
        with pytest.raises(NotFoundError) as info:
            await api.handle(owner, request_as(user, "GET", f"/v1/vms/{vm}/console-log"))
        assert info.value.code == "unknown_vm"


async def test_api_route_without_credentials_is_401(
    owner: FakeApiOwner, request_as: Callable[..., Request]
) -> None:
    """A route that needs a principal refuses a request without one with 401."""
    with pytest.raises(AuthError) as info:
        await api.handle(owner, request_as(None, "GET", "/v1/vms"))
    assert info.value.http_status == 401


# -- the console admission ----------------------------------------------------------------


async def test_api_open_console_grants_writer_to_contributor_and_spectator_to_reader(
    owner: FakeApiOwner, request_as: Callable[..., Request]
) -> None:
    """Interactive by a contributor wants the lease; by a reader, or spectate, it does not."""
    alice = await api.open_console(owner, request_as("alice", "GET", "/v1/vms/vm-a/console"))
    assert (alice.hub, alice.role, alice.want_writer) == (owner.hubs["vm-a"], "contributor", True)
    rita = await api.open_console(owner, request_as("rita", "GET", "/v1/vms/vm-a/console"))
    assert (rita.role, rita.want_writer) == ("reader", False)
    watch = request_as("alice", "GET", "/v1/vms/vm-a/console", mode="spectate", **{"from": "7"})
    spectate = await api.open_console(owner, watch)
    assert (spectate.want_writer, spectate.resume_from) == (False, 7)
    assert alice.session_id != spectate.session_id


async def test_api_open_console_under_deny_with_a_writer_is_409(
    owner: FakeApiOwner, request_as: Callable[..., Request]
) -> None:
    """Takeover policy deny and a writer attached: 409 before the upgrade; spectating is fine."""
    owner.hubs["vm-d"].attach(RecordingClient("w1", "user:bob"), writer=True)
    with pytest.raises(ConflictError) as info:
        await api.open_console(owner, request_as("alice", "GET", "/v1/vms/vm-d/console"))
    assert (info.value.http_status, info.value.code) == (409, "writer_exists")
    grant = await api.open_console(
        owner, request_as("alice", "GET", "/v1/vms/vm-d/console", mode="spectate")
    )
    assert not grant.want_writer


@pytest.mark.parametrize(
    ("query", "message"),
    [
        ({"mode": "write"}, "mode must be interactive or spectate"),
        ({"from": "-1"}, "from must be a byte offset"),
        ({"from": "ten"}, "from must be a byte offset"),
    ],
)
async def test_api_open_console_bad_query_is_400(
    owner: FakeApiOwner, request_as: Callable[..., Request], query: dict[str, Any], message: str
) -> None:
    """A bad mode or resume offset is refused 400 with what is wrong."""
    with pytest.raises(PeerError) as info:
        await api.open_console(owner, request_as("alice", "GET", "/v1/vms/vm-a/console", **query))
    assert (info.value.http_status, info.value.message) == (400, message)


async def test_api_open_console_over_the_session_cap_is_429(
    write_config: Callable[..., Config], request_as: Callable[..., Request]
) -> None:
    """With max_sessions reached, a new console is refused 429 session_limit."""
    config = write_config(
        vms=[{"id": "vm-a", "serial": "tcp://127.0.0.1:1"}], limits={"max_sessions": 2}
    )
    owner = FakeApiOwner(config)
    owner.sessions = (2, 0)
    with pytest.raises(PeerError) as info:
        await api.open_console(owner, request_as("alice", "GET", "/v1/vms/vm-a/console"))
    assert (info.value.http_status, info.value.code) == (429, "session_limit")
