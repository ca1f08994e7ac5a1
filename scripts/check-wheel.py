#!/usr/bin/env python3
"""Refuse a wheel whose compiled modules differ from relayd/native.py's list.

A leftover compiled module would shadow its (newer) source in every install.
"""

from __future__ import annotations

import sys
import zipfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from relayd.native import NATIVE_MODULES, RUNTIME_GROUP


def main(wheel: str) -> int:
    """Compare the wheel's extension modules with the list; print what differs."""
    names = zipfile.ZipFile(wheel).namelist()
    built = {n.split(".cpython-")[0].replace("/", ".") for n in names if n.endswith(".so")}
    wanted = {*NATIVE_MODULES, RUNTIME_GROUP + "__mypyc"}
    if built == wanted:
        print(f"{wheel}: {len(NATIVE_MODULES)} compiled modules, as listed")
        return 0
    print(f"{wheel}: extra {sorted(built - wanted)}, missing {sorted(wanted - built)}")
    return 1


if __name__ == "__main__":
    sys.exit(main(sys.argv[1]))
