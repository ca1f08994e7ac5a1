"""Builds relayd's keystroke path with mypyc; metadata lives in setup.cfg.

`relayd/native.py` lists the modules and says why. Compiling needs mypy (mypyc) and the
runtime dependencies importable, so that the compiled code is typed exactly as
`mypy --strict` checks it: `make native` (in place, for the working tree) and `make
wheel` (a deployable wheel) build in the project's venv. Anywhere mypyc is missing, or
with RELAYD_NATIVE=0, or when the C compile fails, relayd is built as pure Python.

Beside the compiled modules (in place, or in the wheel) the build writes native.py's
manifest: the hash of each source as mypyc read it, so that an import can tell a
compiled module from an outdated one.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

from setuptools import Extension, setup
from setuptools.command.build_ext import build_ext

sys.path.insert(0, str(Path(__file__).resolve().parent))
from relayd.native import MANIFEST_NAME, NATIVE_MODULES, RUNTIME_GROUP, manifest, source_path


def native_extensions() -> tuple[list[Extension], str]:
    """The compiled modules and their manifest; none (pure Python) where they cannot be built."""
    if os.environ.get("RELAYD_NATIVE", "1") == "0":
        return [], ""
    try:
        from mypyc.build import mypycify
    except ImportError:
        print("relayd: mypyc is not installed; building pure Python", file=sys.stderr)
        return [], ""
    # Hashed before mypyc reads the sources: an edit during the build makes the result stale.
    recorded = manifest({name: source_path(name) for name in NATIVE_MODULES})
    paths = [name.replace(".", "/") + ".py" for name in NATIVE_MODULES]
    extensions: list[Extension] = mypycify(paths, opt_level="3", group_name=RUNTIME_GROUP)
    return extensions, recorded


EXTENSIONS, MANIFEST = native_extensions()


class BuildExtWithManifest(build_ext):
    """build_ext, then the manifest beside the compiled modules (in place or in build/lib)."""

    def run(self) -> None:
        """Build; write the manifest only once every module compiled."""
        super().run()
        if self.extensions and MANIFEST:
            package_dir = Path(self.get_ext_fullpath(NATIVE_MODULES[0])).parent
            (package_dir / MANIFEST_NAME).write_text(MANIFEST)


setup(ext_modules=EXTENSIONS, cmdclass={"build_ext": BuildExtWithManifest})
