"""A fixed-size ring of console output addressed by absolute byte offsets.

Offset 0 is the first byte the VM ever printed (since the log began); the
ring holds the last `capacity` bytes, ``[start, end)``. Offsets never wrap,
so a client that remembers one can resume exactly, or learn precisely what
it missed. The buffer grows as output arrives, up to `capacity`, so a quiet
VM costs little memory. No I/O.
"""

from __future__ import annotations


class OutputRing:
    """The in-memory tail of one console's output."""

    def __init__(self, capacity: int, *, end: int = 0) -> None:
        if capacity <= 0:
            raise ValueError("capacity must be positive")
        self.capacity = capacity
        self._buf = bytearray()
        self._base = end  # offset stored at index 0; index of offset o is (o - base) % capacity
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
        if len(self._buf) < self.capacity:
            if self.end - self._base + n <= self.capacity:
                self._buf += data  # still growing: index == offset - base
                self.end += n
                self._filled = min(self.capacity, self._filled + n)
                return offset
            self._buf.extend(bytes(self.capacity - len(self._buf)))
        pos = (self.end - self._base) % self.capacity
        first = min(n, self.capacity - pos)
        view = memoryview(data)  # slices of a view are not copies
        self._buf[pos : pos + first] = view[:first]
        if first < n:
            self._buf[: n - first] = view[first:]
        self.end += n
        self._filled = min(self.capacity, self._filled + n)
        return offset

    def read(self, offset: int, max_bytes: int | None = None) -> bytes:
        """Bytes from `offset` (clamped to what is held) up to `end` or `max_bytes`."""
        offset = max(offset, self.start)
        stop = self.end if max_bytes is None else min(self.end, offset + max_bytes)
        if offset >= stop:
            return b""
        a, length = (offset - self._base) % self.capacity, stop - offset
        if a + length <= self.capacity:
            return bytes(self._buf[a : a + length])
        return bytes(self._buf[a:]) + bytes(self._buf[: length - (self.capacity - a)])

    def tail(self, max_bytes: int) -> tuple[int, bytes]:
        """The last `max_bytes` held (none for a negative count), with the offset of the first."""
        offset = max(self.start, self.end - max(0, max_bytes))
        return offset, self.read(offset)
