"""The chaos checker (bench/chaos.py) sees what it must, and only that.

A checker that never fires proves nothing: each rule is shown to fire on a
stream that breaks it, and to stay quiet on the losses the contract allows.
"""

from __future__ import annotations

from bench.chaos import Checker, StreamState, VmSpec, record

VM = "vm-0"


def checker(*serves: int | None) -> Checker:
    """A checker for one slow VM whose record n went to serial connection `serves[n]`."""
    spec = VmSpec(VM, fast=False, rate=0)
    spec.serve_of = dict(enumerate(serves))
    spec.next_seq = len(serves)
    return Checker({VM: spec})


def printed(*seqs: int) -> bytes:
    return b"".join(record(VM, n, False) for n in seqs)


def kinds(c: Checker) -> list[str]:
    return [v["kind"] for v in c.violations]


def connect(c: Checker, stream: StreamState, start: int, asked: int | None = None) -> None:
    c.hello(stream, {"offset": start, "replay": 0}, asked)


def test_a_clean_stream_across_a_reconnect_is_clean() -> None:
    c = checker(1, 1, 1, 1)
    stream = StreamState("s", VM)
    connect(c, stream, 0)
    data = printed(0, 1, 2, 3)
    c.output(stream, data[:50])
    connect(c, stream, 50, asked=50)
    c.output(stream, data[50:])
    c.body("log", VM, 0, data)
    assert kinds(c) == []
    assert stream.last_seq == 3


def test_two_different_bytes_at_one_offset_is_a_violation() -> None:
    c = checker(1, 1, 2)
    stream = StreamState("s", VM)
    connect(c, stream, 0)
    c.output(stream, printed(0, 1))
    c.body("log", VM, len(record(VM, 0, False)), printed(2))  # seq 2 where seq 1 was shown
    assert "two_bytes_at_one_offset" in kinds(c)


def test_a_duplicate_or_reordered_record_is_a_violation() -> None:
    c = checker(1, 1, 1)
    stream = StreamState("s", VM)
    connect(c, stream, 0)
    c.output(stream, printed(0, 1))
    c.output(stream, printed(1))
    assert kinds(c) == ["sequence_not_increasing"]


def test_a_byte_inside_a_gap_announced_to_the_client_is_a_violation() -> None:
    c = checker(1, 1, 1)
    stream = StreamState("s", VM)
    connect(c, stream, 0)
    c.output(stream, printed(0))
    c.output_gap(stream, 100, 199)
    connect(c, stream, 150, asked=200)
    assert "hello_before_from" in kinds(c)
    c.output(stream, printed(2))
    assert "byte_in_announced_gap" in kinds(c)


def test_a_gap_the_client_was_not_told_of_is_a_violation() -> None:
    c = checker(1, 1, 1)
    stream = StreamState("s", VM)
    connect(c, stream, 0)
    c.output(stream, printed(0))
    c.output_gap(stream, stream.position + 10, stream.position + 20)  # type: ignore[operator]
    assert kinds(c) == ["gap_not_announced"]


def test_records_lost_from_a_connection_that_went_on_are_a_violation() -> None:
    c = checker(1, 1, 1)
    stream = StreamState("s", VM)
    connect(c, stream, 0)
    c.output(stream, printed(0, 2))
    assert kinds(c) == ["records_lost"]


def test_output_lost_while_the_port_changed_hands_is_allowed_torn_record_too() -> None:
    # Record 1 went to a connection that ended (torn: only its start was read), record 2
    # was printed while nobody held the port, record 3 came on the next connection.
    c = checker(1, 1, None, 2)
    stream = StreamState("s", VM)
    connect(c, stream, 0)
    c.output(stream, printed(0) + record(VM, 1, False)[:9] + printed(3))
    assert kinds(c) == []
    assert c.lost_records_allowed == 2


def test_foreign_bytes_between_records_are_a_violation() -> None:
    c = checker(1, 1, 2)
    stream = StreamState("s", VM)
    connect(c, stream, 0)
    c.output(stream, printed(0) + b"garbage" + printed(2))
    assert "foreign_bytes" in kinds(c)


def test_a_gap_the_server_announced_allows_missing_records() -> None:
    c = checker(1, 1, 1, 1)
    stream = StreamState("s", VM)
    connect(c, stream, 0)
    first = printed(0)
    c.output(stream, first)
    c.output_gap(stream, len(first), len(first) + 999)
    c.output(stream, record(VM, 1, False)[5:] + printed(2))  # starts mid-record: allowed
    assert kinds(c) == []
