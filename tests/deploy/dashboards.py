"""Extract every panel's PromQL from a Grafana dashboard, with template variables expanded."""

from __future__ import annotations

import json
import re
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

# Concrete values for Grafana's built-in variables and the dashboards' own. "All" of a
# multi-value variable expands to its allValue, ".*".
DEFAULT_VARIABLES: Mapping[str, str] = {
    "__rate_interval": "5m",
    "__interval": "1m",
    "__range": "1h",
    "node": ".*",
    "program": ".*",
    "job_id": ".*",
    "scrape_job": ".*gpuflops.*",
}

_VARIABLE = re.compile(r"\$\{(\w+)(?::\w+)?\}|\[\[(\w+)\]\]|\$(\w+)")


def _panels(panels: list[dict[str, Any]]) -> Iterator[dict[str, Any]]:
    """Every panel, descending into rows (collapsed rows keep theirs in 'panels')."""
    for panel in panels:
        yield panel
        yield from _panels(panel.get("panels", []))


def expand(expr: str, variables: Mapping[str, str]) -> str:
    """Replace $var, ${var}, ${var:fmt} and [[var]]; KeyError names an unknown variable."""

    def sub(match: re.Match[str]) -> str:
        name = next(g for g in match.groups() if g is not None)
        if name not in variables:
            raise KeyError(f"unknown template variable ${name} in {expr!r}")
        return variables[name]

    return _VARIABLE.sub(sub, expr)


def dashboard_queries(
    path: str | Path, variables: Mapping[str, str] | None = None
) -> list[tuple[str, str]]:
    """(panel title, expanded PromQL) for every query target of every panel in the dashboard."""
    values = {**DEFAULT_VARIABLES, **(variables or {})}
    dashboard = json.loads(Path(path).read_text())
    queries = []
    for panel in _panels(dashboard.get("panels", [])):
        for target in panel.get("targets", []):
            if target.get("hide") or "expr" not in target:
                continue
            queries.append((str(panel.get("title", "")), expand(target["expr"], values)))
    return queries
