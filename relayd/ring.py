"""The in-memory tail of console output, addressed by absolute byte offsets.

Offset 0 is the first byte the VM ever printed (since the log began); the
ring holds the last `capacity` bytes, ``[start, end)``. Offsets never wrap,
so a client that remembers one can resume exactly, or learn precisely what
it missed. No I/O.

The bytes are kept as the chunks the port delivered, by reference: a flood
is not copied into a buffer (that copy was 15 % of the relay's CPU with 50
consoles flooding). Small chunks (typing, short lines) are coalesced into
one growing tail until it reaches `seal` bytes, so a console typed into for
hours does not cost an object per key. Memory is `capacity` plus, at most,
the part of one chunk that has been dropped but shares its object with the
part still held.
"""

from __future__ import annotations

from collections import deque

SEAL_BYTES = 4096


class OutputRing:
    """The in-memory tail of one console's output."""

    def __init__(self, capacity: int, *, end: int = 0, seal: int = SEAL_BYTES) -> None:
        if capacity <= 0:
            raise ValueError("capacity must be positive")
        if seal <= 0:
            raise ValueError("seal must be positive")
        self.capacity = capacity
        self.end = end
        self._seal = seal
        self._chunks: deque[bytes | memoryview] = deque()  # oldest first, then _tail
        self._tail = bytearray()
        self._held = 0

    @property
    def start(self) -> int:
        """Offset of the oldest byte still held."""
        return self.end - self._held

    def append(self, data: bytes) -> int:
        """Record output; returns the absolute offset of its first byte."""
        offset = self.end
        n = len(data)
        if n >= self._seal:
            if self._tail:
                self._chunks.append(bytes(self._tail))
                self._tail = bytearray()
            self._chunks.append(data if isinstance(data, bytes) else bytes(data))
        elif n:
            self._tail += data
            if len(self._tail) >= self._seal:
                self._chunks.append(bytes(self._tail))
                self._tail = bytearray()
        self.end += n
        self._held += n
        if self._held > self.capacity:
            self._drop(self._held - self.capacity)
        return offset

    def _drop(self, n: int) -> None:
        """Forget the oldest `n` bytes (views, not copies, of a chunk cut in two)."""
        self._held -= n
        chunks = self._chunks
        while n and chunks:
            first = chunks[0]
            if len(first) <= n:
                chunks.popleft()
                n -= len(first)
            else:
                chunks[0] = memoryview(first)[n:]
                return
        if n:
            del self._tail[:n]

    def read(self, offset: int, max_bytes: int | None = None) -> bytes:
        """Bytes from `offset` (clamped to what is held) up to `end` or `max_bytes`."""
        return b"".join(self.pieces(offset, max_bytes))

    def pieces(self, offset: int, max_bytes: int | None = None) -> list[bytes | memoryview]:
        """What `read` returns, as views of the held chunks: joined once, by whoever frames them.

        The growing tail is copied, not viewed (at most `seal` bytes): a view would
        stop it from growing for as long as the caller kept it.
        """
        offset = max(offset, self.start)
        stop = self.end if max_bytes is None else min(self.end, offset + max_bytes)
        if offset >= stop:
            return []
        parts: list[bytes | memoryview] = []
        at = self.start  # offset of the piece being looked at
        for piece in (*self._chunks, self._tail):
            size = len(piece)
            if at + size > offset:
                lo, hi = max(offset - at, 0), min(stop - at, size)
                view = memoryview(piece)[lo:hi]
                parts.append(view if piece is not self._tail else bytes(view))
                if at + size >= stop:
                    break
            at += size
        return parts

    def tail(self, max_bytes: int) -> tuple[int, bytes]:
        """The last `max_bytes` held (none for a negative count), with the offset of the first."""
        offset = max(self.start, self.end - max(0, max_bytes))
        return offset, self.read(offset)
