"""The fleet tier end to end: real daemons ship to a real PostgreSQL; one program on two
clusters gives one report; deleting a node's state dir after it shipped changes neither the
central report nor the central metrics; `central serve` is scraped over HTTP."""

from __future__ import annotations

import contextlib
import json
import math
import re
import shutil
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from contextlib import ExitStack
from pathlib import Path
from typing import Any

from prometheus_client.parser import text_string_to_metric_families

from tests.central_fixtures import CentralDb
from tests.deploy.tooling import REPO
from tests.e2e.fleet_harness import Node, gpuflops, job_process, ledger_view, node_trace
from tests.e2e.promserver import _env, wait_for

PROGRAM = "fleet-ft"


@contextlib.contextmanager
def central_serve(url: str, password_file: Path, workdir: Path) -> Iterator[int]:
    log = workdir / "serve.log"
    with log.open("wb") as f:
        proc = subprocess.Popen(
            [sys.executable, "-m", "gpuflops", "central", "serve", "--central", url,
             "--central-password-file", str(password_file), "--listen", "127.0.0.1:0",
             "--refresh", "0.5"], stdout=f, stderr=subprocess.STDOUT, cwd=REPO, env=_env())
    try:
        def port() -> int | None:
            if proc.poll() is not None:
                raise RuntimeError(log.read_text())
            m = re.search(r"\(port (\d+)\)", log.read_text())
            return int(m.group(1)) if m else None

        yield int(wait_for("central serve", port, 30))
    finally:
        proc.terminate()
        proc.wait(20)


def scrape(port: int) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as r:
        text = r.read().decode()
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for fam in text_string_to_metric_families(text) for s in fam.samples}


def _report(central: CentralDb) -> dict[str, Any]:
    run = gpuflops("report", "--program", PROGRAM, "--central", central.url("gf_read"),
                   "--central-password-file", str(central.password_file), "--format", "json")
    assert run.returncode == 0, run.stderr
    return dict(json.loads(run.stdout))


def _stable(doc: dict[str, Any]) -> dict[str, Any]:
    """A report without the fields that change with the time it is made."""
    out = {k: v for k, v in doc.items() if k not in ("generated_at", "generated_at_s")}
    out["fleet"] = {**doc["fleet"], "nodes": [{k: v for k, v in n.items() if k != "silent"}
                                              for n in doc["fleet"]["nodes"]]}
    return out




def test_two_clusters_one_report_and_a_deleted_node_changes_nothing(
        central: CentralDb, tmp_short: Path) -> None:
    layout = [("e1", "east"), ("e2", "east"), ("w1", "west"), ("w2", "west")]
    nodes: list[Node] = []
    with ExitStack() as stack:
        for name, cluster in layout:
            wd = tmp_short / name
            wd.mkdir()
            job = stack.enter_context(job_process(wd / "s.sock", f"job-{name}", PROGRAM, steps=20))
            node = Node(name, cluster, wd, node_trace(wd / "t.jsonl", job), central.url("gf_ship"),
                        central.password_file)
            node.start()
            stack.callback(node.stop)
            job.go()
            nodes.append(node)
        wait_for("every node to measure its job", lambda: all(
            ledger_view(n.ledger_path)["jobs"].get((f"job-{n.name}", PROGRAM), (0,))[0] > 1e14
            for n in nodes), 60, 0.5)
        for n in nodes:
            assert n.stop() == 0, n.log()
    views = {n.name: ledger_view(n.ledger_path) for n in nodes}
    doc = _report(central)
    assert doc["fleet"]["clusters"] == ["east", "west"]
    assert sorted((n["cluster"], n["node"]) for n in doc["fleet"]["nodes"]) == sorted(
        (c, n) for n, c in layout)
    by_job = {j["job"]: j for j in doc["jobs"]}
    for name, view in views.items():
        assert by_job[f"job-{name}"]["measured_flops"] == view["jobs"][(f"job-{name}", PROGRAM)][0]
    assert doc["totals"]["measured_flops"] == sum(
        views[n]["jobs"][(f"job-{n}", PROGRAM)][0] for n in sorted(views))
    with central.store("gf_read") as store:
        heads = {r[0]: r[1] for r in store.fetch(
            "SELECT l.node, h.raw_seq FROM gpuflops.heads h JOIN gpuflops.ledgers l USING (ledger_id)")}
    assert heads == {n: v["head_seq"] for n, v in views.items()}  # every record shipped

    with central_serve(central.url("gf_read"), central.password_file, tmp_short) as port:
        before = wait_for("fleet metrics", lambda: (lambda m: m if ("gpuflops_fleet_up", ()) in m
                                                    and m[("gpuflops_fleet_up", ())] == 1 else None)(
            scrape(port)), 30)
        total = before[("gpuflops_fleet_program_flops_total",
                        (("basis", "measured"), ("program", PROGRAM)))]
        assert total == doc["totals"]["measured_flops"]
        assert before[("gpuflops_fleet_program_nodes", (("program", PROGRAM),))] == 4
        shutil.rmtree(nodes[3].state_dir)  # w2's node is recycled, its ledger gone
        time.sleep(1.5)  # three refreshes
        after = scrape(port)
    fleet = {k: v for k, v in after.items() if k[0].startswith("gpuflops_fleet_program")}
    assert fleet == {k: v for k, v in before.items() if k[0].startswith("gpuflops_fleet_program")}
    assert _stable(_report(central)) == _stable(doc)
    assert math.isfinite(total) and total > 4e14
