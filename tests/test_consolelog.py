"""Tests for relayd.consolelog: the on-disk log against a bytes model, real crashes and damage."""

from __future__ import annotations

import asyncio
import hashlib
import itertools
import os
import resource
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from structlog.testing import capture_logs

from relayd.config import LimitsConfig, VmConfig
from relayd.consolelog import ConsoleLog, LogIdentity
from relayd.errors import ConsoleLogError
from relayd.hub import LOG_FLUSH_MIN_SHARE, LOG_FLUSH_SECONDS, ConsoleHub

CAPACITY = 16384
SEGMENTS = 4
HEADER = 20
BLOCK = 4096

# The crash child writes expected(offset, n) at every offset; the same function as below,
# repeated so the child needs nothing from the test suite.
CHILD = """
import hashlib, random, sys
from pathlib import Path
import structlog
from relayd.consolelog import ConsoleLog

structlog.configure(logger_factory=structlog.PrintLoggerFactory(sys.stderr))  # stdout: offsets

def expected(offset, n):
    first, last = offset // 4096, (offset + n + 4095) // 4096
    blocks = (hashlib.shake_128(b.to_bytes(8, "little")).digest(4096) for b in range(first, last))
    return b"".join(blocks)[offset - first * 4096 :][:n]

log = ConsoleLog(Path(sys.argv[1]), int(sys.argv[2]), flush_bytes=4096)
log.open()
rng = random.Random(int(sys.argv[3]))
while True:
    log.append(expected(log.end, rng.choice((1, 100, 1000, 5000, 40000))))
    if rng.random() < 0.2:
        log.flush()
    print(log.flushed_end, flush=True)
"""


def expected(offset: int, n: int) -> bytes:
    """Deterministic bytes for [offset, offset + n): a function of each byte's offset alone."""
    first, last = offset // BLOCK, (offset + n + BLOCK - 1) // BLOCK
    blocks = (hashlib.shake_128(b.to_bytes(8, "little")).digest(BLOCK) for b in range(first, last))
    return b"".join(blocks)[offset - first * BLOCK :][:n]


def segment_files(directory: Path) -> list[Path]:
    """The segment files, oldest first."""
    return sorted(directory.glob("*.seg"))


def held_runs(log: ConsoleLog) -> list[tuple[int, int]]:
    """The runs of offsets the log holds, [first, stop), between the holes a crash leaves."""
    runs = []
    at = log.next_held(log.start)
    while at < log.end:
        n = len(log.read(at, log.end - at))  # a read stops at a hole
        assert n > 0, f"next_held said {at} is held, but nothing is read there"
        runs.append((at, at + n))
        at = log.next_held(at + n)
    return runs


def assert_serves_expected(log: ConsoleLog) -> None:
    """Every offset held, whole and in pieces, serves exactly what was written there."""
    for first, stop in held_runs(log):
        assert log.read(first, stop - first) == expected(first, stop - first)
        for offset in range(first, stop, 997):
            assert log.read(offset, 3000) == expected(offset, min(3000, stop - offset))


@pytest.fixture
def log_dir(tmp_path: Path) -> Path:
    """Where the log of one VM lives (its parents do not exist yet)."""
    return tmp_path / "consolelog" / "vm-1"


@pytest.fixture
def open_log(log_dir: Path) -> Iterator[Callable[..., ConsoleLog]]:
    """`open_log(capacity=..., flush_bytes=...)`: an opened log, closed after the test."""
    opened: list[ConsoleLog] = []

    def make(capacity: int = CAPACITY, **kwargs: Any) -> ConsoleLog:
        log = ConsoleLog(log_dir, capacity, segments=SEGMENTS, **kwargs)
        log.open()
        opened.append(log)
        return log

    yield make
    for log in opened:
        log.close()


def test_consolelog_appends_read_back_at_their_absolute_offsets(
    open_log: Callable[..., ConsoleLog],
) -> None:
    """Each append returns its first byte's offset, and reads span disk and buffer alike."""
    log = open_log()
    chunks = [b"boot\n", b"", b"x" * 5000, b"login: "]
    assert [log.append(c) for c in chunks] == [0, 5, 5, 5005]
    whole = b"".join(chunks)
    assert (log.start, log.flushed_end, log.end) == (0, 5005, len(whole))
    assert log.read(0, 100_000) == whole
    assert log.read(3, 4) == whole[3:7]
    assert log.read(5000, 100) == whole[5000:]
    assert log.read(log.end, 10) == b""
    assert log.read(log.end + 5, 10) == b""
    assert log.read(0, 0) == b""


