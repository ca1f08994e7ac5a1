"""Audit events: who reached which console, from where, as what, and how it ended.

Audit events go to their own logger with `audit=true` so a log shipper can
route them apart. The set of event names is fixed here; fields are bound
keys. Never pass a token, ticket, password or keystroke to `audit`.
"""

from __future__ import annotations

from typing import Any

import structlog

EVENTS = frozenset(
    {
        "auth_failed",
        "access_denied",
        "session_started",
        "session_ended",
        "writer_evicted",
        "writer_demoted",
        "takeover_denied",
        "break_sent",
        "sysrq_sent",
        "hook_run",
        "hook_finished",
        "console_switched",
        "vms_listed",
        "console_log_read",
        "ticket_issued",
    }
)

_log = structlog.get_logger("relayd.audit")


def audit(event: str, **fields: Any) -> None:
    """Emit one audit event.

    Raises:
        ValueError: `event` is not one of `EVENTS` (a programming error).
    """
    if event not in EVENTS:
        raise ValueError(f"unknown audit event {event!r}")
    _log.info(event, audit=True, **fields)
