"""JobsCollector: the training job is `job_id` (never `job`), and job series age out."""

from __future__ import annotations

from prometheus_client import generate_latest
from prometheus_client.parser import text_string_to_metric_families
from prometheus_client.registry import CollectorRegistry

from gpuflops.compliance.programs import ProgramView
from gpuflops.exporter.jobs_collector import JobsCollector
from gpuflops.exporter.state import Totals
from gpuflops.jobs.records import RegistrySnapshot
from gpuflops.ledger.records import JobKey, JobTotals, LedgerTotals
from gpuflops.ledger.sink import LedgerSink
from gpuflops.model import UNATTRIBUTED, FlopsRow
from tests.support import FakeClock, fake_gpus


def _scrape(totals: Totals, clock: FakeClock) -> dict[str, list[dict[str, str]]]:
    reg = CollectorRegistry(auto_describe=False)
    reg.register(JobsCollector(totals.snapshot, ProgramView, lambda: RegistrySnapshot(clock(), ()),
                               LedgerSink(None, clock=clock), None))
    out: dict[str, list[dict[str, str]]] = {}
    for fam in text_string_to_metric_families(generate_latest(reg).decode()):
        for s in fam.samples:
            out.setdefault(s.name, []).append(dict(s.labels))
    return out


def _row(job: str, flops: float = 1e12) -> FlopsRow:
    program = UNATTRIBUTED if job == UNATTRIBUTED else "prog"
    return FlopsRow("0", "GPU-a", "hmma", "bf16", job, program, 42, flops, "python")


def test_job_series_carry_job_id_and_age_out_after_the_ttl() -> None:
    clock = FakeClock(1000.0)
    totals = Totals(fake_gpus(1), series_ttl_s=60.0, clock=clock)
    totals.add_rows([_row("ft-1"), _row(UNATTRIBUTED)], held=0)
    totals.add_estimate("ft-1", "prog", 2e12, 10.0, 0.0)
    series = _scrape(totals, clock)
    measured = series["gpuflops_job_measured_flops_total"]
    assert {"job_id": "ft-1", "program": "prog"} in measured
    assert all("job" not in labels and "instance" not in labels
               for rows in series.values() for labels in rows)

    clock.t += 61.0
    totals.add_rows([_row("ft-2")], held=0)
    series = _scrape(totals, clock)
    jobs = {lab["job_id"] for lab in series["gpuflops_job_measured_flops_total"]}
    assert jobs == {"ft-2", UNATTRIBUTED}  # ft-1 aged out; unattributed never does
    assert "gpuflops_job_analytic_flops_total" not in series

    # A job that comes back continues its counter: it was kept, only not exported.
    totals.add_rows([_row("ft-1")], held=0)
    assert totals.snapshot().job_flops[("ft-1", "prog")] == 2e12
    assert "ft-1" in {lab["job_id"] for lab in _scrape(totals, clock)[
        "gpuflops_job_measured_flops_total"]}


def test_a_restart_keeps_old_jobs_aged_out() -> None:
    clock = FakeClock(10_000.0)
    seed = LedgerTotals(gpu={}, jobs={
        JobKey("old", "prog"): JobTotals(measured_flops=5.0, last_t_s=10_000.0 - 7200),
        JobKey("recent", "prog"): JobTotals(measured_flops=7.0, last_t_s=10_000.0 - 10),
    }, records=2, head_seq=2, head_hash="")
    totals = Totals(fake_gpus(1), series_ttl_s=3600.0, clock=clock, seed=seed)
    jobs = {lab["job_id"] for lab in _scrape(totals, clock)["gpuflops_job_measured_flops_total"]}
    assert jobs == {"recent"}