def test_consolelog_unflushed_bytes_are_served_then_written_by_flush(
    open_log: Callable[..., ConsoleLog],
) -> None:
    """Bytes below flush_bytes stay buffered yet readable until flush() writes them."""
    log = open_log(flush_bytes=4096)
    log.append(b"abc")
    assert (log.flushed_end, log.end, log.read(0, 10)) == (0, 3, b"abc")
    log.flush()
    assert (log.flushed_end, log.read(1, 10)) == (3, b"bc")


def test_consolelog_rotation_keeps_offsets_and_capacity_bound(
    open_log: Callable[..., ConsoleLog], log_dir: Path
) -> None:
    """Over ten capacities: at most N files, named by offset, holding (N-1)/N to N/N of capacity."""
    log = open_log(flush_bytes=1000)
    sizes = itertools.cycle([1, 700, 3000, 100, 5000, 4096, 9000])
    while log.end < 10 * CAPACITY:
        n = next(sizes)
        assert log.append(expected(log.end, n)) == log.end - n
        log.flush()
        files = segment_files(log_dir)
        assert len(files) <= SEGMENTS
        assert int(files[0].stem) == log.start
        held = log.end - log.start
        assert min(log.end, CAPACITY * (SEGMENTS - 1) // SEGMENTS) <= held <= CAPACITY
    assert_serves_expected(log)
    assert log.read(0, 10) == expected(log.start, 10)


def test_consolelog_append_larger_than_capacity_keeps_the_newest_bytes(
    open_log: Callable[..., ConsoleLog], log_dir: Path
) -> None:
    """An append of three capacities replaces everything and holds its last `capacity` bytes."""
    log = open_log()
    log.append(expected(0, 100))
    log.flush()
    assert log.append(expected(100, 3 * CAPACITY)) == 100
    assert (log.start, log.end) == (100 + 2 * CAPACITY, 100 + 3 * CAPACITY)
    assert_serves_expected(log)
    assert len(segment_files(log_dir)) == SEGMENTS


def test_consolelog_reopen_after_close_preserves_range_and_content(
    open_log: Callable[..., ConsoleLog],
) -> None:
    """close() writes the buffer; a new instance opens with the same start, end and bytes."""
    log = open_log()
    for _ in range(20):
        log.append(expected(log.end, 2500))
    log.append(expected(log.end, 10))  # still buffered
    start, end = log.start, log.end
    log.close()
    again = open_log()
    assert (again.start, again.flushed_end, again.end) == (start, end, end)
    assert_serves_expected(again)
    assert again.append(b"more") == end


def test_consolelog_killed_writer_recovers_exact_bytes(log_dir: Path) -> None:
    """SIGKILL at random moments: recovery keeps all reported flushes and serves only true bytes."""
    capacity = 65536
    for round_ in range(5):
        child = subprocess.Popen(
            [sys.executable, "-c", CHILD, str(log_dir), str(capacity), str(round_)],
            stdout=subprocess.PIPE,
        )
        assert child.stdout is not None
        reported = 0
        try:
            for _ in range(20 + int.from_bytes(os.urandom(1))):
                line = child.stdout.readline()
                assert line, "the writer died on its own"
                reported = int(line)
            time.sleep(int.from_bytes(os.urandom(1)) / 50_000)
        finally:
            child.kill()
            child.wait()
            child.stdout.close()
        log = ConsoleLog(log_dir, capacity)
        log.open()
        try:
            assert log.end >= reported
            assert min(log.end, capacity * 3 // 4) <= log.end - log.start <= capacity
            assert_serves_expected(log)
        finally:
            log.close()


def crash_copy(log: ConsoleLog, to: Path) -> Path:
    """What a kill -9 of `log`'s process leaves on disk now: its files as they are."""
    shutil.copytree(log.directory, to)
    return to


def test_consolelog_offsets_handed_out_before_a_crash_are_never_reused(
    open_log: Callable[..., ConsoleLog], tmp_path: Path
) -> None:
    """Output appended (so handed to clients) but not yet written when the process dies is
    lost; its offsets stay lost, a hole, and new output starts after them."""
    log = open_log(flush_bytes=None)
    log.append(b"A" * 1000)
    log.flush()
    lost_at = log.append(b"B" * 500)  # a client saw these at [1000, 1500)
    after = ConsoleLog(crash_copy(log, tmp_path / "crashed"), CAPACITY, segments=SEGMENTS)
    after.open()
    try:
        assert after.end >= lost_at + 500
        new_at = after.append(b"C" * 10)
        assert new_at >= lost_at + 500
        assert after.read(0, 5000) == b"A" * 1000  # the history before the hole is kept
        assert after.read(lost_at, 500) == b""  # nothing is served where B was
        assert after.next_held(lost_at) == new_at
        assert after.read(new_at, 100) == b"C" * 10
    finally:
        after.close()


def test_consolelog_of_another_vm_identity_is_refused(log_dir: Path) -> None:
    """The directory records whose log it is; another identity is refused, the same one is not."""
    alpha = LogIdentity("sub-1", "rg-a", None, "vm-1")
    log = ConsoleLog(log_dir, CAPACITY, identity=alpha)
    log.open()
    log.append(b"alpha's output")
    log.close()
    for other in (
        LogIdentity("sub-2", "rg-a", None, "vm-1"),
        LogIdentity("sub-1", None, None, "vm-1"),
        LogIdentity("sub-1", "rg-a", "ss-1", "vm-1"),
    ):
        with pytest.raises(ConsoleLogError, match="belongs to"):
            ConsoleLog(log_dir, CAPACITY, identity=other).open()
    again = ConsoleLog(log_dir, CAPACITY, identity=alpha)
    again.open()
    try:
        assert again.read(0, 100) == b"alpha's output"
    finally:
        again.close()


@given(st.text(min_size=1), st.text(min_size=1) | st.none(), st.text(min_size=1) | st.none())
def test_log_identity_directory_name_is_one_safe_path_component_per_identity(
    sub: str, rg: str | None, ss: str | None
) -> None:
    """Any subscription, group or scale set name: the directory stays `<vm>@<hex>`, no `/`,
    and changing any part changes it."""
    identity = LogIdentity(sub, rg, ss, "vm-1")
    name = identity.directory_name()
    assert name.startswith("vm-1@")
    assert all(c in "0123456789abcdef" for c in name.split("@")[1])
    assert name != LogIdentity(sub + "x", rg, ss, "vm-1").directory_name()
    assert name != LogIdentity(sub, (rg or "") + "x", ss, "vm-1").directory_name()
    assert name != LogIdentity(sub, rg, (ss or "") + "x", "vm-1").directory_name()


def test_log_identity_refuses_a_vm_id_that_is_not_one() -> None:
    """The vm id is part of a path: "../x" is not a vm id."""
    with pytest.raises(ValueError, match="not a vm id"):
        LogIdentity("sub-1", None, None, "../x")


def write_two_records(log_dir: Path) -> None:
    """One segment holding two 1000-byte records: [0, 1000) then [1000, 2000)."""
    log = ConsoleLog(log_dir, CAPACITY)
    log.open()
    log.append(expected(0, 1000))
    log.flush()
    log.append(expected(1000, 1000))
    log.close()


def cut(at: int) -> Callable[[Path], None]:
    """Damage: the file ends `at` bytes into the second record."""
    return lambda path: os.truncate(path, HEADER + 1000 + at)


def flip(at: int) -> Callable[[Path], None]:
    """Damage: one bit flipped `at` bytes into the second record."""

    def damage(path: Path) -> None:
        data = bytearray(path.read_bytes())
        data[HEADER + 1000 + at] ^= 0x10
        path.write_bytes(bytes(data))

    return damage


@pytest.mark.parametrize(
    "damage",
    [cut(0), cut(7), cut(HEADER), cut(HEADER + 500), flip(2), flip(5), flip(12), flip(500)],
    ids=["empty", "mid_header", "no_data", "mid_data", "magic", "offset", "length", "data"],
)
def test_consolelog_damaged_last_record_is_truncated_and_not_served(
    log_dir: Path, damage: Callable[[Path], None]
) -> None:
    """A torn or corrupt newest record is cut off at open, logged, and never read back; its
    offsets were handed out, so they stay a hole and new output goes after them."""
    write_two_records(log_dir)
    (path,) = segment_files(log_dir)
    damage(path)
    size = path.stat().st_size
    log = ConsoleLog(log_dir, CAPACITY)
    with capture_logs() as events:
        log.open()
    try:
        assert (log.start, log.end) == (0, 2000)
        assert log.read(0, 5000) == expected(0, 1000)
        assert log.next_held(1000) == 2000
        assert path.stat().st_size == HEADER + 1000
        repairs = [e for e in events if e["event"] == "console_log_repaired"]
        truncated = [("truncated_tail", HEADER + 1000, size - HEADER - 1000)]
        assert [(e["action"], e["kept_bytes"], e["dropped_bytes"]) for e in repairs[:-1]] == (
            [] if size == HEADER + 1000 else truncated
        )
        assert (repairs[-1]["action"], repairs[-1]["lost_bytes"]) == ("reserved_gap", 1000)
        assert log.append(expected(2000, 50)) == 2000
        assert_serves_expected(log)
    finally:
        log.close()


def fill_four_segments(log_dir: Path) -> list[Path]:
    """A full log: four segments of CAPACITY / 4 bytes each, starting at offset 0."""
    log = ConsoleLog(log_dir, CAPACITY)
    log.open()
    log.append(expected(0, CAPACITY))
    log.close()
    files = segment_files(log_dir)
    assert [int(f.stem) for f in files] == [0, 4096, 8192, 12288]
    return files


def flip_in_middle(path: Path) -> None:
    """Damage: one bit flipped in the middle of a segment's data."""
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0x01
    path.write_bytes(bytes(data))


@pytest.mark.parametrize(
    "damage", [flip_in_middle, lambda p: os.truncate(p, 100)], ids=["flipped", "truncated"]
)
def test_consolelog_damaged_older_segment_drops_it_and_all_older(
    log_dir: Path, damage: Callable[[Path], None]
) -> None:
    """Damage to the second segment moves start to the third; nothing wrong is read."""
    files = fill_four_segments(log_dir)
    damage(files[1])
    log = ConsoleLog(log_dir, CAPACITY)
    with capture_logs() as events:
        log.open()
    try:
        assert (log.start, log.end) == (8192, CAPACITY)
        assert_serves_expected(log)
        assert [f.name for f in segment_files(log_dir)] == [f.name for f in files[2:]]
        (repair,) = [e for e in events if e["event"] == "console_log_repaired"]
        assert (repair["action"], repair["segments"], repair["start"]) == (
            "dropped_segments",
            2,
            8192,
        )
    finally:
        log.close()


def test_consolelog_missing_older_segment_is_a_hole_the_rest_is_served(log_dir: Path) -> None:
    """A segment file gone is offsets not held, like a crash's hole: older ones still verify."""
    files = fill_four_segments(log_dir)
    files[1].unlink()
    log = ConsoleLog(log_dir, CAPACITY)
    with capture_logs() as events:
        log.open()
    try:
        assert (log.start, log.end) == (0, CAPACITY)
        assert held_runs(log) == [(0, 4096), (8192, CAPACITY)]
        assert_serves_expected(log)
        assert [e for e in events if e["event"] == "console_log_repaired"] == []
    finally:
        log.close()


def test_consolelog_empty_newest_segment_from_a_crash_is_used(log_dir: Path) -> None:
    """A segment created but never written (killed in between) is accepted and written next."""
    write_two_records(log_dir)
    empty = log_dir / f"{2000:020d}.seg"
    empty.touch()
    log = ConsoleLog(log_dir, CAPACITY)
    with capture_logs() as events:
        log.open()
    try:
        assert (log.start, log.end, events) == (0, 2000, [])
        log.append(expected(2000, 10))
        log.flush()
        assert empty.stat().st_size == HEADER + 10
        assert_serves_expected(log)
    finally:
        log.close()


def test_consolelog_write_failure_raises_consolelog_error_and_keeps_bytes(
    open_log: Callable[..., ConsoleLog], log_dir: Path
) -> None:
    """A real short write and EFBIG (RLIMIT_FSIZE) raise ConsoleLogError; a retry repairs all."""
    log = open_log(capacity=1 << 20)
    log.append(expected(0, 10_000))
    soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
    previous = signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    try:
        resource.setrlimit(resource.RLIMIT_FSIZE, (15_000, hard))
        with pytest.raises(ConsoleLogError, match="short write"):
            log.append(expected(10_000, 10_000))
        resource.setrlimit(resource.RLIMIT_FSIZE, (HEADER + 10_000, hard))
        with pytest.raises(ConsoleLogError, match="File too large"):
            log.append(expected(20_000, 5_000))
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))
        signal.signal(signal.SIGXFSZ, previous)
    assert (log.flushed_end, log.end) == (10_000, 25_000)
    assert_serves_expected(log)
    log.flush()
    log.close()
    with capture_logs() as events:
        again = open_log(capacity=1 << 20)
    assert (again.end, events) == (25_000, [])
    assert_serves_expected(again)


