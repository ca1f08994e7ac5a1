"""Tests here run on uvloop, the daemon's own loop; the rest of the suite on asyncio's."""

from __future__ import annotations

from collections.abc import Callable, Mapping

import pytest
import uvloop


def pytest_asyncio_loop_factories(
    config: pytest.Config, item: pytest.Item
) -> Mapping[str, Callable[[], uvloop.Loop]]:
    """Only items under this directory see this hook (pytest scopes conftest hooks by path)."""
    return {"uvloop": uvloop.new_event_loop}
