"""A recording `HubClient` and a hub kept by its real keeper, for the hub's and keeper's tests.

`RecordingClient` is a small real class implementing hub.py's `HubClient` Protocol:
it keeps what the hub tells it and wakes waiters on every call, so a test awaits
what it expects (never sleeps). `keeping(hub)` runs `keeper.keep_port` on a hub
until the block ends.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from typing import Any

from relayd.config import LimitsConfig, VmConfig
from relayd.hub import ConsoleHub
from relayd.keeper import keep_port, wait_until
from relayd.principal import Principal

from .conftest import TIMEOUT


class RecordingClient:
    """An attached session that keeps what the hub tells it (a `HubClient`)."""

    def __init__(self, session_id: str, principal: str = "user:alice") -> None:
        self.session_id = session_id
        self.principal = Principal(principal)
        self.peer = "192.0.2.1"
        self.region = "test"
        self.role = ""
        self.take_output = True  # False: a client too slow to take anything
        self.output = bytearray()
        self.deliveries: list[tuple[int, bytes, bytes]] = []
        self.messages: list[dict[str, Any]] = []
        self.closed: tuple[int, str] | None = None
        self.paused = False
        self.pauses = 0
        self._changed = asyncio.Event()

    # -- HubClient ------------------------------------------------------------------------

    def deliver(self, offset: int, data: bytes, frame: bytes) -> None:
        """Keep the output, unless this client plays a slow one."""
        if self.take_output:
            self.deliveries.append((offset, data, frame))
            self.output += data
        self._changed.set()

    def send_text(self, text: str) -> None:
        """Keep the control message, decoded."""
        self.messages.append(json.loads(text))
        self._changed.set()

    def hand_off(self, reason: str) -> None:
        """A direct client: closed with 1001, as the gateway's own sessions are."""
        self.close(1001, f"{reason}; reconnect to resume")

    def close(self, code: int, reason: str) -> None:
        """Remember the close code and reason."""
        self.closed = (code, reason)
        self._changed.set()

    def set_role(self, role: str) -> None:
        """Take the role the hub decided."""
        self.role = role
        self._changed.set()

    def pause_input(self) -> None:
        """The hub's input queue is full."""
        self.paused = True
        self.pauses += 1
        self._changed.set()

    def resume_input(self) -> None:
        """The hub has room again."""
        self.paused = False
        self._changed.set()

    # -- for the tests ------------------------------------------------------------------

    def notices(self, event: str) -> list[dict[str, Any]]:
        """The notices of one kind received so far."""
        return [m for m in self.messages if m["type"] == "notice" and m["event"] == event]

    async def wait_for(self, predicate: Callable[[], bool]) -> None:
        """Wait until `predicate()` holds, re-checked whenever the hub calls this client."""
        async with asyncio.timeout(TIMEOUT):
            while not predicate():
                self._changed.clear()
                await self._changed.wait()

    async def notice(self, event: str, **fields: Any) -> dict[str, Any]:
        """Wait for a notice of this kind with these fields; returns it."""

        def found() -> dict[str, Any] | None:
            for m in self.notices(event):
                if all(m.get(k) == v for k, v in fields.items()):
                    return m
            return None

        await self.wait_for(lambda: found() is not None)
        message = found()
        assert message is not None
        return message


def make_hub(serial: str = "tcp://127.0.0.1:1", **vm: Any) -> ConsoleHub:
    """A hub for VM `vm-a` on `serial`, with default limits and no on-disk log."""
    config = VmConfig(id="vm-a", subscription="sub-1", serial=serial, **vm)
    return ConsoleHub(config, LimitsConfig())


@asynccontextmanager
async def keeping(hub: ConsoleHub, *, wait_up: bool = True) -> AsyncIterator[ConsoleHub]:
    """Run the hub's keeper (its port's I/O) until the block ends; first wait for the port."""
    task = asyncio.create_task(keep_port(hub))
    try:
        if wait_up:
            async with asyncio.timeout(TIMEOUT):
                await wait_until(hub, lambda: hub.port_up)
        yield hub
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
