"""Tests for relayd.inputqueue: the writer's input queue, on a clock that moves when told.

No event loop: the tests play the hub (offers) and the keeper (next, wait the delay,
written) in whatever order Hypothesis picks, and check what would reach the port.
"""

from __future__ import annotations

from collections import deque

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, precondition, rule

from relayd.inputqueue import MAX_QUEUED_BREAKS, Break, Hangup, InputQueue, Write

RATE = 11520  # 115200 baud: 230-byte chunks, pause at 11,520 bytes held, resume at 5,760


def drain(queue: InputQueue, now: float = 0.0) -> list[Write | Break | Hangup]:
    """Play the keeper until nothing is left, waiting every delay; the operations in order."""
    ops: list[Write | Break | Hangup] = []
    while (op := queue.next(now)) is not None:
        ops.append(op)
        if isinstance(op, Write):
            now += op.delay
        queue.written(len(op.data) if isinstance(op, Write) else 0)
    return ops


def test_inputqueue_keystroke_with_nothing_queued_is_written_now() -> None:
    """An idle queue with tokens answers write_now and counts the bytes as written."""
    queue = InputQueue(RATE)
    assert queue.offer(b"a", 0.0) == "write_now"
    assert queue.bytes_written == 1
    assert len(queue) == 0
    assert queue.next(0.0) is None


def test_inputqueue_keystroke_port_not_writable_is_queued() -> None:
    """Without a clock (the port cannot take bytes now) a keystroke waits for the keeper."""
    queue = InputQueue(RATE)
    assert queue.offer(b"a") == "queued"
    assert queue.bytes_written == 0
    assert drain(queue) == [Write(b"a")]
    assert queue.bytes_written == 1


def test_inputqueue_keystroke_while_an_operation_is_out_is_queued_behind_it() -> None:
    """A key typed while the keeper writes goes after that write, never around it."""
    queue = InputQueue(RATE)
    queue.offer(b"x" * 1000)
    first = queue.next(0.0)
    assert first == Write(b"x" * queue.chunk)
    assert queue.offer(b"k", 0.0) == "queued"
    queue.written(queue.chunk)
    assert (
        b"".join(op.data for op in drain(queue) if isinstance(op, Write))
        == b"x" * (1000 - queue.chunk) + b"k"
    )


def test_inputqueue_keystroke_longer_than_a_chunk_is_queued() -> None:
    """A message over one chunk is paced by the keeper, even on an idle queue."""
    queue = InputQueue(RATE)
    assert queue.offer(b"p" * (queue.chunk + 1), 0.0) == "queued"


def test_inputqueue_keystrokes_past_the_burst_are_queued_and_paced() -> None:
    """Once the bucket is empty, keys queue and the keeper is told how long to wait."""
    queue = InputQueue(100)  # 16-byte chunks, a 16-byte burst
    assert queue.offer(b"0123456789abcdef", 0.0) == "write_now"
    assert queue.offer(b"g", 0.0) == "queued"
    op = queue.next(0.0)
    assert isinstance(op, Write)
    assert (op.data, op.delay) == (b"g", pytest.approx(0.01))


