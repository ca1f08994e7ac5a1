"""Log events a test can wait for: a structlog processor that wakes the test.

`structlog.testing.capture_logs(processors=[waiter])` runs `waiter` on every
event before capturing it, so a test awaits the event that says something
happened (a failed handshake, a reconnect attempt) instead of sleeping.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, MutableMapping
from typing import Any

from .conftest import TIMEOUT


class LogWaiter:
    """A structlog processor that keeps every event and wakes whoever waits for one."""

    def __init__(self) -> None:
        self.events: list[dict[str, Any]] = []
        self._changed = asyncio.Event()

    def __call__(
        self, _logger: Any, _name: str, event: MutableMapping[str, Any]
    ) -> MutableMapping[str, Any]:
        self.events.append(dict(event))
        self._changed.set()
        return event

    def named(self, name: str) -> list[dict[str, Any]]:
        """The events of one name so far."""
        return [e for e in self.events if e["event"] == name]

    async def wait_for(self, predicate: Callable[[], bool]) -> None:
        """Wait until `predicate()` holds, re-checked at every log event."""
        async with asyncio.timeout(TIMEOUT):
            while not predicate():
                self._changed.clear()
                await self._changed.wait()
