"""The I/O side of a hub: keep its port open, write its queued input, run its hooks.

One `keep_port` task per VM, owned by the gateway's task group, for the life of the
daemon. The hub (hub.py) holds the console's state and the keystroke path, and its
input queue (inputqueue.py) decides what is written when; both are compiled (native.py)
and have no coroutines, because mypyc has had bugs with exception state across `await`.
Everything here awaits, so it stays interpreted: it only waits and does the I/O, on
reconnects, pastes and hooks, not once per keystroke (a key goes straight from
`ConsoleHub.submit` to the port while nothing is queued).
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable

from .errors import HookError, PortUnavailableError
from .hooks import run_hook
from .hub import ConsoleHub, QueuedHook
from .inputqueue import Break, Operation, Write
from .log import get_logger
from .ports import SerialLink, open_link

log = get_logger("relayd.hub")

OPEN_TIMEOUT = 10.0
# A far end that accepts no input for this long (a hung guest, a full UART FIFO) gets its
# queued input dropped and the writer read again, so BREAK, SysRq and reset can still arrive.
STALL_SECONDS = 5.0
BACKOFF_FIRST = 0.1
BACKOFF_MAX = 30.0


async def keep_port(hub: ConsoleHub) -> None:
    """Keep the port open until cancelled, reconnecting with backoff; run hooks meanwhile."""
    hub.bind_loop(asyncio.get_running_loop())
    async with asyncio.TaskGroup() as tg:
        tg.create_task(_hook_loop(hub))
        await _keep_port_open(hub)


async def wait_until(hub: ConsoleHub, predicate: Callable[[], bool]) -> None:
    """Wait until `predicate()` holds; re-checked on every change of port, output or lease."""
    while not predicate():
        await hub.next_change()


async def _hook_loop(hub: ConsoleHub) -> None:
    """Queued reset/NMI commands, one at a time, in the order asked for."""
    while True:
        while not hub.hook_queue:
            hub.hooks_ready.clear()
            await hub.hooks_ready.wait()
        await _run_hook(hub, hub.hook_queue.popleft())


async def _keep_port_open(hub: ConsoleHub) -> None:
    backoff = BACKOFF_FIRST
    bound = log.bind(vm=hub.vm.id, serial=str(hub.vm.serial))
    while True:
        try:
            async with asyncio.timeout(OPEN_TIMEOUT):
                link = await open_link(hub.vm)
        except (PortUnavailableError, OSError, TimeoutError) as exc:
            hub.first_attempt.set()
            hub.stats.port_errors += 1
            hub.stats.last_error = str(exc) or "open timed out"
            bound.info("port_open_failed", error=hub.stats.last_error, retry_in=backoff)
            await asyncio.sleep(backoff)
            backoff = min(backoff * 2, BACKOFF_MAX)
            continue
        backoff = BACKOFF_FIRST
        hub.port_opened(link)
        bound.info("port_up")
        try:
            link.start(hub.publish)
            error = await _run_link(hub, link)
        finally:
            hub.port_closed()  # first: nothing is accepted while it closes
            await link.close()
        hub.stats.port_errors += 1
        hub.stats.last_error = str(error) or type(error).__name__
        hub.stats.reconnects += 1
        bound.info("port_down", error=hub.stats.last_error, retry_in=backoff)
        await asyncio.sleep(backoff)


async def _run_link(hub: ConsoleHub, link: SerialLink) -> OSError | PortUnavailableError:
    """Watch the far end and write queued input until the port fails; that failure.

    Not a TaskGroup: on Python 3.11 a TaskGroup already ending because a child failed
    (the far end went away) swallows a cancel of its parent task that arrives meanwhile
    and raises the child's error instead, so a keeper cancelled at that moment (its VM
    released, the gateway stopping) would take it for a port error and reconnect
    forever, holding a single-client chardev and keeping the gateway from exiting.
    Here a cancel always ends the keeper.

    Raises:
        Exception: what a child raised that is no port failure (a bug).
    """
    tasks = [asyncio.create_task(_watch(link)), asyncio.create_task(_write_loop(hub, link))]
    try:
        done, _ = await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
    finally:
        for task in tasks:
            task.cancel()
        await asyncio.wait(tasks)  # both end at once; none outlives the port
    errors = [t.exception() for t in tasks if t in done and not t.cancelled()]
    for error in errors:
        if error is not None and not isinstance(error, OSError | PortUnavailableError):
            raise error
    failure = next((e for e in errors if e is not None), None)
    assert isinstance(failure, OSError | PortUnavailableError)  # neither child returns
    return failure


async def _watch(link: SerialLink) -> None:
    """End the link's task group when the far end goes away."""
    try:
        await link.wait_closed()
    except OSError as exc:
        raise PortUnavailableError(f"the serial port failed: {exc}") from None
    raise PortUnavailableError("the far end closed the serial port")


