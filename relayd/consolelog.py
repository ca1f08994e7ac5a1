"""The per-VM console log on disk ("boot diagnostics"), circular, by absolute offset.

It is the durable twin of `relayd.ring.OutputRing`: offset 0 is the first byte
the VM ever printed, offsets never wrap, and they survive daemon restarts, so a
client that remembers one can resume after a restart. It holds only what the
VM printed, never client input.

Identity: a log belongs to a VM's identity, not its id alone. Its directory is
``<vm id>@<digest>``, the digest a hash of (subscription, resource group,
scale set, vm id), and holds ``identity.json`` naming them; `open` refuses a
directory whose identity file names another VM. Each part is a scope that
grants roles, so a VM that reappears with another subscription, resource
group or scale set (or a new VM reusing the id there) starts a new history
instead of being shown output its new readers were never entitled to. Logs
from before identities (``<vm id>`` alone) are adopted once, at the first
start that finds them, by the configured VM with that id
(`adopt_legacy_logs`); one whose VM is not configured then stays where it is
and is never adopted later.

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
written back; the same checks keep what survives consistent.

Offsets are never handed out twice. Bytes are handed to clients when they
are appended, before they are written, so the offsets of lost bytes are
known to someone. The file ``reserved`` (magic ``RCLR`` | offset u64 | crc32,
16 bytes) holds an offset that ``end`` never passes: when an append would,
the reservation is first moved ahead by an eighth of the capacity (one
16-byte ``pwrite``, not a write per keystroke). After a crash `open` starts
the log at the reservation, past every offset ever handed out: what was
lost is a hole, not served and not reused, so a client that saw it resumes
with a gap (`next_held`), never other bytes at the same offsets. A clean
`close` moves the reservation back to ``end``, so a clean restart leaves no
hole. The reservation is written to the page cache, like the segments: it
survives a ``kill -9``; a power loss can lose it along with the output.

Recovery (`open`) checks every record: a bad record in the newest segment is
truncated away with everything after it; a bad record in an older segment,
or segments that overlap, drops that segment and all older ones (``start``
moves forward). Both are logged as ``console_log_repaired`` with byte counts.
A gap between segments (a crash's hole, or a segment file gone) is just
offsets not held; so are the offsets below a reservation that the segments
do not reach, logged once as ``console_log_repaired`` (``reserved_gap``).

Everything here is blocking file I/O done in the caller's thread: the hub calls
it from the event loop, where writes land in the page cache and are small. It
is not thread-safe; a second process opening the same directory is refused
(``flock``).
"""

from __future__ import annotations

import bisect
import fcntl
import hashlib
import json
import os
import re
import struct
import zlib
from array import array
from collections import deque
from collections.abc import Iterable
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
_RESERVED_NAME = "reserved"
_RESERVED = struct.Struct("<4sQI")  # magic, offset, crc32(magic + offset)
_RESERVED_MAGIC = b"RCLR"
_RESERVED_HEAD = struct.Struct("<4sQ")
# The reservation moves ahead by this share of the capacity: a crash then costs at most
# that much of the log's window as a hole, and a flood one pwrite per share it prints.
_RESERVE_SHARE = 8


_IDENTITY_NAME = "identity.json"
# In the logs' root once logs named by VM id alone were adopted (or left): never again.
_LAYOUT_NAME = "layout"
_LAYOUT = b"2\n"
_VM_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}")


@dataclass(frozen=True)
class LogIdentity:
    """The VM a console log belongs to: every scope that decides who may read it.

    Raises:
        ValueError: `vm` is not a VM id (it becomes part of a path).
    """

    subscription: str
    resource_group: str | None
    scale_set: str | None
    vm: str

    def __post_init__(self) -> None:
        if not _VM_ID.fullmatch(self.vm):
            raise ValueError(f"{self.vm!r} is not a vm id")

    def encode(self) -> bytes:
        """The identity file's content (canonical JSON)."""
        fields = {
            "subscription": self.subscription,
            "resource_group": self.resource_group,
            "scale_set": self.scale_set,
            "vm": self.vm,
        }
        return json.dumps(fields, sort_keys=True).encode() + b"\n"

    def directory_name(self) -> str:
        """``<vm id>@<digest>``: readable, and safe whatever the other parts hold."""
        return f"{self.vm}@{hashlib.sha256(self.encode()).hexdigest()[:20]}"


