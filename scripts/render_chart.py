"""Render the Helm chart without the helm binary (like `helm template`), via helm-python-sdk.

    python3 scripts/render_chart.py [--set-json '{"prometheusRule": {"enabled": true}}'] [-f v.yaml]
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

import yaml

CHART = Path(__file__).resolve().parents[1] / "helm" / "gpuflops"


def _merge(base: dict[str, Any], extra: dict[str, Any]) -> dict[str, Any]:
    """Deep-merge ``extra`` into a copy of ``base``, as helm merges values files."""
    out = dict(base)
    for key, value in extra.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = _merge(out[key], value)
        else:
            out[key] = value
    return out


def main(argv: list[str] | None = None) -> int:
    """Print the rendered manifests as one YAML stream."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("-f", "--values", action="append", default=[], type=Path)
    parser.add_argument("--set-json", action="append", default=[], help="JSON object of values")
    parser.add_argument("--name", default="gpuflops")
    parser.add_argument("--namespace", default="monitoring")
    parser.add_argument("--chart", default=CHART, type=Path)
    args = parser.parse_args(argv)
    try:
        import helm_python as helm
    except ImportError:
        print("pip install helm-python-sdk (it bundles Helm's Go engine)", file=sys.stderr)
        return 2
    values: dict[str, Any] = {}
    for path in args.values:
        values = _merge(values, yaml.safe_load(path.read_text()) or {})
    for text in args.set_json:
        values = _merge(values, json.loads(text))
    try:
        with helm.Chart.load(str(args.chart)) as chart:
            manifests = chart.render(values, name=args.name, namespace=args.namespace)
    except helm.HelmError as e:
        print(f"render failed: {e}", file=sys.stderr)
        return 1
    for path in sorted(manifests):
        if path.endswith(".yaml") and manifests[path].strip():
            print(f"---\n# Source: {path}\n{manifests[path].strip()}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
