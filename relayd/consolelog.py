"""The per-VM console log on disk ("boot diagnostics"), circular, by absolute offset.

It is the durable twin of `relayd.ring.OutputRing`: offset 0 is the first byte
the VM ever printed, offsets never wrap, and they survive daemon restarts, so a
client that remembers one can resume after a restart. It holds only what the
VM printed, never client input.

Layout: one directory per VM holding up to ``segments`` (N) files named by the
absolute offset of their first byte (``00000000000000001234.seg``: 20 decimal
digits, so name order is offset order and the name alone fixes where an empty
segment starts). A segment is a run of records, each a 20-byte header::

    magic "RCL1" | offset u64 | length u32 | crc32 u32      (little-endian)

followed by ``length`` bytes of output. The CRC covers the first 16 header
bytes and the data, so a flipped offset or length is caught like flipped data.
Records are contiguous in offsets within a segment and across segments.

Capacity: a segment takes at most ``capacity // N`` data bytes (a flush that
crosses the limit is split between two records); a new segment is started when
the current one is full, and the oldest is deleted when more than N exist. The
log therefore holds between ``(N - 1) * (capacity // N)`` and ``capacity``
bytes of output once that much was written (``start`` never goes below
``end - capacity``). Headers come on top: 20 bytes a record.

Durability: appends are buffered and written with one ``pwritev`` per record
when ``flush_bytes`` are buffered or when the owner calls `flush`; nothing is
fsynced until `close`. With ``flush_bytes=None`` only `flush` writes: the hub
flushes on a timer (within a second), so during a flood the buffer keeps just the newest
``capacity`` bytes between flushes and the disk sees at most ``capacity`` bytes
per flush instead of every byte that would be rotated out at once. A ``kill -9`` keeps every
written record (the page cache survives the process) and loses at most the
unflushed buffer; a record torn by the kill is found by its CRC at the next
`open` and cut off. A power loss may also lose what the kernel had not yet
written back; the same checks keep what survives consistent. Lost bytes are
never served: their offsets are reused by the output that follows the
restart, so a client that saw them before the crash gets newer output at
those offsets (at most ``flush_bytes - 1`` bytes when the owner appends before
fanning out, plus what a timer flush had not yet written).

Recovery (`open`) checks every record: a bad record in the newest segment is
truncated away with everything after it; a bad record in an older segment, or
a gap between segments, drops that segment and all older ones (``start`` moves
forward). Both are logged as ``console_log_repaired`` with byte counts.

Everything here is blocking file I/O done in the caller's thread: the hub calls
it from the event loop, where writes land in the page cache and are small. It
is not thread-safe; a second process opening the same directory is refused
(``flock``).
"""

from __future__ import annotations

import bisect
import fcntl
import os
import re
import struct
import zlib
from array import array
from collections import deque
from dataclasses import dataclass, field
from pathlib import Path

from .errors import ConsoleLogError
from .log import get_logger

log = get_logger(__name__)

MIN_CAPACITY = 4096
_MAGIC = b"RCL1"
_HEADER = struct.Struct("<4sQII")  # magic, offset, length, crc32(header[:16] + data)
_CRC_PREFIX = struct.Struct("<4sQI")
_MAX_RECORD = 1 << 30  # far below the u32 length field
_INDEX_SPACING = 4096  # data bytes between index entries: tiny timer flushes share one
_READ_AHEAD = 65536
_SEGMENT_NAME = re.compile(r"(\d{20})\.seg")


def _crc(offset: int, data: bytes | memoryview) -> int:
    return zlib.crc32(data, zlib.crc32(_CRC_PREFIX.pack(_MAGIC, offset, len(data))))


def _crc_parts(offset: int, parts: list[memoryview]) -> int:
    crc = zlib.crc32(_CRC_PREFIX.pack(_MAGIC, offset, sum(len(p) for p in parts)))
    for part in parts:
        crc = zlib.crc32(part, crc)
    return crc