def adopt_legacy_logs(root: Path, identities: Iterable[LogIdentity]) -> list[str]:
    """Give logs named by VM id alone (the old layout) to the VMs configured with that id.

    Runs once per root: at the first start that finds it without the layout
    marker. A log whose id no VM has then is left in place and never adopted
    later: the VM it belonged to is unknown, so a VM that reuses the id (in
    another subscription, say) must not inherit it. Returns the ids adopted.

    Raises:
        ConsoleLogError: a directory could not be renamed or the marker written.
    """
    marker = root / _LAYOUT_NAME
    if marker.exists():
        return []
    wanted = {identity.vm: identity for identity in identities}
    adopted: list[str] = []
    try:
        root.mkdir(mode=0o700, parents=True, exist_ok=True)
        for entry in sorted(os.scandir(root), key=lambda e: e.name):
            if "@" in entry.name or not entry.is_dir(follow_symlinks=False):
                continue
            identity = wanted.get(entry.name)
            if identity is None:
                log.warning(
                    "console_log_not_adopted",
                    path=entry.path,
                    reason="no vm with this id is configured",
                )
                continue
            target = root / identity.directory_name()
            if target.exists():
                log.warning(
                    "console_log_not_adopted", path=entry.path, reason=f"{target} exists already"
                )
                continue
            os.rename(entry.path, target)
            log.info(
                "console_log_adopted",
                path=str(target),
                vm=identity.vm,
                subscription=identity.subscription,
                resource_group=identity.resource_group,
                scale_set=identity.scale_set,
            )
            adopted.append(identity.vm)
        staging = root / f".{_LAYOUT_NAME}.new"
        staging.write_bytes(_LAYOUT)
        os.replace(staging, marker)
    except OSError as exc:
        raise ConsoleLogError(f"cannot adopt console logs in {root}: {exc}") from exc
    return adopted


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
        directory: the VM's own directory (``state_dir/consolelog/<vm>@<digest>``), created 0700.
        capacity: data bytes held at most (``console_log_bytes``), at least 4096.
        segments: files the capacity is split into; the oldest is deleted whole.
        flush_bytes: buffered bytes that make `append` write by itself; None: only
            `flush` writes (the owner flushes on a timer).
        identity: the VM the log belongs to; recorded at the first `open`, checked
            at every later one.

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
        identity: LogIdentity | None = None,
    ) -> None:
        if capacity < MIN_CAPACITY:
            raise ValueError(f"capacity {capacity} is below the minimum {MIN_CAPACITY}")
        if not 2 <= segments <= capacity:
            raise ValueError(f"segments {segments} must be between 2 and capacity {capacity}")
        if flush_bytes is not None and flush_bytes < 1:
            raise ValueError(f"flush_bytes {flush_bytes} must be positive")
        self.directory = directory
        self.identity = identity
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
        self._reserve_step = max(1, capacity // _RESERVE_SHARE)
        self._reserved = 0  # no offset at or past this was handed out (see the docstring)
        self._reserved_fd: int | None = None

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
            self._check_identity()
            self._recover()
        except OSError as exc:
            self._close_fds()
            raise ConsoleLogError(f"cannot recover console log {self.directory}: {exc}") from exc
        except BaseException:
            self._close_fds()
            raise

    def _check_identity(self) -> None:
        """Record whose log this is, or refuse it if it is another VM's.

        Raises:
            ConsoleLogError: the directory belongs to another VM identity.
        """
        if self.identity is None:
            return
        path = self.directory / _IDENTITY_NAME
        mine = self.identity.encode()
        try:
            fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC | os.O_NOFOLLOW)
        except FileNotFoundError:
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600)
            try:
                os.write(fd, mine)
            finally:
                os.close(fd)
            return
        try:
            recorded = os.read(fd, 65536)
        finally:
            os.close(fd)
        try:
            same = json.loads(recorded) == json.loads(mine)
        except ValueError:
            same = False
        if not same:
            raise ConsoleLogError(
                f"console log {self.directory} belongs to "
                f"{recorded.decode('utf-8', 'replace').strip()}, not {mine.decode().strip()}"
            )

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
        # Walk back from the newest: a damaged segment, or one that runs into the next, cannot
        # be trusted, nor can anything older. A gap before the next is only a hole.
        keep = len(self._segments)
        while keep > 1:
            older, newer = self._segments[keep - 2], self._segments[keep - 1]
            if problems[keep - 2] is not None:
                reason = problems[keep - 2]
            elif older.end > newer.start:
                reason = f"overlap: segment ends at {older.end}, next starts at {newer.start}"
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
        on_disk = self._segments[-1].end if self._segments else 0
        end = self._open_reservation(on_disk)
        if not self._segments:
            self._segments.append(self._create_segment(end))
        self._buf_start = self._flushed_end = end
        self._prune()

    def _open_reservation(self, on_disk: int) -> int:
        """Read (or create) the reservation; where the log goes on: past it, after a crash."""
        path = self.directory / _RESERVED_NAME
        try:
            fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC | os.O_NOFOLLOW, 0o600)
        except OSError as exc:
            raise ConsoleLogError(f"cannot open console log reservation {path}: {exc}") from exc
        self._reserved_fd = fd
        os.fchmod(fd, 0o600)
        data = os.pread(fd, _RESERVED.size, 0)
        if not data:  # a new log, or one from before reservations: nothing to go on
            self._reserved = on_disk
            return on_disk
        magic, reserved, crc = _RESERVED.unpack(data.ljust(_RESERVED.size, b"\0"))
        if len(data) != _RESERVED.size or magic != _RESERVED_MAGIC or crc != zlib.crc32(data[:12]):
            # Unknown, so assume the worst: a whole buffer was handed out past the last
            # write, and a reservation step past that.
            reserved = on_disk + self._held_max + self._reserve_step
            reason = "unreadable reservation"
        else:
            reason = "reserved before an unclean stop"
        self._reserved = max(reserved, on_disk)
        if self._reserved > on_disk:
            log.warning(
                "console_log_repaired",
                path=str(self.directory),
                action="reserved_gap",
                reason=reason,
                written_end=on_disk,
                end=self._reserved,
                lost_bytes=self._reserved - on_disk,
            )
        return self._reserved

    def _reserve(self, offset: int) -> None:
        """Record that offsets below `offset` may be handed out (before any is).

        Raises:
            ConsoleLogError: it could not be written (it is tried again at the next append).
        """
        assert self._reserved_fd is not None
        head = _RESERVED_HEAD.pack(_RESERVED_MAGIC, offset)
        record = _RESERVED.pack(_RESERVED_MAGIC, offset, zlib.crc32(head))
        try:
            written = os.pwrite(self._reserved_fd, record, 0)
        except OSError as exc:
            raise ConsoleLogError(
                f"cannot write console log reservation in {self.directory}: {exc.strerror or exc}"
            ) from exc
        if written != len(record):
            raise ConsoleLogError(
                f"short write of console log reservation in {self.directory}: "
                f"{written} of {len(record)} bytes"
            )
        self._reserved = offset

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
            # _buf_start, and every older segment falls out of the window.
            excess = buf.size - self._held_max
            buf.drop_front(excess)
            self._buf_start += excess
        end = self._buf_start + buf.size
        if end > self._reserved:  # before the caller hands these offsets to anyone
            self._reserve(end + self._reserve_step)
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
        """Delete the oldest segments beyond N, or that start more than capacity before the end.

        The span counts holes too, so ``start`` never goes below ``end - capacity``.
        """
        drop = 0
        newest = self._segments[-1].end
        for older in self._segments[:-1]:
            if len(self._segments) - drop > self.segments or newest - older.start > self._held_max:
                drop += 1
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
        pos = first
        if pos < self._flushed_end:
            starts = [s.start for s in self._segments]
            i = max(0, bisect.bisect_right(starts, pos) - 1)
            for segment in self._segments[i:]:
                if pos >= stop or segment.start > pos:  # done, or a hole at pos
                    break
                if segment.end > pos:
                    self._read_segment(segment, pos, min(stop, segment.end), out)
                    pos = first + len(out)
        if self._buf_start <= pos < stop:
            out += self._buf.slice(pos - self._buf_start, stop - self._buf_start)
        return bytes(out)

    def next_held(self, offset: int) -> int:
        """The first offset at or after `offset` (and ``start``) that is held; ``end`` if none.

        It is past `offset` only in a hole: output lost in a crash, or a segment gone.
        """
        offset = max(offset, self.start)
        for segment in self._segments:
            if segment.end > offset and segment.end > segment.start:
                return max(offset, segment.start)
        return min(max(offset, self._buf_start), self.end)

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
            # Everything handed out is written: a clean restart goes on at end, no hole.
            if self._reserved != self.end:
                self._reserve(self.end)
            for segment in self._segments:
                if segment.dirty:
                    os.fsync(segment.fd)
                    segment.dirty = False
            if self._reserved_fd is not None:
                os.fsync(self._reserved_fd)
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
        if self._reserved_fd is not None:
            os.close(self._reserved_fd)
            self._reserved_fd = None
        if self._dir_fd is not None:
            os.close(self._dir_fd)  # releases the flock
            self._dir_fd = None

    def _require_open(self) -> None:
        if self._dir_fd is None:
            raise ConsoleLogError(f"console log {self.directory} is not open")
