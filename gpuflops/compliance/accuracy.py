"""The accuracy figures an audit report quotes: those measured on the GPU models the program ran
on (docs/accuracy.md, shipped as gpuflops/data/accuracy-<model>.json)."""

from __future__ import annotations

import json
from collections.abc import Iterable
from importlib import resources
from pathlib import Path

# Marketing-name fragment -> the figures measured on that model. H200 first: "H200" never
# contains "H100", but be explicit about the order anyway.
MEASURED_MODELS = (("H200", "accuracy-h200.json"), ("H100", "accuracy-h100.json"))
NOT_MEASURED = ("not measured by gpuflops: FLOPs use datasheet rates (docs/backends.md); the "
                "H100 and H200 figures in docs/accuracy.md do not carry over")


def load_accuracy(path: Path | None) -> dict[str, str]:
    """Accuracy figures (name -> value text) from a JSON object file."""
    if path is None:
        return {}
    data = json.loads(Path(path).read_text(encoding="utf-8"))
    if not isinstance(data, dict):
        raise ValueError(f"{path}: expected a JSON object of name -> value")
    return {str(k): str(v) for k, v in data.items()}


def accuracy_for(models: Iterable[str]) -> dict[str, str]:
    """The shipped figures for each GPU model named (``NVIDIA H200``...), one entry for any
    model gpuflops has not measured; {} when no model is known."""
    out: dict[str, str] = {}
    for model in sorted(set(models)):
        match = next((f for key, f in MEASURED_MODELS if key in model.upper()), None)
        if match is None:
            out[f"{model}"] = NOT_MEASURED
            continue
        path = Path(str(resources.files("gpuflops") / "data" / match))
        out.update(load_accuracy(path))
    return out