class _Pending:
    """Appended bytes not yet written, as a queue of chunks.

    Appending and dropping from the front are O(chunk), not O(buffer): a
    bytearray that is trimmed at the front and grown at the back moves all of
    its bytes on every append, which made a flood cost more here than relaying.
    """

    def __init__(self) -> None:
        self._chunks: deque[bytes | memoryview] = deque()
        self.size = 0

    def __len__(self) -> int:
        return self.size

    def append(self, data: bytes) -> None:
        if data:
            self._chunks.append(data if isinstance(data, bytes) else bytes(data))
            self.size += len(data)

    def drop_front(self, n: int) -> None:
        while n > 0:
            first = self._chunks[0]
            if len(first) <= n:
                self._chunks.popleft()
                self.size -= len(first)
                n -= len(first)
            else:
                self._chunks[0] = memoryview(first)[n:]
                self.size -= n
                n = 0

    def head(self, n: int) -> list[memoryview]:
        """Views of the first `n` bytes."""
        parts: list[memoryview] = []
        for chunk in self._chunks:
            if n <= 0:
                break
            parts.append(memoryview(chunk)[:n])
            n -= len(parts[-1])
        return parts

    def slice(self, lo: int, hi: int) -> bytes:
        """Bytes [lo, hi) of the pending data."""
        out = bytearray()
        pos = 0
        for chunk in self._chunks:
            end = pos + len(chunk)
            if end > lo and pos < hi:
                out += chunk[max(lo - pos, 0) : min(hi, end) - pos]
            if end >= hi:
                break
            pos = end
        return bytes(out)

    def clear(self) -> None:
        self._chunks.clear()
        self.size = 0


@dataclass(eq=False)
class _Segment:
    """One segment file: where it starts, how far its valid records reach, a sparse index."""

    path: Path
    fd: int
    start: int
    end: int = field(init=False)
    size: int = 0  # file bytes of valid records; anything past it is a torn write
    offsets: array[int] = field(default_factory=lambda: array("Q"))
    positions: array[int] = field(default_factory=lambda: array("Q"))
    dirty: bool = False

    def __post_init__(self) -> None:
        self.end = self.start

    @property
    def data_bytes(self) -> int:
        return self.end - self.start

    def add_record(self, length: int) -> None:
        """Account for a record of `length` data bytes written at the current size."""
        if not self.offsets or self.end - self.offsets[-1] >= _INDEX_SPACING:
            self.offsets.append(self.end)
            self.positions.append(self.size)
        self.end += length
        self.size += _HEADER.size + length


