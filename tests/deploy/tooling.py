"""Locating the outside tools deploy tests need: skip locally when absent, fail in CI."""

from __future__ import annotations

import importlib
import os
import shutil
from pathlib import Path
from types import ModuleType

import pytest

REPO = Path(__file__).resolve().parents[2]


def in_ci() -> bool:
    """True when running under CI (CI set to anything but empty/false/0)."""
    return os.environ.get("CI", "").strip().lower() not in ("", "0", "false", "no")


def require_tool(name: str, package: str) -> str:
    """Path of executable ``name``; skips locally, fails in CI, when it is not installed."""
    path = shutil.which(name)
    if path is None:
        message = f"{name} not found; install the Debian package {package!r}"
        if in_ci():
            pytest.fail(message)
        pytest.skip(message)
    return path


def require_module(name: str, package: str) -> ModuleType:
    """Imported module ``name``; skips locally, fails in CI, when it is not installed."""
    try:
        return importlib.import_module(name)
    except ImportError:
        message = f"Python module {name} not found; pip install {package!r}"
        if in_ci():
            pytest.fail(message)
        pytest.skip(message)
