"""The operators' HAProxy config: documented verbatim, valid, and saying what the docs say.

tests/cluster/test_cluster_processes.py runs it in front of three gateways;
these checks are the cheap half: the file and docs/operations.md agree, and
HAProxy itself accepts the file.
"""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

import pytest

from relayd.config import LimitsConfig, parse_duration

from .processes import HAPROXY_CFG, ROOT

TEXT = HAPROXY_CFG.read_text()


def _directive(name: str) -> list[str]:
    """The lines of the file that start with `name` (indentation and comments removed)."""
    lines = (line.split("#", 1)[0].strip() for line in TEXT.splitlines())
    return [line for line in lines if line.startswith(name)]


def test_haproxy_config_in_operations_md_is_the_file_verbatim() -> None:
    """docs/operations.md shows exactly docs/haproxy-relayd.cfg (what the tests run)."""
    operations = (ROOT / "docs" / "operations.md").read_text()
    assert f"```\n{TEXT}```\n" in operations


def test_haproxy_config_checks_readyz_on_the_health_port_and_cuts_down_servers() -> None:
    """httpchk /readyz on port 9100, 1 s checks, fall/rise 2, sessions cut, PROXY v2."""
    assert _directive("mode") == ["mode tcp"]
    assert _directive("balance") == ["balance roundrobin"]
    assert _directive("option httpchk") == ["option httpchk GET /readyz"]
    (default_server,) = _directive("default-server")
    for needed in (
        "check",
        "port 9100",
        "inter 1s",
        "fall 2",
        "rise 2",
        "on-marked-down shutdown-sessions",
        "send-proxy-v2",
    ):
        assert re.search(rf"(^|\s){needed}(\s|$)", default_server), needed
    assert not [line for line in TEXT.splitlines() if re.search(r"\bssl\b", line.split("#")[0])]


def test_haproxy_config_tunnel_timeout_outlasts_the_keepalive_interval() -> None:
    """An idle console is kept: the tunnel timeout is above relayd's ping interval."""
    (tunnel,) = _directive("timeout tunnel")
    ping = LimitsConfig.model_fields["keepalive_interval"].default
    assert parse_duration(tunnel.split()[-1]) >= 2 * ping


def test_haproxy_accepts_the_config_file(tmp_path: Path) -> None:
    """`haproxy -c` with a site's global section in front of it: valid."""
    binary = shutil.which("haproxy") or "/usr/sbin/haproxy"
    if not Path(binary).exists():
        pytest.fail("haproxy is not installed; `make test` installs it")
    local = tmp_path / "global.cfg"
    local.write_text("global\n    maxconn 100\n    log stdout format raw local0\n")
    checked = subprocess.run(
        [binary, "-c", "-q", "-f", str(local), "-f", str(HAPROXY_CFG)],
        capture_output=True,
        text=True,
        check=False,
        timeout=30,
    )
    assert checked.returncode == 0, checked.stdout + checked.stderr