class ConsoleLog:
    """One VM's console output on disk, addressed by absolute offsets.

    Args:
        directory: the VM's own directory (``state_dir/consolelog/<vm>``), created 0700.
        capacity: data bytes held at most (``console_log_bytes``), at least 4096.
        segments: files the capacity is split into; the oldest is deleted whole.
        flush_bytes: buffered bytes that make `append` write by itself; None: only
            `flush` writes (the owner flushes on a timer).

    Raises:
        ValueError: an argument is out of range.
    """

    def __init__(
        self,
        directory: Path,
        capacity: int,
        *,
        segments: int = 4,
        flush_bytes: int | None = 4096,
    ) -> None:
        if capacity < MIN_CAPACITY:
            raise ValueError(f"capacity {capacity} is below the minimum {MIN_CAPACITY}")
        if not 2 <= segments <= capacity:
            raise ValueError(f"segments {segments} must be between 2 and capacity {capacity}")
        if flush_bytes is not None and flush_bytes < 1:
            raise ValueError(f"flush_bytes {flush_bytes} must be positive")
        self.directory = directory
        self.capacity = capacity
        self.segments = segments
        self.flush_bytes = flush_bytes
        self._segment_bytes = capacity // segments
        self._held_max = self._segment_bytes * segments
        self._segments: list[_Segment] = []
        self._dir_fd: int | None = None
        self._buf = _Pending()
        self._buf_start = 0  # offset of _buf[0]; past _flushed_end only after a huge append
        self._flushed_end = 0

    # -- state ---------------------------------------------------------------

    @property
    def start(self) -> int:
        """Offset of the oldest byte held."""
        first = self._segments[0].start if self._segments else self._buf_start
        return max(first, self.end - self._held_max)

    @property
    def end(self) -> int:
        """Offset after the last byte appended, buffered or not."""
        return self._buf_start + len(self._buf)

    @property
    def flushed_end(self) -> int:
        """Offset after the last byte written to a segment file."""
        return self._flushed_end

    # -- open and recovery ---------------------------------------------------

    def open(self) -> None:
        """Create the log, or recover it: check every record and repair what a crash left.

        Raises:
            ConsoleLogError: the directory cannot be used, or another process holds it.
        """
        if self._dir_fd is not None:
            raise ConsoleLogError(f"console log {self.directory} is already open")
        try:
            self.directory.mkdir(mode=0o700, parents=True, exist_ok=True)
            os.chmod(self.directory, 0o700)
            dir_fd = os.open(self.directory, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        except OSError as exc:
            raise ConsoleLogError(f"cannot open console log {self.directory}: {exc}") from exc
        try:
            fcntl.flock(dir_fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as exc:
            os.close(dir_fd)
            raise ConsoleLogError(
                f"console log {self.directory} is in use by another process"
            ) from exc
        self._dir_fd = dir_fd
        try:
            self._recover()
        except OSError as exc:
            self._close_fds()
            raise ConsoleLogError(f"cannot recover console log {self.directory}: {exc}") from exc
        except BaseException:
            self._close_fds()
            raise

    def _recover(self) -> None:
        found = sorted(
            (int(m[1]), name)
            for name in os.listdir(self._dir_fd)
            if (m := _SEGMENT_NAME.fullmatch(name)) and int(m[1]) < 1 << 64
        )
        problems: list[str | None] = []
        for offset, name in found:
            segment, problem = self._scan(self.directory / name, offset)
            self._segments.append(segment)
            problems.append(problem)
        if self._segments and problems[-1] is not None:
            self._repair_tail(self._segments[-1], problems[-1])
            problems[-1] = None
        # Walk back from the newest: a damaged segment, or one that does not end where the
        # next begins, cannot be trusted, and nothing older can then be contiguous.
        keep = len(self._segments)
        while keep > 1:
            older, newer = self._segments[keep - 2], self._segments[keep - 1]
            if problems[keep - 2] is not None:
                reason = problems[keep - 2]
            elif older.end != newer.start:
                reason = f"gap: segment ends at {older.end}, next starts at {newer.start}"
            else:
                keep -= 1
                continue
            dropped = self._segments[: keep - 1]
            log.warning(
                "console_log_repaired",
                path=str(self.directory),
                action="dropped_segments",
                reason=reason,
                segments=len(dropped),
                dropped_bytes=sum(s.data_bytes for s in dropped),
                start=newer.start,
            )
            self._unlink_oldest(len(dropped))
            break
        if not self._segments:
            self._segments.append(self._create_segment(0))
        self._prune()
        self._buf_start = self._flushed_end = self._segments[-1].end

    def _scan(self, path: Path, offset: int) -> tuple[_Segment, str | None]:
        """Index a segment's valid records; returns it and what is wrong past them, if anything."""
        try:
            fd = os.open(path, os.O_RDWR | os.O_CLOEXEC | os.O_NOFOLLOW)
        except OSError as exc:
            raise ConsoleLogError(f"cannot open console log segment {path}: {exc}") from exc
        segment = _Segment(path, fd, offset)
        try:
            os.fchmod(fd, 0o600)
            data = self._read_whole(fd)
        except OSError as exc:
            os.close(fd)
            raise ConsoleLogError(f"cannot read console log segment {path}: {exc}") from exc
        view = memoryview(data)
        pos, total = 0, len(data)
        while pos < total:
            if total - pos < _HEADER.size:
                return segment, f"torn header at byte {pos}"
            magic, rec_offset, length, crc = _HEADER.unpack_from(view, pos)
            if magic != _MAGIC:
                return segment, f"bad magic at byte {pos}"
            if rec_offset != segment.end:
                return (
                    segment,
                    f"record at byte {pos} claims offset {rec_offset}, not {segment.end}",
                )
            if not 0 < length <= total - pos - _HEADER.size:
                return segment, f"torn record at byte {pos}"
            body = view[pos + _HEADER.size : pos + _HEADER.size + length]
            if _crc(rec_offset, body) != crc:
                return segment, f"bad crc at byte {pos}"
            segment.add_record(length)
            pos += _HEADER.size + length
        return segment, None

    @staticmethod
    def _read_whole(fd: int) -> bytes:
        chunks, pos = [], 0
        while chunk := os.pread(fd, 1 << 20, pos):
            chunks.append(chunk)
            pos += len(chunk)
        return b"".join(chunks)

    def _repair_tail(self, segment: _Segment, reason: str) -> None:
        """Cut the newest segment back to its last good record."""
        try:
            file_size = os.fstat(segment.fd).st_size
            os.ftruncate(segment.fd, segment.size)
        except OSError as exc:
            raise ConsoleLogError(
                f"cannot repair console log segment {segment.path}: {exc}"
            ) from exc
        segment.dirty = True
        log.warning(
            "console_log_repaired",
            path=str(self.directory),
            action="truncated_tail",
            reason=reason,
            segment=segment.path.name,
            kept_bytes=segment.size,
            dropped_bytes=file_size - segment.size,
            end=segment.end,
        )

    # -- writing ---------------------------------------------------------------

    def append(self, data: bytes) -> int:
        """Buffer console output; writes once ``flush_bytes`` are buffered.

        The bytes are accepted (``end`` advances) even when the write fails: they
        stay buffered, newest ``capacity`` bytes at most, for the next flush.

        Args:
            data: what the VM printed (never client input).

        Returns:
            The absolute offset of ``data[0]``.

        Raises:
            ConsoleLogError: the log is not open, or the write failed.
        """
        if self._dir_fd is None:
            self._require_open()
        buf = self._buf
        offset = self._buf_start + buf.size
        buf.append(data)
        if buf.size > self._held_max:
            # Older bytes could not be kept anyway: the next flush starts afresh at the new
            # _buf_start and deletes every older segment (they are no longer contiguous).
            excess = buf.size - self._held_max
            buf.drop_front(excess)
            self._buf_start += excess
        if self.flush_bytes is not None and buf.size >= self.flush_bytes:
            self.flush()
        return offset

    def flush(self) -> None:
        """Write the buffer: one record per segment it lands in, one syscall each.

        Raises:
            ConsoleLogError: the log is not open, or the write failed (what was not
                written stays buffered).
        """
        self._require_open()
        while self._buf:
            segment = self._segments[-1]
            if segment.end != self._buf_start or segment.data_bytes >= self._segment_bytes:
                segment = self._create_segment(self._buf_start)
                self._segments.append(segment)
            n = min(len(self._buf), self._segment_bytes - segment.data_bytes, _MAX_RECORD)
            self._write_record(segment, n)
            self._prune()

    def _write_record(self, segment: _Segment, n: int) -> None:
        offset, expected = self._buf_start, _HEADER.size + n
        body = self._buf.head(n)
        header = _HEADER.pack(_MAGIC, offset, n, _crc_parts(offset, body))
        try:
            written = os.pwritev(segment.fd, [header, *body], segment.size)
        except OSError as exc:
            raise ConsoleLogError(
                f"cannot write {n} bytes to console log segment {segment.path}: "
                f"{exc.strerror or exc}"
            ) from exc
        # Positions are ours, not the file's: a short write leaves a torn tail past
        # segment.size that the next write at the same place covers (it is at least as
        # long: the buffer only grows), or that recovery cuts off after a crash.
        if written != expected:
            raise ConsoleLogError(
                f"short write to console log segment {segment.path}: "
                f"{written} of {expected} bytes (disk full?)"
            )
        segment.add_record(n)
        segment.dirty = True
        self._buf.drop_front(n)
        self._buf_start += n
        self._flushed_end = self._buf_start

    def _create_segment(self, offset: int) -> _Segment:
        path = self.directory / f"{offset:020d}.seg"
        try:
            flags = os.O_RDWR | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC | os.O_NOFOLLOW
            fd = os.open(path, flags, 0o600)
        except OSError as exc:
            raise ConsoleLogError(f"cannot create console log segment {path}: {exc}") from exc
        return _Segment(path, fd, offset, dirty=True)

    def _prune(self) -> None:
        """Delete the oldest segments beyond N, over capacity, or cut off by a gap."""
        drop = 0
        held = sum(s.data_bytes for s in self._segments)
        for older, newer in zip(self._segments, self._segments[1:], strict=False):
            if (
                len(self._segments) - drop > self.segments
                or older.end != newer.start
                or held > self._held_max
            ):
                drop += 1
                held -= older.data_bytes
            else:
                break
        self._unlink_oldest(drop)

    def _unlink_oldest(self, count: int) -> None:
        dropped, self._segments = self._segments[:count], self._segments[count:]
        failed: list[str] = []
        for segment in dropped:
            os.close(segment.fd)
            try:
                segment.path.unlink()
            except OSError as exc:
                # Still a leftover at the next open, where it is pruned again.
                failed.append(f"{segment.path.name}: {exc.strerror or exc}")
        if failed:
            raise ConsoleLogError(
                f"cannot delete old console log segments in {self.directory}: {', '.join(failed)}"
            )

    # -- reading ---------------------------------------------------------------

    def read(self, offset: int, max_bytes: int) -> bytes:
        """Up to `max_bytes` of output from `offset`, clamped to ``start``; b"" at or past ``end``.

        Buffered bytes that are not written yet are included.

        Args:
            offset: absolute offset of the first byte wanted.
            max_bytes: most bytes returned.

        Raises:
            ConsoleLogError: the log is not open, or a segment cannot be read or no
                longer matches its checksums.
        """
        self._require_open()
        first = max(offset, self.start)
        stop = min(self.end, first + max_bytes)
        if first >= stop:
            return b""
        out = bytearray()
        if first < self._flushed_end:
            starts = [s.start for s in self._segments]
            i = max(0, bisect.bisect_right(starts, first) - 1)
            for segment in self._segments[i:]:
                if segment.start >= stop or first + len(out) >= min(stop, self._flushed_end):
                    break
                self._read_segment(segment, first + len(out), min(stop, segment.end), out)
        if stop > self._buf_start:
            lo = max(first, self._buf_start) - self._buf_start
            out += self._buf.slice(lo, stop - self._buf_start)
        return bytes(out)

    def _read_segment(self, segment: _Segment, first: int, stop: int, out: bytearray) -> None:
        """Append the data of [first, stop) from one segment, verifying each record used."""
        i = bisect.bisect_right(segment.offsets, first) - 1
        rec_offset, pos = segment.offsets[i], segment.positions[i]
        window, window_pos = b"", pos
        while rec_offset < stop:
            if pos + _HEADER.size > window_pos + len(window):
                window_pos = pos
                window = self._pread(segment, pos, max(_READ_AHEAD, stop - rec_offset))
            magic, offset, length, crc = _HEADER.unpack_from(window, pos - window_pos)
            if magic != _MAGIC or offset != rec_offset:
                raise ConsoleLogError(f"console log segment {segment.path} changed on disk")
            if rec_offset + length > first:
                if pos + _HEADER.size + length > window_pos + len(window):
                    window_pos = pos
                    window = self._pread(
                        segment, pos, max(_READ_AHEAD, _HEADER.size + length, stop - rec_offset)
                    )
                at = pos - window_pos + _HEADER.size
                body = memoryview(window)[at : at + length]
                if _crc(offset, body) != crc:
                    raise ConsoleLogError(f"console log segment {segment.path} changed on disk")
                out += body[
                    max(first, rec_offset) - rec_offset : min(stop, rec_offset + length)
                    - rec_offset
                ]
            rec_offset += length
            pos += _HEADER.size + length

    @staticmethod
    def _pread(segment: _Segment, pos: int, n: int) -> bytes:
        n = min(n + _HEADER.size, segment.size - pos)
        try:
            data = os.pread(segment.fd, n, pos)
        except OSError as exc:
            raise ConsoleLogError(f"cannot read console log segment {segment.path}: {exc}") from exc
        if len(data) != n:  # only valid records are read: the file shrank under us
            raise ConsoleLogError(f"console log segment {segment.path} changed on disk")
        return data

    # -- closing ---------------------------------------------------------------

    def close(self) -> None:
        """Flush, fsync the segments and the directory, and release the files.

        Raises:
            ConsoleLogError: the last write or the sync failed (the files are closed anyway).
        """
        if self._dir_fd is None:
            return
        try:
            self.flush()
            for segment in self._segments:
                if segment.dirty:
                    os.fsync(segment.fd)
                    segment.dirty = False
            os.fsync(self._dir_fd)
        except OSError as exc:
            raise ConsoleLogError(f"cannot sync console log {self.directory}: {exc}") from exc
        finally:
            self._close_fds()

    def _close_fds(self) -> None:
        for segment in self._segments:
            os.close(segment.fd)
        self._segments = []
        self._buf.clear()
        if self._dir_fd is not None:
            os.close(self._dir_fd)  # releases the flock
            self._dir_fd = None

    def _require_open(self) -> None:
        if self._dir_fd is None:
            raise ConsoleLogError(f"console log {self.directory} is not open")
