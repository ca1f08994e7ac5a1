"""Tests for relayd.control: strict decoding of client messages, compact encoding of server ones."""

from __future__ import annotations

import json
import string
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from relayd.control import (
    MAX_CLOSE_REASON_BYTES,
    MAX_CONTROL_BYTES,
    Break,
    ClientMessage,
    Nmi,
    Reset,
    Resize,
    Sysrq,
    close_reason,
    decode_client_message,
    encode_error,
    encode_hello,
    encode_notice,
)
from relayd.errors import BadMessageError, PeerError

SYSRQ_KEYS = string.digits + string.ascii_lowercase

json_scalars = st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=20)
json_values = st.recursive(
    json_scalars,
    lambda inner: (
        st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4)
    ),
    max_leaves=12,
)
field_names = st.sampled_from(["type", "key", "cols", "rows"]) | st.text(max_size=8)
type_values = st.sampled_from(["break", "nmi", "reset", "sysrq", "resize"]) | json_values

messages: st.SearchStrategy[ClientMessage] = st.one_of(
    st.just(Break()),
    st.just(Nmi()),
    st.just(Reset()),
    st.sampled_from(SYSRQ_KEYS).map(Sysrq),
    st.builds(Resize, cols=st.integers(1, 1000), rows=st.integers(1, 1000)),
)


def wire(message: ClientMessage) -> dict[str, Any]:
    """The JSON object a client sends for `message`, built independently of relayd."""
    if isinstance(message, Break):
        return {"type": "break"}
    if isinstance(message, Nmi):
        return {"type": "nmi"}
    if isinstance(message, Reset):
        return {"type": "reset"}
    if isinstance(message, Sysrq):
        return {"type": "sysrq", "key": message.key}
    return {"type": "resize", "cols": message.cols, "rows": message.rows}


def decode_or_bad(payload: str | bytes) -> ClientMessage | None:
    """Decode, turning the one allowed failure into None; anything else propagates."""
    try:
        return decode_client_message(payload)
    except BadMessageError:
        return None


# --- each message type -------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ('{"type":"break"}', Break()),
        ('{"type":"nmi"}', Nmi()),
        ('{"type":"reset"}', Reset()),
        ('{"type":"sysrq","key":"h"}', Sysrq("h")),
        ('{"type":"resize","cols":80,"rows":24}', Resize(80, 24)),
    ],
)
def test_decode_each_type_returns_its_message(text: str, expected: ClientMessage) -> None:
    """Every client message type of the contract decodes to its dataclass."""
    assert decode_client_message(text) == expected


def test_decode_bytes_payload_is_accepted() -> None:
    """A UTF-8 bytes payload decodes like the same text."""
    assert decode_client_message(b'{"type":"sysrq","key":"b"}') == Sysrq("b")


def test_decode_whitespace_and_key_order_do_not_matter() -> None:
    """Insignificant whitespace and field order are accepted."""
    text = '  {\n "rows" : 50 ,\t"type":"resize", "cols":132 }\n'
    assert decode_client_message(text) == Resize(132, 50)


@pytest.mark.parametrize(
    "text",
    [
        "",
        "not json",
        "{",
        '{"type":"break"',
        "[1, 2]",
        '"break"',
        "42",
        "null",
        "true",
        "[" * 2000 + "]" * 2000,  # deeper than the recursion limit, within the size limit
        '{"a":' * 650 + "1" + "}" * 650,
        b"\xff\xfe\x00garbage",
        b'{"type":"break"}\xff',
    ],
)
def test_decode_non_object_or_invalid_json_raises_bad_message(text: str | bytes) -> None:
    """Anything that is not one JSON object is a BadMessageError, even deeply nested input."""
    with pytest.raises(BadMessageError):
        decode_client_message(text)


@pytest.mark.parametrize(
    "obj",
    [
        {},
        {"type": None},
        {"type": "BREAK"},
        {"type": "hello"},
        {"type": "notice"},
        {"type": 1},
        {"type": ["break"]},
        {"kind": "break"},
    ],
)
def test_decode_unknown_or_missing_type_raises_bad_message(obj: dict[str, Any]) -> None:
    """Types outside the contract, and a missing type, are refused."""
    with pytest.raises(BadMessageError, match="unknown control message type"):
        decode_client_message(json.dumps(obj))


def test_decode_unknown_type_message_is_truncated() -> None:
    """A long unknown type is not echoed back in full."""
    with pytest.raises(BadMessageError) as info:
        decode_client_message(json.dumps({"type": "x" * 1000}))
    assert "x" * 33 not in str(info.value)


