#!/usr/bin/env python3
"""Refuse a wheel whose compiled modules differ from relayd/native.py's list.

A leftover compiled module would shadow its (newer) source in every install; a wheel
whose manifest does not match the sources it carries would run interpreted (relayd
would find its own compiled modules stale).
"""

from __future__ import annotations

import hashlib
import json
import sys
import zipfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from relayd.native import MANIFEST_NAME, NATIVE_MODULES, RUNTIME_GROUP


def main(wheel: str) -> int:
    """Compare the wheel's extension modules and manifest with the list; print what differs."""
    archive = zipfile.ZipFile(wheel)
    names = archive.namelist()
    built = {n.split(".cpython-")[0].replace("/", ".") for n in names if n.endswith(".so")}
    wanted = {*NATIVE_MODULES, RUNTIME_GROUP + "__mypyc"}
    if built != wanted:
        print(f"{wheel}: extra {sorted(built - wanted)}, missing {sorted(wanted - built)}")
        return 1
    try:
        recorded = json.loads(archive.read(f"relayd/{MANIFEST_NAME}"))["modules"]
    except KeyError:
        print(f"{wheel}: no relayd/{MANIFEST_NAME} beside the compiled modules")
        return 1
    carried = {
        module: hashlib.sha256(archive.read(module.replace(".", "/") + ".py")).hexdigest()
        for module in NATIVE_MODULES
    }
    if recorded != carried:
        differ = sorted(m for m in {*recorded, *carried} if recorded.get(m) != carried.get(m))
        print(f"{wheel}: {MANIFEST_NAME} does not match the sources of {differ}")
        return 1
    print(f"{wheel}: {len(NATIVE_MODULES)} compiled modules, as listed, with their manifest")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1]))
