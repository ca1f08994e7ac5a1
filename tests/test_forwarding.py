"""Tests for relayd.cluster.forwarding: the forwarded upgrade and the owner's answer, no I/O."""

from __future__ import annotations

import ipaddress
from typing import Any

import h11
import pytest
from hypothesis import given
from hypothesis import strategies as st

from relayd.cluster.forwarding import (
    MAX_HEAD_BYTES,
    MAX_RESPONSE_BODY_BYTES,
    MAX_RESPONSE_HEAD_BYTES,
    MAX_VALUE_BYTES,
    ForwardedRequestError,
    ForwardedSession,
    PeerLinkError,
    ResponseHead,
    SessionClocks,
    encode_forwarded_request,
    has_forwarded_headers,
    parse_forwarded_headers,
    parse_response_head,
)

PATH = "/v1/vms/vm-a/console"
CLIENT_HEADERS = [
    ("Host", "gw.example.test"),
    ("Upgrade", "websocket"),
    ("Connection", "Upgrade"),
    ("Sec-WebSocket-Key", "dGhlIHNhbXBsZSBub25jZQ=="),
    ("Sec-WebSocket-Version", "13"),
    ("Sec-WebSocket-Protocol", "relayd.console.v1"),
    ("Origin", "https://gw.example.test"),
    ("Authorization", "Bearer eyJhbGciOi.secret.token"),
]
FWD = ForwardedSession(
    principal="user:alice",
    role="contributor",
    mode="interactive",
    client_peer="203.0.113.7",
    session_id="9f86d081884c7d65",
    groups=("group:ops",),
    amr=("pwd", "mfa"),
    resume_from=1234,
)


def owner_parses(head: bytes) -> tuple[str, list[tuple[str, str]]]:
    """What the owner's h11 sees of a forwarded head: target and (name, value) pairs."""
    conn = h11.Connection(h11.SERVER, max_incomplete_event_size=MAX_HEAD_BYTES)
    conn.receive_data(head)
    event = conn.next_event()
    assert isinstance(event, h11.Request)
    assert isinstance(conn.next_event(), h11.EndOfMessage)  # a GET without a body
    pairs = [(k.decode("latin-1"), v.decode("latin-1")) for k, v in event.headers.raw_items()]
    return event.target.decode("ascii"), pairs


def headers_of(fwd: ForwardedSession) -> list[tuple[str, str]]:
    """The forwarded headers a session encodes to, as the owner receives them."""
    return owner_parses(encode_forwarded_request(PATH, CLIENT_HEADERS, fwd))[1]


def replaced(pairs: list[tuple[str, str]], name: str, value: str | None) -> list[tuple[str, str]]:
    """`pairs` with header `name` set to `value` (None: removed)."""
    out = [(k, v) for k, v in pairs if k.lower() != name.lower()]
    return out if value is None else [*out, (name, value)]


# -- strategies ---------------------------------------------------------------------------------

# Any string, lone surrogates included (PyJWT's JSON decoder can produce them).
# The awkward characters are mixed in on purpose: separators, escapes, lone surrogates.
any_text = st.text(
    st.characters(exclude_categories=())
    | st.sampled_from(["\ud800", "\udfff", ",", "%", ":", " ", "\x7f", "é"]),
    max_size=40,
)
ip_text = st.one_of(st.ip_addresses(v=4), st.ip_addresses(v=6)).map(str)
sessions = st.builds(
    ForwardedSession,
    principal=any_text.filter(bool),
    role=st.sampled_from(["reader", "contributor", "owner"]),
    mode=st.sampled_from(["interactive", "spectate"]),
    client_peer=ip_text,
    session_id=st.from_regex(r"[0-9a-f]{1,64}", fullmatch=True),
    groups=st.lists(any_text, max_size=5).map(tuple),
    amr=st.lists(any_text, max_size=5).map(tuple),
    resume_from=st.none() | st.integers(0, 2**63 - 1),
    expires=st.none() | st.integers(0, 2**63 - 1),
    age_ms=st.none() | st.integers(0, 2**63 - 1),
    idle_ms=st.none() | st.integers(0, 2**63 - 1),
    warned_ms=st.none() | st.integers(0, 2**63 - 1),
)
header_value = st.text(st.characters(min_codepoint=0x20, max_codepoint=0x7E), max_size=30).map(
    str.strip
)
forged_names = st.sampled_from(
    [
        "Relayd-Forwarded-Principal",
        "relayd-forwarded-role",
        "RELAYD-FORWARDED-FOR",
        "Relayd-Forwarded-X",
    ]
)


