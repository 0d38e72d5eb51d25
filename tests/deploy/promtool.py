"""Running promtool on rule files and expressions written to a temporary directory."""

from __future__ import annotations

import subprocess
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import yaml

from tests.deploy.tooling import require_tool


def promtool(*args: str, cwd: Path | None = None) -> subprocess.CompletedProcess[str]:
    """Run promtool (Debian package 'prometheus'); never raises on a non-zero exit."""
    tool = require_tool("promtool", "prometheus")
    return subprocess.run(
        [tool, *args], capture_output=True, text=True, timeout=120, cwd=cwd, check=False
    )


def check_expressions(exprs: Sequence[str], tmp_path: Path) -> subprocess.CompletedProcess[str]:
    """Parse each PromQL expression with promtool by wrapping it in a recording rule."""
    rules = [{"record": f"check:expr_{i}:parse", "expr": e} for i, e in enumerate(exprs)]
    path = tmp_path / "exprs.rules.yml"
    path.write_text(yaml.safe_dump({"groups": [{"name": "exprs", "rules": rules}]}))
    return promtool("check", "rules", str(path))


def write_yaml(path: Path, data: Any) -> Path:
    """Write ``data`` as YAML and return the path."""
    path.write_text(yaml.safe_dump(data, sort_keys=False, width=1000))
    return path