async def _write_loop(hub: ConsoleHub, link: SerialLink) -> None:
    """Ask the input queue what to do next, wait as long as it says, do it, report it."""
    loop = asyncio.get_running_loop()
    while True:
        op = hub.input.next(loop.time())
        if op is None:
            hub.input_ready.clear()
            await hub.input_ready.wait()
            continue
        written = 0
        try:
            written = await _carry_out(hub, op, link)
        finally:
            hub.input_written(written)  # once per operation, even when cancelled


async def _carry_out(hub: ConsoleHub, op: Operation, link: SerialLink) -> int:
    """One operation: a chunk of input, a BREAK (and SysRq key) or a hangup; bytes written."""
    if isinstance(op, Write):
        if op.delay:
            await asyncio.sleep(op.delay)
        await _lease_held(hub)
        await _write_or_stall(hub, link, op.data)  # handed over either way
        return len(op.data)
    await _lease_held(hub)
    if isinstance(op, Break):
        await _send_break(hub, link)
        if op.key:
            await _lease_held(hub)
            await _write_or_stall(hub, link, op.key)
        return 0
    await link.hangup()
    return 0


async def _lease_held(hub: ConsoleHub) -> None:
    """Wait while this gateway's lease on the VM has lapsed by its own clock (cluster mode).

    A gateway that was frozen (SIGSTOP) finds input waiting when it runs again, before
    its first round can tell it that another gateway owns the VM now: that input waits
    for the round, which renews the lease (then it goes) or closes the port (then it is
    dropped). Returns at once while the lease holds, as it always does on one gateway.
    """
    loop = asyncio.get_running_loop()
    if loop.time() < hub.lease_expiry:
        return  # no wait, no closure: this runs for every chunk of queued input
    await wait_until(hub, lambda: loop.time() < hub.lease_expiry)


async def _send_break(hub: ConsoleHub, link: SerialLink) -> None:
    """BREAK in-band or through the hook; a failure is told to clients, not fatal."""
    try:
        if hub.vm.break_command:
            await run_hook(hub.vm.break_command, vm=hub.vm.id, what="break_command")
        else:
            await link.send_break()
    except (HookError, NotImplementedError) as exc:
        hub.break_failed(str(exc))


async def _run_hook(hub: ConsoleHub, hook: QueuedHook) -> None:
    try:
        status = await run_hook(hook.argv, vm=hub.vm.id, what=hook.name)
    except HookError as exc:
        hub.hook_done(hook, ok=False, message=str(exc))
        return
    hub.hook_done(hook, ok=True, status=status)


async def _write_or_stall(hub: ConsoleHub, link: SerialLink, data: bytes) -> None:
    """Write (handed over at once, then wait while not drained); a stall drops queued keys."""
    try:
        async with asyncio.timeout(STALL_SECONDS):
            await link.write(data)
    except TimeoutError:
        hub.input_stalled(STALL_SECONDS)