def test_bad_message_error_carries_wire_code() -> None:
    """BadMessageError is a PeerError whose code is `bad_message`."""
    with pytest.raises(BadMessageError) as info:
        decode_client_message("{}")
    assert isinstance(info.value, PeerError)
    assert info.value.code == "bad_message"


# --- extra fields ---------------------------------------------------------------


@pytest.mark.parametrize(
    ("obj", "extra"),
    [
        ({"type": "break", "key": "h"}, "key"),
        ({"type": "nmi", "force": True}, "force"),
        ({"type": "reset", "cols": 1}, "cols"),
        ({"type": "sysrq", "key": "h", "repeat": 2}, "repeat"),
        ({"type": "resize", "cols": 80, "rows": 24, "xpixels": 640}, "xpixels"),
    ],
)
def test_decode_extra_field_raises_bad_message(obj: dict[str, Any], extra: str) -> None:
    """A field the type does not define is refused, naming the field."""
    with pytest.raises(BadMessageError, match=f"unexpected field '{extra}'"):
        decode_client_message(json.dumps(obj))


@given(message=messages, name=st.text(min_size=1, max_size=10), value=json_values)
@settings(max_examples=100)
def test_decode_valid_message_plus_any_extra_field_raises_bad_message(
    message: ClientMessage, name: str, value: object
) -> None:
    """Adding any field outside the type's own to a valid message gets it refused."""
    obj = wire(message)
    if name in obj:
        return
    obj[name] = value
    with pytest.raises(BadMessageError):
        decode_client_message(json.dumps(obj))


# --- sysrq keys -------------------------------------------------------------------


@pytest.mark.parametrize("key", list(SYSRQ_KEYS))
def test_decode_sysrq_each_valid_key_is_accepted(key: str) -> None:
    """Every digit and lowercase letter is a SysRq key."""
    assert decode_client_message(json.dumps({"type": "sysrq", "key": key})) == Sysrq(key)


@pytest.mark.parametrize(
    "key", ["", "H", "hh", "ab", " ", "!", "\n", "é", "٣", 1, 0, None, True, ["h"], {"k": "h"}]
)
def test_decode_sysrq_invalid_key_raises_bad_message(key: object) -> None:
    """Uppercase, multi-character, empty, non-ASCII and non-string keys are refused."""
    with pytest.raises(BadMessageError, match="sysrq key"):
        decode_client_message(json.dumps({"type": "sysrq", "key": key}))


def test_decode_sysrq_missing_key_raises_bad_message() -> None:
    """A sysrq without a key is refused."""
    with pytest.raises(BadMessageError, match="sysrq key"):
        decode_client_message('{"type":"sysrq"}')


@given(key=st.text(max_size=3))
@settings(max_examples=100)
def test_decode_sysrq_any_string_key_accepted_only_if_valid(key: str) -> None:
    """A string key is accepted exactly when it is one character of 0-9 or a-z."""
    result = decode_or_bad(json.dumps({"type": "sysrq", "key": key}))
    if len(key) == 1 and key in SYSRQ_KEYS:
        assert result == Sysrq(key)
    else:
        assert result is None


# --- resize bounds ---------------------------------------------------------------


@pytest.mark.parametrize(("cols", "rows"), [(1, 1), (1000, 1000), (1, 1000), (1000, 1), (80, 24)])
def test_decode_resize_within_bounds_is_accepted(cols: int, rows: int) -> None:
    """Sizes from 1 to 1000 inclusive are accepted."""
    text = json.dumps({"type": "resize", "cols": cols, "rows": rows})
    assert decode_client_message(text) == Resize(cols, rows)


@pytest.mark.parametrize("bad", [0, -1, 1001, 2**63, 80.0, 80.5, "80", True, False, None, [80]])
@pytest.mark.parametrize("field", ["cols", "rows"])
def test_decode_resize_out_of_bounds_or_non_integer_raises_bad_message(
    field: str, bad: object
) -> None:
    """Zero, negative, above 1000, floats, strings, booleans and null are refused."""
    obj: dict[str, object] = {"type": "resize", "cols": 80, "rows": 24, field: bad}
    with pytest.raises(BadMessageError, match=f"{field} must be an integer from 1 to 1000"):
        decode_client_message(json.dumps(obj))


@pytest.mark.parametrize("missing", ["cols", "rows"])
def test_decode_resize_missing_dimension_raises_bad_message(missing: str) -> None:
    """A resize without cols or rows is refused."""
    obj = {"type": "resize", "cols": 80, "rows": 24}
    del obj[missing]
    with pytest.raises(BadMessageError, match=missing):
        decode_client_message(json.dumps(obj))