# -- the request --------------------------------------------------------------------------------


@given(
    fwd=sessions,
    forged=st.lists(st.tuples(forged_names, header_value), max_size=4),
    insert_at=st.integers(0, len(CLIENT_HEADERS)),
)
def test_forwarded_request_any_session_round_trips_through_h11(
    fwd: ForwardedSession, forged: list[tuple[str, str]], insert_at: int
) -> None:
    """Encode, parse with the owner's h11, decode: the same session, forged headers gone."""
    client = [*CLIENT_HEADERS[:insert_at], *forged, *CLIENT_HEADERS[insert_at:]]
    head = encode_forwarded_request(PATH, client, fwd)
    target, pairs = owner_parses(head)
    assert target == PATH
    assert parse_forwarded_headers(pairs) == fwd
    forwarded = [(k, v) for k, v in pairs if k.lower().startswith("relayd-forwarded-")]
    assert forwarded == [(k, v) for k, v in headers_of(fwd) if k.startswith("Relayd-Forwarded-")]


def test_forwarded_request_client_forwarded_headers_are_stripped() -> None:
    """A client's own Relayd-Forwarded-* headers never reach the owner."""
    client = [
        *CLIENT_HEADERS,
        ("Relayd-Forwarded-Principal", "user%3Aroot"),
        ("relayd-forwarded-role", "owner"),
    ]
    _, pairs = owner_parses(encode_forwarded_request(PATH, client, FWD))
    assert parse_forwarded_headers(pairs) == FWD
    assert ("Relayd-Forwarded-Principal", "user%3Aalice") in pairs
    assert all(v != "user%3Aroot" and v != "owner" for _, v in pairs)


def test_forwarded_request_keeps_websocket_handshake_drops_credentials() -> None:
    """The WebSocket headers travel in order; Authorization, bodies and cookies do not."""
    client = [*CLIENT_HEADERS, ("Cookie", "a=b"), ("Content-Length", "5"), ("X-Other", "1")]
    head = encode_forwarded_request(PATH, client, FWD)
    assert head.startswith(b"GET /v1/vms/vm-a/console HTTP/1.1\r\n")
    assert head.endswith(b"\r\n\r\n")
    _, pairs = owner_parses(head)
    names = [k for k, _ in pairs if not k.lower().startswith("relayd-")]
    assert names == [k for k, _ in CLIENT_HEADERS if k != "Authorization"]
    assert b"secret" not in head
    assert b"Cookie" not in head
    assert b"Content-Length" not in head


def test_forwarded_request_example_is_readable() -> None:
    """The documented example: percent-encoded names, comma lists, the offset in decimal."""
    _, pairs = owner_parses(encode_forwarded_request(PATH, CLIENT_HEADERS, FWD))
    forwarded = [(k, v) for k, v in pairs if k.startswith("Relayd-")]
    assert forwarded == [
        ("Relayd-Forwarded-Version", "1"),
        ("Relayd-Forwarded-Principal", "user%3Aalice"),
        ("Relayd-Forwarded-Groups", "group%3Aops"),
        ("Relayd-Forwarded-Amr", "pwd,mfa"),
        ("Relayd-Forwarded-Role", "contributor"),
        ("Relayd-Forwarded-Mode", "interactive"),
        ("Relayd-Forwarded-From", "1234"),
        ("Relayd-Forwarded-For", "203.0.113.7"),
        ("Relayd-Forwarded-Session", "9f86d081884c7d65"),
    ]


