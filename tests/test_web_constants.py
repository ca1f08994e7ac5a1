"""web/src/protocol-constants.js is control.py's subprotocol and close codes, as generated."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
SCRIPT = ROOT / "scripts" / "gen-web-constants.py"
COMMITTED = ROOT / "web" / "src" / "protocol-constants.js"


def _check(output: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, str(SCRIPT), "--check", "--output", str(output)],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


def test_web_constants_committed_module_matches_control() -> None:
    """The page's constants are what control.py says (else: run gen-web-constants.py)."""
    result = _check(COMMITTED)
    assert result.returncode == 0, result.stdout


def test_web_constants_module_differing_from_control_fails_the_check(tmp_path: Path) -> None:
    """A hand-edited close code is caught, with a diff naming the line."""
    edited = tmp_path / "protocol-constants.js"
    edited.write_text(COMMITTED.read_text().replace("= 4001;", "= 4002;"))
    result = _check(edited)
    assert result.returncode == 1
    assert "-export const CLOSE_TAKEN_OVER = 4002;" in result.stdout
    assert "+export const CLOSE_TAKEN_OVER = 4001;" in result.stdout
