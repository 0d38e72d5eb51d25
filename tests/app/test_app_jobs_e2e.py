"""The daemon's job path end to end, in one process: a real job socket, a real ledger file, the
program evaluation, and the collector, with the H100 trace replayed as the hardware."""

from __future__ import annotations

import tempfile
import threading
import time
import urllib.request
from dataclasses import replace
from pathlib import Path

import pytest
from prometheus_client.parser import text_string_to_metric_families

from gpuflops.app import build
from gpuflops.client import JobReporter
from gpuflops.compliance.programs import evaluate_ledger
from gpuflops.compliance.thresholds import ProgramsConfig
from gpuflops.config import Settings
from gpuflops.ledger.records import LEDGER_FILENAME
from gpuflops.ledger.store import Ledger


def _samples(port: int) -> dict[str, list[tuple[dict[str, str], float]]]:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as r:
        text = r.read().decode()
    out: dict[str, list[tuple[dict[str, str], float]]] = {}
    for fam in text_string_to_metric_families(text):
        for s in fam.samples:
            out.setdefault(s.name, []).append((dict(s.labels), s.value))
    return out


@pytest.mark.timeout(60)
def test_registered_job_reaches_ledger_thresholds_and_metrics() -> None:
    tmp = Path(tempfile.mkdtemp(dir="/tmp", prefix="gfj-"))
    settings = Settings(
        backend="replay", replay_speed=10.0, listen="127.0.0.1:0",
        socket_path=str(tmp / "s.sock"), state_dir=str(tmp / "state"), program_refresh_s=0.3,
    ).validate()
    d = build(settings)
    d.serve()
    assert d.server is not None
    port = d.server.port
    loop = threading.Thread(target=d.run, daemon=True)
    loop.start()
    try:
        with JobReporter("ft-1", "prog-a", model="llama-3-8b", params=8_000_000_000,
                         precision="bf16", socket_path=str(tmp / "s.sock"),
                         base_model_flops=1.2e24, base_model_flops_source="model card",
                         method="full") as r:
            for _ in range(5):
                r.add(flops=2e14, tokens=1000, recompute_flops=0.0)
                time.sleep(0.05)
        deadline = time.monotonic() + 15
        threshold = analytic = None
        while time.monotonic() < deadline:
            m = _samples(port)
            threshold = [v for lab, v in m.get("gpuflops_program_threshold_flops", [])
                         if lab["program"] == "prog-a"]
            analytic = [v for lab, v in m.get("gpuflops_job_analytic_flops_total", [])
                        if lab["job_id"] == "ft-1"]
            if threshold and analytic:
                break
            time.sleep(0.2)
        # One third of the base model's registered compute (EU guidelines), not the 3.3e22 default.
        assert threshold == [1.2e24 / 3]
        assert analytic == [1e15]
        rule = [lab["rule"] for lab, _v in m["gpuflops_program_threshold_flops"]
                if lab["program"] == "prog-a"]
        assert rule == ["one_third_of_base"]
    finally:
        d.request_stop()
        loop.join(timeout=10)
    assert not loop.is_alive()
    led = Ledger.open(tmp / "state" / LEDGER_FILENAME, clock=time.time, readonly=True)
    try:
        register = [e for e in led.job_events("prog-a") if e.kind == "register"]
        assert register and register[0].payload["base_model_flops"] == 1.2e24
        assert register[0].payload["model"] == "llama-3-8b"
        statuses, errors = evaluate_ledger(led, ProgramsConfig())
        assert not errors
        assert statuses["prog-a"].threshold.flops == 1.2e24 / 3
        assert led.verify().ok
    finally:
        led.close()


@pytest.mark.timeout(60)
def test_a_kernel_census_claim_reaches_the_ledger_and_is_bounded(tmp_path: Path) -> None:
    from gpuflops.compliance.programs import job_inputs
    from gpuflops.compliance.reconcile import reconcile_job
    from gpuflops.model import FlopsRow

    tmp = Path(tempfile.mkdtemp(dir="/tmp", prefix="gfc-"))
    settings = Settings(
        backend="replay", replay_speed=10.0, listen="127.0.0.1:0", job_socket=True,
        socket_path=str(tmp / "s.sock"), state_dir=str(tmp / "state"), program_refresh_s=0.3,
    ).validate()
    d = build(settings)
    loop = threading.Thread(target=d.run, daemon=True)
    loop.start()
    try:
        with JobReporter("ft-2", "prog-c", socket_path=str(tmp / "s.sock")) as r:
            r.add(flops=1e15, tokens=1000)
            r.claim("half_rate_tensor_fraction", 0.4, sampled_steps=1, evidence="census")
            r.claim("half_rate_tensor_fraction", 0.2, sampled_steps=1, evidence="census 2")
            assert r.flush(5.0)
    finally:
        d.request_stop()
        loop.join(timeout=10)
    path = tmp / "state" / LEDGER_FILENAME
    led = Ledger.open(path, clock=time.time, synchronous="NORMAL")
    try:
        claims = [e for e in led.job_events("prog-c") if e.kind == "claim"]
        # The reporter sends the newest claim of a kind; the ledger keeps every one it got.
        assert claims and claims[-1].payload["value"] == 0.2
        assert claims[-1].payload["peer"]["pid"] > 0
        # This job's GPU work, as the sampler would have recorded it: 8e14 HMMA + 2e14 FP32.
        led.append_interval(time.time(), time.time() + 1, [
            FlopsRow("0", "GPU-x", "hmma", "bf16", "ft-2", "prog-c", 1, 8e14),
            FlopsRow("0", "GPU-x", "fp32", "fp32", "ft-2", "prog-c", 1, 2e14)])
        assert led.verify().ok
        [inp] = job_inputs(led, led.totals(), led.job_events("prog-c"), "prog-c")
        assert (inp.hmma_flops, inp.half_rate_fraction) == (8e14, 0.2)
        r2 = reconcile_job(inp)
        assert r2.hardware_flops == pytest.approx(8e14 / 1.2 + 2e14)
        # No claim can take the HMMA figure below half its counts (512 ops/cycle, the slowest).
        worst = reconcile_job(replace(inp, half_rate_fraction=1.0))
        assert worst.hardware_flops == pytest.approx(8e14 / 2 + 2e14)
    finally:
        led.close()
