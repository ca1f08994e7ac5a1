"""bench/hop.py (the forwarded hop's benchmark) imports and reads its command line; nothing runs."""

from __future__ import annotations

import pytest

from bench import hop


def test_hop_parse_defaults_match_issue_16() -> None:
    """With no arguments: 3 gateways, 1,000 typists per case at 10 keys/s, 50 flooding VMs."""
    args = hop.parse([])
    assert (args.gateways, args.typists, args.rate, args.flood_vms) == (3, 1000, 10.0, 50)
    assert args.rounds == 2
    assert not args.no_pin


def test_hop_parse_options_are_read() -> None:
    """Every size can be set from the command line."""
    args = hop.parse(
        ["--gateways", "2", "--typists", "300", "--seconds", "5", "--flood-vms", "0", "--no-pin"]
    )
    assert (args.gateways, args.typists, args.seconds, args.flood_vms) == (2, 300, 5.0, 0)
    assert args.no_pin


def test_hop_parse_more_gateways_refused() -> None:
    """Only 2 or 3 gateways: the loopback addresses and the CPU budget are planned for those."""
    with pytest.raises(SystemExit):
        hop.parse(["--gateways", "4"])


def test_hop_diff_rates_leave_out_the_samplers_info() -> None:
    """Command rates between two readings exclude the sampler's own INFO and count client calls."""
    a = {"t": 0.0, "relay": [1.0, 2.0], "redis": 0.5, "net_in": 0, "calls": {"evalsha": 10}}
    b = {
        "t": 2.0,
        "relay": [1.5, 2.5],
        "redis": 0.7,
        "net_in": 4_000_000,
        "calls": {"evalsha": 30, "info": 2, "xadd": 40, "mget": 2},
    }
    d = hop.Sampler.diff(a, b)
    assert d["redis_calls_per_s"] == {"xadd": 20.0, "evalsha": 10.0, "mget": 1.0}
    assert d["redis_client_commands_per_s"] == 11.0
    assert d["redis_commands_per_s"] == 31.0
    assert d["relay_cpu_s"] == 1.0
    assert d["redis_in_mb_per_s"] == 2.0


def test_hop_flood_appended_is_what_redis_stored_even_when_no_append_was_acknowledged() -> None:
    """Output flows and Redis stores it, but every answer came after the gateways' deadline:
    the figure once read the gateways' counter and said 0.0 MB/s appended."""
    r = hop.flood_rates(
        2.0, delivered=1_400_000_000, stored=60_000_000, acknowledged=0.0, failed=7.0
    )
    assert r["appended_mb_per_s"] == 30.0
    assert (r["acknowledged_mb_per_s"], r["failed_appends"]) == (0.0, 7)
    assert r["delivered_mb_per_s"] == 700.0
    assert hop.flood_rates(2.0, 0, None, 0.0, 0.0)["appended_mb_per_s"] is None  # not counted
