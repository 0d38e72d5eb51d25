"""The shape of the tree: small modules, one definition per concept, docs that name real paths."""

from __future__ import annotations

import ast
import re
from collections import defaultdict
from pathlib import Path

from tests.support import ROOT

PACKAGE = ROOT / "gpuflops"
MAX_LINES = 500


def _sources() -> list[Path]:
    return sorted(PACKAGE.rglob("*.py"))


def _top_level(path: Path) -> list[ast.stmt]:
    return ast.parse(path.read_text(), str(path)).body


def test_no_module_is_over_500_lines() -> None:
    long = {str(p.relative_to(ROOT)): n for p in _sources()
            if (n := len(p.read_text().splitlines())) > MAX_LINES}
    assert not long, f"split these modules: {long}"


def test_no_class_is_defined_twice() -> None:
    where: dict[str, list[str]] = defaultdict(list)
    for p in _sources():
        for node in _top_level(p):
            if isinstance(node, ast.ClassDef):
                where[node.name].append(str(p.relative_to(ROOT)))
    assert {n: ps for n, ps in where.items() if len(ps) > 1} == {}


def _constants() -> list[tuple[str, object, str]]:
    """(name, value, module) of every module-level UPPER_CASE assignment."""
    out = []
    for p in _sources():
        for node in _top_level(p):
            if isinstance(node, ast.Assign):
                targets, value = [t for t in node.targets if isinstance(t, ast.Name)], node.value
            elif isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name) and node.value:
                targets, value = [node.target], node.value
            else:
                continue
            for t in targets:
                if t.id.lstrip("_").isupper():
                    try:
                        literal: object = ast.literal_eval(value)
                    except ValueError:
                        literal = ast.dump(value)
                    out.append((t.id, literal, str(p.relative_to(ROOT))))
    return out


def test_no_constant_is_defined_twice() -> None:
    where: dict[str, list[str]] = defaultdict(list)
    for name, _value, module in _constants():
        where[name].append(module)
    assert {n: ms for n, ms in where.items() if len(ms) > 1} == {}


def test_no_string_constant_lives_in_two_places() -> None:
    """One thing in one place: the socket path, the state directory, "unattributed", ..."""
    where: dict[str, list[str]] = defaultdict(list)
    for name, value, module in _constants():
        if isinstance(value, str):
            where[value].append(f"{module}:{name}")
    assert {v: ns for v, ns in where.items() if len(ns) > 1} == {}


# Repository-relative paths in prose and config, e.g. gpuflops/pipeline/integrate.py; not
# absolute ones (/run/gpuflops/...) and not job labels such as systemd/<unit>.
_PATH = re.compile(
    r"(?<![\w./~$-])((?:gpuflops|tests|docs|benchmarks|scripts|exporters|helm|systemd)"
    r"/[\w./*-]*[\w*])(?![-<@{\w])"
)


# Owners named in pyproject's banned-api before they exist: the next issues add them.
FUTURE = {"gpuflops/ledger/central.py", "gpuflops/sampler/cupti.py"}


def _documents() -> list[Path]:
    docs = [ROOT / "README.md", ROOT / "pyproject.toml", *sorted((ROOT / "docs").glob("*.md"))]
    for folder in ("exporters", "helm", "systemd", "benchmarks", "scripts"):
        docs += [p for p in sorted((ROOT / folder).rglob("*"))
                 if p.is_file() and "results" not in p.parts and p.suffix in
                 (".md", ".py", ".yml", ".yaml", ".json", ".toml", ".service", ".example", ".tpl",
                  ".txt", "")]
    return docs


def test_docs_name_paths_that_exist() -> None:
    missing = []
    for doc in _documents():
        for m in _PATH.finditer(doc.read_text(errors="replace")):
            path = m.group(1).rstrip(".")
            if path in FUTURE:
                continue
            found = any(ROOT.glob(path)) if "*" in path else (ROOT / path).exists()
            if not found:
                missing.append(f"{doc.relative_to(ROOT)}: {path}")
    assert not missing, "\n".join(missing)