def test_consolelog_second_open_of_same_directory_is_refused(
    open_log: Callable[..., ConsoleLog], log_dir: Path
) -> None:
    """Two writers would interleave records, so the directory is locked while open."""
    open_log()
    with pytest.raises(ConsoleLogError, match="in use"):
        ConsoleLog(log_dir, CAPACITY).open()


def test_consolelog_directory_and_files_are_private(
    open_log: Callable[..., ConsoleLog], log_dir: Path
) -> None:
    """The log holds what the VM printed: directory 0700, segments 0600."""
    log = open_log()
    log.append(b"secret-ish output")
    log.flush()
    assert log_dir.stat().st_mode & 0o777 == 0o700
    assert [f.stat().st_mode & 0o777 for f in segment_files(log_dir)] == [0o600]


def test_consolelog_use_while_closed_raises_consolelog_error(log_dir: Path) -> None:
    """Appending or reading before open() (or after close()) is an error, not a crash."""
    log = ConsoleLog(log_dir, CAPACITY)
    with pytest.raises(ConsoleLogError, match="not open"):
        log.append(b"x")
    log.open()
    log.close()
    with pytest.raises(ConsoleLogError, match="not open"):
        log.read(0, 10)


@pytest.mark.parametrize(
    "kwargs",
    [{"capacity": 4095}, {"segments": 1}, {"flush_bytes": 0}],
    ids=["small_capacity", "one_segment", "zero_flush_bytes"],
)
def test_consolelog_bad_arguments_raise_value_error(log_dir: Path, kwargs: dict[str, int]) -> None:
    """Options are validated at construction."""
    args: dict[str, Any] = {"capacity": CAPACITY, **kwargs}
    with pytest.raises(ValueError, match=next(iter(kwargs))):
        ConsoleLog(log_dir, **args)


