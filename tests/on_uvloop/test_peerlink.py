"""Peer links on uvloop, the daemon's loop: every test of tests/test_peerlink.py again.

uvloop's TLS transport is its own code (set_protocol, pause_reading,
write-buffer accounting, close and abort), so the relay is checked on it too.
This directory's conftest.py `pytest_asyncio_loop_factories` puts this module
on uvloop.
"""

from __future__ import annotations

import asyncio

import uvloop

from ..test_peerlink import *  # noqa: F403 - the same tests, collected here on uvloop
from ..test_peerlink import Pki, peer_ctx


async def test_peer_link_runs_on_uvloop(pki: Pki) -> None:
    """The tests this module re-collects do run on uvloop (and so does a peer context)."""
    assert isinstance(asyncio.get_running_loop(), uvloop.Loop)
    assert peer_ctx(pki).verify_mode.name == "CERT_REQUIRED"
