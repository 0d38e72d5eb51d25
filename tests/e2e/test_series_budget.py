"""The per-node series budget of docs/metrics.md, on a real daemon: 3,000 jobs registered through
the socket with JobReporter, each ending, then a restart from the same ledger. While the jobs are
recent their series are exported; once older than series_ttl_s they leave /metrics, also after
the restart (which restores their totals from the ledger); the program series keep them all."""

from __future__ import annotations

import subprocess
import sys
import textwrap
import time
import urllib.request
from pathlib import Path

import pytest
from prometheus_client.parser import text_string_to_metric_families

from tests.e2e.promserver import _env, daemon, wait_for
from tests.support import ROOT

JOBS = 3000
TTL_S = 4.0
FLOPS_PER_JOB = 2.0**40  # binary-exact, so 3,000 of them sum exactly


def budget(gpus: int, processes: int, active_jobs: int, programs: int) -> int:
    """docs/metrics.md, "Series budget": the bound every node stays within."""
    return 40 + 45 * gpus + processes + 6 * active_jobs + 6 * programs


_CLIENT = textwrap.dedent("""
    import sys
    from gpuflops.client.reporter import JobReporter
    sock, n, flops = sys.argv[1], int(sys.argv[2]), float(sys.argv[3])
    for i in range(n):
        with JobReporter(job=f"budget-{i:04d}", program="budget", socket_path=sock,
                         flush_interval_s=0.05, close_timeout_s=10) as r:
            r.add(flops, 100)
        st = r.stats()
        if st.delivered_flops != flops:
            sys.exit(f"job {i}: delivered {st.delivered_flops}, last error {st.last_error}")
""")




def _scrape(port: int) -> tuple[dict[str, list[dict[str, str]]], int]:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as r:
        body = r.read()
    series: dict[str, list[dict[str, str]]] = {}
    for fam in text_string_to_metric_families(body.decode()):
        for s in fam.samples:
            if not s.name.endswith("_created"):
                series.setdefault(s.name, []).append(dict(s.labels))
    return series, len(body)


def _count(series: dict[str, list[dict[str, str]]]) -> int:
    return sum(len(v) for v in series.values())


def _jobs(series: dict[str, list[dict[str, str]]]) -> set[str]:
    return {lab["job_id"] for lab in series.get("gpuflops_job_analytic_flops_total", [])}


def _processes(series: dict[str, list[dict[str, str]]]) -> int:
    return len(series.get("gpuflops_process_flops_total", []))


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_3000_jobs_and_a_restart_stay_within_the_series_budget(tmp_short: Path) -> None:
    config = tmp_short / "gpuflops.toml"
    config.write_text(f"[daemon]\nseries_ttl_s = {TTL_S}\nprogram_refresh_s = 1.0\n")
    node = tmp_short / "node"
    with daemon(node, extra_args=["--config", str(config)]) as d:
        t0 = time.monotonic()
        subprocess.run([sys.executable, "-c", _CLIENT, str(d.socket_path), str(JOBS),
                        str(FLOPS_PER_JOB)], check=True, cwd=ROOT, env=_env(), timeout=400)
        took = time.monotonic() - t0
        # The most recent jobs are exported (younger than the TTL; estimates reach the counters
        # once the ledger committed them) ...
        def last_job() -> tuple[dict[str, list[dict[str, str]]], int] | None:
            scraped = _scrape(d.port)
            return scraped if f"budget-{JOBS - 1:04d}" in _jobs(scraped[0]) else None

        recent, recent_size = wait_for("the last job's series", last_job, 10, 0.1)
        exported = len(_jobs(recent))
        # ... and all of them leave once older than it; the program keeps their FLOPs.
        analytic = 'gpuflops_program_flops_total{basis="analytic",program="budget"}'

        def aged() -> tuple[dict[str, list[dict[str, str]]], int] | None:
            series, size = _scrape(d.port)
            programs = {lab.get("basis"): lab for lab in
                        series.get("gpuflops_program_flops_total", [])}
            return (series, size) if not _jobs(series) - {"unattributed"} and \
                "analytic" in programs else None

        series, size = wait_for("the jobs' series to age out", aged, TTL_S + 30, 0.5)
        n = _count(series)
        limit = budget(gpus=1, processes=_processes(series), active_jobs=1, programs=1)
        assert n <= limit, (n, limit, {k: len(v) for k, v in series.items()})
        assert d.stop() == 0
    print(f"{JOBS} jobs registered, added and ended in {took:.1f}s; {exported} exported right "
          f"after ({_count(recent)} series, {recent_size} bytes); after ageing: {n} series, "
          f"{size} bytes; budget {limit}")

    # A restart restores 3,000 jobs' totals from the ledger, and exports none of them.
    with daemon(node, extra_args=["--config", str(config)]) as d:
        series, size = _scrape(d.port)
        n = _count(series)
        assert _jobs(series) <= {"unattributed"}
        assert n <= budget(gpus=1, processes=_processes(series), active_jobs=1, programs=1)
        assert size < 20_000
        program = wait_for("the program series", lambda: {
            lab["basis"] for lab in _scrape(d.port)[0].get("gpuflops_program_flops_total", [])
        } >= {"analytic"}, 30, 0.5)
        assert program
        with urllib.request.urlopen(f"http://127.0.0.1:{d.port}/metrics", timeout=10) as r:
            text = r.read().decode()
        value = next(float(line.rsplit(" ", 1)[1]) for line in text.splitlines()
                     if line.startswith(analytic))
        assert value == JOBS * FLOPS_PER_JOB  # every job's FLOPs, in the program series
    print(f"after the restart: {n} series, {size} bytes")