@pytest.mark.parametrize(
    "path", ["/v1/vms/vm-a/console?ticket=abc", "v1/vms", "/a b", "/a#frag", "/\x7f"]
)
def test_encode_forwarded_request_bad_path_raises_value_error(path: str) -> None:
    """Only an origin-form path without a query travels (a ticket never does)."""
    with pytest.raises(ValueError, match="path"):
        encode_forwarded_request(path, CLIENT_HEADERS, FWD)


def test_encode_forwarded_request_without_host_raises_value_error() -> None:
    """HTTP/1.1 needs a Host; the client's is passed on, so it must have one."""
    with pytest.raises(ValueError, match="Host"):
        encode_forwarded_request(PATH, CLIENT_HEADERS[1:], FWD)


def test_encode_forwarded_request_control_character_raises_value_error() -> None:
    """A header value with CR or LF would split the head: refused."""
    with pytest.raises(ValueError, match="control"):
        encode_forwarded_request(PATH, [*CLIENT_HEADERS, ("Origin", "x\r\nEvil: 1")], FWD)


def test_encode_forwarded_request_huge_groups_raise_431() -> None:
    """A principal whose names exceed the value cap is refused with 431, not sent."""
    fwd = ForwardedSession(**{**FWD.__dict__, "groups": tuple(f"group:{i:04}" for i in range(900))})
    with pytest.raises(ForwardedRequestError, match=str(MAX_VALUE_BYTES)) as info:
        encode_forwarded_request(PATH, CLIENT_HEADERS, fwd)
    assert info.value.http_status == 431


def test_encode_forwarded_request_head_over_cap_raises_431() -> None:
    """Values each under their cap can still make a head over the owner's cap: 431."""
    big = "x" * (MAX_VALUE_BYTES - 100)
    fwd = ForwardedSession(**{**FWD.__dict__, "groups": (big,), "amr": (big,)})
    with pytest.raises(ForwardedRequestError, match=str(MAX_HEAD_BYTES)) as info:
        encode_forwarded_request(PATH, CLIENT_HEADERS, fwd)
    assert info.value.http_status == 431


# -- strict parsing -------------------------------------------------------------------------------

GOOD = headers_of(FWD)


@pytest.mark.parametrize(
    ("name", "value", "message"),
    [
        ("Relayd-Forwarded-Version", "2", "not supported"),
        ("Relayd-Forwarded-Version", None, "Version is missing"),
        ("Relayd-Forwarded-Principal", None, "Principal is missing"),
        ("Relayd-Forwarded-Role", None, "Role is missing"),
        ("Relayd-Forwarded-Mode", None, "Mode is missing"),
        ("Relayd-Forwarded-For", None, "For is missing"),
        ("Relayd-Forwarded-Session", None, "Session is missing"),
        ("Relayd-Forwarded-Principal", "user:alice", "not percent-encoded"),
        ("Relayd-Forwarded-Principal", "user%3aalice", "not percent-encoded"),
        ("Relayd-Forwarded-Principal", "%41lice", "canonical"),
        ("Relayd-Forwarded-Principal", "%FF", "not UTF-8"),
        ("Relayd-Forwarded-Principal", "", "principal must be a non-empty"),
        ("Relayd-Forwarded-Groups", "a,b c", "not percent-encoded"),
        ("Relayd-Forwarded-Role", "admin", "role must be one of"),
        ("Relayd-Forwarded-Mode", "write", "mode must be"),
        ("Relayd-Forwarded-From", "01", "decimal offset"),
        ("Relayd-Forwarded-From", "-1", "decimal offset"),
        ("Relayd-Forwarded-From", "1" * 20, "decimal offset"),
        ("Relayd-Forwarded-From", "9" * 19, "resume_from must be"),
        ("Relayd-Forwarded-For", "gw.example.test", "IP address"),
        ("Relayd-Forwarded-For", "::FFFF:1.2.3.4", "IP address"),
        ("Relayd-Forwarded-Session", "a b", "session_id"),
        ("Relayd-Forwarded-Session", "forged-1", "session_id"),
        ("Relayd-Forwarded-Session", "ABCD", "session_id"),
        ("Relayd-Forwarded-Session", "a" * 65, "session_id"),
        ("Relayd-Forwarded-Amr", "x" * (MAX_VALUE_BYTES + 1), str(MAX_VALUE_BYTES)),
    ],
)
def test_parse_forwarded_headers_bad_value_raises_400(
    name: str, value: str | None, message: str
) -> None:
    """Every field is checked; the error names what is wrong and answers 400."""
    with pytest.raises(ForwardedRequestError, match=message) as info:
        parse_forwarded_headers(replaced(GOOD, name, value))
    assert info.value.http_status == 400