@given(cols=st.integers(-(2**70), 2**70), rows=st.integers(-(2**70), 2**70))
@settings(max_examples=100)
def test_decode_resize_any_integers_accepted_only_within_bounds(cols: int, rows: int) -> None:
    """Any integer pair is accepted exactly when both are within 1..1000."""
    result = decode_or_bad(json.dumps({"type": "resize", "cols": cols, "rows": rows}))
    if 1 <= cols <= 1000 and 1 <= rows <= 1000:
        assert result == Resize(cols, rows)
    else:
        assert result is None


# --- size limit -------------------------------------------------------------------


def test_decode_message_at_limit_is_accepted() -> None:
    """A valid message of exactly MAX_CONTROL_BYTES is accepted."""
    text = '{"type":"break"}'
    text = text[:-1] + " " * (MAX_CONTROL_BYTES - len(text)) + "}"
    assert len(text) == MAX_CONTROL_BYTES
    assert decode_client_message(text) == Break()


@pytest.mark.parametrize("as_bytes", [False, True])
def test_decode_message_over_limit_raises_bad_message(as_bytes: bool) -> None:
    """A valid message one byte over MAX_CONTROL_BYTES is refused before parsing."""
    text = '{"type":"break"}'
    text = text[:-1] + " " * (MAX_CONTROL_BYTES + 1 - len(text)) + "}"
    payload: str | bytes = text.encode() if as_bytes else text
    with pytest.raises(BadMessageError, match=f"exceeds {MAX_CONTROL_BYTES}"):
        decode_client_message(payload)


def test_decode_huge_message_raises_bad_message() -> None:
    """A megabyte of input is refused by size, not parsed."""
    with pytest.raises(BadMessageError, match="exceeds"):
        decode_client_message("[" * 2**20)


def test_decode_message_over_limit_in_utf8_bytes_raises_bad_message() -> None:
    """A valid str message under the limit in characters but over it in UTF-8 bytes is refused."""
    filler = "é" * 2100  # 2100 characters, 4200 bytes; duplicate keys: the last one wins
    text = json.dumps({"type": "sysrq", "key": filler}, ensure_ascii=False)
    text = text[:-1] + ',"key":"h"}'
    assert len(text) <= MAX_CONTROL_BYTES < len(text.encode())
    with pytest.raises(BadMessageError):
        decode_client_message(text)


def test_decode_non_ascii_message_under_limit_is_accepted() -> None:
    """Multi-byte text under the byte limit is parsed normally (here: a duplicate key)."""
    text = json.dumps({"type": "sysrq", "key": "é" * 1000}, ensure_ascii=False)
    text = text[:-1] + ',"key":"h"}'
    assert len(text.encode()) < MAX_CONTROL_BYTES
    assert decode_client_message(text) == Sysrq("h")


def test_decode_lone_surrogate_raises_bad_message() -> None:
    """A str holding a lone surrogate (not encodable as UTF-8) is refused, not a crash."""
    with pytest.raises(BadMessageError):
        decode_client_message('{"type":"sysrq","key":"\ud800"}')
    with pytest.raises(BadMessageError):
        decode_client_message("\ud800")


# --- robustness -------------------------------------------------------------------


@given(text=st.text(max_size=300))
@settings(max_examples=200)
def test_decode_arbitrary_text_raises_only_bad_message(text: str) -> None:
    """Any text either decodes or raises BadMessageError, never anything else."""
    decode_or_bad(text)


@given(data=st.binary(max_size=300))
@settings(max_examples=200)
def test_decode_arbitrary_bytes_raises_only_bad_message(data: bytes) -> None:
    """Any bytes either decode or raise BadMessageError, never anything else."""
    decode_or_bad(data)


@given(obj=st.dictionaries(field_names, json_values, max_size=5), kind=type_values)
@settings(max_examples=200)
def test_decode_arbitrary_json_object_raises_only_bad_message(
    obj: dict[str, Any], kind: object
) -> None:
    """Any JSON object, with a plausible or arbitrary type, decodes or raises BadMessageError."""
    obj = {**obj, "type": kind}
    result = decode_or_bad(json.dumps(obj))
    if result is not None:
        assert wire(result) == obj


@given(value=json_values)
@settings(max_examples=100)
def test_decode_arbitrary_json_value_raises_only_bad_message(value: object) -> None:
    """Any JSON value (including non-objects) decodes or raises BadMessageError."""
    decode_or_bad(json.dumps(value))


# --- round trip -------------------------------------------------------------------


