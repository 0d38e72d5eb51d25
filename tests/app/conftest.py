"""Fixtures shared by the daemon-level tests."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.app.trust_support import cleanup, short_tmp


@pytest.fixture
def tmp() -> Iterator[Path]:
    """A short temporary directory (Unix socket paths), removed with what the test left."""
    path = short_tmp()
    yield path
    cleanup(path)
