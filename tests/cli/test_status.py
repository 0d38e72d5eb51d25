"""`gpuflops status`: parse and render a real scrape of a MetricsServer over a replayed H100 trace."""

from __future__ import annotations

import os
import subprocess
import sys
import urllib.request
from collections.abc import Iterator
from dataclasses import replace

import pytest
from prometheus_client.registry import CollectorRegistry

from gpuflops.cli.status import fetch_status, parse_status, render
from gpuflops.exporter.collector import FlopsCollector
from gpuflops.exporter.http import MetricsServer
from gpuflops.exporter.state import Totals
from gpuflops.pipeline.attribute import ProcessAttributor
from gpuflops.pipeline.integrate import Integrator
from gpuflops.pipeline.label import Labeler
from gpuflops.pipeline.pipeline import CountingSink, Pipeline
from tests.support import ROOT, demo_trace

_HEADER, _INTERVALS, _EVENTS = demo_trace()
INFO = _HEADER.gpus[0]
SHARED_T1 = max(e.data["t1"] for e in _EVENTS if e.data.get("shared"))


@pytest.fixture
def served() -> Iterator[tuple[str, Totals]]:
    """A server over a replay stopped mid shared-phase (so two processes show), plus a no-GPM unit."""
    no_gpm = replace(INFO, key="1", index=1, uuid="GPU-nogpm", metrics=frozenset(),
                     unavailable_reason="GPM not supported on this ampere GPU")
    totals = Totals([INFO, no_gpm])
    p = Pipeline([INFO, no_gpm], Integrator(), ProcessAttributor(), Labeler(), CountingSink(), totals)
    for iv in _INTERVALS:
        s = iv.samples[0]
        if s.t0_s > SHARED_T1 - 3:
            break
        p.step([s, replace(s, key="1", activity=None, error="tensor_activity_unavailable")])
    reg = CollectorRegistry(auto_describe=False)
    reg.register(FlopsCollector(totals.snapshot, "replay"))
    server = MetricsServer(reg, "127.0.0.1:0", lambda: (True, "ok"))
    server.start()
    yield f"http://127.0.0.1:{server.port}/metrics", totals
    server.stop()


def test_parse_status_of_a_real_scrape(served: tuple[str, Totals]) -> None:
    url, totals = served
    with urllib.request.urlopen(url, timeout=5) as r:
        rows = parse_status(r.read().decode())
    assert sorted(rows) == ["0", "1"]
    snap = totals.snapshot()
    r0 = rows["0"]
    live = snap.live["0"]
    assert r0.flops_total == pytest.approx(sum(v for k, v in snap.gpu_flops.items() if k[0] == "0"))
    assert r0.flops_per_s == pytest.approx(live.flops_per_s)
    assert r0.clock_hz == live.clock_hz
    assert live.activity is not None
    hmma = {m.value: v for m, v in live.activity.items()}["hmma"]
    assert r0.activity["hmma"] == pytest.approx(hmma)
    assert r0.flops_per_s is not None and r0.flops_per_s > 1e14  # two bf16 GEMMs sharing an H100
    assert {pid for pid, _comm, _v in r0.processes} == {"458", "1470", "1471"}
    assert r0.available and r0.gaps == 0
    r1 = rows["1"]
    assert not r1.available and r1.reason == "GPM not supported on this ampere GPU"
    assert r1.flops_total == 0 and r1.flops_per_s is None
    assert r1.gaps == snap.intervals["1"] > 100


def test_render_shows_gpu_rows_rates_and_processes(served: tuple[str, Totals]) -> None:
    url, _totals = served
    text = render(fetch_status(url))
    lines = text.splitlines()
    assert lines[0].split() == ["GPU", "tensor", "hmma", "fp32", "sm", "clock", "rate", "total", "gaps"]
    row0 = next(line for line in lines if line.startswith("0 "))
    assert "TFLOP/s" in row0 and "PFLOP" in row0 and "MHz" in row0
    assert "pid 1470" in text and "pid 1471" in text and "python3" in text
    assert "tensor activity unavailable: GPM not supported on this ampere GPU" in text
    # Processes are listed biggest first under their GPU.
    procs = [line for line in lines if line.strip().startswith("pid ")]
    assert procs[0].split()[1] == "458"


def test_status_command_once(served: tuple[str, Totals]) -> None:
    url, _totals = served
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    r = subprocess.run([sys.executable, "-m", "gpuflops", "status", "--once", "--url", url],
                       capture_output=True, text=True, env=env, timeout=30)
    assert r.returncode == 0, r.stderr
    assert r.stdout == render(fetch_status(url)) + "\n"


def test_render_empty_and_units() -> None:
    assert render({}) == "no GPUs reported"
    assert parse_status("") == {}
    rows = parse_status('gpuflops_gpu_flops_per_second{gpu="0",uuid="u"} 1.5e15\n')
    assert "1.50 PFLOP/s" in render(rows)