def test_inputqueue_paste_is_cut_in_chunks_of_20_ms_of_line_time() -> None:
    """Each write carries rate/50 bytes at most, in order, each after its share of the wait."""
    queue = InputQueue(RATE)
    paste = bytes(range(256)) * 40
    queue.offer(paste, 0.0)
    ops = drain(queue)
    assert all(isinstance(op, Write) and len(op.data) <= RATE // 50 for op in ops)
    assert b"".join(op.data for op in ops if isinstance(op, Write)) == paste
    total_wait = sum(op.delay for op in ops if isinstance(op, Write))
    assert total_wait == pytest.approx((len(paste) - queue.bucket.burst) / RATE)


def test_inputqueue_break_offered_mid_paste_goes_after_the_chunk_out() -> None:
    """A BREAK waits behind the one chunk already out, not behind the rest of the paste."""
    queue = InputQueue(RATE)
    queue.offer(b"p" * 5000, 0.0)
    out = queue.next(0.0)
    assert isinstance(out, Write)
    assert queue.offer(Break(b"h")) == "queued"
    queue.written(len(out.data))
    assert queue.next(0.0) == Break(b"h")


def test_inputqueue_sysrq_keys_go_out_in_the_order_pressed() -> None:
    """s, u, b (sync, remount, reboot) jump queued bytes but keep their own order."""
    queue = InputQueue(RATE)
    queue.offer(b"queued paste")
    for key in b"sub":
        queue.offer(Break(bytes([key])))
    assert drain(queue) == [Break(b"s"), Break(b"u"), Break(b"b"), Write(b"queued paste")]


def test_inputqueue_breaks_past_the_bound_are_refused() -> None:
    """MAX_QUEUED_BREAKS waiting: the next BREAK is refused and nothing is queued."""
    queue = InputQueue(RATE)
    for _ in range(MAX_QUEUED_BREAKS):
        assert queue.offer(Break()) == "queued"
    assert queue.offer(Break(b"b")) == "refused"
    assert queue.queued_breaks == MAX_QUEUED_BREAKS
    assert queue.next(0.0) == Break()
    assert queue.offer(Break(b"b")) == "queued"  # the one out no longer counts


def test_inputqueue_second_of_line_time_held_pauses_once() -> None:
    """Pause when a second of line time is held, then only queue while still paused."""
    queue = InputQueue(RATE)
    assert queue.offer(b"x" * (RATE - 1)) == "queued"
    assert queue.offer(b"x") == "pause"
    assert queue.paused
    assert queue.offer(b"x") == "queued"


def test_inputqueue_paused_client_resumes_when_held_bytes_halve() -> None:
    """`written` says resume exactly once, the first time held bytes are down to half."""
    queue = InputQueue(RATE)
    assert queue.offer(b"x" * RATE) == "pause"
    resumes = 0
    while (op := queue.next(0.0)) is not None:
        assert isinstance(op, Write)
        paused_before = queue.paused
        resume = queue.written(len(op.data))
        assert resume == (paused_before and queue.held_bytes <= queue.high // 2)
        resumes += resume
    assert resumes == 1


def test_inputqueue_watermark_is_at_least_4_kib() -> None:
    """A slow line still lets a 4 KiB burst in before pausing."""
    queue = InputQueue(300)
    assert queue.high == 4096
    assert queue.offer(b"x" * 4095) == "queued"
    assert queue.offer(b"x") == "pause"


def test_inputqueue_drop_forgets_everything_and_queues_on_detach() -> None:
    """A writer leaving drops its keys and BREAKs, resumes it, and queues on_detach alone."""
    queue = InputQueue(RATE)
    queue.offer(b"x" * RATE)
    queue.offer(Break(b"b"))
    assert queue.drop(then=b"exit\r") is True
    assert not queue.paused
    assert drain(queue) == [Write(b"exit\r")]
    queue.offer(Break())
    assert queue.drop(then=Hangup()) is False  # nobody was paused
    assert drain(queue) == [Hangup()]


def test_inputqueue_drop_while_a_chunk_is_out_keeps_the_count_exact() -> None:
    """The chunk out when the queue is dropped leaves the count once, when it is written."""
    queue = InputQueue(RATE)
    queue.offer(b"x" * 1000)
    out = queue.next(0.0)
    assert isinstance(out, Write)
    queue.drop()
    assert queue.held_bytes == len(out.data)
    queue.offer(b"y" * 10)
    assert queue.written(len(out.data)) is False
    assert queue.held_bytes == 10


def test_inputqueue_stall_drops_bytes_keeps_breaks_and_hangups() -> None:
    """A port that takes nothing: queued keys go, a SysRq and the hangup still get through."""
    queue = InputQueue(RATE)
    queue.drop(then=Hangup())
    queue.offer(b"x" * RATE)
    queue.offer(Break(b"c"))
    assert queue.stall() == (RATE, True)
    assert queue.held_bytes == 0
    assert drain(queue) == [Break(b"c"), Hangup()]


def test_inputqueue_reload_repaces_chunk_bucket_and_watermark() -> None:
    """`pace` applies a reloaded input rate to what is still queued."""
    queue = InputQueue(RATE)
    queue.offer(b"x" * 10_000)
    queue.pace(1_000_000)
    assert (queue.chunk, queue.high) == (20_000, 1_000_000)
    assert drain(queue) == [Write(b"x" * 10_000)]


def test_inputqueue_written_without_an_operation_out_raises() -> None:
    """Reporting a write nobody was handed is a bug in the caller, caught at once."""
    with pytest.raises(RuntimeError, match="without an operation out"):
        InputQueue(RATE).written(0)


@given(
    rate=st.integers(50, 200_000),
    steps=st.lists(
        st.one_of(
            st.tuples(st.just("type"), st.binary(min_size=1, max_size=3000)),
            st.tuples(st.just("break"), st.binary(max_size=1)),
            st.tuples(st.just("keeper"), st.floats(0, 0.5)),
            st.tuples(st.just("wait"), st.floats(0, 0.5)),
        ),
        max_size=60,
    ),
)
@settings(max_examples=200, deadline=None)
def test_inputqueue_every_byte_reaches_the_port_once_and_in_order(
    rate: int, steps: list[tuple[str, object]]
) -> None:
    """Whatever the interleaving of offers, keeper turns and time, the port sees the input."""
    queue = InputQueue(rate)
    now = 0.0
    typed, port = bytearray(), bytearray()
    breaks_offered: list[bytes] = []
    breaks_out: list[bytes] = []
    for what, arg in steps:
        if what == "type":
            assert isinstance(arg, bytes)
            typed += arg
            if queue.offer(arg, now) == "write_now":
                port += arg
        elif what == "break":
            assert isinstance(arg, bytes)
            if queue.offer(Break(arg)) == "queued":
                breaks_offered.append(arg)
        elif what == "keeper":
            op = queue.next(now)
            if isinstance(op, Write):
                port += op.data
                now += op.delay
            elif isinstance(op, Break):
                breaks_out.append(op.key)
            if op is not None:
                queue.written(len(op.data) if isinstance(op, Write) else 0)
        else:
            assert isinstance(arg, float)
            now += arg
    for op in drain(queue, now):
        if isinstance(op, Write):
            port += op.data
        elif isinstance(op, Break):
            breaks_out.append(op.key)
    assert port == typed
    assert breaks_out == breaks_offered
    assert queue.bytes_written == len(typed)


class KeeperMachine(RuleBasedStateMachine):
    """The hub and the keeper around one queue, at random times, against a model.

    The model is the input still owed to the port: BREAKs in the order offered, then
    bytes and hangups in the order offered (bytes dropped by a takeover or a stall
    leave it). Every byte the queue hands out must be the model's next one. The client
    obeys backpressure: it sends nothing between the pause and the resume.
    """

    MAX_MESSAGE = 3000

    def __init__(self) -> None:
        super().__init__()
        self.queue = InputQueue(RATE)
        self.now = 0.0
        self.breaks: deque[bytes] = deque()
        self.items: deque[bytearray | Hangup] = deque()
        self.out: Write | Break | Hangup | None = None
        self.due = 0.0  # when the keeper writes the Write that is out
        self.paused = False
        self.handed = 0  # bytes handed to the port, ...
        self.max_overdraft = 0.0  # ... and how far past the line rate that ever was

    @initialize(rate=st.integers(50, 500_000))
    def start(self, rate: int) -> None:
        self.queue = InputQueue(rate)

    def _owed_bytes(self) -> int:
        return sum(len(item) for item in self.items if isinstance(item, bytearray))

    def _hand_out(self, n: int, at: float) -> None:
        self.handed += n
        allowed = self.queue.bucket.burst + self.queue.bucket.rate * at
        self.max_overdraft = max(self.max_overdraft, self.handed - allowed)

    @rule(dt=st.floats(0, 1.0))
    def time_passes(self, dt: float) -> None:
        self.now += dt

    @precondition(lambda self: not self.paused)
    @rule(data=st.binary(min_size=1, max_size=MAX_MESSAGE), writable=st.booleans())
    def client_types(self, data: bytes, writable: bool) -> None:
        held_before = self.queue.held_bytes
        answer = self.queue.offer(data, self.now if writable else None)
        if answer == "write_now":
            assert writable
            assert self.out is None, "written around the operation out"
            assert not self.breaks, "written ahead of a BREAK"
            assert not self.items, "written ahead of queued input"
            assert len(data) <= self.queue.chunk
            self._hand_out(len(data), self.now)
            return
        self.items.append(bytearray(data))
        if answer == "pause":
            assert held_before + len(data) >= self.queue.high
            self.paused = True
        else:
            assert answer == "queued"
            assert held_before + len(data) < self.queue.high

    @rule(key=st.sampled_from([b"", b"s", b"u", b"b"]))
    def client_sends_break(self, key: bytes) -> None:
        answer = self.queue.offer(Break(key))
        if answer == "refused":
            assert len(self.breaks) == MAX_QUEUED_BREAKS
        else:
            assert answer == "queued"
            self.breaks.append(key)

    @precondition(lambda self: self.out is None)
    @rule()
    def keeper_asks(self) -> None:
        op = self.queue.next(self.now)
        if self.breaks:
            assert op == Break(self.breaks.popleft()), "a BREAK was passed over"
        elif not self.items:
            assert op is None
        elif isinstance(self.items[0], Hangup):
            assert op == self.items.popleft()
        else:
            assert isinstance(op, Write)
            head = self.items[0]
            assert isinstance(head, bytearray)
            assert 0 < len(op.data) <= self.queue.chunk
            assert op.data == head[: len(op.data)], "bytes lost, reordered or duplicated"
            del head[: len(op.data)]
            if not head:
                self.items.popleft()
            self.due = self.now + op.delay
            self._hand_out(len(op.data), self.due)
        self.out = op

    @precondition(lambda self: self.out is not None)
    @rule(late=st.floats(0, 0.1))
    def keeper_reports(self, late: float) -> None:
        if isinstance(self.out, Write):
            self.now = max(self.now, self.due + late)  # it slept the delay, then wrote
        n = len(self.out.data) if isinstance(self.out, Write) else 0
        self.out = None
        resume = self.queue.written(n)
        if self.paused:
            assert resume == (self.queue.held_bytes <= self.queue.high // 2)
            self.paused = not resume
        else:
            assert not resume

    @precondition(lambda self: isinstance(self.out, Write))
    @rule()
    def port_stalls(self) -> None:
        dropped, resume = self.queue.stall()
        assert dropped == self._owed_bytes()
        assert resume == self.paused
        self.paused = False
        self.items = deque(item for item in self.items if isinstance(item, Hangup))

    @rule(then=st.sampled_from([None, b"exit\r", Hangup()]))
    def writer_leaves(self, then: bytes | Hangup | None) -> None:
        assert self.queue.drop(then) == self.paused
        self.paused = False
        self.breaks.clear()
        self.items.clear()
        if then is not None:
            self.items.append(bytearray(then) if isinstance(then, bytes) else then)

    @invariant()
    def held_bytes_match_the_model(self) -> None:
        out = len(self.out.data) if isinstance(self.out, Write) else 0
        assert self.queue.held_bytes == self._owed_bytes() + out
        assert len(self.queue) == len(self.breaks) + len(self.items)

    @invariant()
    def backpressure_bounds_what_is_held(self) -> None:
        assert self.queue.paused == self.paused
        assert self.queue.held_bytes < self.queue.high + self.MAX_MESSAGE

    @invariant()
    def line_rate_is_never_exceeded(self) -> None:
        assert self.max_overdraft <= 1e-6 * self.handed + 1e-6


KeeperMachine.TestCase.settings = settings(max_examples=150, stateful_step_count=60, deadline=None)
test_inputqueue_keeper_and_hub_at_random_times_keep_every_invariant = KeeperMachine.TestCase
