"""Operator-configured commands (break, NMI, reset hooks): run without a shell, with a deadline.

Kept out of hub.py, which is compiled (see native.py): nothing here is on the keystroke
path, and `Process.communicate` returns None for a stream that is not piped, which its
stubs do not say and which a compiled caller would check.
"""

from __future__ import annotations

import asyncio
import contextlib

from .errors import HookError
from .log import get_logger

log = get_logger("relayd.hub")

HOOK_TIMEOUT = 10.0


async def run_hook(argv: tuple[str, ...], *, vm: str, what: str) -> int:
    """Run an operator-configured command (no shell) with a deadline.

    Raises:
        HookError: the command failed to start, timed out or exited non-zero.
    """
    try:
        proc = await asyncio.create_subprocess_exec(
            *argv,
            stdin=asyncio.subprocess.DEVNULL,
            stdout=asyncio.subprocess.DEVNULL,
            stderr=asyncio.subprocess.PIPE,
        )
    except OSError as exc:
        raise HookError(f"{what} could not start: {exc.strerror}") from None
    try:
        async with asyncio.timeout(HOOK_TIMEOUT):
            _, err = await proc.communicate()
    except TimeoutError:
        with contextlib.suppress(ProcessLookupError):
            proc.kill()
        await proc.wait()
        raise HookError(f"{what} timed out after {HOOK_TIMEOUT:g}s") from None
    except asyncio.CancelledError:  # the daemon stops or the VM is removed: no orphan
        with contextlib.suppress(ProcessLookupError):
            proc.kill()
        raise
    status = proc.returncode or 0
    log.info("hook_ran", vm=vm, hook=what, status=status)
    if status != 0:
        detail = err.decode("utf-8", "replace").strip().splitlines()[-1:] or [""]
        raise HookError(f"{what} exited with status {status}: {detail[0][:200]}")
    return status
