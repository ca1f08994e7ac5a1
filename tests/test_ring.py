"""Tests for relayd.ring: the output ring against a reference model of plain bytes."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from relayd.ring import OutputRing


class Model:
    """Everything ever appended, kept whole; the ring must behave like its last `capacity` bytes."""

    def __init__(self, capacity: int, end: int = 0) -> None:
        self.capacity = capacity
        self.base = end
        self.history = b""

    @property
    def end(self) -> int:
        return self.base + len(self.history)

    @property
    def start(self) -> int:
        return self.end - min(self.capacity, len(self.history))

    def append(self, data: bytes) -> int:
        offset = self.end
        self.history += data
        return offset

    def read(self, offset: int, max_bytes: int | None) -> bytes:
        first = max(offset, self.start)
        stop = self.end if max_bytes is None else min(self.end, first + max_bytes)
        return self.history[first - self.base : stop - self.base] if first < stop else b""

    def tail(self, n: int) -> tuple[int, bytes]:
        first = max(self.start, self.end - n)
        return first, self.history[first - self.base :]


def check_reads(ring: OutputRing, model: Model, data: st.DataObject) -> None:
    """start, end, a few reads and a tail agree with the model."""
    assert (ring.start, ring.end) == (model.start, model.end)
    assert ring.read(ring.start) == model.history[len(model.history) - (ring.end - ring.start) :]
    for _ in range(3):
        offset = data.draw(st.integers(model.base - 5, model.end + 5), label="offset")
        max_bytes = data.draw(st.none() | st.integers(0, model.capacity + 5), label="max_bytes")
        assert ring.read(offset, max_bytes) == model.read(offset, max_bytes)
    n = data.draw(st.integers(0, model.capacity + 5), label="tail")
    assert ring.tail(n) == model.tail(n)


@given(
    capacity=st.integers(1, 64),
    initial_end=st.sampled_from([0, 0, 7, 2**40]),
    seal=st.integers(1, 200),
    chunks=st.lists(st.binary(max_size=150), max_size=12),
    data=st.data(),
)
@settings(max_examples=300)
def test_ring_any_appends_match_bytes_model(
    capacity: int, initial_end: int, seal: int, chunks: list[bytes], data: st.DataObject
) -> None:
    """For any capacity, coalescing size and appends (some past capacity) it matches the model."""
    ring = OutputRing(capacity, end=initial_end, seal=seal)
    model = Model(capacity, initial_end)
    check_reads(ring, model, data)
    for chunk in chunks:
        assert ring.append(chunk) == model.append(chunk)
        check_reads(ring, model, data)


@given(capacity=st.integers(1, 32), chunks=st.lists(st.binary(max_size=80), max_size=10))
@settings(max_examples=100)
def test_ring_append_offsets_are_absolute_and_contiguous(
    capacity: int, chunks: list[bytes]
) -> None:
    """Each append returns the absolute offset of its first byte: the sum of earlier lengths."""
    ring = OutputRing(capacity)
    total = 0
    for chunk in chunks:
        assert ring.append(chunk) == total
        total += len(chunk)
        assert ring.end == total
        assert ring.end - ring.start == min(capacity, total)


def test_ring_zero_or_negative_capacity_raises_value_error() -> None:
    """A ring must hold at least one byte."""
    for capacity in (0, -1):
        with pytest.raises(ValueError, match="capacity"):
            OutputRing(capacity)


def test_ring_new_is_empty_at_given_end() -> None:
    """A ring resumed at an offset (from the on-disk log) holds nothing yet, at that offset."""
    ring = OutputRing(8, end=1000)
    assert (ring.start, ring.end) == (1000, 1000)
    assert ring.read(0) == b""
    assert ring.tail(8) == (1000, b"")
    assert ring.append(b"abc") == 1000
    assert ring.read(0) == b"abc"


def test_ring_append_larger_than_capacity_keeps_last_bytes() -> None:
    """An append bigger than the ring keeps its last `capacity` bytes at their true offsets."""
    ring = OutputRing(4)
    ring.append(b"xy")
    assert ring.append(b"0123456789") == 2
    assert (ring.start, ring.end) == (8, 12)
    assert ring.read(0) == b"6789"
    assert ring.read(10) == b"89"


def test_ring_wraparound_read_spans_the_seam() -> None:
    """A read that crosses the buffer's physical end returns contiguous bytes."""
    ring = OutputRing(5)
    ring.append(b"abcd")
    ring.append(b"efg")  # physical buffer now "fgcde"; logical [2, 7) = "cdefg"
    assert (ring.start, ring.end) == (2, 7)
    assert ring.read(2) == b"cdefg"
    assert ring.read(3, 3) == b"def"


def test_ring_read_before_start_is_clamped_to_start() -> None:
    """Asking for bytes that have left the ring returns from the oldest byte held."""
    ring = OutputRing(3)
    ring.append(b"abcdef")
    assert ring.read(0) == b"def"
    assert ring.read(0, 2) == b"de"


def test_ring_read_at_or_after_end_is_empty() -> None:
    """Nothing is returned at or beyond the end."""
    ring = OutputRing(3)
    ring.append(b"ab")
    assert ring.read(2) == b""
    assert ring.read(99) == b""
    assert ring.read(0, 0) == b""


def test_ring_tail_returns_offset_of_first_byte() -> None:
    """tail gives the last n bytes held and where they start, bounded by what is held."""
    ring = OutputRing(4)
    ring.append(b"abcdef")
    assert ring.tail(2) == (4, b"ef")
    assert ring.tail(4) == (2, b"cdef")
    assert ring.tail(100) == (2, b"cdef")
    assert ring.tail(0) == (6, b"")


def test_ring_keeps_large_chunks_by_reference_and_memory_bounded() -> None:
    """A flood's chunks are held, not copied; what is held stays near capacity."""
    ring = OutputRing(1000, seal=100)
    chunk = bytes(range(250)) * 2
    ring.append(chunk)
    assert ring._chunks[-1] is chunk
    for _ in range(50):
        ring.append(bytes(300))
        ring.append(b"k")  # typing in between: coalesced, not an object each
    held = sum(len(memoryview(c).obj) for c in ring._chunks) + len(ring._tail)  # type: ignore[arg-type]
    assert ring.end - ring.start == 1000
    assert held <= 1000 + 300


def test_ring_rejects_a_nonpositive_seal() -> None:
    with pytest.raises(ValueError, match="seal"):
        OutputRing(10, seal=0)


def test_pieces_join_to_read_and_never_pin_the_growing_tail() -> None:
    """A caller may keep `pieces` while more output arrives and old output is dropped."""
    ring = OutputRing(64, seal=16)
    for chunk in (b"a" * 20, b"bcd", b"efg"):
        ring.append(chunk)
    pieces = ring.pieces(ring.start)
    assert b"".join(pieces) == ring.read(ring.start) == b"a" * 20 + b"bcdefg"
    for _ in range(30):  # grows the tail, seals it, drops the front: no BufferError
        ring.append(b"xyz")
    assert b"".join(pieces) == b"a" * 20 + b"bcdefg"
