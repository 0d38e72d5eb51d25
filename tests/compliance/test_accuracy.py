"""The report quotes the accuracy measured on the GPU models the program ran on."""

from __future__ import annotations

import time
from pathlib import Path

from gpuflops.compliance.accuracy import NOT_MEASURED, accuracy_for
from gpuflops.compliance.report import build_report
from gpuflops.compliance.thresholds import ProgramsConfig
from gpuflops.ledger.store import Ledger
from gpuflops.model import FlopsRow


def test_figures_follow_the_gpu_model() -> None:
    h200 = accuracy_for(["NVIDIA H200"])
    h100 = accuracy_for(["NVIDIA H100 80GB HBM3"])
    assert any("H200" in k for k in h200) and not any("H100 GPM" in k for k in h200)
    assert any("H100" in k for k in h100) and not any("H200" in k for k in h100)
    assert accuracy_for(["NVIDIA A100-SXM4-80GB"]) == {"NVIDIA A100-SXM4-80GB": NOT_MEASURED}
    assert accuracy_for([]) == {}


def test_a_report_quotes_the_figures_of_the_recorded_gpus(tmp_path: Path) -> None:
    led = Ledger.open(tmp_path / "ledger.sqlite3", clock=time.time)
    try:
        led.append_session("start", 1000.0, {"backend": "nvml", "counters": "cupti_pm",
                                              "gpu_models": ["NVIDIA H200"]})
        led.append_job_event("register", "j", "p", {"precision": "bf16"}, 1001.0)
        led.append_interval(1001.0, 1002.0, [FlopsRow("0", "GPU-a", "hmma", "bf16", "j", "p",
                                                      7, 1e15)])
        doc = build_report("p", ledger=led, config=ProgramsConfig(), now_s=1003.0)
    finally:
        led.close()
    names = [u["name"] for u in doc["method"]["uncertainties"]]
    assert any("H200" in n for n in names) and not any("H100 GPM" in n for n in names)
    assert doc["method"]["counter_sources"] == ["cupti_pm"]
