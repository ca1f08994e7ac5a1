"""The simulated guest's scratch filesystem: files in memory, under one size cap.

Paths are absolute and normalized (`ScratchFilesystem.path` resolves what a
user types); directories are implied by the files under them, as in an
object store, so there is nothing to create or remove but files.
"""

from __future__ import annotations

import posixpath

__all__ = ["MAX_FS_BYTES", "ScratchFilesystem"]

MAX_FS_BYTES = 16 * 1024 * 1024
"""Size of the scratch filesystem; writes beyond it fail with ENOSPC."""


class ScratchFilesystem:
    """The guest's files, held in memory.

    Args:
        home: the user's home directory, where relative names resolve.
        capacity: bytes all files may hold together.
    """

    def __init__(self, home: str, *, capacity: int = MAX_FS_BYTES) -> None:
        self.home = home
        self._capacity = capacity
        self._files: dict[str, bytearray] = {}
        self._used = 0

    def path(self, name: str) -> str:
        """The absolute path of a name typed at the shell (`~`, relative or absolute)."""
        if name == "~" or name.startswith("~/"):
            name = self.home + name[1:]
        return posixpath.normpath(posixpath.join(self.home, name))

    def read(self, path: str) -> bytes | None:
        """A file's contents; None if there is no file at `path`."""
        data = self._files.get(path)
        return None if data is None else bytes(data)

    def is_file(self, path: str) -> bool:
        """Whether `path` is a file."""
        return path in self._files

    def is_dir(self, path: str) -> bool:
        """Whether `path` is `/`, the home directory, or holds a file."""
        return path in ("/", self.home) or any(p.startswith(path + "/") for p in self._files)

    def children(self, path: str) -> list[str]:
        """The names directly under directory `path`, sorted."""
        prefix = path.rstrip("/") + "/"
        return sorted({p[len(prefix) :].split("/")[0] for p in self._files if p.startswith(prefix)})

    def write(self, path: str, data: bytes, *, append: bool) -> bool:
        """Create, truncate or append; False (and nothing written) when the disk is full."""
        file = self._files.setdefault(path, bytearray())
        if not append:
            self._used -= len(file)
            file.clear()
        if self._used + len(data) > self._capacity:
            return False
        file += data
        self._used += len(data)
        return True

    def remove(self, path: str) -> bool:
        """Delete the file at `path`; False if there is none."""
        data = self._files.pop(path, None)
        if data is None:
            return False
        self._used -= len(data)
        return True