def test_parse_forwarded_headers_ignores_a_header_it_does_not_know() -> None:
    """A newer gateway's advisory header (a rolling upgrade) does not refuse the session."""
    pairs = [*GOOD, ("Relayd-Forwarded-Newer-Hint", "x"), ("relayd-forwarded-newer-hint", "y")]
    assert parse_forwarded_headers(pairs) == FWD


def test_parse_forwarded_headers_repeated_header_raises() -> None:
    """A forwarded header sent twice is refused, whatever its letter case."""
    pairs = [*GOOD, ("relayd-forwarded-role", "owner")]
    with pytest.raises(ForwardedRequestError, match="more than once"):
        parse_forwarded_headers(pairs)


def test_parse_forwarded_headers_mapping_in_any_case_is_accepted() -> None:
    """A lower-cased dict (as the HTTP layer keeps headers) parses the same."""
    assert parse_forwarded_headers({k.lower(): v for k, v in GOOD}) == FWD


def test_parse_forwarded_headers_optional_fields_absent_are_empty() -> None:
    """Without groups, amr and from: empty tuples and None."""
    pairs = replaced(
        replaced(replaced(GOOD, "Relayd-Forwarded-Groups", None), "Relayd-Forwarded-Amr", None),
        "Relayd-Forwarded-From",
        None,
    )
    fwd = parse_forwarded_headers(pairs)
    assert (fwd.groups, fwd.amr, fwd.resume_from) == ((), (), None)


@given(st.lists(st.tuples(forged_names | st.text(max_size=20), st.text(max_size=40)), max_size=12))
def test_parse_forwarded_headers_arbitrary_input_raises_only_forwarded_error(
    pairs: list[tuple[str, str]],
) -> None:
    """Garbage is refused with ForwardedRequestError, never another exception."""
    status = 400
    try:
        parse_forwarded_headers(pairs)
    except ForwardedRequestError as exc:
        status = exc.http_status
    assert status == 400


_FORWARDED_NAMES = sorted(
    {name for name, _ in GOOD}
    | {f"Relayd-Forwarded-{n}" for n in ("From", "Expires", "Age", "Idle", "Groups", "Amr")}
)
#: Values near the valid ones: numbers of any size and sign, latin-1 (h11 hands obs-text
#: on as such), other digits, separators, scoped and mapped addresses, encodings.
_NEAR_VALUES = st.one_of(
    st.text(alphabet=st.characters(max_codepoint=0xFF), max_size=40),
    st.integers(min_value=-(2**80), max_value=2**80).map(str),
    st.sampled_from(
        [
            "", "0", "00", "1e3", "1_0", " 1", "1 ", "+1", "١٢", "9" * 19, "9" * 4300,
            "fe80::1%eth0", "fe80::1%\x80", "::ffff:1.2.3.4", "1.2.3.4", "::1", "0x1",
            "%", "%zz", "%C3%A9", "%ED%A0%80", "%C3", ",", "a,,b", "user%3Aalice",
            "contributor", "owner", "spectate", "interactive", "1",
        ]
    ),
)  # fmt: skip


