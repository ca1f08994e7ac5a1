"""The serial writer's input queue: what goes to the port next, when, and when to hold back.

One per console. The writer's keystrokes and pastes, its BREAKs and SysRq keys, and the
console's on_detach action wait here for the port, which takes them at the line rate.
The queue decides; the hub carries out what it answers to `offer` (ConsoleHub.submit,
on the keystroke path) and the keeper's write loop asks `next` what to do, waits the
delay, does it and reports `written`. No I/O and no clock: `now` is a parameter.

    offer                  when                                         answer
    ---------------------  -------------------------------------------  -----------
    bytes, now given       nothing queued or out, fits one chunk,       write_now
    (the port writable)    tokens in the bucket now
    bytes                  otherwise, and held bytes stay under `high`  queued
    bytes                  held bytes reach `high` (not yet paused)     pause
    Break                  fewer than MAX_QUEUED_BREAKS waiting         queued
    Break                  MAX_QUEUED_BREAKS waiting                    refused

    next(now)   nothing queued, or an operation out: None. Otherwise the oldest
                Break, else the oldest Hangup or one chunk of the oldest bytes,
                as Write(data, delay): the token bucket's wait before writing.
    written(n)  the operation is done, n bytes reached the port: True when a paused
                client may send again (held bytes are down to half of `high`).
    drop, stall a writer or port went away, or the port took nothing for too long:
                forget queued input (stall keeps BREAKs); a paused client resumes.

*Held* bytes are those queued plus the chunk out. `high` is about a second of line time
(at least 4 KiB): the writer's socket is not read while a second is held (backpressure to
its TCP window, not buffering), and is read again when half of it has gone. Bytes go out
in chunks of 20 ms of line time, one chunk per write, so a BREAK (which jumps ahead of
queued bytes, behind earlier BREAKs, keeping a scripted s-u-b in order) waits behind at
most the one chunk already out.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass
from typing import Literal

from .throttle import TokenBucket

# BREAKs are slow (a tty BREAK holds the line for ~0.25 s) and carry no bytes for the
# input bound: past this many waiting, more are refused, not queued, so a writer sending
# them in a loop cannot grow the queue (or the audit log) without end.
MAX_QUEUED_BREAKS = 8
# The pause mark is about one second of line time, never under this.
MIN_HIGH_BYTES = 4096
# Input is written in chunks of this share of a second of line time (20 ms)...
CHUNKS_PER_SECOND = 50
# ...and never in chunks smaller than this.
MIN_CHUNK_BYTES = 16


# What the caller of `InputQueue.offer` does with what it offered: write it to the port
# now (it is counted as written), leave it to the keeper, leave it and stop reading the
# client until `written` says resume, or let it go (too many BREAKs waiting). Strings, not
# an Enum: this is answered per keystroke, and an Enum member costs a ~100 ns lookup.
Offer = Literal["write_now", "queued", "pause", "refused"]


@dataclass(frozen=True)
class Break:
    """A serial BREAK, then `key` (Linux magic SysRq) when there is one."""

    key: bytes = b""


@dataclass(frozen=True)
class Hangup:
    """Drop DTR (on_detach = hangup)."""


@dataclass(frozen=True)
class Write:
    """Wait `delay` seconds (the line rate), then write `data` to the port."""

    data: bytes
    delay: float = 0.0


Operation = Write | Break | Hangup


class InputQueue:
    """One console's input, paced at `rate` bytes/s; see the module docstring."""

    def __init__(self, rate: int) -> None:
        self._breaks: deque[Break] = deque()  # always ahead of _items
        self._items: deque[bytes | Hangup] = deque()
        self._sent = 0  # bytes of _items[0] already handed out
        self._queued = 0  # bytes in _items not yet handed out
        self._out = False  # an operation is out (between next and written)
        self._out_bytes = 0  # ... and the queued bytes it carries
        self._paused = False
        self.bytes_written = 0
        self.pace(rate)

    def pace(self, rate: int) -> None:
        """Chunk, bucket and watermark for a line of `rate` bytes/s (at start and on reload)."""
        self.chunk = max(MIN_CHUNK_BYTES, rate // CHUNKS_PER_SECOND)
        self.bucket = TokenBucket(rate, burst=max(self.chunk, rate // 10))
        self.high = max(MIN_HIGH_BYTES, rate)

    @property
    def held_bytes(self) -> int:
        """Bytes queued plus those out with the keeper: what the watermarks count."""
        return self._queued + self._out_bytes

    @property
    def queued_breaks(self) -> int:
        """BREAKs waiting (not the one out)."""
        return len(self._breaks)

    @property
    def paused(self) -> bool:
        """Whether "pause" was answered, and no resume since."""
        return self._paused

    def __len__(self) -> int:
        """Operations waiting (a partly written paste counts once)."""
        return len(self._breaks) + len(self._items)

    def offer(self, item: bytes | Break, now: float | None = None) -> Offer:
        """Take the writer's input or a BREAK; says what the caller does with it.

        Args:
            item: keyboard bytes, or a BREAK (with its SysRq key).
            now: the clock in seconds, given when the port can take bytes at once (a
                keystroke may then skip the queue); None when it cannot.
        """
        if isinstance(item, Break):
            if len(self._breaks) >= MAX_QUEUED_BREAKS:
                return "refused"
            self._breaks.append(item)
            return "queued"
        n = len(item)
        if (
            now is not None
            and not self._out
            and not self._breaks
            and not self._items
            and n <= self.chunk
            and self.bucket.take(n, now)
        ):
            self.bytes_written += n
            return "write_now"
        self._items.append(item)
        self._queued += n
        if not self._paused and self._queued + self._out_bytes >= self.high:
            self._paused = True
            return "pause"
        return "queued"

    def next(self, now: float) -> Operation | None:
        """The next operation to carry out, or None (nothing queued, or one is out).

        A Write's tokens are taken now; its `delay` is how long to wait before writing.
        Until `written` reports this operation done, nothing else is handed out and no
        offer is written at once.
        """
        if self._out:
            return None
        if self._breaks:
            self._out = True
            return self._breaks.popleft()
        if not self._items:
            return None
        self._out = True
        head = self._items[0]
        if isinstance(head, Hangup):
            self._items.popleft()
            return head
        start = self._sent
        data = head[start : start + self.chunk]  # the object itself when it is all of head
        if start + len(data) >= len(head):
            self._items.popleft()
            self._sent = 0
        else:
            self._sent = start + len(data)
        self._queued -= len(data)
        self._out_bytes = len(data)
        return Write(data, self.bucket.reserve(len(data), now))

    def written(self, n: int) -> bool:
        """The operation out is done, `n` bytes of it reached the port; True: resume the client.

        Called once per operation `next` handed out, whatever became of it (a write that
        stalled, a BREAK that failed, a cancelled wait: `n` is then 0).
        """
        if not self._out:
            raise RuntimeError("written() without an operation out: call next() first")
        self._out = False
        self._out_bytes = 0
        self.bytes_written += n
        return self._resume_due()

    def drop(self, then: bytes | Hangup | None = None) -> bool:
        """Forget everything queued (its writer or port is gone), then queue `then`.

        `then` is the on_detach action. True when a paused client should resume: always,
        if one is paused, since what it was held back for is gone.
        """
        self._breaks.clear()
        self._drop_items()
        if then is not None:
            self._items.append(then)
            if isinstance(then, bytes):
                self._queued += len(then)
        return self._unpause()

    def stall(self) -> tuple[int, bool]:
        """The port took nothing for too long: drop queued bytes, keep BREAKs and hangups.

        Returns the bytes dropped and whether a paused client should resume (it should:
        BREAK, SysRq and reset must still be able to reach a hung guest).
        """
        dropped = self._queued
        hangups = [item for item in self._items if isinstance(item, Hangup)]
        self._drop_items()
        self._items.extend(hangups)
        return dropped, self._unpause()

    def _drop_items(self) -> None:
        self._items.clear()
        self._sent = 0
        self._queued = 0

    def _resume_due(self) -> bool:
        if self._paused and self._queued + self._out_bytes <= self.high // 2:
            self._paused = False
            return True
        return False

    def _unpause(self) -> bool:
        was, self._paused = self._paused, False
        return was
