"""The layers of gpuflops, lowest first, and the rule that proves the layout: no module imports
a layer above its own. Every import counts, module-level or inside a function, absolute or
package-relative."""

from __future__ import annotations

import ast
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.support import ROOT

PACKAGE = ROOT / "gpuflops"

# Lowest first. Modules of one layer may import each other (identity and jobs never do today).
LAYERS: tuple[tuple[str, ...], ...] = (
    ("gpuflops", "gpuflops.model", "gpuflops.rates", "gpuflops.config"),
    ("gpuflops.sampler",),
    ("gpuflops.pipeline",),
    ("gpuflops.identity", "gpuflops.jobs"),
    ("gpuflops.ledger",),
    ("gpuflops.compliance",),
    ("gpuflops.estimate",),
    ("gpuflops.exporter",),
    ("gpuflops.client",),
    ("gpuflops.app",),
    ("gpuflops.cli", "gpuflops.__main__"),
)


def module_name(path: Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def modules() -> list[tuple[str, Path]]:
    return sorted((module_name(p), p) for p in PACKAGE.rglob("*.py"))


def layer(module: str) -> int:
    """The layer of ``module``: its longest listed prefix decides."""
    best: tuple[int, int] | None = None  # (prefix length, layer)
    for i, names in enumerate(LAYERS):
        for name in names:
            inside = module == name or (name != "gpuflops" and module.startswith(name + "."))
            if inside and (best is None or len(name) > best[0]):
                best = (len(name), i)
    if best is None:
        raise KeyError(f"{module} is in no layer: add its room to LAYERS")
    return best[1]


def imported(path: Path, module: str) -> Iterator[tuple[str, int]]:
    """Every gpuflops module ``path`` imports, with the line, however it is written."""
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            for alias in node.names:
                yield alias.name, node.lineno
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join([*anchor, base] if base else anchor)
            for alias in node.names:
                # ``from gpuflops.app import sdnotify`` imports the submodule itself.
                sub = f"{base}.{alias.name}"
                is_module = (ROOT / Path(*sub.split("."))).with_suffix(".py").exists() or (
                    ROOT / Path(*sub.split(".")) / "__init__.py").exists()
                yield (sub if is_module else base), node.lineno


def test_every_module_has_a_layer() -> None:
    for module, _path in modules():
        layer(module)


def test_the_scanner_sees_relative_imports_inside_functions(tmp_path: Path) -> None:
    probe = tmp_path / "probe.py"
    probe.write_text("def f():\n    from ..exporter import state\n")
    assert list(imported(probe, "gpuflops.ledger.probe")) == [("gpuflops.exporter.state", 2)]
    assert layer("gpuflops.exporter.state") > layer("gpuflops.ledger.probe")  # would be refused


@pytest.mark.parametrize(("module", "path"), modules(), ids=[m for m, _ in modules()])
def test_no_module_imports_a_layer_above_its_own(module: str, path: Path) -> None:
    own = layer(module)
    above = [
        f"{path.relative_to(ROOT)}:{line} imports {target} (layer {layer(target)} > {own})"
        for target, line in imported(path, module)
        if target.split(".")[0] == "gpuflops" and layer(target) > own
    ]
    assert not above, "\n".join(above)


def test_the_client_library_loads_nothing_of_the_daemon() -> None:
    """Training jobs import gpuflops.client: no server, registry, sampler, ledger, psutil or
    Prometheus client comes with it."""
    code = (
        "import sys, gpuflops.client\n"
        "bad = sorted(m for m in sys.modules if m.startswith(('gpuflops.jobs.server',"
        " 'gpuflops.jobs.registry', 'gpuflops.sampler', 'gpuflops.pipeline', 'gpuflops.ledger',"
        " 'gpuflops.exporter', 'gpuflops.app', 'psutil', 'prometheus_client', 'torch')))\n"
        "print(','.join(bad))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         cwd=ROOT, check=True)
    assert out.stdout.strip() == ""
