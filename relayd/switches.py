"""Serial-console switches set by owners at run time, persisted in the state directory.

The config says what is enabled by default; `PUT .../serial-console` records
an override per subscription, per scale set or per VM. A console is enabled
only when every level above it is. The file is replaced atomically (write,
fsync, rename, fsync the directory), so a crash leaves the old or the new
state, never half of one; a file that cannot be parsed stops the daemon at
start rather than silently re-enabling consoles someone turned off.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Literal

from .errors import ConfigError

Level = Literal["subscriptions", "scale_sets", "vms"]
LEVELS: tuple[Level, ...] = ("subscriptions", "scale_sets", "vms")
FILENAME = "serial-console.json"


class ConsoleSwitches:
    """Overrides of `serial_console`, keyed by level and id."""

    def __init__(self, state_dir: Path) -> None:
        self.path = state_dir / FILENAME
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
        """Record an override and persist it before returning."""
        self._state[level][key] = enabled
        self.path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        tmp = self.path.with_suffix(".tmp")
        data = json.dumps(self._state, indent=1, sort_keys=True).encode() + b"\n"
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        try:
            os.write(fd, data)
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, self.path)
        dir_fd = os.open(self.path.parent, os.O_RDONLY)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)