@given(message=messages, indent=st.none() | st.integers(0, 4), sort_keys=st.booleans())
@settings(max_examples=100)
def test_decode_valid_message_round_trips(
    message: ClientMessage, indent: int | None, sort_keys: bool
) -> None:
    """Each valid message, serialised in any JSON layout, decodes back to itself."""
    text = json.dumps(wire(message), indent=indent, sort_keys=sort_keys)
    assert decode_client_message(text) == message
    assert decode_client_message(text.encode()) == message


# --- encoding ---------------------------------------------------------------------


def assert_compact(text: str) -> dict[str, Any]:
    """`text` is one compact JSON object; returns it decoded."""
    obj = json.loads(text)
    assert isinstance(obj, dict)
    assert text == json.dumps(obj, separators=(",", ":"), ensure_ascii=False)
    assert "\n" not in text
    return obj


def test_encode_hello_is_compact_json_with_type() -> None:
    """hello carries every contract field, compact, with type first."""
    limits = {"max_paste_bytes": 65536, "idle_timeout": 1800.0}
    text = encode_hello(
        vm="vm-alpha", session="s1", role="writer", offset=1234, replay=100, limits=limits
    )
    obj = assert_compact(text)
    assert obj == {
        "type": "hello",
        "vm": "vm-alpha",
        "session": "s1",
        "role": "writer",
        "offset": 1234,
        "replay": 100,
        "limits": limits,
    }
    assert text.startswith('{"type":"hello",')


def test_encode_hello_extra_fields_are_included() -> None:
    """Extra keyword fields (e.g. previous_logged_in) appear in hello."""
    text = encode_hello(
        vm="v",
        session="s",
        role="spectator",
        offset=0,
        replay=0,
        limits={},
        previous_logged_in=True,
    )
    assert assert_compact(text)["previous_logged_in"] is True


@pytest.mark.parametrize(
    ("event", "fields"),
    [
        ("port_down", {}),
        ("port_up", {}),
        ("writer_changed", {"writer": "user:bob"}),
        ("demoted", {"by": "user:bob"}),
        ("output_gap", {"first": 10, "last": 99}),
        ("idle_warning", {"seconds": 60}),
    ],
)
def test_encode_notice_is_compact_json_with_type_and_event(
    event: str, fields: dict[str, Any]
) -> None:
    """notice carries type, event and its fields, compactly."""
    text = encode_notice(event, **fields)
    assert assert_compact(text) == {"type": "notice", "event": event, **fields}
    assert text.startswith('{"type":"notice",')


@pytest.mark.parametrize(
    "code",
    ["read_only", "paste_too_long", "rate_limited", "unsupported", "forbidden", "bad_message"],
)
def test_encode_error_is_compact_json_with_type_code_message(code: str) -> None:
    """error carries type, code and message, compactly."""
    text = encode_error(code, "paste of 70000 bytes exceeds max_paste_bytes 65536", limit=65536)
    assert assert_compact(text) == {
        "type": "error",
        "code": code,
        "message": "paste of 70000 bytes exceeds max_paste_bytes 65536",
        "limit": 65536,
    }
    assert text.startswith('{"type":"error",')


def test_encode_non_ascii_text_is_kept_verbatim() -> None:
    """Non-ASCII text is emitted as UTF-8 characters, not \\u escapes."""
    text = encode_notice("writer_changed", writer="user:zoë")
    assert "zoë" in text
    assert "\\u" not in text


@given(event=st.text(max_size=20), value=json_values)
@settings(max_examples=100)
def test_encode_notice_any_fields_round_trip(event: str, value: object) -> None:
    """Any JSON-able field value survives encode_notice and json.loads."""
    obj = json.loads(encode_notice(event, detail=value))
    assert obj["type"] == "notice"
    assert obj["event"] == event
    # NaN is not equal to itself; compare through a second encoding instead.
    assert json.dumps(obj["detail"]) == json.dumps(value)


@given(st.text())
def test_close_reason_is_the_longest_prefix_that_fits_in_123_utf8_bytes(text: str) -> None:
    """Any text, surrogates included: valid UTF-8, at most 123 bytes, cut at a character."""
    reason = close_reason(text)
    data = reason.encode("utf-8")  # strict: the result is always encodable
    assert len(data) <= MAX_CLOSE_REASON_BYTES
    clean = text.encode("utf-8", "replace").decode("utf-8")
    assert clean.startswith(reason)
    rest = clean[len(reason) :]
    assert not rest or len(data) + len(rest[0].encode()) > MAX_CLOSE_REASON_BYTES


def test_close_reason_of_forty_wide_characters_keeps_whole_characters() -> None:
    """The name from the review: 40 "界", 3 bytes each, after a 19-byte prefix."""
    reason = close_reason("taken over by user:" + "界" * 40)
    assert reason == "taken over by user:" + "界" * 34
    assert len(reason.encode()) == 121