def check_against_model(
    log: ConsoleLog, history: bytes, capacity: int, segments: int, data: st.DataObject
) -> None:
    """Range bounds hold and every read agrees with the last bytes of `history`."""
    end = len(history)
    assert log.end == end
    held = end - log.start
    assert held <= capacity
    assert held >= min(end, (segments - 1) * (capacity // segments))
    assert log.read(log.start, capacity) == history[log.start :]
    offset = data.draw(st.integers(0, end + 10), label="offset")
    max_bytes = data.draw(st.integers(0, capacity + 10), label="max_bytes")
    first = max(offset, log.start)
    assert log.read(offset, max_bytes) == history[first : first + max_bytes]


@given(
    capacity=st.sampled_from([4096, 5000]),
    segments=st.integers(2, 5),
    flush_bytes=st.sampled_from([1, 512, 4096, 20_000]),
    data=st.data(),
)
@settings(max_examples=60, deadline=None)
def test_consolelog_any_operations_match_bytes_model(
    capacity: int, segments: int, flush_bytes: int, data: st.DataObject
) -> None:
    """Appends of any size (some over capacity), flushes and reopens behave like a bytes tail."""
    sizes = st.sampled_from([0, 1, 100, 1000, 4096]) | st.integers(0, 3 * capacity)
    history = bytearray()
    with tempfile.TemporaryDirectory() as tmp:
        directory = Path(tmp) / "vm"
        log = ConsoleLog(directory, capacity, segments=segments, flush_bytes=flush_bytes)
        log.open()
        try:
            for _ in range(data.draw(st.integers(1, 20), label="steps")):
                op = data.draw(st.sampled_from(["append"] * 4 + ["flush", "reopen"]), label="op")
                if op == "append":
                    size = data.draw(sizes, label="size")
                    chunk = hashlib.shake_128(len(history).to_bytes(8, "little")).digest(size)
                    assert log.append(chunk) == len(history)
                    history += chunk
                elif op == "flush":
                    log.flush()
                    assert log.flushed_end == log.end
                else:
                    log.close()
                    log = ConsoleLog(
                        directory, capacity, segments=segments, flush_bytes=flush_bytes
                    )
                    log.open()
                check_against_model(log, bytes(history), capacity, segments, data)
        finally:
            log.close()


@given(
    capacity=st.sampled_from([4096, 5000]),
    flush_bytes=st.sampled_from([None, 512, 4096]),
    data=st.data(),
)
@settings(max_examples=60, deadline=None)
def test_consolelog_crashes_anywhere_never_serve_other_bytes_at_a_handed_out_offset(
    capacity: int, flush_bytes: int | None, data: st.DataObject
) -> None:
    """Appends, flushes, clean reopens and crashes (the files as a kill -9 leaves them) in any
    order: every append gets offsets no earlier append got, every byte served is the byte first
    handed out at its offset, whatever was written before a crash is still served, and only a
    crash leaves a hole."""
    sizes = st.sampled_from([1, 100, 1000, 4096]) | st.integers(0, 2 * capacity)
    model = bytearray()  # what was handed out, by offset; holes are zeros
    handed = bytearray()  # 1 where an offset was handed out
    with tempfile.TemporaryDirectory() as tmp:
        directory = Path(tmp) / "vm-0"
        log = ConsoleLog(directory, capacity, segments=4, flush_bytes=flush_bytes)
        log.open()
        try:
            for step in range(data.draw(st.integers(1, 25), label="steps")):
                op = data.draw(st.sampled_from(["append"] * 4 + ["flush", "reopen", "crash"]))
                if op == "append":
                    # Bytes depend on the step: output at a reused offset would differ.
                    size = data.draw(sizes)
                    chunk = hashlib.shake_128(step.to_bytes(8, "little")).digest(size)
                    offset = log.append(chunk)
                    assert offset >= len(model), "an offset was handed out twice"
                    model += bytes(offset - len(model)) + chunk
                    handed += bytes(offset - len(handed)) + b"\1" * len(chunk)
                elif op == "flush":
                    log.flush()
                else:
                    end, written = log.end, log.flushed_end
                    durable = [(a, min(b, written)) for a, b in held_runs(log) if a < written]
                    if op == "crash":
                        copy = crash_copy(log, Path(tmp) / f"vm-{step + 1}")
                        log.close()
                        directory = copy
                    else:
                        log.close()
                    log = ConsoleLog(directory, capacity, segments=4, flush_bytes=flush_bytes)
                    log.open()
                    assert log.end >= end
                    if op == "reopen":
                        assert log.end == end  # a clean stop leaves no hole
                    for first, stop in durable:  # what was written survives a crash
                        first = max(first, log.start)
                        if first < stop:
                            assert log.read(first, stop - first) == model[first:stop]
                for first, stop in held_runs(log):
                    assert all(handed[first:stop])
                    assert log.read(first, stop - first) == model[first:stop]
        finally:
            log.close()


async def test_consoles_that_print_together_do_not_flush_together(tmp_path: Path) -> None:
    """Each hub's flush comes a random 0.5-1 share of LOG_FLUSH_SECONDS after new output."""
    loop = asyncio.get_running_loop()
    hubs = []
    for i in range(50):
        vm = VmConfig(id=f"vm-{i}", subscription="sub-1", serial="tcp://127.0.0.1:1")
        hub = ConsoleHub(vm, LimitsConfig(), log_dir=tmp_path)
        hub.bind_loop(loop)
        hubs.append(hub)
    # Each delay lies between when - after and when - before: the host may pause this
    # process anywhere, and the bounds still hold, with no allowance for its speed.
    spans = []
    for hub in hubs:
        before = loop.time()
        hub.publish(b"the same moment on every console\r\n")
        after = loop.time()
        timer = hub._flush_timer  # the schedule is what is tested
        assert timer is not None
        spans.append((timer.when() - after, timer.when() - before))
    low, high = LOG_FLUSH_SECONDS * LOG_FLUSH_MIN_SHARE, LOG_FLUSH_SECONDS
    assert all(shortest <= high and longest >= low for shortest, longest in spans), spans
    # 50 draws: spread, not bunched (the largest delay is at least the largest `shortest`).
    assert max(s for s, _ in spans) - min(longest for _, longest in spans) > (high - low) / 2
    for hub in hubs:
        hub.close_log()
        assert hub.log is not None
        assert hub.log.flushed_end == hub.log.end  # close flushes what the timer had not
