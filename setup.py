"""Builds relayd's keystroke path with mypyc; metadata lives in setup.cfg.

`relayd/native.py` lists the modules and says why. Compiling needs mypy (mypyc) and the
runtime dependencies importable, so that the compiled code is typed exactly as
`mypy --strict` checks it: `make native` (in place, for the working tree) and `make
wheel` (a deployable wheel) build in the project's venv. Anywhere mypyc is missing, or
with RELAYD_NATIVE=0, or when the C compile fails, relayd is built as pure Python.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

from setuptools import Extension, setup

sys.path.insert(0, str(Path(__file__).resolve().parent))
from relayd.native import NATIVE_MODULES, RUNTIME_GROUP


def native_extensions() -> list[Extension]:
    """The compiled modules, or none (pure Python) where they cannot or should not be built."""
    if os.environ.get("RELAYD_NATIVE", "1") == "0":
        return []
    try:
        from mypyc.build import mypycify
    except ImportError:
        print("relayd: mypyc is not installed; building pure Python", file=sys.stderr)
        return []
    paths = [name.replace(".", "/") + ".py" for name in NATIVE_MODULES]
    extensions: list[Extension] = mypycify(paths, opt_level="3", group_name=RUNTIME_GROUP)
    return extensions


setup(ext_modules=native_extensions())
