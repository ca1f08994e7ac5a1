"""The hand-built output frame is exactly what websockets would have sent."""

from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st
from websockets.frames import Frame, Opcode

from relayd.hub import binary_frame


@given(st.binary(max_size=300))
def test_matches_websockets_for_short_and_medium_payloads(data: bytes) -> None:
    assert binary_frame(data) == Frame(Opcode.BINARY, data).serialize(mask=False)


def test_matches_websockets_at_every_length_boundary() -> None:
    for n in (0, 125, 126, 127, 65535, 65536, 70000):
        data = bytes(range(256)) * (n // 256) + bytes(range(n % 256))
        assert binary_frame(data) == Frame(Opcode.BINARY, data).serialize(mask=False)
