"""systemd service notifications (`Type=notify`, `WatchdogSec=`), sent directly.

The protocol is one datagram of newline-separated `KEY=value` lines to the
AF_UNIX socket named by `$NOTIFY_SOCKET` (a path, or `@name` for the
abstract namespace), as sd_notify(3) describes; writing it here saves a C
dependency for a dozen lines. Outside systemd the variable is unset and
every call is a no-op, so the daemon runs the same under a shell or a test.

Failures are logged (`sd_notify_failed`) and reported as False, never raised:
a lost READY=1 makes systemd time the start-up out, which is the right
outcome and easier to diagnose from the log than a crash would be.
"""

from __future__ import annotations

import asyncio
import os
import socket

from .log import get_logger

__all__ = ["Notifier"]

log = get_logger("relayd.sdnotify")


class Notifier:
    """Sends state changes and watchdog pings to systemd.

    Args:
        address: the AF_UNIX address to send to (a path, or a str starting
            with NUL for the abstract namespace); None disables the notifier.
        watchdog_interval: seconds between `WATCHDOG=1` pings; None when
            systemd asked for none.
    """

    def __init__(self, address: str | None, watchdog_interval: float | None = None) -> None:
        if watchdog_interval is not None and watchdog_interval <= 0:
            raise ValueError(f"watchdog_interval must be positive, not {watchdog_interval}")
        self._address = address
        self.enabled = address is not None
        self.watchdog_interval = watchdog_interval if self.enabled else None
        self._sock: socket.socket | None = None

    @classmethod
    def from_environment(cls) -> Notifier:
        """Read `NOTIFY_SOCKET`, `WATCHDOG_USEC` and `WATCHDOG_PID` as systemd sets them.

        The watchdog pings at half of `WATCHDOG_USEC`, as sd_watchdog_enabled(3)
        recommends, and only in the process `WATCHDOG_PID` names (when set):
        the variables are inherited by children that must not ping for us.
        """
        raw = os.environ.get("NOTIFY_SOCKET", "")
        if not raw:
            return cls(None)
        if raw.startswith("@"):
            address = "\0" + raw[1:]
        elif raw.startswith("/"):
            address = raw
        else:
            log.warning(
                "sd_notify_failed",
                error=f"unsupported NOTIFY_SOCKET {raw!r}: want an absolute path or @name",
            )
            return cls(None)
        return cls(address, _watchdog_interval())

    def notify(self, *lines: str) -> bool:
        """Send one notification, such as `notify("READY=1", "STATUS=serving 3 vms")`.

        Returns:
            True when the datagram was sent; False when the notifier is
            disabled or the send failed (logged as `sd_notify_failed`).
        """
        if self._address is None:
            return False
        if any("\n" in line for line in lines):
            # One line per assignment: a newline would smuggle in another one.
            log.warning("sd_notify_failed", error="a notification line contains a newline")
            return False
        try:
            if self._sock is None:
                self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC)
                self._sock.setblocking(False)
            self._sock.sendto("\n".join(lines).encode(), self._address)
        # BlockingIOError (a full queue) is a failed send like any other OSError;
        # ValueError covers text that cannot be encoded.
        except (OSError, ValueError) as exc:
            log.warning(
                "sd_notify_failed",
                error=str(exc) or type(exc).__name__,
                socket=self._address.replace("\0", "@", 1),
            )
            return False
        return True

    def close(self) -> None:
        """Release the socket; a later `notify` opens a new one."""
        if self._sock is not None:
            self._sock.close()
            self._sock = None

    async def watchdog(self) -> None:
        """Ping `WATCHDOG=1` from the event loop until cancelled.

        A loop blocked for longer than `WatchdogSec=` stops the pings and
        systemd restarts the daemon. Returns at once when no watchdog was asked for.
        """
        if self.watchdog_interval is None:
            return
        while True:
            self.notify("WATCHDOG=1")
            await asyncio.sleep(self.watchdog_interval)


def _watchdog_interval() -> float | None:
    """Half of `WATCHDOG_USEC` in seconds, when the watchdog is meant for this process."""
    pid = os.environ.get("WATCHDOG_PID", "")
    if pid and pid != str(os.getpid()):
        return None
    raw = os.environ.get("WATCHDOG_USEC", "")
    if not raw:
        return None
    try:
        usec = int(raw)
    except ValueError:
        usec = 0
    if usec <= 0:
        log.warning("sd_watchdog_ignored", error=f"WATCHDOG_USEC {raw!r} is not a positive integer")
        return None
    return usec / 2 / 1_000_000
