"""Simulated VMs on serial consoles, for `relayd demo` and the tests.

Three layers, each importing only the ones below it:

- `server.SimulatedGuest`: the asyncio server around one machine, behaving
  like QEMU's socket chardev (one console client at a time, telnet on TCP,
  raw on a unix socket);
- `machine.GuestMachine`: the guest without I/O: kernel console, SysRq,
  tty line discipline, getty/login, output jobs;
- `shell.Shell` and `filesystem.ScratchFilesystem`: the commands a logged-in
  user runs, against files held in memory.
"""

from .machine import BREAK, Break, GuestMachine
from .server import SimulatedGuest
from .shell import MAX_SEQ

__all__ = ["BREAK", "MAX_SEQ", "Break", "GuestMachine", "SimulatedGuest"]
