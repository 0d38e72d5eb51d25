"""The metric-name contract of docs/CONTRACTS.md, parsed so tests can hold assets to it."""

from __future__ import annotations

import re
from pathlib import Path

from tests.deploy.tooling import REPO

CONTRACTS = REPO / "docs" / "CONTRACTS.md"
_ROW = re.compile(r"^\|\s*`(gpuflops_\w+)`\s*\|\s*(\w+)\s*\|\s*(.*?)\s*\|\s*$")
# Labels Prometheus adds from the target. The exporter never emits them (its training job is `job_id`).
TARGET_LABELS = frozenset({"instance", "job", "node"})


def contract_metrics(path: Path = CONTRACTS) -> dict[str, frozenset[str]]:
    """Metric name -> label names, from the contract table."""
    metrics: dict[str, frozenset[str]] = {}
    for line in path.read_text().splitlines():
        match = _ROW.match(line)
        if match is None:
            continue
        name, _kind, labels = match.groups()
        # "gpu, uuid, pipe (hmma/...), precision": drop the parenthesised notes.
        names = re.sub(r"\([^)]*\)", "", labels).split(",")
        metrics[name] = frozenset(n.strip() for n in names if n.strip())
    return metrics
