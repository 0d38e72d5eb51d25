"""Fixtures shared by the ledger tests."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from tests.ledger.fleet_helpers import close_made_shippers


@pytest.fixture(autouse=True)
def _close_shippers() -> Iterator[None]:
    yield
    close_made_shippers()
