"""Serial-console switches set by owners at run time, persisted in the state directory.

The config says what is enabled by default; `PUT .../serial-console` records
an override per subscription, per scale set or per VM. A console is enabled
only when every level above it is. A change is written before it is applied,
and the file is replaced atomically (write, fsync, rename, fsync the
directory), so a crash leaves the old or the new state, never half of one,
and a write that fails (disk full) changes nothing and is answered 500; a
file that cannot be parsed stops the daemon at start rather than silently
re-enabling consoles someone turned off.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Literal

from .errors import ConfigError, StateWriteError
from .log import get_logger

log = get_logger("relayd.switches")

Level = Literal["subscriptions", "scale_sets", "vms"]
LEVELS: tuple[Level, ...] = ("subscriptions", "scale_sets", "vms")
FILENAME = "serial-console.json"


class ConsoleSwitches:
    """Overrides of `serial_console`, keyed by level and id."""

    def __init__(self, state_dir: Path) -> None:
        self.path = state_dir / FILENAME
        self.temp_path = self.path.with_suffix(".tmp")
        self._state: dict[str, dict[str, bool]] = {level: {} for level in LEVELS}

    def load(self) -> None:
        """Read the file if it exists.

        Raises:
            ConfigError: the file exists but is not a valid switch file.
        """
        try:
            raw = json.loads(self.path.read_text(encoding="utf-8"))
        except FileNotFoundError:
            return
        except (OSError, ValueError) as exc:
            raise ConfigError(str(self.path), "", f"cannot read console switches: {exc}") from None
        ok = isinstance(raw, dict) and all(
            isinstance(raw.get(level, {}), dict)
            and all(isinstance(v, bool) for v in raw.get(level, {}).values())
            for level in LEVELS
        )
        if not ok:
            raise ConfigError(str(self.path), "", "not a console switch file (edit or remove it)")
        self._state = {level: dict(raw.get(level, {})) for level in LEVELS}

    def get(self, level: Level, key: str) -> bool | None:
        """The override at this level, or None when the config default applies."""
        return self._state[level].get(key)

    def set(self, level: Level, key: str, enabled: bool) -> None:
        """Persist an override, then apply it: what the API answers is what a restart reads.

        Raises:
            StateWriteError: the file could not be written (disk full, read-only);
                nothing changed, in memory or on disk.
        """
        state = {name: dict(overrides) for name, overrides in self._state.items()}
        state[level][key] = enabled
        try:
            self._write(json.dumps(state, indent=1, sort_keys=True).encode() + b"\n")
        except OSError as exc:
            reason = exc.strerror or type(exc).__name__
            log.error("state_write_failed", path=str(self.path), error=reason)
            raise StateWriteError(
                f"the console switch could not be saved ({reason}); the console was not changed"
            ) from None
        self._state = state

    def _write(self, data: bytes) -> None:
        """Replace the file atomically: temp file, fsync, rename (the commit), fsync the directory.

        Raises:
            OSError: the new file is not in place; the old one is untouched.
        """
        self.path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        fd = os.open(self.temp_path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        try:
            try:
                view = memoryview(data)
                while view:  # os.write may write less than asked
                    view = view[os.write(fd, view) :]
                os.fsync(fd)
            finally:
                os.close(fd)
            os.replace(self.temp_path, self.path)
        except OSError:
            # A half-written temp file holds space on a full disk and is never read.
            self.temp_path.unlink(missing_ok=True)
            raise
        # Renamed: the new state is what the file says and what a restart reads. A failed
        # directory fsync only leaves a power cut able to undo it; the change stands.
        try:
            dir_fd = os.open(self.path.parent, os.O_RDONLY)
            try:
                os.fsync(dir_fd)
            finally:
                os.close(dir_fd)
        except OSError as exc:
            log.error("state_fsync_failed", path=str(self.path.parent), error=exc.strerror)
