"""Issue 5 end to end: replayed H100 -> daemon -> job socket -> ledger -> real Prometheus.

A job process registers over the real socket and publishes analytic estimates while the replayed
trace names its pid as the GPU process, so measured FLOPs are attributed to it through the
socket; the rest of the trace runs under pids that cannot exist, so they are unattributed.
Prometheus scrapes every second with the shipped recording rules. Once everything has settled,
PromQL totals must equal the ledger's, and every dashboard panel must return data.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import pytest

from gpuflops.compliance.programs import evaluate_ledger
from gpuflops.compliance.thresholds import load_programs_config
from gpuflops.config import Settings
from gpuflops.ledger.store import Ledger
from tests.deploy.dashboards import dashboard_queries
from tests.e2e.promserver import (
    DASHBOARDS,
    Estimate,
    Segment,
    build_trace,
    daemon,
    prometheus,
    require_prometheus,
    rules_every_second,
    start_job,
    wait_for,
)

PROGRAM = "llama-ft"
JOB = "ft-run-1"
# Real time: the ledger matches a job's measured FLOPs to the wall-clock window of its estimates,
# and an accelerated replay stamps intervals SPEED times faster than the wall clock advances.
SPEED = 1.0
JOB_S, OTHERS_S, GAP_S = (7.4, 22.0), (103.3, 108.0), (0.0, 0.5)
# 80 steps of a 7B model at 4096 tokens per step with activation recomputation: 6·N·D per step
# plus the 2·N·D recomputed forward. Round binary-exact numbers keep the sums exact.
ESTIMATE = Estimate(steps=80, flops=1.25e14, tokens=4096.0, recompute_flops=2.5e13, step_s=0.1)
PROGRAMS_TOML = f"""
[programs.{PROGRAM}]
base_model_compute_flops = 3e17
base_model_compute_source = "e2e test: small enough that the ratio is visible"
tolerance = 0.3
"""
# Panels that cannot have data in a healthy replay, and why. Their queries must still evaluate.
NO_DATA_EXPECTED: dict[str, str] = {}  # (the gap segment's recorded errors feed "Sampler errors /s")
REL = 1e-9  # float summation order differs between the daemon's counters and SQLite's sums




def _ledger(path: Path) -> Ledger:
    return Ledger.open(path, clock=time.time, readonly=True)


def _ledger_figures(path: Path, programs_toml: Path) -> dict[str, Any]:
    """The ledger's totals, in the shapes the PromQL answers come in."""
    led = _ledger(path)
    try:
        t = led.totals()
        statuses, errors = evaluate_ledger(led, load_programs_config(programs_toml))
        ended = {e.job for e in led.job_events() if e.kind == "end"}
    finally:
        led.close()
    assert not errors, errors
    jobs = {(k.job, k.program): v for k, v in t.jobs.items()}
    return {
        "measured": {k: v.measured_flops for k, v in jobs.items() if v.measured_flops},
        "analytic": {k: v.analytic_flops for k, v in jobs.items() if v.analytic_flops},
        "tokens": {k: v.tokens for k, v in jobs.items() if v.tokens},
        "recompute": {k: v.recompute_flops for k, v in jobs.items() if v.recompute_flops},
        "program": {(p, b): v for p, s in statuses.items() for b, v in s.flops_by_basis.items()},
        "gpu": sum(t.gpu.values()),
        "program_measured": t.program_measured(PROGRAM),
        "records": t.records,
        "ended": ended,
    }


