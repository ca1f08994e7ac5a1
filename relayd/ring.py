"""A fixed-size ring of console output addressed by absolute byte offsets.

Offset 0 is the first byte the VM ever printed (since the log began); the
ring holds the last `capacity` bytes, ``[start, end)``. Offsets never wrap,
so a client that remembers one can resume exactly, or learn precisely what
it missed. No I/O.
"""

from __future__ import annotations


class OutputRing:
    """The in-memory tail of one console's output."""

    def __init__(self, capacity: int, *, end: int = 0) -> None:
        if capacity <= 0:
            raise ValueError("capacity must be positive")
        self.capacity = capacity
        self._buf = bytearray(capacity)
        self.end = end
        self._filled = 0

    @property
    def start(self) -> int:
        """Offset of the oldest byte still held."""
        return self.end - self._filled

    def append(self, data: bytes) -> int:
        """Record output; returns the absolute offset of its first byte."""
        offset = self.end
        n = len(data)
        if n > self.capacity:
            data = data[n - self.capacity :]
            self.end += n - self.capacity
            n = self.capacity
        pos = self.end % self.capacity
        first = min(n, self.capacity - pos)
        self._buf[pos : pos + first] = data[:first]
        if first < n:
            self._buf[: n - first] = data[first:]
        self.end += n
        self._filled = min(self.capacity, self._filled + n)
        return offset

    def read(self, offset: int, max_bytes: int | None = None) -> bytes:
        """Bytes from `offset` (clamped to what is held) up to `end` or `max_bytes`."""
        offset = max(offset, self.start)
        stop = self.end if max_bytes is None else min(self.end, offset + max_bytes)
        if offset >= stop:
            return b""
        a, length = offset % self.capacity, stop - offset
        if a + length <= self.capacity:
            return bytes(self._buf[a : a + length])
        return bytes(self._buf[a:]) + bytes(self._buf[: length - (self.capacity - a)])

    def tail(self, max_bytes: int) -> tuple[int, bytes]:
        """The last `max_bytes` held, with the offset of the first of them."""
        offset = max(self.start, self.end - max_bytes)
        return offset, self.read(offset)
