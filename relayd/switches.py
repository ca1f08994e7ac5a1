"""Serial-console switches set by owners at run time, persisted in the state directory.

The config says what is enabled by default; `PUT .../serial-console` records
an override per subscription, per scale set or per VM. A console is enabled
only when every level above it is. A scale set is keyed by subscription,
resource group and name (`scale_set_key`): the same name in two resource
groups is two scale sets with two owners. A change is written before it is
applied, and the file is replaced atomically (write, fsync, rename, fsync the
directory), so a crash leaves the old or the new state, never half of one,
and a write that fails (disk full) changes nothing and is answered 500; a
file that cannot be parsed stops the daemon at start rather than silently
re-enabling consoles someone turned off.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Literal

from .errors import ConfigError, StateWriteError
from .log import get_logger

log = get_logger("relayd.switches")

Level = Literal["subscriptions", "scale_sets", "vms"]
LEVELS: tuple[Level, ...] = ("subscriptions", "scale_sets", "vms")
FILENAME = "serial-console.json"


def scale_set_key(subscription: str, resource_group: str, name: str) -> str:
    """The switch key of a scale set (config names hold no "/", so the key is unambiguous)."""
    return f"{subscription}/{resource_group}/{name}"


class ConsoleSwitches:
    """Overrides of `serial_console`, keyed by level and id."""

    def __init__(self, state_dir: Path) -> None:
        self.path = state_dir / FILENAME
        self.temp_path = self.path.with_suffix(".tmp")
        self._state: dict[str, dict[str, bool]] = {level: {} for level in LEVELS}
        # In a cluster, when each override last changed (`ClusterStore.set_switch`): what
        # this gateway puts back after Redis loses its data is ordered by it.
        self._times: dict[str, dict[str, int]] = {level: {} for level in LEVELS}

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
        if not (isinstance(raw, dict) and isinstance(raw.get("times", {}), dict)):
            raise ConfigError(str(self.path), "", "not a console switch file (edit or remove it)")
        times = raw.get("times", {})
        ok = all(
            isinstance(raw.get(level, {}), dict)
            and all(isinstance(v, bool) for v in raw.get(level, {}).values())
            and isinstance(times.get(level, {}), dict)
            and all(
                isinstance(t, int) and not isinstance(t, bool)
                for t in times.get(level, {}).values()
            )
            for level in LEVELS
        )
        if not ok:
            raise ConfigError(str(self.path), "", "not a console switch file (edit or remove it)")
        self._state = {level: dict(raw.get(level, {})) for level in LEVELS}
        self._times = {level: dict(times.get(level, {})) for level in LEVELS}

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
            self._write(self._dump(state))
        except OSError as exc:
            reason = exc.strerror or type(exc).__name__
            log.error("state_write_failed", path=str(self.path), error=reason)
            raise StateWriteError(
                f"the console switch could not be saved ({reason}); the console was not changed"
            ) from None
        self._state = state

    def snapshot(self) -> dict[str, dict[str, bool]]:
        """Every override, per level (a copy)."""
        return {level: dict(overrides) for level, overrides in self._state.items()}

    def times(self) -> dict[str, dict[str, int]]:
        """When each override last changed, where known (a copy; see `replace`)."""
        return {level: dict(times) for level, times in self._times.items()}

    def replace(
        self, state: Mapping[str, Mapping[str, bool]], times: Mapping[str, Mapping[str, int]]
    ) -> None:
        """Keep `state` as the whole set of overrides (a cluster's local copy of the region's),
        with when each changed.

        Raises:
            OSError: the file could not be written; memory keeps the new state anyway.
        """
        self._state = {level: dict(state.get(level, {})) for level in LEVELS}
        self._times = {level: dict(times.get(level, {})) for level in LEVELS}
        self._write(self._dump(self._state))

    def adopt_legacy_scale_sets(self, scale_sets: Iterable[tuple[str, str, str]]) -> None:
        """Rewrite scale-set keys of the old form `sub/name` for the configured scale sets.

        Before scale sets were keyed by resource group, one key covered every scale
        set of that name in the subscription. Migrating must never turn on a console
        an owner turned off, so:

        - an old disable applies to every configured scale set of that name (all the
          resource groups it may have meant; each owner can turn theirs back on);
          a switch already written in the new form is left as it is;
        - an old disable that matches no configured scale set is kept as it is and
          adopted when one of that name appears (at a reload or restart);
        - an old enable is dropped: a scale set has no default to override, so it
          never had an effect.

        The file is rewritten when anything changed; if that fails the change still
        holds in memory (and is made again at the next start), with a warning.
        """
        table = self._state["scale_sets"]
        legacy = {key: on for key, on in table.items() if key.count("/") == 1}
        if not legacy:
            return
        by_name: dict[tuple[str, str], list[str]] = {}
        for sub, rg, name in scale_sets:
            by_name.setdefault((sub, name), []).append(scale_set_key(sub, rg, name))
        changed = False
        for key, enabled in legacy.items():
            sub, _, name = key.partition("/")
            targets = sorted(by_name.get((sub, name), ()))
            if enabled:
                del table[key]
                changed = True
                log.info("legacy_switch_dropped", key=key, enabled=True)
            elif not targets:
                log.warning("legacy_switch_pending", key=key, enabled=False)
            else:
                for target in targets:
                    table.setdefault(target, False)
                del table[key]
                changed = True
                log.warning("legacy_switch_adopted", key=key, enabled=False, scale_sets=targets)
        if changed:
            try:
                self._write(self._dump(self._state))
            except OSError as exc:
                log.warning("legacy_switch_not_saved", path=str(self.path), error=str(exc))

    def _dump(self, state: Mapping[str, Mapping[str, bool]]) -> bytes:
        data: dict[str, object] = dict(state)
        if any(self._times.values()):  # a cluster's copy; a single gateway has none
            data["times"] = self._times
        return json.dumps(data, indent=1, sort_keys=True).encode() + b"\n"

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