def _promql_figures(prom: Any) -> dict[str, Any]:
    def nonzero(d: dict[tuple[str, ...], float]) -> dict[tuple[str, ...], float]:
        return {k: v for k, v in d.items() if v}

    by_job = ("job_id", "program")
    return {
        "measured": nonzero(prom.values(
            "sum by (job_id,program)(gpuflops_job_measured_flops_total)", *by_job)),
        "analytic": nonzero(prom.values(
            "sum by (job_id,program)(gpuflops_job_analytic_flops_total)", *by_job)),
        "tokens": nonzero(prom.values(
            "sum by (job_id,program)(gpuflops_job_analytic_tokens_total)", *by_job)),
        "recompute": nonzero(prom.values(
            "sum by (job_id,program)(gpuflops_job_recompute_flops_total)", *by_job)),
        "program": prom.values("sum by (program,basis)(gpuflops_program_flops_total)",
                               "program", "basis"),
        "program_rule": prom.values("program:gpuflops_flops:sum", "program", "basis"),
        "job_rule": nonzero(prom.values("job:gpuflops_analytic_flops:sum", *by_job)),
        "gpu": sum(prom.values("sum(gpuflops_gpu_flops_total)").values()),
        "records": sum(prom.values("sum(gpuflops_ledger_records_total)").values()),
    }


def _mismatches(prom: dict[str, Any], led: dict[str, Any]) -> list[str]:
    out = []
    for name in ("measured", "analytic", "tokens", "recompute", "program"):
        if prom[name].keys() != led[name].keys():
            out.append(f"{name}: series {sorted(prom[name])} != ledger {sorted(led[name])}")
            continue
        out += [f"{name}{k}: prometheus {prom[name][k]!r} != ledger {v!r}"
                for k, v in led[name].items() if prom[name][k] != pytest.approx(v, rel=REL)]
    if prom["program_rule"] != pytest.approx(led["program"], rel=REL):
        out.append(f"program:gpuflops_flops:sum {prom['program_rule']} != {led['program']}")
    if prom["job_rule"] != pytest.approx(led["analytic"], rel=REL):
        out.append(f"job:gpuflops_analytic_flops:sum {prom['job_rule']} != {led['analytic']}")
    if prom["gpu"] != pytest.approx(led["gpu"], rel=REL):
        out.append(f"gpu total {prom['gpu']!r} != ledger {led['gpu']!r}")
    if prom["records"] != led["records"]:
        out.append(f"ledger records {prom['records']} != {led['records']}")
    return out