@given(
    st.lists(st.tuples(st.sampled_from(_FORWARDED_NAMES), _NEAR_VALUES), max_size=4),
    st.sets(st.sampled_from(_FORWARDED_NAMES), max_size=2),
)
def test_parse_forwarded_headers_valid_request_with_values_replaced_raises_only_400(
    changes: list[tuple[str, str]], dropped: set[str]
) -> None:
    """A valid forwarded request with any of its values replaced (or added, or dropped)
    parses into a session that encodes back to the same values, or is refused 400: never
    another exception, whatever the value (huge, negative, non-ASCII). The arbitrary-input
    test above rarely gets past the required headers; this one reaches every value's parser.
    """
    pairs = dict(GOOD)
    for name, value in changes:
        pairs[name] = value
    for name in dropped:
        pairs.pop(name, None)
    try:
        fwd = parse_forwarded_headers(list(pairs.items()))
    except ForwardedRequestError as exc:
        status = exc.http_status
        assert status == 400
        return
    again = parse_forwarded_headers(headers_of(fwd))
    assert again == fwd
    if fwd.age_ms is not None:
        clocks = SessionClocks.from_elapsed_ms(1000.0, fwd.age_ms, fwd.idle_ms or 0)
        assert clocks.last_active >= clocks.started


def test_has_forwarded_headers_detects_any_case() -> None:
    """The owner refuses forwarded headers from a non-gateway; this finds them."""
    assert has_forwarded_headers([("Host", "x"), ("rElAyD-fOrWaRdEd-Role", "owner")])
    assert has_forwarded_headers({"relayd-forwarded-x": ""})
    assert not has_forwarded_headers(CLIENT_HEADERS)


@pytest.mark.parametrize(
    "change",
    [
        {"principal": ""},
        {"role": "admin"},
        {"mode": "write"},
        {"client_peer": "localhost"},
        {"client_peer": "::ffff:1.2.3.4"},
        {"session_id": ""},
        {"groups": ["a"]},
        {"amr": ("a", 1)},
        {"resume_from": -1},
        {"resume_from": True},
        {"resume_from": 2**63},
        {"age_ms": -1},
        {"age_ms": 1.5},
        {"idle_ms": True},
        {"idle_ms": 2**63},
        {"warned_ms": -1},
        {"warned_ms": False},
        {"expires": -1},
        {"expires": 2**63},
    ],
)
def test_forwarded_session_out_of_range_field_raises_value_error(change: dict[str, Any]) -> None:
    """The session checks its own fields, so the encoder only ever sends valid ones."""
    with pytest.raises(ValueError, match=next(iter(change)).split("_")[0]):
        ForwardedSession(**{**FWD.__dict__, **change})


def test_forwarded_session_canonical_ipv6_is_accepted() -> None:
    """IPv6 client addresses travel in their canonical form."""
    peer = str(ipaddress.ip_address("2001:db8:0:0::1"))
    assert ForwardedSession(**{**FWD.__dict__, "client_peer": peer}).client_peer == "2001:db8::1"


# -- the owner's answer ----------------------------------------------------------------------------

SWITCHING = (
    b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
    b"Sec-WebSocket-Accept: s3pPLMBiTxaQ9kYGzzhZRbK+xOo=\r\n"
    b"Sec-WebSocket-Protocol: relayd.console.v1\r\n\r\n"
)
BODY = b'{"error":"writer_exists","message":"deny"}\n'
CONFLICT = (
    b"HTTP/1.1 409 Conflict\r\nContent-Type: application/json\r\n"
    b"Content-Length: " + str(len(BODY)).encode() + b"\r\n\r\n" + BODY
)


