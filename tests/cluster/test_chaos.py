"""Console offsets hold under chaos: a bounded, seeded run of bench/chaos.py on real processes.

Redis, three gateways, HAProxy and one-client serial ends (harness.py); two VMs
print fast and four slowly; spectators through HAProxy and straight to the
gateways reconnect with ``?from=`` after every disconnect; `/console-log` is read
on every gateway. The seeded schedule inflicts each kind of fault at least once
(kill -9, SIGSTOP past the lease, SIGTERM, Redis stop/start, CLIENT PAUSE, Redis
restarted empty). bench/chaos.py's module docstring says what the checker holds
the region to; `python -m bench.chaos` is the long soak (docs/operations.md).
"""

from __future__ import annotations

import pytest

from bench.chaos import FAULTS, run

from .harness import Region, region

__all__ = ["region"]  # the fixture, imported so pytest finds it

pytestmark = pytest.mark.asyncio(loop_scope="module")

SEED = 20261207
CHAOS_SECONDS = 35.0
"""Long enough for the six kinds of fault once each (with recovery between), short
enough for the suite's budget on two cores."""


async def test_console_offsets_and_log_hold_under_a_seeded_fault_schedule(region: Region) -> None:
    """No offset carries two bytes, no client sees a record twice or out of order, and
    nothing is missing but what the server announced or no gateway read."""
    outcome = await run(region, seconds=CHAOS_SECONDS, seed=SEED, fast_rate=200_000)
    assert outcome.violation_count == 0, outcome.summary()
    assert not outcome.stalls, outcome.summary()
    assert {f["fault"] for f in outcome.faults} == set(FAULTS), outcome.summary()
    assert outcome.stats["records"] > 0, outcome.summary()
    assert outcome.stats["reconnects"] > 0, outcome.summary()