@pytest.mark.slow
def test_promql_totals_equal_ledger_and_every_panel_has_data(tmp_short: Path) -> None:
    require_prometheus()
    programs = tmp_short / "programs.toml"
    programs.write_text(PROGRAMS_TOML)
    job = start_job(tmp_short / "node" / "s.sock", JOB, PROGRAM, ESTIMATE, precision="bf16",
                    model="llama-7b", params=7_000_000_000, activation_checkpointing=True)
    try:
        # 14.6 s of tensor work by the job's pid, 4.7 s by processes that are not local, half a
        # second of unreadable counters, then idle until stopped.
        trace = build_trace(
            tmp_short / "trace.jsonl",
            [Segment(*JOB_S, {458: job.pid}), Segment(*OTHERS_S), Segment(*GAP_S, gap="gpm_read")],
            idle_tail_s=600, no_counters_gpu=True,
        )
        busy_s = sum(b - a for a, b in (JOB_S, OTHERS_S, GAP_S)) / SPEED
        with daemon(tmp_short / "node", trace=trace, speed=SPEED,
                    extra_args=["--programs", str(programs)]) as d:
            started = time.time()
            scrape = {"job_name": "gpuflops",
                      "static_configs": [{"targets": [d.target], "labels": {"node": "a"}}]}
            with prometheus(tmp_short / "prom", [scrape],
                            rule_files=[rules_every_second(tmp_short)]) as prom:
                prom.wait_targets({"gpuflops": "up"})
                job.go()
                result = job.result(timeout_s=60)
                assert result["delivered_flops"] == ESTIMATE.total[0]

                # Settled: the job's end is durable, the trace is idle, and the ledger stopped
                # moving; then the next program refresh (every 10 s) and scrape must match it.
                def settled() -> dict[str, Any] | None:
                    before = _ledger_figures(d.ledger_path, programs)
                    time.sleep(1.0)
                    after = _ledger_figures(d.ledger_path, programs)
                    # Shared intervals wait up to attribution_hold_s for per-process samples.
                    quiet = started + busy_s + Settings().attribution_hold_s + 1.0
                    done = JOB in after["ended"] and time.time() > quiet
                    same = {k: v for k, v in before.items() if k != "records"} == {
                        k: v for k, v in after.items() if k != "records"}
                    return after if done and same else None

                wait_for("the ledger to settle", settled, 40, 0.1)
                prom.last_scrape_after("gpuflops", time.time())
                last: list[str] = []

                def matches() -> bool:
                    led = _ledger_figures(d.ledger_path, programs)
                    last[:] = _mismatches(_promql_figures(prom), led)
                    return not last

                try:
                    wait_for("PromQL to equal the ledger", matches, 25, 0.5)
                except AssertionError:
                    pytest.fail("PromQL != ledger:\n" + "\n".join(last))
                figures = _promql_figures(prom)
                # Training jobs never flood Prometheus' own `job` label: only the scrape job.
                scrape_jobs = prom.values('count by (job) ({__name__=~"gpuflops_.+"})', "job")
                exported = prom.values('count by (exported_job) ({__name__=~"gpuflops_.+"})',
                                       "exported_job")
                panels = _panel_results(prom)
                rules = [(r["name"], r["health"], r.get("lastError", ""))
                         for g in prom.api("/api/v1/rules")["groups"] for r in g["rules"]]
            code = d.stop()
        assert code == 0, d.log()
    finally:
        job.kill()

    # (a) PromQL equals the ledger, and the figures are the ones the scenario produced. The
    # clean stop wrote one record after the last scrape: the session's end.
    final = _ledger_figures(d.ledger_path, programs)
    led = _ledger(d.ledger_path)
    try:
        last = led.last_activity()
        gaps = led.gaps()
    finally:
        led.close()
    assert last is not None and last.clean_stop
    final["records"] -= 1
    # The half second of unreadable counters is in the ledger as a gap of that GPU.
    assert [(g.reason, round(g.duration_s, 3)) for g in gaps if g.gpu != "*"] == [
        ("gpm_read", GAP_S[1] - GAP_S[0])]
    assert _mismatches(figures, final) == []
    assert set(scrape_jobs) == {("gpuflops",)}, scrape_jobs
    assert set(exported) == {("",)}, exported  # nothing was renamed to exported_job
    key = (JOB, PROGRAM)
    assert figures["analytic"][key] == ESTIMATE.total[0]  # exact: binary-exact increments
    assert figures["tokens"][key] == ESTIMATE.total[1]
    assert figures["recompute"][key] == ESTIMATE.total[2]
    assert figures["measured"][key] > 1e15  # attributed through the socket registration
    assert figures["measured"][("unattributed", "unattributed")] > 1e14
    assert figures["program"][(PROGRAM, "measured")] == pytest.approx(
        final["program_measured"], rel=REL)
    assert figures["program"][(PROGRAM, "analytic")] == ESTIMATE.total[0]
    assert sum(figures["measured"].values()) == pytest.approx(figures["gpu"], rel=1e-6)
    print("e2e figures:", {k: v for k, v in figures.items() if k != "records"})

    # The shipped recording and alerting rules all evaluate against the real series.
    assert len(rules) > 20
    assert [r for r in rules if r[1] != "ok"] == []

    # (b) every dashboard query evaluates, and returns data unless listed with a reason.
    errors = {q: r for q, r in panels.items() if isinstance(r, str)}
    assert errors == {}
    empty = sorted({title for (title, _q), r in panels.items() if r == []})
    assert empty == sorted(NO_DATA_EXPECTED), {q: r for q, r in panels.items() if r == []}


def _panel_results(prom: Any) -> dict[tuple[str, str], Any]:
    """(panel title, query) -> result list, or the error text."""
    out: dict[tuple[str, str], Any] = {}
    for path in DASHBOARDS:
        for title, expr in dashboard_queries(path):
            try:
                out[(title, expr)] = prom.query(expr)
            except AssertionError as e:
                out[(title, expr)] = str(e)
    assert len(out) >= 30, "dashboards lost their panels?"
    return out