@given(st.integers(0, len(SWITCHING) - 1))
def test_parse_response_head_incomplete_needs_more(cut: int) -> None:
    """Any proper prefix of a head is incomplete: None, no error."""
    assert parse_response_head(SWITCHING[:cut]) is None


def test_parse_response_head_101_has_no_body() -> None:
    """A 101 is the head only; what follows is the WebSocket stream."""
    frame = b"\x81\x05hello"
    assert parse_response_head(SWITCHING + frame) == ResponseHead(101, len(SWITCHING), 0)


def test_parse_response_head_409_counts_its_body() -> None:
    """A refusal's body length comes from its Content-Length."""
    head = parse_response_head(CONFLICT)
    assert head == ResponseHead(409, len(CONFLICT) - len(BODY), len(BODY))


@pytest.mark.parametrize(
    ("response", "message"),
    [
        (b"HTTP/1.0 200 OK\r\nContent-Length: 0\r\n\r\n", "not HTTP/1.1"),
        (b"SSH-2.0-OpenSSH\r\n\r\n", "not HTTP/1.1"),
        (b"HTTP/1.1 409 Conflict\r\n\r\n", "Content-Length"),
        (b"HTTP/1.1 409 X\r\nContent-Length: 1\r\nContent-Length: 1\r\n\r\n", "Content-Length"),
        (b"HTTP/1.1 409 X\r\nContent-Length: -1\r\n\r\n", "Content-Length"),
        (b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n", "Transfer-Encoding"),
        (b"HTTP/1.1 200 OK\r\nno colon here\r\n\r\n", "malformed header"),
        (
            b"HTTP/1.1 409 X\r\nContent-Length: %d\r\n\r\n" % (MAX_RESPONSE_BODY_BYTES + 1),
            str(MAX_RESPONSE_BODY_BYTES),
        ),
        (b"HTTP/1.1 101 \r\nX: " + b"a" * MAX_RESPONSE_HEAD_BYTES, str(MAX_RESPONSE_HEAD_BYTES)),
    ],
)
def test_parse_response_head_malformed_raises_peer_link_error(
    response: bytes, message: str
) -> None:
    """An answer outside the format is the owner's fault: PeerLinkError (503 to the client)."""
    with pytest.raises(PeerLinkError, match=message):
        parse_response_head(response)


@given(st.binary(max_size=300))
def test_parse_response_head_arbitrary_bytes_raise_only_peer_link_error(data: bytes) -> None:
    """Random bytes give None, a head inside the buffer, or PeerLinkError."""
    try:
        head = parse_response_head(data)
    except PeerLinkError:
        return
    assert head is None or head.length <= len(data)


@given(
    started=st.floats(-1e6, 1e6),
    since_start=st.floats(0, 1e6),
    idle_part=st.floats(0, 1),
    transit=st.floats(0, 10),
    there=st.floats(-1e6, 1e6),
)
def test_session_clocks_cross_machines_as_elapsed_time_and_never_gain_time(
    started: float, since_start: float, idle_part: float, transit: float, there: float
) -> None:
    """Clocks sent as elapsed milliseconds and taken on another host (another monotonic
    base, `there`) say the same age and idle time there, less the transit at most, and
    rounding never makes the session younger or less idle than it is."""
    last = started + since_start * (1 - idle_part)
    now = started + since_start
    age_ms, idle_ms = SessionClocks(started, last).elapsed_ms(now)
    assert age_ms >= idle_ms >= 0
    taken = SessionClocks.from_elapsed_ms(there + transit, age_ms, idle_ms)
    assert (there + transit) - taken.started >= now - started - 1e-6
    assert (there + transit) - taken.last_active >= now - last - 1e-6
    assert (there + transit) - taken.started <= now - started + 0.001 + 1e-6
