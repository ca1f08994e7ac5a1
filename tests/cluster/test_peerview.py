"""The cut-off gateway's question to its peers and their answer (cluster/peerview.py): pure
encoding and strict parsing, fuzzed."""

from __future__ import annotations

import json

import pytest
from hypothesis import given
from hypothesis import strategies as st

from relayd.cluster.forwarding import MAX_RESPONSE_BODY_BYTES
from relayd.cluster.peerview import (
    MAX_QUESTION_BYTES,
    PeerView,
    encode_answer,
    encode_question,
    parse_answer,
    parse_question,
    questions,
)

VM_IDS = st.from_regex(r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}", fullmatch=True)
GATEWAYS = st.from_regex(r"[a-z0-9][a-z0-9-]{0,62}", fullmatch=True)


@given(st.lists(VM_IDS, max_size=3000))
def test_questions_fit_and_keep_every_vm_in_order(vms: list[str]) -> None:
    """Any number of VMs is asked in questions under the cap, none lost or repeated."""
    groups = questions(vms)
    assert [vm for group in groups for vm in group] == vms
    for group in groups:
        request = encode_question("10.0.0.6", group)
        body = request.partition(b"\r\n\r\n")[2]
        assert len(body) <= MAX_QUESTION_BYTES
        assert parse_question(body) == group


@given(st.lists(VM_IDS, max_size=3000), GATEWAYS)
def test_the_answer_to_a_full_question_fits_the_peer_links_cap(
    vms: list[str], gateway: str
) -> None:
    """Even with the longest gateway ids, an answer stays within what a peer link reads."""
    for group in questions(vms):
        owners = {vm: (gateway, "[2001:db8::1]:8443") for vm in group}
        answer = encode_answer(gateway, 0.5, {gateway: "[2001:db8::1]:8443"}, owners, group)
        assert len(json.dumps(answer).encode()) <= MAX_RESPONSE_BODY_BYTES


@given(
    GATEWAYS,
    st.none() | st.floats(min_value=0, max_value=1e6),
    st.dictionaries(GATEWAYS, st.text(max_size=30), max_size=5),
    st.dictionaries(VM_IDS, st.none() | GATEWAYS, max_size=20),
)
def test_answer_round_trip(
    gateway: str, seen_ago: float | None, live: dict[str, str], named: dict[str, str | None]
) -> None:
    """What one gateway encodes, the other parses back (ages to the millisecond)."""
    owners = {vm: (gw, live.get(gw, "x:1")) if gw else None for vm, gw in named.items()}
    body = json.dumps(encode_answer(gateway, seen_ago, live, owners, named)).encode()
    view = parse_answer(body)
    assert view == PeerView(gateway, None if seen_ago is None else round(seen_ago, 3), live, named)


@given(st.binary(max_size=200) | st.text(max_size=200).map(str.encode))
def test_parse_answer_rejects_or_returns_a_view(body: bytes) -> None:
    """Garbage never raises anything but ValueError."""
    try:
        view = parse_answer(body)
    except ValueError:
        return
    assert isinstance(view, PeerView)


@pytest.mark.parametrize(
    "body",
    [
        b"",
        b"[]",
        b'{"gateway": "gw-2"}',
        b'{"gateway": 1, "seen_ago": 0, "live": {}, "owners": {}}',
        b'{"gateway": "g", "seen_ago": -1, "live": {}, "owners": {}}',
        b'{"gateway": "g", "seen_ago": true, "live": {}, "owners": {}}',
        b'{"gateway": "g", "seen_ago": NaN, "live": {}, "owners": {}}',
        b'{"gateway": "g", "seen_ago": 1, "live": [], "owners": {}}',
        b'{"gateway": "g", "seen_ago": 1, "live": {}, "owners": {"vm": 3}}',
        b'{"gateway": "g", "seen_ago": 1, "live": {}, "owners": {}, "more": 1}',
    ],
)
def test_parse_answer_refuses_what_a_gateway_never_sends(body: bytes) -> None:
    """Wrong fields, types, a negative, boolean or non-finite age: ValueError."""
    with pytest.raises(ValueError, match=r"answer|must"):
        parse_answer(body)


@pytest.mark.parametrize(
    "body",
    [b"", b"{", b'{"vms": "vm-a"}', b'{"vms": [1]}', b'{"vms": [], "x": 1}', b"[[[["],
)
def test_parse_question_refuses_malformed_questions(body: bytes) -> None:
    """Not {"vms": [str, ...]}: ValueError (the route answers 400)."""
    with pytest.raises(ValueError, match=r"question|must"):
        parse_question(body)


def test_parse_question_refuses_an_oversized_question() -> None:
    """A question over the cap is refused before it is parsed."""
    with pytest.raises(ValueError, match="exceeds"):
        parse_question(json.dumps({"vms": ["v" * 100] * 200}).encode())


_JSON = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=20),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=6), inner),
    max_leaves=12,
)


@given(
    st.binary(max_size=300)
    | _JSON.map(lambda v: json.dumps(v).encode())
    | _JSON.map(lambda v: json.dumps({"vms": v}).encode())
    | st.integers(min_value=1, max_value=200_000).map(lambda n: b'{"vms": ' + b"[" * n)
)
def test_parse_question_any_body_is_a_question_or_value_error(body: bytes) -> None:
    """Whatever a peer link's body holds, the question is a list of strings whose answer
    encodes, or a ValueError (the route's 400): never another exception (a 500)."""
    try:
        vms = parse_question(body)
    except ValueError:
        return
    assert all(isinstance(vm, str) for vm in vms)
    json.dumps(encode_answer("gw-1", 0.1, {"gw-1": "10.0.0.5:8443"}, {}, vms))
